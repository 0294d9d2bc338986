"""`lora-audit spectrum` end to end on real checkpoint folders: CliRunner (output, JSON contract,
CSV, every bad-input case of the contract) and once as a real subprocess. Counts are checked against
the float64 reference on peft's own merge."""

import json
import os
import subprocess
import sys

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from lora_audit.cli import cli
from tests.helpers import make_peft_adapter, make_tiny_llama
from tests.spectral.fixtures import make_full_finetune
from tests.spectral.reference import reference_audit


@pytest.fixture(scope="module")
def ckpts(tiny_llama, tmp_path_factory):
    d = tmp_path_factory.mktemp("spectral_cli")
    return {
        "adapter": make_peft_adapter(tiny_llama, d / "adapter", r=4, lora_alpha=8, seed=11,
                                     target_modules=["q_proj", "v_proj", "down_proj"]),
        "full": make_full_finetune(tiny_llama, d / "full"),
        "other_adapter": make_peft_adapter(make_tiny_llama(d / "wide", hidden=32, intermediate=48, tokenizer=False),
                                           d / "other_adapter", r=2, target_modules=["q_proj"]),
        "dir": d,
    }


def invoke(*args):
    return CliRunner().invoke(cli, ["spectrum", *map(str, args)])


def test_adapter_and_full_finetune(tiny_llama, ckpts, tmp_path):
    js, csv = tmp_path / "out" / "s.json", tmp_path / "s.csv"
    r = invoke(tiny_llama, ckpts["adapter"], ckpts["full"], "--json", js, "--csv", csv, "--device", "cpu")
    assert r.exit_code == 0, r.output
    obj = json.loads(js.read_text())
    assert obj["base"] == str(tiny_llama) and obj["k"] == 10 and obj["epsilon"] == 0.5
    assert obj["lora_audit"]["schema"] == "spectrum"
    assert [x["tuned"] for x in obj["results"]] == [str(ckpts["adapter"]), str(ckpts["full"])]
    for entry, tuned in zip(obj["results"], (ckpts["adapter"], ckpts["full"]), strict=True):
        ref = reference_audit(tiny_llama, tuned)
        got = {m["name"]: m for m in entry["matrices"]}
        assert set(got) == set(ref)
        assert {n: m["intruders"] for n, m in got.items()} == {n: c for n, (_, c) in ref.items()}
        assert entry["total_intruders"] == sum(c for _, c in ref.values())
        # the summary table prints each model's total
        assert f"{entry['total_intruders']:>9}" in r.output
    assert obj["results"][1]["total_intruders"] == 1  # the planted intruder of the full fine-tune
    df = pd.read_csv(csv)
    assert len(df) == sum(len(x["matrices"]) for x in obj["results"])
    assert {"tuned", "name", "module", "layer", "intruders", "effective_rank", "intruders_eps_0.9"} <= set(df.columns)
    assert "Worst matrices of" in r.output and "model.layers.1.mlp.down_proj.weight" in r.output


def test_quiet_and_options(tiny_llama, ckpts, tmp_path):
    js = tmp_path / "q.json"
    r = invoke(tiny_llama, ckpts["adapter"], "--quiet", "--k", "3", "--epsilon", "0.3",
               "--epsilon-sweep", "0.2,0.4", "--exact", "--float64", "--no-cache", "--json", js)
    assert r.exit_code == 0, r.output
    obj = json.loads(js.read_text())
    assert obj["k"] == 3 and obj["epsilon"] == 0.3 and obj["epsilon_sweep"] == [0.2, 0.4]
    assert obj["lora_audit"]["settings"]["dtype"] == "float64" and obj["lora_audit"]["settings"]["exact"] is True
    ref = reference_audit(tiny_llama, ckpts["adapter"], k=3, epsilon=0.3)
    assert obj["results"][0]["total_intruders"] == sum(c for _, c in ref.values())
    assert r.output.strip() == (f"{ckpts['adapter']}: {obj['results'][0]['total_intruders']} intruders in "
                                f"{len(ref)} matrices")
    assert all(m["method"] == "exact" for m in obj["results"][0]["matrices"])


