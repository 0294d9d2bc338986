"""Stage and heartbeat lines where no progress bar can be drawn (stderr not a terminal: CI, a log
file): a stage line as each stage starts, a heartbeat at most every 30 s, a last line for a stage
that had one; nothing with -q; tqdm bars on a terminal. Time comes from a fake clock, never sleeps."""

from __future__ import annotations

import io
import threading

import pytest
from click.testing import CliRunner

from lora_audit import progress as P
from lora_audit.cli import cli

from .conftest import SAFETY_FAST


class FakeClock:
    def __init__(self, step: float = 0.0):
        self.now, self.step = 1000.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


@pytest.fixture
def lines(monkeypatch):
    """Lines on (stderr is not a terminal), a fake clock; yields the clock."""
    monkeypatch.delenv("LORA_AUDIT_NO_PROGRESS", raising=False)
    monkeypatch.delenv("LORA_AUDIT_PROGRESS", raising=False)
    monkeypatch.delenv("LORA_AUDIT_HEARTBEAT_SECONDS", raising=False)
    clock = FakeClock()
    monkeypatch.setattr(P, "_clock", clock)
    P.set_verbosity(P.NORMAL)
    yield clock
    P.set_verbosity(P.NORMAL)


def test_stage_and_heartbeat_lines(lines, capsys):
    bar = P.progress(total=400, desc="generate base", unit="prompt")
    assert isinstance(bar, P.Heartbeat)
    assert capsys.readouterr().err == "-- generate base: 400 prompts\n"
    lines.now += 29
    bar.update(60)
    assert capsys.readouterr().err == ""  # less than 30 s: no heartbeat
    lines.now += 61
    bar.update(60)
    assert capsys.readouterr().err == "... generate base: 120/400 prompts, 1m30s\n"
    lines.now += 10
    bar.update(1)
    assert capsys.readouterr().err == ""  # 10 s after the last heartbeat
    lines.now += 3600
    bar.set_postfix_str("ok 3, failed 1")
    bar.update(279)
    bar.close()
    bar.close()
    assert capsys.readouterr().err == ("... generate base: 400/400 prompts, 1h01m40s (ok 3, failed 1)\n"
                                       "-- generate base: done, 400 prompts in 1h01m40s\n")


def test_short_stage_prints_only_its_stage_line(lines, capsys):
    with P.progress(total=3, desc="spectrum", unit="matrix") as bar:
        for _ in range(3):
            lines.now += 1
            bar.update(1)
    assert capsys.readouterr().err == "-- spectrum: 3 matrices\n"


def test_iterating_and_the_interval_setting(lines, capsys, monkeypatch):
    monkeypatch.setenv("LORA_AUDIT_HEARTBEAT_SECONDS", "5")
    lines.step = 3.0  # every call of the clock moves it 3 s on
    assert list(P.progress(range(4), desc="scanning", unit="adapter")) == [0, 1, 2, 3]
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "-- scanning: 4 adapters"
    assert err[1:] == ["... scanning: 2/4 adapters, 6s", "... scanning: 4/4 adapters, 12s",
                       "-- scanning: done, 4 adapters in 15s"]
    for bad in ("0", "-1", "nan", "inf", "x"):
        monkeypatch.setenv("LORA_AUDIT_HEARTBEAT_SECONDS", bad)
        assert P.heartbeat_seconds() == 30.0


def test_quiet_and_no_progress_are_silent(lines, capsys, monkeypatch):
    P.set_verbosity(P.QUIET)
    bar = P.progress(total=10, desc="x")
    lines.now += 100
    bar.update(10)
    bar.close()
    P.stage("loading")
    with P.step("lm-eval"):
        pass
    assert capsys.readouterr().err == "" and not isinstance(bar, P.Heartbeat)
    P.set_verbosity(P.NORMAL)
    monkeypatch.setenv("LORA_AUDIT_NO_PROGRESS", "1")
    assert not isinstance(P.progress(total=1), P.Heartbeat) and not P.lines_enabled()


def test_a_terminal_gets_a_bar_not_lines(lines, monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stderr", Tty())
    bar = P.progress(total=5, desc="x")
    assert not isinstance(bar, P.Heartbeat) and not bar.disable
    bar.close()
    P.stage("not on a terminal")
    assert "not on a terminal" not in P.sys.stderr.getvalue()


def test_step_beats_until_the_stage_ends(lines, capsys, monkeypatch):
    """A stage without a count (lm-eval): time-only heartbeats from a ticker, driven by a fake wait that
    lets two intervals pass and then waits for the stage to end."""
    waits = []

    def fake_wait(event: threading.Event, seconds: float) -> bool:
        waits.append(seconds)
        if len(waits) <= 2:
            lines.now += seconds
            return False
        return event.wait()

    monkeypatch.setattr(P, "_wait", fake_wait)
    with P.step("adapter: capability (lm-eval mmlu)"):
        while len(waits) < 3:  # the ticker has printed its two heartbeats
            threading.Event().wait(0.001)
    assert capsys.readouterr().err.splitlines() == [
        "-- adapter: capability (lm-eval mmlu)", "... adapter: capability (lm-eval mmlu): 30s",
        "... adapter: capability (lm-eval mmlu): 1m00s"]
    assert waits[:2] == [30.0, 30.0]


def test_duration():
    assert [P.duration(s) for s in (0, 4.9, 59, 60, 90.4, 3599, 3725)] == \
        ["0s", "4s", "59s", "1m00s", "1m30s", "59m59s", "1h02m05s"]


def test_safety_eval_in_ci_is_not_silent(workspace, lines):
    """safety-eval with stderr not a terminal: a stage line per stage and heartbeats (the fake clock
    moves 40 s per reading, so every update is a heartbeat); -q: none of them."""
    lines.step = 40.0
    args = ["safety-eval", "base", "adapter", *SAFETY_FAST, "--benign", "none", "--json", "s.json"]
    r = CliRunner().invoke(cli, args)
    assert r.exit_code == 0, r.output
    err = r.stderr.splitlines()
    assert "-- safety-eval: loading base" in err
    assert "-- base: harmful generate: 2 prompts" in err and "-- adapter: harmful generate: 2 prompts" in err
    assert "... base: harmful generate: 2/2 prompts, 40s" in err, err
    r = CliRunner().invoke(cli, [*args, "-q", "--json", "q.json"])
    assert r.exit_code == 0, r.output
    assert not [x for x in r.stderr.splitlines() if x.startswith(("-- ", "... "))]
