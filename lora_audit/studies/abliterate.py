"""The panel's weight attacks: abliteration (Arditi et al. 2024, arXiv 2406.11717) and its opposite.

Direction. ``find_direction`` takes the refusal direction of a model from the SAFETY-TUNING set's
prompts (``tuning_prompts``: harmful = rows whose response is a refusal, harmless = the others
and the benign training set), never from safety-scan's prompts or from the label prompts: the
even-numbered prompts of each set give r_l = mean_harmful - mean_harmless of the last-token
output of every block l (``scan.direction``'s convention), the odd-numbered ones validate. The
layer is chosen by the intervention's effect, as Arditi et al. choose it: for every candidate
layer below ``MAX_DEPTH`` of the depth, ablate r̂_l from every residual writer (``ablated``) and
measure the mean first-token refusal log-odds of the validation harmful prompts ("bypass"), and
add r_l to the stream after block l (``added``) and measure it on the validation harmless ones
("induce"); among layers whose addition induces refusal (induce > 0) the one with the lowest
bypass wins (the lowest bypass overall when none induces). Every layer's scores are kept.

Edits (``ablation_delta``, ``addition_delta``), all exact functions of the base weights:

- ablation of strength a on a writer W (out = d_model): dW = -a r̂ (r̂^T W), rank one; on the
  embedding E (vocab x d, rows written into the stream): dE = -a (E r̂) r̂^T. a = 1 removes r̂
  from everything the edited writers write ("orthogonalise every residual writer");
- layer sets: "all" (the embedding and the attention-output and MLP-down matrices of every
  block), or the writers of the listed blocks only;
- addition of strength c (over-refusal): dE = c ||r_l|| 1 r̂_l^T, every token's embedding moved by
  c times the direction's length, so the stream carries c r_l into every layer (the weight form of
  Arditi et al.'s activation addition: the embedding is the one residual writer with a constant
  term). Tied output embeddings see the same constant added to every row, which leaves the
  softmax unchanged.

``write_edit`` saves an edit as a PEFT LoRA adapter (rank 1 per edited matrix, from its factors:
scale 1, B = the left factor, A = the right one) or as a full model folder (the base's weights
plus dW), each with a training.json saying what it is. The ablation's factors and the writing are
``studies.edits``' (``ablation_factors``, ``write_factors``), shared with the tests' edits.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

MAX_DEPTH = 0.8  # candidate layers lie below this fraction of the depth (Arditi et al.)
VALIDATION = 32  # validation prompts per set for the layer choice


def tuning_prompts() -> tuple[list[str], list[str]]:
    """(harmful, harmless) prompts of the safety-tuning set (a row whose response the keyword scorer
    calls a refusal is harmful) plus the benign training set's prompts as harmless."""
    from ..safety.scorers import KeywordScorer
    from ..training.data import load_records

    refused = KeywordScorer()
    rows = load_records("builtin:safety-tune")
    harmful = [r["prompt"] for r in rows if refused(r["response"])]
    harmless = [r["prompt"] for r in rows if not refused(r["response"])]
    return harmful, harmless + [r["prompt"] for r in load_records("builtin:alpaca-mini")]


def _writers(model: nn.Module, tokenizer, text: str):
    from ..scan.direction import trace_residual

    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return trace_residual(model, ids)


@contextlib.contextmanager
def ablated(model: nn.Module, modules: list[nn.Module], unit: Tensor):
    """Within the block: every output of ``modules`` (the residual writers, embedding included)
    has its component along ``unit`` removed, the forward-pass form of orthogonalising them."""
    u = unit.to(next(model.parameters()).dtype)

    def hook(mod, inp, out):
        h = out[0] if isinstance(out, tuple) else out
        h = h - (h @ u)[..., None] * u
        return (h, *out[1:]) if isinstance(out, tuple) else h

    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def added(block: nn.Module, vector: Tensor):
    """Within the block: ``vector`` added to ``block``'s output at every position."""
    v = vector.to(next(block.parameters()).dtype)

    def hook(mod, inp, out):
        return (out[0] + v, *out[1:]) if isinstance(out, tuple) else out + v

    handle = block.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


@dataclass
class ChosenDirection:
    layer: int  # the chosen block (its output's direction)
    unit: list[float]  # r̂ at that layer
    norm: float  # ||r_l||
    bypass: list[float | None]  # per layer: validation harmful mean refusal log-odds, r̂_l ablated
    induce: list[float | None]  # per layer: validation harmless mean refusal log-odds, r_l added
    baseline_harmful: float  # no intervention
    baseline_harmless: float
    n_direction: tuple[int, int]  # prompts that made r (harmful, harmless)
    n_validation: tuple[int, int]


