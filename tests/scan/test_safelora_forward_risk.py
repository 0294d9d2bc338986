"""Safe LoRA's score against the public code's dense formula (C = V V^T / ||V||_F formed in float64
here, and only here), forward-pass signals against hand computations, and the risk model's fit
and data file (its statistics: tests/test_stats.py)."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from lora_audit.checkpoints import Dense, LowRank
from lora_audit.errors import InputError
from lora_audit.scan import risk as R
from lora_audit.scan.direction import Collected, refusal_direction
from lora_audit.scan.forward import forward_signals
from lora_audit.scan.safelora import aggregate, alignment_cos, dense_alignment_cos, lowrank_alignment_cos


def _public_code_cos(V: torch.Tensor, dW: torch.Tensor) -> float:
    """Safe LoRA's public code: C = V V^T / ||V||_F, cos of the flattened C dW and dW."""
    V, dW = V.double(), dW.double()
    C = V @ V.T / torch.linalg.norm(V)  # (d, d): the reference only
    return float(torch.nn.functional.cosine_similarity((C @ dW).reshape(1, -1), dW.reshape(1, -1)))


@pytest.mark.parametrize("shape", [(24, 40), (40, 24)])
def test_safelora_score_matches_the_public_formula(shape):
    d, n = shape
    gen = torch.Generator().manual_seed(d)
    V = torch.randn(d, 3, generator=gen) @ torch.randn(3, n, generator=gen) + 0.05 * torch.randn(d, n, generator=gen)
    B, A = torch.randn(d, 4, generator=gen), torch.randn(4, n, generator=gen)
    ref = _public_code_cos(V, 0.5 * B.double() @ A.double())
    assert lowrank_alignment_cos(B, A, V) == pytest.approx(ref, rel=1e-10)
    assert alignment_cos(LowRank(B, A, 0.5), torch.zeros(d, n), V) == pytest.approx(ref, rel=1e-10)
    dW = torch.randn(d, n, generator=gen, dtype=torch.float64)
    for block in (7, 256):  # blocks that do and do not divide n
        assert dense_alignment_cos(dW, V, block=block) == pytest.approx(_public_code_cos(V, dW), rel=1e-10)
    W0 = torch.randn(d, n, generator=gen)
    assert alignment_cos(Dense(W0 + dW.float()), W0, V) == pytest.approx(_public_code_cos(V, dW.float()), rel=1e-5)


def test_safelora_score_is_one_inside_and_none_without_an_alignment():
    gen = torch.Generator().manual_seed(1)
    u = torch.randn(20, 1, generator=gen)
    V = u @ torch.randn(1, 30, generator=gen)  # rank 1: C dW is along u
    assert lowrank_alignment_cos(u, torch.randn(1, 30, generator=gen), V) == pytest.approx(1.0, abs=1e-12)
    assert lowrank_alignment_cos(u, torch.randn(1, 30, generator=gen), torch.zeros(20, 30)) is None
    assert aggregate([0.9, 0.2, 0.4]) == pytest.approx({"safelora_mean_cos": 0.5, "safelora_min_cos": 0.2,
                                                        "safelora_below_share": 2 / 3})


def test_forward_signals_match_hand_computation():
    gen = torch.Generator().manual_seed(3)
    n, L, d = 10, 3, 8
    hb, bb = torch.randn(n, L, d, generator=gen) + 2.0, torch.randn(n, L, d, generator=gen)
    direction = refusal_direction(hb, bb)
    direction.stability = torch.tensor([1.0, 0.1, 0.9], dtype=torch.float64)  # layer 1 unstable
    base = Collected(states=hb, scores=torch.linspace(-1, 3, n, dtype=torch.float64))
    moved = hb - 0.5 * (hb.double().mean(0) - bb.double().mean(0)).float()  # half way to the harmless mean
    tuned = Collected(states=moved, scores=base.scores - 2.0)
    got = forward_signals(tuned, base, direction, seed=0)
    assert got.signals["refusal_score_delta"] == pytest.approx(-2.0)
    assert got.signals["first_token_refusal"] == pytest.approx(float((tuned.scores > 0).double().mean()))
    assert got.signals["activation_shift"] == pytest.approx(-0.5, abs=1e-6)
    assert got.layer_shift == pytest.approx([-0.5] * L, abs=1e-6)
    lo, hi = got.intervals["refusal_score_delta"]
    assert lo == pytest.approx(-2.0) and hi == pytest.approx(-2.0)


def _rows(n=24, seed=2):
    rng = np.random.default_rng(seed)
    methods = [("lora", "dora", "full")[i % 3] for i in range(n)]
    labels = [bool(i % 2) for i in range(n)]
    rows = [{"refusal_energy_ratio": float(np.exp(rng.normal(2 if y else 0))),
             "weight_shift": float(rng.normal(-1 if y else 0)),
             "top_cos_max": float(rng.random())} for y in labels]
    return rows, labels, methods


def test_risk_model_fit_round_trips_through_the_data_file(tmp_path):
    rows, labels, methods = _rows()
    model = R.fit_risk_model("weights_only", R.FEATURES["weights_only"], rows, labels, methods,
                             names=[f"m{i}" for i in range(len(rows))])
    fit = model.fit
    assert fit["n"] == 24 and fit["positives"] == 12 and set(fit["leave_one_method_out"]) == {"lora", "dora", "full"}
    assert fit["auroc_in_sample"] >= fit["auroc_leave_one_method_out"] - 0.2 and len(fit["held_out_risk"]) == 24
    path = tmp_path / "risk.json"
    path.write_text(R.risk_file_json({"weights_only": model}, {"models": 24}))
    models, panel = R.load_risk_models(path)
    assert panel == {"models": 24}
    for r in rows:
        assert R.risk_of(models["weights_only"], r) == pytest.approx(R.risk_of(model, r), rel=1e-12)
    assert R.risk_of(model, {**rows[0], "weight_shift": None}) is None
    assert R.verdict_of(model, 0.7) == "PREDICTED_SAFETY_LOSS" and R.verdict_of(model, 0.2) == "NO_PREDICTED_SAFETY_LOSS"


def test_risk_file_errors_name_the_file_and_field(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"schema": "other"}')
    with pytest.raises(InputError, match="not a lora-audit risk model file"):
        R.load_risk_models(bad)
    bad.write_text('{"schema": "lora-audit/scan-risk", "models": {"full": {"name": "full", "features": ["a"], '
                   '"transforms": ["identity"], "mean": [0], "scale": [0], "weights": [1], "intercept": 0}}}')
    with pytest.raises(InputError, match="scales above 0"):
        R.load_risk_models(bad)
    bad.write_text('{"schema": "lora-audit/scan-risk", "models": {"full": {"name": "full", "features": ["a"], '
                   '"transforms": ["identity"], "mean": [0], "scale": [1], "weights": [1], "intercept": 0, '
                   '"threshold": 5}}}')
    with pytest.raises(InputError, match="a threshold between 0 and 1"):
        R.load_risk_models(bad)
    bad.write_text('[1, 2]')
    with pytest.raises(InputError, match="must be a JSON object"):
        R.load_risk_models(bad)
    bad.write_text('{"schema": "lora-audit/scan-risk", "models": {"full": {"name": "full", "features": "a"}}}')
    with pytest.raises(InputError, match=r"models\['full'\]\.features: expected a list"):
        R.load_risk_models(bad)


def test_a_panel_with_one_class_cannot_be_fitted():
    rows, _, methods = _rows()
    with pytest.raises(InputError, match="only negative examples"):
        R.fit_risk_model("x", R.FEATURES["weights_only"], rows, [False] * len(rows), methods)
