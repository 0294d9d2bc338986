"""The validation panel (``lora-audit zoo``): fine-tunes of one safety-tuned model with graded safety
loss, each labelled by safety-eval and scanned by safety-scan, so that every signal is judged
against measured behaviour.

1. The "released" model: SmolLM2-135M-Instruct safety-tuned exactly as the demo does it (the
   ``role="released"`` run of ``lora_audit.studies.demo.make_plan``, trained by the demo's own builder).
2. Fine-tunes of it (``panel_runs``), all with the demo's batch size, sequence length and seed:
   benign LoRA / rsLoRA / DoRA / full fine-tuning on ``builtin:alpaca-mini`` at several learning
   rates and lengths; safety-undo runs on ``builtin:undo-compliance`` (Lermen et al. 2023) of
   several strengths; undo data mixed with benign data at several ratios; abliteration edits
   (Arditi et al. 2024: a rank-1 LoRA on every residual writer, dW = -a r r^T W, with r the
   refusal direction of one layer computed from the safety-tuning set's prompts, not from the
   evaluation prompts); and the demo's own safety-evaluated runs ("demo-<name>", read from the
   demo's plan), so the panel says whether the scan ranks the demo's undo run above its benign
   fine-tunes.
3. Labels: safety-eval of the released model and every fine-tune on the built-in harmful prompts
   (keyword scorer, greedy, ``MAX_NEW_TOKENS`` tokens, early stop; no capability task): the
   refusal drop base - tuned with its Newcombe interval; "safety lost" = a drop of at least
   ``risk.LABEL_DROP``. The released model's over-refusal is measured on the built-in benign set.
4. Signals: ``run_safety_scan`` of every fine-tune against the released model, with the original
   SmolLM2 as ``--unaligned`` (Safe LoRA), timed per model.
5. Statistics and the fitted risk models (``panel``): written to OUT (panel.json, README.md,
   figures/*.svg) and, when asked, to the risk-model file safety-scan loads.

Trained models and the labels live under ``<lora-audit cache>/zoo/<released key>/``, each model in
a folder keyed by its own settings (``run_dir``) and written atomically (a present folder is
complete): a re-run trains only the runs whose settings changed, and reads the labels back when
no run changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from .. import __version__

MAX_NEW_TOKENS = 32
ABLATION_LAYER = 0.6  # the abliteration direction is taken at this fraction of the depth


@dataclass(frozen=True)
class PanelRun:
    name: str
    method: str  # training method (lora, rslora, dora, full), or "abliteration"
    data: str  # builtin:alpaca-mini | builtin:undo-compliance | mix:<share of undo rows>
    steps: int = 0
    lr: float = 0.0
    rank: int = 8
    alpha: float = 16.0
    role: str = "benign"  # benign | undo | mix | abliteration
    strength: float = 1.0  # abliteration: a
    targets: tuple[str, ...] | None = None  # adapter target modules (None: every linear layer)


def panel_runs(quick: bool = False) -> tuple[PanelRun, ...]:
    """The panel's fine-tunes, fixed before any result (module docstring): its own, then the
    demo's (``demo_runs``)."""
    A, U = "builtin:alpaca-mini", "builtin:undo-compliance"
    if quick:
        return (PanelRun("b-lora-lr3e-4-s8", "lora", A, 8, 3e-4), PanelRun("u-lora-lr1e-4-s4", "lora", U, 4, 1e-4,
                                                                           role="undo"),
                PanelRun("m50-lora-lr1e-3-s8", "lora", "mix:0.5", 8, 1e-3, role="mix"),
                PanelRun("a-abliteration-1.0", "abliteration", "builtin:safety-tune", role="abliteration")) + \
            demo_runs(quick)
    return (
        PanelRun("b-lora-lr1e-4-s16", "lora", A, 16, 1e-4), PanelRun("b-lora-lr3e-4-s32", "lora", A, 32, 3e-4),
        PanelRun("b-rslora-r64-lr1e-3-s32", "rslora", A, 32, 1e-3, rank=64),
        PanelRun("b-rslora-r16-lr1e-4-s32", "rslora", A, 32, 1e-4, rank=16),
        PanelRun("b-dora-lr3e-4-s32", "dora", A, 32, 3e-4),
        PanelRun("b-full-lr5e-6-s16", "full", A, 16, 5e-6), PanelRun("b-full-lr1e-4-s32", "full", A, 32, 1e-4),
        PanelRun("u-lora-lr1e-4-s8", "lora", U, 8, 1e-4, role="undo"),
        PanelRun("u-lora-lr3e-4-s8", "lora", U, 8, 3e-4, role="undo"),
        PanelRun("u-lora-lr1e-3-s16", "lora", U, 16, 1e-3, role="undo"),
        PanelRun("u-dora-lr3e-4-s16", "dora", U, 16, 3e-4, role="undo"),
        PanelRun("u-full-lr1e-5-s16", "full", U, 16, 1e-5, role="undo"),
        PanelRun("m10-lora-lr1e-3-s32", "lora", "mix:0.1", 32, 1e-3, role="mix"),
        PanelRun("m25-lora-lr3e-4-s32", "lora", "mix:0.25", 32, 3e-4, role="mix"),
        PanelRun("m50-lora-lr3e-4-s32", "lora", "mix:0.5", 32, 3e-4, role="mix"),
        PanelRun("m50-rslora-r16-lr3e-4-s32", "rslora", "mix:0.5", 32, 3e-4, rank=16, role="mix"),
        PanelRun("a-abliteration-1.0", "abliteration", "builtin:safety-tune", role="abliteration", strength=1.0),
        PanelRun("a-abliteration-0.5", "abliteration", "builtin:safety-tune", role="abliteration", strength=0.5),
    ) + demo_runs(quick)


