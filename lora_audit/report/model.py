"""What a report shows, gathered from results: spectrum, safety and safety-scan results, and one
summary per tuned model joining them (the report's rows, sorted by risk).

Reads only the typed results of ``lora_audit.results`` (validated against their schema when
loaded); never models or torch.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import json_text
from ..results import load_result, read_result
from ..results.safety import VERDICT_RANK, Comparison, ModelSafety, SafetyResult, Verdict
from ..results.scan import ModelScan, SafetyScanResult
from ..results.spectrum import SpectrumResult, TunedResult
from ..results.study import StudyResult
from ..stats import newcombe_interval


@dataclass
class Source:
    """One input of the report: where it came from and a content hash of it."""

    label: str  # file path as given, or "<result N>" for in-memory results
    kind: str  # the result's schema name: "spectrum" | "safety" | "study" | "safety-scan"
    sha256: str
    provenance: dict[str, Any]


@dataclass
class ModelSummary:
    """One tuned model's numbers from every input that mentions it."""

    name: str
    spectrum: TunedResult | None = None
    spectrum_run: SpectrumResult | None = None
    safety: ModelSafety | None = None  # models[name] of the safety result
    safety_base: ModelSafety | None = None  # models["base"] of the same result
    verdict: Verdict | None = None
    comparison: Comparison | None = None
    safety_run: SafetyResult | None = None
    scan: ModelScan | None = None  # models[name] of a safety-scan result
    scan_run: SafetyScanResult | None = None

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
        return None if self.verdict is None else self.verdict.label

    @property
    def refusal_drop(self) -> float | None:
        if self.verdict is not None and self.verdict.refusal_drop is not None:
            return self.verdict.refusal_drop
        b = self.safety_base.refusal_rate if self.safety_base else None
        t = self.safety.refusal_rate if self.safety else None
        return None if b is None or t is None else b - t

    @property
    def refusal_drop_ci(self) -> tuple[float, float] | None:
        """95 % interval of (base rate - tuned rate) from the two Wilson intervals (Newcombe 1998,
        method 10); the runs share their prompts, for which this interval is conservative when the
        two models' refusals are positively correlated."""
        if self.safety is None or self.safety_base is None:
            return None
        b, t = self.safety_base, self.safety
        return newcombe_interval(b.refusal_rate, b.refusal_ci, t.refusal_rate, t.refusal_ci)

    @property
    def capability_delta(self) -> dict[str, float]:
        if self.comparison is not None:
            return dict(self.comparison.capability_delta)
        base = self.safety_base.capability if self.safety_base else {}
        tuned = self.safety.capability if self.safety else {}
        return {k: tuned[k] - v for k, v in base.items() if v is not None and tuned.get(k) is not None}

    def risk_key(self) -> tuple:
        """Sort key, most risky first: verdict, then refusal drop, then intruders per matrix."""
        return (-VERDICT_RANK.get(self.label or "", -1),
                -(self.refusal_drop if self.refusal_drop is not None else -2.0),
                -(self.intruders_per_matrix if self.intruders_per_matrix is not None else -1.0),
                self.name)


@dataclass
class ReportData:
    title: str
    spectra: list[SpectrumResult] = field(default_factory=list)
    safeties: list[SafetyResult] = field(default_factory=list)
    studies: list[StudyResult] = field(default_factory=list)
    scans: list[SafetyScanResult] = field(default_factory=list)
    sources: list[Source] = field(default_factory=list)
    models: list[ModelSummary] = field(default_factory=list)  # sorted by risk

    @property
    def has_spectrum(self) -> bool:
        return any(s.results for s in self.spectra)

    @property
    def has_safety(self) -> bool:
        return bool(self.safeties)

    @property
    def has_scan(self) -> bool:
        return any(s.models for s in self.scans)


# ---- loading ----------------------------------------------------------------------------
# the result kinds a report renders (a screen summary has its own report)
REPORTED = (SpectrumResult, SafetyResult, StudyResult, SafetyScanResult)


