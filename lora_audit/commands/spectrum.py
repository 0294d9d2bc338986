"""``lora-audit spectrum``: the intruder-dimension audit of tuned models against their base.

Thin: parse and check options, call ``lora_audit.spectral.api.run_spectrum``, write JSON/CSV
atomically after success, print a summary. torch and the loaders are imported inside the command
so ``lora-audit --help`` stays fast.
"""

from __future__ import annotations

import math

import click

from ..text import printable
from ._common import (CONTEXT, allow_pickle_option, check_paths, device_option, echo, epsilon_option, exit_code,
                      exit_status, fail_on_option, file_path, json_option, k_option, out_files, out_option, quiet,
                      report_gate, sarif_option, user_errors, verbosity_options, write_json_output)

DEFAULT_SWEEP = "0.1,0.2,...,0.9"
MAX_SWEEP = 1000  # thresholds in one sweep: a count per threshold per matrix is stored in the JSON


def _number(tok: str) -> float:
    try:
        v = float(tok)
    except ValueError:
        raise ValueError(f"{tok!r} is not a number") from None
    if not 0.0 < v < 1.0:  # also refuses nan and inf
        raise ValueError(f"every epsilon must lie strictly between 0 and 1, got {tok}")
    return v


def parse_sweep(text: str) -> tuple[float, ...]:
    """"0.1,0.3,0.5" -> (0.1, 0.3, 0.5); "0.1,0.2,...,0.9" -> 0.1 to 0.9 in steps of 0.1;
    "none" or "" -> (). Values must lie strictly between 0 and 1, and a sweep has at most
    ``MAX_SWEEP`` thresholds; both are checked before a progression is expanded (ValueError)."""
    text = (text or "").strip()
    if text.lower() in ("", "none"):
        return ()
    tokens = [t.strip() for t in text.split(",") if t.strip()]
    if len(tokens) > MAX_SWEEP:
        raise ValueError(f"at most {MAX_SWEEP} thresholds in a sweep, got {len(tokens)}")
    values: list[float] = []
    for i, tok in enumerate(tokens):
        if tok not in ("...", "…"):
            values.append(_number(tok))
            continue
        if len(values) < 2 or i + 1 >= len(tokens) or tokens[i + 1] in ("...", "…"):
            raise ValueError("'...' needs two values before it and one after, e.g. 0.1,0.2,...,0.9")
        a, b, end = values[-2], values[-1], _number(tokens[i + 1])
        step = b - a
        if step <= 0 or end <= b:
            raise ValueError(f"'{a:g},{b:g},...,{end:g}' is not an increasing progression")
        n = math.floor((end - b) / step + 1e-9)
        if len(values) + n > MAX_SWEEP:
            raise ValueError(f"'{a:g},{b:g},...,{end:g}' has {n + 2} thresholds; at most {MAX_SWEEP} in a sweep")
        values += [round(b + j * step, 10) for j in range(1, n + 1) if b + j * step < end - 1e-9]
    return tuple(sorted(set(values)))


def _sweep_callback(ctx, param, value):
    try:
        return parse_sweep(value)
    except ValueError as e:
        raise click.BadParameter(str(e), ctx=ctx, param=param) from None


def sweep_option(f):
    return click.option("--epsilon-sweep", "epsilon_sweep", default=DEFAULT_SWEEP, show_default=True,
                        callback=_sweep_callback,
                        help="Further thresholds to count at: comma-separated values in (0, 1), "
                             "'a,b,...,c' for a progression, or 'none'.")(f)


@click.command("spectrum", context_settings=CONTEXT)
@click.argument("base")
@click.argument("tuned", nargs=-1, required=True)
@k_option
@epsilon_option
@sweep_option
@json_option("the full result (per matrix cosines, metrics, provenance)")
@click.option("--csv", "csv_path", default=None, callback=file_path,
              help="Write one row per tuned model x matrix to this CSV file.")
@out_option("Write spectrum.json, spectrum.csv and spectrum.sarif into FOLDER (created if needed); --json, "
            "--csv and --sarif given explicitly win.")
