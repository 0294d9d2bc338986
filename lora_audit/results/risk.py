"""The risk model file of ``safety-scan`` (schema ``"scan-risk"``): ``lora_audit/data/scan/risk.json``,
written by ``lora-audit zoo --risk-file`` and read by ``safety-scan --risk-file`` (``scan.risk``).

    lora_audit   provenance block (of the zoo run that fitted the models)
    panel        what the models were fitted on: built_with, models, positives, plan_key, git
    models       {name: ``RiskModelInfo``} ("weights_only", "full")

Schema version 2 adds each model's validation record (``RiskModelInfo.validation``); a model
without one gives no risk. Files written before the provenance block had ``"schema":
"lora-audit/scan-risk"`` and ``"version": 1`` or ``2`` at the top; they read as before (``from_json``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..errors import InputError
from .base import Provenance, Result
from .scan import RiskModelInfo

LEGACY_SCHEMA = "lora-audit/scan-risk"  # the top-level "schema" of files written before the provenance block
LEGACY_VERSIONS = (1, 2)  # 1: no validation record (never validated); 2: with one


@dataclass
class RiskModelFile(Result):
    """Fitted risk models and the panel they were fitted on."""

    SCHEMA: ClassVar[str] = "scan-risk"
    SCHEMA_VERSION: ClassVar[int] = 2
    WHAT: ClassVar[str] = "lora-audit risk model file"
    WRITTEN_BY: ClassVar[str] = "zoo --write-risk-file (lora_audit/data/scan/risk.json)"

    models: dict[str, RiskModelInfo]
    panel: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def looks_like(cls, obj: dict[str, Any]) -> bool:
        return obj.get("schema") == LEGACY_SCHEMA

    @classmethod
    def _provenance_of(cls, obj: dict[str, Any], source: str) -> Provenance | None:
        prov = super()._provenance_of(obj, source)
        if prov is None and "schema" in obj and obj.get("schema") != LEGACY_SCHEMA:
            raise InputError(f"{source}: not a {cls.WHAT} (schema {obj.get('schema')!r}, expected {cls.SCHEMA!r})")
        if prov is None and cls.looks_like(obj) and (isinstance(obj.get("version", 1), bool) or obj.get("version", 1) not in LEGACY_VERSIONS):
            raise InputError(f"{source}: {LEGACY_SCHEMA} version {obj.get('version')!r} is not one this lora-audit "
                             "reads (1 or 2)")
        return prov
