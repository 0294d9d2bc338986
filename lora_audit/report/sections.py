"""Which figures and samples a report shows, chosen from the gathered results (the drawing itself
is ``figures``): the spectrum section's curves and heat maps for the most risky models, the
safety section's interval plots, the safety-scan section's per-layer overlap and risk against
measured refusal, and the response samples a reviewer needs first."""

from __future__ import annotations

import re
from typing import Any

from .model import ModelSummary, ReportData
from .tables import safety_rows
from .text import clean

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


def spectrum_figures(data: ReportData) -> dict[str, Any]:
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
    loud = [m for m in models if m.intruders]  # models with no intruder get one sentence, no maps
    out["quiet"] = [quiet_sentence(m) for m in models if not m.intruders]
    for m in loud[:MAX_LAYER_HEATMAPS]:
        svg = _layer_map(m)
        if svg:
            width = re.search(r"max-width:(\d+)px", svg)
            out["layer_maps"].append({"model": m.name, "svg": svg, "width": int(width.group(1)) if width else 600})
    if len(loud) > MAX_LAYER_HEATMAPS:
        out["notes"].append(f"Layer × module heat maps shown for the {MAX_LAYER_HEATMAPS} most risky models of "
                            f"{len(loud)} with intruders ({len(models)} audited); every count is in "
                            "intruders_by_layer.csv / the worst-matrices table.")
    for m in loud[:MAX_COS_MODELS]:
        eps = m.spectrum_run.epsilon
        for x in [x for x in m.spectrum.worst_matrices(MAX_COS_PER_MODEL * 3) if x.cos_top_base][:MAX_COS_PER_MODEL]:
            rows = [i for i, c in enumerate(x.max_cos) if c < eps]
            out["cos_maps"].append({"model": m.name, "matrix": x.name, "intruders": x.intruders,
                                    "svg": F.cos_heatmap(x.cos_top_base, title=F.short_label(x.name, 44),
                                                         intruder_rows=rows, epsilon=eps)})
    for m in loud[:MAX_SV_MODELS]:
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


def _layer_map(m: ModelSummary) -> str | None:
    """The layer x module map of one model: colour = drift (1 - lowest max|cos| of the matrix's
    top k, ``spectral.calibration.drift``) on a fixed 0..1 scale, intruder counts written in."""
    from ..spectral.calibration import drift
    from . import figures as F

    mats = [x for x in m.spectrum.matrices if x.layer is not None and x.max_cos]
    if not mats:
        return None
    layers = sorted({x.layer for x in mats})
    modules = list(dict.fromkeys(x.module for x in mats))
    grid = [[float("nan")] * len(modules) for _ in layers]
    marks = [[0.0] * len(modules) for _ in layers]
    for x in mats:
        r, c = layers.index(x.layer), modules.index(x.module)
        d = x.drift if x.drift is not None else drift(x.max_cos)
        grid[r][c] = d if grid[r][c] != grid[r][c] else max(grid[r][c], d)
        marks[r][c] += x.intruders
    return F.layer_module_heatmap(grid, [str(la) for la in layers], modules, marks=marks, vmax=1.0,
                                  title=F.short_label(m.name, 50))


def quiet_sentence(m: ModelSummary) -> dict[str, str]:
    """One sentence for a model without intruder dimensions: its closest call and the null."""
    run = m.spectrum_run
    text = f"no intruder dimension in {m.matrices} matrices (k={run.k}, ε={run.epsilon:g})"
    scored = [x for x in m.spectrum.matrices if x.min_cos is not None]
    if scored:
        x = min(scored, key=lambda x: x.min_cos)
        text += f"; lowest max |cos| {x.min_cos:.3f} (drift {1 - x.min_cos:.3f}) in {x.name}"
        if x.null_max_cos is not None:
            text += f", where a random direction would reach about {x.null_max_cos:.3f}"
    return {"model": m.name, "text": text + "."}


def safety_figures(data: ReportData) -> dict[str, Any]:
    from . import figures as F

    rows = safety_rows(data)
    out: dict[str, Any] = {"rates": None, "categories": None, "over_categories": None}
    pts = [(n, r.refusal_rate, r.refusal_ci, r.over_refusal_rate, r.over_refusal_ci) for n, r in rows]
    if any(p[1] is not None or p[3] is not None for p in pts):
        out["rates"] = F.rate_intervals(pts)
    for key, slot, label in (("per_category", "categories", "refusal rate (%)"),
                             ("over_refusal_per_category", "over_categories", "over-refusal rate (%)")):
        cats = list(dict.fromkeys(c for _, r in rows for c in getattr(r, key)))[:MAX_CATEGORIES]
        if not cats:
            continue
        series = []
        for n, r in rows[:MAX_CURVES]:
            per = getattr(r, key)
            series.append((n, [per[c].rate if c in per else None for c in cats],
                           [per[c].ci if c in per else None for c in cats]))
        out[slot] = F.category_bars(cats, series, ylabel=label)
    return out


