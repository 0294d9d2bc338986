"""Report tables as pandas DataFrames: the same frame is shown in the HTML / Markdown and
exported to CSV (raw numbers in the CSV, formatted ones on the page)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from ..results.safety import ModelSafety
from .model import ModelSummary, ReportData

WORST_PER_MODEL = 10
WORST_SHOWN = 5


@dataclass
class Table:
    key: str  # CSV file stem
    title: str
    df: pd.DataFrame
    formats: dict[str, str] = field(default_factory=dict)  # column -> pct | spct | f3 | f2 | int | str
    note: str = ""
    display: pd.DataFrame | None = None  # what the page shows, when not the whole of df
    headers: dict[str, str] = field(default_factory=dict)  # column -> header on the page

    def _shown(self) -> pd.DataFrame:
        return self.df if self.display is None else self.display

    def display_rows(self) -> list[list[str]]:
        df = self._shown()
        return [[fmt_value(v, self.formats.get(c, "")) for c, v in zip(df.columns, row, strict=True)]
                for row in df.itertuples(index=False, name=None)]

    @property
    def columns(self) -> list[str]:
        return [self.headers.get(str(c), str(c)) for c in self._shown().columns]


def _missing(v: Any) -> bool:
    if v is None:
        return True
    try:
        return bool(pd.isna(v))
    except (TypeError, ValueError):
        return False


def fmt_value(v: Any, kind: str = "") -> str:
    """A table cell as text: '–' for missing; pct = 0.123 -> '12.3%'; spct = signed points."""
    if isinstance(v, (list, tuple)):
        return ", ".join(fmt_value(x, kind) for x in v)
    if _missing(v):
        return "–"
    if kind == "pct":
        return f"{100 * float(v):.1f}%"
    if kind == "spct":
        return f"{100 * float(v):+.1f} pts"
    if kind == "f3":
        return f"{float(v):.3f}"
    if kind == "sf3":
        return f"{float(v):+.3f}"
    if kind == "f2":
        return f"{float(v):.2f}"
    if kind == "int":
        return f"{int(v):d}"
    if isinstance(v, float):
        if math.isfinite(v) and v == int(v) and abs(v) < 1e15:
            return f"{int(v):d}"
        return f"{v:.4g}"
    return str(v)


def ci_text(ci: Any) -> str:
    if not isinstance(ci, (list, tuple)) or len(ci) != 2 or any(_missing(x) for x in ci):
        return "–"
    return f"[{100 * float(ci[0]):.1f}, {100 * float(ci[1]):.1f}]%"


def _ci(ci: Any, i: int) -> float | None:
    if isinstance(ci, (list, tuple)) and len(ci) == 2 and not _missing(ci[i]):
        return float(ci[i])
    return None


# ---- summary --------------------------------------------------------------------------
def capability_tasks(models: list[ModelSummary]) -> list[str]:
    tasks: list[str] = []
    for m in models:
        for rec in (m.safety_base, m.safety):
            for t in (rec.capability if rec else {}):
                if t not in tasks:
                    tasks.append(t)
    return tasks


# the summary's spectrum columns; the calibrated two (spectral.calibration) come last in the CSV,
# so that the columns of earlier versions keep their places, and after min_max_cos on the page
SPECTRUM_SUMMARY = ("intruders", "matrices", "intruders_per_matrix", "min_max_cos", "intruder_energy", "mean_drift")


def summary_table(data: ReportData) -> Table:
    """One row per tuned model, most risky first."""
    tasks = capability_tasks(data.models)
    rows = []
    for m in data.models:
        s, b = m.safety, m.safety_base
        row = {
            "model": m.name, "verdict": m.label,
            "intruders": m.intruders, "matrices": m.matrices, "intruders_per_matrix": m.intruders_per_matrix,
            "min_max_cos": m.min_cos,
            "refusal_base": b and b.refusal_rate, "refusal_tuned": s and s.refusal_rate,
            "refusal_tuned_ci_low": _ci(s and s.refusal_ci, 0), "refusal_tuned_ci_high": _ci(s and s.refusal_ci, 1),
            "refusal_drop": m.refusal_drop,
            "refusal_drop_ci_low": (m.refusal_drop_ci or (None, None))[0],
            "refusal_drop_ci_high": (m.refusal_drop_ci or (None, None))[1],
            "over_refusal_base": b and b.over_refusal_rate, "over_refusal_tuned": s and s.over_refusal_rate,
        }
        cap = m.capability_delta
        for t in tasks:
            row[f"capability_delta:{t}"] = cap.get(t)
        tr = m.spectrum
        row.update(intruder_energy=tr and tr.intruder_energy, mean_drift=tr and tr.mean_drift)
        rows.append(row)
    df = pd.DataFrame(rows)
    if not data.has_spectrum:
        df = df.drop(columns=list(SPECTRUM_SUMMARY), errors="ignore")
    if not data.has_safety:
        df = df[[c for c in df.columns if c == "model" or c in SPECTRUM_SUMMARY]]
    fm = {"intruders": "int", "matrices": "int", "intruders_per_matrix": "f2", "min_max_cos": "f3",
          "mean_drift": "f3",  # intruder_energy: 4 significant digits, a mean share is often tiny
          "refusal_base": "pct", "refusal_tuned": "pct", "refusal_tuned_ci_low": "pct", "refusal_tuned_ci_high": "pct",
          "refusal_drop": "spct", "refusal_drop_ci_low": "spct", "refusal_drop_ci_high": "spct",
          "over_refusal_base": "pct", "over_refusal_tuned": "pct"}
    fm.update({f"capability_delta:{t}": "sf3" for t in tasks})
    if data.has_scan:  # safety-scan's findings next to whatever else was measured
        df["refusal_edits"] = [m.scan.refusal_edits if m.scan else None for m in data.models]
        df["first_token_drop"] = [m.scan.signals.get("first_token_drop") if m.scan else None for m in data.models]
        fm.update(refusal_edits="int", first_token_drop="spct")
        if any(m.scan is not None and m.scan.risk is not None for m in data.models):
            df["safety_risk"] = [m.scan.risk if m.scan else None for m in data.models]
            df["risk_verdict"] = [m.scan.verdict if m.scan else None for m in data.models]
            fm.update(safety_risk="f2", risk_verdict="str")
    shown = df.copy()
    if "min_max_cos" in shown:  # the calibrated columns next to the other spectrum columns
        at = shown.columns.get_loc("min_max_cos") + 1
        shown = shown[list(shown.columns[:at]) + ["intruder_energy", "mean_drift"]
                      + [c for c in shown.columns[at:] if c not in ("intruder_energy", "mean_drift")]]
    if "refusal_tuned_ci_low" in shown:
        shown.insert(shown.columns.get_loc("refusal_tuned_ci_low"), "tuned_ci",
                     [ci_text([a, b]) for a, b in zip(df["refusal_tuned_ci_low"], df["refusal_tuned_ci_high"], strict=True)])
        shown = shown.drop(columns=["refusal_tuned_ci_low", "refusal_tuned_ci_high"])
    if "refusal_drop_ci_low" in shown:
        shown.insert(shown.columns.get_loc("refusal_drop_ci_low"), "drop_ci",
                     [("–" if _missing(a) or _missing(b) else f"[{100 * a:+.1f}, {100 * b:+.1f}]")
                      for a, b in zip(df["refusal_drop_ci_low"], df["refusal_drop_ci_high"], strict=True)])
        shown = shown.drop(columns=["refusal_drop_ci_low", "refusal_drop_ci_high"])
    headers = {"intruders_per_matrix": "intruders / matrix", "min_max_cos": "min max|cos|",
               "intruder_energy": "intruder energy", "mean_drift": "mean drift",
               "refusal_base": "refusal (base)", "refusal_tuned": "refusal (tuned)", "tuned_ci": "95% CI (tuned)",
               "refusal_drop": "refusal drop", "drop_ci": "95% CI (drop, pts)", "over_refusal_base": "over-refusal (base)",
               "over_refusal_tuned": "over-refusal (tuned)", "safety_risk": "safety risk (scan)",
               "risk_verdict": "scan verdict", "refusal_edits": "refusal edits (scan)",
               "first_token_drop": "first-token drop (scan)"}
    headers.update({f"capability_delta:{t}": f"Δ {t}" for t in tasks})
    return Table("summary", "Tuned models, most risky first", df, fm,
                 "Sorted by safety verdict, then refusal drop, then intruder dimensions per audited matrix. "
                 "Intruder energy: mean over matrices of the share of the top-k singular energy carried by "
                 "intruders; drift: 1 − a matrix's lowest max |cos|, averaged over matrices.",
                 display=shown, headers=headers)


# ---- spectrum -------------------------------------------------------------------------
def _spectrum_models(data: ReportData) -> list[ModelSummary]:
    return [m for m in data.models if m.spectrum is not None]


# What each tuned model was, from the spectrum run's per-model ``info`` (the adapter config or the
# checkpoint kind), in this order; keys a model does not have are blank.
TUNED_INFO = [("kind", "kind"), ("model_type", "model type"), ("peft_type", "PEFT type"), ("r", "r"),
              ("ranks", "ranks in weights"), ("lora_alpha", "alpha"), ("use_rslora", "rsLoRA"), ("use_dora", "DoRA"),
              ("rank_pattern", "rank pattern"), ("alpha_pattern", "alpha pattern"),
              ("target_modules", "target modules"), ("adapted_modules", "adapted modules"),
              ("modules_to_save", "modules to save"), ("base_model_name_or_path", "declared base")]


def _info_cell(v: Any) -> Any:
    """A cell for one ``info`` value: lists joined, mappings as k=v, empty ones blank."""
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items()) or None
    if isinstance(v, (list, tuple, set)):
        return ", ".join(str(x) for x in v) or None
    return v


def tuned_models_table(data: ReportData) -> Table | None:
    """One row per audited tuned model: what it was (adapter config or checkpoint kind); None when
    no spectrum result recorded any of it."""
    models = [m for m in _spectrum_models(data) if m.spectrum.info]
    if not models:
        return None
    keys = [k for k, _ in TUNED_INFO if any(_info_cell(m.spectrum.info.get(k)) is not None for m in models)]
    rows = [{"model": m.name, **{k: _info_cell(m.spectrum.info.get(k)) for k in keys}} for m in models]
    df = pd.DataFrame(rows, columns=["model"] + keys, dtype=object)  # no 8 -> 8.0 beside blanks
    return Table("tuned_models", "What was audited", df, {k: "str" for k in keys},
                 "From each adapter's adapter_config.json (as read for the audit) or the checkpoint's kind.",
                 headers=dict(TUNED_INFO))


def _by_model(data: ReportData, key_name: str, keys: list, value) -> pd.DataFrame:
    """One row per key (module, layer, ...), one column per spectrum model: ``value(model, key)``."""
    models = _spectrum_models(data)
    rows = [{key_name: k, **{m.name: value(m, k) for m in models}} for k in keys]
    return pd.DataFrame(rows, columns=[key_name] + [m.name for m in models])


def _layers(data: ReportData) -> list[int]:
    return sorted({mat.layer for m in _spectrum_models(data) for mat in m.spectrum.matrices if mat.layer is not None})


def by_module_table(data: ReportData) -> Table:
    modules = list(dict.fromkeys(mat.module for m in _spectrum_models(data) for mat in m.spectrum.matrices))
    df = _by_model(data, "module", modules, lambda m, mod: m.spectrum.by_module().get(mod))
    return Table("intruders_by_module", "Intruder dimensions per module", df,
                 {c: "int" for c in df.columns[1:]}, "Summed over layers; – where the model did not change that module.")


def by_layer_table(data: ReportData) -> Table:
    df = _by_model(data, "layer", _layers(data), lambda m, layer: m.spectrum.by_layer().get(str(layer)))
    return Table("intruders_by_layer", "Intruder dimensions per layer", df, {c: "int" for c in df.columns[1:]})


def worst_matrices_table(data: ReportData, per_model: int = WORST_PER_MODEL) -> Table:
    rows = []
    for m in _spectrum_models(data):
        for mat in m.spectrum.worst_matrices(per_model):
            rows.append({"model": m.name, "matrix": mat.name, "shape": "×".join(str(x) for x in mat.shape),
                         "delta": mat.delta_type + (f" r={mat.adapter_rank}" if mat.adapter_rank else ""),
                         "intruders": mat.intruders, "min_max_cos": mat.min_cos,
                         "effective_rank": mat.effective_rank, "stable_rank": mat.stable_rank,
                         "relative_delta_norm": mat.relative_delta_norm, "method": mat.method,
                         "null_max_cos": mat.null_max_cos, "intruder_energy": mat.intruder_energy})
    df = pd.DataFrame(rows, columns=["model", "matrix", "shape", "delta", "intruders", "min_max_cos",
                                     "effective_rank", "stable_rank", "relative_delta_norm", "method",
                                     "null_max_cos", "intruder_energy"])
    shown = df.groupby("model", sort=False).head(WORST_SHOWN) if len(df) else df
    return Table("worst_matrices", f"Worst matrices (up to {WORST_SHOWN} per model; {per_model} in the CSV)", df,
                 {"intruders": "int", "min_max_cos": "f3", "effective_rank": "f2", "stable_rank": "f2",
                  "relative_delta_norm": "f3", "null_max_cos": "f3", "intruder_energy": "f3"},
                 "Most intruders first, then lowest max |cos|. effective rank of dW: Roy & Vetterli 2007; "
                 "relative norm: ‖dW‖_F / ‖W0‖_F; null: the max |cos| a random direction has in expectation "
                 "at this shape; intruder energy: share of the top-k singular energy carried by intruders.",
                 display=shown,
                 headers={"min_max_cos": "min max|cos|", "effective_rank": "eff. rank", "stable_rank": "stable rank",
                          "relative_delta_norm": "‖dW‖/‖W0‖", "method": "SVD method", "null_max_cos": "null",
                          "intruder_energy": "intr. energy"})


def effective_rank_by_layer(data: ReportData) -> Table:
    """Mean effective rank of dW over the matrices of each layer, per model."""

    def mean_erank(m: ModelSummary, layer: int) -> float | None:
        vals = [x.effective_rank for x in m.spectrum.matrices if x.layer == layer and x.effective_rank is not None]
        return sum(vals) / len(vals) if vals else None

    df = _by_model(data, "layer", _layers(data), mean_erank)
    return Table("effective_rank_by_layer", "Mean effective rank of dW per layer", df,
                 {c: "f2" for c in df.columns[1:]})


def findings_table(data: ReportData) -> Table | None:
    """Structural findings on the tuned files (rule, level, message, file) and matrices left out of
    the audit (non-finite weights, overflowing updates, all-zero matrices); None when there are none."""
    rows = []
    for m in _spectrum_models(data):
        for f in m.spectrum.findings:
            rows.append({"model": m.name, "rule": f.rule, "level": f.level, "what": f.message, "file": f.file})
        for x in m.spectrum.skipped:
            rows.append({"model": m.name, "rule": "LA030" if x.unmeasured else "–",
                         "level": "warning" if x.unmeasured else "note",
                         "what": f"{x.name} not audited: {x.reason}", "file": None})
    if not rows:
        return None
    df = pd.DataFrame(rows, columns=["model", "rule", "level", "what", "file"])
    return Table("findings", "Findings: structural checks of the tuned files, matrices not audited", df,
                 {}, "Rules: see 'lora_audit.results.findings' (also in SARIF output with --sarif).")


def sweep_table(data: ReportData) -> Table:
    rows = []
    for m in _spectrum_models(data):
        run = m.spectrum_run
        # not strict: the report reads results from files, which may carry a shorter sweep (sections.py too)
        for e, c in zip(run.epsilon_sweep, m.spectrum.sweep_totals, strict=False):
            rows.append({"model": m.name, "epsilon": e, "intruders": c})
    df = pd.DataFrame(rows, columns=["model", "epsilon", "intruders"])
    return Table("intruders_vs_epsilon", "Intruder dimensions at each threshold ε", df, {"intruders": "int"})


# ---- studies --------------------------------------------------------------------------
def study_points_table(data: ReportData) -> Table:
    """Every grid point of every study: its method, learning rate and what the audit measured."""
    rows = [{"study": st.title, "model": p.name, "series": p.series, "lr": p.lr, "steps": p.steps,
             "intruders": p.intruders, "directions": p.directions, "lowest_max_cos": p.lowest_max_cos,
             "null_max_cos": p.null_max_cos, "intruder_energy": p.intruder_energy, "mean_drift": p.mean_drift,
             "loss_first": p.loss_first, "final_loss": p.final_loss, "lowest_matrix": p.lowest_matrix}
            for st in data.studies for p in st.points]
    df = pd.DataFrame(rows, columns=["study", "model", "series", "lr", "steps", "intruders", "directions",
                                     "lowest_max_cos", "null_max_cos", "intruder_energy", "mean_drift",
                                     "loss_first", "final_loss", "lowest_matrix"])
    shown = df.drop(columns=["study"]) if len(data.studies) == 1 else df
    return Table("study_points", "Study: every grid point", df,
                 {"intruders": "int", "directions": "int", "steps": "int", "lowest_max_cos": "f3",
                  "null_max_cos": "f3", "mean_drift": "f3", "loss_first": "f3",
                  "final_loss": "f3"},
                 "null: the expected max |cos| of a random direction against the base basis of the matrix that "
                 "scored lowest (exact, spectral.calibration); intruder energy: mean share of the top-k singular "
                 "energy carried by intruders; drift: 1 − lowest max |cos| of a matrix, averaged over matrices.", display=shown,
                 headers={"lowest_max_cos": "lowest max|cos|", "null_max_cos": "null", "intruder_energy":
                          "intruder energy", "mean_drift": "mean drift", "loss_first": "first loss",
                          "final_loss": "final loss", "lowest_matrix": "where"})


def study_claims_table(data: ReportData) -> Table:
    rows = [{"study": st.title, "claim": c.claim, "holds": "holds" if c.holds else "does NOT hold",
             "measured": c.measured, "rule": c.rule, "note": c.note} for st in data.studies for c in st.claims]
    df = pd.DataFrame(rows, columns=["study", "claim", "holds", "measured", "rule", "note"])
    return Table("study_claims", "Study: the pre-registered claims and whether each held in this run", df,
                 display=df.drop(columns=["study"]) if len(data.studies) == 1 else df)


# ---- safety ---------------------------------------------------------------------------
def safety_rows(data: ReportData) -> list[tuple[str, ModelSafety]]:
    """(name, measurements) of every base and tuned model in the safety results, base(s) first."""
    bases = [("base" if len(data.safeties) == 1 else f"base ({i + 1})", run.models["base"])
             for i, run in enumerate(data.safeties)]
    return bases + [(m.name, m.safety) for m in data.models if m.safety is not None]


def refusal_table(data: ReportData) -> Table:
    rows = []
    for name, r in safety_rows(data):
        rows.append({"model": name, "n_prompts": r.n_prompts or len(r.responses) or None,
                     "n_refused": r.n_refused, "refusal_rate": r.refusal_rate,
                     "ci_low": _ci(r.refusal_ci, 0), "ci_high": _ci(r.refusal_ci, 1),
                     "n_benign": r.n_benign, "over_refusal_rate": r.over_refusal_rate,
                     "over_ci_low": _ci(r.over_refusal_ci, 0), "over_ci_high": _ci(r.over_refusal_ci, 1)})
    df = pd.DataFrame(rows, columns=["model", "n_prompts", "n_refused", "refusal_rate", "ci_low", "ci_high",
                                     "n_benign", "over_refusal_rate", "over_ci_low", "over_ci_high"])
    pct = {c: "pct" for c in ("refusal_rate", "ci_low", "ci_high", "over_refusal_rate", "over_ci_low", "over_ci_high")}
    return Table("refusal", "Refusal and over-refusal (95% Wilson intervals)", df,
                 {**pct, "n_prompts": "int", "n_refused": "int", "n_benign": "int"},
                 "Refusal on harmful prompts (higher is safer); over-refusal on benign look-alike prompts "
                 "(lower is better).")


def category_table(data: ReportData, key: str = "per_category") -> Table:
    rows_src = safety_rows(data)
    cats: list[str] = []
    for _, r in rows_src:
        for c in getattr(r, key):
            if c not in cats:
                cats.append(c)
    rows = []
    for c in cats:
        row: dict[str, Any] = {"category": c}
        for name, r in rows_src:
            rec = getattr(r, key).get(c)
            row[name] = rec.rate if rec else None
            row[f"n:{name}"] = rec.n if rec else None
        rows.append(row)
    cols = ["category"] + [n for n, _ in rows_src] + [f"n:{n}" for n, _ in rows_src]
    df = pd.DataFrame(rows, columns=cols)
    fm = {n: "pct" for n, _ in rows_src}
    fm.update({f"n:{n}": "int" for n, _ in rows_src})
    if key == "per_category":
        return Table("refusal_by_category", "Refusal rate per category (harmful prompts)", df, fm)
    return Table("over_refusal_by_category", "Over-refusal per category (benign prompts)", df, fm)


def capability_table(data: ReportData) -> Table:
    rows_src = safety_rows(data)
    tasks: list[str] = []
    for _, r in rows_src:
        for t in r.capability:
            if t not in tasks:
                tasks.append(t)
    tuned = [m for m in data.models if m.safety is not None]
    rows = []
    for t in tasks:
        row: dict[str, Any] = {"task": t}
        for name, r in rows_src:
            row[name] = r.capability.get(t)
        for m in tuned:
            row[f"Δ {m.name}"] = m.capability_delta.get(t)
        rows.append(row)
    cols = ["task"] + [n for n, _ in rows_src] + [f"Δ {m.name}" for m in tuned]
    df = pd.DataFrame(rows, columns=cols)
    fm = {n: "f3" for n, _ in rows_src}
    fm.update({f"Δ {m.name}": "sf3" for m in tuned})
    return Table("capability", "Capability (lm-eval accuracy) and change vs base", df, fm)


def responses_table(data: ReportData) -> Table:
    rows = []
    for name, r in safety_rows(data):
        for kind, records in (("harmful", r.responses), ("benign", r.benign_responses)):
            for x in records:
                rows.append({"model": name, "set": kind, "category": x.category, "prompt": x.prompt,
                             "response": x.response, "refused": x.refused, "first_token_score": x.first_token_score})
    df = pd.DataFrame(rows, columns=["model", "set", "category", "prompt", "response", "refused",
                                     "first_token_score"])
    return Table("responses", "All scored responses", df)


# ---- safety-scan ----------------------------------------------------------------------
SCAN_SIGNALS = ["first_token_drop", "first_token_refusal", "refusal_score_delta", "activation_shift",
                "refusal_edit_max_share", "refusal_energy_ratio", "refusal_energy_max_ratio", "weight_shift",
                "top_cos_max", "rank1_share",
                "safelora_mean_cos", "safelora_below_share"]


def scan_table(data: ReportData) -> Table:
    """One row per scanned model: refusal edits, the first-token proxy with its interval, the risk
    where a validated risk model gave one, every signal, and the measured refusal drop where
    safety-eval ran too."""
    models = [m for m in data.models if m.scan is not None]
    present = [k for k in SCAN_SIGNALS if any(m.scan.signals.get(k) is not None for m in models)]
    with_risk = any(m.scan.risk is not None for m in models)
    rows = []
    for m in models:
        ci = m.scan.intervals.get("first_token_drop") or [None, None]
        rows.append({"model": m.name, "refusal_edits": m.scan.refusal_edits,
                     "removing": m.scan.refusal_edits_removing, "adding": m.scan.refusal_edits_adding,
                     "first_token_drop_low": ci[0], "first_token_drop_high": ci[1],
                     **({"risk": m.scan.risk, "verdict": m.scan.verdict} if with_risk else {}),
                     "measured_refusal_drop": m.refusal_drop, **{k: m.scan.signals.get(k) for k in present}})
    cols = ["model", "refusal_edits", "removing", "adding"] + present[:1] + ["first_token_drop_low",
                                                                             "first_token_drop_high"]
    cols += (["risk", "verdict"] if with_risk else []) + ["measured_refusal_drop"] + present[1:]
    df = pd.DataFrame(rows, columns=cols)
    fm = {"risk": "f2", "measured_refusal_drop": "spct", "verdict": "str", "refusal_edits": "int",
          "removing": "int", "adding": "int", "first_token_drop_low": "spct", "first_token_drop_high": "spct"}
    fm.update({k: "f3" for k in present})
    fm.update({k: "spct" for k in ("first_token_drop", "first_token_refusal") if k in present})
    return Table("safety_scan", "Safety scan: refusal edits and first-token proxy", df, fm,
                 "refusal edits = matrices writing into the residual stream whose update lies along the base's causal "
                 "refusal direction beyond chance (removing: abliteration-like; adding: toward over-refusal); "
                 "first-token drop = base minus tuned share of the scan's harmful prompts whose first token starts a "
                 "refusal (a proxy read on prompts the safety-eval labels never use), with its 95 % bootstrap "
                 "interval; risk only from a validated risk model; energy ratio = share of the update along the "
                 "refusal direction / chance; activation shift in units of the base's separation.")


def scan_layers_table(data: ReportData) -> Table:
    keys = ["stable", "writers_changed", "energy_ratio", "weight_shift", "top_cos", "safelora_cos", "activation_shift"]
    rows = [{"model": m.name, "layer": x.layer, **{k: getattr(x, k) for k in keys}}
            for m in data.models if m.scan is not None for x in m.scan.layers]
    df = pd.DataFrame(rows, columns=["model", "layer"] + keys)
    return Table("safety_scan_layers", "Safety-scan values per layer", df,
                 {"layer": "int", "writers_changed": "int", "stable": "str",
                  **{k: "f3" for k in keys[2:]}})


def all_tables(data: ReportData) -> dict[str, Table]:
    """Every table of the report, by key (the CSV export writes each one)."""
    out = {"summary": summary_table(data)}
    if data.has_spectrum:
        for t in (tuned_models_table(data), findings_table(data), sweep_table(data), by_module_table(data),
                  by_layer_table(data), worst_matrices_table(data), effective_rank_by_layer(data)):
            if t is not None:
                out[t.key] = t
    if data.studies:
        out.update({t.key: t for t in (study_points_table(data), study_claims_table(data))})
    if data.has_safety:
        for t in (refusal_table(data), category_table(data, "per_category"),
                  category_table(data, "over_refusal_per_category"), capability_table(data), responses_table(data)):
            out[t.key] = t
    if data.has_scan:
        for t in (scan_table(data), scan_layers_table(data)):
            out[t.key] = t
    return out
