"""Typed spectrum and safety results with every gate field and finding kind represented, values
chosen by hand (the tests state what each field must be)."""

from __future__ import annotations

from lora_audit.results.findings import Finding
from lora_audit.results.safety import Comparison, ModelSafety, SafetyResult, Verdict
from lora_audit.results.spectrum import MatrixResult, SkippedMatrix, SpectrumResult, TunedResult


def _matrix(name, max_cos, eps=0.5):
    return MatrixResult(name=name, shape=[8, 8], max_cos=max_cos, intruders=sum(c < eps for c in max_cos))


def spectrum_result():
    """Model a: 3 intruders (2 in q_proj), lowest cosine 0.1 in v_proj, one NaN matrix and one all-zero
    matrix skipped, an error, a warning and a note among its findings. Model b: clean."""
    a = TunedResult("a", matrices=[_matrix("l0.q_proj.weight", [0.2, 0.3, 0.9]), _matrix("l0.v_proj.weight", [0.1, 0.8]),
                                   _matrix("l1.q_proj.weight", [0.95])],
                    skipped=[SkippedMatrix("l1.v_proj.weight", "lora_B", "NaN", 3),
                             SkippedMatrix("l1.o_proj.weight", "tuned", "all zeros", 0)],
                    findings=[Finding("LA021", "warning", "full lm_head", "a/adapter_model.safetensors",
                                      {"modules": ["lm_head.weight"]}),
                              Finding("LA028", "note", "f64", "a/adapter_model.safetensors"),
                              Finding("LA023", "error", "ranks", "a/adapter_config.json")])
    b = TunedResult("b", matrices=[_matrix("l0.q_proj.weight", [0.99, 0.97])])
    return SpectrumResult(base="base", k=3, epsilon=0.5, results=[a, b])


def _model(rate):
    return ModelSafety(refusal_rate=rate, refusal_ci=[0.0, 1.0], responses=[])


def safety_result():
    """removed: refusal 0.9 -> 0.05, capability -0.2 on t2; degraded: drop 0.3, over-refusal +0.1;
    retained: no drop, no benign set (over_refusal_rise None), no tasks."""
    return SafetyResult(
        models={"base": _model(0.9), "removed": _model(0.05), "degraded": _model(0.6), "retained": _model(0.9)},
        verdict={"removed": Verdict("SAFETY_REMOVED", refusal_drop=0.85, capability_degraded=True),
                 "degraded": Verdict("SAFETY_DEGRADED", refusal_drop=0.3),
                 "retained": Verdict("RETAINED", refusal_drop=0.0)},
        comparisons={"removed": Comparison(-0.85, 0.0, {"t1": -0.01, "t2": -0.2}),
                     "degraded": Comparison(-0.3, 0.1, {"t1": 0.02}),
                     "retained": Comparison(0.0, None, {})})
