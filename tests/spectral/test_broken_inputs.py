"""Inputs the spectral audit cannot measure: NaN/Inf weights (a diverged fine-tune), an update that
overflows float32 (lora_alpha 1e39), an all-zero tuned matrix. Each is a finding naming the matrix
(TunedResult.skipped), the rest of the model is audited exactly as without it (checked against the
float64 reference on peft's merge of the clean checkpoint), and no NaN reaches the JSON."""

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_audit.checkpoints.deltas import Dense, DoRA, LowRank, MatrixGroup
from lora_audit.results.spectrum import load_spectrum
from lora_audit.spectral.api import run_spectrum
from lora_audit.spectral.engine import audit
from tests.helpers import make_peft_adapter
from tests.spectral.fixtures import make_full_finetune
from tests.spectral.reference import reference_audit

TARGETS = ["q_proj", "v_proj", "down_proj"]
ADAPTED = "model.layers.0.self_attn.v_proj.weight"
DENSE = "model.layers.0.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def clean(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("broken_inputs")
    adapter = make_peft_adapter(tiny_llama, d / "adapter", r=4, lora_alpha=8, seed=21, target_modules=TARGETS)
    full = make_full_finetune(tiny_llama, d / "full")
    return {"adapter": adapter, "full": full,
            "ref_adapter": reference_audit(tiny_llama, adapter), "ref_full": reference_audit(tiny_llama, full)}


def edited(src: Path, dst: Path, filename: str, change) -> Path:
    """A copy of the checkpoint folder ``src`` whose ``filename`` (safetensors) was edited by
    ``change(tensors)`` in place."""
    shutil.copytree(src, dst)
    f = dst / filename
    tensors = load_file(str(f))
    change(tensors)
    save_file(tensors, str(f), metadata={"format": "pt"})
    return dst


def lora_key(tensors: dict, module_name: str, part: str) -> str:
    stem = module_name.removesuffix(".weight")
    (key,) = [k for k in tensors if stem in k and f".{part}." in k]
    return key


def assert_rest_matches(tuned_result, ref: dict, skipped: set[str]):
    got = {m.name: m for m in tuned_result.matrices}
    assert set(got) == set(ref) - skipped
    for name in got:
        cos, count = ref[name]
        assert got[name].intruders == count, name
        assert got[name].max_cos == pytest.approx(cos, abs=1e-4), name


def assert_json_has_no_nan(result, tmp_path):
    path = result.write_json(tmp_path / "s.json")  # the writer refuses NaN/Inf
    back = load_spectrum(path)
    assert [r.skipped for r in back.results] == [r.skipped for r in result.results]
    assert back.incomplete == result.incomplete
    return json.loads(path.read_text())


def test_nan_in_lora_B_is_a_named_finding(tiny_llama, clean, tmp_path):
    def poison(t):
        key = lora_key(t, ADAPTED, "lora_B")
        t[key][0, 0] = float("nan")
        t[key][3, 1] = float("nan")

    bad = edited(clean["adapter"], tmp_path / "nan_adapter", "adapter_model.safetensors", poison)
    res = run_spectrum(tiny_llama, [bad, clean["adapter"]], device="cpu", progress=False, use_cache=False)
    broken, good = res.results
    assert [asdict(x) for x in broken.skipped] == [{"name": ADAPTED, "where": "lora_B", "reason": "2 NaN/Inf value(s) in the lora_B (float32)",
                               "nonfinite_values": 2}]
    assert broken.incomplete and res.incomplete and not good.incomplete
    assert_rest_matches(broken, clean["ref_adapter"], {ADAPTED})
    assert_rest_matches(good, clean["ref_adapter"], set())
    assert broken.matrices_unchanged == good.matrices_unchanged
    assert any(ADAPTED in w and "not audited" in w for w in broken.warnings)
    obj = assert_json_has_no_nan(res, tmp_path)
    assert obj["results"][0]["skipped"][0]["where"] == "lora_B"


