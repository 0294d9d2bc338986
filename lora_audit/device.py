"""Device selection: CUDA when present and asked for (``auto``), the CPU otherwise."""

from __future__ import annotations

import torch

from .errors import DeviceError


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; ``cuda``/``cuda:N``/``cpu``/``mps`` as given.

    Raises DeviceError (a user-facing message) when CUDA is asked for but absent.
    """
    if isinstance(spec, torch.device):
        return spec
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: CUDA is not available on this machine; use --device cpu or auto")
        dev = torch.device(spec)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return dev
    if spec == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise DeviceError("--device mps: MPS is not available on this machine")
        return torch.device("mps")
    if spec == "cpu":
        return torch.device("cpu")
    raise DeviceError(f"--device {spec!r}: expected auto, cpu, cuda, cuda:N or mps")


def all_devices(spec: str | None = "auto") -> list[torch.device]:
    """Devices to spread independent work over: every CUDA device for ``auto`` on a multi-GPU
    machine, otherwise the single resolved device."""
    dev = resolve_device(spec)
    if dev.type == "cuda" and (spec or "auto").strip().lower() == "auto":
        return [torch.device(f"cuda:{i}") for i in range(torch.cuda.device_count())]
    return [dev]


def is_oom(exc: BaseException) -> bool:
    """True for out-of-memory errors on any device (CUDA OOM or a failed CPU allocation)."""
    if isinstance(exc, getattr(torch.cuda, "OutOfMemoryError", ())):
        return True
    msg = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in msg or "can't allocate memory" in msg or isinstance(exc, MemoryError)
    )