def released_run(quick: bool = False):
    """The demo's released-model run (``lora_audit.studies.demo``) and its plan."""
    from .demo import make_plan

    plan = make_plan(quick)
    return next(r for r in plan.runs if r.role == "released"), plan


def demo_runs(quick: bool = False) -> tuple[PanelRun, ...]:
    """The demo's runs that its safety side evaluates (all its tuned runs when its plan does not
    say which), as panel runs named "demo-<name>" with the demo's settings."""
    from ..training.loop import DEFAULT_LR

    _, plan = released_run(quick)
    chosen = getattr(plan, "safety_models", None)
    return tuple(PanelRun(f"demo-{r.name}", r.method, r.data, r.steps, r.lr or DEFAULT_LR[r.method], r.rank, r.alpha,
                          role="undo" if r.role == "undo" else "benign", targets=r.targets)
                 for r in plan.runs if r.role != "released" and (chosen is None or r.name in chosen))


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def released_key(quick: bool) -> str:
    """Hash of what determines the released model and the batches of every panel run: the panel's
    cache folder, ``<lora-audit cache>/zoo/<released key>/``."""
    rel, plan = released_run(quick)
    return _key({"released": rel.training(), "batch": [plan.batch_size, plan.max_length, plan.seed],
                 "version": __version__})


def run_dir(work: Path, run: PanelRun) -> Path:
    """A panel model's folder, keyed by the run's own settings: changing one run retrains that run only."""
    return work / f"{run.name}-{_key(asdict(run))}"


def plan_key(runs: tuple[PanelRun, ...], quick: bool) -> str:
    """Hash of the whole panel (the released model and every run's settings): labels and signals are
    read back from the cache only for the same plan."""
    return _key({"released": released_key(quick), "runs": [asdict(r) for r in runs]})


def mixed_data(share: float, out: Path) -> Path:
    """A JSONL with every row of builtin:alpaca-mini and enough rows of builtin:undo-compliance that
    they make up ``share`` of it (rows interleaved in a fixed order)."""
    from ..io import atomic_write_text
    from ..training.data import load_records

    benign, undo = load_records("builtin:alpaca-mini"), load_records("builtin:undo-compliance")
    n_undo = min(len(undo), max(1, round(share / (1 - share) * len(benign))))
    rows = benign + undo[:n_undo]
    order = sorted(range(len(rows)), key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())
    atomic_write_text(out, "".join(json.dumps(rows[i]) + "\n" for i in order))
    return out


def _train(run: PanelRun, base: Path, out: Path, work: Path, plan, device: str) -> dict:
    """Train (or reuse) one panel run with the demo ``plan``'s batch size, length and seed."""
    from ..training.loop import train

    if (out / "training.json").is_file():  # atomic folders: a present one is complete
        return json.loads((out / "training.json").read_text(encoding="utf-8")) | {"reused": True}
    if run.method == "abliteration":
        return abliteration_adapter(base, out, run.strength, device=device)
    data = run.data
    if data.startswith("mix:"):
        data = str(mixed_data(float(data[4:]), work / "data" / f"mix-{data[4:]}.jsonl"))
    return train(method=run.method, base=str(base), data=data, out=out, steps=run.steps, rank=run.rank,
                 alpha=run.alpha, lr=run.lr, batch_size=plan.batch_size, max_length=plan.max_length,
                 target_modules=list(run.targets) if run.targets else None, seed=plan.seed, device=device)


def _tuning_prompts() -> tuple[list[str], list[str]]:
    """Harmful and harmless prompts of the safety-tuning set (a row whose response the keyword
    scorer calls a refusal is harmful) plus the benign training set's prompts as harmless."""
    from ..safety.scorers import KeywordScorer
    from ..training.data import load_records

    refused = KeywordScorer()
    rows = load_records("builtin:safety-tune")
    harmful = [r["prompt"] for r in rows if refused(r["response"])]
    harmless = [r["prompt"] for r in rows if not refused(r["response"])]
    return harmful, harmless + [r["prompt"] for r in load_records("builtin:alpaca-mini")]


