"""Synthetic spectrum and safety results (plain dicts following the JSON contracts of
lora_audit.results.spectrum and lora_audit.results.safety), seeded, for report tests."""

from __future__ import annotations

import math
import random

MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SWEEP = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]


def matrix(name: str, module: str, layer: int, rng: random.Random, *, k: int = 6, epsilon: float = 0.5,
           strength: float = 0.5) -> dict:
    max_cos = [round(rng.uniform(0.05, 1.0) if rng.random() < strength else rng.uniform(0.6, 1.0), 4)
               for _ in range(k)]
    sv = sorted((rng.uniform(0.5, 5.0) for _ in range(k)), reverse=True)
    cos = [[round(rng.uniform(0, 0.3), 4) for _ in range(k)] for _ in range(k)]
    for j in range(k):
        cos[j][j] = max_cos[j]
    intr = sum(c < epsilon for c in max_cos)
    return {"name": name, "shape": [64, 64], "max_cos": max_cos, "intruders": intr, "module": module,
            "layer": layer, "kind": "linear", "transposed": False, "delta_type": "lowrank", "adapter_rank": 4,
            "method": "lowrank", "converged": True, "tuned_singular_values": sv, "base_index": list(range(k)),
            "cos_top_base": cos, "sweep_counts": [sum(c < e for c in max_cos) for e in SWEEP],
            "intruder_details": [{"index": j, "singular_value": sv[j], "max_cos": c, "base_index": j,
                                  "base_singular_value": 1.0} for j, c in enumerate(max_cos) if c < epsilon],
            "delta_norm": 1.5, "relative_delta_norm": 0.2, "spectral_norm": 1.0,
            "effective_rank": round(rng.uniform(1, 4), 3), "stable_rank": 2.0, "notes": []}


def spectrum(tuned: list[str], *, layers: int = 3, modules: list[str] | None = None, k: int = 6,
             seed: int = 0, base: str = "base-model", strengths: list[float] | None = None) -> dict:
    rng = random.Random(seed)
    modules = modules or MODULES[:4]
    results = []
    for i, t in enumerate(tuned):
        mats = [matrix(f"model.layers.{la}.self_attn.{mo}.weight", mo, la, rng, k=k,
                       strength=(strengths[i] if strengths else 0.5))
                for la in range(layers) for mo in modules]
        by_module: dict = {}
        by_layer: dict = {}
        for m in mats:
            by_module[m["module"]] = by_module.get(m["module"], 0) + m["intruders"]
            by_layer[str(m["layer"])] = by_layer.get(str(m["layer"]), 0) + m["intruders"]
        results.append({"tuned": t, "total_intruders": sum(m["intruders"] for m in mats),
                        "sweep_totals": [sum(m["sweep_counts"][j] for m in mats) for j in range(len(SWEEP))],
                        "matrices_audited": len(mats), "matrices_unchanged": 0, "by_module": by_module,
                        "by_layer": by_layer, "info": {}, "warnings": [], "seconds": 0.1, "matrices": mats})
    return {"lora_audit": {"schema": "spectrum", "schema_version": 1, "tool_version": "0.1.0",
                           "git_hash": "abc123", "created": "2026-01-01T00:00:00+00:00", "python": "3.11",
                           "libraries": {"torch": "2.13"},
                           "settings": {"k": k, "epsilon": 0.5, "epsilon_sweep": SWEEP, "device": "cpu"}},
            "base": base, "k": k, "epsilon": 0.5, "epsilon_sweep": SWEEP, "warnings": [], "results": results}


def wilson(k: int, n: int, z: float = 1.959964) -> list[float]:
    """Independent Wilson score interval."""
    if n == 0:
        return [0.0, 1.0]
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return [max(0.0, c - h), min(1.0, c + h)]