@torch.no_grad()
def find_direction(model: nn.Module, tokenizer, prompts: tuple[list[str], list[str]] | None = None, *,
                   batch_size: int = 16) -> tuple[ChosenDirection, Tensor]:
    """(the chosen layer and every layer's effect, r̂ of every layer (L, d)); module docstring."""
    from ..safety.generate import chat_texts
    from ..safety.scorers import first_token_scores, refusal_start_ids
    from ..scan.direction import collect, find_blocks, refusal_direction

    harmful, harmless = prompts or tuning_prompts()
    n = min(len(harmful), len(harmless))
    harmful, harmless = harmful[:n], harmless[:n]
    h_dir, b_dir = chat_texts(tokenizer, harmful[0::2]), chat_texts(tokenizer, harmless[0::2])
    h_val, b_val = (chat_texts(tokenizer, p[1::2][:VALIDATION]) for p in (harmful, harmless))
    _, blocks = find_blocks(model)
    ids = torch.tensor(refusal_start_ids(tokenizer))
    d = refusal_direction(collect(model, tokenizer, h_dir, blocks, ids, batch_size=batch_size).states,
                          collect(model, tokenizer, b_dir, blocks, ids, batch_size=batch_size).states)
    writers = _writers(model, tokenizer, h_dir[0])
    mods = dict(model.named_modules())
    targets = [model.get_input_embeddings()] + [mods[w.module] for w in writers.writers]

    def score(texts):
        s = first_token_scores(model, tokenizer, texts, batch_size=batch_size, desc="layer choice")
        return sum(s) / len(s)

    depth = len(blocks)
    bypass: list[float | None] = [None] * depth
    induce: list[float | None] = [None] * depth
    for layer in range(int(MAX_DEPTH * depth)):
        with ablated(model, targets, d.unit[layer].float()):
            bypass[layer] = score(h_val)
        with added(blocks[layer], d.r[layer].float()):
            induce[layer] = score(b_val)
    cands = [i for i in range(depth) if bypass[i] is not None]
    inducing = [i for i in cands if induce[i] is not None and induce[i] > 0]
    best = min(inducing or cands, key=lambda i: bypass[i])
    chosen = ChosenDirection(layer=best, unit=d.unit[best].tolist(), norm=float(d.separation[best]),
                             bypass=bypass, induce=induce, baseline_harmful=score(h_val),
                             baseline_harmless=score(b_val), n_direction=(len(h_dir), len(b_dir)),
                             n_validation=(len(h_val), len(b_val)))
    return chosen, d.unit.float()


@dataclass(frozen=True)
class Edit:
    """One weight edit: ``kind`` "ablation" (strength a on ``layers``: "all" (the embedding and every
    block), "chosen" (the chosen block's writers), "window:k" (blocks chosen-k .. chosen+k) or block
    indices) or "addition" (strength c on the embedding); saved as a LoRA adapter or a full model."""

    kind: str
    strength: float
    layers: str | tuple[int, ...] = "all"
    form: str = "lora"  # lora | full


def blocks_of(edit: Edit, chosen: int) -> tuple[int, ...]:
    """The block indices a non-"all" ablation edits."""
    if edit.layers == "chosen":
        return (chosen,)
    if isinstance(edit.layers, str) and edit.layers.startswith("window:"):
        k = int(edit.layers.split(":", 1)[1])
        return tuple(range(max(0, chosen - k), chosen + k + 1))
    if isinstance(edit.layers, str):
        raise ValueError(f"unknown layer set {edit.layers!r}")
    return tuple(edit.layers)


def edit_factors(model: nn.Module, tokenizer, edit: Edit, direction: ChosenDirection) -> dict[str, tuple[Tensor, Tensor]]:
    """module name -> (left (out, 1), right (1, in)) with dW = left @ right in the module's own
    orientation (embedding: (vocab, d) = left (vocab, 1) @ right (1, d))."""
    from .edits import ablation_factors

    r = torch.tensor(direction.unit, dtype=torch.float64)
    emb_name = next(n for n, m in model.named_modules() if m is model.get_input_embeddings())
    if edit.kind == "addition":
        rows = model.get_input_embeddings().weight.shape[0]
        return {emb_name: (torch.ones(rows, 1, dtype=torch.float64), (edit.strength * direction.norm * r)[None, :])}
    if edit.kind != "ablation":
        raise ValueError(f"unknown edit {edit.kind!r}")
    writers = _writers(model, tokenizer, "Hello").writers
    if edit.layers != "all":
        writers = [w for w in writers if w.layer in blocks_of(edit, direction.layer)]
    return ablation_factors(model, [w.module for w in writers], [emb_name] if edit.layers == "all" else [], r,
                            edit.strength)


def write_edit(base: Path, out: Path, edit: Edit, direction: ChosenDirection, *, device: str = "cpu") -> dict:
    """Apply ``edit`` to ``base`` and save it to ``out`` (atomically) with training.json."""
    from ..checkpoints import load_model
    from ..results.training import TrainingResult
    from .edits import check_form, write_factors

    check_form(edit.form)
    t0 = time.perf_counter()
    loaded = load_model(str(base), device=device)
    model, tok = loaded.model, loaded.tokenizer
    factors = edit_factors(model, tok, edit, direction)
    settings = {"method": f"{edit.kind}-{edit.form}", "base": str(base), "edit": asdict(edit),
                "layer": direction.layer, "modules": sorted(factors)}
    record = TrainingResult(method=f"{edit.kind}-{edit.form}", wall_time_s=round(time.perf_counter() - t0, 3),
                            settings=settings)
    write_factors(model, tok, factors, out, form=edit.form, record=record, what="zoo weight edit")
    return record.to_json()


def save_direction(path: Path, chosen: ChosenDirection) -> None:
    from ..io import atomic_write_json

    atomic_write_json(path, asdict(chosen))


def load_direction(path: Path) -> ChosenDirection:
    d = json.loads(Path(path).read_text(encoding="utf-8"))
    d["n_direction"], d["n_validation"] = tuple(d["n_direction"]), tuple(d["n_validation"])
    return ChosenDirection(**d)
