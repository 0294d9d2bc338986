"""engine.audit on synthetic MatrixGroups (no files): every count and cosine against the plain
float64 reference on W1 materialised independently of lora_audit."""

import pytest
import torch

from lora_audit.checkpoints.deltas import Dense, DoRA, LowRank, MatrixGroup
from lora_audit.errors import InputError
from lora_audit.spectral.engine import audit
from tests.helpers import reference_intruders
from tests.spectral.reference import intruder_case


def _groups():
    g = torch.Generator().manual_seed(3)
    W0, u, v, s = intruder_case(48, 40, seed=3)
    W0b = torch.randn(32, 32, generator=g, dtype=torch.float64)
    B = torch.randn(32, 4, generator=g, dtype=torch.float64)
    A = torch.randn(4, 32, generator=g, dtype=torch.float64)
    groups = [
        # tuned 0: an intruder-making rank-1 LoRA; tuned 1: a tiny dense nudge; tuned 2: untouched
        MatrixGroup("model.layers.0.self_attn.q_proj.weight", W0.float(),
                    [LowRank(u.float(), v.float(), s), Dense((W0 + 1e-3 * torch.randn(48, 40, generator=g,
                                                                                       dtype=torch.float64)).float()),
                     None]),
        MatrixGroup("model.layers.1.mlp.down_proj.weight", W0b.float(),
                    [DoRA(B.float(), A.float(), 2.0, (1 + torch.rand(32, generator=g)).float()),
                     Dense(W0b.float().clone()),  # identical to the base: unchanged
                     LowRank(torch.zeros(32, 4), A.float(), 2.0)]),  # zero B: unchanged
    ]
    # independent W1s in float64
    W1 = {
        (0, 0): W0 + s * u @ v, (0, 1): groups[0].deltas[1].tuned.double(),
        (1, 0): None,
    }
    V = W0b + 2.0 * B @ A
    mag = groups[1].deltas[0].magnitude.double()
    W1[(1, 0)] = mag[:, None] * V / V.norm(dim=1, keepdim=True)
    return groups, {0: W0, 1: W0b}, W1


@pytest.mark.parametrize("exact", [True, False])
def test_audit_matches_reference(exact):
    groups, W0s, W1s = _groups()
    res = audit(groups, k=10, epsilon=0.5, exact=exact, device="cpu", tuned_labels=["lora", "dense", "none"],
                base_label="base")
    assert [r.tuned for r in res.results] == ["lora", "dense", "none"]
    by = {r.tuned: {m.name: m for m in r.matrices} for r in res.results}
    for (gi, ti), W1 in W1s.items():
        name = groups[gi].name
        ref_cos, ref_count = reference_intruders(W0s[gi], W1, k=10, epsilon=0.5)
        rec = by[res.results[ti].tuned][name]
        assert rec.intruders == ref_count, name
        assert rec.max_cos == pytest.approx(ref_cos, abs=1e-4), name
        assert rec.sweep_counts == [sum(c < e for c in ref_cos) for e in res.epsilon_sweep]
    lora = res.results[0]
    assert lora.total_intruders >= 1 and lora.matrices[0].intruder_details[0].index == 0
    assert lora.matrices[0].delta_type == "lowrank" and lora.matrices[0].adapter_rank == 1
    assert (lora.matrices[0].module, lora.matrices[0].layer) == ("q_proj", 0)
    dense = res.results[1]
    assert dense.total_intruders == 0 and dense.matrices_unchanged == 1 and len(dense.matrices) == 1
    none = res.results[2]
    assert none.matrices == [] and none.matrices_unchanged == 2
    assert any("no weight matrix differs" in w for w in none.warnings)
    assert lora.sweep_totals == [sum(m.sweep_counts[j] for m in lora.matrices) for j in range(9)]


def test_float64_and_k_clipping():
    W0 = torch.randn(6, 5, dtype=torch.float64)
    res = audit([MatrixGroup("w", W0, [Dense(W0 + 1.0)])], k=10, dtype=torch.float64, device="cpu", progress=False)
    m = res.results[0].matrices[0]
    assert len(m.max_cos) == 5 and res.settings["dtype"] == "float64"
    assert m.max_cos == pytest.approx(reference_intruders(W0, W0 + 1.0)[0], abs=1e-10)
    assert m.layer is None and m.module == "w"


