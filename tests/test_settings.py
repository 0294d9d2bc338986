"""SpectrumSettings: one frozen object, checked once with messages naming the value, passed unchanged
from the command line to the engine and the screen workers, and written into the result."""

from __future__ import annotations

import dataclasses
import json
import pickle
from pathlib import Path

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.errors import InputError
from lora_audit.settings import SpectrumSettings

from .helpers import make_peft_adapter


@pytest.mark.parametrize("changes,message", [
    ({"k": 0}, r"k must be an integer >= 1, got 0"),
    ({"k": True}, r"k must be an integer >= 1, got True"),
    ({"k": 2.5}, r"k must be an integer >= 1, got 2\.5"),
    ({"epsilon": 5}, r"epsilon must lie strictly between 0 and 1 \(a cosine threshold\), got 5"),
    ({"epsilon": float("nan")}, r"epsilon must lie strictly between 0 and 1 .* got nan"),
    ({"epsilon": 10 ** 400}, r"epsilon must be a number strictly between 0 and 1, got an integer of 401 digits"),
    ({"epsilon": "0.5"}, r"epsilon must be a number strictly between 0 and 1, got '0\.5'"),
    ({"epsilon_sweep": (0.3, 1.5)}, r"every epsilon of the sweep must lie strictly between 0 and 1 .* got 1\.5"),
    ({"epsilon_sweep": "0.3"}, r"epsilon_sweep must be a list of numbers, got '0\.3'"),
    ({"epsilon_sweep": [i / 2000 for i in range(1, 1500)]}, r"at most 1000 thresholds in a sweep, got 1499"),
    ({"exact": "yes"}, r"exact must be true or false, got 'yes'"),
    ({"device": ""}, r"device must be a name such as auto, cpu, cuda or cuda:1, got ''"),
    ({"cache_dir": 3}, r"cache_dir must be a folder path, got 3"),
])
def test_bad_settings_are_refused_naming_the_value(changes, message):
    with pytest.raises(InputError, match=message):
        SpectrumSettings(**changes)


def test_settings_are_frozen_normalised_and_picklable(tmp_path):
    s = SpectrumSettings(k=4, epsilon_sweep=[0.7, 0.3, 0.3], cache_dir=tmp_path)
    assert s.epsilon_sweep == (0.3, 0.7) and s.cache_dir == str(tmp_path)  # sorted, unique; a path as a string
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.k = 5  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(s)) == s  # what Ray and multiprocessing send to workers
    assert SpectrumSettings.of(s) is s and SpectrumSettings.of(s, k=6).k == 6
    with pytest.raises(InputError, match="k must be"):
        SpectrumSettings.of(s, k=0)  # changes are checked again
    with pytest.raises(TypeError, match="unknown spectrum settings: kk"):
        SpectrumSettings.of(s, kk=1)
    assert json.loads(json.dumps(s.to_json())) == s.to_json() and s.to_json()["epsilon_sweep"] == [0.3, 0.7]


def _spy(monkeypatch) -> list:
    """Record the settings object every engine.audit call receives."""
    from lora_audit.spectral import engine

    seen, real = [], engine.audit

    def audit(stream, settings=None, **kw):
        seen.append(settings)
        return real(stream, settings, **kw)

    monkeypatch.setattr(engine, "audit", audit)
    return seen


def test_the_cli_builds_one_object_the_engine_receives_and_the_result_records(tiny_llama, tmp_path, monkeypatch):
    seen = _spy(monkeypatch)
    ad = make_peft_adapter(tiny_llama, tmp_path / "ad", seed=2)
    out = tmp_path / "s.json"
    r = CliRunner().invoke(cli, ["spectrum", str(tiny_llama), str(ad), "--k", "3", "--epsilon", "0.4", "--epsilon-sweep",
                                 "0.2,0.6", "--exact", "--float64", "--no-metrics", "--device", "cpu", "--no-cache",
                                 "--json", str(out), "-q"])
    assert r.exit_code == 0, r.output
    want = SpectrumSettings(k=3, epsilon=0.4, epsilon_sweep=(0.2, 0.6), exact=True, float64=True, dense_metrics=False,
                            device="cpu", use_cache=False)
    assert seen == [want]
    recorded = json.loads(out.read_text())["lora_audit"]["settings"]
    assert {k: v for k, v in recorded.items() if k in want.to_json()} == want.to_json()
    assert recorded["dtype"] == "float64" and recorded["cache"] is None


def test_screen_workers_get_the_settings_of_the_screen(tiny_llama, tmp_path, monkeypatch):
    from lora_audit.screen import ScreenConfig, discover, run_screen

    seen = _spy(monkeypatch)
    for i in range(2):
        make_peft_adapter(tiny_llama, tmp_path / "ads" / f"a{i}", seed=i)
    entries, _ = discover([str(tmp_path / "ads")])
    spectrum = SpectrumSettings(k=3, epsilon_sweep=(0.5,), device="cpu", cache_dir=str(tmp_path / "cache"))
    outcome = run_screen(str(tiny_llama), entries, tmp_path / "s",
                         ScreenConfig(spectrum=spectrum, workers=0, progress=False, detail=0))
    assert outcome.summary.counts["ok"] == 2 and len(seen) == 2
    assert all(s == spectrum for s in seen)  # in-process worker: device "cpu" as given
    setup = json.loads((tmp_path / "s" / "screen.json").read_text())
    assert (setup["k"], setup["epsilon_sweep"]) == (3, [0.5])
    assert json.loads((tmp_path / "s" / "summary.json").read_text())["lora_audit"]["settings"]["k"] == 3


def test_audit_config_carries_the_settings_to_the_spectrum(tiny_llama, tmp_path, monkeypatch):
    from lora_audit.audit import AuditConfig, run_audit

    seen = _spy(monkeypatch)
    ad = make_peft_adapter(tiny_llama, tmp_path / "ad", seed=2)
    spectrum = SpectrumSettings(k=2, device="cpu", use_cache=False)
    out = run_audit(str(tiny_llama), [str(ad)], tmp_path / "rep", AuditConfig(spectrum=spectrum, progress=False))
    assert seen == [spectrum] and out.spectrum.k == 2
    assert Path(out.files["spectrum.json"]).is_file()
