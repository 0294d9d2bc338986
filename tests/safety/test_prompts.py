"""Prompt loaders: every layout users bring, detection reported, bad files as clean errors.

The files here are written by the test (synthetic text), never third-party prompt text."""

from __future__ import annotations

import json
import os

import pytest

from lora_audit.errors import FormatError, InputError
from lora_audit.safety.prompts import DEFAULT_MAX_PROMPT_CHARS, load_prompts


def _w(path, text):
    path.write_text(text, encoding="utf-8")
    return path


CASES = [
    ("adv.csv", "goal,target\nDo thing A,Sure here is A\nDo thing B,Sure here is B\n",
     "advbench", [("Do thing A", "uncategorized"), ("Do thing B", "uncategorized")]),
    ("hb.csv", "Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
               "Do X,standard,cat_x,,,id1\nSummarise it,contextual,cat_y,,Some context,id2\n",
     "harmbench", [("Do X", "cat_x"), ("Some context\n\n---\n\nSummarise it", "cat_y")]),
    ("sr.csv", "category,source,forbidden_prompt\ncat1,custom,Ask one\ncat2,custom,Ask two\n",
     "strongreject", [("Ask one", "cat1"), ("Ask two", "cat2")]),
    ("jbb.csv", "Index,Goal,Target,Behavior,Category,Source\n1,Goal one,T,b1,Cat A,Original\n"
                "2,Goal two,T,b2,Cat B,Original\n",
     "jailbreakbench", [("Goal one", "Cat A"), ("Goal two", "Cat B")]),
    ("xs.csv", "id,prompt,type,label,focus,note\n1,Safe q,homonyms,safe,kill,\n2,Unsafe q,contrast_homonyms,unsafe,kill,\n",
     "xstest", [("Safe q", "homonyms"), ("Unsafe q", "contrast_homonyms")]),
    ("plain.csv", "prompt,category\nHello there,greet\nBye,\n",
     "plain", [("Hello there", "greet"), ("Bye", "uncategorized")]),
    ("plain.jsonl", '{"prompt": "One", "category": "c"}\n\n{"prompt": "Two"}\n',
     "plain", [("One", "c"), ("Two", "uncategorized")]),
    ("rb.json", json.dumps({"hate": ["H1", "H2"], "hacking": ["K1"]}),
     "refusalbench", [("H1", "hate"), ("H2", "hate"), ("K1", "hacking")]),
    ("list.json", json.dumps([{"prompt": "A"}, {"prompt": "B", "category": "z"}]),
     "plain", [("A", "uncategorized"), ("B", "z")]),
    ("p.txt", "first prompt\n\nsecond prompt\n", "text", [("first prompt", "uncategorized"),
                                                          ("second prompt", "uncategorized")]),
    ("p.tsv", "prompt\tcategory\nTab one\tt\n", "plain", [("Tab one", "t")]),
]


@pytest.mark.parametrize("name,text,layout,expected", CASES, ids=[c[0] for c in CASES])
def test_layouts_detected_and_read(tmp_path, name, text, layout, expected):
    ps = load_prompts(_w(tmp_path / name, text))
    assert ps.layout == layout
    assert [(p.prompt, p.category) for p in ps.prompts] == expected


def test_xstest_labels_split(tmp_path):
    ps = load_prompts(_w(tmp_path / "xs.csv", CASES[4][1]))
    assert [p.prompt for p in ps.split_label("safe").prompts] == ["Safe q"]
    assert [p.prompt for p in ps.split_label("unsafe").prompts] == ["Unsafe q"]


def test_builtin_sets():
    h, b = load_prompts("builtin:harmful"), load_prompts("builtin:benign")
    assert h.layout == b.layout == "builtin"
    assert len(h) >= 40 and len(b) >= 40
    assert len({p.category for p in h.prompts}) >= 5
    assert not {p.prompt for p in h.prompts} & {p.prompt for p in b.prompts}
    with pytest.raises(InputError, match="no such built-in"):
        load_prompts("builtin:nope")


def test_builtin_sets_interleave_categories():
    """--limit N on a built-in set samples every category, not only the first ones."""
    for name in ("harmful", "benign"):
        ps = load_prompts(f"builtin:{name}")
        cats = {p.category for p in ps.prompts}
        assert {p.category for p in ps.limit(len(cats)).prompts} == cats


def test_limit_keeps_order():
    h = load_prompts("builtin:harmful")
    assert [p.prompt for p in h.limit(3).prompts] == [p.prompt for p in h.prompts[:3]]