def test_stream_info_and_warnings_are_carried():
    class Stream(list):
        base = "B"
        tuned = ["T"]
        info = [{"format": "peft_adapter"}]
        warnings = [["initialised with pissa"]]

    W0 = torch.randn(8, 8)
    res = audit(Stream([MatrixGroup("a.weight", W0, [Dense(W0 * 2)])]), progress=False, device="cpu")
    assert res.base == "B" and res.results[0].tuned == "T"
    assert res.results[0].info == {"format": "peft_adapter"}
    assert "initialised with pissa" in res.results[0].warnings


def test_bad_settings_and_empty_stream():
    with pytest.raises(InputError, match="no 2-D weight matrix in common"):
        audit([], progress=False, device="cpu")
    W = [MatrixGroup("a", torch.eye(3), [Dense(torch.ones(3, 3))])]
    for kw, msg in [({"k": 0}, "k must be"), ({"epsilon": 1.5}, "epsilon"), ({"epsilon_sweep": [0.0]}, "sweep"),
                    ({"dtype": torch.float16}, "float32 or float64")]:
        with pytest.raises(InputError, match=msg):
            audit(W, progress=False, device="cpu", **kw)


def test_each_base_matrix_decomposed_once_for_many_tuned():
    """The cache hook is asked once per changed base matrix, however many tuned models share it."""
    from lora_audit.spectral.exact import base_spectrum

    class CountingCache:
        calls = 0

        def base_spectrum(self, W0, device):
            CountingCache.calls += 1
            return base_spectrum(W0.to(device))

    groups, _, _ = _groups()
    unchanged = MatrixGroup("model.layers.2.mlp.up_proj.weight", torch.randn(8, 8), [None, None, None])
    res = audit(groups + [unchanged], cache=CountingCache(), device="cpu", progress=False, exact=True)
    assert CountingCache.calls == 2  # two changed base matrices, three tuned models, one untouched matrix
    assert res.results[0].matrices_unchanged == 1


def test_fast_path_that_does_not_converge_falls_back_to_exact(monkeypatch):
    import lora_audit.spectral.engine as engine
    from lora_audit.spectral.types import TopK

    def unconverged(base, W0, delta, k, projection=None):
        return TopK(singular_values=torch.ones(k), max_cos=torch.zeros(k), argmax_base=torch.zeros(k, dtype=torch.long),
                    method="block_krylov", converged=False, residual=0.3)

    monkeypatch.setattr(engine, "_fast_topk", unconverged)
    groups, W0s, W1s = _groups()
    res = audit(groups, device="cpu", progress=False)
    rec = {m.name: m for m in res.results[0].matrices}[groups[0].name]
    ref_cos, ref_count = reference_intruders(W0s[0], W1s[(0, 0)])
    assert rec.method == "exact" and rec.intruders == ref_count
    assert rec.max_cos == pytest.approx(ref_cos, abs=1e-4)
    assert any("did not converge" in n for n in rec.notes)
    assert any("fell back" in w for w in res.results[0].warnings)


def test_cos_top_base_heat_map_rows_are_tuned_vectors():
    g = torch.Generator().manual_seed(4)
    W0 = torch.randn(20, 12, generator=g, dtype=torch.float64)
    W1 = W0 + 0.3 * torch.randn(20, 12, generator=g, dtype=torch.float64)
    m = audit([MatrixGroup("w", W0, [Dense(W1)])], k=5, dtype=torch.float64, exact=True, device="cpu",
              progress=False).results[0].matrices[0]
    U0 = torch.linalg.svd(W0, full_matrices=False)[0]
    U1 = torch.linalg.svd(W1, full_matrices=False)[0]
    expected = (U1[:, :5].T @ U0[:, :5]).abs()  # (5 tuned, 5 base)
    assert torch.allclose(torch.tensor(m.cos_top_base, dtype=torch.float64), expected, atol=1e-4)


def test_small_matrices_go_straight_to_exact(monkeypatch):
    """Below EXACT_BELOW rows/columns the exact SVD is used even without --exact (it is as fast)."""
    from lora_audit.checkpoints.deltas import LowRank
    from lora_audit.spectral import engine
    from lora_audit.spectral.exact import base_spectrum

    g = torch.Generator().manual_seed(0)
    W0 = torch.randn(40, 60, generator=g)
    delta = LowRank(B=torch.randn(40, 2, generator=g), A=torch.randn(2, 60, generator=g), scale=1.0)
    base = base_spectrum(W0)
    monkeypatch.setattr(engine, "EXACT_BELOW", 41)
    assert engine.tuned_topk(base, W0, delta, 5, exact=False)[0].method == "exact"
    monkeypatch.setattr(engine, "EXACT_BELOW", 40)
    assert engine.tuned_topk(base, W0, delta, 5, exact=False)[0].method == "lowrank"
