"""Calibrated statistics: the null against a Monte Carlo on actual base bases, and the engine's
per-matrix and per-model fields against the plain float64 reference."""

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from lora_audit.checkpoints.deltas import Dense, LowRank, MatrixGroup
from lora_audit.results.spectrum import SpectrumResult
from lora_audit.spectral.calibration import drift, intruder_energy, null_for_shape, null_max_cos
from lora_audit.spectral.engine import audit
from tests.spectral.reference import intruder_case


@pytest.mark.parametrize("m,n", [(64, 64), (96, 32), (32, 96), (7, 5)])
def test_null_equals_monte_carlo_on_an_actual_base_basis(m, n):
    """E max_i |<u_i, x>| over x uniform on the sphere, with U0 the left singular vectors of a
    random (m x n) base, estimated from 40,000 seeded draws: within 4 standard errors."""
    rng = np.random.default_rng(m * 1000 + n)
    U0 = np.linalg.svd(rng.standard_normal((m, n)), full_matrices=False)[0]  # (m, min(m, n))
    x = rng.standard_normal((m, 40_000))
    x /= np.linalg.norm(x, axis=0)
    sample = np.abs(U0.T @ x).max(axis=0)
    se = sample.std(ddof=1) / math.sqrt(sample.size)
    assert abs(null_for_shape((m, n)) - sample.mean()) < 4 * se
    assert null_for_shape((m, n)) == null_max_cos(m, min(m, n))


def test_null_closed_cases_and_range():
    assert null_max_cos(1, 1) == pytest.approx(1.0, abs=1e-12)
    assert null_max_cos(2, 1) == pytest.approx(2 / math.pi, abs=1e-10)  # E|cos theta| on the circle
    # one axis in R^3: |x_1| is uniform on [0, 1] (Archimedes), mean 1/2
    assert null_max_cos(3, 1) == pytest.approx(0.5, abs=1e-10)
    # the large-width approximation the notes quote, and monotone in both arguments
    assert null_max_cos(4096, 4096) == pytest.approx(math.sqrt(2 * math.log(2 * 4096) / 4096), rel=0.15)
    assert null_max_cos(576, 576) > null_max_cos(1536, 576) > null_max_cos(1536, 288)
    with pytest.raises(ValueError):
        null_max_cos(3, 4)


def test_energy_and_drift_formulas():
    sv, cos = [3.0, 2.0, 1.0], [0.9, 0.2, 0.45]
    assert intruder_energy(sv, cos, 0.5) == pytest.approx((4 + 1) / 14)
    assert intruder_energy(sv, cos, 0.3) == pytest.approx(4 / 14)
    assert intruder_energy(sv, cos, 0.1) == 0.0
    assert intruder_energy([0.0], [0.2], 0.5) is None
    assert drift(cos) == pytest.approx(0.8) and drift([]) is None


def _reference(W0: torch.Tensor, W1: torch.Tensor, k: int, sweep) -> dict:
    """Plain float64: both SVDs, cosines against all base vectors, then the three statistics."""
    U0 = torch.linalg.svd(W0.double(), full_matrices=False)[0]
    U1, S1, _ = torch.linalg.svd(W1.double(), full_matrices=False)
    cos = (U0.T @ U1[:, :k]).abs().amax(dim=0).tolist()
    s2 = (S1[:k] ** 2).tolist()
    energy = [sum(e for e, c in zip(s2, cos, strict=True) if c < eps) / sum(s2) for eps in sweep]
    return {"drift": 1 - min(cos), "energy": energy}


