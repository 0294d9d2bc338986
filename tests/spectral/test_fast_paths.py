"""The fast paths against the paper's plain algorithm in float64 (tests.helpers.reference_intruders):
same intruder counts, cosines within 1e-4, on square, tall and wide matrices, with and without
intruders, for LoRA (factored) and dense / DoRA (Krylov on the materialised matrix)."""

import pytest
import torch

from lora_audit.checkpoints.deltas import Dense, DoRA, LowRank
from lora_audit.spectral.exact import base_spectrum
from lora_audit.spectral.krylov import topk_svd
from lora_audit.spectral.lowrank import lowrank_topk
from lora_audit.spectral.dense import block_krylov_topk
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
         (256, 256, 16, 0.05), (256, 256, 1, 4.0), (320, 256, 64, 1.0)]


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
        top = block_krylov_topk(base_spectrum(W0), tuned, 10)
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
    assert [m.method for t in fast.results for m in t.matrices] == ["lowrank", "block_krylov"]
    for a, b in zip(fast.results, exact.results, strict=True):
        assert a.total_intruders == b.total_intruders
        torch.testing.assert_close(torch.tensor(a.matrices[0].max_cos), torch.tensor(b.matrices[0].max_cos),
                                   atol=1e-4, rtol=0)


# ---- the inertia certificate and the Davidson search of the LoRA path ---------------------------
def _diag_plus_lowrank(rows, cols, p, r, seed):
    """D (rows x cols, diag on the leading p x p), P (rows, r), Q (cols, r), float64."""
    g = torch.Generator().manual_seed(seed)
    d = torch.sort(torch.rand(p, generator=g, dtype=torch.float64) * 3, descending=True).values
    D = torch.zeros(rows, cols, dtype=torch.float64)
    D[range(p), range(p)] = d
    P = torch.randn(rows, r, generator=g, dtype=torch.float64) * 0.7
    Q = torch.randn(cols, r, generator=g, dtype=torch.float64) * 0.7
    return D, d, P, Q


@pytest.mark.parametrize("rows,cols,p,r", [(30, 30, 30, 3), (36, 30, 30, 2), (30, 34, 30, 4), (50, 50, 50, 1)])
def test_inertia_count_equals_dense_eigenvalues(rows, cols, p, r):
    from lora_audit.spectral.lowrank import count_above

    D, d, P, Q = _diag_plus_lowrank(rows, cols, p, r, seed=rows + cols + r)
    M = D + P @ Q.T
    lam = torch.linalg.eigvalsh(M @ M.T)  # numpy-free reference: the dense eigenvalues of M M^T
    D2 = torch.zeros(rows, dtype=torch.float64)
    D2[:p] = d * d
    E = torch.zeros(rows, r, dtype=torch.float64)
    E[:p] = d[:, None] * Q[:p]
    grid = torch.cat([(lam[:-1] + lam[1:]) / 2, lam[-1:] * 1.01, lam[:1] * 0.5 - 1e-3])
    for x in grid.tolist():
        if (D2 - x).abs().min() < 1e-9:
            continue
        assert count_above(x, D2, E, P, Q.T @ Q) == int((lam > x).sum()), x


def test_lowrank_result_that_misses_a_top_vector_is_not_trusted(monkeypatch):
    """A search that returns k true singular pairs but not the TOP k (here: skipping the largest)
    has tiny residuals; the inertia count catches it and the engine falls back to the exact SVD."""
    import lora_audit.spectral.lowrank as lowrank
    from lora_audit.checkpoints.deltas import MatrixGroup
    from lora_audit.spectral.engine import audit
    from lora_audit.spectral.krylov import KrylovResult

    real = lowrank.topk_svd

    def skips_the_first(mv, rmv, X0, k, **kw):
        res = real(mv, rmv, X0, k + 1, **kw)
        return KrylovResult(U=res.U[:, 1:], S=res.S[1:], converged=True, residual=res.residual, dim=res.dim)

    monkeypatch.setattr(lowrank, "topk_svd", skips_the_first)
    g = torch.Generator().manual_seed(3)
    W0 = decaying(64, 48, 9)
    d = LowRank(torch.randn(64, 4, generator=g) / 8, torch.randn(4, 48, generator=g) / 7, 2.0)
    top = lowrank.lowrank_topk(base_spectrum(W0), d, 10)
    assert not top.converged and "inertia" in top.note
    res = audit([MatrixGroup("model.layers.0.mlp.up_proj.weight", W0, [d])], progress=False, device="cpu")
    rec = res.results[0].matrices[0]
    ref_cos, ref_count = reference_intruders(W0, W0 + 2.0 * d.B @ d.A)
    assert rec.method == "exact" and rec.intruders == ref_count
    assert any("inertia" in n for n in rec.notes)
    torch.testing.assert_close(torch.tensor(rec.max_cos, dtype=torch.float64), torch.tensor(ref_cos, dtype=torch.float64),
                               atol=1e-4, rtol=0)


