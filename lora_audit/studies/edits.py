"""Edits along a refusal direction, folded into the weights (Arditi et al. 2024, "Refusal in language
models is mediated by a single direction", arXiv 2406.11717, section 4.1: weight orthogonalisation):
the panel's abliterations and over-refusal edits, and the tests' positives for safety-scan's
refusal-edit test (``lora_audit.scan.tamper``). A study tool: the product never imports it.

For a unit direction r̂ of the residual stream and a strength a, every matrix that writes into the
stream is replaced by W - a r̂ r̂^T W: each residual writer W (d x n, ``scan.direction.Residual``)
and each embedding table E (vocab x d), read as what it adds to the stream (E <- E - a (E r̂) r̂^T).
a = 1 removes r̂ from everything those matrices write (the paper's abliteration), 0 < a < 1 a
part of it, a < 0 amplifies it (an edit toward over-refusal). ``layers`` restricts the writers
edited to those blocks (the embeddings count as part of the first layer, -1, see below).

Two forms: ``"lora"`` (a PEFT adapter of rank 1 on every edited matrix: lora_B = -a r̂, lora_A =
r̂^T W, scale 1; an embedding table as PEFT's embedding LoRA, lora_embedding_A = (E r̂)^T,
lora_embedding_B = -a r̂) and ``"full"`` (a full model folder with the edited weights; with tied
input and output embeddings the output head changes with the table).
"""

from __future__ import annotations

import time
from pathlib import Path
from collections.abc import Sequence

EMBEDDINGS = -1  # in ``layers``: the embedding tables


def refusal_direction_of(base: str | Path, harmful: list[str], harmless: list[str], *, layer: int | float,
                         chat_template: str | None = None, device: str = "cpu"):
    """(unit direction (d,) float32, the layer it was read at, BASE's Residual) from the difference of
    means of ``harmful`` and ``harmless`` (raw prompts, chat-formatted here) at the output of block
    ``layer`` (an int, or a float: that fraction of the depth)."""
    import torch

    from ..checkpoints import load_model
    from ..safety.generate import chat_texts
    from ..safety.scorers import refusal_start_ids
    from ..scan.direction import collect, find_blocks, refusal_direction, trace_residual

    loaded = load_model(str(base), device=device)
    model, tok = loaded.model, loaded.tokenizer
    h, b = chat_texts(tok, harmful, chat_template), chat_texts(tok, harmless, chat_template)
    residual = trace_residual(model, tok(h[0], return_tensors="pt", add_special_tokens=False)["input_ids"])
    _, blocks = find_blocks(model)
    ids = torch.tensor(refusal_start_ids(tok))
    d = refusal_direction(collect(model, tok, h, blocks, ids).states, collect(model, tok, b, blocks, ids).states)
    at = int(layer * residual.n_layers) if isinstance(layer, float) else int(layer)
    return d.unit[at].float(), at, residual


def direction_edit(base: str | Path, out: str | Path, direction, strength: float, *, form: str = "lora",
                   layers: Sequence[int] | None = None, embeddings: bool = True, device: str = "cpu",
                   record: dict | None = None, method: str = "direction-edit") -> dict:
    """Write the edit (module docstring) of ``base`` along ``direction`` ((d,), normalised here) with
    ``strength`` to ``out`` (atomically) as a PEFT adapter (``form="lora"``) or a full model
    (``"full"``); return its training.json record (also written to ``out``)."""
    import torch

    from ..checkpoints import load_model
    from ..results.training import TrainingResult
    from ..scan.direction import trace_residual

    check_form(form)
    t0 = time.perf_counter()
    loaded = load_model(str(base), device=device)
    model, tok = loaded.model, loaded.tokenizer
    residual = trace_residual(model, tok("hello", return_tensors="pt", add_special_tokens=False)["input_ids"])
    r = torch.as_tensor(direction, dtype=torch.float32).flatten()
    r = r / r.norm()
    if r.numel() != residual.d_model:
        raise ValueError(f"the direction has {r.numel()} entries, the stream {residual.d_model}")
    writers = [w.module for w in residual.writers if layers is None or w.layer in layers]
    tables = residual.embeddings if embeddings and (layers is None or EMBEDDINGS in layers) else []
    info = {"method": method, "base": str(base), "strength": strength, "form": form,
            "layers": None if layers is None else sorted(layers), "writers": writers, "embeddings": list(tables)}
    factors = ablation_factors(model, writers, tables, r, strength)
    rec = TrainingResult(method=method, wall_time_s=round(time.perf_counter() - t0, 3),
                         settings={**info, **(record or {})})
    write_factors(model, tok, factors, out, form=form, record=rec, what="direction edit")
    return rec.to_json()


