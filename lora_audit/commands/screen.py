"""``lora-audit screen``: many adapters of one base, audited as one resumable job.

Thin: parse options, find the adapters (``lora_audit.screen.discover`` / ``read_manifest``), call
``lora_audit.screen.run_screen``, print the top of the ranking. torch, the loaders and Ray are
imported inside the command.
"""

from __future__ import annotations

import click

from ..text import printable
from ._common import (CONTEXT, check_paths, device_option, echo, epsilon_option, exit_code, exit_status,
                      fail_on_option, json_option, k_option, out_option, overwrite_option, quiet, sarif_option,
                      user_errors, verbosity_options, write_json_output)
from .spectrum import sweep_option

SHOWN = 10


@click.command("screen", context_settings=CONTEXT)
@click.argument("base")
@click.argument("adapters", nargs=-1, metavar="[ADAPTER_DIR]...")
@click.option("--manifest", type=click.Path(dir_okay=False), default=None,
              help="A text file with one adapter per line (a path relative to the file, or a hub id), "
                   "optionally followed by a TAB and a name; instead of or besides ADAPTER_DIR.")
@out_option("The screen folder: records as they finish, then summary.csv, summary.json, report.html.",
            required=True)
@json_option("the summary (as FOLDER/summary.json)")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: worker processes on this machine; ray: Ray tasks (pip install 'lora-auditor[ray]').")
@click.option("--address", default=None,
              help="With --engine ray: the cluster to join (auto, HOST:6379 or ray://HOST:10001) "
                   "[default: a running runtime, else a new local one].")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="local: worker processes (0: in this process) [default: one per GPU, else one per CPU core]; "
                   "ray: adapters at once [default: the cluster's CPUs, or GPUs].")
@click.option("--spectra", type=click.Choice(["object-store", "cache"]), default=None,
              help="With --engine ray, how workers get the base's spectra: object-store (put once, shared "
                   "without copies on each node) or cache (read from --cache-dir, which every node must mount, "
                   "with the same cache key file) [default: object-store].")
@click.option("--resume", is_flag=True,
              help="Continue the screen in --out: adapters whose result is stored and whose files are unchanged "
                   "are skipped.")
@click.option("--retry-failed", is_flag=True, help="With --resume: audit again the adapters stored as failed.")
@overwrite_option
@k_option
@epsilon_option
@sweep_option
@device_option
@click.option("--exact", is_flag=True, help="Always run the paper's two-SVD algorithm (no fast paths).")
@click.option("--float64", "float64", is_flag=True, help="Compute SVDs in float64 instead of float32.")
@click.option("--include-embeddings", is_flag=True, help="Also audit embeddings and lm_head.")
@click.option("--no-metrics", "no_metrics", is_flag=True,
              help="Skip effective/stable rank of dense and DoRA updates (LoRA updates always get them).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Base-spectrum cache folder [default: ~/.cache/lora-audit/spectra, or $LORA_AUDIT_CACHE/spectra].")
@click.option("--detail", type=click.IntRange(min=0), default=10, show_default=True,
              help="Write a detail page (the per-matrix report) for the top this many adapters.")
