"""Every CSV lora-audit writes (spectrum --csv, a screen's summary.csv, a report's tables/*.csv) goes
through one writer (``lora_audit.io.csv_text``): read back by Python's csv module, or split into
lines by a naive reader, no cell starts a formula (``= + - @``, tab, CR), at its start or after a
line break inside it, and no control or bidi character survives."""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from lora_audit.io import csv_text

from .test_hostile_inputs import run_main

# Folder names a hostile uploader can choose (all legal on Linux): the bare-CR bypass of issue 24,
# a plain formula, escape sequences, a bidi override, a formula after a line feed, a leading tab.
HOSTILE = ["ad\r=1+2+cmd|' /C calc'!A0", "=HYPERLINK(1)", "x\x1b[2Jy", "a\u202egnp.exe", "ok\n@SUM(1)", "\t-2+3",
           "+1", "\x85nel"]
TRIGGERS = ("=", "+", "-", "@", "\t", "\r")
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2060-\u2069\ufeff]")


def _number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def assert_inert(text: str) -> list[list[str]]:
    """The rows of the CSV ``text``, after checking that no cell (or line of a cell) can run as a
    formula and no control character is left, with a real CSV reader and with a naive one."""
    rows = list(csv.reader(io.StringIO(text, newline="")))
    for row in rows:
        for cell in row:
            assert not CONTROL.search(cell), repr(cell)
            for line in cell.split("\n"):
                assert _number(line) or not line.startswith(TRIGGERS), repr(cell)
    for line in re.split(r"\r\n|\r|\n", text):  # a reader that splits lines first
        first = line.split(",")[0]
        assert _number(first) or not line.startswith(TRIGGERS), repr(line)
    return rows


@pytest.fixture(scope="module")
def hostile_adapters(tiny_llama, tmp_path_factory):
    """Copies of one PEFT adapter under the hostile names, in ``root/up``."""
    from tests.helpers import make_peft_adapter

    root = tmp_path_factory.mktemp("csv_hostile")
    good = make_peft_adapter(tiny_llama, root / "good", r=2, target_modules=["q_proj"])
    for name in HOSTILE:
        shutil.copytree(good, root / "up" / name)
    return tiny_llama, root


def test_spectrum_csv_is_inert(hostile_adapters, tmp_path, capsys, monkeypatch):
    base, root = hostile_adapters
    monkeypatch.chdir(root / "up")
    out = tmp_path / "s.csv"
    code, output = run_main(["spectrum", base, *HOSTILE, "--csv", out, "--no-cache", "-q"], capsys)
    assert code == 0, output
    rows = assert_inert(out.read_text(encoding="utf-8"))
    tuned = {r[0] for r in rows[1:]}
    assert "ad\\x0d=1+2+cmd|' /C calc'!A0" in tuned and "'=HYPERLINK(1)" in tuned and "a\\u202egnp.exe" in tuned
    assert "ok\n'@SUM(1)" in tuned and "'\t-2+3" in tuned and "\\x85nel" in tuned


def test_screen_summary_csv_is_inert(hostile_adapters, tmp_path, capsys):
    base, root = hostile_adapters
    out = tmp_path / "screen"
    code, output = run_main(["screen", base, root / "up", "--out", out, "--workers", "0", "--detail", "1", "-q"], capsys)
    assert code == 0, output
    rows = assert_inert((out / "summary.csv").read_text(encoding="utf-8"))
    assert len(rows) == 1 + len(HOSTILE)
    assert any(r[0].endswith("ad\\x0d=1+2+cmd|' /C calc'!A0") for r in rows[1:])


def test_report_tables_are_inert(tmp_path):
    from lora_audit.report import all_tables, gather, write_csvs

    from .report import synth

    response = "Sure.\r=cmd|' /C calc'!A0\n+SUM(A1)\n\x1b[31mred\u202e"
    spec, saf = tmp_path / "s.json", tmp_path / "f.json"
    spec.write_text(json.dumps(synth.spectrum(HOSTILE[:3], seed=1)))
    saf.write_text(json.dumps(synth.safety({HOSTILE[0]: 0.1, HOSTILE[1]: 0.8},
                                           responses={HOSTILE[0]: [response] * 20})))
    folder = write_csvs(all_tables(gather([spec, saf], title="t")), tmp_path / "tables")
    files = sorted(folder.glob("*.csv"))
    assert len(files) > 5
    texts = {f.name: f.read_text(encoding="utf-8") for f in files}
    for text in texts.values():
        assert_inert(text)
    assert "Sure.\\x0d=cmd|' /C calc'!A0\n'+SUM(A1)\n\\x1b[31mred\\u202e" in texts["responses.csv"]


def test_the_writer_matches_pandas_on_ordinary_tables():
    """On tables without hostile text the one writer writes what pandas' to_csv writes (the CSVs
    users already parse do not change): ints, floats, missing values, booleans, plain text."""
    df = pd.DataFrame({"name": ["a", "b c", None, "d,e", 'q"uote'], "n": [1, 2, 3, 4, 5],
                       "x": [0.1, float("nan"), 1e-05, -2.5, 3.0], "flag": [True, False, True, False, True],
                       "maybe": pd.array([1, None, 3, None, 5], dtype="Int64")})
    assert csv_text(df) == df.to_csv(index=False)


def test_rows_and_dataframes_share_the_writer():
    rows = [{"a": "=1", "b": 2}, {"a": None, "b": -1}]
    assert csv_text(rows, ["a", "b"]) == csv_text(pd.DataFrame(rows)) == "a,b\n'=1,2\n,-1\n"


def test_cells_keep_their_text_visible():
    """Neutralising changes no ordinary cell and shows every escaped character as text."""
    from lora_audit.text import csv_cell

    assert [csv_cell(v) for v in ("q_proj", "a-b", "x=1", 3, -3, 0.5, None)] == ["q_proj", "a-b", "x=1", 3, -3, 0.5, ""]
    assert csv_cell("-x\n-y") == "'-x\n'-y"
    assert csv_cell("name\udcff") == "name\\udcff"  # a file name that is not UTF-8


def test_there_is_one_csv_writer():
    """No other CSV writer in the product: every module that writes CSV calls io.csv_text."""
    root = Path(__file__).resolve().parents[1] / "lora_audit"
    writers = [str(p.relative_to(root)) for p in root.rglob("*.py")
               if re.search(r"csv\.(writer|DictWriter)\(|\.to_csv\(index", p.read_text(encoding="utf-8"))]
    assert writers == ["io.py"], writers