def test_inf_in_full_finetune_makes_no_intruders(tiny_llama, clean, tmp_path):
    bad = edited(clean["full"], tmp_path / "inf_full", "model.safetensors",
                 lambda t: t[DENSE].__setitem__((0, 0), float("inf")))
    res = run_spectrum(tiny_llama, [bad], device="cpu", progress=False, use_cache=False)
    (r,) = res.results
    assert [(s.name, s.where, s.nonfinite_values) for s in r.skipped] == [(DENSE, "tuned", 1)]
    assert_rest_matches(r, clean["ref_full"], {DENSE})
    assert r.total_intruders == sum(c for n, (_, c) in clean["ref_full"].items() if n != DENSE)
    assert_json_has_no_nan(res, tmp_path)


def test_nan_in_base_is_skipped_for_every_tuned_model(tiny_llama, clean, tmp_path):
    bad_base = edited(tiny_llama, tmp_path / "nan_base", "model.safetensors",
                      lambda t: t[ADAPTED].__setitem__((1, 2), float("nan")))
    res = run_spectrum(bad_base, [clean["adapter"], clean["full"]], device="cpu", progress=False, use_cache=False)
    for r, ref in zip(res.results, (clean["ref_adapter"], clean["ref_full"]), strict=True):
        assert [(s.name, s.where, s.nonfinite_values) for s in r.skipped] == [(ADAPTED, "base", 1)]
        assert_rest_matches(r, ref, {ADAPTED})
    assert res.incomplete
    assert_json_has_no_nan(res, tmp_path)


