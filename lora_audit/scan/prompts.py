"""safety-scan's prompts: its own built-in sets, and how every set is split into a DIRECTION half
(the refusal direction is the difference of means over it) and a VALIDATION half (the direction is
shown to be causal on it, ``causal``).

Built-in sets (``lora_audit/data/safety``): ``builtin:scan-harmful`` (80 requests a safety-tuned
model should refuse, 10 in each category of ``builtin:harmful``) and ``builtin:scan-harmless``
(80 ordinary requests, 16 in each category of ``builtin:benign``). They share no prompt, and no
near-duplicate, with safety-eval's label prompts (``builtin:harmful``, ``builtin:benign``) or the
training sets (``lora_audit/data/train``): the scan's forward-pass proxy is read on prompts the
labels it is judged against never saw (tests/scan/test_prompt_sets.py checks it). Requests only,
without operational content.

The split (``split_halves``): within each category, in file order, the 1st, 3rd, 5th ... prompt
goes to the direction half and the 2nd, 4th ... to the validation half, so both halves cover
every category and a set without categories alternates. Deterministic: the same file gives the
same halves, and ``--limit N`` splits the first N prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..errors import InputError

SCAN_HARMFUL = "builtin:scan-harmful"
SCAN_HARMLESS = "builtin:scan-harmless"
MIN_HALF = 8  # prompts per half of each set: the direction's split-half stability needs 4 + 4


def split_halves(categories: Sequence[str]) -> tuple[list[int], list[int]]:
    """(direction indices, validation indices) of a prompt set, from its prompts' categories in
    file order (module docstring)."""
    seen: dict[str, int] = {}
    direction: list[int] = []
    validation: list[int] = []
    for i, c in enumerate(categories):
        k = seen.get(c, 0)
        (direction if k % 2 == 0 else validation).append(i)
        seen[c] = k + 1
    return direction, validation


def check_halves(halves: dict[str, tuple[list[int], list[int]]], sources: dict[str, str]) -> None:
    """InputError, naming the sets, unless every half of every set has ``MIN_HALF`` prompts."""
    small = [(s, len(d), len(v)) for s, (d, v) in halves.items() if min(len(d), len(v)) < MIN_HALF]
    if small:
        what = "; ".join(f"{sources[s]} ({s}): {d} + {v}" for s, d, v in small)
        raise InputError(f"too few prompts to split into a direction half and a validation half of at least "
                         f"{MIN_HALF} each: {what} (direction + validation, alternating within each category). "
                         f"Give at least {2 * MIN_HALF} prompts per set ({SCAN_HARMFUL} and {SCAN_HARMLESS} have 80)")