@device_option
@click.option("--exact", is_flag=True, help="Always run the paper's two-SVD algorithm (no fast paths).")
@click.option("--float64", "float64", is_flag=True, help="Compute SVDs in float64 instead of float32.")
@click.option("--include-embeddings", is_flag=True, help="Also audit embeddings and lm_head (excluded by default, as in the paper).")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Base-spectrum cache folder [default: ~/.cache/lora-audit/spectra, or $LORA_AUDIT_CACHE/spectra].")
@click.option("--no-cache", is_flag=True, help="Do not read or write the base-spectrum cache.")
@allow_pickle_option
@click.option("--no-metrics", "no_metrics", is_flag=True,
              help="Skip effective/stable rank of dense and DoRA updates (each costs a full SVD of dW); "
                   "LoRA updates always get them.")
@verbosity_options
@fail_on_option("spectrum", example="intruders>0")
@sarif_option
@user_errors
def spectrum(base, tuned, k, epsilon, epsilon_sweep, json_path, csv_path, out, device, exact, float64,
             include_embeddings, cache_dir, no_cache, allow_pickle, no_metrics, fail_on, sarif_path):
    """Intruder-dimension audit of TUNED models against BASE (Shuttleworth et al. 2024).

    \b
    An intruder dimension is one of the top-k singular vectors of a tuned weight matrix that has
    no counterpart (max |cos| < epsilon) among the base matrix's singular vectors.

    BASE: a Hugging Face model folder, a .safetensors file, a GGUF file or a hub id. Each TUNED:
    the same kinds, or a PEFT adapter folder (applied to BASE). Every 2-D weight that differs is
    audited; the summary names the models and matrices with the most intruders. Structural red
    flags of the tuned files (full matrices in adapters, router LoRA, declared vs actual ranks and
    modules, executable files, base mismatch, scale) are found first, from headers and configs.

    \b
    Examples:
      lora-audit spectrum ./base ./adapter ./full-ft --json spectrum.json --csv spectrum.csv
      lora-audit spectrum ./base ./adapter --fail-on 'intruders>0' --fail-on 'structural>0' --sarif audit.sarif
      lora-audit spectrum ./base ./adapter -o results/ -q
    """
    from ..results.gate import apply_gate
    from ..spectral.api import run_spectrum

    paths = out_files(out, {"json": "spectrum.json", "csv": "spectrum.csv", "sarif": "spectrum.sarif"},
                      {"json": json_path, "csv": csv_path, "sarif": sarif_path})
    json_path, csv_path, sarif_path = paths["json"], paths["csv"], paths["sarif"]
    check_paths(files=[json_path, csv_path, sarif_path], inputs=[base, *tuned])
    result = run_spectrum(base, list(tuned), k=k, epsilon=epsilon, epsilon_sweep=epsilon_sweep, device=device,
                          exact=exact, float64=float64, include_embeddings=include_embeddings, cache_dir=cache_dir,
                          use_cache=not no_cache, allow_pickle=allow_pickle, dense_metrics=not no_metrics,
                          progress=not quiet())
    outcomes = apply_gate(fail_on, spectrum=result) if fail_on is not None else []
    tripped = any(o.tripped for o in outcomes)
    write_json_output(json_path, result)
    if csv_path is not None:
        result.write_csv(csv_path)
    if sarif_path is not None:
        from ..report.sarif import sarif_log, write_sarif

        write_sarif(sarif_path, sarif_log(spectrum=result, exit_code=exit_code(incomplete=result.incomplete,
                                                                                  gate_tripped=tripped)))
    echo(format_summary(result, quiet=quiet()))
    for label, p in (("JSON", json_path), ("CSV", csv_path), ("SARIF", sarif_path)):
        if p is not None and p != "-" and not quiet():
            echo(f"{label} written to {p}")
    report_gate(fail_on, outcomes, json_path=json_path)
    exit_status(incomplete=result.incomplete, gate_tripped=tripped)


