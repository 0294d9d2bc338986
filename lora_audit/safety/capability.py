"""Capability retention via lm-eval (lm-evaluation-harness 0.4.x) on the already loaded model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from ..errors import InputError

BUILTIN_TASK = "lora_audit_general_mc"


def builtin_task_dir() -> Path:
    return Path(str(resources.files("lora_audit") / "data" / "safety" / "tasks"))


def run_capability(model, tokenizer, tasks: list[str], *, task_dir: str | None = None, limit: int | None = None,
                   batch_size: int = 8, device: str = "cpu", seed: int = 0) -> dict[str, float]:
    """{task: accuracy} from lm_eval.simple_evaluate with HFLM wrapping ``model`` (no second load)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    include = [str(_materialise_builtin())]
    if task_dir:
        if not Path(task_dir).is_dir():
            raise InputError(f"{task_dir}: --task-dir must be a folder of lm-eval task YAML files")
        include.append(str(task_dir))
    tm = TaskManager(include_path=include)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        raise InputError(f"unknown lm-eval task(s) {unknown}; see `lm-eval --tasks list`, or pass --task-dir")
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(device))
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=tm, limit=limit,
                                      random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed,
                                      fewshot_random_seed=seed)
    except (ConnectionError, OSError) as e:
        raise InputError(f"lm-eval could not fetch the data for {tasks} (standard tasks need the Hugging "
                         f"Face hub; offline use a local task with --task-dir): {e}") from None
    out = {}
    for t in tasks:
        r = res["results"].get(t, {})
        val = r.get("acc,none", next((v for k, v in r.items() if isinstance(v, float) and "stderr" not in k), None))
        out[t] = val
    return out


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


def _materialise_builtin() -> Path:
    """Write the built-in task's YAML (which must name its JSONL by absolute path) into the cache."""
    import json

    from ..checkpoints.default_model import cache_root
    from ..io import atomic_write_text

    data = builtin_task_dir() / f"{BUILTIN_TASK}.jsonl"
    d = cache_root() / "safety_tasks"
    d.mkdir(parents=True, exist_ok=True)
    atomic_write_text(d / f"{BUILTIN_TASK}.yaml", TASK_YAML.format(task=BUILTIN_TASK, data=json.dumps(str(data))))
    return d
