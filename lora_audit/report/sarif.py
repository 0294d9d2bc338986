"""SARIF 2.1.0 (OASIS Static Analysis Results Interchange Format) output of audit results, for
code-scanning UIs (GitHub code scanning, Azure DevOps, any SARIF viewer).

    log = sarif_log(spectrum=spectrum_result, safety=safety_result, exit_code=3)
    write_sarif("lora-audit.sarif", log)

Every command that can gate writes it (``--sarif``): spectrum, screen, safety-eval, safety-scan, audit.

One run of the driver "lora-audit", whose rules are ``results.findings.RULES`` (stable ids, so a
viewer tracks a finding across runs). The results, each with a level (error / warning / note), a
message, the file it concerns (``physicalLocation``: an adapter's adapter_model.safetensors, a model
folder's model.safetensors, or the file given) and the matrices or modules as logical locations:

- LA001 per matrix with intruder dimensions (warning); in a screen, LA002 per adapter instead
  (its matrices with intruders as logical locations), so thousands of adapters stay readable;
- LA010 per tuned model whose verdict is not RETAINED (SAFETY_REMOVED error, SAFETY_DEGRADED
  warning, INCONCLUSIVE note), LA011 / LA012 for the capability and over-refusal flags;
- LA013 per tuned model safety-scan predicts lost its safety training, LA014 where a validated risk
  model could not tell (``SCAN_VERDICTS``; no risk model validated: neither), LA040 per scanned
  model with refusal edits (error when an edit removes BASE's refusal direction, warning when edits
  only add to it; the flagged matrices as logical locations), then the scan's own findings about
  each model, as found;
- LA020-LA028 the structural findings of each tuned model, as found;
- LA030 per matrix left out of the audit for NaN/Inf values or an overflowing update; LA031 per
  screened adapter that could not be audited.

File locations are relative URIs when the path is relative or inside the current folder (what
code scanning expects: paths from the repository root), ``file://`` URIs otherwise. The run's
``properties`` carry the --fail-on outcome; ``invocations`` the exit status.
"""

from __future__ import annotations

import hashlib
import os
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .. import __version__
from ..results.findings import RULES, Finding
from ..results.spectrum import split_name
from ..text import printable

SARIF_VERSION = "2.1.0"
SARIF_SCHEMA = "https://docs.oasis-open.org/sarif/sarif/v2.1.0/errata01/os/schemas/sarif-schema-2.1.0.json"
VERDICT_LEVEL = {"SAFETY_REMOVED": "error", "SAFETY_DEGRADED": "warning", "INCONCLUSIVE": "note"}
WEIGHT_FILES = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
MAX_LOGICAL = 50  # logical locations listed per result
# safety-scan verdict -> (rule, level) of the finding it gives (other verdicts give none)
SCAN_VERDICTS = {"PREDICTED_SAFETY_LOSS": ("LA013", "warning"), "UNKNOWN": ("LA014", "note")}


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


def _noun(n: int) -> str:
    return "dimension" if n == 1 else "dimensions"


def tuned_findings(r, *, epsilon: float, k: int, per_matrix: bool = True, path: str | None = None) -> list[Finding]:
    """The findings of one tuned model's spectrum (a ``TunedResult``): intruders (LA001 per matrix, or
    with ``per_matrix=False`` one LA002 for the whole adapter), its structural findings and the
    matrices left out (LA030). ``path``: where the model's files are (default: ``r.tuned``)."""
    where = weights_file(path or r.tuned)
    out = []
    hit = [m for m in r.matrices if m.intruders > 0]  # in stream order
    if per_matrix:
        for m in hit:
            out.append(Finding("LA001", "warning", f"{m.intruders} intruder {_noun(m.intruders)} in {printable(m.name)} "
                               f"(lowest max|cos| {m.min_cos:.3f} < epsilon {epsilon:g}; k={k})", where,
                               {"modules": [m.name], "intruders": m.intruders, "min_max_cos": m.min_cos,
                                "epsilon": epsilon, "k": k}))
    elif hit:
        hit.sort(key=lambda m: -m.intruders)  # most first (stable: stream order among ties)
        total = sum(m.intruders for m in hit)
        low = min(m.min_cos for m in hit)
        out.append(Finding("LA002", "warning", f"{total} intruder {_noun(total)} in {len(hit)} of {len(r.matrices)} "
                           f"matrices, most in {printable(hit[0].name)} ({hit[0].intruders}); lowest max|cos| "
                           f"{low:.3f} < epsilon {epsilon:g}; k={k}", where,
                           {"modules": [m.name for m in hit[:MAX_LOGICAL]], "intruders": total,
                            "intruder_matrices": len(hit), "matrices": len(r.matrices), "min_max_cos": low,
                            "epsilon": epsilon, "k": k}))
    out += list(r.findings)
    for s in r.skipped:
        if s.unmeasured:
            out.append(Finding("LA030", "warning", f"{printable(s.name)} left out of the audit: {printable(s.reason)}",
                               where, {"modules": [s.name], "where": s.where, "reason": s.reason,
                                       "nonfinite_values": s.nonfinite_values}))
    return out


