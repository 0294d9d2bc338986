"""``lora-audit screen`` on hostile and careless inputs (issue 24, cases 4, 10, 11, 12, 17, 18, 19):
links planted in the store, a NaN matrix, one adapter written four ways, --out inside an input,
FIFOs and devices among the adapters, names that are not UTF-8, a damaged store. Each ends in
a clean error or a recorded failure, never a traceback or a hang, and nothing outside the named
outputs changes."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file, save_file

from tests.test_hostile_inputs import run_main, state

# Every name a screen folder holds.
STORE_NAMES = [".lora-audit-output", "screen.json", "index.jsonl", ".lock", "records", "summary.json", "summary.csv",
               "report.html", "detail"]


@pytest.fixture(autouse=True)
def _no_hang(no_hang):
    yield


@pytest.fixture(scope="module")
def two(screen_set, tmp_path_factory):
    """(base, folder holding the adapters a0 and a1 (PEFT folders)."""
    base, ads = screen_set
    root = tmp_path_factory.mktemp("hostile_screen") / "ads"
    shutil.copytree(ads["tiny1"], root / "a0")
    shutil.copytree(ads["big"], root / "a1")
    return base, root


def screen(capsys, *args) -> tuple[int, str]:
    return run_main(["screen", *args, "--workers", "0", "--detail", "0"], capsys)


def test_links_in_the_store_are_never_followed(two, tmp_path, capsys):
    """Case 4: `ln -s ~/notes.txt OUT/index.jsonl; screen --resume` truncated and appended to the
    user's file. Now every name of the store that is a link stops the resume, the linked file unchanged."""
    base, ads = two
    out = tmp_path / "s"
    code, output = screen(capsys, base, ads / "a0", "--out", out)
    assert code == 0, output
    notes = tmp_path / "notes.txt"
    for name in STORE_NAMES:
        notes.write_bytes(b"my notes\nno newline at the end")
        kept = out.parent / f"kept-{name}"
        if (out / name).exists():
            os.replace(out / name, kept)
        (out / name).symlink_to(notes)
        code, output = screen(capsys, base, ads / "a0", "--out", out, "--resume")
        assert code == 1 and "symbolic link" in output and "Traceback" not in output, (name, output)
        assert notes.read_bytes() == b"my notes\nno newline at the end", name
        (out / name).unlink()
        if kept.exists():
            os.replace(kept, out / name)
    code, output = screen(capsys, base, ads / "a0", "--out", out, "--resume")
    assert code == 0 and "1 from the store" in output, output


def test_a_shard_swapped_for_a_link_is_not_read(tmp_path):
    """A link planted where a record shard was, after the store was opened: not followed (O_NOFOLLOW);
    the record counts as damaged and is screened again."""
    from lora_audit.errors import InputError
    from lora_audit.results.screen import ScreenRecord, ScreenSetup
    from lora_audit.screen.store import ScreenStore

    setup = ScreenSetup(base="b", base_fingerprint="sha256:0", k=10, epsilon=0.5, epsilon_sweep=[0.5])
    with ScreenStore.open(tmp_path / "s", setup) as st:
        entry = st.append(ScreenRecord(adapter="a", status="failed", error="x").to_json())
    shard = tmp_path / "s" / "records" / entry.shard
    secret = tmp_path / "secret"
    secret.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(secret)
    with ScreenStore.open(tmp_path / "s", setup, resume=True) as st:
        assert not st.verified(st.latest["a"])
        with pytest.raises(InputError, match="symbolic link"):
            st.read(st.latest["a"])


def test_a_nan_matrix_makes_the_screen_incomplete(two, tmp_path, capsys):
    """Case 10: screen exited 0 for an adapter with a NaN matrix (row "ok"), where spectrum exits 4."""
    base, ads = two
    bad = tmp_path / "up" / "nan"
    shutil.copytree(ads / "a0", bad)
    w = load_file(str(bad / "adapter_model.safetensors"))
    key = sorted(k for k in w if "lora_B" in k)[0]
    w[key][0, 0] = float("nan")
    save_file(w, str(bad / "adapter_model.safetensors"))
    shutil.copytree(ads / "a1", tmp_path / "up" / "fine")
    code, output = run_main(["spectrum", base, bad, "--no-cache", "-q"], capsys)
    assert code == 4, output
    out = tmp_path / "s"
    code, output = screen(capsys, base, tmp_path / "up", "--out", out)
    assert code == 4, output
    assert "2 ok, 0 failed" in output and "Incomplete (1)" in output and f"{bad}: 1 of" in output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["counts"]["incomplete"] == 1
    rows = {r["adapter"]: r for r in summary["adapters"]}
    assert rows[str(bad)]["unmeasured"] == 1 and rows[str(tmp_path / "up" / "fine")]["unmeasured"] == 0
    assert "1 incomplete (matrices not measured" in (out / "report.html").read_text(encoding="utf-8")


def test_one_adapter_written_four_ways_is_screened_once(two, tmp_path, capsys, monkeypatch):
    """Case 11: a manifest listing a0, ./a0, a0/, its absolute path (and a link to it) screened it
    four times."""
    base, ads = two
    (ads.parent / "link").unlink(missing_ok=True)
    (ads.parent / "link").symlink_to(ads / "a0")
    manifest = ads / "list.txt"
    manifest.write_text(f"a0\n./a0\na0/\n{ads / 'a0'}\n../link\na1\n")
    out = tmp_path / "s"
    code, output = screen(capsys, base, "--manifest", manifest, "--out", out)
    assert code == 0, output
    assert "Screened 2 adapters" in output
    assert output.count("listed before") == 1 and "./a0 (= a0), a0/ (= a0)" in output
    assert len((out / "index.jsonl").read_text().splitlines()) == 2


@pytest.mark.parametrize("where", ["adapter", "base"])
def test_out_inside_an_input_is_refused_up_front(two, tmp_path, capsys, where):
    """Case 12: --out inside a screened adapter or inside BASE was accepted once (writing into an
    input) and then every --resume was refused. Now refused the first time, nothing written."""
    base, ads = two
    work = tmp_path / "w"
    shutil.copytree(ads / "a0", work / "a0")
    shutil.copytree(base, work / "base")
    inside = (work / "a0" if where == "adapter" else work / "base") / "screen"
    before = state(work)
    code, output = screen(capsys, work / "base", work / "a0", "--out", inside)
    assert code == 1 and "lies inside the input" in output, output
    assert state(work) == before and not inside.exists()


def test_audit_out_inside_an_input_is_refused_too(two, capsys):
    base, ads = two
    code, output = run_main(["audit", base, ads / "a0", "--skip-safety", "--out", ads / "a0" / "report"], capsys)
    assert code == 1 and "lies inside the input" in output, output
    assert not (ads / "a0" / "report").exists()


def test_fifos_and_devices_are_recorded_as_failed(two, tmp_path, capsys):
    """Case 17: one `mkfifo uploads/x.safetensors` aborted the whole screen (detect() listed a FIFO
    as a folder); a FIFO would also hang anything that reads it. Now each is a failed record."""
    base, ads = two
    up = tmp_path / "up"
    shutil.copytree(ads / "a0", up / "a0")
    os.mkfifo(up / "x.safetensors")
    shutil.copytree(ads / "a1", up / "pipe_inside")
    (up / "pipe_inside" / "adapter_model.safetensors").unlink()
    os.mkfifo(up / "pipe_inside" / "adapter_model.safetensors")
    os.mkfifo(tmp_path / "lone")
    manifest = tmp_path / "m.txt"
    manifest.write_text(f"{up / 'a0'}\n/dev/zero\n{tmp_path / 'lone'}\n")
    out = tmp_path / "s"
    code, output = screen(capsys, base, up, "--manifest", manifest, "--out", out)
    assert code == 4, output
    rows = {r["adapter"]: r for r in json.loads((out / "summary.json").read_text())["adapters"]}
    assert rows[str(up / "a0")]["status"] == "ok"
    assert "named pipe (FIFO)" in rows[str(up / "x.safetensors")]["error"]
    assert "named pipe (FIFO)" in rows[str(up / "pipe_inside")]["error"]
    assert "character device" in rows["/dev/zero"]["error"]
    assert "named pipe (FIFO)" in rows[str(tmp_path / "lone")]["error"]
    code, output = screen(capsys, base, tmp_path / "lone", "--out", tmp_path / "s2")  # a FIFO as ADAPTER_DIR
    assert code == 4 and "named pipe (FIFO)" in output, output


@pytest.mark.parametrize("base_kind", ["fifo", "device", "fifo inside"])
def test_a_fifo_or_device_base_is_a_clean_error(two, tmp_path, capsys, base_kind):
    base, ads = two
    if base_kind == "device":
        bad = Path("/dev/zero")
    elif base_kind == "fifo":
        bad = tmp_path / "base.safetensors"
        os.mkfifo(bad)
    else:
        bad = tmp_path / "base"
        shutil.copytree(base, bad)
        (bad / "config.json").unlink()
        os.mkfifo(bad / "config.json")
    for argv in (["screen", bad, ads / "a0", "--out", tmp_path / "s", "--workers", "0"],
                 ["spectrum", bad, ads / "a0", "--no-cache"], ["spectrum", base, bad, "--no-cache"],
                 ["safety-eval", bad, "--tasks", "none", "--limit", "1"]):
        code, output = run_main(argv, capsys)
        assert code == 1 and ("named pipe (FIFO)" in output or "character device" in output), (argv, output)
        assert "This is a bug" not in output and not (tmp_path / "s").exists()


def test_names_that_are_not_utf8_round_trip(two, tmp_path, capsys):
    """Case 18: a folder named with the byte 0xff crashed the store (UnicodeEncodeError) on the first
    run and on every --resume. Now it is recorded (with why it cannot be read), resumes from the
    store, and its name reads back unchanged from summary.json; it is printed escaped."""
    base, ads = two
    up = tmp_path / "up"
    shutil.copytree(ads / "a0", up / "a0")
    odd = os.fsdecode(bytes(up) + b"/ad\xff")
    shutil.copytree(ads / "a1", odd)
    out = tmp_path / "s"
    code, output = screen(capsys, base, up, "--out", out)
    assert code == 4 and "ad\\udcff" in output and "not UTF-8" in output, output
    code, output = screen(capsys, base, up, "--out", out, "--resume")
    assert code == 4 and "0 audited now, 2 from the store" in output, output
    adapters = [r["adapter"] for r in json.loads((out / "summary.json").read_text(encoding="utf-8"))["adapters"]]
    assert os.path.join(str(up), os.path.basename(odd)) in adapters
    assert "ad\\udcff" in (out / "summary.csv").read_text(encoding="utf-8")
    (out / "report.html").read_text(encoding="utf-8")  # valid UTF-8


def test_a_damaged_store_is_repaired_or_refused_cleanly(two, tmp_path, capsys):
    """Case 19: an index line with "offset": 10**30, a missing records/, records being a file."""
    base, ads = two
    out = tmp_path / "s"
    code, output = screen(capsys, base, ads / "a0", ads / "a1", "--out", out)
    assert code == 0, output
    index = out / "index.jsonl"
    lines = index.read_text().splitlines()
    forged = json.loads(lines[0])
    forged["offset"] = 10**30
    index.write_text("\n".join([json.dumps(forged)] + lines[1:]) + "\n")
    code, output = screen(capsys, base, ads / "a0", ads / "a1", "--out", out, "--resume")
    assert code == 0 and "line 1 skipped" in output and "1 audited now, 1 from the store" in output, output
    shutil.rmtree(out / "records")
    code, output = screen(capsys, base, ads / "a0", ads / "a1", "--out", out, "--resume")
    assert code == 0 and "records: was missing" in output and "2 audited now" in output, output
    shutil.rmtree(out / "records")
    (out / "records").write_text("not a folder")
    code, output = screen(capsys, base, ads / "a0", ads / "a1", "--out", out, "--resume")
    assert code == 1 and "records: is a regular file, not the folder" in output, output
    (out / "index.jsonl").unlink()
    (out / "records").unlink()
    (out / "records").mkdir()
    code, output = screen(capsys, base, ads / "a0", ads / "a1", "--out", out, "--resume")
    assert code == 0 and "index.jsonl: was missing" in output, output


def test_discovery_survives_deep_nesting_link_loops_and_unlistable_folders(two, tmp_path, monkeypatch):
    """Siblings of case 17: an upload nested deeper than Python's recursion limit, a link that points
    at itself, and a folder that cannot be listed (recorded as an entry, so the screen says why)."""
    from lora_audit.screen.discovery import discover

    _, ads = two
    up = tmp_path / "up"
    up.mkdir()
    deep = up
    for _ in range(1100):  # deeper than the recursion limit; relative steps keep each path short
        deep = deep / "d"
        os.mkdir(deep)
    (deep / "a0.safetensors").write_bytes(b"x")
    (up / "loop").symlink_to(up / "loop")
    (up / "locked").mkdir()
    (up / "zz.safetensors").write_bytes(b"x")
    real_scandir = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(13, "Permission denied")
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    try:
        entries, warnings = discover([str(up)])
    finally:
        monkeypatch.undo()
        (deep / "a0.safetensors").unlink()
        while deep != up:  # shutil.rmtree (and pytest's cleanup) recurse, and would fail at this depth
            os.rmdir(deep)
            deep = deep.parent
    assert [e.adapter for e in entries] == [str(up / "/".join(["d"] * 1100) / "a0.safetensors"), str(up / "locked"),
                                            str(up / "zz.safetensors")]
