"""Where a screen's adapters are audited: in this process, or in a pool of worker processes.

Every engine has the same shape, so the screen's driver does not care which one runs:

    with engine:                      # start (processes, a Ray runtime)
        refs = share_spectra(..., put=engine.put)     # None unless the engine has an object store
        for record in engine.run(spec, jobs): ...     # as they finish, a few in flight

and one failure policy: a ``LoraAuditError`` is the input's fault (a corrupt file, an adapter for
another base) and becomes a failed record at once (``worker.audit_adapter``); any other exception,
or a worker process that dies (a crash, the out-of-memory killer), is retried once and then
recorded as failed with the error. Nothing is fatal to the screen but the driver itself stopping.

``LocalEngine`` runs one worker process per device: one per GPU when there are GPUs, else
``workers`` CPU processes sharing the cores (``torch`` threads split between them). Each worker
is a spawned process (never a fork of a process holding torch's thread pools) that serves one
adapter at a time over a pipe, so the driver knows which adapter a dead worker held. The Ray
engine is in ``ray_engine`` (imported only when asked for).
"""

from __future__ import annotations

import multiprocessing as mp
import signal
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Any

from .worker import ATTEMPTS, Job, WorkerSpec, audit_adapter, error_text, failed_record, worker_name


class InProcessEngine:
    """Audits in the calling process, one adapter after another (``--workers 0``: no isolation from
    a crash, no start-up cost; the library's and the tests' choice)."""

    put = None

    def __init__(self, device: str = "auto"):
        self.device = device

    def __enter__(self) -> InProcessEngine:
        return self

    def __exit__(self, *exc) -> None:
        from .spectra import _HELD

        _HELD.clear()  # the spectra this process held for the screen

    def run(self, spec: WorkerSpec, jobs: Iterable[Job]) -> Iterator[dict[str, Any]]:
        for job in jobs:
            yield self._one(spec, job)

    def _one(self, spec: WorkerSpec, job: Job) -> dict[str, Any]:
        error = ""
        for attempt in range(1, ATTEMPTS + 1):
            try:
                return audit_adapter(spec, job, device=self.device, attempt=attempt)
            except Exception as e:  # noqa: BLE001 - not the input's fault: retried, then recorded
                error = error_text(e)
        return failed_record(job, error, attempts=ATTEMPTS, worker=worker_name(self.device))


def _serve(conn, spec: WorkerSpec, device: str, threads: int) -> None:
    """A worker process: audit the jobs the driver sends until it sends None."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle; it stops us
    import torch

    torch.set_num_threads(threads)
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        job, attempt = msg
        try:
            conn.send(("record", audit_adapter(spec, job, device=device, attempt=attempt)))
        except Exception as e:  # noqa: BLE001 - reported to the driver, which retries or records it
            conn.send(("error", error_text(e)))


@dataclass
class _Worker:
    process: Any
    conn: Any
    device: str

    @property
    def name(self) -> str:
        return f"worker pid {self.process.pid} {self.device}"

    def receive(self) -> tuple[str, Any] | None:
        """The worker's answer, or None when it died."""
        try:
            if self.conn.poll():
                return self.conn.recv()
        except (EOFError, OSError):
            pass
        return None

    def death(self) -> str:
        self.process.join(5)
        code = self.process.exitcode
        if code is not None and code < 0:
            sig = signal.Signals(-code).name
            hint = " (out of memory?)" if -code == signal.SIGKILL else ""
            return f"the worker process was killed by {sig}{hint} while auditing this adapter"
        return f"the worker process exited (code {code}) while auditing this adapter"


class LocalEngine:
    """One worker process per entry of ``devices`` (see the module docstring); ``threads`` torch
    threads each. ``serve``: the workers' main function, ``_serve`` (a test gives one that crashes)."""

    put = None

    def __init__(self, devices: list[str], threads: int = 1, serve: Callable = _serve):
        if not devices:
            raise ValueError("no device for the workers")
        self.devices, self.threads, self.serve = list(devices), threads, serve
        self._ctx = mp.get_context("spawn")
        self._workers: list[_Worker] = []

    def __enter__(self) -> LocalEngine:
        return self

    def __exit__(self, *exc) -> None:
        self._stop(graceful=exc[0] is None)

    def _start(self, spec: WorkerSpec, device: str) -> _Worker:
        parent, child = self._ctx.Pipe()
        p = self._ctx.Process(target=self.serve, args=(child, spec, device, self.threads), daemon=True,
                              name=f"lora-audit-screen-{device}")
        p.start()
        child.close()
        w = _Worker(p, parent, device)
        self._workers.append(w)
        return w

    def _replace(self, spec: WorkerSpec, w: _Worker) -> _Worker:
        self._workers.remove(w)
        w.conn.close()
        return self._start(spec, w.device)

    def run(self, spec: WorkerSpec, jobs: Iterable[Job]) -> Iterator[dict[str, Any]]:
        it = iter(jobs)
        retry: deque[tuple[Job, int]] = deque()
        idle = [self._start(spec, d) for d in self.devices]
        busy: dict[int, tuple[_Worker, Job, int]] = {}

        def next_job() -> tuple[Job, int] | None:
            if retry:
                return retry.popleft()
            job = next(it, None)
            return None if job is None else (job, 1)

        def hand_out() -> None:
            while idle and (got := next_job()) is not None:
                w = idle.pop()
                try:
                    w.conn.send(got)
                except OSError:  # died since its last answer: the job never started
                    idle.append(self._replace(spec, w))
                    retry.appendleft(got)
                    continue
                busy[id(w)] = (w, *got)

        while True:
            hand_out()
            if not busy:
                return
            ready = set(wait([w.conn for w, _, _ in busy.values()] + [w.process.sentinel for w, _, _ in busy.values()]))
            finished = []
            for key, (w, job, attempt) in list(busy.items()):
                if w.conn not in ready and w.process.sentinel not in ready:
                    continue
                del busy[key]
                msg = w.receive()
                if msg is not None and msg[0] == "record":
                    idle.append(w)
                    finished.append(msg[1])
                    continue
                if msg is None:
                    error = w.death()
                    idle.append(self._replace(spec, w))
                else:
                    error = msg[1]
                    idle.append(w)
                if attempt < ATTEMPTS:
                    retry.append((job, attempt + 1))
                else:
                    finished.append(failed_record(job, error, attempts=attempt, worker=w.name))
            hand_out()  # the workers start their next adapters while the driver stores these records
            yield from finished

    def _stop(self, *, graceful: bool) -> None:
        """Stop every worker this engine started: asked to finish when all went well, terminated
        otherwise (Ctrl-C, an error in the driver)."""
        for w in self._workers:
            if graceful:
                try:
                    w.conn.send(None)
                except OSError:
                    pass
        for w in self._workers:
            w.process.join(10 if graceful else 0)
            if w.process.is_alive():
                w.process.terminate()
                w.process.join(5)
            w.conn.close()
        self._workers = []