def _truncated(d, full):
    bad = d / "truncated"
    bad.mkdir()
    src = (full / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(src[: len(src) // 2])
    (bad / "config.json").write_text((full / "config.json").read_text())
    return bad


def _pickle_only(d):
    p = d / "pickled"
    p.mkdir()
    (p / "config.json").write_text("{}")
    torch.save({"x": torch.zeros(1)}, p / "pytorch_model.bin")
    return p


def _text_file(d):
    p = d / "weights.txt"
    p.write_text("not a checkpoint")
    return p


@pytest.mark.parametrize("case", ["missing", "truncated", "shape_mismatch", "nothing_in_common", "unsupported",
                                  "pickle", "corrupt_json_config"])
def test_bad_input(tiny_llama, tiny_gpt2, ckpts, tmp_path, case):
    d = ckpts["dir"]
    tuned = {
        "missing": lambda: d / "does-not-exist",
        "truncated": lambda: _truncated(tmp_path, ckpts["full"]),
        "shape_mismatch": lambda: ckpts["other_adapter"],
        "nothing_in_common": lambda: tiny_gpt2,
        "unsupported": lambda: _text_file(tmp_path),
        "pickle": lambda: _pickle_only(tmp_path),
        "corrupt_json_config": lambda: _broken_adapter(tmp_path, ckpts["adapter"]),
    }[case]()
    out = tmp_path / "never.json"
    r = invoke(tiny_llama, tuned, "--json", out, "--csv", tmp_path / "never.csv")
    assert r.exit_code == 1, (case, r.output)
    assert r.output.startswith("Error: ") or "\nError: " in r.output, r.output
    assert "Traceback" not in r.output and "This is a bug" not in r.output
    assert not out.exists() and not (tmp_path / "never.csv").exists()
    if case == "shape_mismatch":
        assert "q_proj" in r.output
    if case == "pickle":
        assert "--allow-pickle" in r.output


def _broken_adapter(tmp_path, good):
    import shutil

    p = tmp_path / "broken_adapter"
    shutil.copytree(good, p)
    (p / "adapter_config.json").write_text("{ this is not json")
    return p


def test_out_of_memory_is_a_clean_error(tiny_llama, ckpts, tmp_path, monkeypatch):
    import lora_audit.spectral.engine as engine

    def oom(*a, **k):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(engine, "audit", oom)
    out = tmp_path / "never.json"
    r = invoke(tiny_llama, ckpts["adapter"], "--json", out)
    assert r.exit_code == 1 and "out of memory" in r.output and "--device cpu" in r.output
    assert not out.exists()


def test_real_subprocess(tiny_llama, ckpts, tmp_path):
    js = tmp_path / "sub.json"
    p = subprocess.run([sys.executable, "-m", "lora_audit", "spectrum", str(tiny_llama), str(ckpts["adapter"]),
                        "--json", str(js), "--device", "cpu", "--exact"], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "LORA_AUDIT_NO_PROGRESS": "1"})
    assert p.returncode == 0, p.stderr
    obj = json.loads(js.read_text())
    ref = reference_audit(tiny_llama, ckpts["adapter"])
    assert obj["results"][0]["total_intruders"] == sum(c for _, c in ref.values())
    assert "Intruder dimensions" in p.stdout
    bad = subprocess.run([sys.executable, "-m", "lora_audit", "spectrum", str(tiny_llama), str(tmp_path / "nope")],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1 and bad.stderr.startswith("Error: ") and "Traceback" not in bad.stderr


def test_tuned_identical_to_base(tiny_llama, tmp_path):
    """A 'fine-tune' that changed nothing: exit 0, zero matrices, a warning saying so."""
    js = tmp_path / "same.json"
    r = invoke(tiny_llama, tiny_llama, tiny_llama, "--json", js)
    assert r.exit_code == 0, r.output
    obj = json.loads(js.read_text())
    for entry in obj["results"]:
        assert entry["total_intruders"] == 0 and entry["matrices"] == [] and entry["matrices_unchanged"] > 0
        assert any("no weight matrix differs" in w for w in entry["warnings"])
    assert "nothing to audit" in r.output
