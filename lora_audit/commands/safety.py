"""``lora-audit safety-eval``: refusal, over-refusal and capability of tuned models vs their base,
with a verdict (Lermen et al. 2023, arXiv 2310.20624). Thin: options -> run_safety_eval -> JSON."""

from __future__ import annotations

import click

from ._common import (CONTEXT, allow_pickle_option, base_and_tuned, chat_template_option, check_paths,
                      deprecated_alias, device_option, echo, exit_code, exit_status, fail_on_option, json_option,
                      max_prompt_chars_option, out_files, out_option, report_gate, sarif_option, seed_option,
                      user_errors, verbosity_options, write_json_output)


@click.command("safety-eval", context_settings=CONTEXT)
@click.argument("base", required=False, metavar="BASE")
@click.argument("tuned", nargs=-1, metavar="[TUNED]...")
@deprecated_alias("--base", "old_base", use="give BASE as the first argument: lora-audit safety-eval BASE TUNED...")
@deprecated_alias("--tuned", "old_tuned", multiple=True,
                  use="give each TUNED as an argument after BASE: lora-audit safety-eval BASE TUNED...")
@click.option("--prompts", default="builtin:harmful", show_default=True,
              help="Harmful prompts: AdvBench/HarmBench/StrongREJECT/JailbreakBench/XSTest CSV, RefusalBench "
                   "JSON, JSONL/CSV with 'prompt' (+ 'category'), TXT, hf:DATASET_ID[:SPLIT] (online), or "
                   "builtin:harmful. The detected layout is printed.")
@click.option("--benign", default="builtin:benign", show_default=True,
              help="Benign look-alike prompts for over-refusal (same formats); 'none' to skip. An XSTest file "
                   "counts its 'unsafe' rows as harmful and its 'safe' rows as benign; with an XSTest file as "
                   "--prompts and --benign none, its 'safe' rows measure over-refusal.")
@click.option("--scorer", type=click.Choice(["keyword", "first-token", "judge"]), default="keyword",
              show_default=True, help="How a response is classified as a refusal.")
@click.option("--markers", default=None,
              help="Refusal markers: a file (one a line) or 'a|b|c'. Default: the AdvBench-style list.")
@click.option("--first-token-threshold", type=float, default=0.0, show_default=True,
              help="first-token scorer: refused when log p - log(1-p) exceeds this.")
@click.option("--judge", "judge", default=None,
              help="Judge model (any local HF causal LM) for --scorer judge: asked yes/no whether the response "
                   "carries out the request; other answers count as unknown and are reported.")
@click.option("--judge-template", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Text file with the judge prompt ({behavior} and {generation} fields), e.g. the prompt your "
                   "judge was trained with. Default: lora-audit's own HarmBench-style yes/no prompt.")
@click.option("--max-new-tokens", type=click.IntRange(1), default=64, show_default=True,
              help="Greedy generation length (refusals show in the first tokens; 32-64 is usual).")
@click.option("--tasks", default=None,
              help="Comma-separated lm-eval tasks [default: the built-in offline task]; 'none' to skip.")
@click.option("--task-dir", type=click.Path(exists=True, file_okay=False), default=None,
              help="Folder of local lm-eval task YAML files.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only the first N prompts / task items.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True)
@click.option("--backend", type=click.Choice(["hf", "vllm"]), default="hf", show_default=True,
              help="Generation backend; vllm is optional (GPU).")
@chat_template_option
@max_prompt_chars_option
@click.option("--no-early-stop", is_flag=True, help="Generate all tokens even after a refusal marker appears.")
@allow_pickle_option
@device_option
@seed_option
@json_option("the full result (every response, rates, verdicts, provenance)")
@out_option("Write safety.json and safety.sarif into FOLDER (created if needed); --json and --sarif given "
            "explicitly win.")
@fail_on_option("safety", example="verdict>=SAFETY_DEGRADED")
@sarif_option
@verbosity_options
@user_errors
def safety_eval(base, tuned, old_base, old_tuned, prompts, benign, scorer, markers, first_token_threshold, judge, judge_template,
                max_new_tokens, tasks, task_dir, limit, batch_size, backend, chat_template, max_prompt_chars,
                no_early_stop, allow_pickle, device, seed, json_path, out, fail_on, sarif_path):
    """Refusal rate on harmful prompts (95% Wilson CI, per category), over-refusal on benign
    look-alikes and lm-eval capability for BASE and each TUNED model (a full model or a PEFT
    adapter on BASE), the differences to BASE and a verdict per tuned model: SAFETY_REMOVED /
    SAFETY_DEGRADED / RETAINED / INCONCLUSIVE, with capability-degraded and over-refusal flags
    (Lermen et al. 2023). The base's chat template is applied; generation is greedy and batched.
    By default the project's own prompt sets and offline multiple-choice task are used. BASE: an
    HF folder, a GGUF file or a hub id; each TUNED: a tuned model or a PEFT adapter on BASE (none:
    BASE alone is measured).

    \b
    Examples:
      lora-audit safety-eval ./SmolLM2-135M-Instruct ./adapter --json safety.json
      lora-audit safety-eval BASE A B --prompts harmful_behaviors.csv \\
          --benign xstest.csv --tasks mmlu,hellaswag --limit 100
      lora-audit safety-eval BASE A --scorer first-token   # no generation
      lora-audit safety-eval BASE A --fail-on 'verdict>=SAFETY_DEGRADED' --sarif s.sarif
    """
    from ..results.gate import apply_gate
    from ..results.safety import summary_table
    from ..safety.capability import parse_tasks
    from ..safety.evaluate import EvalConfig, run_safety_eval
    from ..safety.prompts import DEFAULT_MAX_PROMPT_CHARS
    from ..safety.scorers import load_markers

    base, tuned = base_and_tuned(base, tuned, old_base, old_tuned)
    paths = out_files(out, {"json": "safety.json", "sarif": "safety.sarif"}, {"json": json_path, "sarif": sarif_path})
    json_path, sarif_path = paths["json"], paths["sarif"]
    check_paths(files=[json_path, sarif_path], inputs=[base, *tuned])
    cfg = EvalConfig(prompts=prompts, benign=None if benign.strip().lower() in ("", "none") else benign,
                     scorer=scorer, markers=None if markers is None else load_markers(markers),
                     max_prompt_chars=max_prompt_chars or DEFAULT_MAX_PROMPT_CHARS, first_token_threshold=first_token_threshold, judge=judge,
                     judge_template=judge_template, tasks=parse_tasks(tasks), task_dir=task_dir, limit=limit,
                     batch_size=batch_size, max_new_tokens=max_new_tokens, device=device, seed=seed,
                     chat_template=chat_template, allow_pickle=allow_pickle, backend=backend,
                     early_stop=not no_early_stop)
    result = run_safety_eval(base, list(tuned), cfg)
    outcomes = apply_gate(fail_on, safety=result) if fail_on is not None else []
    tripped = any(o.tripped for o in outcomes)
    write_json_output(json_path, result)
    if sarif_path is not None:
        from ..report.sarif import sarif_log, write_sarif

        write_sarif(sarif_path, sarif_log(safety=result, exit_code=exit_code(gate_tripped=tripped)))
    echo(summary_table(result))
    for p in (json_path, sarif_path):
        if p and p != "-":
            echo(f"wrote {p}")
    report_gate(fail_on, outcomes, json_path=json_path)
    exit_status(gate_tripped=tripped)
