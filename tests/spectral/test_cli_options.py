"""`lora-audit spectrum` option checking: every bad value is refused with "Error: ..." and a
non-zero exit before anything is loaded or written."""

import pytest
import torch
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.commands.spectrum import parse_sweep


@pytest.mark.parametrize("args,message", [
    (["--k", "0"], "Invalid value for '--k'"),
    (["--k", "ten"], "Invalid value for '--k'"),
    (["--epsilon", "0"], "Invalid value for '--epsilon'"),
    (["--epsilon", "1"], "Invalid value for '--epsilon'"),
    (["--epsilon", "1.5"], "Invalid value for '--epsilon'"),
    (["--epsilon-sweep", "0.1,abc"], "'abc' is not a number"),
    (["--epsilon-sweep", "0.5,1.2"], "strictly between 0 and 1"),
    (["--epsilon-sweep", "0.1,...,0.9"], "'...' needs two values"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_options(tmp_path, args, message):
    out = tmp_path / "out.json"
    r = CliRunner().invoke(cli, ["spectrum", str(tmp_path), str(tmp_path), "--json", str(out), *args])
    assert r.exit_code != 0
    assert "Error" in r.output and message in r.output, r.output
    assert "Traceback" not in r.output
    assert not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_cuda_absent(tmp_path):
    r = CliRunner().invoke(cli, ["spectrum", str(tmp_path), str(tmp_path), "--device", "cuda"])
    assert r.exit_code == 1 and "Error: --device cuda: CUDA is not available" in r.output


def test_json_path_that_is_a_folder(tmp_path):
    r = CliRunner().invoke(cli, ["spectrum", str(tmp_path), str(tmp_path), "--json", str(tmp_path)])
    assert r.exit_code == 2 and "is a folder" in r.output


def test_missing_tuned_argument(tmp_path):
    r = CliRunner().invoke(cli, ["spectrum", str(tmp_path)])
    assert r.exit_code == 2 and "Missing argument 'TUNED...'" in r.output


def test_help_explains_intruders():
    r = CliRunner().invoke(cli, ["spectrum", "--help"])
    assert r.exit_code == 0 and "intruder dimension is" in r.output.lower() and "--epsilon-sweep" in r.output


@pytest.mark.parametrize("text,expected", [
    ("0.1,0.2,...,0.9", (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)),
    ("0.05,0.1,...,0.3", (0.05, 0.1, 0.15, 0.2, 0.25, 0.3)),
    ("0.7, 0.3,0.3", (0.3, 0.7)),
    ("none", ()),
    ("", ()),
])
def test_parse_sweep(text, expected):
    assert parse_sweep(text) == pytest.approx(expected)
