"""Safety evaluation: refusal / over-refusal / capability, base vs tuned (Lermen et al. 2023)."""

from .evaluate import EvalConfig, evaluate_loaded, run_safety_eval, score_prompt_set
from .prompts import Prompt, PromptSet, load_prompts
from .scorers import DEFAULT_MARKERS, KeywordScorer, first_token_scores, judge_answers
from .stats import wilson_interval
from .verdict import Thresholds, decide

__all__ = ["EvalConfig", "evaluate_loaded", "run_safety_eval", "score_prompt_set", "Prompt", "PromptSet",
           "load_prompts", "DEFAULT_MARKERS", "KeywordScorer", "first_token_scores", "judge_answers",
           "wilson_interval", "Thresholds", "decide"]
