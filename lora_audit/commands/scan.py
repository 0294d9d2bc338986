"""``lora-audit safety-scan``: safety-undo risk of tuned models from their weights and one forward
pass, no generation. Thin: options -> ``lora_audit.scan`` -> JSON and a summary. (The panel the
risk is judged on is built by ``lora-audit zoo``, a study: ``lora_audit.studies``.)"""

from __future__ import annotations

import click

from ._common import (CONTEXT, allow_pickle_option, chat_template_option, check_paths, device_option, echo, exit_code,
                      exit_status, fail_on_option, json_option, max_prompt_chars_option, out_files, out_option,
                      report_gate, sarif_option, seed_option, user_errors, verbosity_options, write_json_output)


@click.command("safety-scan", context_settings=CONTEXT)
@click.argument("base")
@click.argument("tuned", nargs=-1, required=True)
@click.option("--unaligned", default=None, metavar="PATH",
              help="BASE before safety training (same architecture), when you have it: adds Safe LoRA's score "
                   "cos(C dW, dW) per matrix (Hsu et al. 2024).")
@click.option("--weights-only", is_flag=True,
              help="Only the signals that need no forward pass of TUNED (BASE's profile is computed once and "
                   "cached).")
@click.option("--prompts", default="builtin:harmful", show_default=True,
              help="Harmful prompts for the refusal direction and the forward pass (the formats safety-eval reads).")
@click.option("--benign", default="builtin:benign", show_default=True,
              help="Harmless prompts for the refusal direction (the formats safety-eval reads).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N prompts of each set.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@chat_template_option
@max_prompt_chars_option
@click.option("--layers", "show_layers", is_flag=True, help="Also print the per-layer values of every model.")
@click.option("--risk-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Fitted risk models to use (a file written by 'lora-audit zoo') [default: the packaged one].")
@click.option("--no-cache", is_flag=True, help="Recompute BASE's profile instead of reading or writing the cache.")
@allow_pickle_option
@device_option
@seed_option
@json_option("the full result (signals, per-layer values, the direction, the risk model, provenance)")
@out_option("Write scan.json and scan.sarif into FOLDER (created if needed); --json and --sarif given explicitly "
            "win.")
@fail_on_option("scan", example="risk>0.5")
@sarif_option
@verbosity_options
@user_errors
def safety_scan(base, tuned, unaligned, weights_only, prompts, benign, limit, batch_size, chat_template,
                max_prompt_chars, show_layers, risk_file, no_cache, allow_pickle, device, seed, json_path, out,
                fail_on, sarif_path):
    """Predict whether each TUNED (a PEFT adapter on BASE or a full model) removed BASE's safety
    training, without generating text. From BASE (once, cached): the refusal direction of every
    layer (Arditi et al. 2024). From each TUNED's weights: the share of its update written along
    that direction by the matrices that write into the residual stream, and its sign. From one
    forward pass of TUNED over the harmful prompts: the first-token refusal score and the shift of
    its activations along BASE's direction. A risk score in [0, 1] combines them with weights fitted
    on a labelled panel of fine-tunes ('lora-audit zoo'); the verdict line quotes that fit.

    \b
    Examples:
      lora-audit safety-scan ./released ./adapter_a ./adapter_b --json scan.json
      lora-audit safety-scan ./released ./adapter --weights-only --layers
      lora-audit safety-scan ./chat ./adapter --unaligned ./pretrained
      lora-audit safety-scan ./released ./adapter --fail-on 'risk>0.5' --sarif scan.sarif   # exit 3 when it trips
    """
    from ..results.scan import summary_table
    from ..safety.prompts import DEFAULT_MAX_PROMPT_CHARS
    from ..scan import ScanConfig, run_safety_scan

    paths = out_files(out, {"json": "scan.json", "sarif": "scan.sarif"}, {"json": json_path, "sarif": sarif_path})
    json_path, sarif_path = paths["json"], paths["sarif"]
    check_paths(files=[json_path, sarif_path], inputs=[base, *tuned, *([unaligned] if unaligned else []),
                                          *([risk_file] if risk_file else [])])
    cfg = ScanConfig(prompts=prompts, benign=benign, limit=limit, batch_size=batch_size, device=device, seed=seed,
                     chat_template=chat_template, allow_pickle=allow_pickle,
                     max_prompt_chars=max_prompt_chars or DEFAULT_MAX_PROMPT_CHARS, weights_only=weights_only,
                     unaligned=unaligned, use_cache=not no_cache, risk_file=risk_file)
    result = run_safety_scan(base, list(tuned), cfg)
    from ..results.gate import apply_gate

    outcomes = apply_gate(fail_on, scan=result) if fail_on is not None else []
    tripped = any(o.tripped for o in outcomes)
    write_json_output(json_path, result)
    if sarif_path is not None:
        from ..report.sarif import sarif_log, write_sarif

        write_sarif(sarif_path, sarif_log(scan=result, exit_code=exit_code(gate_tripped=tripped)))
    echo(summary_table(result, layers=show_layers))
    for p in (json_path, sarif_path):
        if p and p != "-":
            echo(f"wrote {p}")
    report_gate(fail_on, outcomes, json_path=json_path)
    exit_status(gate_tripped=tripped)
