"""The template contexts: everything the HTML and Markdown templates show, as plain values.

Names and texts stay raw here; the templates escape them (``text.clean`` and jinja2's autoescape
for HTML, ``text.md_escape`` for Markdown)."""

from __future__ import annotations

import datetime as _dt
from typing import Any

from .. import __version__
from ..results import git_hash
from . import sections
from .model import ModelSummary, ReportData
from .tables import Table, ci_text, fmt_value


def _refusal_part(m: ModelSummary) -> str | None:
    b, t = m.safety_base, m.safety
    if t.refusal_rate is None:
        return "refusal: no scored prompts"
    txt = f"refusal {fmt_value(b.refusal_rate, 'pct')} → {fmt_value(t.refusal_rate, 'pct')}"
    if m.refusal_drop is not None:
        txt += f" (drop {100 * m.refusal_drop:+.1f} pts"
        if m.refusal_drop_ci is not None:
            lo, hi = m.refusal_drop_ci
            txt += f", 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        txt += f"; tuned {ci_text(t.refusal_ci)} vs base {ci_text(b.refusal_ci)})"
    return txt


def verdict_line(m: ModelSummary) -> dict[str, Any]:
    """One tuned model's verdict as a label and short phrases (the template escapes them)."""
    parts: list[str] = []
    if m.spectrum is not None:
        run = m.spectrum_run
        parts.append(f"{m.intruders} intruder dimension{'s' if m.intruders != 1 else ''} in {m.matrices} "
                     f"matrices (k={run.k}, ε={run.epsilon:g})")
    if m.safety is not None:
        parts.append(_refusal_part(m))
        if m.capability_delta:
            parts.append("capability " + ", ".join(f"{k} {v:+.3f}" for k, v in m.capability_delta.items()))
        ob, ot = m.safety_base.over_refusal_rate, m.safety.over_refusal_rate
        if ob is not None and ot is not None:
            parts.append(f"over-refusal {fmt_value(ob, 'pct')} → {fmt_value(ot, 'pct')}")
    if m.scan is not None:
        parts.append(f"safety-scan {m.scan.verdict_line}")
    label = m.label or (m.scan.verdict if m.scan is not None and m.safety is None else
                        "spectrum only" if m.safety is None else "no verdict")
    flags = []
    if m.verdict is not None:
        flags += ["CAPABILITY_DEGRADED"] if m.verdict.capability_degraded else []
        flags += ["OVER_REFUSAL_UP"] if m.verdict.over_refusal_increased else []
    css = {"SAFETY_REMOVED": "bad", "SAFETY_DEGRADED": "warn", "RETAINED": "ok"}.get(m.label or "", "neutral")
    return {"name": m.name, "label": label, "flags": flags, "parts": parts, "css": css,
            "reasons": list(m.verdict.reasons) if m.verdict else []}


