"""Reports: spectrum and safety-eval results -> one self-contained HTML file (or Markdown), plus a
CSV export of every table.

    from lora_audit.report import build_report
    build_report(["spectrum.json", "safety.json"], out="reports/run.html", title="My fine-tunes")

The HTML has inline CSS and inline SVG figures, no scripts and no network references: it opens
from disk and can be mailed. Every string that comes from a model, a prompt set or a file name
is escaped by jinja2's autoescape (HTML) or by ``md_escape`` (Markdown).
"""

from __future__ import annotations

import datetime as _dt
import os
import re
from pathlib import Path
from typing import Any, Iterable

from ..errors import InputError
from .model import ModelSummary, ReportData, gather
from .tables import Table, all_tables, ci_text, fmt_value

__all__ = ["build_report", "render", "gather", "write_csvs", "FORMATS"]

FORMATS = ("html", "md")
MAX_LAYER_HEATMAPS = 6  # models with a layer x module heat map
MAX_COS_MODELS = 3  # models with |cos| heat maps ...
MAX_COS_PER_MODEL = 3  # ... of this many worst matrices each
MAX_SV_MODELS = 4
SV_MATRICES = 4
MAX_CURVES = 16
MAX_CATEGORIES = 24
SAMPLES_HARMFUL = 20
SAMPLES_BENIGN = 8
RESPONSE_CHARS = 1500

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def clean(text: Any) -> str:
    """Text safe to put in a page once escaped: control characters (not valid in HTML) shown as U+FFFD."""
    return _CONTROL.sub("\ufffd", "" if text is None else str(text))


def md_escape(text: Any) -> str:
    """A Markdown table cell / inline text: no HTML, no pipes, no line breaks, no emphasis surprises."""
    s = clean(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    s = s.replace("\\", "\\\\").replace("|", "\\|").replace("`", "\\`").replace("*", "\\*").replace("_", "\\_")
    s = s.replace("[", "\\[").replace("]", "\\]")
    return re.sub(r"\s*\n\s*", " ", s)


# ---- content ----------------------------------------------------------------------------
def verdict_line(m: ModelSummary) -> dict[str, Any]:
    """One tuned model's verdict as a label and short phrases (the template escapes them)."""
    parts: list[str] = []
    if m.spectrum is not None:
        run = m.spectrum_run
        parts.append(f"{m.intruders} intruder dimension{'s' if m.intruders != 1 else ''} in {m.matrices} "
                     f"matrices (k={run.k}, ε={run.epsilon:g})")
    if m.safety is not None:
        b = (m.safety_base or {}).get("refusal_rate")
        t = m.safety.get("refusal_rate")
        if t is not None:
            txt = f"refusal {fmt_value(b, 'pct')} → {fmt_value(t, 'pct')}"
            if m.refusal_drop is not None:
                txt += f" (drop {100 * m.refusal_drop:+.1f} pts"
                if m.refusal_drop_ci is not None:
                    lo, hi = m.refusal_drop_ci
                    txt += f", 95% CI [{100 * lo:+.1f}, {100 * hi:+.1f}]"
                txt += f"; tuned {ci_text(m.safety.get('refusal_ci'))} vs base {ci_text((m.safety_base or {}).get('refusal_ci'))})"
            parts.append(txt)
        elif m.safety.get("refusal_rate", 0) is None:
            parts.append("refusal: no scored prompts")
        cap = m.capability_delta
        if cap:
            parts.append("capability " + ", ".join(f"{k} {v:+.3f}" for k, v in cap.items()))
        ob, ot = (m.safety_base or {}).get("over_refusal_rate"), m.safety.get("over_refusal_rate")
        if ob is not None and ot is not None:
            parts.append(f"over-refusal {fmt_value(ob, 'pct')} → {fmt_value(ot, 'pct')}")
    label = m.label or ("spectrum only" if m.safety is None else "no verdict")
    flags = []
    if m.verdict:
        if m.verdict.get("capability_degraded"):
            flags.append("CAPABILITY_DEGRADED")
        if m.verdict.get("over_refusal_increased"):
            flags.append("OVER_REFUSAL_UP")
    css = {"SAFETY_REMOVED": "bad", "SAFETY_DEGRADED": "warn", "RETAINED": "ok"}.get(m.label or "", "neutral")
    return {"name": m.name, "label": label, "flags": flags, "parts": parts, "css": css,
            "reasons": list((m.verdict or {}).get("reasons") or [])}


def _settings_text(settings: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for k, v in (settings or {}).items():
        if k == "inputs" and isinstance(v, dict):  # shown in the models table
            continue
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
                     "tool": f"lora-audit {p.get('tool_version', '?')}", "git": p.get("git_hash") or "–",
                     "created": p.get("created") or "–",
                     "libraries": ", ".join(f"{k} {v}" for k, v in (p.get("libraries") or {}).items()),
                     "settings": _settings_text(p.get("settings") or {})})
    return rows


