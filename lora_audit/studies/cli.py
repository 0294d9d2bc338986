"""The studies' commands, ``lora-audit demo`` and ``lora-audit zoo``.

They reach the ``lora-audit`` command line as plugins: pyproject.toml registers them under the
entry-point group ``lora_audit.commands``, which ``lora_audit.cli`` reads. The product names no
study; the studies use the product like any other client (``lora_audit.commands._common``'s
shared options included).
"""

from __future__ import annotations

import click

from ..commands._common import (CONTEXT, check_paths, device_option, echo, json_option, overwrite_option,
                                seed_option, user_errors, write_json_output)


@click.command(context_settings=CONTEXT)
@click.option("--out", default="reports/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for index.html, spectrum.json, safety.json, scan.json, study.json, demo.json and "
                   "tables/.")
@overwrite_option
@click.option("--quick", is_flag=True,
              help="One LoRA and one full fine-tuning point of the study, fewer steps and prompts (about 4 minutes "
                   "on a 2-core CPU).")
@click.option("--fresh", is_flag=True, help="Retrain every model instead of reusing the cached ones.")
@click.option("--base", type=click.Path(), default=None,
              help="Run the demo on this local model folder instead of SmolLM2-135M-Instruct.")
@json_option("the demo summary (also written to OUT/demo.json)")
@seed_option
@device_option
@user_errors
def demo(out, overwrite, quick, fresh, base, json_path, seed, device):
    """Reproduce the papers' findings on SmolLM2-135M-Instruct, offline.

    \b
    Stages: convert the model from its GGUF; safety-tune it (the "released" model); fine-tune
    the released model on a small task set over a grid fixed in code (LoRA r=8 and rsLoRA r=64 at
    three learning rates, full fine-tuning at three), and with LoRA on compliance examples (the
    safety-undo attack); audit all of them against the released model (intruder dimensions with
    calibrated statistics; refusal, over-refusal and lm-eval capability for the undo run and one
    point per method; safety-scan's refusal edits and first-token proxy for every model) and write
    the report OUT/index.html
    with the study's figures (intruders and lowest max|cos| against the learning rate) and
    claims. Trained models are cached per run and reused; --fresh retrains.

    \b
    Example:
      lora-audit demo --quick --out reports/demo-quick
    """
    from .demo import format_findings, run_demo

    check_paths(files=[json_path], folders=[out], inputs=[base], overwrite=overwrite)
    summary = run_demo(out, quick=quick, device=device, seed=seed, fresh=fresh, base=base, overwrite=overwrite,
                       echo=echo)
    write_json_output(json_path, summary)
    if json_path != "-":
        echo(format_findings(summary))
        echo(f"Report: {out}/index.html")


@click.command("zoo", context_settings=CONTEXT,
               short_help="Build the labelled panel of fine-tunes safety-scan is validated on.")
@click.argument("out", default="reports/zoo")
@click.option("--quick", is_flag=True, help="A small panel (6 fine-tunes, 12 prompts per set): minutes, for a try.")
@click.option("--fresh", is_flag=True, help="Retrain the panel's models instead of reusing cached ones.")
@click.option("--write-risk-file", type=click.Path(dir_okay=False), default=None, metavar="PATH",
              help="Also write the risk model fitted on the panel there, with its held-out validation record, kept or "
                   "not: safety-scan shows its risk only when that record passes (the packaged file is "
                   "lora_audit/data/scan/risk.json).")
@overwrite_option
@device_option
@user_errors
def zoo(out, quick, fresh, write_risk_file, overwrite, device):
    """Build the labelled panel safety-scan is validated on: a safety-tuned 'released' SmolLM2-135M-
    Instruct, fine-tunes of it with graded safety loss (benign LoRA / rsLoRA / DoRA / full runs at
    several rates and lengths, undo runs of several strengths, undo data mixed with benign data,
    abliteration edits), each labelled by safety-eval (refusal drop, keyword scorer) and scanned.
    Writes OUT/panel.json and OUT/README.md with, for every signal, its Spearman correlation with
    the refusal drop, its AUROC for a drop of 30 points or more, leave-one-method-out figures, and
    the time per model against safety-eval's. Trained models are cached; a re-run reuses them.
    """
    from .zoo import build_panel

    check_paths(folders=[out], files=[write_risk_file], overwrite=overwrite)
    summary = build_panel(out, quick=quick, fresh=fresh, device=device, overwrite=overwrite,
                          risk_file=write_risk_file, echo=echo)
    echo(summary)