@pytest.mark.parametrize("name,text,err,match", [
    ("bad.jsonl", '{"prompt": "ok"}\n{"prompt": \n', FormatError, r"line 2 is not valid JSON"),
    ("arr.jsonl", '{"prompt": "ok"}\n["x"]\n', FormatError, r"line 2 is not a JSON object"),
    ("miss.jsonl", '{"prompt": "ok"}\n{"prompt": "  "}\n', FormatError, r"line 2 has an empty or missing 'prompt'"),
    ("empty.csv", "", InputError, r"empty"),
    ("blank.jsonl", "\n  \n", InputError, r"empty"),
    ("header.csv", "goal,target\n", InputError, r"header only"),
    ("extra.csv", "prompt\nok\n\"a\",\"b\"\n", FormatError, r"line 3 has more fields"),
    ("shortrow.csv", "goal,target\nfine,t\n,t\n", FormatError, r"line 3 has an empty or missing 'goal'"),
    ("bad.json", '{"a": [1, 2]', FormatError, r"not valid JSON \(line 1"),
    ("item.json", '[{"prompt": "a"}, {"text": "b"}]', FormatError, r"item 2 has an empty or missing 'prompt'"),
    ("rbitem.json", '{"hate": ["fine", 3]}', FormatError, r"category 'hate' item 2"),
    ("weird.json", '{"a": 1}', FormatError, r"RefusalBench"),
    ("p.xlsx", "x", InputError, r"unknown prompt file type '.xlsx'"),
])
def test_bad_files(tmp_path, name, text, err, match):
    with pytest.raises(err, match=match):
        load_prompts(_w(tmp_path / name, text))


def test_unknown_columns_lists_found_and_accepted(tmp_path):
    with pytest.raises(FormatError) as e:
        load_prompts(_w(tmp_path / "u.csv", "question,answer\nq,a\n"))
    msg = str(e.value)
    assert "found columns ['question', 'answer']" in msg
    for accepted in ("goal, target", "forbidden_prompt", "Goal, Target, Category", "prompt, type, label"):
        assert accepted in msg


def test_not_utf8_and_missing(tmp_path):
    p = tmp_path / "latin.csv"
    p.write_bytes("prompt\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(FormatError, match="not UTF-8"):
        load_prompts(p)
    with pytest.raises(InputError, match="no such prompt file"):
        load_prompts(tmp_path / "nothere.csv")
    with pytest.raises(InputError, match="is a folder"):
        load_prompts(tmp_path)


def test_hf_id_offline_is_clean_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(InputError, match="could not load this Hugging Face dataset"):
        load_prompts("hf:nobody-xyz/not-a-dataset")


# ---- hostile and broken prompt files --------------------------------------------------------
def test_fifo_refused_without_opening(tmp_path):
    """A named pipe would block forever on open(): it is refused from its stat alone (no writer
    ever opens this one, so an open() would hang the test)."""
    fifo = tmp_path / "p.csv"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"p.csv: the prompt file must be a regular file, not a named pipe"):
        load_prompts(fifo)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero here")
def test_dev_zero_refused():
    with pytest.raises(InputError, match=r"/dev/zero: the prompt file must be a regular file, not a character"):
        load_prompts("/dev/zero")


def test_file_over_the_size_limit_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("LORA_AUDIT_MAX_INPUT_MB", "0.001")  # 1,048 bytes
    p = _w(tmp_path / "big.txt", "a prompt\n" * 200)
    with pytest.raises(InputError, match=r"big.txt: the prompt file is .* over the limit.*LORA_AUDIT_MAX_INPUT_MB"):
        load_prompts(p)


LONG_CONTEXT = 'First paragraph, with commas, and "quoted" words.\n\nSecond, last paragraph.'


def test_multiline_quoted_field_read_exactly(tmp_path):
    """HarmBench's ContextString spans lines and holds commas and doubled quotes: legit CSV."""
    field = LONG_CONTEXT.replace('"', '""')
    text = ("Behavior,FunctionalCategory,SemanticCategory,Tags,ContextString,BehaviorID\n"
            f'Summarise it,contextual,cat_y,"a,b","{field}",id1\nDo X,standard,cat_x,,,id2\n')
    ps = load_prompts(_w(tmp_path / "hb.csv", text))
    assert [p.prompt for p in ps.prompts] == [f"{LONG_CONTEXT}\n\n---\n\nSummarise it", "Do X"]


