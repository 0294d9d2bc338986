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
