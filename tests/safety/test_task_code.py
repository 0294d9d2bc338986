"""A local lm-eval task folder is code (issue 24, case 1): `safety-eval --task-dir DIR` and `audit`
ran a YAML's `!function` module and its Jinja templates (`{{ cycler.__init__.__globals__.os.system(..) }}`)
unsandboxed. Now a folder that runs code is refused before any model is loaded unless
--trust-task-code is given, templates render in a Jinja sandbox, and the built-in task needs no flag."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from lora_audit.checkpoints import load_model
from lora_audit.errors import FormatError, InputError
from lora_audit.safety.capability import BUILTIN_TASK, Capability
from lora_audit.safety.task_code import inspect_task_dir
from tests.test_hostile_inputs import run_main

DOCS = [{"question": "Is fire hot?", "choices": ["yes", "no"], "answer": 0},
        {"question": "Is ice hot?", "choices": ["yes", "no"], "answer": 1}]


def task_yaml(name: str, data: Path, *, text: str = "Question: {{question}}\\nAnswer:", extra: str = "") -> str:
    return (f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files: {json.dumps(str(data))}\n"
            "test_split: train\noutput_type: multiple_choice\n"
            f"doc_to_text: \"{text}\"\ndoc_to_choice: \"{{{{choices}}}}\"\ndoc_to_target: answer\n"
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n" + extra)


@pytest.fixture
def folder(tmp_path):
    """(task folder, data file, marker path the payloads would create)."""
    d = tmp_path / "tasks"
    d.mkdir()
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(x) + "\n" for x in DOCS))
    return d, data, tmp_path / "MARKER"


def func_folder(folder) -> Path:
    d, data, marker = folder
    (d / "evil.yaml").write_text(task_yaml("evil", data, extra="process_docs: !function evil_utils.process_docs\n"))
    (d / "evil_utils.py").write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
                                     "def process_docs(ds):\n    return ds\n")
    return d


def jinja_folder(folder) -> Path:
    d, data, marker = folder
    payload = f"{{{{ cycler.__init__.__globals__.os.system('touch {marker}') }}}}Q: {{{{question}}}}"
    (d / "evil.yaml").write_text(task_yaml("evil", data, text=payload))
    return d


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(tiny_llama, device="cpu")


@pytest.mark.parametrize("make", [func_folder, jinja_folder], ids=["!function", "jinja"])
def test_a_folder_that_runs_code_needs_the_flag(tiny, folder, make):
    d = make(folder)
    marker = folder[2]
    with pytest.raises(InputError, match="(?s)runs code.*--trust-task-code") as err:
        Capability(["evil"], task_dir=str(d))
    assert "evil.yaml" in str(err.value) and not marker.exists()
    scores, _ = Capability(["evil"], task_dir=str(d), trust_task_code=True, batch_size=2).run(tiny.model,
                                                                                              tiny.tokenizer)
    assert marker.exists() and scores["evil"] is not None  # the payload is real; the flag lets it run


def test_the_jinja_payload_does_not_run_even_past_the_static_check(tiny, folder, monkeypatch):
    """The sandbox, not the static check, is the guarantee: with the check switched off, lm-eval's
    rendering of the payload is refused and the marker file is not created."""
    import lora_audit.safety.task_code as tc

    d = jinja_folder(folder)
    monkeypatch.setattr(tc, "inspect_task_dir", lambda *a, **k: None)
    with pytest.raises(InputError, match="Jinja sandbox refuses.*--trust-task-code"):
        Capability(["evil"], task_dir=str(d), batch_size=2).run(tiny.model, tiny.tokenizer)
    assert not folder[2].exists()


def test_a_function_import_is_refused_even_past_the_static_check(tiny, folder, monkeypatch):
    import lora_audit.safety.task_code as tc

    d = func_folder(folder)
    monkeypatch.setattr(tc, "inspect_task_dir", lambda *a, **k: None)
    with pytest.raises(InputError, match="!function evil_utils.process_docs.*--trust-task-code"):
        Capability(["evil"], task_dir=str(d), batch_size=2).run(tiny.model, tiny.tokenizer)
    assert not folder[2].exists()


def test_plain_templates_and_the_builtin_task_need_no_flag(tiny, folder):
    """Templates that only read the document render in the sandbox as lm-eval renders them: the
    same score as unsandboxed (trusted), and the built-in task runs without the flag."""
    d, data, _ = folder
    (d / "plain.yaml").write_text(task_yaml("plain", data, text="Q: {{question|upper}} ({{choices|length}})\\nA:"))
    sandboxed, _ = Capability(["plain", BUILTIN_TASK], task_dir=str(d), batch_size=2, limit=4).run(tiny.model,
                                                                                                   tiny.tokenizer)
    trusted, _ = Capability(["plain", BUILTIN_TASK], task_dir=str(d), batch_size=2, limit=4,
                            trust_task_code=True).run(tiny.model, tiny.tokenizer)
    assert sandboxed == trusted and sandboxed[BUILTIN_TASK] is not None


@pytest.mark.parametrize("case, phrase", [
    ("include outside", "outside the task folder"),
    ("link outside", "outside the task folder"),
    ("unknown metric", "evaluate.load"),
    ("hf_evaluate", "evaluate.load"),
    ("use_prompt file", "use_prompt"),
    ("class", "class (a task written in Python)"),
    ("trust_remote_code", "trust_remote_code"),
    ("function in an include", "!function"),
    ("attr filter", "a Jinja sandbox refuses"),
    ("format string", "a Jinja sandbox refuses"),
])
def test_other_ways_a_folder_runs_code(folder, tmp_path, case, phrase):
    d, data, _ = folder
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "base.yaml").write_text("output_type: multiple_choice\n")
    extra, text = "", "Q: {{question}}"
    if case == "include outside":
        extra = f"include: {outside / 'base.yaml'}\n"
    elif case == "link outside":
        (outside / "t.yaml").write_text(task_yaml("t", data))
        (d / "t.yaml").symlink_to(outside / "t.yaml")
    elif case == "unknown metric":
        extra = "metric_list:\n  - metric: ./my_metric.py\n"
    elif case == "hf_evaluate":
        extra = "metric_list:\n  - metric: acc\n    hf_evaluate: true\n"
    elif case == "use_prompt file":
        extra = f"use_prompt: {outside / 'p.yaml'}:x\n"
    elif case == "class":
        extra = "class: some.module.Task\n"
    elif case == "trust_remote_code":
        extra = "dataset_kwargs:\n  trust_remote_code: true\n"
    elif case == "function in an include":
        (d / "_base.yaml.inc").write_text("process_docs: !function utils.f\n")
        extra = "include: _base.yaml.inc\n"
    elif case == "attr filter":
        text = "{{ cycler|attr('__init__') }}"
    elif case == "format string":
        text = "{{ '{0.__class__.__mro__}'.format(question) }}"
    if case != "link outside":
        (d / "t.yaml").write_text(task_yaml("t", data, text=text) + extra)
    with pytest.raises(InputError, match="--trust-task-code") as err:
        inspect_task_dir(d)
    assert phrase in str(err.value)
    assert inspect_task_dir(d, trust=True).runs_code


@pytest.mark.parametrize("where", ["yaml", "include", "data file", "dataset folder"])
def test_fifos_in_a_task_folder_are_refused_not_waited_on(folder, no_hang, where):
    d, data, _ = folder
    fifo = d / "x.yaml" if where == "yaml" else d / "data" / "pipe" if where == "dataset folder" else d / "pipe"
    fifo.parent.mkdir(exist_ok=True)
    os.mkfifo(fifo)
    (d / "not_a_file.yaml").mkdir()  # a folder named *.yaml is skipped, as lm-eval skips it
    if where == "include":
        (d / "t.yaml").write_text(task_yaml("t", data, extra="include: pipe\n"))
    elif where == "data file":
        (d / "t.yaml").write_text(task_yaml("t", fifo))
    elif where == "dataset folder":
        (d / "t.yaml").write_text(task_yaml("t", data).replace("dataset_path: json", f"dataset_path: {d / 'data'}"))
    for trust in (False, True):
        with pytest.raises(InputError, match=r"named pipe \(FIFO\)"):
            inspect_task_dir(d, trust=trust)


def test_yaml_that_builds_python_objects_is_refused(folder):
    d, data, _ = folder
    (d / "t.yaml").write_text(task_yaml("t", data, extra="process_results: !!python/name:os.system\n"))
    with pytest.raises(FormatError, match="not a task YAML lora-audit can check.*--trust-task-code"):
        inspect_task_dir(d)


def test_a_billion_laughs_file_is_inspected_quickly(folder):
    d, _, _ = folder
    lines = ["a0: &a0 ['{{x}}', '{{x}}']"] + [f"a{i}: &a{i} [*a{i - 1}, *a{i - 1}, *a{i - 1}]" for i in range(1, 30)]
    (d / "bomb.yaml").write_text("\n".join(lines) + "\ntask: bomb\n")
    assert not inspect_task_dir(d).runs_code  # 3**29 leaves if walked naively


def test_safety_eval_and_audit_refuse_before_loading_a_model(tiny_llama, folder, capsys, monkeypatch):
    d = func_folder(folder)

    def no_model(*a, **k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr("lora_audit.safety.evaluate.load_model", no_model)
    monkeypatch.setattr("lora_audit.spectral.api.run_spectrum", no_model)
    for argv in (["safety-eval", tiny_llama, "--tasks", "evil", "--task-dir", d],
                 ["audit", tiny_llama, tiny_llama, "--tasks", "evil", "--task-dir", d, "--out", folder[0].parent / "r"]):
        code, output = run_main(argv, capsys)
        assert code == 1 and "--trust-task-code" in output and "evil_utils" in output, output
        assert not folder[2].exists()
