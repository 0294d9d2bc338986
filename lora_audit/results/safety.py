"""Safety-eval result JSON (schema "safety", version SCHEMA_VERSION).

Top level::

    provenance   lora_audit.results.provenance("safety", 1, settings...)
    inputs       {name: {"source", "fingerprint"}}          name "base" plus one per tuned model
    scorer       {"name": keyword|first-token|judge, "markers": [...] (the list used),
                  "marker_window_chars", "first_token_threshold", "first_token_start_tokens", "judge"}
    generation   {"backend", "greedy", "max_new_tokens", "batch_size", "early_stop_on_refusal",
                  "chat_template": "tokenizer"|"file", "seed"}
    prompt_sets  {"harmful": {"source", "layout" (detected), "n", "notes"}, "benign": same | null}
    counts       {"models", "harmful_prompts", "benign_prompts"}
    thresholds   verdict thresholds (lora_audit.safety.verdict.Thresholds)
    models       {name: {
                    "refusal_rate": float | null,  refused / scored, on the harmful prompts
                    "refusal_ci": [lo, hi],        95 % Wilson interval
                    "n_prompts", "n_refused",
                    "per_category": {cat: {"n", "refused", "rate", "ci"}},
                    "responses": [{"prompt", "category", "response" (null with first-token scorer),
                                   "refused" (bool | null = judge unknown), "first_token_score",
                                   "keyword_refused", ["label"], ["judge"]}],
                    "over_refusal_rate", "over_refusal_ci", "n_benign", "over_refusal_per_category",
                    "benign_responses": [same records on benign prompts],
                    "capability": {task: accuracy | null},
                    "first_token_keyword_agreement" (when generation ran),
                    ["judge_unknown", "judge_keyword_agreement"], "timing_s"}}
    comparisons  {tuned: {"refusal_rate_delta" (tuned - base), "over_refusal_rate_delta",
                          "capability_delta": {task: tuned - base}}}
    verdict      {tuned: {"label": SAFETY_REMOVED|SAFETY_DEGRADED|RETAINED|INCONCLUSIVE,
                          "refusal_drop", "ci_separated", "capability_degraded",
                          "capability_degraded_tasks", "over_refusal_increased", "reasons"}}
"""

from __future__ import annotations

SCHEMA_VERSION = 1


def summary_table(result: dict) -> str:
    """A readable fixed-width summary of a safety result."""
    rows = [("model", "refusal", "95% CI", "over-refusal", "capability", "verdict")]
    for name, m in result["models"].items():
        rr = "n/a" if m["refusal_rate"] is None else f"{m['refusal_rate']:.1%}"
        ci = f"[{m['refusal_ci'][0]:.2f}, {m['refusal_ci'][1]:.2f}]"
        orr = "n/a" if m.get("over_refusal_rate") is None else f"{m['over_refusal_rate']:.1%}"
        cap = ", ".join(f"{k}={v:.3f}" if v is not None else f"{k}=n/a" for k, v in m["capability"].items()) or "-"
        v = result["verdict"].get(name)
        vt = "-" if v is None else v["label"] + (" +CAPABILITY_DEGRADED" if v["capability_degraded"] else "")
        rows.append((name, rr, ci, orr, cap, vt))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    sc = result["scorer"]
    lines.append(f"scorer: {sc['name']}; harmful prompts: {result['counts']['harmful_prompts']} "
                 f"({result['prompt_sets']['harmful']['layout']}), benign: {result['counts']['benign_prompts']}")
    for name, m in result["models"].items():
        if m.get("first_token_keyword_agreement") is not None:
            lines.append(f"{name}: first-token vs keyword agreement {m['first_token_keyword_agreement']:.1%}")
        if m.get("judge_unknown"):
            lines.append(f"{name}: judge answered neither yes nor no on {m['judge_unknown']} prompts (unknown)")
    return "\n".join(lines)
