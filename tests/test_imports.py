"""Start-up: what a ``lora-audit`` process imports (``python -X importtime``, read back as the list
of modules), so that many small CI runs stay cheap. A behaviour, not a timing: help and version
import no numerical library at all, and a real spectrum audit of a PEFT adapter imports torch,
numpy, safetensors and what lora-audit itself needs, but none of the heavy libraries of other
commands (transformers, peft, lm-eval, matplotlib, pandas, ray, scipy, scikit-learn)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .helpers import make_peft_adapter

ROOT = Path(__file__).resolve().parents[1]
HEAVY = {"transformers", "peft", "lm_eval", "matplotlib", "pandas", "ray", "scipy", "sklearn", "accelerate",
         "datasets", "huggingface_hub", "jinja2"}
NUMERICAL = HEAVY | {"torch", "numpy", "safetensors", "blake3"}


def imported(*args: str, env_extra: dict | None = None) -> set[str]:
    """Top-level packages a ``python -X importtime -m lora_audit ARGS`` process imported (it must exit 0)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(env_extra or {})}
    out = subprocess.run([sys.executable, "-X", "importtime", "-m", "lora_audit", *args], capture_output=True,
                         text=True, env=env, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-3000:]
    names = set()
    for line in out.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip()
            if name != "package":  # the header line
                names.add(name.split(".")[0])
    assert "lora_audit" in names and "click" in names  # the list is real
    return names


@pytest.mark.parametrize("args", [["--help"], ["--version"], ["spectrum", "--help"], ["screen", "--help"],
                                  ["cache", "ls", "--help"]])
def test_help_and_version_import_no_numerical_library(args):
    assert imported(*args) & NUMERICAL == set()


def test_spectrum_audit_imports_only_what_it_uses(tiny_llama, tmp_path):
    adapter = make_peft_adapter(tiny_llama, tmp_path / "adapter", r=2, lora_alpha=4, target_modules=["q_proj"])
    names = imported("spectrum", str(tiny_llama), str(adapter), "-q", "--json", str(tmp_path / "out.json"),
                     "--cache-dir", str(tmp_path / "cache"))
    assert (tmp_path / "out.json").is_file()
    assert {"torch", "safetensors"} <= names
    assert names & HEAVY == set()
