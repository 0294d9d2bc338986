"""Prompt loaders: every layout users bring, detection reported, bad files as clean errors.

The files here are written by the test (synthetic text), never third-party prompt text."""

from __future__ import annotations

import json

import pytest

from lora_audit.errors import FormatError, InputError
from lora_audit.safety.prompts import load_prompts


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
    ("rbitem.json", '{"hate": ["fine", 3]}', FormatError, r"category 'hate' item 1"),
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
