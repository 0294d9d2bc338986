"""What a report shows, gathered from result JSON: spectrum results, safety results, and one
summary per tuned model joining the two (the report's rows, sorted by risk).

Reads only ``lora_audit.results`` records and plain dicts; never models or torch.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..results import read_result
from ..results.spectrum import SCHEMA as SPECTRUM_SCHEMA
from ..results.spectrum import SpectrumResult

SAFETY_SCHEMA = "safety"

# Most severe first: the order of the comparison tables.
VERDICT_RANK = {"SAFETY_REMOVED": 3, "SAFETY_DEGRADED": 2, "INCONCLUSIVE": 1, "RETAINED": 0}


@dataclass
class Source:
    """One input of the report: where it came from and a content hash of it."""

    label: str  # file path as given, or "<dict 1>" for in-memory results
    kind: str  # "spectrum" | "safety"
    sha256: str
    provenance: dict[str, Any]


@dataclass
class ModelSummary:
    """One tuned model's numbers from every input that mentions it."""

    name: str
    spectrum: Any = None  # TunedResult
    spectrum_run: SpectrumResult | None = None
    safety: dict[str, Any] | None = None  # models[name] of the safety result
    safety_base: dict[str, Any] | None = None  # models["base"] of the same result
    verdict: dict[str, Any] | None = None
    comparison: dict[str, Any] | None = None
    safety_run: dict[str, Any] | None = None

    # ---- spectrum -----------------------------------------------------------------------
    @property
    def intruders(self) -> int | None:
        return None if self.spectrum is None else self.spectrum.total_intruders

    @property
    def matrices(self) -> int | None:
        return None if self.spectrum is None else len(self.spectrum.matrices)

    @property
    def min_cos(self) -> float | None:
        if self.spectrum is None:
            return None
        vals = [m.min_cos for m in self.spectrum.matrices if m.min_cos is not None]
        return min(vals) if vals else None

    @property
    def intruders_per_matrix(self) -> float | None:
        if not self.matrices:
            return None
        return self.intruders / self.matrices

    # ---- safety -------------------------------------------------------------------------
    @property
    def label(self) -> str | None:
        return None if self.verdict is None else self.verdict.get("label")

    @property
    def refusal_drop(self) -> float | None:
        if self.verdict is not None and self.verdict.get("refusal_drop") is not None:
            return float(self.verdict["refusal_drop"])
        b = (self.safety_base or {}).get("refusal_rate")
        t = (self.safety or {}).get("refusal_rate")
        return None if b is None or t is None else b - t

    @property
    def refusal_drop_ci(self) -> tuple[float, float] | None:
        """95 % interval of (base rate - tuned rate) from the two Wilson intervals (Newcombe 1998,
        method 10); the runs share their prompts, for which this interval is conservative when the
        two models' refusals are positively correlated."""
        b, t = self.safety_base or {}, self.safety or {}
        return newcombe_interval(b.get("refusal_rate"), b.get("refusal_ci"), t.get("refusal_rate"), t.get("refusal_ci"))

    @property
    def capability_delta(self) -> dict[str, float]:
        if self.comparison and isinstance(self.comparison.get("capability_delta"), dict):
            return {k: v for k, v in self.comparison["capability_delta"].items() if v is not None}
        base = (self.safety_base or {}).get("capability") or {}
        tuned = (self.safety or {}).get("capability") or {}
        return {k: tuned[k] - v for k, v in base.items() if v is not None and tuned.get(k) is not None}

    def risk_key(self) -> tuple:
        """Sort key, most risky first: verdict, then refusal drop, then intruders per matrix."""
        return (-VERDICT_RANK.get(self.label or "", -1),
                -(self.refusal_drop if self.refusal_drop is not None else -2.0),
                -(self.intruders_per_matrix if self.intruders_per_matrix is not None else -1.0),
                self.name)


def newcombe_interval(p1, ci1, p2, ci2) -> tuple[float, float] | None:
    """Newcombe's hybrid score interval for p1 - p2 from the Wilson intervals (l1, u1), (l2, u2):
    [d - sqrt((p1-l1)^2 + (u2-p2)^2), d + sqrt((u1-p1)^2 + (p2-l2)^2)], d = p1 - p2
    (Newcombe 1998, Stat. Med. 17:873, method 10). None when anything is missing."""
    try:
        p1, p2 = float(p1), float(p2)
        l1, u1 = (float(x) for x in ci1)
        l2, u2 = (float(x) for x in ci2)
    except (TypeError, ValueError):
        return None
    d = p1 - p2
    return (max(-1.0, d - ((p1 - l1) ** 2 + (u2 - p2) ** 2) ** 0.5),
            min(1.0, d + ((u1 - p1) ** 2 + (p2 - l2) ** 2) ** 0.5))


@dataclass
class ReportData:
    title: str
    spectra: list[SpectrumResult] = field(default_factory=list)
    safeties: list[dict[str, Any]] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    models: list[ModelSummary] = field(default_factory=list)  # sorted by risk

    @property
    def has_spectrum(self) -> bool:
        return any(s.results for s in self.spectra)

    @property
    def has_safety(self) -> bool:
        return bool(self.safeties)


# ---- loading ----------------------------------------------------------------------------
def _sha256(obj: Any, path: Path | None) -> str:
    if path is not None:
        data = path.read_bytes()
    else:
        data = json.dumps(obj, sort_keys=True, ensure_ascii=False, default=str).encode()
    return "sha256:" + hashlib.sha256(data).hexdigest()[:16]


