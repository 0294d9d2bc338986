"""`lora-audit mitigate` against peft's own ``reduce_intruder_dimension`` (peft 0.21) on the same
adapter: the merged updates agree, the intruders it finds are the ones peft finds, and the new
adapter keeps the original config, keys, shapes and dtypes. Plus every refused input."""

import json
import math
import shutil

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_audit.cli import cli
from lora_audit.errors import InputError, OutputError
from lora_audit.spectral.mitigate import mitigate_adapter, rank_r_factors
from tests.helpers import make_peft_adapter
from tests.spectral.fixtures import make_full_finetune, randomize_embedding_A

TARGETS = ["q_proj", "v_proj", "down_proj", "embed_tokens"]


@pytest.fixture(scope="module")
def adapters(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("mitigate")
    return {
        "lora": randomize_embedding_A(make_peft_adapter(tiny_llama, d / "lora", seed=3, r=4, init_scale=2.0,
                                                        target_modules=TARGETS)),
        "rslora": make_peft_adapter(tiny_llama, d / "rslora", seed=4, r=4, lora_alpha=6, use_rslora=True,
                                    init_scale=2.0, target_modules=["q_proj", "o_proj", "up_proj"],
                                    rank_pattern={"o_proj": 2}),
        "dora": make_peft_adapter(tiny_llama, d / "dora", seed=5, r=4, use_dora=True, target_modules=["q_proj"]),
        "full": make_full_finetune(tiny_llama, d / "full"),
        "dir": d,
    }


def peft_model(base, adapter):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32), str(adapter))


def deltas(model, adapter_name="default") -> dict[str, torch.Tensor]:
    """peft's own dW = get_delta_weight per LoRA layer, float64, keyed by the base parameter name."""
    from peft.tuners.lora import LoraLayer

    return {name.removeprefix("base_model.model.") + ".weight": mod.get_delta_weight(adapter_name).detach().double()
            for name, mod in model.named_modules() if isinstance(mod, LoraLayer) and adapter_name in mod.scaling}


@pytest.mark.parametrize("name,lam", [("lora", 0.75), ("lora", 0.0), ("rslora", 0.3)])
def test_merged_updates_equal_peft_reduce_intruder_dimension(tiny_llama, adapters, tmp_path, name, lam):
    from peft.tuners.lora.intruders import reduce_intruder_dimension

    reference = peft_model(tiny_llama, adapters[name])
    logged: list[str] = []
    reduce_intruder_dimension(reference, mitigation_lambda=lam, logging_sink=logged.append)
    expected = deltas(reference, "intruder_reduced")
    rec = mitigate_adapter(tiny_llama, adapters[name], tmp_path / "out", lam=lam, device="cpu", progress=False)
    got = deltas(peft_model(tiny_llama, tmp_path / "out"))
    assert set(got) == set(expected) == set(rec.modules)
    for key, dW in expected.items():
        if "embed_tokens" in key and rec.modules[key].rewritten:
            # peft 0.21 stores the new factors of the (vocab x dim) update of an embedding in the
            # slots of lora_embedding_B (dim x r) and _A (r x vocab) as they come, so its own
            # get_delta_weight returns the transpose (and the layer would not run); the values are right
            assert dW.shape == got[key].T.shape
            dW = dW.T
        assert (got[key] - dW).norm() <= 1e-4 * dW.norm(), key
    # peft logs "<module>: Intruders: n" / "<module>: No intruders" per layer
    peft_counts = {line.split(":")[0].removeprefix("base_model.model.") + ".weight":
                   int(line.rsplit(" ", 1)[1]) if "Intruders:" in line else 0
                   for line in logged if line.startswith("base_model.model.")}
    assert {k: r.intruders_before for k, r in rec.modules.items()} == peft_counts
    assert rec.intruders_before > 0 and rec.matrices_rewritten > 0
    if lam == 0.0:  # removed; at 0.75 the directions keep 3/4 of their singular value and may stay on top
        assert rec.intruders_after < rec.intruders_before


