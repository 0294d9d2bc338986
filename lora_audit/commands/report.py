"""``lora-audit report`` (result JSON -> one self-contained HTML or Markdown file) and
``lora-audit audit`` (spectrum + safety-eval + report in one go, into one folder).

Thin: options -> ``lora_audit.report.build_report`` / ``lora_audit.audit.run_audit``.
"""

from __future__ import annotations

import re
from pathlib import Path

import click

from ._common import (CONTEXT, allow_pickle_option, check_paths, device_option, echo, epsilon_option, exit_code,
                      exit_status, fail_on_option, k_option, out_option, overwrite_option, quiet, report_gate,
                      sarif_option, seed_option, user_errors, verbosity_options)
from .spectrum import sweep_option

REPORTS_DIR = Path("reports")


def _slug(text: str) -> str:
    s = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-.")
    return s[:80] or "report"


@click.command("report", context_settings=CONTEXT)
@click.argument("results", nargs=-1, required=True, type=click.Path(dir_okay=False))
@out_option("Output file [default: reports/<first result's name>.html, or .md].", folder=False)
@click.option("--title", default=None, help="Report title [default: 'lora-audit report'].")
@click.option("--format", "fmt", type=click.Choice(["html", "md"]), default=None,
              help="html: one self-contained page with figures; md: a Markdown summary (tables only) "
                   "[default: md when --out ends in .md, else html].")
@click.option("--csv-dir", type=click.Path(file_okay=False), default=None,
              help="New folder for a CSV of every table [default: <out stem>-tables/ next to the output].")
@click.option("--no-csv", is_flag=True, help="Do not export the tables as CSV.")
@overwrite_option
@verbosity_options
@user_errors
def report(results, out, title, fmt, csv_dir, no_csv, overwrite):
    """Render RESULTS into one report: JSON files written by 'spectrum --json' and/or
    'safety-eval --json', in any order and number.

    \b
    The HTML file has inline CSS and SVG figures and no network references: it opens from disk
    and can be attached to a release decision. It starts with one verdict line per tuned model
    (intruder dimensions, refusal drop with its 95% interval, capability change) and what was run
    (tool version, git hash, input hashes, settings); then the spectrum section (intruders vs
    epsilon, layer x module heat maps, |cos| heat maps of the worst matrices, singular values,
    effective rank of dW per layer) and the safety section (refusal with intervals, per category,
    over-refusal, capability, collapsed response samples). Many tuned models are compared side
    by side, most risky first.

    \b
    Examples:
      lora-audit report spectrum.json safety.json --out reports/my-finetunes.html
      lora-audit report spectrum.json --format md --title "LoRA vs full fine-tuning"
    """
    from ..report import build_report, default_csv_dir

    if fmt is None:
        fmt = "md" if out is not None and Path(out).suffix.lower() in (".md", ".markdown") else "html"
    out = Path(out) if out is not None else REPORTS_DIR / f"{_slug(Path(results[0]).stem)}.{fmt}"
    csv_target = None if no_csv else (Path(csv_dir) if csv_dir else default_csv_dir(out))
    check_paths(files=[out], folders=[csv_target], inputs=results, overwrite=overwrite)
    path = build_report(list(results), out=out, title=title, fmt=fmt, csv_dir=csv_target or False,
                        overwrite=overwrite)
    echo(f"Report written to {path}")
    if csv_target is not None and not quiet():
        echo(f"Tables (CSV) in {csv_target}")


@click.command("audit", context_settings=CONTEXT)
@click.argument("base")
@click.argument("tuned", nargs=-1, required=True)
@out_option("Output folder, written atomically [default: reports/<first TUNED's name>/].")
@overwrite_option
@click.option("--title", default=None, help="Report title.")
@k_option
@epsilon_option
@sweep_option
@click.option("--exact", is_flag=True, help="Always run the paper's two-SVD algorithm (no fast paths).")
@click.option("--no-cache", is_flag=True, help="Do not read or write the base-spectrum cache.")
@click.option("--skip-safety", is_flag=True, help="Only the spectrum audit (no generation, no safety-scan).")
@click.option("--skip-scan", is_flag=True, help="No safety-scan (it runs with the safety side by default).")
@click.option("--prompts", default="builtin:harmful", show_default=True,
              help="Harmful prompts (any format 'lora-audit safety-eval' reads).")
@click.option("--benign", default="builtin:benign", show_default=True,
              help="Benign look-alike prompts for over-refusal; 'none' to skip.")
@click.option("--scorer", type=click.Choice(["keyword", "first-token"]), default="keyword", show_default=True,
              help="How a response is classified as a refusal (the judge scorer: use safety-eval).")
@click.option("--tasks", default=None,
              help="Comma-separated lm-eval tasks [default: the built-in offline task]; 'none' to skip.")
