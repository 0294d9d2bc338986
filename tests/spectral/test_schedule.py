"""schedule.run (read-ahead thread, one worker per device) and its use in engine.audit: results in
stream order and identical to the plain loop, read-ahead bounded, errors re-raised, threads gone.

No GPU here: the several-devices path runs with devices=[cpu, cpu] (two worker threads on the CPU),
which exercises the threading, ordering and error handling but not CUDA itself."""

import gc
import threading
import weakref

import pytest
import torch

from lora_audit.checkpoints.deltas import Dense, LowRank, MatrixGroup
from lora_audit.spectral import schedule
from lora_audit.spectral.cache import SpectrumCache
from lora_audit.spectral.engine import audit

CPU = torch.device("cpu")


def _threads():
    return {t for t in threading.enumerate() if t.name.startswith("lora-audit-")}


@pytest.mark.parametrize("devices,depth", [([CPU], 0), ([CPU], 1), ([CPU], 3), ([CPU, CPU], 1), ([CPU, CPU, CPU], 2)])
def test_results_in_stream_order(devices, depth):
    out = list(schedule.run(range(20), lambda x, dev, extra: (x, extra, dev), devices,
                            prepare=lambda x: x * x, depth=depth))
    assert out == [(x, x * x, CPU) for x in range(20)]
    assert not _threads()


def test_prepare_runs_in_the_reader_thread_and_work_in_the_caller():
    seen = {}
    out = list(schedule.run(range(3), lambda x, d, e: (e, threading.get_ident()), [CPU],
                            prepare=lambda x: threading.current_thread().name))
    assert {e for e, _ in out} == {"lora-audit-reader"}
    assert {tid for _, tid in out} == {threading.get_ident()}
    assert not seen


def test_read_ahead_is_bounded():
    """While item i is being worked on, at most i + 1 + depth items have been read."""
    read = []

    def items():
        for i in range(12):
            read.append(i)
            yield i

    def work(i, dev, extra):
        assert len(read) <= i + 2  # depth 1: the one in hand and one ahead
        return i

    assert list(schedule.run(items(), work, [CPU], depth=1)) == list(range(12))


def test_several_devices_share_the_work():
    """Two workers: the first two items are held until both workers have one (a barrier), so both
    threads certainly take part; order is still the stream's."""
    barrier = threading.Barrier(2, timeout=30)
    who = {}

    def work(i, dev, extra):
        if i < 2:
            barrier.wait()
        who[i] = threading.current_thread().name
        return -i

    assert list(schedule.run(range(10), work, [CPU, CPU])) == [-i for i in range(10)]
    assert len({who[0], who[1]}) == 2
    assert not _threads()


@pytest.mark.parametrize("devices", [[CPU], [CPU, CPU]])
def test_errors_in_the_stream_reach_the_caller(devices):
    def items():
        yield 0
        yield 1
        raise OSError("truncated shard")

    got = []
    with pytest.raises(OSError, match="truncated shard"):
        for r in schedule.run(items(), lambda x, d, e: x, devices):
            got.append(r)
    assert got == [0, 1] or devices != [CPU]  # one device: everything before the error arrives
    assert not _threads()


@pytest.mark.parametrize("devices", [[CPU], [CPU, CPU]])
def test_errors_in_work_stop_the_reader(devices):
    read = []

    def items():
        for i in range(1000):
            read.append(i)
            yield i

    def work(i, d, e):
        if i == 3:
            raise ValueError("bad matrix 3")
        return i

    with pytest.raises(ValueError, match="bad matrix 3"):
        list(schedule.run(items(), work, devices))
    assert not _threads() and len(read) < 20


def test_abandoned_iteration_stops_the_threads():
    gen = schedule.run(range(1000), lambda x, d, e: x, [CPU, CPU])
    assert next(gen) == 0
    gen.close()
    assert not _threads()


def test_devices_for():
    assert schedule.devices_for(CPU) == [CPU]
    assert schedule.devices_for(CPU, ["cpu", "cpu"]) == [CPU, CPU]
    with pytest.raises(ValueError):
        list(schedule.run([1], lambda x, d, e: x, []))


# ---- through the engine --------------------------------------------------------------------------
def _groups(n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        m, k = (24, 20) if i % 2 else (20, 28)
        W0 = torch.randn(m, k, generator=g)
        out.append(MatrixGroup(f"model.layers.{i}.mlp.up_proj.weight", W0, [
            LowRank(torch.randn(m, 2, generator=g), torch.randn(2, k, generator=g), 2.0 + i),
            Dense(W0 + 0.3 * torch.randn(m, k, generator=g)) if i != 2 else None]))
    return out


def _flat(res):
    return [[(m.name, m.max_cos, m.intruders, m.method, m.base_index) for m in r.matrices] for r in res.results]


@pytest.mark.parametrize("devices,prefetch", [(None, 1), (None, 2), (["cpu", "cpu"], 1)])
def test_audit_scheduled_equals_plain_loop(devices, prefetch, tmp_path):
    plain = audit(_groups(), device="cpu", progress=False, prefetch=0)
    got = audit(_groups(), device="cpu", progress=False, prefetch=prefetch, devices=devices)
    assert _flat(got) == _flat(plain)
    cache = SpectrumCache(tmp_path)
    cold = audit(_groups(), device="cpu", progress=False, prefetch=prefetch, devices=devices, cache=cache)
    warm = audit(_groups(), device="cpu", progress=False, prefetch=prefetch, devices=devices, cache=cache)
    assert _flat(cold) == _flat(warm) == _flat(plain)
    assert (cache.misses, cache.hits) == (6, 6)
    assert not _threads()


def test_audit_holds_a_few_groups_however_long_the_stream():
    """Groups are made lazily; when each new one is made, at most three are still alive (the one
    being audited, the one read ahead, and the generator's previous one)."""
    refs = []
    peak = []

    def stream():
        g = torch.Generator().manual_seed(1)
        for i in range(10):
            gc.collect()
            peak.append(sum(r() is not None for r in refs))
            W0 = torch.randn(20, 16, generator=g)
            grp = MatrixGroup(f"model.layers.{i}.self_attn.v_proj.weight", W0,
                              [LowRank(torch.randn(20, 2, generator=g), torch.randn(2, 16, generator=g), 1.0)])
            refs.append(weakref.ref(grp))
            yield grp

    res = audit(stream(), device="cpu", progress=False)
    assert len(res.results[0].matrices) == 10
    assert max(peak) <= 3
