"""Safety evaluation: refusal / over-refusal / capability, base vs tuned (Lermen et al. 2023).

Python API (stable; used by the report and the demo)::

    from lora_audit.safety import EvalConfig, run_safety_eval
    from lora_audit.results.safety import load_safety_result, summary_table

    result = run_safety_eval(base, ["adapter_a", "full_model_b"], EvalConfig(max_new_tokens=48))
    result.models["base"].refusal_rate, result.verdict["adapter_a"].label   # a SafetyResult
    result.write_json("safety.json")
"""

from ..results.safety import load_safety_result, summary_table
from ..stats import wilson_interval
from .capability import BUILTIN_TASK, Capability, run_capability
from .evaluate import EvalConfig, evaluate_loaded, run_safety_eval, score_prompt_set
from .generate import GenSettings, chat_texts, generate
from .prompts import Prompt, PromptSet, detect_layout, load_prompts
from .scorers import (DEFAULT_MARKERS, JUDGE_TEMPLATE, KeywordScorer, agreement, calibrate_threshold,
                      first_token_scores, judge_answers, parse_judge_answer)
from .verdict import LABELS, Thresholds, decide

__all__ = ["EvalConfig", "run_safety_eval", "evaluate_loaded", "score_prompt_set",
           "load_safety_result", "summary_table", "BUILTIN_TASK", "Capability", "run_capability", "GenSettings",
           "chat_texts", "generate", "Prompt", "PromptSet", "detect_layout", "load_prompts", "DEFAULT_MARKERS",
           "JUDGE_TEMPLATE", "KeywordScorer", "agreement", "calibrate_threshold", "first_token_scores",
           "judge_answers", "parse_judge_answer", "wilson_interval", "LABELS", "Thresholds", "decide"]