@pytest.mark.parametrize("text,opened,stopped", [
    # never closed: the file ends inside the quoted field that opens on line 3
    ('goal,target\nfine,t\n"unclosed goal,t\nnext goal,t\nlast goal,t\n', 3, 5),
    # "closed" by the first quote of a later row, followed by a letter: still reported where it opened
    ('goal,target\n"unclosed goal,t\nnext goal,t\nthird,"quoted" target\n', 2, 4),
    # a multi-line field that is fine, then an unclosed one in the same row (line 4)
    ('goal,target\n"two\nlines",t\nok,"open\nmore,t\n', 4, 5),
    # tab-separated
    ('prompt\tcategory\nfine\tc\n"unclosed\tc\nnext\tc\n', 3, 4),
])
def test_unclosed_quote_reports_where_it_opened(tmp_path, text, opened, stopped):
    name = "u.tsv" if "\t" in text else "u.csv"
    with pytest.raises(FormatError) as e:
        load_prompts(_w(tmp_path / name, text))
    assert f"{name}: line {opened}: a quoted field opens here and is not closed properly" in str(e.value)
    assert f"stopped at line {stopped}" in str(e.value)


def test_quote_closed_by_a_stray_quote_gives_a_short_row(tmp_path):
    """An unclosed quote ended by a stray quote at a line end is valid CSV, but the merged row
    has fewer fields than the header: refused, naming the lines it spans."""
    text = 'goal,target\n"unclosed goal,t\nnext goal,t"\n'
    with pytest.raises(FormatError, match=r"line 2 has fewer fields \(1\) than the header \(2: goal, target\).*"
                                          r"spans lines 2-3.*missing its closing quote"):
        load_prompts(_w(tmp_path / "s.csv", text))


@pytest.mark.parametrize("name,text,err,match", [
    ("short.csv", "goal,target\nfine,t\nno target\n", FormatError, r"short.csv: line 3 has fewer fields \(1\)"),
    ("dup.csv", "prompt,category,prompt\na,b,c\n", FormatError, r"dup.csv: line 1: the header names the column "
                                                                 r"'prompt' twice"),
    ("blanklines.csv", "\n\n", InputError, r"blanklines.csv: the prompt file is empty"),
    ("nums.json", "[1, 2, 3]", FormatError, r"nums.json: item 1 is a JSON number. A .json prompt file holds"),
    ("mixed.json", '["ok", null]', FormatError, r"mixed.json: item 2 is null"),
    ("nonlists.json", '{"hate": "one prompt"}', FormatError, r"nonlists.json: category 'hate' is a JSON string, "
                                                              r"not a list of prompts.*RefusalBench"),
    ("emptylist.json", "[]", InputError, r"emptylist.json: the JSON list is empty"),
    ("emptyobj.json", "{}", InputError, r"emptyobj.json: no prompts in any category"),
    ("scalar.json", '"a prompt"', FormatError, r"scalar.json: the file holds a JSON string"),
    ("nan.json", '[{"prompt": "a", "score": NaN}]', FormatError, r"nan.json: not valid JSON \(NaN is not JSON"),
    ("nan.jsonl", '{"prompt": "a"}\n{"prompt": "b", "x": Infinity}\n', FormatError,
     r"nan.jsonl: line 2 is not valid JSON \(Infinity is not JSON"),
    ("dupkey.jsonl", '{"prompt": "a", "prompt": "b"}\n', FormatError,
     r"dupkey.jsonl: line 1 is not valid JSON \(the key 'prompt' appears twice"),
    ("dupcat.json", '{"hate": ["a"], "hate": ["b"]}', FormatError, r"the key 'hate' appears twice"),
    ("deep.json", "[" * 100_000, FormatError, r"deep.json: not valid JSON"),
    ("num.jsonl", '{"prompt": 5}\n', FormatError, r"num.jsonl: line 1: the 'prompt' must be text, got a JSON number"),
    ("ws.csv", "prompt,category\n \t ,c\n", FormatError, r"ws.csv: line 2 has an empty or missing 'prompt'"),
    ("ws.jsonl", '{"prompt": "\\u3000\\n"}\n', FormatError, r"ws.jsonl: line 1 has an empty or missing 'prompt'"),
    ("zw.json", '["fine", "\\u200b\\u2060 "]', FormatError, r"zw.json: item 2 has an empty or missing 'prompt'"),
    ("rbws.json", '{"hate": ["  "]}', FormatError, r"rbws.json: category 'hate' item 1 has an empty or missing"),
    ("xsbad.csv", "prompt,type,label\nq1,homonyms,safe\nq2,contrast,harmful\n", FormatError,
     r"xsbad.csv: line 3 has the label 'harmful'; an XSTest file's 'label' must be 'safe'.*or 'unsafe'"),
    ("xsempty.csv", "prompt,type,label\nq1,homonyms,\n", FormatError, r"xsempty.csv: line 2 has the label ''"),
])
def test_malformed_files(tmp_path, name, text, err, match):
    with pytest.raises(err, match=match):
        load_prompts(_w(tmp_path / name, text))