@click.option("--task-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of local lm-eval task YAML files.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N prompts / task items.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True)
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@allow_pickle_option
@device_option
@seed_option
@verbosity_options
@fail_on_option("spectrum", "safety", "scan", example="verdict>=SAFETY_DEGRADED")
@sarif_option
@user_errors
def audit(base, tuned, out, overwrite, title, k, epsilon, epsilon_sweep, exact, no_cache, skip_safety, skip_scan, prompts,
          benign, scorer, tasks, task_dir, limit, max_new_tokens, batch_size, allow_pickle, device, seed, fail_on,
          sarif_path):
    """Audit TUNED models against BASE in one go: intruder dimensions (spectrum), refusal /
    over-refusal / capability (safety-eval), the safety-undo risk from weights (safety-scan) and
    the HTML report.

    \b
    Writes into the --out folder: spectrum.json, safety.json and scan.json (unless --skip-safety
    / --skip-scan), index.html (open it in a browser) and tables/*.csv. Nothing is written if a
    step fails; a base safety-scan cannot read (it refuses nothing, say) skips the scan with a note.
    The behavioural side needs a causal language model with full models or PEFT adapters; for
    encoders, encoder-decoders, vision and diffusion models, kohya/diffusers LoRA files and LoRA
    expert sets only the weight side runs, and the output says so.

    \b
    Examples:
      lora-audit audit ./SmolLM2-135M-Instruct ./adapter-a ./adapter-b --out reports/ab/
      lora-audit audit BASE ./adapter --fail-on 'intruders>20' --fail-on 'verdict>=SAFETY_DEGRADED' --sarif audit.sarif
    """
    from ..audit import AuditConfig, run_audit
    from ..device import resolve_device

    if fail_on is not None and skip_safety and fail_on.kinds & {"safety", "scan"}:
        raise click.UsageError(f"--fail-on '{fail_on.expression}' has safety or safety-scan conditions, but "
                               "--skip-safety skips both")
    if fail_on is not None and skip_scan and "scan" in fail_on.kinds:
        raise click.UsageError(f"--fail-on '{fail_on.expression}' has safety-scan conditions, but --skip-scan "
                               "skips the scan")
    dev = str(resolve_device(device))
    out = Path(out) if out is not None else REPORTS_DIR / _slug(Path(str(tuned[0]).rstrip("/")).name)
    check_paths(files=[sarif_path], folders=[out], inputs=[base, *tuned], overwrite=overwrite)
    safety_cfg = None
    if not skip_safety:
        from ..safety.capability import parse_tasks
        from ..safety.evaluate import EvalConfig

        safety_cfg = EvalConfig(prompts=prompts, benign=None if benign.strip().lower() in ("", "none") else benign,
                                scorer=scorer, tasks=parse_tasks(tasks), task_dir=task_dir, limit=limit,
                                batch_size=batch_size, max_new_tokens=max_new_tokens, device=dev, seed=seed,
                                allow_pickle=allow_pickle)
    cfg = AuditConfig(k=k, epsilon=epsilon, epsilon_sweep=epsilon_sweep, exact=exact, use_cache=not no_cache,
                      allow_pickle=allow_pickle, device=dev, progress=not quiet(), safety=safety_cfg, title=title,
                      gate=fail_on, scan=None if skip_scan else "auto")
    outcome = run_audit(base, list(tuned), out, cfg, overwrite=overwrite, on_stage=lambda s, r: _print_stage(s, r, quiet()))
    results = (outcome.spectrum, outcome.safety, outcome.scan)
    gates = [r.gate for r in results if r is not None and r.gate is not None]
    tripped = any(g.tripped for g in gates)
    incomplete = outcome.spectrum.incomplete
    if sarif_path is not None:
        from ..report.sarif import sarif_log, write_sarif

        write_sarif(sarif_path, sarif_log(spectrum=outcome.spectrum, safety=outcome.safety, scan=outcome.scan,
                                          exit_code=exit_code(incomplete=incomplete, gate_tripped=tripped)))
    echo(f"\nReport written to {outcome.out / 'index.html'} (results and tables/ in {outcome.out})")
    if sarif_path is not None:
        echo(f"SARIF written to {sarif_path}")
    report_gate(fail_on, gates, json_path=None)
    exit_status(incomplete=incomplete, gate_tripped=tripped)


def _print_stage(stage: str, result, quiet: bool) -> None:
    if stage == "spectrum":
        from .spectrum import format_summary

        echo(format_summary(result, quiet=quiet))
    elif stage == "safety":
        from ..results.safety import summary_table

        echo("")
        echo(summary_table(result))
    elif stage == "safety-not-applicable":
        echo(f"\nBehavioural side (safety-eval): does not apply; {result}. Only the weight audit was run.")
    elif stage == "scan":
        from ..results.scan import summary_table as scan_table

        echo("")
        echo(result if isinstance(result, str) else scan_table(result))
