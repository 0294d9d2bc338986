"""Hub references pinned to a revision, resolved offline from a local Hugging Face cache built on disk
in huggingface_hub's layout (two commits of one tiny model, refs/main at one of them); typos that look
like ORG/NAME; BASE named by the adapter's config."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_audit.checkpoints import hub
from lora_audit.checkpoints.detect import Kind, detect
from lora_audit.cli import cli
from lora_audit.errors import InputError

from ..helpers import make_peft_adapter, make_tiny_llama
from .hubcache import add_snapshot

REPO = "org/tiny"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def offline_cache(tmp_path, monkeypatch):
    """An empty local hub cache, offline; hub references resolved afresh in each test."""
    from huggingface_hub import constants

    cache = tmp_path / "hf-cache"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub, "_RESOLVED", {})
    return cache


@pytest.fixture(scope="module")
def two_commits(tmp_path_factory):
    """Two tiny Llamas of one architecture with different weights (A, B) and a full TUNED model that is
    A with one matrix changed (a rank-1 update of layer 0's q_proj)."""
    root = tmp_path_factory.mktemp("hub_models")
    a, b = make_tiny_llama(root / "A", seed=0), make_tiny_llama(root / "B", seed=5)
    tuned = root / "tuned"
    shutil.copytree(a, tuned)
    state = load_file(str(a / "model.safetensors"))
    name = "model.layers.0.self_attn.q_proj.weight"
    g = torch.Generator().manual_seed(1)
    state[name] = state[name] + 3.0 * torch.outer(torch.randn(state[name].shape[0], generator=g),
                                                   torch.randn(state[name].shape[1], generator=g))
    save_file(state, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    return a, b, tuned


@pytest.fixture
def cached(offline_cache, two_commits):
    """The cache holding A and B as two commits of org/tiny; refs/main at B."""
    a, b, tuned = two_commits
    ca = add_snapshot(offline_cache, REPO, a, refs=("v1",))
    cb = add_snapshot(offline_cache, REPO, b, refs=("main",))
    assert ca != cb
    return {"A": ca, "B": cb, "tuned": tuned, "folder_A": a}


def _spectrum(*args, tmp: Path):
    out = tmp / "s.json"
    r = CliRunner().invoke(cli, ["spectrum", *map(str, args), "--json", str(out), "--no-cache", "--device", "cpu"])
    return r, (json.loads(out.read_text()) if out.exists() else None)


def test_a_pinned_revision_audits_that_snapshot_and_records_its_commit(cached, tmp_path):
    n_matrices = 2 * 7  # 2 layers x (q, k, v, o, gate, up, down)
    r, pinned = _spectrum(f"{REPO}@{cached['A']}", cached["tuned"], tmp=tmp_path)
    assert r.exit_code == 0, r.output
    assert [m["name"] for m in pinned["results"][0]["matrices"]] == ["model.layers.0.self_attn.q_proj.weight"]
    prov = pinned["lora_audit"]["settings"]["hub"][f"{REPO}@{cached['A']}"]
    assert prov == {"repo_id": REPO, "revision": cached["A"], "commit": cached["A"]}

    r, main = _spectrum(REPO, cached["tuned"], tmp=tmp_path)  # refs/main -> B: every matrix differs from it
    assert r.exit_code == 0, r.output
    assert len(main["results"][0]["matrices"]) == n_matrices
    assert main["lora_audit"]["settings"]["hub"][REPO]["commit"] == cached["B"]

    r, tag = _spectrum(REPO, cached["tuned"], "--revision", "v1", tmp=tmp_path)  # a tag in refs/ -> A
    assert r.exit_code == 0, r.output
    assert len(tag["results"][0]["matrices"]) == 1
    assert tag["lora_audit"]["settings"]["hub"][f"{REPO}@v1"] == {"repo_id": REPO, "revision": "v1",
                                                                   "commit": cached["A"]}
    # the counts follow the snapshot, not the name: the same as auditing A's folder itself
    r, local = _spectrum(cached["folder_A"], cached["tuned"], tmp=tmp_path)
    assert local["results"][0]["total_intruders"] == pinned["results"][0]["total_intruders"]
    assert "hub" not in local["lora_audit"]["settings"]


def test_a_revision_missing_from_the_cache_is_a_clear_error_naming_the_download(cached, tmp_path):
    missing = "0123456789abcdef0123456789abcdef01234567"
    for ref, rev in ((f"{REPO}@{missing}", missing), (f"{REPO}@v2", "v2")):
        r, obj = _spectrum(ref, cached["tuned"], tmp=tmp_path)
        assert r.exit_code == 1 and obj is None
        msg = r.output.strip()
        assert len(msg.splitlines()) == 1, msg
        assert f"revision {rev} of {REPO} is not in the local Hugging Face cache" in msg
        assert "HF_HUB_OFFLINE=1 forbids downloading" in msg
        assert f"`hf download {REPO} --revision {rev}`" in msg
        assert cached["A"][:12] in msg and "refs main, v1" in msg  # what the cache does hold


def test_a_repository_absent_from_the_cache_says_no_such_path_and_the_download(offline_cache, two_commits, tmp_path):
    r, _ = _spectrum("someone/not-here", two_commits[2], tmp=tmp_path)
    assert r.exit_code == 1
    assert "someone/not-here: no such file or folder; as a Hugging Face hub id it is not in the local cache" in r.output
    assert "`hf download someone/not-here`" in r.output


def test_malformed_revisions_are_refused(offline_cache, two_commits, tmp_path):
    for ref in (f"{REPO}@", f"{REPO}@a b", f"{REPO}@x..y"):
        with pytest.raises(InputError, match="is not a revision"):
            hub.parse_ref(ref)
    r, _ = _spectrum(REPO, two_commits[2], "--revision", "bad..rev", tmp=tmp_path)
    assert r.exit_code == 1 and "is not a revision" in r.output


def test_revision_option_needs_a_hub_id(two_commits, tmp_path):
    a, _, tuned = two_commits
    r, _ = _spectrum(a, tuned, "--revision", "main", tmp=tmp_path)
    assert r.exit_code == 1 and "none of the models given is a Hugging Face hub id" in r.output


def test_references_parse_like_the_hub_validates_them():
    assert hub.parse_ref("org/name") == hub.HubRef("org/name")
    assert hub.parse_ref("org/name@refs/pr/1") == hub.HubRef("org/name", "refs/pr/1")
    assert str(hub.parse_ref("Org-1/na.me_2@v1.0")) == "Org-1/na.me_2@v1.0"
    for not_hub in ("org/na me", "org/name--x", "a/b/c", "org/", "/abs/path", "~/x/y", "org\\name", "x/y.safetensors",
                    "x/y.gguf", "single"):
        assert hub.parse_ref(not_hub) is None, not_hub
    assert hub.with_revision("org/name", "v2") == "org/name@v2"
    assert hub.with_revision("org/name@v1", "v2") == "org/name@v1"  # its own revision wins


@pytest.mark.parametrize("typo", ["./modles/x", "modles/x/", "../modles/x", "modles/x.safetensors"])
def test_a_local_typo_is_no_such_path_without_touching_the_hub(typo, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("the hub was asked"))
    with pytest.raises(InputError, match=r"no such file or folder$"):
        detect(typo)


def test_owner_slash_name_under_an_existing_folder_is_a_local_path(tmp_path, monkeypatch):
    (tmp_path / "models").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="models/x: no such file or folder$"):
        detect("models/x")
    assert detect("modles/x") == Kind.HUB_ID  # a valid hub id: resolved (offline: from the cache) or refused


def test_a_hub_shaped_typo_offline_starts_with_no_such_path(offline_cache, two_commits, tmp_path):
    r, _ = _spectrum("modles/x", two_commits[2], tmp=tmp_path)
    assert r.exit_code == 1 and r.output.startswith("Error: modles/x: no such file or folder;")


# ---- BASE named by the adapter ----------------------------------------------------------------------------
def _adapter_naming(base_folder: Path, out: Path, name: str, revision: str | None) -> Path:
    ad = make_peft_adapter(base_folder, out, target_modules=["q_proj", "v_proj"])
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"], cfg["revision"] = name, revision
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return ad


def test_base_left_out_is_the_pinned_base_the_adapter_names(cached, tmp_path):
    ad = _adapter_naming(cached["folder_A"], tmp_path / "ad", REPO, cached["A"])
    r, named = _spectrum(ad, tmp=tmp_path)
    assert r.exit_code == 0, r.output
    assert named["base"] == f"{REPO}@{cached['A']}"
    assert named["lora_audit"]["settings"]["hub"][f"{REPO}@{cached['A']}"]["commit"] == cached["A"]
    assert not named["results"][0]["findings"]  # the base-mismatch check finds the adapter's own base
    r, explicit = _spectrum(cached["folder_A"], ad, tmp=tmp_path)
    assert [m["intruders"] for m in named["results"][0]["matrices"]] == \
        [m["intruders"] for m in explicit["results"][0]["matrices"]]


def test_base_mismatch_check_compares_the_pinned_snapshots(cached, tmp_path):
    ad = _adapter_naming(cached["folder_A"], tmp_path / "ad", REPO, cached["A"])
    r, obj = _spectrum(f"{REPO}@{cached['B']}", ad, tmp=tmp_path)  # the adapter was trained on A
    assert r.exit_code == 0, r.output
    la020 = [f for f in obj["results"][0]["findings"] if f["rule"] == "LA020"]
    assert la020 and la020[0]["level"] == "warning" and "their files differ" in la020[0]["message"]


def test_adapters_naming_different_bases_need_base(cached, tmp_path):
    a1 = _adapter_naming(cached["folder_A"], tmp_path / "a1", REPO, cached["A"])
    a2 = _adapter_naming(cached["folder_A"], tmp_path / "a2", REPO, "v1")
    r, _ = _spectrum(a1, a2, tmp=tmp_path)
    assert r.exit_code == 1 and "the adapters name different bases" in r.output and "pass BASE" in r.output


def test_base_left_out_needs_adapters(two_commits, tmp_path):
    r, _ = _spectrum(two_commits[0], tmp=tmp_path)
    assert r.exit_code == 2 and "Missing argument 'TUNED...'" in r.output
    ad = _adapter_naming(two_commits[0], tmp_path / "ad", str(two_commits[0]), None)
    r, _ = _spectrum(ad, two_commits[2], tmp=tmp_path)  # an adapter first: every argument is a TUNED
    assert r.exit_code == 1 and "BASE can be left out only when every TUNED is a PEFT adapter" in r.output


def test_offline_environment_end_to_end(cached, tmp_path):
    """The real thing: HF_HUB_OFFLINE and HF_HUB_CACHE in the environment of a fresh process, the JSON,
    SARIF and report naming the commit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
           "PYTHONPATH": str(ROOT), "LORA_AUDIT_NO_PROGRESS": "1"}
    out, sarif = tmp_path / "e2e.json", tmp_path / "e2e.sarif"
    ref = f"{REPO}@{cached['A']}"
    p = subprocess.run([sys.executable, "-m", "lora_audit", "spectrum", ref, str(cached["tuned"]), "--json", str(out),
                        "--sarif", str(sarif), "--no-cache", "--device", "cpu"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    obj = json.loads(out.read_text())
    assert obj["lora_audit"]["settings"]["hub"][ref]["commit"] == cached["A"]
    assert len(obj["results"][0]["matrices"]) == 1
    log = json.loads(sarif.read_text())
    assert log["runs"][0]["properties"]["hub"][ref]["commit"] == cached["A"]
    page = tmp_path / "r.html"
    r = CliRunner().invoke(cli, ["report", str(out), "--out", str(page), "--no-csv"])
    assert r.exit_code == 0, r.output
    assert f"{ref} = commit {cached['A']}" in page.read_text()


def test_safety_eval_of_adapters_that_name_a_pinned_hub_base(cached, tmp_path):
    from lora_audit.checkpoints import load_model

    ad = _adapter_naming(cached["folder_A"], tmp_path / "ad", REPO, cached["A"])
    out = tmp_path / "s.json"
    r = CliRunner().invoke(cli, ["safety-eval", str(ad), "--limit", "2", "--max-new-tokens", "2",
                                 "--tasks", "none", "--batch-size", "2", "--benign", "none", "--device", "cpu",
                                 "--dtype", "bfloat16", "--json", str(out)])
    assert r.exit_code == 0, r.output
    assert f"BASE {REPO}@{cached['A']} (named by the adapter_config.json of {ad})" in r.output
    res = json.loads(out.read_text())
    settings = res["lora_audit"]["settings"]
    assert settings["base"] == f"{REPO}@{cached['A']}" and settings["dtype"] == "bfloat16"
    assert settings["hub"][f"{REPO}@{cached['A']}"]["commit"] == cached["A"]
    loaded = load_model(str(ad), device="cpu")  # the library: the base the adapter names, from the pinned snapshot
    assert loaded.base == f"{REPO}@{cached['A']}"
    assert Path(load_model(loaded.base, device="cpu").path).name == cached["A"]


def test_mitigate_takes_the_base_its_adapter_names(two_commits, tmp_path):
    a = two_commits[0]
    ad = _adapter_naming(a, tmp_path / "ad", str(a), None)
    out = tmp_path / "mitigated"
    r = CliRunner().invoke(cli, ["mitigate", str(ad), "--out", str(out), "--no-cache", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert f"BASE {a} (named by the adapter_config.json of {ad})" in r.output
    assert (out / "adapter_model.safetensors").is_file()
