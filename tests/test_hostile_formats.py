"""Hostile and careless inputs to the readers of checkpoints and adapters (issue 24, cases 16, 22, 23,
26): each ends in a result or a clean one-line error, never a traceback or "This is a bug"."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_audit.cli import cli
from tests.helpers import make_peft_adapter


def _strict_json(path: Path):
    """The file parsed as strict JSON (NaN / Infinity refused, as every JSON reader but Python's does)."""
    def refuse(name):
        raise AssertionError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


def _cli(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _clean(r, code: int) -> None:
    assert r.exit_code == code, r.output
    assert "This is a bug" not in r.output and "Traceback" not in r.output


# ---- 22: NaN never reaches a JSON document --------------------------------------------------------------
def test_nan_in_one_experts_lora_b_keeps_the_json_valid(tmp_path):
    from transformers import MixtralConfig, MixtralForCausalLM

    from tests.checkpoints.families import peft_adapter

    torch.manual_seed(0)
    MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=24, num_local_experts=3,
                                     num_experts_per_tok=2)).save_pretrained(tmp_path / "moe")
    ad = peft_adapter(MixtralForCausalLM.from_pretrained(tmp_path / "moe"), tmp_path / "a", r=2, lora_alpha=4,
                      target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj"])
    sd = load_file(str(ad / "adapter_model.safetensors"))
    key = next(k for k in sd if "experts" in k and "lora_B" in k)
    sd[key][:, 1] = float("nan")  # B (out, r x experts) = (out, r, experts): column 1 is expert 1's
    save_file(sd, str(ad / "adapter_model.safetensors"))
    r = _cli("spectrum", tmp_path / "moe", ad, "--no-cache", "--device", "cpu", "--json", tmp_path / "s.json")
    _clean(r, 4)  # incomplete: one matrix not audited
    res = _strict_json(tmp_path / "s.json")["results"][0]
    assert [s["name"] for s in res["skipped"]] == ["model.layers.0.mlp.experts.gate_up_proj[1]"]
    sim = res["info"]["expert_similarity"]["model.layers.0.mlp.experts.gate_up_proj"]
    assert sim["update_cos"][1] == [None] * 3 and sim["update_cos"][0][1] is None
    assert sim["update_cos"][0][0] == pytest.approx(1.0) and sim["output_overlap"][2][0] is not None


def test_update_similarity_of_non_finite_or_overflowing_factors_is_null():
    from lora_audit.checkpoints.adapter_sets import update_similarity

    g = torch.Generator().manual_seed(0)
    f = [(torch.randn(6, 2, generator=g), torch.randn(2, 5, generator=g), 1.0) for _ in range(3)]
    f[1] = (torch.full((6, 2), float("inf")), f[1][1], 1.0)
    f[2] = (f[2][0].double() * 1e200, f[2][1].double() * 1e200, 1.0)  # finite, but B^T B overflows
    sim = update_similarity(f)
    assert sim["update_cos"][0][0] == 1.0 and sim["update_cos"][0][1] is None and sim["update_cos"][1][1] is None
    assert sim["update_cos"][2][2] is None and sim["output_overlap"][1] == [None] * 3


def test_a_federated_client_with_nan_is_refused_by_name(tiny_llama, tmp_path):
    clients = [make_peft_adapter(tiny_llama, tmp_path / f"c{i}", seed=i, target_modules=["q_proj"]) for i in range(2)]
    sd = load_file(str(clients[1] / "adapter_model.safetensors"))
    key = next(k for k in sd if "lora_B" in k)
    sd[key][0, 0] = float("nan")
    save_file(sd, str(clients[1] / "adapter_model.safetensors"))
    r = _cli("federated", *clients, "--out", tmp_path / "fed", "--json", tmp_path / "fed.json")
    _clean(r, 1)
    assert f"{clients[1]}: tensor {key} holds NaN/inf values" in r.output
    assert not (tmp_path / "fed").exists() and not (tmp_path / "fed.json").exists()


def test_json_writer_turns_any_stray_non_finite_float_into_null(tmp_path):
    import numpy as np

    from lora_audit.io import atomic_write_json, json_text

    obj = {"a": 1.5, "b": [float("nan"), np.float32("inf"), torch.tensor([2.0, float("-inf")])], "c": (3, "x")}
    assert json.loads(json_text(obj)) == {"a": 1.5, "b": [None, None, [2.0, None]], "c": [3, "x"]}
    atomic_write_json(tmp_path / "x.json", obj)
    assert _strict_json(tmp_path / "x.json")["b"][0] is None
    assert json_text({"a": [1.0, 2]}) == json.dumps({"a": [1.0, 2]}, indent=2) + "\n"  # finite: unchanged


def test_a_non_finite_capability_score_is_not_measured(monkeypatch):
    from lora_audit.safety import capability

    class FakeLM:
        def __init__(self, **kw):
            pass

    res = {"results": {"t1": {"acc,none": float("nan")}, "t2": {"word_perplexity,none": float("inf")},
                       "t3": {"acc,none": 0.5}}}
    monkeypatch.setattr("lm_eval.simple_evaluate", lambda **kw: res)
    monkeypatch.setattr("lm_eval.models.huggingface.HFLM", FakeLM)
    cap = object.__new__(capability.Capability)  # the task names are not resolved: lm-eval is faked
    cap.tasks, cap.limit, cap.batch_size, cap.seed, cap.task_manager = ["t1", "t2", "t3"], None, 1, 0, None

    class Tok:
        padding_side = "left"

    scores, _ = cap.run(torch.nn.Linear(1, 1), Tok())
    assert scores == {"t1": None, "t2": None, "t3": 0.5} and not any(
        isinstance(v, float) and not math.isfinite(v) for v in scores.values())


# ---- 23: a malicious pickle is refused, by every loader that reads pickles --------------------------------
class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def evil_model(tiny_llama, tmp_path):
    folder = tmp_path / "evil"
    shutil.copytree(tiny_llama, folder)
    (folder / "model.safetensors").unlink()
    torch.save({"model.embed_tokens.weight": torch.zeros(2, 2), "x": _Payload(tmp_path / "PWNED")},
               str(folder / "pytorch_model.bin"))
    return folder


@pytest.mark.parametrize("command", ["spectrum", "safety-eval"])
def test_malicious_pickle_is_refused_not_a_bug(tiny_llama, evil_model, tmp_path, command):
    if command == "spectrum":
        r = _cli("spectrum", tiny_llama, evil_model, "--allow-pickle", "--no-cache", "--device", "cpu")
    else:
        r = _cli("safety-eval", "--base", tiny_llama, "--tuned", evil_model, "--allow-pickle", "--device", "cpu",
                 "--tasks", "none", "--limit", "2", "--scorer", "first-token")
    _clean(r, 1)
    assert "refused: the pickle holds more than tensors" in r.output and "nothing in it was run" in r.output
    assert "weights_only set to `False`" not in r.output  # torch's advice to run it is not repeated
    assert not (tmp_path / "PWNED").exists()


def test_legacy_and_corrupt_pickles(tiny_llama, tmp_path):
    from lora_audit.checkpoints.sources import open_weights
    from lora_audit.errors import FormatError

    sd = load_file(str(tiny_llama / "model.safetensors"))
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    shutil.copy(tiny_llama / "config.json", legacy)
    torch.save(sd, str(legacy / "pytorch_model.bin"), _use_new_zipfile_serialization=False)
    src = open_weights(legacy, allow_pickle=True)  # the pre-zip format cannot be memory-mapped: read whole
    assert torch.equal(src.get("model.layers.0.self_attn.q_proj.weight"), sd["model.layers.0.self_attn.q_proj.weight"])
    (legacy / "pytorch_model.bin").write_bytes((legacy / "pytorch_model.bin").read_bytes()[:500])
    with pytest.raises(FormatError, match=r"pytorch_model.bin: not a readable pickle of tensors, truncated or "
                                          r"corrupted .*nothing in it was run"):
        open_weights(legacy, allow_pickle=True)


# ---- 16: a rank above the matrices' smaller side ------------------------------------------------------------
@pytest.mark.parametrize("method, rank, msg", [
    ("lora", 100000, r"--rank 100000: lora needs --rank 100000 <= the smaller side of every matrix it trains, but "
                     r"model.layers.0.self_attn.k_proj is 32x64 \(at most --rank 32\)"),
    ("lora-ga", 20, r"--rank 20: lora-ga needs 2 x --rank = 40 <= .* \(at most --rank 16\)"),
    ("dora", 65, r"--rank 65: dora .* model.layers.0.self_attn.q_proj is 64x64 \(at most --rank 64\)"),
])
def test_finetune_refuses_a_rank_above_the_matrix_side_before_loading(tiny_llama, tmp_path, monkeypatch, method,
                                                                      rank, msg):
    import re

    from lora_audit.checkpoints import models

    def no_loading(*a, **kw):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(models, "load_model", no_loading)
    monkeypatch.setattr("lora_audit.checkpoints.load_model", no_loading)
    targets = ["--target-modules", "q_proj"] if method == "dora" else []
    r = _cli("finetune", "--method", method, "--base", tiny_llama, "--data", "builtin:alpaca-mini", "--out",
             tmp_path / "out", "--rank", rank, "--steps", 1, "--device", "cpu", *targets)
    _clean(r, 1)
    assert re.search(msg, r.output), r.output
    assert not (tmp_path / "out").exists()


def test_finetune_rank_is_checked_on_a_gguf_base_after_loading(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    r = _cli("finetune", "--method", "lora", "--base", path, "--data", "builtin:alpaca-mini", "--out", tmp_path / "o",
             "--rank", 100000, "--steps", 1, "--device", "cpu")
    _clean(r, 1)
    assert "--rank 100000: lora needs --rank 100000 <= the smaller side" in r.output and not (tmp_path / "o").exists()