def model_inputs(data: ReportData) -> list[tuple[str, str, str]]:
    """(role/name, source, fingerprint) of the models the results were computed from, when recorded."""
    out: list[tuple[str, str, str]] = []
    seen = set()
    for run in data.spectra:
        fps = (run.settings or {}).get("inputs") or {}
        if isinstance(fps, dict):
            for name, rec in fps.items():
                if isinstance(rec, dict):
                    key = (name, rec.get("source"), rec.get("fingerprint"))
                    if key not in seen:
                        seen.add(key)
                        out.append((str(name), str(rec.get("source", "")), str(rec.get("fingerprint", ""))))
    for run in data.safeties:
        for name, rec in (run.get("inputs") or {}).items():
            if isinstance(rec, dict):
                key = (name, rec.get("source"), rec.get("fingerprint"))
                if key not in seen:
                    seen.add(key)
                    out.append((str(name), str(rec.get("source", "")), str(rec.get("fingerprint", ""))))
    return out


def _spectrum_figures(data: ReportData) -> dict[str, Any]:
    from . import figures as F

    models = [m for m in data.models if m.spectrum is not None]
    out: dict[str, Any] = {"epsilon": None, "layer_maps": [], "cos_maps": [], "sv": [], "erank": None, "notes": []}
    curves = [(m.name, list(m.spectrum_run.epsilon_sweep), list(m.spectrum.sweep_totals)) for m in models
              if m.spectrum_run.epsilon_sweep and len(m.spectrum.sweep_totals) == len(m.spectrum_run.epsilon_sweep)]
    if curves:
        eps = {m.spectrum_run.epsilon for m in models}
        out["epsilon"] = F.epsilon_curves(curves[:MAX_CURVES], epsilon=eps.pop() if len(eps) == 1 else None)
        if len(curves) > MAX_CURVES:
            out["notes"].append(f"ε curves shown for the {MAX_CURVES} most risky models of {len(curves)}.")
    for m in models[:MAX_LAYER_HEATMAPS]:
        mats = [x for x in m.spectrum.matrices if x.layer is not None]
        if not mats:
            continue
        layers = sorted({x.layer for x in mats})
        modules: list[str] = []
        for x in mats:
            if x.module not in modules:
                modules.append(x.module)
        grid = [[float("nan")] * len(modules) for _ in layers]
        for x in mats:
            r, c = layers.index(x.layer), modules.index(x.module)
            grid[r][c] = (0.0 if grid[r][c] != grid[r][c] else grid[r][c]) + x.intruders
        svg = F.layer_module_heatmap(grid, [str(la) for la in layers], modules, title=F.short_label(m.name, 50))
        width = re.search(r"max-width:(\d+)px", svg)
        out["layer_maps"].append({"model": m.name, "svg": svg, "width": int(width.group(1)) if width else 600})
    if len(models) > MAX_LAYER_HEATMAPS:
        out["notes"].append(f"Layer × module heat maps shown for the {MAX_LAYER_HEATMAPS} most risky models of "
                            f"{len(models)}; every count is in intruders_by_layer.csv / the worst-matrices table.")
    for m in models[:MAX_COS_MODELS]:
        eps = m.spectrum_run.epsilon
        for x in [x for x in m.spectrum.worst_matrices(MAX_COS_PER_MODEL * 3) if x.cos_top_base][:MAX_COS_PER_MODEL]:
            rows = [i for i, c in enumerate(x.max_cos) if c < eps]
            out["cos_maps"].append({"model": m.name, "matrix": x.name, "intruders": x.intruders,
                                    "svg": F.cos_heatmap(x.cos_top_base, title=F.short_label(x.name, 44),
                                                         intruder_rows=rows, epsilon=eps)})
    for m in models[:MAX_SV_MODELS]:
        eps = m.spectrum_run.epsilon
        series = [(x.name, list(x.tuned_singular_values), [c < eps for c in x.max_cos])
                  for x in m.spectrum.worst_matrices(SV_MATRICES) if x.tuned_singular_values]
        if series:
            out["sv"].append({"model": m.name, "svg": F.singular_values(
                series, title=f"top-k singular values of W0+dW, worst matrices of {F.short_label(m.name, 40)}")})
    er_series = []
    for m in models[:MAX_CURVES]:
        per: dict[int, list[float]] = {}
        for x in m.spectrum.matrices:
            if x.layer is not None and x.effective_rank is not None:
                per.setdefault(x.layer, []).append(x.effective_rank)
        if per:
            ls = sorted(per)
            er_series.append((m.name, ls, [sum(per[la]) / len(per[la]) for la in ls]))
    if er_series:
        out["erank"] = F.per_layer_lines(er_series, ylabel="mean effective rank of dW")
    return out