def samples(data: ReportData) -> list[dict[str, Any]]:
    """Per model, the harmful and benign response samples (collapsed on the page)."""
    out = []
    for name, r in safety_rows(data):
        groups = []
        for kind, recs, cap in (("harmful", r.responses, SAMPLES_HARMFUL), ("benign", r.benign_responses, SAMPLES_BENIGN)):
            if not recs:
                continue
            # what a reviewer needs first: harmful prompts answered, benign prompts refused
            first = [x for x in recs if x.refused is (kind == "benign")]
            rest = [x for x in recs if x.refused is not (kind == "benign")]
            shown = []
            for x in (first + rest)[:cap]:
                text = None if x.response is None else clean(x.response)
                truncated = text is not None and len(text) > RESPONSE_CHARS
                shown.append({"prompt": clean(x.prompt), "category": clean(x.category or "–"),
                              "response": text[:RESPONSE_CHARS] if text is not None else None,
                              "truncated": truncated, "refused": x.refused})
            groups.append({"kind": kind, "entries": shown, "total": len(recs)})
        if groups:
            out.append({"model": name, "groups": groups})
    return out


def study_sections(data: ReportData) -> list[dict[str, Any]]:
    """Per study result: its question, the two dependence figures (intruders and lowest max|cos|
    against the learning rate, one line per method) and its claims."""
    from . import figures as F

    out = []
    for st in data.studies:
        curves, lows = [], []
        for s in st.series:
            pts = st.points_of(s.name)
            curves.append((s.name, [p.lr for p in pts], [p.intruders for p in pts]))
            lows.append((s.name, [p.lr for p in pts], [p.lowest_max_cos for p in pts]))
        nulls = [p.null_max_cos for p in st.points if p.null_max_cos is not None]
        fig_n = F.lr_curves(curves, ylabel=f"intruder dimensions (k={st.k}, ε={st.epsilon:g})", integer=True)
        fig_c = F.lr_curves(lows, ylabel="lowest max |cos| of any top-k direction", threshold=st.epsilon,
                            threshold_label=f"ε = {st.epsilon:g}", band=(min(nulls), max(nulls)) if nulls else None,
                            band_label="random direction")
        out.append({"title": st.title, "question": st.question, "intruders_svg": fig_n, "cos_svg": fig_c,
                    "claims": [{"claim": c.claim, "rule": c.rule, "measured": c.measured, "holds": c.holds,
                                "note": c.note} for c in st.claims],
                    "settings": [(str(k), str(v)) for k, v in st.settings.items()]})
    return out


def scan_figures(data: ReportData) -> dict[str, Any]:
    """The per-layer refusal-direction overlap of each scanned model (energy share / chance), its
    forward-pass activation shift per layer, and the first-token proxy (and a risk, where one was
    shown) against the measured refusal drop for the models safety-eval also ran on."""
    from . import figures as F

    models = [m for m in data.models if m.scan is not None][:MAX_CURVES]
    out: dict[str, Any] = {"layers": None, "shift": None, "risk_vs_drop": None, "proxy_vs_drop": None}
    series = [(m.name, [x.layer for x in m.scan.layers if x.energy_ratio is not None],
               [x.energy_ratio for x in m.scan.layers if x.energy_ratio is not None]) for m in models]
    if any(s[1] for s in series):
        out["layers"] = F.per_layer_lines([s for s in series if s[1]],
                                          ylabel="energy along refusal direction / chance")
    shifts = [(m.name, [x.layer for x in m.scan.layers if x.activation_shift is not None],
               [x.activation_shift for x in m.scan.layers if x.activation_shift is not None]) for m in models]
    if any(s[1] for s in shifts):
        out["shift"] = F.per_layer_lines([s for s in shifts if s[1]], ylabel="activation shift (separations)",
                                         floor=None)
    both = [m for m in data.models if m.scan is not None and m.scan.risk is not None and m.refusal_drop is not None]
    if both:
        out["risk_vs_drop"] = F.scatter([(m.name, [m.scan.risk], [100 * m.refusal_drop]) for m in both],
                                        xlabel="safety-scan risk", ylabel="measured refusal drop (points)",
                                        width=5.0, height=3.2, what="model")
    proxy = [m for m in data.models if m.scan is not None and m.scan.signals.get("first_token_drop") is not None
             and m.refusal_drop is not None]
    if proxy:
        out["proxy_vs_drop"] = F.scatter([(m.name, [100 * m.scan.signals["first_token_drop"]], [100 * m.refusal_drop])
                                          for m in proxy], xlabel="first-token refusal drop, scan prompts (points)",
                                         ylabel="measured refusal drop (points)", width=5.0, height=3.2, what="model")
    return out