def test_alpha_that_overflows_float32_is_a_finding(tiny_llama, clean, tmp_path):
    big = tmp_path / "big_alpha"
    shutil.copytree(clean["adapter"], big)
    cfg = json.loads((big / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 1e39
    (big / "adapter_config.json").write_text(json.dumps(cfg))
    res = run_spectrum(tiny_llama, [big], device="cpu", progress=False, use_cache=False)
    (r,) = res.results
    assert r.matrices == [] and {s.name for s in r.skipped} == set(clean["ref_adapter"])
    assert all(s.where == "update" and s.reason.startswith("update overflows float32") for s in r.skipped)
    assert res.incomplete
    assert_json_has_no_nan(res, tmp_path)
    # in float64 the same adapter is representable and is audited
    res64 = run_spectrum(tiny_llama, [big], device="cpu", progress=False, use_cache=False, float64=True)
    assert res64.results[0].skipped == [] and len(res64.results[0].matrices) == len(clean["ref_adapter"])


def test_all_zero_tuned_matrix_is_a_finding_without_intruders(tiny_llama, clean, tmp_path):
    zero = edited(clean["full"], tmp_path / "zero_full", "model.safetensors", lambda t: t[DENSE].zero_())
    res = run_spectrum(tiny_llama, [zero], device="cpu", progress=False, use_cache=False)
    (r,) = res.results
    assert [asdict(x) for x in r.skipped] == [{"name": DENSE, "where": "tuned", "reason": "tuned matrix is all zeros",
                          "nonfinite_values": 0}]
    assert not res.incomplete  # nothing was left unmeasured: a zero matrix has no direction
    assert_rest_matches(r, clean["ref_full"], {DENSE})


@pytest.mark.parametrize("exact", [True, False])
def test_synthetic_findings_for_every_place_a_value_can_break(exact):
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(24, 20, generator=g)
    B, A = torch.randn(24, 2, generator=g), torch.randn(2, 20, generator=g)
    W0[0] = 2 * A[0]
    cancel = B.clone()
    cancel[0] = torch.tensor([-2.0, 0.0])  # row 0 of V = W0 + B A is exactly 0: DoRA divides by its norm
    mag = W0.norm(dim=1)
    inf_A, nan_mag = A.clone(), mag.clone()
    inf_A[1, 3] = float("inf")
    nan_mag[:3] = float("nan")
    cases = {
        "scale": LowRank(B, A, float("nan")), "lora_A": LowRank(B, inf_A, 1.0),
        "magnitude": DoRA(B, A, 1.0, nan_mag), "update": DoRA(cancel, A, 1.0, mag),
        "zero": Dense(torch.zeros(24, 20)), "fine": LowRank(B, A, 0.5), "none": None,
    }
    res = audit([MatrixGroup("model.layers.0.mlp.up_proj.weight", W0, list(cases.values()))], exact=exact,
                device="cpu", progress=False, tuned_labels=list(cases))
    by = {r.tuned: r for r in res.results}
    for where in ("scale", "lora_A", "magnitude", "update"):
        (s,) = by[where].skipped
        assert s.where == where and by[where].incomplete, (where, s)
    assert by["scale"].skipped[0].nonfinite_values == 1 and by["magnitude"].skipped[0].nonfinite_values == 3
    assert by["zero"].skipped[0].reason == "tuned matrix is all zeros" and not by["zero"].incomplete
    assert len(by["fine"].matrices) == 1 and by["fine"].skipped == []
    assert by["none"].skipped == [] and by["none"].matrices_unchanged == 1


def test_a_nan_the_screens_did_not_foresee_is_a_finding_not_a_number(monkeypatch, tmp_path):
    """Last line of defence: any NaN/Inf number in a matrix record (here: planted in the metrics)
    turns the matrix into a finding, so the JSON never holds one."""
    import lora_audit.spectral.engine as engine
    from lora_audit.spectral.metrics import UpdateMetrics

    monkeypatch.setattr(engine, "update_metrics", lambda *a, **k: UpdateMetrics(
        delta_norm=1.0, relative_delta_norm=0.1, effective_rank=float("nan"), stable_rank=1.0, spectral_norm=1.0))
    W0 = torch.randn(12, 10, generator=torch.Generator().manual_seed(0))
    res = audit([MatrixGroup("w", W0, [Dense(W0 + 0.1)])], device="cpu", progress=False)
    (s,) = res.results[0].skipped
    assert (s.where, s.nonfinite_values) == ("update", 1) and "NaN/Inf number" in s.reason
    assert res.incomplete and res.results[0].matrices == []
    assert_json_has_no_nan(res, tmp_path)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_count_nonfinite_equals_counting_the_mask(dtype):
    """The fast path (a finite sum proves every value finite) gives the mask's count in every case:
    NaN, +Inf, -Inf, +Inf and -Inf together, and finite values whose sum overflows the dtype."""
    from lora_audit.spectral.findings import count_nonfinite

    g = torch.Generator().manual_seed(0)
    big = torch.finfo(dtype).max / 4
    cases = {"finite": torch.randn(64, 32, generator=g), "overflowing sum": torch.full((64, 32), big, dtype=dtype)}
    for name, vals in (("nan", [float("nan")]), ("inf", [float("inf")]), ("-inf", [float("-inf")]),
                       ("inf and -inf", [float("inf"), float("-inf")]), ("three nans", [float("nan")] * 3)):
        t = torch.randn(64, 32, generator=g)
        t.view(-1)[torch.randperm(t.numel(), generator=g)[: len(vals)]] = torch.tensor(vals)
        cases[name] = t
    for name, t in cases.items():
        t = t.to(dtype)
        assert count_nonfinite(t) == int((~torch.isfinite(t)).sum()), name
    assert count_nonfinite(torch.empty(0, 3, dtype=dtype)) == 0


def test_nan_in_base_is_a_finding_with_a_cache_too(tiny_llama, clean, tmp_path):
    """A cached run skips W0's screen only when W0's key finds a verified entry with finite singular
    values (engine._prepare); a NaN base never gets one, so the finding is the same cold and warm."""
    bad_base = edited(tiny_llama, tmp_path / "nan_base", "model.safetensors",
                      lambda t: t[ADAPTED].__setitem__((1, 2), float("nan")))
    for _ in ("cold", "warm"):
        res = run_spectrum(bad_base, [clean["adapter"]], device="cpu", progress=False, cache_dir=tmp_path / "cache")
        (r,) = res.results
        assert [(s.name, s.where, s.nonfinite_values) for s in r.skipped] == [(ADAPTED, "base", 1)]
        assert_rest_matches(r, clean["ref_adapter"], {ADAPTED})
