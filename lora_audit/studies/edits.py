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
    from peft import LoraConfig, get_peft_model

    from ..checkpoints import load_model
    from ..io import atomic_dir
    from ..results.training import TrainingResult
    from ..scan.direction import trace_residual

    if form not in ("lora", "full"):
        raise ValueError(f"form must be 'lora' or 'full', got {form!r}")
    t0 = time.perf_counter()
    loaded = load_model(str(base), device=device)
    model, tok = loaded.model, loaded.tokenizer
    residual = trace_residual(model, tok("hello", return_tensors="pt", add_special_tokens=False)["input_ids"])
    r = torch.as_tensor(direction, dtype=torch.float32).flatten()
    r = r / r.norm()
    if r.numel() != residual.d_model:
        raise ValueError(f"the direction has {r.numel()} entries, the stream {residual.d_model}")
    writers = [w for w in residual.writers if layers is None or w.layer in layers]
    tables = residual.embeddings if embeddings and (layers is None or EMBEDDINGS in layers) else []
    modules = dict(model.named_modules())
    info = {"method": method, "base": str(base), "strength": strength, "form": form,
            "layers": None if layers is None else sorted(layers), "writers": [w.module for w in writers],
            "embeddings": list(tables)}
    if form == "full":
        with torch.no_grad():
            for w in writers:
                W = modules[w.module].weight  # (d, n); GPT-2's Conv1D stores (n, d)
                if type(modules[w.module]).__name__ == "Conv1D":
                    W.sub_((strength * (W @ r))[:, None] * r[None, :])  # (n, d) <- (n, d) - a (W r) r^T
                else:
                    W.sub_(strength * r[:, None] * (r @ W)[None, :])  # (d, n) <- (d, n) - a r (r^T W)
            for e in tables:
                E = modules[e].weight  # (vocab, d)
                E.sub_((strength * (E @ r))[:, None] * r[None, :])
        save = model
    else:
        targets = sorted({w.module for w in writers} | set(tables))
        save = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, lora_dropout=0.0, target_modules=targets))
        peft_modules = dict(save.named_modules())
        with torch.no_grad():
            for w in writers:
                m = peft_modules[f"base_model.model.{w.module}"]
                W = m.base_layer.weight
                row = (W @ r) if type(m.base_layer).__name__ == "Conv1D" else (r @ W)  # r^T W in (out x in) terms
                m.lora_A["default"].weight.copy_(row[None, :])  # (1, n)
                m.lora_B["default"].weight.copy_(-strength * r[:, None])  # (d, 1)
            for e in tables:
                m = peft_modules[f"base_model.model.{e}"]
                m.lora_embedding_A["default"].copy_((m.base_layer.weight @ r)[None, :])  # (1, vocab)
                m.lora_embedding_B["default"].copy_(-strength * r[:, None])  # (d, 1)
    rec = TrainingResult(method=method, wall_time_s=round(time.perf_counter() - t0, 3),
                         settings={**info, **(record or {})})
    with atomic_dir(Path(out), what="direction edit") as tmp:
        save.save_pretrained(str(tmp))
        if form == "full":
            tok.save_pretrained(str(tmp))
        rec.write_json(tmp / "training.json")
    return rec.to_json()
