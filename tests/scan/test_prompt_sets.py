"""safety-scan's own prompt sets: big enough to split, the categories of safety-eval's sets, and no
prompt (nor a near-duplicate of one) shared with safety-eval's label prompts or the training sets,
so that the scan's forward-pass proxy is read on prompts the labels never saw."""

from __future__ import annotations

import difflib
import re
from collections import Counter
from importlib import resources
from pathlib import Path

import pytest

from lora_audit.errors import InputError
from lora_audit.safety.prompts import load_prompts
from lora_audit.scan.prompts import MIN_HALF, SCAN_HARMFUL, SCAN_HARMLESS, check_halves, split_halves
from lora_audit.training.data import load_records

# Words that carry no request of their own: two prompts sharing only these ask different things.
STOP = set("a an the i me my you your we our he she it they them their his her its to of in on for with without from "
           "at by and or so as is are be can could do does did how what which who why when where that this these "
           "those there into up out about will would should give tell write explain make create".split())


def _content(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9']+", text.lower())) - STOP


def _near_duplicate(a: str, b: str) -> bool:
    """The same request reworded: most of the content words shared, or nearly the same characters."""
    wa, wb = _content(a), _content(b)
    jaccard = len(wa & wb) / max(len(wa | wb), 1)
    if jaccard >= 0.5:
        return True
    m = difflib.SequenceMatcher(None, a.lower(), b.lower())
    return m.real_quick_ratio() >= 0.9 and m.quick_ratio() >= 0.9 and m.ratio() >= 0.9  # bounds first: cheap


def _others() -> dict[str, list[str]]:
    out = {s: [p.prompt for p in load_prompts(s).prompts] for s in ("builtin:harmful", "builtin:benign")}
    folder = Path(str(resources.files("lora_audit") / "data" / "train"))
    for f in sorted(folder.glob("*.jsonl")):
        out[f"builtin:{f.stem} (training)"] = [r["prompt"] for r in load_records(f"builtin:{f.stem}") if "prompt" in r]
    return out


@pytest.mark.parametrize("scan, label", [(SCAN_HARMFUL, "builtin:harmful"), (SCAN_HARMLESS, "builtin:benign")])
def test_sets_are_large_and_cover_the_label_sets_categories(scan, label):
    ours, theirs = load_prompts(scan), load_prompts(label)
    assert len(ours) >= 64
    counts = Counter(p.category for p in ours.prompts)
    assert set(counts) == {p.category for p in theirs.prompts}
    assert min(counts.values()) >= 2 * 4  # every category in both halves, several times
    direction, validation = split_halves([p.category for p in ours.prompts])
    for half in (direction, validation):
        assert Counter(ours.prompts[i].category for i in half) == Counter({c: n // 2 for c, n in counts.items()})


def test_no_prompt_or_near_duplicate_is_shared_with_the_label_or_training_sets():
    ours = {s: [p.prompt for p in load_prompts(s).prompts] for s in (SCAN_HARMFUL, SCAN_HARMLESS)}
    others = _others()
    assert {"builtin:harmful", "builtin:benign", "builtin:safety-tune (training)"} <= set(others)
    clashes = [(a, s, b) for prompts in ours.values() for a in prompts
               for s, theirs in others.items() for b in theirs if _near_duplicate(a, b)]
    assert clashes == []
    mine = [a for prompts in ours.values() for a in prompts]
    assert len({a.lower() for a in mine}) == len(mine)
    inside = [(a, b) for i, a in enumerate(mine) for b in mine[i + 1:] if _near_duplicate(a, b)]
    assert inside == []


def test_the_near_duplicate_check_catches_a_reworded_request():
    assert _near_duplicate("How do I make LSD at home?", "How can I make LSD at home?")
    assert _near_duplicate("Explain how to build a bomb at home.", "Explain how to build a bomb at home!")
    assert not _near_duplicate("How do I make iced tea at home?", "How do I make LSD at home?")


def test_split_alternates_within_categories():
    cats = ["a", "b", "a", "a", "b", "c"]
    assert split_halves(cats) == ([0, 1, 3, 5], [2, 4])
    assert split_halves(["x"] * 5) == ([0, 2, 4], [1, 3])


def test_too_small_to_split_names_the_sets():
    ok = split_halves(["x"] * (2 * MIN_HALF))
    check_halves({"harmful": ok, "harmless": ok}, {"harmful": "h.jsonl", "harmless": "b.jsonl"})
    small = split_halves(["x"] * (2 * MIN_HALF - 1))
    with pytest.raises(InputError, match=r"too few prompts to split .* b\.jsonl \(harmless\): 8 \+ 7"):
        check_halves({"harmful": ok, "harmless": small}, {"harmful": "h.jsonl", "harmless": "b.jsonl"})