def _safety_figures(data: ReportData) -> dict[str, Any]:
    from . import figures as F
    from .tables import _safety_rows

    rows = _safety_rows(data)
    out: dict[str, Any] = {"rates": None, "categories": None, "over_categories": None}
    pts = [(n, r.get("refusal_rate"), r.get("refusal_ci"), r.get("over_refusal_rate"), r.get("over_refusal_ci"))
           for n, r in rows]
    if any(p[1] is not None or p[3] is not None for p in pts):
        out["rates"] = F.rate_intervals(pts)
    for key, slot, label in (("per_category", "categories", "refusal rate (%)"),
                             ("over_refusal_per_category", "over_categories", "over-refusal rate (%)")):
        cats: list[str] = []
        for _, r in rows:
            for c in (r.get(key) or {}):
                if c not in cats:
                    cats.append(c)
        if not cats:
            continue
        cats = cats[:MAX_CATEGORIES]
        series = []
        for n, r in rows[:MAX_CURVES]:
            pc = r.get(key) or {}
            series.append((n, [(pc.get(c) or {}).get("rate") for c in cats], [(pc.get(c) or {}).get("ci") for c in cats]))
        out[slot] = F.category_bars(cats, series, ylabel=label)
    return out


def _samples(data: ReportData) -> list[dict[str, Any]]:
    from .tables import _safety_rows

    out = []
    for name, r in _safety_rows(data):
        groups = []
        for kind, key, cap in (("harmful", "responses", SAMPLES_HARMFUL), ("benign", "benign_responses", SAMPLES_BENIGN)):
            recs = [x for x in (r.get(key) or []) if isinstance(x, dict)]
            if not recs:
                continue
            # what a reviewer needs first: harmful prompts answered, benign prompts refused
            first = [x for x in recs if x.get("refused") is (kind == "benign")]
            rest = [x for x in recs if x.get("refused") is not (kind == "benign")]
            shown = []
            for x in (first + rest)[:cap]:
                resp = x.get("response")
                text = None if resp is None else clean(resp)
                truncated = text is not None and len(text) > RESPONSE_CHARS
                shown.append({"prompt": clean(x.get("prompt")), "category": clean(x.get("category") or "–"),
                              "response": text[:RESPONSE_CHARS] if text is not None else None,
                              "truncated": truncated, "refused": x.get("refused")})
            groups.append({"kind": kind, "entries": shown, "total": len(recs)})
        if groups:
            out.append({"model": name, "groups": groups})
    return out


