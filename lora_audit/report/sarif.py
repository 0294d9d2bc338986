"""SARIF 2.1.0 (OASIS Static Analysis Results Interchange Format) output of audit results, for
code-scanning UIs (GitHub code scanning, Azure DevOps, any SARIF viewer).

    log = sarif_log(spectrum=spectrum_result, safety=safety_result, exit_code=3)
    write_sarif("lora-audit.sarif", log)

One run of the driver "lora-audit", whose rules are ``results.findings.RULES`` (stable ids, so a
viewer tracks a finding across runs). The results, each with a level (error / warning / note), a
message, the file it concerns (``physicalLocation``: an adapter's adapter_model.safetensors, a model
folder's model.safetensors, or the file given) and the matrices or modules as logical locations:

- LA001 per matrix with intruder dimensions (warning);
- LA010 per tuned model whose verdict is not RETAINED (SAFETY_REMOVED error, SAFETY_DEGRADED
  warning, INCONCLUSIVE note), LA011 / LA012 for the capability and over-refusal flags;
- LA020-LA028 the structural findings of each tuned model, as found;
- LA030 per matrix left out of the audit for NaN/Inf values or an overflowing update.

File locations are relative URIs when the path is relative or inside the current folder (what
code scanning expects: paths from the repository root), ``file://`` URIs otherwise. The run's
``properties`` carry the --fail-on outcome; ``invocations`` the exit status.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from pathlib import Path
from typing import Any, Iterable

from .. import __version__
from ..results.findings import RULES, Finding
from ..results.spectrum import split_name
from ..text import printable

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
VERDICT_LEVEL = {"SAFETY_REMOVED": "error", "SAFETY_DEGRADED": "warning", "INCONCLUSIVE": "note"}
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
MAX_LOGICAL = 50  # logical locations listed per result


def weights_file(path: str) -> str:
    """The file a finding about the input ``path`` points at: a folder's weight file (adapter,
    single file, or shard index), else ``path`` itself."""
    p = Path(path)
    if p.is_dir():
        for name in WEIGHT_FILES:
            if (p / name).is_file():
                return str(p / name)
    return path


def artifact_uri(path: str) -> str:
    """A relative URI for a relative path or one inside the current folder, else a file URI."""
    p = Path(path)
    if p.is_absolute():
        try:
            p = p.relative_to(Path.cwd())
        except ValueError:
            return p.as_uri()
    return urllib.parse.quote(p.as_posix(), safe="/")


def spectrum_findings(result) -> list[tuple[str, Finding]]:
    """(tuned model, finding) for intruders (LA001), structural findings and skipped matrices (LA030)."""
    out = []
    for r in result.results:
        where = weights_file(r.tuned)
        for m in r.matrices:
            if m.intruders > 0:
                noun = "dimension" if m.intruders == 1 else "dimensions"
                out.append((r.tuned, Finding(
                    "LA001", "warning", f"{m.intruders} intruder {noun} in {printable(m.name)} (lowest max|cos| "
                    f"{m.min_cos:.3f} < epsilon {result.epsilon:g}; k={result.k})", where,
                    {"modules": [m.name], "intruders": m.intruders, "min_max_cos": m.min_cos,
                     "epsilon": result.epsilon, "k": result.k})))
        out += [(r.tuned, f) for f in r.findings]
        for s in r.skipped:
            if s.unmeasured:
                out.append((r.tuned, Finding(
                    "LA030", "warning", f"{printable(s.name)} left out of the audit: {printable(s.reason)}", where,
                    {"modules": [s.name], "where": s.where, "reason": s.reason,
                     "nonfinite_values": s.nonfinite_values})))
    return out


def safety_findings(result) -> list[tuple[str, Finding]]:
    """(tuned model, finding) for verdicts other than RETAINED (LA010) and the verdict's flags."""
    out = []
    for name, v in result.verdict.items():
        src = result.inputs[name].source if name in result.inputs else name
        where = weights_file(src)
        if v.label in VERDICT_LEVEL:
            out.append((name, Finding("LA010", VERDICT_LEVEL[v.label], f"{v.label}: " + "; ".join(
                printable(x) for x in v.reasons), where, {"label": v.label, "refusal_drop": v.refusal_drop})))
        if v.capability_degraded:
            tasks = ", ".join(map(printable, v.capability_degraded_tasks)) or "lm-eval tasks"
            out.append((name, Finding("LA011", "warning", f"capability degraded on {tasks}", where,
                                      {"tasks": list(v.capability_degraded_tasks)})))
        if v.over_refusal_increased:
            out.append((name, Finding("LA012", "note", "over-refusal on benign prompts increased", where)))
    return out