def spectrum_findings(result) -> list[tuple[str, Finding]]:
    """(tuned model, finding) for intruders (LA001), structural findings and skipped matrices (LA030)."""
    return [(r.tuned, f) for r in result.results for f in tuned_findings(r, epsilon=result.epsilon, k=result.k)]


def scan_findings(result) -> list[tuple[str, Finding]]:
    """(tuned model, finding) of a safety-scan: its verdict (``SCAN_VERDICTS``; UNKNOWN only where a
    validated risk model was in use), its refusal edits (LA040), then the findings the scan recorded
    about the model (``ModelScan.findings``), as found."""
    out = []
    for name, m in result.models.items():
        where = weights_file(m.source or name)
        if m.verdict in SCAN_VERDICTS and (m.verdict != "UNKNOWN" or m.risk_model is not None):
            rule, level = SCAN_VERDICTS[m.verdict]
            text = printable(m.verdict_line or m.verdict)
            if m.verdict == "UNKNOWN" and m.warnings:
                text += ": " + "; ".join(printable(w) for w in m.warnings)
            out.append((name, Finding(rule, level, text, where,
                                      {"verdict": m.verdict, "risk": m.risk, "risk_model": m.risk_model})))
        if m.refusal_edits:
            level = "error" if m.refusal_edits_removing else "warning"
            what = ("removing it (abliteration-like)" if m.refusal_edits_removing
                    else "adding to it (toward over-refusal)")
            out.append((name, Finding(
                "LA040", level, f"{m.refusal_edits} of {m.stream_matrices_changed} changed matrices writing into the "
                f"residual stream are edited along the base's refusal direction, {what}", where,
                {"modules": [e["name"] for e in m.refusal_edit_matrices], "refusal_edits": m.refusal_edits,
                 "removing": m.refusal_edits_removing, "adding": m.refusal_edits_adding,
                 "matrices": m.refusal_edit_matrices})))
        out += [(name, f) for f in m.findings]
    return out


def screen_findings(result, found: dict[str, list[Finding]]) -> list[tuple[str, Finding]]:
    """(adapter, finding) of a screen (a ``ScreenResult``) in rank order: the findings of each audited
    adapter's record (``found``: adapter -> ``tuned_findings(..., per_matrix=False)``, collected
    while the screen read its store) and LA031 for each adapter that could not be audited."""
    out = []
    for row in result.adapters:
        if row.status == "ok":
            out += [(row.adapter, f) for f in found.get(row.adapter, [])]
        else:
            out.append((row.adapter, Finding("LA031", "warning", f"{printable(row.name)} was not audited: "
                                              f"{printable(row.error)}", weights_file(row.adapter),
                                              {"error": row.error, "record": row.record})))
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


def sarif_log(*, spectrum=None, safety=None, scan=None, screen=None, exit_code: int | None = None,
              extra: Iterable[tuple[str, Finding]] = ()) -> dict[str, Any]:
    """The SARIF log (a JSON object) of the results given (spectrum, safety, safety-scan), plus
    ``extra`` findings (a screen's: ``screen_findings``; ``screen`` itself gives only its gate);
    ``exit_code`` goes into the run's invocation, each result's --fail-on outcome into its properties."""
    findings = list(spectrum_findings(spectrum) if spectrum is not None else [])
    findings += safety_findings(safety) if safety is not None else []
    findings += scan_findings(scan) if scan is not None else []
    findings += list(extra)
    rule_index = {rid: i for i, rid in enumerate(RULES)}
    gates = [r.gate.to_json() for r in (spectrum, safety, scan, screen) if r is not None and r.gate is not None]
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
