"""metrics.py against direct float64 numpy formulas on the materialised dW."""

import math

import pytest
import torch

from lora_audit.checkpoints.deltas import Dense, DoRA, LowRank
from lora_audit.spectral.metrics import (count_intruders, intruder_details, lowrank_singular_values,
                                         sweep_counts, update_metrics)
from lora_audit.spectral.types import TopK
from tests.spectral.reference import np_metrics


def _check(metrics, expected, rel=1e-5):
    for key, value in expected.items():
        assert getattr(metrics, key) == pytest.approx(value, rel=rel), key


@pytest.mark.parametrize("m,n,r", [(40, 40, 4), (64, 16, 8), (16, 64, 8), (30, 20, 32)])
def test_lowrank_metrics_equal_direct_formulas(m, n, r):
    g = torch.Generator().manual_seed(m + n + r)
    W0 = torch.randn(m, n, generator=g, dtype=torch.float64)
    B = torch.randn(m, r, generator=g, dtype=torch.float64)
    A = torch.randn(r, n, generator=g, dtype=torch.float64)
    delta = LowRank(B, A, 0.7)
    dW = (0.7 * B @ A).numpy()
    _check(update_metrics(delta, W0), np_metrics(dW, W0.numpy()), rel=1e-8)
    # and in float32, as the engine runs by default
    _check(update_metrics(delta.to(dtype=torch.float32), W0.float()), np_metrics(dW, W0.numpy()), rel=1e-4)


def test_lowrank_path_never_materialises(monkeypatch):
    """The LowRank path multiplies only r-sized matrices: B @ A is never formed."""
    B, A = torch.randn(500, 2), torch.randn(2, 400)

    class NoMatmul(LowRank):
        def update(self, base=None):  # pragma: no cover - must not be called
            raise AssertionError("materialised a LowRank delta")

    s = lowrank_singular_values(B, A, 2.0)
    assert s.shape == (2,)
    update_metrics(NoMatmul(B, A, 2.0), torch.randn(500, 400))


def test_dense_and_dora_metrics_equal_direct_formulas():
    g = torch.Generator().manual_seed(5)
    W0 = torch.randn(24, 32, generator=g, dtype=torch.float64)
    W1 = W0 + 0.1 * torch.randn(24, 32, generator=g, dtype=torch.float64)
    _check(update_metrics(Dense(W1), W0), np_metrics((W1 - W0).numpy(), W0.numpy()), rel=1e-8)

    B = torch.randn(24, 2, generator=g, dtype=torch.float64)
    A = torch.randn(2, 32, generator=g, dtype=torch.float64)
    mag = 1 + torch.rand(24, generator=g, dtype=torch.float64)
    V = W0 + 0.5 * B @ A
    W1d = mag[:, None] * V / V.norm(dim=1, keepdim=True)  # DoRA merge written out
    _check(update_metrics(DoRA(B, A, 0.5, mag), W0), np_metrics((W1d - W0).numpy(), W0.numpy()), rel=1e-8)


def test_rank_one_and_zero_updates():
    W0 = torch.randn(10, 8, dtype=torch.float64)
    m = update_metrics(LowRank(torch.randn(10, 1, dtype=torch.float64), torch.randn(1, 8, dtype=torch.float64), 1.0), W0)
    assert m.effective_rank == pytest.approx(1.0) and m.stable_rank == pytest.approx(1.0)
    # an orthogonal dW with equal singular values has effective rank = stable rank = its rank
    Q, _ = torch.linalg.qr(torch.randn(8, 8, dtype=torch.float64))
    m = update_metrics(Dense(torch.zeros(8, 8, dtype=torch.float64) + Q), torch.zeros(8, 8, dtype=torch.float64))
    assert m.effective_rank == pytest.approx(8.0) and m.stable_rank == pytest.approx(8.0)
    assert m.relative_delta_norm is None  # ||W0|| = 0: no ratio, not inf
    z = update_metrics(Dense(W0.clone()), W0)
    assert (z.delta_norm, z.effective_rank, z.stable_rank) == (0.0, 0.0, 0.0)
    assert not any(math.isnan(x) for x in (z.delta_norm, z.effective_rank, z.stable_rank))


def test_intruder_details_and_sweep():
    top = TopK(singular_values=torch.tensor([9.0, 5.0, 3.0, 1.0]), max_cos=torch.tensor([0.2, 0.95, 0.45, 0.6]),
               argmax_base=torch.tensor([7, 0, 2, 3]), method="exact")
    details = intruder_details(top, 0.5, base_S=torch.arange(10, 0, -1).double())
    assert [(d.index, d.singular_value, d.base_index, d.base_singular_value) for d in details] == [
        (0, 9.0, 7, 3.0), (2, 3.0, 2, 8.0)]
    assert details[0].max_cos == pytest.approx(0.2)
    cos = top.max_cos.tolist()
    assert count_intruders(cos, 0.5) == 2
    assert sweep_counts(cos, [0.1, 0.3, 0.5, 0.7, 0.99]) == [0, 1, 2, 3, 4]


def test_norms_only_for_dense_when_spectrum_skipped():
    g = torch.Generator().manual_seed(9)
    W0 = torch.randn(12, 10, generator=g, dtype=torch.float64)
    dW = 0.1 * torch.randn(12, 10, generator=g, dtype=torch.float64)
    expected = np_metrics(dW.numpy(), W0.numpy())
    m = update_metrics(Dense(W0 + dW), W0, spectrum=False)
    assert m.delta_norm == pytest.approx(expected["delta_norm"], rel=1e-10)
    assert m.relative_delta_norm == pytest.approx(expected["relative_delta_norm"], rel=1e-10)
    assert (m.effective_rank, m.stable_rank, m.spectral_norm) == (None, None, None)
    lr = update_metrics(LowRank(dW[:, :2], torch.eye(2, 10, dtype=torch.float64), 1.0), W0, spectrum=False)
    assert lr.effective_rank is not None  # cheap for LoRA: always computed
