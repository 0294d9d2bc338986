"""The audit pipeline: spectrum, safety-eval and the report of TUNED models against BASE, written
into one output folder, all or nothing. ``lora-audit audit`` and ``lora-audit demo`` (and any
library user) run it; the commands only parse options and print.

    from lora_audit.audit import AuditConfig, run_audit
    from lora_audit.settings import SpectrumSettings
    outcome = run_audit("base/", ["adapter/"], "reports/adapter",
                        AuditConfig(spectrum=SpectrumSettings(k=10), safety=EvalConfig(limit=20)))
    outcome.spectrum.results[0].total_intruders, outcome.safety.verdict["adapter"].label

The folder holds ``spectrum.json``, ``safety.json`` (unless the safety side is skipped),
``scan.json`` (safety-scan: by default whenever the safety side runs), ``index.html``,
``tables/*.csv`` and whatever ``extra_files`` adds; it is built in a temporary
sibling and moved into place only when every stage succeeded, and it never replaces a folder
lora-audit did not write (``lora_audit.io.atomic_dir``).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import InputError
from .io import atomic_dir, check_output_dir, check_outputs
from .progress import stage
from .results import fingerprint, write_result
from .results.safety import SafetyResult
from .results.spectrum import SpectrumResult
from .settings import SpectrumSettings

AUTO_SCAN_PROMPTS = 40
# Called after each stage with its name ("spectrum", "safety") and its result: the CLI prints summaries.
StageHook = Callable[[str, Any], None]


@dataclass
class AuditConfig:
    """Settings of the weight side (``spectrum``: the ``lora_audit.settings.SpectrumSettings`` that
    ``spectral.api.run_spectrum`` gets as it is; its device and allow_pickle also serve the safety-scan)
    and of the behavioural side (``safety``: a ``lora_audit.safety.EvalConfig``, or None to skip it)."""

    spectrum: SpectrumSettings = field(default_factory=SpectrumSettings)
    progress: bool = True
    safety: Any = None  # EvalConfig | None
    safety_models: Sequence[str] | None = None  # tuned labels the safety side evaluates (None: every one)
    title: str | None = None
    gate: Any = None  # results.gate.Gate | None: evaluated before the folder is written (``gate`` blocks)
    # safety-scan: a lora_audit.scan.ScanConfig (errors raise), None (never), or "auto": whenever the
    # safety side runs, on the scan's own prompts (builtin:scan-harmful / scan-harmless: never the
    # prompts safety-eval's labels come from) with the safety side's batch size and chat template, and
    # at least AUTO_SCAN_PROMPTS of each set whatever its limit (a direction needs more prompts than a
    # refusal rate; a forward pass costs little); a base it cannot scan (refuses nothing, an
    # architecture it does not know) skips it with a note
    scan: Any = "auto"


@dataclass
class AuditOutcome:
    out: Path
    spectrum: SpectrumResult
    safety: SafetyResult | None = None
    scan: Any = None  # SafetyScanResult | None
    files: dict[str, Path] = field(default_factory=dict)  # name -> path in the final folder
    notes: list[str] = field(default_factory=list)  # e.g. why the automatic safety-scan was skipped


def default_title(tuned: Sequence[str]) -> str:
    return f"lora-audit: {', '.join(Path(str(t).rstrip('/')).name for t in tuned)}"


def run_audit(base: str | os.PathLike, tuned: Sequence[str | os.PathLike], out: str | os.PathLike,
              config: AuditConfig | None = None, *, overwrite: bool = False, base_label: str | None = None,
              tuned_labels: Sequence[str] | None = None, on_stage: StageHook | None = None,
              extra_files: Callable[[SpectrumResult, SafetyResult | None], dict[str, Any]] | None = None,
              extra_results: Callable[[SpectrumResult, SafetyResult | None], dict[str, Any]] | None = None
              ) -> AuditOutcome:
    """Audit every TUNED against BASE and write the report folder ``out``.

    Args:
        base, tuned: as ``lora-audit spectrum`` / ``safety-eval`` take them.
        out: the output folder; an earlier lora-audit folder there is replaced only with ``overwrite``.
        base_label, tuned_labels: names in the results (default: the paths as given; the safety
            side names tuned models after their folders unless ``tuned_labels`` is given).
        on_stage: called with ("spectrum", SpectrumResult), ("safety", SafetyResult) and ("scan",
            SafetyScanResult, or the reason it was skipped as a string) as each stage ends, or with
            ("safety-not-applicable", reason) when the inputs are not a causal LM with full models or
            PEFT adapters (encoders, diffusion models, kohya files, LoRA expert sets): then only the
            weight side runs (no safety-eval, no safety-scan), and spectrum.json says why.
        extra_files: (spectrum, safety) -> {file name: result (``results.Result``)} written into the
            folder too, after the report (so it can time everything).
        extra_results: (spectrum, safety) -> {file name: typed result (``results.result_kinds``)},
            written into the folder and rendered in the report with the others (e.g. a study).
    Raises ``lora_audit.errors`` exceptions for bad inputs and outputs before any work.
    """
    from .results.gate import apply_gate
    from .spectral.api import run_spectrum

    cfg = config or AuditConfig()
    if cfg.gate is not None and "safety" in cfg.gate.kinds and cfg.safety is None:
        raise InputError(f"--fail-on {cfg.gate.expression!r} has safety conditions, but the safety audit is skipped")
    if cfg.gate is not None and "scan" in cfg.gate.kinds and (cfg.scan is None or (cfg.scan == "auto"
                                                                                   and cfg.safety is None)):
        raise InputError(f"--fail-on {cfg.gate.expression!r} has safety-scan conditions, but safety-scan is skipped")
    if cfg.gate is not None and "scan" in cfg.gate.kinds:
        from .scan.run import check_config

        check_config(_scan_config(cfg))  # a scan field the scan cannot give a value: an error before any work
    tuned = [str(t) for t in tuned]
    labels = [str(t) for t in tuned_labels] if tuned_labels else tuned
    safe = _safety_subset(labels, cfg.safety_models)  # type: ignore[arg-type]
    out = check_output_dir(out, overwrite=overwrite)
    check_outputs([], [base, *tuned], folders=[out])
    if cfg.safety is not None and cfg.safety.tasks and cfg.safety.task_dir:  # before any model is read
        from .safety.task_code import inspect_task_dir

        inspect_task_dir(cfg.safety.task_dir, trust=cfg.safety.trust_task_code)
    inputs = {"base": {"source": str(base), "fingerprint": fingerprint(base)}}
    inputs.update({t: {"source": t, "fingerprint": fingerprint(t)} for t in tuned})  # type: ignore[dict-item, misc]
    stage("audit: spectrum (intruder dimensions)")
    spectrum = run_spectrum(base, tuned, cfg.spectrum, progress=cfg.progress, base_label=base_label,  # type: ignore[arg-type]
                            tuned_labels=tuned_labels, extra_settings={"inputs": inputs})
    if on_stage:
        on_stage("spectrum", spectrum)
    safety = None
    not_applicable = None
    if cfg.safety is not None:
        from .checkpoints.models import behaviour_not_applicable

        not_applicable = behaviour_not_applicable(base, tuned)
    if not_applicable is not None:
        spectrum.warnings.append(f"behavioural side (safety-eval) does not apply: {not_applicable}; only the weight "
                                 "audit was run")
        if on_stage:
            on_stage("safety-not-applicable", not_applicable)
    base_l = None  # BASE loaded once for safety-eval and the automatic safety-scan (same device and options)
    if not_applicable is None and cfg.safety is not None:
        from .checkpoints import load_model
        from .safety.evaluate import run_safety_eval

        stage("audit: safety-eval (refusal, over-refusal, capability)")
        if cfg.safety.backend == "hf":
            base_l = load_model(str(base), device=cfg.safety.device, allow_pickle=cfg.safety.allow_pickle,
                                options=cfg.safety.load)
        safety = run_safety_eval(base_l or str(base), [tuned[i] for i in safe], cfg.safety,  # type: ignore[misc]
                                 names=[labels[i] for i in safe] if tuned_labels else None)  # type: ignore[misc]
        if on_stage:
            on_stage("safety", safety)
    if not_applicable is None and not (cfg.scan is None or (cfg.scan == "auto" and cfg.safety is None)):
        stage("audit: safety-scan (risk from weights)")
    scan, notes = (None, []) if not_applicable is not None else _scan(base, tuned, cfg, tuned_labels, base_l)  # type: ignore[arg-type]
    if on_stage and (scan is not None or notes):
        on_stage("scan", scan if scan is not None else notes[0])
    if cfg.gate is not None:
        if "scan" in cfg.gate.kinds and scan is None:
            why = notes[0] if notes else f"the behavioural side does not apply ({not_applicable})"
            raise InputError(f"--fail-on {cfg.gate.expression!r} has safety-scan conditions, but safety-scan did not "
                             f"run: {why}")
        apply_gate(cfg.gate, spectrum=spectrum, safety=safety, scan=scan)
    extra = extra_results(spectrum, safety) if extra_results else {}
    if scan is not None:
        extra = {"scan.json": scan, **extra}
    stage("audit: report")
    files = _write_folder(out, spectrum, safety, extra, cfg.title or default_title(tuned), overwrite, extra_files)  # type: ignore[arg-type]
    return AuditOutcome(out=out, spectrum=spectrum, safety=safety, scan=scan, files=files, notes=notes)


def _safety_subset(labels: list[str], wanted: Sequence[str] | None) -> list[int]:
    """Indices of the tuned models the safety side evaluates; InputError for a name not among them."""
    if wanted is None:
        return list(range(len(labels)))
    unknown = [w for w in wanted if w not in labels]
    if unknown:
        raise InputError(f"safety_models: {', '.join(unknown)} not among the tuned models ({', '.join(labels)})")
    return [i for i, name in enumerate(labels) if name in wanted]


def _scan(base, tuned: list[str], cfg: AuditConfig, labels: Sequence[str] | None, base_l=None):
    """(safety-scan result or None, notes) as ``cfg.scan`` asks (``AuditConfig``); the automatic
    scan reuses ``base_l``, BASE as the safety side loaded it."""
    if cfg.scan is None or (cfg.scan == "auto" and cfg.safety is None):
        return None, []
    from .scan import run_safety_scan

    scfg = _scan_config(cfg)
    if cfg.scan == "auto":
        try:  # BASE as the safety side loaded it: the same device and load options
            return run_safety_scan(str(base), tuned, scfg, names=list(labels) if labels else None,
                                   loaded_base=base_l), []
        except InputError as e:
            return None, [f"safety-scan skipped: {e}"]
    return run_safety_scan(str(base), tuned, scfg, names=list(labels) if labels else None), []


def _scan_config(cfg: AuditConfig):
    """The ScanConfig of the audit's scan (``AuditConfig.scan``), with the gate's scan fields."""
    from dataclasses import replace

    from .scan import ScanConfig

    fields = tuple(c.field.name for c in cfg.gate.conditions if c.field.kind == "scan") if cfg.gate is not None else ()
    if cfg.scan != "auto":
        return replace(cfg.scan, gate_fields=fields)
    sc = cfg.safety
    limit = None if sc.limit is None else max(sc.limit, AUTO_SCAN_PROMPTS)
    return ScanConfig(limit=limit, batch_size=sc.batch_size, device=sc.device, seed=sc.seed,
                      chat_template=sc.chat_template, allow_pickle=cfg.spectrum.allow_pickle,
                      max_prompt_chars=sc.max_prompt_chars, gate_fields=fields, load=sc.load)


def _write_folder(out: Path, spectrum: SpectrumResult, safety: SafetyResult | None, extra: dict[str, Any], title: str,
                  overwrite: bool, extra_files) -> dict[str, Path]:
    from .report import all_tables, gather, render, write_csvs

    results = {"spectrum.json": spectrum, **({"safety.json": safety} if safety is not None else {}), **extra}
    names = list(results)
    with atomic_dir(out, overwrite=overwrite, what="audit") as tmp:
        for name, result in results.items():
            result.write_json(tmp / name)
        data = gather([tmp / n for n in names], title=title, labels=names)  # labels: as found next to the report
        tables = all_tables(data)
        (tmp / "index.html").write_text(render(data, "html", tables), encoding="utf-8")
        write_csvs(tables, tmp / "tables")
        for name, obj in (extra_files(spectrum, safety) if extra_files else {}).items():
            write_result(tmp / name, obj)
        written = sorted(p.name for p in tmp.iterdir())
    return {name: out / name for name in written}