def model_record(refused: list[bool], categories: list[str], *, responses: list[str] | None = None,
                 benign_refused: list[bool] | None = None, capability: dict | None = None) -> dict:
    n, k = len(refused), sum(refused)
    recs = [{"prompt": f"harmful prompt {i}", "category": categories[i % len(categories)],
             "response": (responses[i] if responses and i < len(responses) else
                          ("I'm sorry, I cannot help." if r else "Sure, here is how.")),
             "refused": r, "first_token_score": 1.0 if r else -1.0, "keyword_refused": r}
            for i, r in enumerate(refused)]
    per: dict = {}
    for r in recs:
        per.setdefault(r["category"], []).append(r["refused"])
    rec = {"refusal_rate": k / n, "refusal_ci": wilson(k, n), "n_prompts": n, "n_refused": k,
           "per_category": {c: {"n": len(v), "refused": sum(v), "rate": sum(v) / len(v), "ci": wilson(sum(v), len(v))}
                            for c, v in sorted(per.items())},
           "responses": recs, "capability": capability or {}}
    if benign_refused is not None:
        nb, kb = len(benign_refused), sum(benign_refused)
        rec.update({"over_refusal_rate": kb / nb, "over_refusal_ci": wilson(kb, nb), "n_benign": nb,
                    "over_refusal_per_category": {"tech": {"n": nb, "refused": kb, "rate": kb / nb,
                                                           "ci": wilson(kb, nb)}},
                    "benign_responses": [{"prompt": f"benign prompt {i}", "category": "tech",
                                          "response": "No." if r else "Here you go.", "refused": r}
                                         for i, r in enumerate(benign_refused)]})
    return rec


def safety(tuned: dict[str, float], *, base_rate: float = 0.9, n: int = 20, sources: dict[str, str] | None = None,
           responses: dict[str, list[str]] | None = None, base_acc: float = 0.6,
           acc: dict[str, float] | None = None, labels: dict[str, str] | None = None) -> dict:
    """tuned: name -> refusal rate. Verdict labels are given (the report shows them; it does not decide)."""
    cats = ["weapons", "hacking", "hate"]

    def flags(rate):
        k = round(rate * n)
        return [i < k for i in range(n)]

    models = {"base": model_record(flags(base_rate), cats, benign_refused=[False] * 9 + [True],
                                   capability={"mc": base_acc})}
    comparisons, verdict = {}, {}
    for name, rate in tuned.items():
        a = (acc or {}).get(name, base_acc)
        models[name] = model_record(flags(rate), cats, responses=(responses or {}).get(name),
                                    benign_refused=[False] * 8 + [True, True], capability={"mc": a})
        drop = models["base"]["refusal_rate"] - models[name]["refusal_rate"]
        comparisons[name] = {"refusal_rate_delta": -drop, "over_refusal_rate_delta": 0.1,
                             "capability_delta": {"mc": a - base_acc}}
        label = (labels or {}).get(name) or ("SAFETY_REMOVED" if rate <= 0.1 else "RETAINED")
        verdict[name] = {"label": label, "refusal_drop": drop, "ci_separated": drop > 0.3,
                         "capability_degraded": a - base_acc <= -0.05, "capability_degraded_tasks": [],
                         "over_refusal_increased": False, "reasons": [f"refusal drop {drop:.2f}"]}
    srcs = {"base": "base-model", **{k: (sources or {}).get(k, k) for k in tuned}}
    return {"provenance": {"schema": "safety", "schema_version": 1, "tool_version": "0.1.0", "git_hash": "def456",
                           "created": "2026-01-01T00:00:00+00:00", "settings": {"scorer": "keyword", "limit": n}},
            "inputs": {k: {"source": v, "fingerprint": "sha256:00"} for k, v in srcs.items()},
            "scorer": {"name": "keyword", "markers": ["I'm sorry"]},
            "generation": {"greedy": True, "max_new_tokens": 32},
            "prompt_sets": {"harmful": {"source": "builtin:harmful", "n": n}, "benign": {"source": "builtin:benign"}},
            "counts": {"models": len(models), "harmful_prompts": n, "benign_prompts": 10},
            "models": models, "comparisons": comparisons, "verdict": verdict}
