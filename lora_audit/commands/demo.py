"""``lora-audit demo``: the embedded default run (see ``lora_audit.demo``)."""

from __future__ import annotations

import click

from ._common import (CONTEXT, check_paths, device_option, echo, json_option, overwrite_option, seed_option,
                      user_errors, write_json_output)


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
    point per method; safety-scan's risk for every model) and write the report OUT/index.html
    with the study's figures (intruders and lowest max|cos| against the learning rate) and
    claims. Trained models are cached per run and reused; --fresh retrains.

    \b
    Example:
      lora-audit demo --quick --out reports/demo-quick
    """
    from ..demo import format_findings, run_demo

    check_paths(files=[json_path], folders=[out], inputs=[base], overwrite=overwrite)
    summary = run_demo(out, quick=quick, device=device, seed=seed, fresh=fresh, base=base, overwrite=overwrite,
                       echo=echo)
    write_json_output(json_path, summary)
    if json_path != "-":
        echo(format_findings(summary))
        echo(f"Report: {out}/index.html")
