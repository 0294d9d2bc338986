"""The local engine: spawned worker processes give the records ``spectrum`` gives, and a worker
that dies is replaced, its adapter retried once and then recorded as failed."""

from __future__ import annotations

import pytest

from lora_audit.screen import ScreenConfig, run_screen
from lora_audit.screen import run as run_mod
from lora_audit.screen.discovery import Entry
from lora_audit.screen.engines import LocalEngine, _serve
from lora_audit.settings import SpectrumSettings

from . import crashy
from .conftest import spectrum_of, stored_results


def test_worker_processes_match_spectrum_and_survive_a_crash(wide_set, tmp_path, monkeypatch):
    base, ads = wide_set
    monkeypatch.setattr(run_mod, "make_engine", lambda cfg: LocalEngine(["cpu", "cpu"], threads=1, serve=crashy.serve))
    good = [Entry(str(ads[k]), str(ads[k])) for k in ("big", "tiny1", "kohya")]
    entries = good[:1] + [Entry("crash-me", str(ads["mid"]))] + good[1:] + [Entry("bad", str(ads["corrupt"]))]
    outcome = run_screen(str(base), entries, tmp_path / "s", ScreenConfig(progress=False, detail=0))
    rec = stored_results(tmp_path / "s")
    assert set(rec) == {e.adapter for e in entries}
    for e in good:
        got = dict(rec[e.adapter]["result"])
        got.pop("seconds")
        assert rec[e.adapter]["status"] == "ok" and got == spectrum_of(base, e.path, threads=1)
    crash = rec["crash-me"]
    assert crash["status"] == "failed" and crash["attempts"] == 2
    assert crash["error"] == "the worker process was killed by SIGKILL (out of memory?) while auditing this adapter"
    assert rec["bad"]["status"] == "failed" and "not a readable safetensors file" in rec["bad"]["error"]
    assert outcome.failed == 2 and [r.adapter for r in outcome.summary.adapters][-2:] == ["crash-me", "bad"]


def test_local_engine_needs_a_device():
    with pytest.raises(ValueError, match="no device"):
        LocalEngine([], serve=_serve)


def test_default_workers(monkeypatch):
    monkeypatch.setattr(run_mod.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    engine = run_mod.make_engine(ScreenConfig(SpectrumSettings(device="cpu")))
    assert engine.devices == ["cpu"] * 4 and engine.threads == 1
    engine = run_mod.make_engine(ScreenConfig(SpectrumSettings(device="cpu"), workers=2))
    assert engine.devices == ["cpu"] * 2 and engine.threads == 2
    assert type(run_mod.make_engine(ScreenConfig(workers=0))).__name__ == "InProcessEngine"
