"""Generation and scorers on the tiny random Llama, against plain hand-written references."""

from __future__ import annotations

import math
import os

import pytest
import torch

from lora_audit.checkpoints import load_model
from lora_audit.errors import InputError
from lora_audit.safety.generate import GenSettings, chat_texts, generate, read_chat_template
from lora_audit.safety.scorers import (JUDGE_TEMPLATE, KeywordScorer, agreement, calibrate_threshold,
                                       first_token_scores, judge_answers, load_markers, parse_judge_answer,
                                       read_judge_template, refusal_start_ids)

PROMPTS = ["Hi", "Explain photosynthesis in simple words for a child please", "What is two plus two?",
           "Write a poem about the sea and the wind and the stars, a long one", "Bread?"]


@pytest.fixture(scope="module")
def tiny(tiny_llama):
    return load_model(tiny_llama, device="cpu")


def _greedy_reference(model, tokenizer, text: str, n: int) -> list[int]:
    """Unbatched, unpadded greedy decoding with a plain loop (no generate(), no cache)."""
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(input_ids=ids).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == tokenizer.eos_token_id:
                break
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_chat_template_applied(tiny):
    texts = chat_texts(tiny.tokenizer, ["Hello"])
    assert texts == ["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"]


def test_batched_left_padding_equals_unbatched(tiny):
    texts = chat_texts(tiny.tokenizer, PROMPTS)
    lengths = {len(tiny.tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts}
    assert len(lengths) > 1  # the batch really is padded
    n = 10
    _, batched = generate(tiny.model, tiny.tokenizer, texts, GenSettings(n, batch_size=len(texts), early_stop=False),
                          return_ids=True)
    _, single = generate(tiny.model, tiny.tokenizer, texts, GenSettings(n, batch_size=1, early_stop=False),
                         return_ids=True)
    refs = [_greedy_reference(tiny.model, tiny.tokenizer, t, n) for t in texts]
    assert batched == single == refs
    assert tiny.tokenizer.padding_side == "left"


def test_early_stop_only_stops_classified_rows(tiny):
    texts = chat_texts(tiny.tokenizer, PROMPTS[:3])
    n = 8
    refs = [_greedy_reference(tiny.model, tiny.tokenizer, t, n) for t in texts]
    assert all(len(r) == n for r in refs)
    dec = tiny.tokenizer.decode
    # a prefix of row 0 whose text no earlier prefix of row 0 and no prefix of the other rows has
    # (byte-level pieces can decode to the same replacement characters)
    k, stop_text = next((k, dec(refs[0][:k])) for k in range(1, n) if
                        all(dec(r[:j]) != dec(refs[0][:k]) for r in refs[1:] for j in range(1, n + 1)) and
                        all(dec(refs[0][:j]) != dec(refs[0][:k]) for j in range(1, k)))
    texts_out, ids = generate(tiny.model, tiny.tokenizer, texts, GenSettings(n, batch_size=3),
                              is_refusal=lambda t: t == stop_text, return_ids=True)
    assert ids[0] == refs[0][:k]
    assert ids[1:] == refs[1:]
    assert texts_out[0] == stop_text


def test_keyword_scorer():
    k = KeywordScorer()
    assert k("I'm sorry, but I can't help with that.")
    assert k("i CANNOT do this")
    assert k("I\u2019m sorry")  # curly apostrophe
    assert not k("Sure! Here is a poem about the sea.")
    late = "x" * 300 + " I cannot"
    assert not k(late) and KeywordScorer(window=400)(late)
    custom = KeywordScorer(["nope"])
    assert custom.markers == ["nope"] and custom("Nope.") and not custom("I cannot")


def test_first_token_scores_match_reference(tiny):
    texts = chat_texts(tiny.tokenizer, PROMPTS)
    ids = refusal_start_ids(tiny.tokenizer)
    assert ids and all(tiny.tokenizer.decode([i]).strip() for i in ids)
    got = first_token_scores(tiny.model, tiny.tokenizer, texts, batch_size=3)
    for text, g in zip(texts, got, strict=True):
        enc = tiny.tokenizer(text, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            probs = torch.softmax(tiny.model(**enc).logits[0, -1].double(), dim=-1)
        p = float(probs[ids].sum())
        assert g == pytest.approx(math.log(p) - math.log(1 - p), abs=1e-4)


def test_agreement_and_calibration():
    assert agreement([True, False, None, True], [True, True, True, None]) == 0.5
    assert agreement([], []) is None
    thr, agr = calibrate_threshold([-3.0, -1.0, 2.0, 5.0], [False, False, True, True])
    assert agr == 1.0 and -1.0 < thr < 2.0


def test_parse_judge_answer():
    assert [parse_judge_answer(x) for x in [" Yes", "no.", "NO", '"yes"', "Now", "maybe", ""]] == \
        ["yes", "no", "no", "yes", "unknown", "unknown", "unknown"]


class _FakeTok:
    """Minimal tokenizer: one id per text; decode maps ids to fixed answers."""

    padding_side = "right"
    answers = {0: " Yes", 1: " no", 2: " Perhaps"}

    def __call__(self, texts, **kw):
        class _Enc(dict):
            def to(self, dev):
                return self
        return _Enc(input_ids=torch.arange(len(texts)).unsqueeze(1))

    def decode(self, ids):
        return self.answers[ids[0]]


class _FakeJudge(torch.nn.Module):
    """Answers yes, no, perhaps, yes, no, ... (row i -> token i % 3)."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids):
        b = input_ids.shape[0]
        logits = torch.zeros(b, 1, 3)
        logits[torch.arange(b), 0, torch.arange(b) % 3] = 1.0
        return type("Out", (), {"logits": logits})()


def test_judge_answers_counts_unknown():
    tok = _FakeTok()
    out = judge_answers(_FakeJudge(), tok, [("b", "g")] * 3, batch_size=8)
    assert out == ["yes", "no", "unknown"]
    assert tok.padding_side == "right"  # restored


# ---- template and marker files ---------------------------------------------------------------
def _file(tmp_path, name, text):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return str(p)


def test_chat_template_file_read_and_checked(tmp_path):
    ok = "{% for m in messages %}{% generation %}{{ m['content'] }}{% endgeneration %}{% endfor %}ASSISTANT:"
    assert read_chat_template(_file(tmp_path, "ok.jinja", ok)) == ok  # transformers' own {% generation %} tag
    assert read_chat_template(None) is None
    bad = _file(tmp_path, "bad.jinja", "{% for m in messages %}\n{{ m['content'] }}\n{% endfor %\n")
    with pytest.raises(InputError, match=r"bad.jinja: line 3 of the chat template is not valid Jinja"):
        read_chat_template(bad)
    with pytest.raises(InputError, match=r"blank.jinja: the chat template file is empty"):
        read_chat_template(_file(tmp_path, "blank.jinja", " \n"))
    with pytest.raises(InputError, match=r"nothere.jinja: no such chat template file"):
        read_chat_template(str(tmp_path / "nothere.jinja"))
    os.mkfifo(tmp_path / "fifo.jinja")
    with pytest.raises(InputError, match=r"fifo.jinja: the chat template file must be a regular file, not a named"):
        read_chat_template(str(tmp_path / "fifo.jinja"))


def test_judge_template_file_read_and_checked(tmp_path):
    assert read_judge_template(_file(tmp_path, "ok.txt", JUDGE_TEMPLATE)) == JUDGE_TEMPLATE
    for name, text, match in [
        ("nogen.txt", "Request: {behavior}\nAnswer:", r"nogen.txt: the judge template lacks \{generation\}"),
        ("brace.txt", "{behavior} {generation} {", r"brace.txt: the judge template is not a valid format string"),
        ("other.txt", "{behavior} {generation} {rubric}", r"other.txt: the judge template has the field '\{rubric\}'"),
        ("attr.txt", "{behavior.__class__} {generation}", r"has the field '\{behavior.__class__\}'"),
        ("spec.txt", "{behavior:>999999999} {generation}", r"has the field '\{behavior:>999999999\}'"),
    ]:
        with pytest.raises(InputError, match=match):
            read_judge_template(_file(tmp_path, name, text))
    with pytest.raises(InputError, match=r"no such judge template file"):
        read_judge_template(str(tmp_path / "none.txt"))
    os.mkfifo(tmp_path / "fifo.txt")
    with pytest.raises(InputError, match=r"fifo.txt: the judge template file must be a regular file"):
        read_judge_template(str(tmp_path / "fifo.txt"))


def test_load_markers(tmp_path):
    assert load_markers(" I cannot | As an AI||") == ["I cannot", "As an AI"]
    f = _file(tmp_path, "m.list", "\ufeffI won't\n\n  Sorry, no  \r\n")
    assert load_markers(f) == ["I won't", "Sorry, no"]
    assert KeywordScorer(load_markers(f))("Sorry, no way")


@pytest.mark.parametrize("value,match", [
    ("|  |", r"--markers gives no markers"),
    ("|".join(["m"] * 1001), r"--markers gives 1,001 markers, more than 1,000"),
    ("short|" + "x" * 201, r"--markers: marker 2: the marker is 201 characters, longer than 200"),
    ("missing-markers.txt", r"missing-markers.txt: no such markers file"),
])
def test_load_markers_refused(value, match):
    with pytest.raises(InputError, match=match):
        load_markers(value)


def test_load_markers_bad_files(tmp_path):
    with pytest.raises(InputError, match=r"empty.txt: the markers file gives no markers"):
        load_markers(_file(tmp_path, "empty.txt", "\n \n"))
    with pytest.raises(InputError, match=r"long.txt: line 2: the marker is 201 characters"):
        load_markers(_file(tmp_path, "long.txt", "ok\n" + "y" * 201 + "\n"))
    (tmp_path / "nul.txt").write_bytes(b"ok\n\x00\n")
    with pytest.raises(InputError, match=r"nul.txt: line 2 contains a NUL byte"):
        load_markers(str(tmp_path / "nul.txt"))
    os.mkfifo(tmp_path / "fifo")
    with pytest.raises(InputError, match=r"fifo: the markers file must be a regular file, not a named pipe"):
        load_markers(str(tmp_path / "fifo"))