def detect_kind(obj: dict[str, Any], source: str) -> str:
    """"spectrum" or "safety"; InputError for any other JSON."""
    for key in ("lora_audit", "provenance"):
        prov = obj.get(key)
        if isinstance(prov, dict) and prov.get("schema") in (SPECTRUM_SCHEMA, SAFETY_SCHEMA):
            return prov["schema"]
        if isinstance(prov, dict) and prov.get("schema"):
            raise InputError(f"{source}: a {prov['schema']!r} result; the report reads spectrum and safety results")
    if all(k in obj for k in ("base", "k", "epsilon", "results")):
        return SPECTRUM_SCHEMA
    if isinstance(obj.get("models"), dict):
        return SAFETY_SCHEMA
    raise InputError(f"{source}: not a lora-audit spectrum or safety result (expected the JSON written by "
                     "'lora-audit spectrum --json' or 'lora-audit safety-eval --json')")


def check_safety(obj: dict[str, Any], source: str) -> dict[str, Any]:
    """Validate the parts of a safety result the report relies on; InputError naming the problem."""
    models = obj.get("models")
    if not isinstance(models, dict) or not models:
        raise InputError(f"{source}: not a safety result (no 'models')")
    for name, m in models.items():
        if not isinstance(m, dict):
            raise InputError(f"{source}: models[{name!r}] is not an object")
        rate = m.get("refusal_rate")
        if rate is not None and not isinstance(rate, (int, float)):
            raise InputError(f"{source}: models[{name!r}].refusal_rate is not a number")
        ci = m.get("refusal_ci")
        if ci is not None and (not isinstance(ci, (list, tuple)) or len(ci) != 2):
            raise InputError(f"{source}: models[{name!r}].refusal_ci is not a [low, high] pair")
        for key in ("responses", "benign_responses"):
            if m.get(key) is not None and not isinstance(m[key], list):
                raise InputError(f"{source}: models[{name!r}].{key} is not a list")
        if m.get("capability") is not None and not isinstance(m["capability"], dict):
            raise InputError(f"{source}: models[{name!r}].capability is not an object")
    for key in ("verdict", "comparisons", "inputs"):
        if obj.get(key) is not None and not isinstance(obj[key], dict):
            raise InputError(f"{source}: '{key}' is not an object")
    return obj


def load_input(item: str | os.PathLike | dict[str, Any], index: int = 0) -> tuple[str, Any, Source]:
    """(kind, parsed result, Source) of a path or an in-memory result dict."""
    if isinstance(item, dict):
        path, obj, label = None, item, f"<result {index + 1}>"
    else:
        path = Path(item)
        label = str(item)
        obj = read_result(path)
    kind = detect_kind(obj, label)
    if kind == SPECTRUM_SCHEMA:
        parsed: Any = SpectrumResult.from_json(obj, source=label)
        prov = parsed.provenance_block or {}
    else:
        parsed = check_safety(obj, label)
        prov = obj.get("provenance") if isinstance(obj.get("provenance"), dict) else {}
    return kind, parsed, Source(label=label, kind=kind, sha256=_sha256(obj, path), provenance=prov)


def _basename(label: str) -> str:
    return Path(str(label).rstrip("/\\")).name or str(label)


def gather(inputs: list, *, title: str | None = None) -> ReportData:
    """Load every input (paths or dicts, spectrum and safety in any order) and join them per tuned model.

    Models are joined by name: a safety model matches a spectrum tuned model when its name, its
    recorded source, or the base names of the two are equal."""
    if not inputs:
        raise InputError("no results given: pass spectrum and/or safety-eval JSON files")
    data = ReportData(title=title or "lora-audit report")
    for i, item in enumerate(inputs):
        kind, parsed, src = load_input(item, i)
        data.sources.append(src)
        (data.spectra if kind == SPECTRUM_SCHEMA else data.safeties).append(parsed)

    by_name: dict[str, ModelSummary] = {}
    aliases: dict[str, ModelSummary] = {}

    def summary_for(name: str, *keys: str) -> ModelSummary:
        for k in (name, *keys):
            if k in by_name:
                return by_name[k]
            if k in aliases:
                return aliases[k]
        s = ModelSummary(name=name)
        by_name[name] = s
        for k in (name, *keys):
            aliases.setdefault(k, s)
        return s

    def fresh(name: str) -> ModelSummary:
        """A new row for a model already filled from another result of the same kind."""
        i = 2
        while f"{name} ({i})" in by_name:
            i += 1
        s = ModelSummary(name=f"{name} ({i})")
        by_name[s.name] = s
        return s

    for run in data.spectra:
        for r in run.results:
            s = summary_for(r.tuned, _basename(r.tuned))
            if s.spectrum is not None:
                s = fresh(r.tuned)
            s.spectrum, s.spectrum_run = r, run
    for run in data.safeties:
        inputs_rec = run.get("inputs") or {}
        base_rec = run["models"].get("base")
        for name, m in run["models"].items():
            if name == "base":
                continue
            source = (inputs_rec.get(name) or {}).get("source") if isinstance(inputs_rec.get(name), dict) else None
            keys = [k for k in (source, source and _basename(source), _basename(name)) if k]
            s = summary_for(name, *keys)
            if s.safety is not None:
                s = fresh(name)
            s.safety, s.safety_base, s.safety_run = m, base_rec, run
            s.verdict = (run.get("verdict") or {}).get(name)
            s.comparison = (run.get("comparisons") or {}).get(name)
    data.models = sorted(by_name.values(), key=ModelSummary.risk_key)
    return data