def load_input(item: str | os.PathLike | dict[str, Any] | SpectrumResult | SafetyResult | StudyResult | SafetyScanResult,
               index: int = 0, label: str | None = None) -> tuple[Any, Source]:
    """(typed result, Source) of a JSON path, a JSON dict or a typed result; validated. ``label``:
    how the report names the input (default: the path as given, or "<result N>")."""
    if isinstance(item, REPORTED):
        result, raw = item, json_text(item.to_json()).encode()
    elif isinstance(item, dict):
        result, raw = load_result(item, label or f"<result {index + 1}>"), json_text(item).encode()
    else:
        result = load_result(read_result(item), str(item))
        raw = Path(item).read_bytes()
    label = label or (str(item) if isinstance(item, (str, os.PathLike)) else f"<result {index + 1}>")
    prov = result.provenance_block or {}
    sha = "sha256:" + hashlib.sha256(raw).hexdigest()[:16]
    return result, Source(label=label, kind=result.SCHEMA, sha256=sha, provenance=prov)


def _basename(label: str) -> str:
    return Path(str(label).rstrip("/\\")).name or str(label)


class _Rows:
    """Report rows by model name; a name may also be reached through aliases (its source path,
    the path's base name), so a spectrum entry and a safety entry of one model meet in one row."""

    def __init__(self):
        self.by_name: dict[str, ModelSummary] = {}
        self.aliases: dict[str, ModelSummary] = {}

    def row(self, name: str, *keys: str, filled: str) -> ModelSummary:
        """The row for ``name`` (found by name or alias, else new); a fresh row ``name (2)`` when
        that row's ``filled`` part already came from another result of the same kind."""
        for k in (name, *keys):
            s = self.by_name.get(k) or self.aliases.get(k)
            if s is not None:
                break
        else:
            s = self._new(name)
            for k in (name, *keys):
                self.aliases.setdefault(k, s)
        if getattr(s, filled) is not None:
            i = 2
            while f"{name} ({i})" in self.by_name:
                i += 1
            s = self._new(f"{name} ({i})")
        return s

    def _new(self, name: str) -> ModelSummary:
        s = ModelSummary(name=name)
        self.by_name[name] = s
        return s


def gather(inputs: list, *, title: str | None = None, labels: list[str] | None = None) -> ReportData:
    """Load every input (paths, dicts or typed results; spectrum, safety, safety-scan and study
    results in any order) and join the first three per tuned model: a safety or scan model matches
    a spectrum tuned model when its name, its recorded source, or the base names of the two are
    equal. Study results are kept as they are. ``labels``: how to name the inputs."""
    if not inputs:
        raise InputError("no results given: pass spectrum and/or safety-eval JSON files")
    data = ReportData(title=title or "lora-audit report")
    for i, item in enumerate(inputs):
        result, src = load_input(item, i, labels[i] if labels else None)
        if not isinstance(result, REPORTED):
            raise InputError(f"{src.label}: a {result.SCHEMA} result; 'lora-audit {result.WRITTEN_BY}' writes its "
                             "own report (report.html next to it). Pass spectrum, safety-eval, safety-scan and "
                             "study JSON files here")
        data.sources.append(src)
        kinds = {SpectrumResult: data.spectra, SafetyResult: data.safeties, StudyResult: data.studies,
                 SafetyScanResult: data.scans}
        kinds[type(result)].append(result)
    rows = _Rows()
    for run in data.spectra:
        for r in run.results:
            s = rows.row(r.tuned, _basename(r.tuned), filled="spectrum")
            s.spectrum, s.spectrum_run = r, run
    for run in data.safeties:
        for name in run.tuned_names:
            rec = run.inputs.get(name)
            keys = [k for k in (rec and rec.source, rec and _basename(rec.source), _basename(name)) if k]
            s = rows.row(name, *keys, filled="safety")
            s.safety, s.safety_base, s.safety_run = run.models[name], run.models["base"], run
            s.verdict, s.comparison = run.verdict.get(name), run.comparisons.get(name)
    for run in data.scans:
        for name, m in run.models.items():
            keys = [k for k in (m.source, _basename(m.source), _basename(name)) if k]
            s = rows.row(name, *keys, filled="scan")
            s.scan, s.scan_run = m, run
    data.models = sorted(rows.by_name.values(), key=ModelSummary.risk_key)
    return data
