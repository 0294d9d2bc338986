"""``lora-audit finetune``, ``federated`` and ``mitigate``."""

from __future__ import annotations

import math

import click

from ._common import (CONTEXT, base_and_tuned, check_paths, deprecated_alias, device_option, echo, json_option,
                      out_option, overwrite_option, quiet, seed_option, user_errors, verbosity_options,
                      write_json_output)


def _positive_float(ctx, param, value):
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"must be a finite number above 0, got {value}", ctx=ctx, param=param)
    return value


@click.command(context_settings=CONTEXT)
@click.argument("base", required=False, metavar="BASE")
@click.option("--method", required=True, help="lora, rslora, dora, ffa-lora, allora (scale 1, no dropout, norm-scaled gradients), "
              "lora-ga, lora-sb, lora-mgpo or full.")
@deprecated_alias("--base", "old_base", use="give BASE as the first argument: lora-audit finetune BASE --method ...")
@click.option("--data", required=True, help='JSONL of {"prompt","response"} or {"text"}, or builtin:NAME '
              "(built-ins: alpaca-mini, safety-tune, undo-compliance).")
@out_option("New output folder (adapter or model), written atomically.", required=True)
@overwrite_option
@click.option("--rank", default=8, show_default=True, type=click.IntRange(min=1))
@click.option("--alpha", default=16.0, show_default=True, type=float, callback=_positive_float)
@click.option("--lr", default=None, type=float, callback=_positive_float,
              help="Learning rate [default: 2e-4 adapters, 2e-3 lora-sb, 2e-5 full].")
@click.option("--steps", default=100, show_default=True, type=click.IntRange(min=1))
@click.option("--batch-size", default=4, show_default=True, type=click.IntRange(min=1))
@click.option("--max-length", default=256, show_default=True, type=click.IntRange(min=2),
              help="Tokens per example (longer are cut).")
@click.option("--target-modules", default=None, help="Comma-separated module names, e.g. q_proj,v_proj "
              "[default: all linear layers].")
@click.option("--max-row-chars", type=click.IntRange(min=1), default=64_000, show_default=True,
              help="Refuse a data file with a training row longer than this many characters.")
@json_option("the training record (also written to OUT/training.json)")
@seed_option
@device_option
@verbosity_options
@user_errors
def finetune(base, method, old_base, data, out, overwrite, rank, alpha, lr, steps, batch_size, max_length, target_modules,
             max_row_chars, json_path, seed, device):
    """Fine-tune BASE (an HF folder, a GGUF file or a hub id) with a reference method; writes OUT and
    OUT/training.json.

    \b
    Example:
      lora-audit finetune ./SmolLM2 --method lora --data builtin:alpaca-mini --out ./lora8 --steps 50
    """
    from ..training.loop import check_method, train

    base, extra = base_and_tuned(base, (), old_base)
    if extra:
        raise click.UsageError(f"BASE given twice ({extra[0]} and --base {base}); give it once, as the argument")
    check_method(method)
    check_paths(files=[json_path], folders=[out], inputs=[base, data], overwrite=overwrite)
    targets = [t.strip() for t in target_modules.split(",") if t.strip()] if target_modules else None
    rec = train(method=method, base=base, data=data, out=out, steps=steps, rank=rank, alpha=alpha, lr=lr,
                batch_size=batch_size, max_length=max_length, target_modules=targets, seed=seed, device=device,
                overwrite=overwrite, max_row_chars=max_row_chars)
    write_json_output(json_path, rec)
    echo(f"{rec['method']}: loss {rec['loss'][0]:.4f} -> {rec['final_loss']:.4f} in {steps} steps "
         f"({rec['wall_time_s']:.1f} s, {rec['trainable_parameters']:,} trainable parameters); wrote {out}")


@click.command(context_settings=CONTEXT)
@click.argument("adapters", nargs=-1, required=True, type=click.Path())
@click.option("--method", "agg", default="fedavg", show_default=True, type=click.Choice(["fedavg", "ffa", "fed-sb"]),
              help="fedavg: average A and B; ffa / fed-sb: clients share A, average B (exact).")