def test_xstest_labels_case_and_spaces_normalised(tmp_path):
    ps = load_prompts(_w(tmp_path / "xs.csv", "prompt,type,label\nq1,homonyms, Safe\nq2,contrast,UNSAFE\n"))
    assert [p.label for p in ps.prompts] == ["safe", "unsafe"]


@pytest.mark.parametrize("name,data,match", [
    ("latin.txt", "one\ntwo caf\xe9\n".encode("latin-1"), r"latin.txt: line 2 is not UTF-8 text \(byte 8 of the line"),
    ("utf16.csv", "prompt\nhi\n".encode("utf-16"), r"utf16.csv: the prompt file is not UTF-8 but UTF-16 text; save it as UTF-8"),
    ("utf16le.csv", "prompt\nhi\n".encode("utf-16-le"), r"utf16le.csv: line 1 contains a NUL byte"),
    ("nul.jsonl", b'{"prompt": "a"}\n{"prompt": "b\x00"}\n', r"nul.jsonl: line 2 contains a NUL byte: this is a "
                                                              r"binary file"),
    ("binary.csv", bytes(range(256)) * 4, r"binary.csv: line 1 contains a NUL byte"),
    ("png.txt", b"\x89PNG\r\n\x1a\n" + bytes(64), r"png.txt: line 3 contains a NUL byte"),
    ("jpeg.txt", b"\xff\xd8\xff\xe0JFIF", r"jpeg.txt: line 1 is not UTF-8 text \(byte 1 of the line: invalid start"),
])
def test_not_text(tmp_path, name, data, match):
    p = tmp_path / name
    p.write_bytes(data)
    with pytest.raises(FormatError, match=match):
        load_prompts(p)


def test_jsonl_lines_split_on_newline_only(tmp_path):
    """U+2028 and other separators are valid inside a JSON string; splitlines() would cut there."""
    text = '{"prompt": "one\u2028still one\u2029and\x85one"}\n{"prompt": "two"}\r\n'
    assert [p.prompt for p in load_prompts(_w(tmp_path / "sep.jsonl", text)).prompts] == \
        ["one\u2028still one\u2029and\x85one", "two"]


def test_blank_and_invisible_txt_lines_skipped(tmp_path):
    ps = load_prompts(_w(tmp_path / "p.txt", "first\n \t\n\u200b\n\u3000second\u3000\n"))
    assert [p.prompt for p in ps.prompts] == ["first", "second"]


@pytest.mark.parametrize("name,text,where", [
    ("long.txt", "short\n{long}\n", "line 2"),
    ("long.csv", "prompt\nshort\n\"{long}\"\n", "line 3"),
    ("long.jsonl", '{{"prompt": "short"}}\n{{"prompt": "{long}"}}\n', "line 2"),
    ("long.json", '["short", "{long}"]', "item 2"),
    ("longrb.json", '{{"c": ["short", "{long}"]}}', "category 'c' item 2"),
])
def test_prompt_length_limit(tmp_path, name, text, where):
    p = _w(tmp_path / name, text.format(long="x" * 101))
    with pytest.raises(FormatError) as e:
        load_prompts(p, max_chars=100)
    assert str(e.value) == (f"{p}: {where}: the prompt is 101 characters, over the limit of 100 "
                            "(raise it with --max-prompt-chars N)")
    assert len(load_prompts(p, max_chars=101)) == len(load_prompts(p, max_chars=None)) == 2


def test_prompt_limit_counts_harmbench_context(tmp_path):
    """The model reads context + behaviour: the limit applies to that whole text."""
    text = ("Behavior,FunctionalCategory,SemanticCategory,ContextString\n"
            f"Summarise it,contextual,c,{'x' * 80}\n")
    p = _w(tmp_path / "hb.csv", text)
    with pytest.raises(FormatError, match=r"hb.csv: line 2: the prompt is 99 characters, over the limit of 98"):
        load_prompts(p, max_chars=98)
    assert len(load_prompts(p, max_chars=99).prompts[0].prompt) == 99


def test_default_limit_fits_the_builtin_sets():
    for name in ("harmful", "benign"):
        assert max(len(p.prompt) for p in load_prompts(f"builtin:{name}").prompts) < DEFAULT_MAX_PROMPT_CHARS


@pytest.mark.parametrize("bad", [0, -5, 2.5, True])
def test_bad_limit_value(tmp_path, bad):
    with pytest.raises(InputError, match=r"max_chars \(--max-prompt-chars\) must be a positive number"):
        load_prompts(_w(tmp_path / "p.txt", "a\n"), max_chars=bad)
