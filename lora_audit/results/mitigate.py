"""Result of ``lora-audit mitigate`` (schema ``"mitigate"``): ``OUT/mitigate.json`` and ``--json``.

    lora_audit          provenance block; settings: lam, k, epsilon, dtype, device
    base, adapter, out  the arguments as given
    lambda, k, epsilon  the mitigation's settings (again, at the top)
    intruders_before    intruder dimensions over every rewritten or checked matrix, before ...
    intruders_after     ... and after mitigation
    matrices_rewritten  matrices whose factors were replaced
    notes               e.g. modules_to_save tensors copied unchanged
    modules             {base parameter name: ``MitigatedMatrix``}
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar

from .base import Result
from .schema import AT_LEAST_1, Count, Epsilon, NonNeg, Rate


@dataclass
class MitigatedMatrix:
    intruders_before: Count
    intruders_after: Count
    k_used: Count
    rewritten: bool
    truncation_rel_error: NonNeg  # ||L R - B' A'||_F / ||L R||_F of the rank-r refactorisation


@dataclass
class MitigateResult(Result):
    """A LoRA adapter whose intruder dimensions were scaled by lambda (``spectral.mitigate``)."""

    SCHEMA: ClassVar[str] = "mitigate"
    SCHEMA_VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "mitigation record"
    WRITTEN_BY: ClassVar[str] = "mitigate (OUT/mitigate.json, --json)"
    JSON_NAMES: ClassVar[dict[str, str]] = {"lam": "lambda"}

    base: str
    adapter: str
    out: str
    lam: Rate
    k: Annotated[int, AT_LEAST_1]
    epsilon: Epsilon
    intruders_before: Count
    intruders_after: Count
    matrices_rewritten: Count
    notes: list[str] = field(default_factory=list)
    modules: dict[str, MitigatedMatrix] = field(default_factory=dict)
