"""Progress bars (tqdm on stderr). Disabled when stderr is not a terminal unless forced, and
always disabled with LORA_AUDIT_NO_PROGRESS=1 so logs and tests stay clean."""

from __future__ import annotations

import os
import sys
from typing import Iterable, Iterator, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def progress_enabled() -> bool:
    if os.environ.get("LORA_AUDIT_NO_PROGRESS") == "1":
        return False
    if os.environ.get("LORA_AUDIT_PROGRESS") == "1":
        return True
    return sys.stderr.isatty()


def progress(iterable: Iterable[T] | None = None, *, total: int | None = None, desc: str = "",
             unit: str = "it", leave: bool = False) -> "tqdm[T]":
    """A tqdm bar on stderr; usable as an iterator wrapper or with ``.update(n)``."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave,
                disable=not progress_enabled(), file=sys.stderr, dynamic_ncols=True)


def iter_progress(iterable: Iterable[T], **kw) -> Iterator[T]:
    with progress(iterable, **kw) as bar:
        yield from bar