def check_form(form: str) -> None:
    if form not in ("lora", "full"):
        raise ValueError(f"form must be 'lora' or 'full', got {form!r}")


def _is_conv1d(module) -> bool:
    return type(module).__name__ == "Conv1D"  # GPT-2's: weight stored (in, out)


def ablation_factors(model, writers: Sequence[str], tables: Sequence[str], r, strength: float) -> dict:
    """The ablation of strength a along the unit ``r`` (module docstring) as rank-one factors, computed
    in ``r``'s dtype: module name -> (left, right) with dW = left @ right in the matrix's own terms,
    (out x in) for a residual writer W (dW = -a r (r^T W)) whatever its storage, (vocab x d) for an
    embedding table E (dE = -a (E r) r^T)."""
    modules = dict(model.named_modules())
    out = {}
    for name in writers:
        W = modules[name].weight.detach().to(r.dtype)  # (d, n); a Conv1D stores (n, d)
        row = W @ r if _is_conv1d(modules[name]) else r @ W  # r^T W in (out x in) terms
        out[name] = ((-strength * r)[:, None], row[None, :])
    for name in tables:
        E = modules[name].weight.detach().to(r.dtype)  # (vocab, d)
        out[name] = ((E @ r)[:, None], (-strength * r)[None, :])
    return out


def write_factors(model, tokenizer, factors: dict, out: str | Path, *, form: str, record, what: str) -> None:
    """Save ``model`` changed by rank-one ``factors`` (module name -> (left, right), dW = left @ right
    as ``ablation_factors`` gives them) to ``out`` (atomically) with ``record`` as training.json: as
    a PEFT LoRA adapter of rank 1 on exactly those modules (scale 1: B = left, A = right; an
    embedding table as PEFT's embedding LoRA, whose delta is (B A)^T: A = left^T, B = right^T), or
    as a full model folder (the weights plus dW; with tied embeddings the output head follows)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from ..io import atomic_dir

    check_form(form)
    if form == "full":
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, (left, right) in factors.items():
                W, dW = modules[name].weight, left @ right
                W.add_((dW.T if _is_conv1d(modules[name]) else dW).to(W.dtype))
        save = model
    else:
        # full module names: peft matches a target by its dotted suffix, so only these modules change
        save = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=sorted(factors)))
        modules = dict(save.named_modules())
        with torch.no_grad():
            for name, (left, right) in factors.items():
                m = modules[f"base_model.model.{name}"]
                if isinstance(m.get_base_layer(), torch.nn.Embedding):
                    A, B = m.lora_embedding_A["default"], m.lora_embedding_B["default"]
                    A.copy_(left.T.to(A.dtype))
                    B.copy_(right.T.to(B.dtype))
                else:
                    A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
                    A.copy_(right.to(A.dtype))
                    B.copy_(left.to(B.dtype))
    with atomic_dir(Path(out), what=what) as tmp:
        save.save_pretrained(str(tmp), safe_serialization=True)
        if form == "full":
            tokenizer.save_pretrained(str(tmp))
        record.write_json(tmp / "training.json")