def test_new_adapter_keeps_config_keys_shapes_and_dtypes(tiny_llama, adapters, tmp_path):
    src = adapters["lora"]
    rec = mitigate_adapter(tiny_llama, src, tmp_path / "out", lam=0.5, device="cpu", progress=False)
    out = tmp_path / "out"
    assert (out / "adapter_config.json").read_bytes() == (src / "adapter_config.json").read_bytes()
    old, new = load_file(str(src / "adapter_model.safetensors")), load_file(str(out / "adapter_model.safetensors"))
    assert {k: (v.shape, v.dtype) for k, v in old.items()} == {k: (v.shape, v.dtype) for k, v in new.items()}
    changed = {k for k in old if not torch.equal(old[k], new[k])}
    rewritten = [n for n, r in rec.modules.items() if r.rewritten]
    assert changed and all(any(n.removesuffix(".weight") in k for n in rewritten) for k in changed)
    saved = json.loads((out / "mitigate.json").read_text())
    assert saved["lora_audit"]["schema"] == "mitigate" and saved["lora_audit"]["settings"]["lam"] == 0.5
    assert saved["modules"] == rec.to_json()["modules"] and saved["lambda"] == 0.5
    assert (out / ".lora-audit-output").is_file()


def test_lambda_one_copies_every_tensor(tiny_llama, adapters, tmp_path):
    src = adapters["lora"]
    rec = mitigate_adapter(tiny_llama, src, tmp_path / "same", lam=1.0, device="cpu", progress=False)
    old, new = load_file(str(src / "adapter_model.safetensors")), load_file(str(tmp_path / "same" /
                                                                                 "adapter_model.safetensors"))
    assert all(torch.equal(old[k], new[k]) for k in old) and rec.matrices_rewritten == 0
    assert rec.intruders_after == rec.intruders_before > 0


def test_one_svd_of_each_tuned_matrix(tiny_llama, adapters, tmp_path, monkeypatch):
    """Per adapted matrix: one SVD of W1, and one of W0 unless the spectrum cache has it; the
    rank-r refactoring works on a small core, and the count after mitigation takes the LoRA fast
    path (the tests send even tiny matrices there). Cached or not, the adapter is the same."""
    from lora_audit.spectral.api import open_cache

    calls: list[tuple[int, ...]] = []
    real = torch.linalg.svd

    def counting(A, *a, **kw):
        calls.append(tuple(A.shape))
        return real(A, *a, **kw)

    monkeypatch.setattr(torch.linalg, "svd", counting)
    cache = open_cache(tmp_path / "spectra")
    runs = {}
    for run in ("no_cache", "cold", "warm"):
        calls.clear()
        rec = mitigate_adapter(tiny_llama, adapters["rslora"], tmp_path / run, lam=0.0, device="cpu", progress=False,
                               cache=None if run == "no_cache" else cache)
        full_size = [s for s in calls if min(s) > 8]  # the LoRA cores are at most (r + k) square
        runs[run] = load_file(str(tmp_path / run / "adapter_model.safetensors"))
        assert len(full_size) == (1 if run == "warm" else 2) * len(rec.modules), run
    assert all(torch.equal(runs["no_cache"][key], runs[run][key]) for run in ("cold", "warm") for key in runs["cold"])


@pytest.mark.parametrize("m,n,q,r", [(30, 20, 6, 4), (20, 30, 3, 4), (25, 25, 8, 8)])
def test_rank_r_factors_equal_the_truncated_dense_svd(m, n, q, r):
    g = torch.Generator().manual_seed(m + q)
    L, R = torch.randn(m, q, generator=g, dtype=torch.float64), torch.randn(q, n, generator=g, dtype=torch.float64)
    U, S, Vh = torch.linalg.svd(L @ R)  # the plain reference on the m x n matrix
    best = (U[:, :r] * S[:r]) @ Vh[:r]
    for scale in (0.5, -2.0):
        B, A, err = rank_r_factors(L, R, r, scale)
        assert B.shape == (m, r) and A.shape == (r, n)
        torch.testing.assert_close(scale * B @ A, best, atol=1e-10, rtol=0)
        assert err == pytest.approx(math.sqrt(float(S[r:].square().sum() / S.square().sum())), abs=1e-12)
        assert B.norm(dim=0) == pytest.approx(A.norm(dim=1))  # the norm is shared between B and A


@pytest.mark.parametrize("kw,message", [({"lam": 1.5}, "--lambda"), ({"lam": -0.1}, "--lambda"),
                                        ({"lam": float("nan")}, "--lambda"), ({"k": 0}, "--k"),
                                        ({"epsilon": 7}, "--epsilon"), ({"epsilon": 0.0}, "--epsilon")])
def test_bad_settings_are_input_errors_before_any_work(tiny_llama, adapters, tmp_path, kw, message):
    with pytest.raises(InputError, match=message):
        mitigate_adapter(tiny_llama, adapters["lora"], tmp_path / "never", device="cpu", progress=False, **kw)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("which,message", [("full", "a full model folder, not a PEFT LoRA adapter"),
                                           ("dora", "a DoRA adapter")])
