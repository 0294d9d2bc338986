"""The listing ``lora-audit cache ls --json`` writes (schema ``"cache-listing"``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from .base import Result
from .schema import Count


@dataclass
class CacheListing(Result):
    """The cache folder, its entries (one object each: key, shape, dtype, size, created, ok,
    problem, ...) and what was left alone."""

    SCHEMA: ClassVar[str] = "cache-listing"
    SCHEMA_VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "cache listing"
    WRITTEN_BY: ClassVar[str] = "cache ls --json"

    root: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    count: Count = 0
    total_bytes: Count = 0
    temporary_files: Count = 0
    ignored_files: Count = 0