def test_preconditioned_search_finds_the_top_k():
    """topk_svd against torch's dense SVD (float64) on a matrix whose top singular values are
    clustered: Krylov + corrections with a poor (standard-basis diagonal) preconditioner, and
    Davidson proper with the right one (a diagonal-plus-low-rank matrix, as on the LoRA path)."""
    g = torch.Generator().manual_seed(11)
    U, _ = torch.linalg.qr(torch.randn(200, 200, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(150, 150, generator=g, dtype=torch.float64))
    s = torch.linspace(8, 1, 150, dtype=torch.float64)
    s[:6] = torch.tensor([10.0, 9.99, 9.98, 9.5, 9.49, 9.0])
    dense = U[:, :150] @ torch.diag(s) @ V.T
    D, d, P, Q = _diag_plus_lowrank(200, 150, 150, 3, seed=5)
    structured = D + P @ Q.T

    def diagonal_of(M):
        d2 = torch.diag(M @ M.T)

        def precondition(R, sv):
            den = (sv * sv)[None, :] - d2[:, None]
            return R / torch.where(den.abs() < 1e-8, torch.full_like(den, 1e-8), den)
        return precondition

    for M, krylov, X0 in ((dense, True, torch.randn(200, 8, generator=g, dtype=torch.float64)),
                          (structured, False, torch.cat([torch.eye(200, 16, dtype=torch.float64), P], dim=1))):
        res = topk_svd(lambda X, M=M: M @ X, lambda Y, M=M: M.T @ Y, X0, 6, precondition=diagonal_of(M), krylov=krylov,
                       max_dim=200)
        Uref, Sref, _ = torch.linalg.svd(M, full_matrices=False)
        assert res.converged
        torch.testing.assert_close(res.S, Sref[:6], atol=1e-8 * float(Sref[0]), rtol=0)
        torch.testing.assert_close((Uref[:, :6].T @ res.U).abs().diag(), torch.ones(6, dtype=torch.float64),
                                   atol=1e-6, rtol=0)


@pytest.mark.parametrize("shape", [(300, 7), (7, 300), (64, 64)])
def test_skinny_product_equals_the_plain_product(shape):
    from lora_audit.spectral.blas import mm

    g = torch.Generator().manual_seed(0)
    A = torch.randn(shape[0], shape[0], generator=g, dtype=torch.float64)
    X = torch.randn(shape[0], shape[1], generator=g, dtype=torch.float64)
    for a, x in ((A, X), (A.T, X), (A, X.T.contiguous().T)):
        torch.testing.assert_close(mm(a, x), a @ x, atol=1e-12, rtol=0)


@pytest.mark.parametrize("m,n,r,scale", [(96, 48, 4, 3.0), (256, 256, 16, 0.05), (120, 200, 8, 0.3)])
def test_float32_projections_agree_with_float64_ones(m, n, r, scale):
    """The LoRA path projects onto the base vectors in the audit's dtype: with the same float32 base
    spectrum held in float64 (so every projection runs in float64), the cosines agree to 1e-6."""
    from lora_audit.spectral.types import BaseSpectrum

    g = torch.Generator().manual_seed(m + r)
    base = base_spectrum(decaying(m, n, 1).float())
    d = LowRank(torch.randn(m, r, generator=g) / m ** 0.5, torch.randn(r, n, generator=g) / n ** 0.5, scale)
    as64 = BaseSpectrum(U=base.U.double(), S=base.S.double(), Vh=base.Vh.double())
    d64 = LowRank(d.B.double(), d.A.double(), scale)
    a, b = lowrank_topk(base, d, 10), lowrank_topk(as64, d64, 10)
    assert a.converged and b.converged
    torch.testing.assert_close(a.max_cos.double(), b.max_cos, atol=1e-6, rtol=0)


@pytest.mark.parametrize("inside", [0.0, 1e-4, 1e-7])
def test_orthonormalisation_against_a_basis(inside):
    """krylov._orth_against (Gram-Schmidt twice, an eigen-basis of the Gram matrix that drops dependent
    columns, a Cholesky QR pass): new columns orthonormal and orthogonal to Q to working precision,
    even for blocks that lie nearly inside span(Q); exactly dependent ones are dropped, and so is
    a column with a NaN."""
    from lora_audit.spectral.krylov import _orth_against

    g = torch.Generator().manual_seed(3)
    Q = torch.linalg.qr(torch.randn(500, 40, generator=g, dtype=torch.float64))[0].contiguous()
    X = Q[:, :12] @ torch.randn(12, 12, generator=g, dtype=torch.float64) \
        + inside * torch.randn(500, 12, generator=g, dtype=torch.float64)
    X = torch.cat([X, X[:, :3] * 2.0], dim=1)  # three columns that repeat others
    drop = 100 * torch.finfo(torch.float64).eps ** 0.5
    N = _orth_against(X, Q, drop_tol=drop)
    if inside == 0.0 or inside < drop:
        assert N.shape[1] == 0  # nothing outside span(Q) above the tolerance
        return
    assert N.shape[1] == 12  # the repeated columns carry nothing new
    eye = torch.eye(12, dtype=torch.float64)
    assert float((N.T @ N - eye).abs().max()) < 1e-13
    assert float((Q.T @ N).abs().max()) < 1e-13
    # N spans the part of X outside Q
    R = X - Q @ (Q.T @ X)
    assert float((R - N @ (N.T @ R)).norm() / R.norm()) < 1e-10
    bad = X.clone()
    bad[0, 0] = float("nan")  # a NaN column has no norm to compare: it is dropped, not propagated
    out = _orth_against(bad, None, drop_tol=drop)
    assert out.shape[1] == 12 and bool(torch.isfinite(out).all())  # 15 columns, 12 independent
