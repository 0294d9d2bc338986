"""Every command on a table of malformed, hostile or careless inputs, through the real console entry
point (``lora_audit.cli.main``, the one with the catch-all for bugs). For each case: the exit
status is the documented one (1 for bad input, 2 for a bad option value), the message names what
is wrong, nothing says "This is a bug" or prints a traceback, and no file outside the named
outputs changed (the outputs themselves were not written)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_audit.cli import main

from .helpers import make_peft_adapter


def run_main(argv: list[str], capsys) -> tuple[int, str]:
    """(exit status, stdout + stderr) of ``lora-audit ARGV``."""
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    cap = capsys.readouterr()
    return code, cap.out + cap.err


def state(root: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` with its size and content hash (FIFOs and devices by kind)."""
    out = {}
    for p in sorted(root.rglob("*")):
        st = os.lstat(p)
        if stat.S_ISREG(st.st_mode):
            out[str(p.relative_to(root))] = (st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
        elif not stat.S_ISDIR(st.st_mode):
            out[str(p.relative_to(root))] = (0, "special")
    return out


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_llama):
    """A workspace: a copy of the tiny base, a good adapter, and malformed variants."""
    root = tmp_path_factory.mktemp("hostile")
    base = root / "base"
    shutil.copytree(tiny_llama, base)
    good = make_peft_adapter(base, root / "good", r=2, target_modules=["q_proj", "v_proj"])
    cfg = json.loads((good / "adapter_config.json").read_text())

    def adapter(name: str, config=None, tensors=None) -> Path:
        d = root / name
        shutil.copytree(good, d)
        if config is not None:
            (d / "adapter_config.json").write_text(config if isinstance(config, str) else json.dumps(config))
        if tensors is not None:
            save_file(tensors, str(d / "adapter_model.safetensors"))
        return d

    adapter("cfg_list", "[]")
    adapter("cfg_null", "null")
    adapter("cfg_bad_r", {**cfg, "r": "x"})
    adapter("cfg_bad_alpha", {**cfg, "lora_alpha": "big"})
    adapter("cfg_bad_pattern", {**cfg, "rank_pattern": [1]})
    adapter("cfg_not_utf8", "\udcff".encode("utf-8", "surrogateescape").decode("latin-1"))
    (root / "cfg_not_utf8" / "adapter_config.json").write_bytes(b"\xff\xfe{")
    truncated = adapter("truncated")
    data = (truncated / "adapter_model.safetensors").read_bytes()
    (truncated / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    dora = make_peft_adapter(base, root / "dora_good", r=2, target_modules=["q_proj"], use_dora=True)
    w = load_file(str(dora / "adapter_model.safetensors"))
    key = next(k for k in w if "lora_magnitude_vector" in k)
    w[key] = w[key][:-3].contiguous()
    save_file(w, str(dora / "adapter_model.safetensors"))
    kohya = root / "kohya.safetensors"
    save_file({"lora_unet_x.lora_down.weight": torch.randn(2, 64), "lora_unet_x.lora_up.weight": torch.randn(64, 2),
               "lora_unet_x.alpha": torch.tensor([1.0, 2.0])}, str(kohya))
    sharded = root / "sharded"
    shutil.copytree(base, sharded)
    (sharded / "model.safetensors").unlink()
    (sharded / "model.safetensors.index.json").write_text(json.dumps(["not", "a", "map"]))
    escape = root / "escape"
    shutil.copytree(base, escape)
    names = list(load_file(str(base / "model.safetensors")))
    (escape / "model.safetensors").unlink()
    (escape / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {n: "../base/model.safetensors" for n in names}}))
    garbage = root / "garbage"
    shutil.copytree(base, garbage)
    (garbage / "model.safetensors").write_bytes(os.urandom(4096))
    pickled = root / "pickled"
    pickled.mkdir()
    shutil.copy(base / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    (root / "unclosed.csv").write_text('prompt,category\n"How do I x?,a\nHow do I y?,b\n')
    (root / "bad.jsonl").write_text('{"text": "ok"}\n{"text": 3}\n')
    fifo = root / "fifo.csv"
    os.mkfifo(fifo)
    spec = root / "spec_bad.json"
    spec.write_text(json.dumps({"lora_audit": {"schema": "spectrum", "schema_version": 1}, "base": "b", "k": "ten",
                                "epsilon": 0.5, "results": []}))
    saf = root / "safety_bad_verdict.json"
    saf.write_text(json.dumps({"lora_audit": {"schema": "safety", "schema_version": 1},
                               "models": {"base": {"refusal_rate": 0.5, "refusal_ci": [0.1, 0.9], "responses": []},
                                          "t": {"refusal_rate": 0.1, "refusal_ci": [0.0, 0.3], "responses": []}},
                               "verdict": {"t": "SAFETY_REMOVED"}}))
    (root / "nan.json").write_text('{"base": "b", "k": 10, "epsilon": NaN, "results": []}')
    (root / "busy").mkdir()
    (root / "busy" / "notes.txt").write_text("mine")
    return root


B = "{ws}/base"
GOOD = "{ws}/good"

# (id, argv (with {ws}), exit status, a phrase the message must contain)
CASES = [
    ("adapter config is a list", ["spectrum", B, "{ws}/cfg_list"], 1, "must be a JSON object"),
    ("adapter config is null", ["spectrum", B, "{ws}/cfg_null"], 1, "must be a JSON object"),
    ("r of the wrong type", ["spectrum", B, "{ws}/cfg_bad_r"], 1, "'r'"),
    ("lora_alpha of the wrong type", ["spectrum", B, "{ws}/cfg_bad_alpha"], 1, "lora_alpha"),
    ("rank_pattern of the wrong type", ["spectrum", B, "{ws}/cfg_bad_pattern"], 1, "rank_pattern"),
    ("adapter config not UTF-8", ["spectrum", B, "{ws}/cfg_not_utf8"], 1, "not UTF-8"),
    ("truncated adapter weights", ["spectrum", B, "{ws}/truncated"], 1, "adapter_model.safetensors"),
    ("DoRA magnitude of the wrong length", ["spectrum", B, "{ws}/dora_good"], 1, "magnitude"),
    ("kohya alpha with two elements", ["spectrum", B, "{ws}/kohya.safetensors"], 1, "alpha"),
    ("shard index that is a list", ["spectrum", "{ws}/sharded", GOOD], 1, "shard index"),
    ("shard index escaping the folder", ["spectrum", "{ws}/escape", GOOD], 1, ".."),
    ("garbage weights", ["spectrum", "{ws}/garbage", GOOD], 1, "model.safetensors"),
    ("pickle base without --allow-pickle", ["spectrum", "{ws}/pickled", GOOD], 1, "Unpickling can run arbitrary code"),
    ("json output over an input", ["spectrum", B, GOOD, "--json", "{ws}/base/model.safetensors"], 1, "input"),
    ("json and csv on one path", ["spectrum", B, GOOD, "--json", "{ws}/o.x", "--csv", "{ws}/o.x"], 1, "two outputs"),
    ("json into /proc", ["spectrum", B, GOOD, "--json", "/proc/lora-audit-test.json"], 1, "cannot write"),
    ("epsilon sweep too long", ["spectrum", B, GOOD, "--epsilon-sweep", "0.1,0.2,...,1e9"], 2, "epsilon"),
    ("epsilon sweep with 8 million thresholds", ["spectrum", B, GOOD, "--epsilon-sweep", "0.1,0.1000001,...,0.9"], 2,
     "at most"),
    ("prompts from /dev/zero", ["safety-eval", B, "--prompts", "/dev/zero"], 1, "regular file"),
    ("prompts from a FIFO", ["safety-eval", B, "--prompts", "{ws}/fifo.csv"], 1, "regular file"),
    ("CSV with an unclosed quote", ["safety-eval", B, "--prompts", "{ws}/unclosed.csv"], 1, "line 2"),
    ("markers from a FIFO", ["safety-eval", B, "--markers", "{ws}/fifo.csv"], 1, "regular file"),
    ("pickled base for safety-eval", ["safety-eval", "{ws}/pickled"], 1, "Unpickling can run"),
    ("report: a string where a number belongs", ["report", "{ws}/spec_bad.json", "--out", "{ws}/r.html"], 1, "k"),
    ("report: a verdict that is not an object", ["report", "{ws}/safety_bad_verdict.json", "--out", "{ws}/r.html"],
     1, "verdict"),
    ("report: NaN in a result", ["report", "{ws}/nan.json", "--out", "{ws}/r.html"], 1, "NaN"),
    ("finetune --lr nan", ["finetune", B, "--method", "lora", "--data", "builtin:alpaca-mini", "--out",
                           "{ws}/ft", "--lr", "nan"], 2, "--lr"),
    ("finetune onto its base", ["finetune", B, "--method", "lora", "--data", "builtin:alpaca-mini", "--out",
                                B, "--steps", "1"], 1, "input"),
    ("finetune --target-modules matching nothing", ["finetune", B, "--method", "lora", "--data",
                                                    "builtin:alpaca-mini", "--out", "{ws}/ft", "--steps", "1",
                                                    "--target-modules", "nothing_here"], 1, "nothing_here"),
    ("finetune bad data", ["finetune", B, "--method", "lora", "--data", "{ws}/bad.jsonl", "--out",
                           "{ws}/ft"], 1, "line 2"),
    ("finetune into a folder it did not write", ["finetune", B, "--method", "lora", "--data",
                                                  "builtin:alpaca-mini", "--out", "{ws}/busy", "--overwrite"], 1,
     "did not write"),
    ("mitigate --k 0", ["mitigate", B, GOOD, "--k", "0", "--out", "{ws}/m"], 2, "--k"),
    ("mitigate --epsilon 7", ["mitigate", B, GOOD, "--epsilon", "7", "--out", "{ws}/m"], 2, "--epsilon"),
    ("mitigate a full model", ["mitigate", B, B, "--out", "{ws}/m"], 1, "adapter"),
    ("federated with a broken client config", ["federated", GOOD, "{ws}/cfg_list"], 1, "must be a JSON object"),
    ("audit into a folder it did not write", ["audit", B, GOOD, "--skip-safety", "--out", "{ws}/busy",
                                              "--overwrite"], 1, "did not write"),
    ("safety-scan prompts from /dev/zero", ["safety-scan", B, GOOD, "--prompts", "/dev/zero"], 1, "regular file"),
    ("safety-scan json over an input", ["safety-scan", B, GOOD, "--json", "{ws}/base/model.safetensors"], 1, "input"),
    ("safety-scan of a pickled base", ["safety-scan", "{ws}/pickled", GOOD], 1, "Unpickling can run"),
    ("safety-scan of a base that refuses nothing", ["safety-scan", B, GOOD, "--device", "cpu"], 1,
     "no refusal direction"),
    ("zoo into a folder it did not write", ["zoo", "{ws}/busy", "--overwrite"], 1, "did not write"),
    ("zoo risk file over a file it did not write", ["zoo", "{ws}/z", "--write-risk-file", "{ws}/busy/notes.txt"], 1,
     "not written by lora-audit"),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_clear_answer_and_changes_nothing(ws, case, capsys):
    _, argv, status, phrase = case
    argv = [a.format(ws=ws) for a in argv]
    before = state(ws)
    code, output = run_main(argv, capsys)
    assert code == status, output
    assert phrase in output, output
    assert "This is a bug" not in output and "Traceback" not in output, output
    assert state(ws) == before, "files changed"


def test_cache_clear_on_a_model_folder_deletes_nothing(ws, capsys):
    before = state(ws)
    code, output = run_main(["cache", "clear", "--yes", "--cache-dir", ws / "base"], capsys)
    assert code == 0 and state(ws) == before, output


def test_hostile_tensor_names_cannot_drive_the_terminal(ws, tmp_path, capsys):
    """A name with escape sequences (clear the screen, move the cursor, fake a line) and bidi
    controls is printed as visible escapes."""
    hostile = "model.layers.0.self_attn.q_proj\x1b[2J\x1b[H ALL CLEAN\r\u202e"
    base, tuned = tmp_path / "b", tmp_path / "t"
    for d in (base, tuned):
        d.mkdir()
    save_file({hostile + ".weight": torch.randn(16, 16)}, str(base / "model.safetensors"))
    save_file({hostile + ".weight": torch.randn(16, 16)}, str(tuned / "model.safetensors"))
    code, output = run_main(["spectrum", base, tuned, "--no-cache", "--device", "cpu"], capsys)
    assert code == 0, output
    assert "\x1b" not in output and "\r" not in output and "\u202e" not in output
    assert "\\x1b[2J" in output and "\\u202e" in output


def test_csv_dir_that_holds_other_files_is_refused(ws, tmp_path, capsys):
    """`report --out P/report.html --csv-dir P` used to replace every other file in P."""
    spec = tmp_path / "s.json"
    code, _ = run_main(["spectrum", ws / "base", ws / "good", "--json", spec, "--no-cache", "-q"], capsys)
    assert code == 0
    p = tmp_path / "p"
    p.mkdir()
    (p / "mine.txt").write_text("mine")
    before = state(tmp_path)
    code, output = run_main(["report", spec, "--out", p / "report.html", "--csv-dir", p, "--overwrite"], capsys)
    assert code == 1 and "did not write" in output and state(tmp_path) == before, output


def test_non_finite_weights_are_findings_and_exit_4(ws, tmp_path, capsys):
    bad = tmp_path / "nan_adapter"
    shutil.copytree(ws / "good", bad)
    w = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in w if "lora_B" in k)[0]
    w[key][0, 0] = float("nan")
    save_file(w, str(bad / "adapter_model.safetensors"))
    out = tmp_path / "s.json"
    code, output = run_main(["spectrum", ws / "base", bad, "--json", out, "--no-cache"], capsys)
    assert code == 4, output
    res = json.loads(out.read_text())["results"][0]
    module = key.removeprefix("base_model.model.").split(".lora_B")[0]
    assert [s["name"] for s in res["skipped"]] == [module + ".weight"] and res["skipped"][0]["where"] == "lora_B"
    assert module in output and "not audited" in output


def test_csv_cells_cannot_be_formulas(ws, tmp_path, capsys, monkeypatch):
    shutil.copytree(ws / "good", tmp_path / "=HYPERLINK(1)")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "s.csv"
    code, output = run_main(["spectrum", ws / "base", "=HYPERLINK(1)", "--csv", out, "--no-cache", "-q"], capsys)
    assert code == 0, output
    import csv

    rows = list(csv.DictReader(out.open()))
    assert rows and all(r["tuned"] == "'=HYPERLINK(1)" for r in rows)


def test_report_shows_names_as_text(tmp_path):
    """Bidi controls and '$' (matplotlib mathtext) in names: escaped on the page, literal in figures."""
    from lora_audit.report import build_report

    from .report import synth

    name = "cost $5 and $6 \u202eevil"
    html = build_report([synth.spectrum([name], seed=1)], title="t")
    assert "\u202e" not in html and "\\u202e" in html
    assert "cost $5 and $6" in html and "cost 5and6" not in html


def test_results_are_kept_when_the_late_write_fails(ws, tmp_path, capsys, monkeypatch):
    """The output folder passes the early check, then the write fails (disk full, folder removed):
    the error says where the result was saved instead, and that file holds it."""
    import re

    import lora_audit.io as lio

    def fail(path, obj):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lio, "atomic_write_json", fail)
    code, output = run_main(["spectrum", ws / "base", ws / "good", "--json", tmp_path / "s.json", "--no-cache", "-q"],
                            capsys)
    assert code == 1 and "No space left on device" in output, output
    kept = re.search(r"the result was saved to (\S+\.json)", output)
    assert kept, output
    saved = json.loads(Path(kept.group(1)).read_text())
    assert saved["lora_audit"]["schema"] == "spectrum" and saved["results"][0]["tuned"] == str(ws / "good")
    Path(kept.group(1)).unlink()