def test_full_model_and_dora_are_refused(tiny_llama, adapters, tmp_path, which, message):
    with pytest.raises(InputError, match=message):
        mitigate_adapter(tiny_llama, adapters[which], tmp_path / "never", device="cpu", progress=False)
    r = CliRunner().invoke(cli, ["mitigate", str(tiny_llama), str(adapters[which]), "--out", str(tmp_path / "n")])
    assert r.exit_code == 1 and r.output.startswith("Error: ") and "bug" not in r.output
    assert not (tmp_path / "never").exists() and not (tmp_path / "n").exists()


def test_nan_in_the_adapter_is_refused_by_name(tiny_llama, adapters, tmp_path):
    bad = tmp_path / "nan"
    shutil.copytree(adapters["lora"], bad)
    tensors = load_file(str(bad / "adapter_model.safetensors"))
    key = next(k for k in tensors if "layers.1.self_attn.v_proj.lora_A" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(bad / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"model\.layers\.1\.self_attn\.v_proj\.weight: 1 NaN/Inf value.*lora_A"):
        mitigate_adapter(tiny_llama, bad, tmp_path / "never", device="cpu", progress=False)
    assert not (tmp_path / "never").exists()


@pytest.mark.parametrize("args,message", [(["--epsilon", "7"], "Invalid value for '--epsilon'"),
                                          (["--k", "0"], "Invalid value for '--k'"),
                                          (["--lambda", "2"], "Invalid value for '--lambda'")])
def test_cli_ranges(tiny_llama, adapters, tmp_path, args, message):
    r = CliRunner().invoke(cli, ["mitigate", str(tiny_llama), str(adapters["lora"]), "--out", str(tmp_path / "m"),
                                 *args])
    assert r.exit_code == 2 and message in r.output and not (tmp_path / "m").exists()


def test_cli_overwrite_and_json(tiny_llama, adapters, tmp_path):
    run = CliRunner().invoke
    out, js = tmp_path / "m", tmp_path / "rec.json"
    args = ["mitigate", str(tiny_llama), str(adapters["lora"]), "--out", str(out), "--device", "cpu"]
    r = run(cli, args + ["--json", str(js)])
    assert r.exit_code == 0, r.output
    rec = json.loads(js.read_text())
    assert rec == json.loads((out / "mitigate.json").read_text())
    assert f"intruders: {rec['intruders_before']} -> {rec['intruders_after']}" in r.output
    r = run(cli, args)
    assert r.exit_code == 1 and "--overwrite" in r.output
    r = run(cli, args + ["--overwrite", "--json", str(js), "--lambda", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(js.read_text())["lambda"] == 1.0
    mine = tmp_path / "notes.json"
    mine.write_text('{"mine": true}')
    r = run(cli, args + ["--overwrite", "--json", str(mine)])
    assert r.exit_code == 1 and "not written by lora-audit" in r.output
    assert json.loads(mine.read_text()) == {"mine": True}


def test_outputs_that_would_destroy_an_input_are_refused(tiny_llama, adapters, tmp_path):
    with pytest.raises(OutputError, match="input"):
        mitigate_adapter(tiny_llama, adapters["lora"], adapters["lora"], device="cpu", progress=False)
    assert (adapters["lora"] / "adapter_model.safetensors").is_file()


@pytest.mark.smollm2
def test_gguf_base_gives_the_same_adapter_as_the_folder(smollm2_dir, tmp_path):
    """No model is loaded: the base may be the GGUF file itself (the stream dequantises it)."""
    from lora_audit.checkpoints.default_model import default_gguf_path

    ad = make_peft_adapter(smollm2_dir, tmp_path / "a", seed=2, r=4, init_scale=1.0, target_modules=["v_proj"],
                           layers_to_transform=[0, 1])
    a = mitigate_adapter(default_gguf_path(), ad, tmp_path / "from_gguf", lam=0.0, device="cpu", progress=False)
    b = mitigate_adapter(smollm2_dir, ad, tmp_path / "from_folder", lam=0.0, device="cpu", progress=False)
    assert a.modules == b.modules and a.intruders_before > 0
    ta = load_file(str(tmp_path / "from_gguf" / "adapter_model.safetensors"))
    tb = load_file(str(tmp_path / "from_folder" / "adapter_model.safetensors"))
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
