"""The JSON Schema of every result kind, exported from the result classes into docs/schema/.

``python -m tests.json_schemas`` (``make schemas``) rewrites docs/schema/<kind>.schema.json from
``Result.json_schema()``; ``tests/results/test_json_schemas.py`` fails when a shipped file differs
from what the code exports, and validates real outputs of every command against them. (Here and
not in the package: the studies' kinds, demo and panel, live in lora_audit.studies, which the
product never imports.)
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

SCHEMA_DIR = Path(__file__).resolve().parents[1] / "docs" / "schema"


def result_classes() -> list[type]:
    """Every result kind lora-audit writes, in the order docs/json.md lists them."""
    from lora_audit.results.cache import CacheListing
    from lora_audit.results.mitigate import MitigateResult
    from lora_audit.results.risk import RiskModelFile
    from lora_audit.results.safety import SafetyResult
    from lora_audit.results.scan import SafetyScanResult
    from lora_audit.results.screen import ScreenRecord, ScreenResult, ScreenSetup
    from lora_audit.results.spectrum import SpectrumResult
    from lora_audit.results.study import StudyResult
    from lora_audit.results.training import FederatedResult, TrainingResult
    from lora_audit.studies.demo import DemoSummary
    from lora_audit.studies.panel import PanelResult

    return [SpectrumResult, SafetyResult, SafetyScanResult, ScreenResult, ScreenRecord, ScreenSetup, StudyResult,
            TrainingResult, FederatedResult, MitigateResult, RiskModelFile, CacheListing, DemoSummary, PanelResult]


def schema_files() -> dict[str, str]:
    """{file name: its text} for every kind."""
    return {f"{cls.SCHEMA}.schema.json": json.dumps(cls.json_schema(), indent=2, ensure_ascii=False) + "\n"
            for cls in result_classes()}


def closed(schema: dict) -> dict:
    """The schema with every object that lists its properties closed to others."""
    out = copy.deepcopy(schema)

    def walk(node):
        if isinstance(node, dict):
            if node.get("type") == "object" and "properties" in node:
                node.setdefault("additionalProperties", False)
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(out)
    return out


def shipped(kind: str) -> dict:
    return json.loads((SCHEMA_DIR / f"{kind}.schema.json").read_text(encoding="utf-8"))


def check(obj: dict, kind: str) -> None:
    """Validate ``obj`` against the shipped schema of ``kind``, open and closed; the error names the path."""
    import jsonschema

    for schema in (shipped(kind), closed(shipped(kind))):
        errors = sorted(jsonschema.Draft202012Validator(schema).iter_errors(obj), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{kind}: {'/'.join(map(str, e.path))}: {e.message}" for e in errors[:5])


def main(argv: list[str]) -> int:
    SCHEMA_DIR.mkdir(parents=True, exist_ok=True)
    want = schema_files()
    stale = [p for p in SCHEMA_DIR.glob("*.schema.json") if p.name not in want]
    for p in stale:
        p.unlink()
    for name, text in want.items():
        (SCHEMA_DIR / name).write_text(text, encoding="utf-8")
    print(f"wrote {len(want)} schemas to {SCHEMA_DIR}" + (f"; removed {len(stale)} stale" if stale else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