@click.option("--title", default=None, help="Title of report.html.")
@verbosity_options
@fail_on_option("spectrum", "screen", example="intruders>0")
@sarif_option
@user_errors
def screen(base, adapters, manifest, out, json_path, engine, address, workers, spectra, resume, retry_failed, overwrite, k,
           epsilon, epsilon_sweep, device, exact, float64, include_embeddings, no_metrics, cache_dir, detail, title,
           fail_on, sarif_path):
    """Audit many adapters of BASE, each as 'lora-audit spectrum BASE ADAPTER' would, as one job.

    \b
    ADAPTER_DIR...: folders searched for adapters (PEFT folders, kohya/diffusers .safetensors files,
    fine-tuned model folders: anything 'spectrum' takes as TUNED), or adapters themselves.
    Each adapter's result is stored in --out the moment it is done; a killed screen loses only
    the adapters in flight, and --resume continues it. An adapter that cannot be read is
    recorded as failed with the reason, and the screen goes on (exit code 4 at the end, as for
    an adapter with matrices that could not be measured: NaN/Inf values).
    The ranking (most intruders, then largest relative update |dW|/|W0|) is in summary.csv,
    summary.json and report.html.

    \b
    Examples:
      lora-audit screen ./base ./adapters --out screens/base
      lora-audit screen ./base --manifest adapters.txt --out screens/base --resume
      lora-audit screen ./base ./adapters --out screens/base --engine ray --address auto
      lora-audit screen ./base ./adapters --out screens/base --fail-on 'failed==true' --sarif screen.sarif
    """
    from ..errors import InputError
    from ..screen import ScreenConfig, discover, read_manifest, run_screen
    from ..settings import SpectrumSettings

    if not adapters and manifest is None:
        raise click.UsageError("give ADAPTER_DIR... or --manifest FILE")
    if resume and overwrite:
        raise click.UsageError("--resume continues the screen in --out and --overwrite starts it again: pick one")
    if retry_failed and not resume:
        raise click.UsageError("--retry-failed needs --resume")
    if (address or spectra) and engine != "ray":
        raise click.UsageError("--address and --spectra are for --engine ray")
    check_paths(files=[json_path, sarif_path], inputs=[base, *adapters, manifest, out])
    entries, notes = discover(adapters, exclude=[base, out]) if adapters else ([], [])
    if manifest is not None:
        entries += read_manifest(manifest)
    if not entries:
        raise InputError("no adapters found: " + "; ".join(notes) if notes else "the manifest lists no adapter")
    settings = SpectrumSettings(k=k, epsilon=epsilon, epsilon_sweep=epsilon_sweep, exact=exact, float64=float64,
                                include_embeddings=include_embeddings, dense_metrics=not no_metrics, device=device,
                                cache_dir=cache_dir)
    cfg = ScreenConfig(spectrum=settings, engine=engine, address=address, workers=workers, spectra=spectra,
                       resume=resume, retry_failed=retry_failed, overwrite=overwrite, detail=detail, title=title,
                       progress=not quiet(), gate=fail_on)
    outcome = run_screen(base, entries, out, cfg, warnings=notes)
    write_json_output(json_path, outcome.summary)
    tripped = fail_on is not None and outcome.summary.gate.tripped
    if sarif_path is not None:
        from ..report.sarif import sarif_log, screen_findings, write_sarif

        write_sarif(sarif_path, sarif_log(screen=outcome.summary, extra=screen_findings(outcome.summary, outcome.findings),
                                          exit_code=exit_code(incomplete=outcome.failed > 0, gate_tripped=tripped)))
    echo(format_summary(outcome, quiet=quiet()))
    if sarif_path is not None and not quiet():
        echo(f"SARIF written to {sarif_path}")
    if fail_on is not None:
        from ..results.gate import format_gate

        echo(format_gate(fail_on, [outcome.summary.gate]))
        tripped = outcome.summary.gate.tripped
    exit_status(incomplete=outcome.failed > 0 or outcome.incomplete > 0, gate_tripped=tripped)


def format_summary(outcome, *, quiet: bool = False) -> str:
    """Counts, the top of the ranking and the failures, and where the files are (names printable)."""
    s = outcome.summary
    c = s.counts
    rate = f", {c['audited_now'] / (s.seconds / 60):.0f} adapters/min" if s.seconds > 0 and c["audited_now"] else ""
    lines = [f"Screened {c['adapters']} adapters of {printable(s.base)}: {c['ok']} ok, {c['failed']} failed "
             f"({c['audited_now']} audited now, {c['skipped_stored']} from the store; {s.seconds:.1f} s{rate})"]
    if not quiet:
        ok = [r for r in s.adapters if r.status == "ok"][:SHOWN]
        if ok:
            width = max(len(printable(r.name)[:50]) for r in ok)
            lines += ["", f"{'#':>4}  {'adapter':<{width}}  {'intruders':>9}  {'|dW|/|W0|':>9}  min max|cos|"]
            for r in ok:
                rel = f"{r.relative_delta_norm:.3g}" if r.relative_delta_norm is not None else "-"
                cos = f"{r.min_max_cos:.3f}" if r.min_max_cos is not None else "-"
                lines.append(f"{r.position:>4}  {printable(r.name)[:50]:<{width}}  {r.total_intruders:>9}  {rel:>9}  "
                             f"{cos:>12}")
        failed = [r for r in s.adapters if r.status != "ok"]
        if failed:
            lines += ["", f"Failed ({len(failed)}):"]
            lines += [f"  {printable(r.name)}: {printable(r.error)}" for r in failed[:SHOWN]]
            if len(failed) > SHOWN:
                lines.append(f"  ... and {len(failed) - SHOWN} more (summary.csv)")
        partial = [r for r in s.adapters if r.status == "ok" and r.unmeasured]
        if partial:
            lines += ["", f"Incomplete ({len(partial)}): matrices not measured (NaN/Inf values), see each record"]
            lines += [f"  {printable(r.name)}: {r.unmeasured} of {r.unmeasured + (r.matrices_audited or 0)} "
                      "matrices" for r in partial[:SHOWN]]
            if len(partial) > SHOWN:
                lines.append(f"  ... and {len(partial) - SHOWN} more (summary.csv, column unmeasured)")
        if s.warnings:
            lines += ["", "Warnings:"] + [f"  {printable(w)}" for w in s.warnings[:SHOWN]]
    lines += ["", f"Summary: {outcome.out / 'summary.csv'}, {outcome.out / 'summary.json'}; "
                  f"report: {outcome.out / 'report.html'}"]
    return "\n".join(lines)