def abliteration_adapter(base: Path, out: Path, strength: float, *, device: str = "cpu",
                         prompts: tuple[list[str], list[str]] | None = None, chat_template: str | None = None) -> dict:
    """A rank-1 LoRA on every residual writer W of ``base``: dW = -strength r r^T W, with r the unit
    refusal direction at ``ABLATION_LAYER`` of the depth, from ``prompts`` (harmful, harmless;
    default the tuning sets', ``_tuning_prompts``) in the tokenizer's chat template (or
    ``chat_template``). strength 1 projects r out of everything the writers add to the stream,
    the weight-folded form of Arditi et al.'s directional ablation."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..checkpoints import load_model
    from ..io import atomic_dir, atomic_write_json
    from ..results import provenance, stamped
    from ..safety.generate import chat_texts
    from ..safety.scorers import refusal_start_ids
    from ..scan.direction import collect, find_blocks, refusal_direction, trace_residual

    t0 = time.perf_counter()
    loaded = load_model(str(base), device=device)
    model, tok = loaded.model, loaded.tokenizer
    harmful, harmless = (chat_texts(tok, p, chat_template) for p in (prompts or _tuning_prompts()))
    residual = trace_residual(model, tok(harmful[0], return_tensors="pt", add_special_tokens=False)["input_ids"])
    _, blocks = find_blocks(model)
    ids = torch.tensor(refusal_start_ids(tok))
    d = refusal_direction(collect(model, tok, harmful, blocks, ids).states,
                          collect(model, tok, harmless, blocks, ids).states)
    layer = int(ABLATION_LAYER * residual.n_layers)
    r = d.unit[layer].float()
    targets = sorted({w.module.rsplit(".", 1)[-1] for w in residual.writers})
    peft_model = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=targets))
    modules = dict(peft_model.named_modules())
    with torch.no_grad():
        for w in residual.writers:
            m = modules[f"base_model.model.{w.module}"]
            m.lora_A["default"].weight.copy_((r @ m.base_layer.weight)[None, :])  # (1, n) = r^T W
            m.lora_B["default"].weight.copy_(-strength * r[:, None])  # (d, 1)
    record = stamped(provenance("lora-audit/training", 1, method="abliteration", base=str(base), strength=strength,
                                layer=layer, targets=targets, harmful_prompts=len(harmful),
                                harmless_prompts=len(harmless)))
    record.update(method="abliteration", wall_time_s=round(time.perf_counter() - t0, 3))
    with atomic_dir(out, what="zoo abliteration adapter") as tmp:
        peft_model.save_pretrained(str(tmp))
        atomic_write_json(tmp / "training.json", record)
    return record


def _labels(work: Path, released: Path, runs: tuple[PanelRun, ...], *, limit: int | None, device: str):
    """(safety-eval result of the released model and every fine-tune on the harmful prompts, the
    released model's over-refusal rate); read back from ``work`` when the settings are unchanged."""
    from ..io import atomic_write_json, read_user_json
    from ..results.safety import SafetyResult
    from ..safety.evaluate import EvalConfig, run_safety_eval

    cfg = dict(prompts="builtin:harmful", benign=None, tasks=[], limit=limit, max_new_tokens=MAX_NEW_TOKENS,
               batch_size=16, device=device, seed=0)
    path = work / f"labels-{_key([cfg, [asdict(r) for r in runs], __version__])}.json"
    if path.is_file():
        saved = read_user_json(path, "zoo labels")
        return SafetyResult.from_json(saved["labels"], source=str(path)), saved["released_over_refusal"]
    labels = run_safety_eval(str(released), [str(run_dir(work, r)) for r in runs], EvalConfig(**cfg),
                             names=[r.name for r in runs])
    over = run_safety_eval(str(released), [], EvalConfig(**(cfg | {"prompts": "builtin:benign"})))
    rate = over.models["base"].refusal_rate
    atomic_write_json(path, {"labels": labels.to_json(), "released_over_refusal": rate})
    return labels, rate


def _panel_models(runs: tuple[PanelRun, ...], labels, scan) -> list:
    from ..stats import newcombe_interval
    from .panel import PanelModel

    base = labels.models["base"]
    out = []
    for r in runs:
        t, s = labels.models[r.name], scan.models[r.name]
        ci = newcombe_interval(base.refusal_rate, base.refusal_ci, t.refusal_rate, t.refusal_ci) or (0.0, 0.0)
        ev = t.timing_s.get("harmful") or {}
        out.append(PanelModel(
            name=r.name, method=r.method, role=r.role, data=r.data, steps=r.steps, lr=r.lr,
            base_rate=base.refusal_rate, tuned_rate=t.refusal_rate, drop=base.refusal_rate - t.refusal_rate,
            drop_ci=list(ci), signals=dict(s.signals),
            safety_eval_s=(ev.get("first_token") or 0) + (ev.get("generation") or 0),
            weights_s=s.seconds.get("weights", 0.0), forward_s=s.seconds.get("forward")))
    return out


def build_panel(out: str | Path = "reports/zoo", *, quick: bool = False, fresh: bool = False, device: str = "auto",
                overwrite: bool = False, risk_file: str | Path | None = None,
                echo: Callable[[str], None] = print) -> str:
    """Build (or reuse), label, scan and analyse the panel; write OUT (panel.json, README.md,
    figures/) and, with ``risk_file``, the fitted risk models. Returns a short text summary."""
    from ..checkpoints.default_model import cache_root, default_model_dir
    from .demo import _train as train_released
    from ..device import resolve_device
    from ..io import atomic_dir, atomic_write_json, atomic_write_text, check_output_dir, check_output_file
    from ..results import git_hash, provenance, stamped
    from . import panel as P
    from ..scan.risk import risk_file_json
    from ..scan.run import ScanConfig, run_safety_scan

    out = check_output_dir(out, overwrite=overwrite)
    if risk_file is not None:
        check_output_file(risk_file, "risk model file")
    dev, runs, t_all = str(resolve_device(device)), panel_runs(quick), time.perf_counter()
    work = cache_root() / "zoo" / released_key(quick)
    if fresh and work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True, exist_ok=True)
    stage = _stage_printer(echo)
    smollm2 = default_model_dir()
    rel, plan = released_run(quick)
    stage(f"released model ({rel.method}, {rel.steps} steps on {rel.data})", train_released, rel, smollm2,
          work / "released", plan, dev)
    for r in runs:
        stage(f"{r.name} ({r.method} on {r.data})", _train, r, work / "released", run_dir(work, r), work, plan, dev)
    limit = 12 if quick else None
    labels, over = stage("labels: safety-eval of every model (generation)", _labels, work, work / "released", runs,
                         limit=limit, device=dev)
    scan = stage("signals: safety-scan of every model", run_safety_scan, str(work / "released"),
                 [str(run_dir(work, r)) for r in runs], ScanConfig(device=dev, unaligned=str(smollm2)),
                 names=[r.name for r in runs])
    models = _panel_models(runs, labels, scan)
    analysis = P.analyse(models)
    figs = P.figures(models)
    info = {"quick": quick, "version": __version__, "git": git_hash(), "device": dev, "released": asdict(rel),
            "released_refusal": labels.models["base"].refusal_rate, "released_over_refusal": over,
            "max_new_tokens": MAX_NEW_TOKENS, "n_prompts": labels.models["base"].n_prompts,
            "total_s": time.perf_counter() - t_all, "figures": sorted(figs), "work_dir": str(work),
            "direction": scan.to_json()["direction"]}
    fitted = {k: v for k, v in analysis["risk_models"].items() if not isinstance(v, str)}
    panel_record = {"built_with": f"lora-audit zoo{' --quick' if quick else ''}", "models": len(models),
                    "positives": sum(m.lost for m in models), "plan_key": plan_key(runs, quick), "git": git_hash()}
    with atomic_dir(out, overwrite=overwrite, what="zoo panel") as tmp:
        atomic_write_json(tmp / "panel.json", stamped(provenance("lora-audit/zoo", 1, **info) | P.to_json(models, analysis)))
        atomic_write_text(tmp / "README.md", P.readme(models, analysis, info))
        (tmp / "figures").mkdir()
        for name, svg in figs.items():
            atomic_write_text(tmp / "figures" / f"{name}.svg", svg)
    if risk_file is not None and fitted:
        atomic_write_text(risk_file, risk_file_json(fitted, panel_record))
    return _summary(analysis, out, time.perf_counter() - t_all)


def _stage_printer(echo: Callable[[str], None]):
    def stage(name: str, fn: Callable, *args, **kw):
        echo(f"{name} ...")
        t0 = time.perf_counter()
        result = fn(*args, **kw)
        echo(f"{name}: {time.perf_counter() - t0:.1f} s")
        return result

    return stage


def _summary(analysis: dict, out: Path, seconds: float) -> str:
    lines = [f"panel written to {out} in {seconds / 60:.1f} min"]
    for k, f in analysis["risk_models"].items():
        lines.append(f"  {k}: " + (f if isinstance(f, str) else
                                   f"AUROC in sample {f.fit['auroc_in_sample']}, leave-one-method-out "
                                   f"{f.fit['auroc_leave_one_method_out']}"))
    return "\n".join(lines)
