"""``--engine ray`` on a local Ray runtime started here (2 CPUs, no dashboard, no network): records
equal to ``spectrum``'s, a corrupt adapter recorded while the rest complete, the ranking, and a
screen interrupted midway resumed without recomputing what was stored."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.screen import ScreenConfig, run_screen
from lora_audit.screen.discovery import Entry

from .conftest import spectrum_of, stop_driver_after, stored_results

ray = pytest.importorskip("ray")


@pytest.fixture(scope="module")
def ray_runtime(session_cache, session_config):
    """A Ray runtime for this module; its workers import this checkout and use the tests' cache and
    config folders (they are started before any test's environment is set, so it is passed here)."""
    if ray.is_initialized():
        pytest.skip("a Ray runtime is already running in this process")
    root = str(Path(__file__).resolve().parents[2])
    env = {"PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p),
           "LORA_AUDIT_CACHE": str(session_cache), "LORA_AUDIT_CONFIG": str(session_config),
           "LORA_AUDIT_NO_PROGRESS": "1"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
        ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING", runtime_env={"env_vars": env})
        yield ray
        ray.shutdown()


def test_ray_records_equal_spectrum_and_a_corrupt_adapter_fails_alone(ray_runtime, wide_set, tmp_path):
    base, ads = wide_set
    out = tmp_path / "s"
    res = CliRunner().invoke(cli, ["screen", str(base), str(Path(ads["big"]).parent), "--out", str(out),
                                   "--engine", "ray", "--workers", "2", "--detail", "1", "-q"])
    assert res.exit_code == 4, res.output  # results written, one adapter could not be audited
    rec = stored_results(out)
    good = [a for a in rec if not a.endswith("zz-corrupt")]
    assert len(good) == 5 and len(rec) == 6
    for adapter in good:
        assert rec[adapter]["status"] == "ok"
        got = dict(rec[adapter]["result"])
        got.pop("seconds")
        assert got == spectrum_of(base, adapter, threads=1)  # a Ray CPU task runs torch on one thread
    bad = rec[str(ads["corrupt"])]
    assert bad["status"] == "failed" and "not a readable safetensors file" in bad["error"]
    with open(out / "summary.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    ok = rows[:5]
    key = [(-int(r["total_intruders"]), -float(r["relative_delta_norm"]), float(r["min_max_cos"])) for r in ok]
    assert key == sorted(key) and [r["position"] for r in ok] == ["1", "2", "3", "4", "5"]
    assert {r["adapter"]: int(r["total_intruders"]) for r in ok} == {
        a: rec[a]["result"]["total_intruders"] for a in good}
    assert rows[5]["adapter"] == str(ads["corrupt"]) and rows[5]["status"] == "failed"
    assert "Screened 6 adapters" in res.output and "5 ok, 1 failed" in res.output


def test_ray_screen_interrupted_midway_resumes(ray_runtime, wide_set, tmp_path, monkeypatch):
    """The driver stops after two records (Ctrl-C, a crash of the driver's machine); the resumed
    screen, reading the spectra from the on-disk cache this time, audits only the others."""
    base, ads = wide_set
    entries = [Entry(str(ads[k]), str(ads[k])) for k in ("big", "mid", "tiny1", "tiny2", "kohya")]
    out = tmp_path / "s"
    cfg = dict(engine="ray", workers=2, progress=False, detail=0)
    with monkeypatch.context() as m:
        stop_driver_after(m, 2)
        with pytest.raises(KeyboardInterrupt):
            run_screen(str(base), entries, out, ScreenConfig(**cfg))
    first = (out / "index.jsonl").read_text().splitlines()
    assert len(first) == 2

    outcome = run_screen(str(base), entries, out, ScreenConfig(resume=True, spectra="cache", **cfg))
    index = (out / "index.jsonl").read_text().splitlines()
    assert index[:2] == first and len(index) == 5
    assert sorted(json.loads(x)["adapter"] for x in index) == sorted(e.adapter for e in entries)
    assert outcome.summary.counts == {"adapters": 5, "ok": 5, "failed": 0, "audited_now": 3, "skipped_stored": 2}
    assert outcome.summary.settings["spectra"] == "cache"
    for e in entries:
        got = dict(stored_results(out)[e.adapter]["result"])
        got.pop("seconds")
        assert got == spectrum_of(base, e.path, threads=1)
