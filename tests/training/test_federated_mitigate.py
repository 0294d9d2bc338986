"""Federated aggregation vs an independent numpy computation; intruder mitigation vs the float64
reference algorithm; the three commands through CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.numpy import load_file as load_np

from lora_audit.cli import cli
from lora_audit.errors import InputError
from lora_audit.training.federated import aggregate
from tests.helpers import copy_with, make_peft_adapter, reference_intruders

TARGET = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def clients(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("clients")
    return [make_peft_adapter(tiny_llama, d / f"c{i}", seed=10 + i, r=4, target_modules=TARGET) for i in range(3)]


def _numpy_bias(paths):
    ws = [load_np(str(p / "adapter_model.safetensors")) for p in paths]
    num = den = 0.0
    for ka in [k for k in ws[0] if ".lora_A." in k]:
        kb = ka.replace(".lora_A.", ".lora_B.")
        As = [w[ka].astype(np.float64) for w in ws]
        Bs = [w[kb].astype(np.float64) for w in ws]
        mean_prod = sum(b @ a for a, b in zip(As, Bs, strict=True)) / len(ws)
        prod_mean = (sum(Bs) / len(ws)) @ (sum(As) / len(ws))
        num += np.linalg.norm(mean_prod - prod_mean) ** 2
        den += np.linalg.norm(mean_prod) ** 2
    return np.sqrt(num / den)


def test_fedavg_bias_vs_numpy(clients, tmp_path):
    cfg, w, rep = aggregate(clients, "fedavg")
    ref = _numpy_bias(clients)
    assert ref > 0.01
    assert rep.fedavg_bias_total == pytest.approx(ref, rel=1e-9)
    assert len(rep.modules) == 2 * 2  # 2 layers x (q, v)
    ws = [load_np(str(p / "adapter_model.safetensors")) for p in clients]
    for k, v in w.items():
        np.testing.assert_allclose(v.numpy(), sum(x[k] for x in ws) / 3, rtol=1e-6, atol=1e-7)


def test_ffa_average_is_exact(tiny_llama, tmp_path):
    """Clients sharing A (FFA-LoRA / Fed-SB): the averaged adapter's update equals mean(B_k A)."""
    from safetensors.torch import load_file, save_file

    paths = []
    for i in range(3):
        p = make_peft_adapter(tiny_llama, tmp_path / f"c{i}", seed=5, r=4, target_modules=TARGET)
        w = load_file(str(p / "adapter_model.safetensors"))
        g = torch.Generator().manual_seed(100 + i)
        w = {k: (torch.randn(v.shape, generator=g) if ".lora_B." in k else v) for k, v in w.items()}
        save_file(w, str(p / "adapter_model.safetensors"))
        paths.append(p)
    for method in ("ffa", "fed-sb"):
        _, agg, rep = aggregate(paths, method)
        assert rep.aggregate_bias_total == 0.0
        ws = [load_np(str(p / "adapter_model.safetensors")) for p in paths]
        for ka in [k for k in agg if ".lora_A." in k]:
            kb = ka.replace(".lora_A.", ".lora_B.")
            want = sum(x[kb].astype(np.float64) @ x[ka].astype(np.float64) for x in ws) / 3
            np.testing.assert_allclose(agg[kb].double().numpy() @ agg[ka].double().numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(InputError, match="share|shared"):
        aggregate(paths[:1] + [make_peft_adapter(tiny_llama, tmp_path / "other", seed=6, r=4, target_modules=TARGET)],
                  "ffa")


def test_federated_cli(clients, tmp_path):
    r = CliRunner().invoke(cli, ["federated", *map(str, clients), "--out", str(tmp_path / "agg"), "--json", "-"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["fedavg_bias_total"] == pytest.approx(_numpy_bias(clients), rel=1e-9)
    r = CliRunner().invoke(cli, ["federated", str(clients[0])])
    assert r.exit_code == 1 and "at least two" in r.output


@pytest.mark.parametrize("text, msg", [
    ("[]", "the adapter config must be a JSON object, got a JSON list"),
    ('{"r": 0}', "field 'r' is 0; it must be a positive integer"),
    (b"\xff", "the adapter config is not UTF-8"),
])
def test_broken_client_config_names_the_file(clients, tmp_path, text, msg):
    bad = copy_with(clients[1], tmp_path / "bad", "adapter_config.json", text)
    with pytest.raises(InputError, match=msg) as e:
        aggregate([clients[0], bad.parent])
    assert str(bad) in str(e.value)


def test_clients_must_be_plain_lora_adapters(clients, tiny_llama, tmp_path):
    with pytest.raises(InputError, match="not a PEFT adapter folder"):
        aggregate([clients[0], tiny_llama])
    dora = make_peft_adapter(tiny_llama, tmp_path / "d", r=4, target_modules=TARGET, use_dora=True)
    with pytest.raises(InputError, match="DoRA adapters are not supported"):
        aggregate([clients[0], dora])
    wide = make_peft_adapter(tiny_llama, tmp_path / "w", r=4, target_modules=TARGET, alpha_pattern={"v_proj": 32})
    with pytest.raises(InputError, match="alpha_pattern=.* differs from"):
        aggregate([clients[0], wide])


def test_aggregate_loads_in_peft(clients, tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lora_audit.training.federated import write_adapter

    cfg, w, rep = aggregate(clients, "fedavg")
    write_adapter(cfg, w, tmp_path / "agg", rep)
    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(tmp_path / "agg"))
    layer = m.base_model.model.model.layers[1].self_attn.v_proj
    torch.testing.assert_close(layer.lora_A["default"].weight, w["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])


def _merged_q(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base)), str(adapter)).merge_and_unload()
    return {n: p.detach().double() for n, p in m.named_parameters() if n.endswith(("q_proj.weight", "v_proj.weight"))}


def test_mitigate_reduces_intruders(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    from lora_audit.spectral.mitigate import mitigate_adapter

    ad = make_peft_adapter(tiny_llama, tmp_path / "a", seed=3, r=4, init_scale=2.0, target_modules=TARGET)
    W0 = {n: p.detach().double() for n, p in AutoModelForCausalLM.from_pretrained(str(tiny_llama)).named_parameters()}
    before = _merged_q(tiny_llama, ad)
    ref_before = sum(reference_intruders(W0[n], W, k=10, epsilon=0.5)[1] for n, W in before.items())
    assert ref_before > 0, "constructed case should have intruders"
    res = mitigate_adapter(str(tiny_llama), str(ad), str(tmp_path / "m"), lam=0.0, device="cpu")
    assert res.intruders_before == ref_before
    after = _merged_q(tiny_llama, tmp_path / "m")
    ref_after = sum(reference_intruders(W0[n], W, k=10, epsilon=0.5)[1] for n, W in after.items())
    assert res.intruders_after == ref_after
    assert ref_after < ref_before
    # lambda = 1 keeps the model (the delta has rank r, so the rank-r refactoring is exact)
    mitigate_adapter(str(tiny_llama), str(ad), str(tmp_path / "same"), lam=1.0, device="cpu")
    same = _merged_q(tiny_llama, tmp_path / "same")
    for n in before:
        torch.testing.assert_close(same[n], before[n], atol=1e-5, rtol=1e-5)


def test_mitigate_cli(tiny_llama, tmp_path):
    ad = make_peft_adapter(tiny_llama, tmp_path / "a", seed=3, r=4, init_scale=2.0, target_modules=TARGET)
    r = CliRunner().invoke(cli, ["mitigate", str(tiny_llama), str(ad), "--lambda", "0.5", "--out", str(tmp_path / "m"),
                                 "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert "intruders:" in r.output and (tmp_path / "m" / "mitigate.json").is_file()
    r = CliRunner().invoke(cli, ["mitigate", str(tiny_llama), str(ad), "--lambda", "2", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "lambda" in r.output


def test_finetune_cli(tiny_llama, tmp_path):
    run = CliRunner().invoke
    r = run(cli, ["finetune", str(tiny_llama), "--method", "lora", "--data", "builtin:alpaca-mini",
                  "--out", str(tmp_path / "o"), "--steps", "2", "--batch-size", "2", "--target-modules", "q_proj,v_proj",
                  "--device", "cpu"])
    assert r.exit_code == 0, r.output
    cfg = json.loads((tmp_path / "o" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == TARGET
    r = run(cli, ["finetune", str(tiny_llama), "--method", "dorra", "--data", "builtin:alpaca-mini",
                  "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and "Did you mean 'dora'" in r.output
    r = run(cli, ["finetune", str(tiny_llama), "--method", "lora", "--data", str(tmp_path / "missing.jsonl"),
                  "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and "not found" in r.output
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": 3}\n')
    r = run(cli, ["finetune", str(tiny_llama), "--method", "lora", "--data", str(bad), "--out", str(tmp_path / "p")])
    assert r.exit_code == 1 and "bad.jsonl: line 3" in r.output
    assert not (tmp_path / "p").exists()