def _short(text: str, width: int) -> str:
    text = printable(text)
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _worst_lines(r, worst: int) -> list[str]:
    lines = [f"Worst matrices of {printable(r.tuned)}:"]
    shown = [m for m in r.worst_matrices(worst) if m.intruders > 0]
    name_w = max(len(printable(m.name)) for m in shown)
    for m in shown:
        extra = f"r={m.adapter_rank}, " if m.adapter_rank else ""
        rel = f"{m.relative_delta_norm:.3g}" if m.relative_delta_norm is not None else "-"
        noun = "intruder " if m.intruders == 1 else "intruders"
        erank = f"eff. rank {m.effective_rank:.1f}, " if m.effective_rank is not None else ""
        lines.append(f"  {printable(m.name):<{name_w}}  {m.intruders:>2} {noun}  min max|cos| {m.min_cos:.3f}  "
                     f"({extra}{erank}|dW|/|W0| {rel})")
    layers = sorted(r.by_layer().items(), key=lambda kv: (-kv[1], int(kv[0])))
    if layers and layers[0][1] > 0:
        lines.append("  worst layers: " + ", ".join(f"{k} ({v})" for k, v in layers[:worst] if v > 0))
    modules = sorted(r.by_module().items(), key=lambda kv: (-kv[1], kv[0]))
    lines.append("  by module: " + ", ".join(f"{printable(k)} ({v})" for k, v in modules if v > 0))
    return lines


def _format_lines(result) -> list[str]:
    """How the inputs were read (detected from the files): the base's layout, each tuned one's format."""
    base_fmt = next((r.info.get("base_format") for r in result.results if r.info.get("base_format")), None)
    lines = [f"  read as: base {printable(base_fmt)}"] if base_fmt else []
    for r in result.results:
        if r.info.get("format"):
            lines.append(f"  read as: {printable(r.tuned)} {printable(r.info['format'])}")
    return lines


def format_summary(result, *, quiet: bool = False, worst: int = 5) -> str:
    """The short table printed to stdout: totals per tuned model, worst matrices and layers,
    matrices that could not be audited, warnings. Every name is made printable."""
    sweep = list(result.epsilon_sweep)
    if quiet:
        return "\n".join(f"{printable(r.tuned)}: {r.total_intruders} intruders in {len(r.matrices)} matrices"
                         + (f", {n} structural findings" if (n := sum(f.counts for f in r.findings)) else "")
                         for r in result.results)
    show = [e for e in (0.3, 0.7, 0.9) if e in sweep and e != result.epsilon]
    lines = [f"Intruder dimensions: k={result.k}, epsilon={result.epsilon:g}, base {printable(result.base)}"]
    lines += _format_lines(result) + [""]
    width = max([5] + [min(40, len(printable(r.tuned))) for r in result.results])
    lines.append(f"{'TUNED':<{width}}  {'matrices':>8}  {'intruders':>9}  "
                 + "".join(f"{'eps ' + format(e, 'g'):>8}  " for e in show) + "min max|cos|")
    for r in result.results:
        cos = [m.min_cos for m in r.matrices if m.min_cos is not None]
        sweep_cells = "".join(f"{r.sweep_totals[sweep.index(e)]:>8}  " for e in show)
        lines.append(f"{_short(r.tuned, width):<{width}}  {len(r.matrices):>8}  {r.total_intruders:>9}  "
                     f"{sweep_cells}{(format(min(cos), '.3f') if cos else '-'):>12}")
    for r in result.results:
        if not r.matrices:
            continue
        if r.total_intruders == 0:
            low = min(r.matrices, key=lambda m: m.min_cos if m.min_cos is not None else 1.0)
            if low.min_cos is not None:
                lines += ["", f"{printable(r.tuned)}: no intruders; lowest max|cos| {low.min_cos:.3f} in "
                              f"{printable(low.name)}"]
            continue
        lines += [""] + _worst_lines(r, worst)
    found = [(r.tuned, f) for r in result.results for f in r.findings]
    if found:
        lines += ["", "Structural findings:"] + [f"  {printable(t)}: {f.line()}" for t, f in found]
    warn = [("base", w) for w in result.warnings] + [(r.tuned, w) for r in result.results for w in r.warnings]
    if warn:
        lines += ["", "Warnings:"] + [f"  {printable(t)}: {printable(w, multiline=True)}" for t, w in warn]
    return "\n".join(lines)