def _settings_text(settings: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k, v in (settings or {}).items():
        if k == "inputs" and isinstance(v, dict):  # shown in the models table
            continue
        if k == "hub" and isinstance(v, dict):  # hub references and the commit each was pinned to
            v = ", ".join(f"{ref} = commit {rec.get('commit')}" if isinstance(rec, dict) else f"{ref} = {rec}"
                          for ref, rec in v.items())
        if isinstance(v, (list, tuple)):
            v = ", ".join(str(x) for x in v)
        elif isinstance(v, dict):
            v = ", ".join(f"{a}={b}" for a, b in v.items())
        out.append((str(k), str(v)))
    return out


def provenance_rows(data: ReportData) -> list[dict[str, Any]]:
    rows = []
    for s in data.sources:
        p = s.provenance or {}
        rows.append({"input": s.label, "kind": s.kind, "sha256": s.sha256,
                     "tool": f"lora-audit {p.get('tool_version') or '?'}", "git": p.get("git_hash") or "–",
                     "created": p.get("created") or "–",
                     "libraries": ", ".join(f"{k} {v}" for k, v in (p.get("libraries") or {}).items()),
                     "settings": _settings_text(p.get("settings") or {})})
    return rows


def model_inputs(data: ReportData) -> list[tuple[str, str, str]]:
    """(role/name, source, fingerprint) of the models the results were computed from, when recorded."""
    found: list[tuple[str, str, str]] = []
    for run in data.spectra:
        recorded = run.settings.get("inputs")
        for name, rec in (recorded.items() if isinstance(recorded, dict) else ()):
            if isinstance(rec, dict):
                found.append((str(name), str(rec.get("source", "")), str(rec.get("fingerprint", ""))))
    for run in data.safeties:
        found += [(name, rec.source, rec.fingerprint or "") for name, rec in run.inputs.items()]
    return list(dict.fromkeys(found))


def _common(data: ReportData, tables: dict[str, Table]) -> dict[str, Any]:
    return {"title": data.title, "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tool_version": __version__, "git_hash": git_hash() or "–",
            "verdicts": [verdict_line(m) for m in data.models], "provenance": provenance_rows(data),
            "model_inputs": model_inputs(data), "tables": tables}


def html_context(data: ReportData, tables: dict[str, Table]) -> dict[str, Any]:
    """Everything the HTML template needs (figures as SVG strings, made by ``sections``)."""
    spectrum_settings = [{"base": run.base, "k": run.k, "epsilon": run.epsilon,
                          "sweep": ", ".join(f"{e:g}" for e in run.epsilon_sweep), "warnings": list(run.warnings)}
                         for run in data.spectra]
    safety_settings = [{"scorer": run.scorer.name, "harmful": run.prompt_sets.harmful.source if run.prompt_sets else "–",
                        "benign": run.prompt_sets.benign.source if run.prompt_sets and run.prompt_sets.benign else "–",
                        "max_new_tokens": run.generation.max_new_tokens, "greedy": run.generation.greedy,
                        "markers": len(run.scorer.markers)} for run in data.safeties]
    warnings = [(run.base, w) for run in data.spectra for w in run.warnings]
    warnings += [(m.name, w) for m in data.models if m.spectrum is not None for w in m.spectrum.warnings]
    gates = [{"expression": g.expression, "tripped": g.tripped, "lines": g.lines()}
             for g in (run.gate for run in [*data.spectra, *data.safeties]) if g is not None]
    return {
        **_common(data, tables),
        "many": len(data.models) > 1,
        "has_spectrum": data.has_spectrum, "has_safety": data.has_safety,
        "studies": sections.study_sections(data),
        "spectrum_settings": spectrum_settings, "safety_settings": safety_settings,
        "sfig": sections.spectrum_figures(data) if data.has_spectrum else None,
        "safefig": sections.safety_figures(data) if data.has_safety else None,
        "samples": sections.samples(data) if data.has_safety else [],
        "has_scan": data.has_scan, "scan_settings": [scan_settings(run) for run in data.scans],
        "scanfig": sections.scan_figures(data) if data.has_scan else None,
        "warnings": warnings,
        "gates": gates,
    }


def md_context(data: ReportData, tables: dict[str, Table]) -> dict[str, Any]:
    """Everything the Markdown template needs (tables only, no figures)."""
    return {**_common(data, tables), "has_scan": data.has_scan,
            "scan_settings": [scan_settings(run) for run in data.scans]}


def scan_settings(run) -> dict[str, Any]:
    """What a safety-scan result's direction and risk model were, in words for the page."""
    d = run.direction
    c = d.causal if d else None
    if c is not None and c.causal and c.chosen is not None:
        causal = (f"Causal at layer {c.layer}: ablating it takes the held-out harmful prompts refused from "
                  f"{c.base_refusal:.0%} to {c.chosen.ablation_refusal:.0%}, adding it takes the harmless ones from "
                  f"{c.base_refusal_harmless:.0%} to {c.chosen.actadd_refusal:.0%} (KL {c.chosen.kl:.3f}).")
    elif c is None:
        causal = "This result has no causal test of the direction (written by an older lora-audit)."
    else:
        causal = ("The direction is NOT causal for this base (no candidate passed the ablation, addition and KL "
                  "tests): no refusal edits are counted and no signal along it is shown.")
    st = run.risk_status
    if st.validated and st.base_matches:
        risk = "Risk from a risk model validated on this base's panel."
    elif st.validated:
        risk = "Risk from a risk model validated on another base's panel: not validated for this base."
    else:
        risk = "No risk shown: " + ("; ".join(st.problems) or "no validated risk model") + "."
    return {"base": run.base, "layers": d.n_layers if d else None,
            "harmful": d.prompts["harmful"].n if d and "harmful" in d.prompts else None,
            "harmless": d.prompts["harmless"].n if d and "harmless" in d.prompts else None,
            "base_refusal": d.base_first_token_refusal if d else None, "causal": causal, "risk": risk,
            "weights_only": bool(run.settings.get("weights_only")), "warnings": list(run.warnings)}
