"""Training data: JSONL with {"prompt", "response"} (loss on the response only; the prompt is
wrapped in the tokenizer's chat template when it has one) or {"text"} (loss on every token);
a prompt row may add "prefill", the start of the assistant's turn given as context without loss
(the safety-recovery examples of Qi et al. 2024, arXiv 2406.05946: a harmful start, then the
refusal that is learned);
``builtin:NAME`` reads ``lora_audit/data/train/NAME.jsonl``. A row may hold at most
``DEFAULT_MAX_ROW_CHARS`` characters unless the caller raises the limit.

Batches use dynamic padding (each batch padded to its longest row, right padding) so short
examples cost little on CPU.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from ..datafile import check_chars, check_limit, is_blank, parse_jsonl
from ..io import read_user_text
from ..errors import FormatError, InputError

BUILTIN_DIR = Path(__file__).resolve().parent.parent / "data" / "train"
IGNORE = -100
# Longer rows (prompt + response, or text) are refused unless the caller raises the limit: rows
# are cut to --max-length tokens (default 256, about 1,000 characters) anyway, so a row of more
# than 64,000 characters (about 16,000 tokens) is almost all thrown away, and is more likely a
# broken file (a whole document on one line) than an example.
DEFAULT_MAX_ROW_CHARS = 64_000
LIMIT_OPTION = "--max-row-chars"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in BUILTIN_DIR.glob("*.jsonl"))


def resolve_data(spec: str) -> Path:
    """A path for ``spec`` (a JSONL file or ``builtin:NAME``); InputError when it does not exist."""
    if spec.startswith("builtin:"):
        name = spec.split(":", 1)[1]
        path = BUILTIN_DIR / f"{name}.jsonl"
        if not path.is_file():
            raise InputError(f"no built-in data set {name!r}; available: {', '.join(builtin_names())}")
        return path
    path = Path(spec)
    if not path.exists():
        raise InputError(f"{spec}: data file not found (give a JSONL file or builtin:NAME, "
                         f"built-ins: {', '.join(builtin_names())})")
    return path


_ACCEPTED = '{"prompt": str, "response": str} (optionally "prefill": str) or {"text": str}'


def load_records(spec: str, *, max_chars: int | None = DEFAULT_MAX_ROW_CHARS) -> list[dict]:
    """Parse the JSONL; a FormatError names the file and line of the first bad row: not JSON, not
    an object of the accepted shape, a blank ``text``/``response`` (nothing to learn from), or a
    row longer than ``max_chars`` characters (None: no limit)."""
    check_limit(max_chars, f"max_chars ({LIMIT_OPTION})")
    path = resolve_data(spec)
    rows = [_record(row, f"{path}: line {n}", max_chars)
            for n, row in parse_jsonl(read_user_text(path, "training data file"), path, _ACCEPTED)]
    if not rows:
        raise InputError(f"{path}: no training examples")
    return rows


def _record(row: dict, where: str, max_chars: int | None) -> dict:
    if isinstance(row.get("text"), str):
        rec, learned = {"text": row["text"]}, "text"
    elif isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str):
        rec, learned = {"prompt": row["prompt"], "response": row["response"]}, "response"
        if "prefill" in row:
            if not isinstance(row["prefill"], str):
                raise FormatError(f"{where}: 'prefill' must be a string")
            rec["prefill"] = row["prefill"]
    else:
        raise FormatError(f"{where}: expected {_ACCEPTED}, got keys {sorted(row)}")
    if is_blank(rec[learned]):
        raise FormatError(f"{where}: the {learned!r} is empty; there is nothing to train on")
    check_chars("".join(rec.values()), max_chars, where, "row", LIMIT_OPTION)
    return rec


def encode(row: dict, tokenizer, max_length: int) -> tuple[list[int], list[int]]:
    """Token ids and labels (IGNORE on prompt tokens) for one example, cut at ``max_length``."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if "text" in row:
        ids = tokenizer(row["text"], add_special_tokens=True)["input_ids"] + eos
        return ids[:max_length], ids[:max_length]
    prefill = row.get("prefill", "")
    if getattr(tokenizer, "chat_template", None):
        msgs = [{"role": "user", "content": row["prompt"]}]
        prompt = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) + prefill
        full = tokenizer.apply_chat_template(msgs + [{"role": "assistant", "content": prefill + row["response"]}],
                                             tokenize=False)
        if not full.startswith(prompt):  # template rewrites the prompt: fall back to concatenation
            full = prompt + row["response"]
        p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        ids = tokenizer(full, add_special_tokens=False)["input_ids"]
        if ids[:len(p_ids)] != p_ids:  # tokenisation merged across the boundary
            ids = p_ids + tokenizer(full[len(prompt):], add_special_tokens=False)["input_ids"]
        ids = ids + ([] if ids and ids[-1] in eos else eos)
    else:
        p_ids = tokenizer(row["prompt"] + "\n" + prefill, add_special_tokens=True)["input_ids"]
        ids = p_ids + tokenizer(row["response"], add_special_tokens=False)["input_ids"] + eos
    labels = [IGNORE] * len(p_ids) + ids[len(p_ids):]
    return ids[:max_length], labels[:max_length]


class Batches:
    """Endless seeded shuffled batches with dynamic padding: dicts of input_ids, attention_mask,
    labels, each (batch, longest row in the batch)."""

    def __init__(self, rows: list[dict], tokenizer, *, batch_size: int, max_length: int, seed: int):
        self.examples = [encode(r, tokenizer, max_length) for r in rows]
        self.examples = [e for e in self.examples if any(label != IGNORE for label in e[1][1:])]
        if not self.examples:
            raise InputError(f"no example has response tokens within --max-length {max_length}")
        self.batch_size = batch_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.rng = random.Random(seed)
        self.order: list[int] = []

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        picked = []
        for _ in range(min(self.batch_size, len(self.examples))):
            if not self.order:
                self.order = list(range(len(self.examples)))
                self.rng.shuffle(self.order)
            picked.append(self.examples[self.order.pop()])
        return collate(picked, self.pad)


def collate(examples: list[tuple[list[int], list[int]]], pad: int) -> dict[str, torch.Tensor]:
    n = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), n), pad, dtype=torch.long)
    labels = torch.full((len(examples), n), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), n), dtype=torch.long)
    for i, (ids, lab) in enumerate(examples):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