@pytest.mark.parametrize("exact", [True, False])
def test_engine_fields_match_the_float64_reference(exact):
    W0, u, v, s = intruder_case(256, 200, seed=4)  # above EXACT_BELOW: the fast paths run
    g = torch.Generator().manual_seed(4)
    W1_dense = W0 + 0.05 * torch.randn(256, 200, generator=g, dtype=torch.float64)
    W0b, ub, vb, sb = intruder_case(200, 256, seed=5)
    groups = [MatrixGroup("model.layers.0.mlp.up_proj.weight", W0.float(),
                          [LowRank(u.float(), v.float(), s), Dense(W1_dense.float())]),
              MatrixGroup("model.layers.0.mlp.down_proj.weight", W0b.float(),
                          [LowRank(ub.float(), vb.float(), 0.3 * sb), None])]
    sweep = (0.3, 0.5, 0.9)
    res = audit(groups, k=10, epsilon=0.5, epsilon_sweep=sweep, exact=exact, device="cpu", progress=False,
                tuned_labels=["lora", "dense"])
    cases = {("lora", 0): (W0, W0 + s * u @ v), ("dense", 0): (W0, W1_dense),
             ("lora", 1): (W0b, W0b + 0.3 * sb * ub @ vb)}
    by = {r.tuned: r for r in res.results}
    for (label, gi), (base, tuned) in cases.items():
        rec = by[label].matrices[0 if label == "dense" else gi]
        ref = _reference(base, tuned, 10, sweep)
        assert rec.drift == pytest.approx(ref["drift"], abs=1e-4), (label, gi)
        assert rec.sweep_energy == pytest.approx(ref["energy"], abs=1e-4), (label, gi)
        assert rec.intruder_energy == pytest.approx(ref["energy"][1], abs=1e-4)
        assert rec.null_max_cos == null_max_cos(rec.shape[0], min(rec.shape))
    lora = by["lora"]
    assert lora.matrices[0].intruder_energy > 0.9  # the planted intruder carries the top of the spectrum
    assert lora.drift == max(m.drift for m in lora.matrices)
    assert lora.mean_drift == pytest.approx(sum(m.drift for m in lora.matrices) / 2)
    assert lora.intruder_energy == pytest.approx(sum(m.intruder_energy for m in lora.matrices) / 2)
    assert lora.sweep_energy == pytest.approx([sum(m.sweep_energy[i] for m in lora.matrices) / 2 for i in range(3)])
    assert lora.null_by_shape() == {"256 x 200": null_max_cos(256, 200), "200 x 256": null_max_cos(200, 200)}


def test_fields_in_json_and_csv_and_absent_in_older_files(tmp_path):
    W0, u, v, s = intruder_case(20, 16)
    res = audit([MatrixGroup("model.layers.0.mlp.up_proj.weight", W0.float(), [LowRank(u.float(), v.float(), s)])],
                k=4, epsilon=0.5, epsilon_sweep=(0.3, 0.7), device="cpu", progress=False)
    obj = json.loads(res.write_json(tmp_path / "s.json").read_text())
    r, m = obj["results"][0], obj["results"][0]["matrices"][0]
    assert m["null_max_cos"] == null_max_cos(20, 16) and m["drift"] == 1 - min(m["max_cos"])
    assert len(m["sweep_energy"]) == 2 and m["intruder_energy"] == res.results[0].matrices[0].intruder_energy
    assert (r["drift"], r["intruder_energy"], r["null_max_cos"]) == (m["drift"], m["intruder_energy"],
                                                                     {"20 x 16": m["null_max_cos"]})
    df = pd.read_csv(res.write_csv(tmp_path / "s.csv"))
    cols = list(df.columns)
    assert cols[-5:] == ["null_max_cos", "drift", "intruder_energy", "energy_eps_0.3", "energy_eps_0.7"]
    assert cols.index("intruders_eps_0.7") < cols.index("null_max_cos")  # earlier columns keep their places
    assert df["drift"][0] == pytest.approx(m["drift"])
    assert df["energy_eps_0.7"][0] == pytest.approx(m["sweep_energy"][1])
    for key in ("null_max_cos", "drift", "intruder_energy", "sweep_energy"):  # a file written before them
        del obj["results"][0]["matrices"][0][key]
    old = SpectrumResult.from_json(obj).results[0]
    assert old.matrices[0].drift is None and old.drift is None and old.intruder_energy is None
    assert old.null_by_shape() == {} and old.total_intruders == m["intruders"]
