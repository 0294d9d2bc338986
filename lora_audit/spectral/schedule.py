"""Scheduling the audit: read the next matrix while this one is decomposed, and spread matrices
over several devices, keeping results in stream order and memory bounded.

    reader thread:   for item in stream: extra = prepare(item); queue.put((i, item, extra))
    one device:      the calling thread runs work(item, device, extra) for each item in turn
    several devices: one worker thread per device pulls items and runs work on its device;
                     the calling thread hands results back in stream order

Reading a tensor (safetensors, memory-mapped), hashing it for the spectrum cache and reading a
cached spectrum are I/O and hashing, which release the GIL, as do torch's SVDs and products; so a
thread is enough to overlap them. At most ``len(devices) + depth`` items are read and not yet
handed back (a semaphore the reader takes before reading and the consumer gives back after
yielding): memory holds a few matrices, however many layers the model has. An exception in the
reader, ``prepare`` or ``work`` stops everything and is re-raised in the calling thread.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch

_END = object()
_POLL = 0.1  # seconds between checks of the stop flag while blocked


class _Failure:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _put(q: queue.Queue, obj: Any, stop: threading.Event) -> bool:
    while not stop.is_set():
        try:
            q.put(obj, timeout=_POLL)
            return True
        except queue.Full:
            continue
    return False


def _acquire(slots: threading.Semaphore, stop: threading.Event) -> bool:
    while not stop.is_set():
        if slots.acquire(timeout=_POLL):
            return True
    return False


def _reader(iterable: Iterable, prepare: Callable | None, out: queue.Queue, slots: threading.Semaphore,
            stop: threading.Event) -> None:
    try:
        it = iter(iterable)
        i = 0
        while _acquire(slots, stop):
            try:
                item = next(it)
            except StopIteration:
                break
            extra = prepare(item) if prepare is not None else None
            if not _put(out, (i, item, extra), stop):
                return
            i += 1
            del item, extra
        _put(out, _END, stop)
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
        _put(out, _Failure(e), stop)


def _worker(device: torch.device, work: Callable, inq: queue.Queue, outq: queue.Queue,
            stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            got = inq.get(timeout=_POLL)
        except queue.Empty:
            continue
        if got is _END or isinstance(got, _Failure):
            inq.put(got)  # let the other workers see it too
            outq.put(got)
            return
        i, item, extra = got
        try:
            result = work(item, device, extra)
        except BaseException as e:  # noqa: BLE001 - handed to the consumer, which re-raises it
            outq.put(_Failure(e))
            return
        outq.put((i, result))
        del item, extra, got


def run(iterable: Iterable, work: Callable[[Any, torch.device, Any], Any], devices: Sequence[torch.device], *,
        prepare: Callable[[Any], Any] | None = None, depth: int = 1) -> Iterator[Any]:
    """Yield ``work(item, device, prepare(item))`` for every item of ``iterable``, in order.

    ``prepare`` runs in the reader thread (e.g. hash the matrix and read its cached spectrum);
    ``work`` runs on one of ``devices`` (in the calling thread when there is one device, else in
    one worker thread per device). ``depth`` = how many items are read ahead (0: no thread at all,
    a plain loop). Results must not hold the items if memory is to stay bounded.
    """
    devices = list(devices)
    if not devices:
        raise ValueError("no device to run on")
    if depth <= 0 and len(devices) == 1:
        for item in iterable:
            yield work(item, devices[0], prepare(item) if prepare is not None else None)
        return
    depth = max(depth, 1)
    stop = threading.Event()
    slots = threading.Semaphore(len(devices) + depth)
    inq: queue.Queue = queue.Queue(maxsize=depth if len(devices) == 1 else depth + len(devices))
    threads = [threading.Thread(target=_reader, args=(iterable, prepare, inq, slots, stop), daemon=True,
                                name="lora-audit-reader")]
    outq: queue.Queue | None = None
    if len(devices) > 1:
        outq = queue.Queue()
        threads += [threading.Thread(target=_worker, args=(d, work, inq, outq, stop), daemon=True,
                                     name=f"lora-audit-worker-{j}-{d}") for j, d in enumerate(devices)]
    for t in threads:
        t.start()
    try:
        if outq is None:  # one device: work here, in stream order by construction
            while True:
                got = inq.get()
                if got is _END:
                    return
                if isinstance(got, _Failure):
                    raise got.exc
                _, item, extra = got
                del got
                result = work(item, devices[0], extra)
                del item, extra
                slots.release()
                yield result
        else:  # several devices: put results back in stream order
            pending: dict[int, Any] = {}
            nxt, finished = 0, 0
            while True:
                while nxt in pending:
                    result = pending.pop(nxt)
                    nxt += 1
                    slots.release()
                    yield result
                if finished == len(devices):
                    if pending:  # pragma: no cover - a worker lost an item: a bug
                        raise RuntimeError(f"schedule: results {sorted(pending)} arrived without {nxt}")
                    return
                got = outq.get()
                if got is _END:
                    finished += 1
                elif isinstance(got, _Failure):
                    raise got.exc
                else:
                    pending[got[0]] = got[1]
    finally:
        stop.set()
        for t in threads:
            t.join()


def devices_for(device: torch.device, devices: Sequence[str | torch.device] | None = None) -> list[torch.device]:
    """The devices to spread the matrices over: ``devices`` when given; every CUDA device when
    ``device`` is plain ``cuda`` (what ``--device auto`` resolves to) on a multi-GPU machine;
    else just ``device`` (``cuda:N`` pins one GPU)."""
    if devices:
        return [torch.device(d) for d in devices]
    if device.type == "cuda" and device.index is None and torch.cuda.device_count() > 1:
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [device]
