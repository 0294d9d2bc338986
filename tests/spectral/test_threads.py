"""The LoRA path's small kernels run on one torch thread (``blas.one_thread``), in the reader thread
and in the main thread, whatever torch's thread count, and the count is restored afterwards; the
results equal those of a one-thread run bit for bit."""

import threading

import torch

from lora_audit.checkpoints.deltas import LowRank, MatrixGroup
from lora_audit.spectral.blas import one_thread
from lora_audit.spectral.cache import SpectrumCache
from lora_audit.spectral.engine import audit


def test_one_thread_sets_and_restores_this_threads_count():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        with one_thread():
            seen.append(torch.get_num_threads())
            with one_thread():  # nested: still one, and the outer block restores
                seen.append(torch.get_num_threads())
            seen.append(torch.get_num_threads())
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def _groups(n=3, seed=8):
    g = torch.Generator().manual_seed(seed)
    return [MatrixGroup(f"model.layers.{i}.self_attn.q_proj.weight", torch.randn(40, 32, generator=g),
                        [LowRank(torch.randn(40, 3, generator=g), torch.randn(3, 32, generator=g), 2.0)])
            for i in range(n)]


def test_lora_kernels_run_on_one_thread_in_both_threads(tmp_path, monkeypatch):
    groups = _groups()
    one = audit(groups, device="cpu", progress=False)
    audit(groups, device="cpu", progress=False, cache=SpectrumCache(tmp_path))  # warm the cache
    counts: dict[str, set[int]] = {}
    real_qr, real_mm = torch.linalg.qr, torch.Tensor.__matmul__

    def record():
        counts.setdefault(threading.current_thread().name, set()).add(torch.get_num_threads())

    def qr(*a, **kw):
        record()
        return real_qr(*a, **kw)

    def matmul(self, other):
        record()
        return real_mm(self, other)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(torch.linalg, "qr", qr)
        monkeypatch.setattr(torch.Tensor, "__matmul__", matmul)
        two = audit(groups, device="cpu", progress=False, cache=SpectrumCache(tmp_path))
        monkeypatch.undo()
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert set(counts) == {"MainThread", "lora-audit-reader"}  # the reader projected, the main thread searched
    assert all(c == {1} for c in counts.values())
    assert [m.max_cos for m in two.results[0].matrices] == [m.max_cos for m in one.results[0].matrices]


def test_the_base_svd_runs_on_the_callers_threads_whatever_the_small_blocks_leave(monkeypatch):
    """The race blas.threads describes: a thread's first read of torch's count can see what another
    thread set, so the small blocks may "restore" one thread. The base SVD must still get the
    caller's count, read before the reader thread started."""
    import contextlib

    import lora_audit.spectral.engine as engine

    @contextlib.contextmanager
    def leaves_one():  # what the race did: set 1, "restore" 1
        torch.set_num_threads(1)
        yield

    seen = []
    real = engine.base_spectrum

    def spectrum(W0, *a, **kw):
        seen.append(torch.get_num_threads())
        return real(W0, *a, **kw)

    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.setattr(engine, "one_thread", leaves_one)
        monkeypatch.setattr(engine, "base_spectrum", spectrum)
        audit(_groups(), device="cpu", progress=False)
    finally:
        torch.set_num_threads(before)
    assert seen == [2, 2, 2]


def test_a_cached_lora_audit_does_not_screen_w0_again(tmp_path, monkeypatch):
    """With W0's verified entry found (its key is W0's content hash, and entries are only written for
    finite matrices), neither thread reads W0 to screen it; the results are the same."""
    import lora_audit.spectral.engine as engine
    import lora_audit.spectral.findings as findings

    groups = [MatrixGroup(f"model.layers.{i}.mlp.up_proj.weight", g.base.repeat(6, 7)[:200, :210].contiguous(),
                          [LowRank(g.deltas[0].B.repeat(5, 1)[:200], g.deltas[0].A.repeat(1, 7)[:, :210], 2.0)])
              for i, g in enumerate(_groups())]  # >= EXACT_BELOW: the LoRA fast path
    cold = audit(groups, device="cpu", progress=False, cache=SpectrumCache(tmp_path))

    def must_not(*a, **kw):
        raise AssertionError("W0 screened again")

    real_bound = findings._norm_bound

    def bound(W0, delta, base_norm=None):
        assert base_norm is not None  # ||W0||_F from the spectrum, not a pass over W0
        return real_bound(W0, delta, base_norm)

    monkeypatch.setattr(engine, "screen_base", must_not)
    monkeypatch.setattr(engine, "count_nonfinite", must_not)
    monkeypatch.setattr(findings, "_norm_bound", bound)
    warm = audit(groups, device="cpu", progress=False, cache=SpectrumCache(tmp_path))
    assert [m.max_cos for m in warm.results[0].matrices] == [m.max_cos for m in cold.results[0].matrices]
    assert [m.delta_norm for m in warm.results[0].matrices] == [m.delta_norm for m in cold.results[0].matrices]
