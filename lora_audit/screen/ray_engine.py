"""The Ray engine of ``lora-audit screen``: one Ray task per adapter (Ray's own task API).

Ray is an optional extra (``pip install 'lora-auditor[ray]'``), imported only here, only for
``--engine ray``. The engine

- joins the running Ray runtime when there is one (a test, a notebook), else connects to the
  cluster at ``address`` (``ray.init(address=...)``: ``auto``, ``host:6379`` or
  ``ray://host:10001``), else starts a local runtime on this machine, giving its workers this
  lora-audit's code (and, unless RAY_USAGE_STATS_ENABLED says otherwise, no usage statistics);
- checks first that a worker can run this version of lora-audit (every node needs the same
  version installed, with its dependencies);
- pins each task to one GPU (``num_gpus=1``; Ray sets CUDA_VISIBLE_DEVICES) when the cluster has
  GPUs and ``device`` allows them, else to one CPU (Ray then runs torch with one thread);
- retries a task once when it raises (not for the input's errors, which become failed records
  inside the task) or its worker dies (``max_retries=1``, ``retry_exceptions=True``), and then
  records the adapter as failed with the error: never fatal to the screen;
- keeps about two tasks per worker slot in flight and hands records back as they finish.

``put`` places the base spectra in the object store (``spectra.share_spectra``), where the
workers of a node share them without copies.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import InputError
from .worker import ATTEMPTS, Job, WorkerSpec, audit_adapter, error_text, failed_record

RAY_EXTRA = "pip install 'lora-auditor[ray]'"


def import_ray():
    """The ``ray`` module; InputError saying how to install it when it is missing."""
    try:
        import ray
    except ImportError:
        raise InputError(f"--engine ray needs Ray, which is not installed: {RAY_EXTRA} (or pip install ray); "
                         "or use --engine local") from None
    return ray


def _ray_audit(spec: WorkerSpec, job: Job) -> dict[str, Any]:
    """The task: one adapter, on the GPU Ray gave this task if any."""
    import ray

    device = "cuda" if ray.get_gpu_ids() else "cpu"
    return audit_adapter(spec, job, device=device, fetch=ray.get)


def _version() -> str:
    from .. import __version__

    return __version__


def _task_error(e: BaseException) -> str:
    """The message of a task that failed twice: the task's own exception when Ray has it."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        return error_text(cause)
    first = str(e).strip().splitlines()
    return f"{type(e).__name__}: {first[0] if first else ''}"


class RayEngine:
    """Ray tasks (see the module docstring). ``workers``: at most this many adapters at once
    (default: one per CPU, or per GPU, of the cluster)."""

    def __init__(self, *, address: str | None = None, workers: int | None = None, device: str = "auto"):
        self.ray = import_ray()
        self.address, self.workers, self.device = address, workers, device
        self._started = False
        self._gpus = False

    def __enter__(self) -> RayEngine:
        ray = self.ray
        if not ray.is_initialized():
            if self.address:
                ray.init(address=self.address, logging_level="WARNING")
            else:
                import lora_audit

                os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # a local runtime reports nothing home
                code = str(Path(lora_audit.__file__).resolve().parents[1])
                path = os.pathsep.join(p for p in (code, os.environ.get("PYTHONPATH", "")) if p)
                ray.init(num_cpus=self.workers, include_dashboard=False, logging_level="WARNING",
                         runtime_env={"env_vars": {"PYTHONPATH": path}})
            self._started = True
        self._check_workers()
        gpus = int(ray.cluster_resources().get("GPU", 0))
        self._gpus = gpus > 0 and not str(self.device).startswith("cpu")
        return self

    def __exit__(self, *exc) -> None:
        if self._started:
            self.ray.shutdown()
            self._started = False

    def _check_workers(self) -> None:
        from .. import __version__

        ray = self.ray
        try:
            theirs = ray.get(ray.remote(_version).options(num_cpus=0).remote(), timeout=300)
        except Exception as e:  # noqa: BLE001 - anything that keeps a worker from running lora-audit
            raise InputError(f"the Ray workers cannot run lora-audit ({_task_error(e)}). Every node needs "
                             f"{RAY_EXTRA} (version {__version__}, as here)") from None
        if theirs != __version__:
            raise InputError(f"the Ray workers run lora-audit {theirs}, this driver {__version__}; install the same "
                             "version on every node")

    def put(self, obj: Any) -> Any:
        return self.ray.put(obj)

    def _slots(self) -> int:
        if self.workers:
            return self.workers
        res = self.ray.cluster_resources()
        return max(1, int(res.get("GPU" if self._gpus else "CPU", 1)))

    def run(self, spec: WorkerSpec, jobs: Iterable[Job]) -> Iterator[dict[str, Any]]:
        ray = self.ray
        need = {"num_gpus": 1} if self._gpus else {"num_cpus": 1}
        task = ray.remote(_ray_audit).options(max_retries=ATTEMPTS - 1, retry_exceptions=True, **need)
        spec_ref = ray.put(spec)
        it = iter(jobs)
        pending: dict[Any, Job] = {}
        in_flight = 2 * self._slots()
        try:
            while True:
                while len(pending) < in_flight and (job := next(it, None)) is not None:
                    pending[task.remote(spec_ref, job)] = job
                if not pending:
                    return
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    job = pending.pop(ref)
                    try:
                        record = ray.get(ref)
                    except ray.exceptions.RayError as e:
                        record = failed_record(job, _task_error(e), attempts=ATTEMPTS, worker="ray")
                    yield record
        finally:
            for ref in pending:  # interrupted: stop what is still running
                ray.cancel(ref, force=True)
