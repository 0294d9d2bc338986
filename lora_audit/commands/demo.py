"""``lora-audit demo``: the embedded default run (see ``lora_audit.demo``)."""

from __future__ import annotations

import click

from ._common import device_option, seed_option, user_errors


@click.command()
@click.option("--out", default="reports/demo", show_default=True, type=click.Path(file_okay=False),
              help="Folder for index.html, spectrum.json, safety.json, demo.json and tables/.")
@click.option("--quick", is_flag=True, help="Fewer steps, models and prompts (about 3 minutes on a 2-core CPU).")
@click.option("--fresh", is_flag=True, help="Retrain every model instead of reusing the cached ones.")
@click.option("--base", type=click.Path(), default=None,
              help="Run the demo on this local model folder instead of SmolLM2-135M-Instruct.")
@seed_option
@device_option
@user_errors
def demo(out, quick, fresh, base, seed, device):
    """Reproduce the papers' findings on SmolLM2-135M-Instruct, offline.

    \b
    Stages: convert the model from its GGUF; safety-tune it (the "released" model); fine-tune
    the released model with LoRA r=8, rsLoRA r=64 and full fine-tuning on a small task set, and
    LoRA on compliance examples (the safety-undo attack); audit all of them against the released
    model (intruder dimensions, refusal and over-refusal, lm-eval capability) and write the report
    OUT/index.html. Trained models are cached and reused; --fresh retrains.

    \b
    Example:
      lora-audit demo --quick --out reports/demo-quick
    """
    from ..demo import format_findings, run_demo

    summary = run_demo(out, quick=quick, device=device, seed=seed, fresh=fresh, base=base, echo=click.echo)
    click.echo(format_findings(summary))
    click.echo(f"Report: {out}/index.html")
