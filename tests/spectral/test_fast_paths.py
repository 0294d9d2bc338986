"""The fast paths against the paper's plain algorithm in float64 (tests.helpers.reference_intruders):
same intruder counts, cosines within 1e-4, on square, tall and wide matrices, with and without
intruders, for LoRA (factored) and dense / DoRA (Krylov on the materialised matrix)."""

import pytest
import torch

from lora_audit.checkpoints.deltas import Dense, DoRA, LowRank
from lora_audit.spectral.exact import base_spectrum
from lora_audit.spectral.krylov import topk_svd
from lora_audit.spectral.lowrank import lowrank_topk
from lora_audit.spectral.randomized import randomized_topk
from tests.helpers import reference_intruders


def decaying(m, n, seed):
    """A base with an LLM-like decaying spectrum (and a few outliers on top)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(m, min(m, n), generator=g))
    V, _ = torch.linalg.qr(torch.randn(n, min(m, n), generator=g))
    s = 5 * torch.exp(-4 * torch.arange(min(m, n)) / min(m, n))
    s[:3] *= 3
    return U @ torch.diag(s) @ V.T


CASES = [(64, 64, 4, 3.0), (96, 48, 4, 3.0), (48, 96, 4, 3.0), (200, 120, 8, 0.3), (120, 200, 8, 0.3),
         (256, 256, 16, 0.05), (256, 256, 1, 4.0)]


@pytest.mark.parametrize("m,n,r,scale", CASES)
def test_lowrank_equals_reference(m, n, r, scale):
    g = torch.Generator().manual_seed(m + n + r)
    W0 = decaying(m, n, m * n)
    d = LowRank(torch.randn(m, r, generator=g) / m ** 0.5, torch.randn(r, n, generator=g) / n ** 0.5, scale)
    top = lowrank_topk(base_spectrum(W0), d, 10)
    ref_cos, ref_count = reference_intruders(W0, W0 + scale * d.B @ d.A)
    assert top.converged and top.method == "lowrank"
    assert int((top.max_cos < 0.5).sum()) == ref_count
    torch.testing.assert_close(top.max_cos.double(), torch.tensor(ref_cos, dtype=torch.float64), atol=1e-4, rtol=0)


def test_cases_cover_both_outcomes():
    counts = []
    for m, n, r, scale in CASES:
        g = torch.Generator().manual_seed(m + n + r)
        W0 = decaying(m, n, m * n)
        B, A = torch.randn(m, r, generator=g) / m ** 0.5, torch.randn(r, n, generator=g) / n ** 0.5
        counts.append(reference_intruders(W0, W0 + scale * B @ A)[1])
    assert min(counts) == 0 and max(counts) > 0


@pytest.mark.parametrize("m,n", [(80, 80), (120, 60), (60, 120)])
def test_dense_and_dora_equal_reference(m, n):
    g = torch.Generator().manual_seed(7)
    W0 = decaying(m, n, 3)
    W1 = W0 + 0.02 * torch.randn(m, n, generator=g)
    W1 += 2.0 * torch.outer(torch.randn(m, generator=g), torch.randn(n, generator=g)) / (m * n) ** 0.5
    for tuned in (W1, DoRA(torch.randn(m, 2, generator=g), torch.randn(2, n, generator=g), 0.5,
                           W0.norm(dim=1) * 1.3).merged(W0)):
        top = randomized_topk(base_spectrum(W0), tuned, 10)
        ref_cos, ref_count = reference_intruders(W0, tuned)
        assert top.converged
        assert int((top.max_cos < 0.5).sum()) == ref_count
        torch.testing.assert_close(top.max_cos.double(), torch.tensor(ref_cos, dtype=torch.float64), atol=1e-4, rtol=0)


def test_krylov_reports_non_convergence_honestly():
    torch.manual_seed(0)
    M = torch.randn(300, 300, dtype=torch.float64)  # flat spectrum, tiny budget
    res = topk_svd(lambda X: M @ X, lambda Y: M.T @ Y, torch.randn(300, 4, dtype=torch.float64), 10, max_dim=20)
    assert not res.converged and res.residual > 1e-8
    res = topk_svd(lambda X: M @ X, lambda Y: M.T @ Y, torch.randn(300, 4, dtype=torch.float64), 3, max_dim=300)
    torch.testing.assert_close(res.S, torch.linalg.svdvals(M)[:3])


def test_engine_uses_the_fast_paths_and_matches_exact():
    from lora_audit.checkpoints.deltas import MatrixGroup
    from lora_audit.spectral.engine import audit

    g = torch.Generator().manual_seed(1)
    W0 = decaying(96, 64, 5)
    deltas = [LowRank(torch.randn(96, 4, generator=g), torch.randn(4, 64, generator=g) / 8, 1.0),
              Dense(W0 + 0.05 * torch.randn(96, 64, generator=g))]
    groups = [MatrixGroup("model.layers.0.mlp.up_proj.weight", W0, deltas)]
    fast = audit(groups, progress=False, tuned_labels=["lora", "full"])
    exact = audit(groups, progress=False, exact=True, tuned_labels=["lora", "full"])
    assert [m.method for t in fast.results for m in t.matrices] == ["lowrank", "randomized"]
    for a, b in zip(fast.results, exact.results):
        assert a.total_intruders == b.total_intruders
        torch.testing.assert_close(torch.tensor(a.matrices[0].max_cos), torch.tensor(b.matrices[0].max_cos),
                                   atol=1e-4, rtol=0)
