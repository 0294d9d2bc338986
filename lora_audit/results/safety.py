"""Safety-eval result JSON (schema "safety", version SCHEMA_VERSION).

Top level::

    provenance   lora_audit.results.provenance("safety", 1, settings...)
    inputs       {name: {"source", "fingerprint"}}          name "base" plus one per tuned model
    inputs       {name: {"source", "fingerprint", "kind"}}
    scorer       {"name": keyword|first-token|judge, "markers": [...] (the list used), "markers_list",
                  "marker_window_chars", "first_token_threshold", "first_token_start_words", "judge",
                  "judge_template" (the text used, with the judge scorer)}
    generation   {"backend", "greedy", "max_new_tokens", "batch_size", "padding", "early_stop_on_refusal",
                  "ran" (false with the first-token scorer), "chat_template": "tokenizer"|"file", "seed"}
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
                    "n_benign_refused",
                    "capability": {task: score | null}, "capability_metric": {task: "acc,none" | ...},
                    "first_token_keyword_agreement", "first_token_calibration": {"threshold", "agreement"}
                      (both when generation ran: first-token vs keyword verdicts on the harmful prompts),
                    ["judge_unknown", "judge_compliance_rate", "judge_compliance_ci",
                     "judge_keyword_agreement"] (judge scorer),
                    "timing_s": {"harmful": {"first_token", "generation"}, "benign": {...}, "capability"}}}
    comparisons  {tuned: {"refusal_rate_delta" (tuned - base), "over_refusal_rate_delta",
                          "capability_delta": {task: tuned - base}}}
    verdict      {tuned: {"label": SAFETY_REMOVED|SAFETY_DEGRADED|RETAINED|INCONCLUSIVE,
                          "refusal_drop" (base - tuned), "ci_separated", "capability_degraded",
                          "capability_degraded_tasks", "over_refusal_increased", "reasons": [str]}}
                 (lora_audit.safety.verdict explains the labels; the thresholds used are above)

Read one back with ``load_safety_result(path)``.
"""

from __future__ import annotations

import os

from ..errors import InputError

SCHEMA_VERSION = 1
TOP_LEVEL = ("provenance", "inputs", "scorer", "generation", "prompt_sets", "counts", "thresholds", "models",
             "comparisons", "verdict")
MODEL_KEYS = ("refusal_rate", "refusal_ci", "responses", "capability")
RESPONSE_KEYS = ("prompt", "category", "response", "refused")


def validate(result: dict, where: str = "result") -> dict:
    """Check the contract (schema name/version, top-level keys, the per-model keys); return it."""
    prov = result.get("provenance") or {}
    if prov.get("schema") != "safety":
        raise InputError(f"{where}: not a safety-eval result (schema {prov.get('schema')!r})")
    if prov.get("schema_version") != SCHEMA_VERSION:
        raise InputError(f"{where}: safety result schema version {prov.get('schema_version')!r}; this lora-audit "
                         f"reads version {SCHEMA_VERSION}")
    missing = [k for k in TOP_LEVEL if k not in result]
    if missing:
        raise InputError(f"{where}: safety result lacks {missing}")
    if "base" not in result["models"]:
        raise InputError(f"{where}: safety result has no 'base' model")
    for name, m in result["models"].items():
        lack = [k for k in MODEL_KEYS if k not in m]
        if lack or any(k not in r for r in m["responses"] for k in RESPONSE_KEYS):
            raise InputError(f"{where}: model {name!r} lacks {lack or list(RESPONSE_KEYS)}")
    for name in result["verdict"]:
        if name not in result["models"] or name not in result["comparisons"]:
            raise InputError(f"{where}: verdict for {name!r} without its model or comparison")
    return result


def load_safety_result(path: str | os.PathLike) -> dict:
    """Read and validate a safety JSON written by ``lora-audit safety-eval --json``."""
    from . import read_result

    return validate(read_result(path), str(path))


def summary_table(result: dict) -> str:
    """A readable fixed-width summary of a safety result."""
    rows = [("model", "refusal", "95% CI", "over-refusal", "capability", "verdict")]
    for name, m in result["models"].items():
        rr = "n/a" if m["refusal_rate"] is None else f"{m['refusal_rate']:.1%} ({m.get('n_refused', '?')}/{m.get('n_prompts', '?')})"
        ci = f"[{m['refusal_ci'][0]:.2f}, {m['refusal_ci'][1]:.2f}]"
        orr = "n/a" if m.get("over_refusal_rate") is None else \
            f"{m['over_refusal_rate']:.1%} ({m.get('n_benign_refused', '?')}/{m.get('n_benign', '?')})"
        cap = ", ".join(f"{k}={v:.3f}" if v is not None else f"{k}=n/a" for k, v in m["capability"].items()) or "-"
        v = result["verdict"].get(name)
        vt = "-" if v is None else v["label"] + (" +CAPABILITY_DEGRADED" if v["capability_degraded"] else "")
        rows.append((name, rr, ci, orr, cap, vt))
    w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
    lines.insert(1, "  ".join("-" * x for x in w))
    sc, ps = result["scorer"], result["prompt_sets"]
    lines.append("")
    lines.append(f"harmful prompts: {ps['harmful']['n']} from {ps['harmful']['source']} "
                 f"(layout detected: {ps['harmful']['layout']})")
    if ps.get("benign"):
        lines.append(f"benign prompts:  {ps['benign']['n']} from {ps['benign']['source']} "
                     f"(layout detected: {ps['benign']['layout']})")
    lines.append(f"scorer: {sc['name']}" + (f" (markers: {sc['markers_list']}, {len(sc['markers'])} markers)"
                                             if sc["name"] == "keyword" else ""))
    for name, m in result["models"].items():
        if m.get("first_token_keyword_agreement") is not None:
            lines.append(f"{name}: first-token vs keyword agreement {m['first_token_keyword_agreement']:.1%}")
        if m.get("judge_unknown"):
            lines.append(f"{name}: judge answered neither yes nor no on {m['judge_unknown']} prompts (unknown)")
        if m.get("judge_compliance_rate") is not None:
            lines.append(f"{name}: judge says harmful compliance on {m['judge_compliance_rate']:.1%}")
    for name, v in result["verdict"].items():
        lines.append(f"{name}: {v['label']}: " + "; ".join(v["reasons"]))
    return "\n".join(lines)
