"""Numerically null directions of W1 are never examined (so never intruders): k_used =
min(k, m, n, numerical rank of W1). Checked against numpy's matrix_rank (the same tolerance,
max(m, n) eps sigma_1) and the float64 two-SVD reference (tests.helpers.reference_intruders)."""

import json

import numpy as np
import pytest
import torch

from lora_audit.checkpoints.deltas import Dense, LowRank, MatrixGroup
from lora_audit.spectral.engine import audit
from lora_audit.spectral.exact import base_spectrum, examined, exact_topk
from tests.helpers import reference_intruders


def low_rank(m, n, rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(m, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, n, generator=g,
                                                                               dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("m,n,rank", [(40, 40, 3), (50, 30, 7), (30, 50, 1), (20, 20, 20)])
def test_examined_directions_equal_numpy_matrix_rank(dtype, m, n, rank):
    W1 = low_rank(m, n, rank, seed=m + rank).to(dtype)
    W0 = torch.randn(m, n, generator=torch.Generator().manual_seed(1), dtype=dtype)
    top = examined(exact_topk(base_spectrum(W0), W1, min(m, n)), (m, n), dtype)
    assert len(top.singular_values) == np.linalg.matrix_rank(W1.numpy()) == rank
    assert top.max_cos.shape == top.argmax_base.shape == (rank,) and top.base_coords.shape[1] == rank


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
@pytest.mark.parametrize("m,n,rank", [(40, 40, 3), (60, 36, 5), (36, 60, 2)])
def test_rank_deficient_dense_W1(exact, m, n, rank):
    W0 = torch.randn(m, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    W1 = low_rank(m, n, rank, seed=3)
    res = audit([MatrixGroup("model.layers.0.mlp.up_proj.weight", W0.float(), [Dense(W1.float())])], k=10,
                exact=exact, device="cpu", progress=False)
    (mat,) = res.results[0].matrices
    ref_cos, _ = reference_intruders(W0, W1, k=10)
    ref_S = torch.linalg.svdvals(W1)
    assert mat.k_used == rank and len(mat.max_cos) == rank
    assert float(ref_S[rank]) < 1e-12 * float(ref_S[0])  # what was dropped is null in float64 too
    assert mat.max_cos == pytest.approx(ref_cos[:rank], abs=1e-4)
    assert mat.intruders == sum(c < 0.5 for c in ref_cos[:rank])
    assert mat.tuned_singular_values == pytest.approx(ref_S[:rank].tolist(), rel=1e-4)


def test_null_directions_were_counted_as_intruders_by_the_plain_algorithm():
    """The case the rule exists for: on this rank-2 W1 the plain top-10 count includes null
    directions (singular value ~1e-16) as intruders; the audit examines the 2 real ones only."""
    W0 = torch.randn(40, 40, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    W1 = low_rank(40, 40, 2, seed=3)
    ref_cos, ref_count = reference_intruders(W0, W1, k=10)
    (mat,) = audit([MatrixGroup("w", W0.float(), [Dense(W1.float())])], device="cpu",
                   progress=False).results[0].matrices
    assert ref_count > sum(c < 0.5 for c in ref_cos[:2])
    assert mat.intruders == sum(c < 0.5 for c in ref_cos[:2]) and mat.k_used == 2


@pytest.mark.parametrize("exact", [True, False], ids=["exact", "fast"])
def test_lora_on_rank_deficient_base(exact):
    """W0 of rank 4 plus a rank-2 LoRA: W1 has rank 6 < k, and its 6 singular values are those of
    the float64 reference. (max_cos is not compared: W0's own null directions are an arbitrary
    basis of its null space, so the max over ALL of them differs between two SVDs.)"""
    g = torch.Generator().manual_seed(4)
    W0 = low_rank(64, 48, 4, seed=9)
    B, A = torch.randn(64, 2, generator=g, dtype=torch.float64), torch.randn(2, 48, generator=g, dtype=torch.float64)
    res = audit([MatrixGroup("w", W0.float(), [LowRank(B.float(), A.float(), 0.7)])], exact=exact, device="cpu",
                progress=False)
    (mat,) = res.results[0].matrices
    ref_S = torch.linalg.svdvals(W0 + 0.7 * B @ A)
    assert mat.k_used == 6 and float(ref_S[6]) < 1e-12 * float(ref_S[0])
    assert mat.tuned_singular_values == pytest.approx(ref_S[:6].tolist(), rel=1e-4)


def test_k_beyond_the_matrix_is_recorded_as_used(tmp_path):
    W0 = torch.randn(12, 30, generator=torch.Generator().manual_seed(6))
    res = audit([MatrixGroup("w", W0, [Dense(W0 + 0.1)])], k=200, device="cpu", progress=False)
    mat = res.results[0].matrices[0]
    assert mat.k_used == len(mat.max_cos) == 12
    obj = json.loads(res.write_json(tmp_path / "k.json").read_text())
    assert obj["k"] == 200 and obj["results"][0]["matrices"][0]["k_used"] == 12
    assert res.rows()[0]["k_used"] == 12
