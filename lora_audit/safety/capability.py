"""Capability retention via lm-eval (lm-evaluation-harness 0.4.x) on the already loaded model.

``lm_eval.simple_evaluate`` with ``HFLM(pretrained=<loaded model>)``: no second load; a PEFT
adapter stays applied (not merged). Any lm-eval task name works (mmlu, hellaswag, ... need the
Hugging Face hub), plus local task folders (``--task-dir``: code, checked and sandboxed by
``task_code`` unless ``--trust-task-code``) and the project's own offline
multiple-choice task ``lora_audit_general_mc`` (48 general-knowledge questions written for
lora-audit), so the default run measures something without network.
"""

from __future__ import annotations

import contextlib
import json
import math
from importlib import resources
from pathlib import Path

from ..errors import InputError
from ..progress import quiet_lm_eval_bars
from .lmeval import LmEvalOptions

BUILTIN_TASK = "lora_audit_general_mc"
# Preferred metric per task result, in order; the first present is reported as the score.
METRICS = ("acc,none", "acc_norm,none", "exact_match,none", "exact_match,strict-match", "f1,none")

TASK_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files: {data}
test_split: train
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def builtin_task_dir() -> Path:
    return Path(str(resources.files("lora_audit") / "data" / "safety" / "tasks"))


def _materialise_builtin() -> Path:
    """Write the built-in task's YAML (which must name its JSONL by absolute path) into the cache."""
    from ..checkpoints.default_model import cache_root
    from ..io import atomic_write_text

    data = builtin_task_dir() / f"{BUILTIN_TASK}.jsonl"
    d = cache_root() / "safety_tasks"
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / f"{BUILTIN_TASK}.yaml", TASK_YAML.format(task=BUILTIN_TASK, data=json.dumps(str(data))))
    return d


@contextlib.contextmanager
def _quiet_lm_eval():
    """Keep lm-eval's chatter out of the user's terminal while it scores an already loaded model:
    it shells out to ``git describe`` in the current folder for its own results record (printing
    'fatal: not a git repository' outside a checkout; we do not use that record), warns that
    ``pretrained`` is not a string (that is the point). Its progress bars: ``progress.quiet_lm_eval_bars``."""
    import logging
    import warnings

    import lm_eval.evaluator as ev

    old_git = getattr(ev, "get_git_commit_hash", None)
    ev.get_git_commit_hash = lambda: None
    loggers = [logging.getLogger(n) for n in ("lm_eval", "lm-eval", "lm_eval.models.huggingface")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            yield
    finally:
        if old_git is not None:
            ev.get_git_commit_hash = old_git
        for lg, lv in zip(loggers, levels, strict=True):
            lg.setLevel(lv)


class Capability:
    """Resolves the task names once (indexing lm-eval's own ~10k tasks takes seconds, so that is
    done only when a requested name is not local), then scores any number of loaded models."""

    trust_task_code = False  # templates sandboxed, !function refused (``task_code``) unless set
    options = LmEvalOptions()  # lm-eval's own options (num_fewshot, chat template, ...); frozen, shared safely

    def __init__(self, tasks: list[str], *, task_dir: str | None = None, limit: int | None = None,
                 batch_size: int = 8, seed: int = 0, trust_task_code: bool = False,
                 options: LmEvalOptions | None = None):
        from lm_eval.tasks import TaskManager

        from .task_code import inspect_task_dir

        self.tasks, self.limit, self.batch_size, self.seed = list(tasks), limit, batch_size, seed
        self.trust_task_code = trust_task_code
        self.options = options or LmEvalOptions()  # lm-eval's own options (num_fewshot, chat template, ...)
        include = [str(_materialise_builtin())]
        if task_dir:  # a task folder is code: refused when it runs any, unless trusted (``task_code``)
            inspect_task_dir(task_dir, trust=trust_task_code)
            include.append(str(Path(task_dir).resolve()))
        tm = TaskManager(include_path=include, include_defaults=False)
        if not set(self.tasks) <= set(tm.all_tasks):
            tm = TaskManager(include_path=include)
        unknown = [t for t in self.tasks if t not in tm.all_tasks]
        if unknown:
            import difflib

            hints = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in unknown}
            hint = "; ".join(f"{t}: did you mean {', '.join(h)}?" for t, h in hints.items() if h)
            raise InputError(f"unknown lm-eval task(s) {unknown}" + (f" ({hint})" if hint else "")
                             + "; see `lm-eval ls tasks`, or pass a folder of task YAML files with --task-dir")
        self.task_manager = tm

    def run(self, model, tokenizer) -> tuple[dict[str, float | None], dict[str, str | None]]:
        """({task: score}, {task: metric name}) for one loaded model (HF or PEFT-wrapped)."""
        if not self.tasks:
            return {}, {}
        import lm_eval
        from lm_eval.models.huggingface import HFLM

        from .task_code import task_code_guard, template_error

        dev = next(model.parameters()).device
        side = tokenizer.padding_side
        try:
            with _quiet_lm_eval(), quiet_lm_eval_bars(), task_code_guard(self.trust_task_code):
                lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.batch_size, device=str(dev),
                          **self.options.model_args)
                res = lm_eval.simple_evaluate(model=lm, tasks=self.tasks, task_manager=self.task_manager,
                                              limit=self.limit, random_seed=self.seed, numpy_random_seed=self.seed,
                                              torch_random_seed=self.seed, fewshot_random_seed=self.seed,
                                              bootstrap_iters=0, log_samples=False, **self.options.evaluate_kwargs())
        except (ConnectionError, OSError) as e:
            raise InputError(f"lm-eval could not fetch the data for {self.tasks} (standard tasks need the Hugging "
                             f"Face hub; offline use a local task with --task-dir): {e}") from None
        except Exception as e:  # only Jinja's errors are turned into an InputError; the rest re-raised
            err = template_error(e)
            if err is None:
                raise
            raise err from None
        finally:
            tokenizer.padding_side = side
        scores, metrics = {}, {}
        for t in self.tasks:
            r = res["results"].get(t, {})
            key = next((m for m in METRICS if isinstance(r.get(m), (int, float))), None)
            if key is None:  # any other numeric metric the task defines
                key = next((k for k, v in r.items() if isinstance(v, (int, float)) and "stderr" not in k
                            and k != "alias"), None)
            score = None if key is None else float(r[key])
            scores[t] = score if score is not None and math.isfinite(score) else None  # NaN/inf: not measured
            metrics[t] = key
        return scores, metrics


def run_capability(model, tokenizer, tasks: list[str], *, task_dir: str | None = None, limit: int | None = None,
                   batch_size: int = 8, seed: int = 0, trust_task_code: bool = False) -> dict[str, float | None]:
    """{task: score} for one loaded model (see ``Capability`` to score several models)."""
    return Capability(tasks, task_dir=task_dir, limit=limit, batch_size=batch_size, seed=seed,
                      trust_task_code=trust_task_code).run(model, tokenizer)[0]


def parse_tasks(text: str | None) -> list[str]:
    """The --tasks option: None -> [the built-in task]; "none" or "" -> []; "a, b" -> ["a", "b"]."""
    if text is None:
        return [BUILTIN_TASK]
    if text.strip().lower() in ("", "none"):
        return []
    return [t.strip() for t in text.split(",") if t.strip()]
