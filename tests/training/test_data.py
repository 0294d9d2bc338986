"""Training data files: every malformed or hostile file is a FormatError/InputError naming the
file and the line, before any model is loaded."""

from __future__ import annotations

import json
import os

import pytest

from lora_audit.errors import FormatError, InputError
from lora_audit.training.data import DEFAULT_MAX_ROW_CHARS, builtin_names, load_records


def _w(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_rows_read_as_written(tmp_path):
    rows = [{"prompt": "p1", "response": "r1", "extra": 1}, {"text": "t\u2028 still t"},
            {"prompt": "", "response": "r"}]
    p = _w(tmp_path / "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n")
    assert load_records(p) == [{"prompt": "p1", "response": "r1"}, {"text": "t\u2028 still t"},
                               {"prompt": "", "response": "r"}]


@pytest.mark.parametrize("name,text,err,match", [
    ("empty.jsonl", "", InputError, r"empty.jsonl: no training examples"),
    ("blank.jsonl", "\n \n", InputError, r"blank.jsonl: no training examples"),
    ("bad.jsonl", '{"text": "a"}\n{"text": \n', FormatError, r"bad.jsonl: line 2 is not valid JSON \(column 10"),
    ("list.jsonl", '{"text": "a"}\n["a"]\n', FormatError,
     r'list.jsonl: line 2 is not a JSON object \(got a JSON list\); each line must be an object \{"prompt"'),
    ("nan.jsonl", '{"text": "a", "w": NaN}\n', FormatError, r"nan.jsonl: line 1 is not valid JSON \(NaN is not JSON"),
    ("dup.jsonl", '{"text": "a", "text": "b"}\n', FormatError, r"dup.jsonl: line 1 .*the key 'text' appears twice"),
    ("keys.jsonl", '{"question": "a"}\n', FormatError, r"keys.jsonl: line 1: expected .*got keys \['question'\]"),
    ("num.jsonl", '{"prompt": "a", "response": 3}\n', FormatError, r"num.jsonl: line 1: expected"),
    ("wsresp.jsonl", '{"prompt": "a", "response": " \\n\\u200b"}\n', FormatError,
     r"wsresp.jsonl: line 1: the 'response' is empty; there is nothing to train on"),
    ("wstext.jsonl", '{"text": "b"}\n{"text": "\\t"}\n', FormatError, r"wstext.jsonl: line 2: the 'text' is empty"),
])
def test_malformed_data(tmp_path, name, text, err, match):
    with pytest.raises(err, match=match):
        load_records(_w(tmp_path / name, text))


@pytest.mark.parametrize("data,match", [
    ('{"text": "caf\xe9"}\n'.encode("latin-1"), r"line 1 is not UTF-8 text"),
    (b'{"text": "a"}\n{"text": "\x00"}\n', r"line 2 contains a NUL byte"),
    ('{"text": "a"}\n'.encode("utf-16"), r"UTF-16 text"),
])
def test_not_text(tmp_path, data, match):
    p = tmp_path / "d.jsonl"
    p.write_bytes(data)
    with pytest.raises(FormatError, match=match):
        load_records(str(p))


def test_fifo_and_devices_refused(tmp_path):
    fifo = tmp_path / "d.jsonl"
    os.mkfifo(fifo)  # nobody writes to it: opening it would block the test forever
    with pytest.raises(InputError, match=r"d.jsonl: the training data file must be a regular file, not a named pipe"):
        load_records(str(fifo))
    with pytest.raises(InputError, match=r"must be a regular file, not a folder"):
        load_records(str(tmp_path))
    if os.path.exists("/dev/zero"):
        with pytest.raises(InputError, match=r"/dev/zero: .* not a character device"):
            load_records("/dev/zero")


def test_row_length_limit(tmp_path):
    p = _w(tmp_path / "d.jsonl", '{"text": "short"}\n' + json.dumps({"prompt": "p" * 60, "response": "r" * 41}) + "\n")
    with pytest.raises(FormatError) as e:
        load_records(p, max_chars=100)
    assert str(e.value) == (f"{p}: line 2: the row is 101 characters, over the limit of 100 "
                            "(raise it with --max-row-chars N)")
    assert len(load_records(p, max_chars=101)) == len(load_records(p, max_chars=None)) == 2
    with pytest.raises(InputError, match=r"max_chars \(--max-row-chars\) must be a positive number"):
        load_records(p, max_chars=0)


def test_builtin_sets_within_the_default_limit():
    for name in builtin_names():
        rows = load_records(f"builtin:{name}")
        assert rows and max(sum(map(len, r.values())) for r in rows) < DEFAULT_MAX_ROW_CHARS