def context(data: ReportData) -> dict[str, Any]:
    """Everything the templates need."""
    from .. import __version__
    from ..results import git_hash

    tables = all_tables(data)
    spectrum_settings = []
    for run in data.spectra:
        spectrum_settings.append({"base": run.base, "k": run.k, "epsilon": run.epsilon,
                                  "sweep": ", ".join(f"{e:g}" for e in run.epsilon_sweep),
                                  "warnings": list(run.warnings)})
    safety_settings = []
    for run in data.safeties:
        scorer = run.get("scorer") or {}
        ps = run.get("prompt_sets") or {}
        gen = run.get("generation") or {}
        safety_settings.append({
            "scorer": scorer.get("name", "–"),
            "harmful": (ps.get("harmful") or {}).get("source", "–"),
            "benign": (ps.get("benign") or {}).get("source", "–") if ps.get("benign") else "–",
            "max_new_tokens": gen.get("max_new_tokens", "–"), "greedy": gen.get("greedy", "–"),
            "markers": len(scorer.get("markers") or []),
        })
    warnings = [(run.base, w) for run in data.spectra for w in run.warnings]
    warnings += [(m.name, w) for m in data.models if m.spectrum is not None for w in m.spectrum.warnings]
    return {
        "title": data.title,
        "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "tool_version": __version__, "git_hash": git_hash() or "–",
        "verdicts": [verdict_line(m) for m in data.models],
        "many": len(data.models) > 1,
        "provenance": provenance_rows(data), "model_inputs": model_inputs(data),
        "tables": tables, "has_spectrum": data.has_spectrum, "has_safety": data.has_safety,
        "spectrum_settings": spectrum_settings, "safety_settings": safety_settings,
        "sfig": _spectrum_figures(data) if data.has_spectrum else None,
        "safefig": _safety_figures(data) if data.has_safety else None,
        "samples": _samples(data) if data.has_safety else [],
        "warnings": warnings,
    }


# ---- rendering --------------------------------------------------------------------------
def _env(fmt: str):
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("lora_audit.report", "templates"),
                             autoescape=(fmt == "html"), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["clean"] = clean
    env.filters["md"] = md_escape
    env.filters["fmt"] = fmt_value
    return env


def render(data: ReportData, fmt: str = "html") -> str:
    """The report text in ``fmt`` ("html" or "md")."""
    if fmt not in FORMATS:
        raise InputError(f"unknown report format {fmt!r}; choose one of {', '.join(FORMATS)}")
    ctx = context(data) if fmt == "html" else _md_context(data)
    from markupsafe import Markup

    if fmt == "html":
        # figures are SVG made by matplotlib from escaped text (see figures.to_svg): trusted markup
        for group in ("sfig", "safefig"):
            figs = ctx.get(group)
            if figs:
                for k, v in figs.items():
                    if isinstance(v, str):
                        figs[k] = Markup(v)
                    elif isinstance(v, list):
                        for item in v:
                            if isinstance(item, dict) and "svg" in item:
                                item["svg"] = Markup(item["svg"])
    return _env(fmt).get_template(f"report.{fmt}.j2").render(**ctx)


def _md_context(data: ReportData) -> dict[str, Any]:
    from .. import __version__
    from ..results import git_hash

    return {"title": data.title, "generated": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "tool_version": __version__, "git_hash": git_hash() or "–",
            "verdicts": [verdict_line(m) for m in data.models], "provenance": provenance_rows(data),
            "model_inputs": model_inputs(data), "tables": all_tables(data)}


def write_csvs(tables: dict[str, Table], folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write every table as <key>.csv into the new folder ``folder`` (atomically; an earlier
    lora-audit tables folder is replaced only with ``overwrite``)."""
    from ..io import atomic_dir

    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{folder} exists and is not a folder")
    with atomic_dir(folder, overwrite=overwrite, what="report tables") as tmp:
        for key, t in tables.items():
            t.df.to_csv(tmp / f"{key}.csv", index=False)
    return folder


def default_csv_dir(out: Path) -> Path:
    return out.with_name(out.stem + "-tables")


def build_report(inputs: Iterable[Any] | None = None, safety: Iterable[Any] | None = None, out: str | os.PathLike | None = None,
                 title: str | None = None, fmt: str = "html", csv_dir: str | os.PathLike | None | bool = None,
                 overwrite: bool = False) -> str | Path:
    """Render results into a report.

    ``inputs``: spectrum and/or safety results (JSON paths or dicts; the kind is detected, so
    ``safety`` is only a convenience for passing them separately). ``out``: file to write
    atomically (returns its path); None returns the text. ``csv_dir``: where to export every
    table as CSV (default ``<out stem>-tables/`` next to ``out``; False for none).
    """
    items = list(inputs or []) + list(safety or [])
    data = gather(items, title=title)
    text = render(data, fmt)
    if out is None:
        if csv_dir:
            write_csvs(all_tables(data), csv_dir, overwrite=overwrite)
        return text
    from ..io import atomic_write_text

    out = Path(out)
    if csv_dir is None:
        csv_dir = default_csv_dir(out)
    if csv_dir:
        write_csvs(all_tables(data), csv_dir, overwrite=overwrite)
    atomic_write_text(out, text)
    return out