@out_option("Write the aggregate adapter to this new folder.")
@overwrite_option
@json_option("the aggregation report")
@verbosity_options
@user_errors
def federated(adapters, agg, out, overwrite, json_path):
    """Aggregate client ADAPTERS and report the FedAvg aggregation bias
    ||mean(B_k A_k) - mean(B_k) mean(A_k)||_F / ||mean(B_k A_k)||_F per module and in total."""
    from ..results import provenance, stamped
    from ..training.federated import aggregate, write_adapter

    check_paths(files=[json_path], folders=[out], inputs=adapters, overwrite=overwrite)
    cfg, weights, report = aggregate(list(adapters), agg)
    result = stamped({**provenance("lora-audit/federated", 1, method=agg, out=out), **report})
    if out:
        write_adapter(cfg, weights, out, result, overwrite=overwrite)
    write_json_output(json_path, result)
    if not quiet():
        for mod, r in report["modules"].items():
            echo(f"{r['bias']:.4f}  {mod}")
    echo(f"FedAvg aggregation bias (total): {report['fedavg_bias_total']:.4f}; "
         f"{agg} aggregate bias: {report['aggregate_bias_total']:.4f}" + (f"; wrote {out}" if out else ""))


@click.command(context_settings=CONTEXT)
@click.argument("base", type=click.Path())
@click.argument("adapter", type=click.Path())
@click.option("--lambda", "lam", default=0.75, show_default=True, type=click.FloatRange(0.0, 1.0),
              help="Keep this fraction of each intruder direction (1 = unchanged, 0 = removed).")
@click.option("--k", default=10, show_default=True, type=click.IntRange(min=1),
              help="Top singular vectors checked per matrix.")
@click.option("--epsilon", default=0.5, show_default=True,
              type=click.FloatRange(0.0, 1.0, min_open=True, max_open=True), help="Intruder if max |cos| < epsilon.")
@out_option("Folder for the new PEFT adapter (with mitigate.json).", required=True)
@click.option("--overwrite", is_flag=True, help="Replace OUT if lora-audit wrote it earlier.")
@json_option("the mitigation record (per-matrix intruders before/after; also OUT/mitigate.json)")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Base-spectrum cache folder, shared with `spectrum` [default: ~/.cache/lora-audit/spectra, "
                   "or $LORA_AUDIT_CACHE/spectra].")
@click.option("--no-cache", is_flag=True, help="Do not read or write the base-spectrum cache.")
@device_option
@verbosity_options
@user_errors
def mitigate(base, adapter, lam, k, epsilon, out, overwrite, json_path, cache_dir, no_cache, device):
    """Scale intruder dimensions of a LoRA ADAPTER on BASE by --lambda; write a rank-r adapter.

    One SVD per adapted matrix (and one of its base matrix, unless `spectrum` cached it), on the
    checkpoint stream (BASE may be a folder, a .safetensors or a GGUF file); the new adapter keeps
    the original adapter_config.json and tensor keys.

    \b
    Example:
      lora-audit mitigate ./base ./adapter --lambda 0.5 --out ./adapter-mitigated --json mitigate.json
    """
    from ..spectral.api import open_cache
    from ..spectral.mitigate import mitigate_adapter

    to_file = json_path if json_path != "-" else None  # a file: checked before any work and written by the library
    res = mitigate_adapter(base, adapter, out, lam=lam, k=k, epsilon=epsilon, device=device, overwrite=overwrite,
                           json_path=to_file, cache=None if no_cache else open_cache(cache_dir), progress=not quiet())
    if json_path == "-":
        write_json_output(json_path, res)
    echo(f"intruders: {res['intruders_before']} -> {res['intruders_after']} over {len(res['modules'])} "
         f"matrices ({res['matrices_rewritten']} rewritten); wrote {out}" + (f" and {to_file}" if to_file else ""))