def _result(model: str, f: Finding, rule_index: dict[str, int]) -> dict[str, Any]:
    location: dict[str, Any] = {}
    if f.file:
        location["physicalLocation"] = {"artifactLocation": {"uri": artifact_uri(f.file)}}
    modules = [str(m) for m in (f.detail.get("modules") or [])][:MAX_LOGICAL]
    if modules:
        location["logicalLocations"] = [{"fullyQualifiedName": m, "name": split_name(m)[0], "kind": "variable"}
                                        for m in dict.fromkeys(modules)]
    key = "\0".join([f.rule, model, f.file or "", *modules, f.message if not modules else ""])
    out: dict[str, Any] = {"ruleId": f.rule, "level": f.level, "message": {"text": f.message}}
    if f.rule in rule_index:
        out["ruleIndex"] = rule_index[f.rule]
    if location:
        out["locations"] = [location]
    out["partialFingerprints"] = {"loraAuditFinding/v1": hashlib.sha256(key.encode()).hexdigest()[:32]}
    out["properties"] = {"tuned": model, "detail": f.detail}
    return out


def _rules() -> list[dict[str, Any]]:
    return [{"id": r.id, "name": r.name, "shortDescription": {"text": r.short}, "fullDescription": {"text": r.help},
             "help": {"text": r.help}, "defaultConfiguration": {"level": r.level}} for r in RULES.values()]


def sarif_log(*, spectrum=None, safety=None, exit_code: int | None = None,
              extra: Iterable[tuple[str, Finding]] = ()) -> dict[str, Any]:
    """The SARIF log (a JSON object) of a spectrum and/or safety result, plus ``extra`` findings
    (other result kinds, e.g. the screen's); ``exit_code`` goes into the run's invocation."""
    findings = list(spectrum_findings(spectrum) if spectrum is not None else [])
    findings += safety_findings(safety) if safety is not None else []
    findings += list(extra)
    rule_index = {rid: i for i, rid in enumerate(RULES)}
    gates = [r.gate.to_json() for r in (spectrum, safety) if r is not None and r.gate is not None]
    run: dict[str, Any] = {
        "tool": {"driver": {"name": "lora-audit", "version": __version__, "semanticVersion": __version__,
                            "rules": _rules()}},
        "results": [_result(model, f, rule_index) for model, f in findings],
    }
    if exit_code is not None:
        run["invocations"] = [{"executionSuccessful": True, "exitCode": int(exit_code)}]
    if gates:
        run["properties"] = {"gate": gates}
    pinned = {ref: rec for r in (spectrum, safety) if r is not None for ref, rec in _hub_commits(r).items()}
    if pinned:  # the hub commit each model reference was pinned to: which weights these findings are about
        run.setdefault("properties", {})["hub"] = pinned
    return {"$schema": SARIF_SCHEMA, "version": SARIF_VERSION, "runs": [run]}


def _hub_commits(result) -> dict[str, Any]:
    settings = getattr(result, "settings", None) or (getattr(result, "provenance_block", None) or {}).get("settings")
    hub = (settings or {}).get("hub")
    return hub if isinstance(hub, dict) else {}


def write_sarif(path: str | os.PathLike, log: dict[str, Any]) -> Path:
    """Write a SARIF log atomically (``lora_audit.io``); lora-audit may replace it on a later run."""
    from ..io import atomic_write_json

    return atomic_write_json(path, log)
