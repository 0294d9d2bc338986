"""Which stored tensors of a base are weight matrices, and how each is read as (out x in).

Every matrix the audit reports is a base parameter, under the base's own name, in the nn.Linear
(out x in) orientation, with one documented reshaping per kind:

    linear     a 2-D weight, as stored; GPT-2 Conv1D weights (stored in x out) transposed
    embedding  a 2-D embedding table (vocab x dim), as stored; only with --include-embeddings
    conv       a conv kernel ``*.weight`` of 3 or more dims (out, in, k...) -> (out, in*prod(k)):
               Whisper's Conv1d front-end, ViT/CLIP patch embeddings, UNet convolutions
               (the stored shape is kept in the JSON as ``reshaped_from``)
    expert     one expert of a fused expert stack: a 3-D parameter ``...experts.<name>`` (no
               ``.weight`` suffix), (experts x out x in) as transformers' MoE layers keep them, or
               (experts x in x out) in the transposed layouts (Llama-4, gpt-oss); the JSON name is
               ``<parameter>[e]`` (their 2-D bias stacks, ``..._bias``, are not matrices)

Whether a stack is (E, out, in) or (E, in, out) is read from the config's hidden size: a
gate/up projection takes the hidden size in, a down projection gives it out. Anything else
with more than two dimensions (ViT's position embeddings, a stack whose orientation cannot be
told) is skipped, with the reason, whenever a tuned model touches it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch

# Parameter-name pieces of input/output embeddings and LM heads (excluded unless asked for).
EMBEDDING_PARTS = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "embed_positions",
                   "token_embedding", "tok_embeddings", "embed_in", "shared", "position_embedding",
                   "token_type_embeddings", "relative_attention_bias")
HEAD_PARTS = ("lm_head", "embed_out", "output")
# Models whose attention/MLP weights are transformers' Conv1D, stored (in x out).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc", "q_attn")
EXPERT_INDEX = re.compile(r"\[(\d+)\]$")


def _parts(name: str) -> list[str]:
    return name.split(".")


def is_embedding(name: str) -> bool:
    return any(p in EMBEDDING_PARTS for p in _parts(name)[:-1])


def is_head(name: str) -> bool:
    parts = _parts(name)
    return len(parts) >= 2 and parts[-2] in HEAD_PARTS and parts[0] in HEAD_PARTS + ("model",)


def conv1d_weights(shapes: Mapping[str, tuple[int, ...]], model_type: str | None) -> set[str]:
    """The 2-D weights of a model stored (in x out), as transformers' Conv1D keeps them (GPT-2 and
    its kin, ``CONV1D_MODEL_TYPES``): the stream analyses them transposed, and adapter deltas,
    which are (out x in), are matched against them transposed (``adapters.match_adapter``)."""
    if model_type not in CONV1D_MODEL_TYPES:
        return set()
    return {n for n, s in shapes.items() if len(s) == 2 and len(_parts(n)) >= 2 and _parts(n)[-2] in CONV1D_MODULES}


@dataclass(frozen=True)
class Matrix:
    """One audited matrix: where it is stored and how it is read as (out x in)."""

    name: str  # the name in the JSON: the base parameter, "[e]" appended for one expert of a stack
    param: str  # the stored tensor it is read from
    stored: tuple[int, ...]  # that tensor's stored shape
    kind: str  # "linear" | "embedding" | "conv" | "expert"
    expert: int | None = None
    transposed: bool = False  # analysed as the transpose of the stored (expert slice of the) tensor

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, cols) as analysed."""
        s = self.stored[1:] if self.expert is not None else self.stored
        rows, cols = s[0], math.prod(s[1:])
        return (cols, rows) if self.transposed else (rows, cols)

    @property
    def reshaped_from(self) -> tuple[int, ...] | None:
        return self.stored if self.kind == "conv" else None

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The (out x in) matrix from the stored tensor ``t``."""
        if self.expert is not None:
            t = t[self.expert]  # (E, a, b) -> (a, b)
        if t.dim() > 2:
            t = t.reshape(t.shape[0], -1)  # (out, in, k...) -> (out, in*prod(k))
        return t.T if self.transposed else t


def hidden_size(config: Mapping) -> int | None:
    for c in (config, config.get("text_config") or {}):
        if not isinstance(c, Mapping):
            continue
        for key in ("hidden_size", "d_model", "n_embd"):
            if isinstance(c.get(key), int):
                return c[key]
    return None


def _expert_orientation(name: str, shape: tuple[int, ...], hidden: int | None) -> bool | str:
    """True when an (E, a, b) stack is stored (E, in, out), False when (E, out, in); a reason string
    when the config cannot tell (no hidden size, or hidden size on both or neither side)."""
    _, a, b = shape
    leaf = _parts(name)[-1]
    if hidden is None:
        return "the config gives no hidden size to tell (experts, out, in) from (experts, in, out)"
    down = "down" in leaf or leaf in ("w2", "wo", "fc2")
    out_dim_ok, in_dim_ok = (a == hidden, b == hidden) if down else (b == hidden, a == hidden)
    if out_dim_ok and not in_dim_ok:
        return False
    if in_dim_ok and not out_dim_ok:
        return True
    if a == b:
        return False  # square: transformers' default layout (experts, out, in), as peft assumes
    return f"neither side of {list(shape[1:])} is the hidden size {hidden} where a {leaf} stack would have it"


def is_expert_stack(name: str, shape: tuple[int, ...]) -> bool:
    return len(shape) == 3 and not name.endswith(".weight") and "experts" in _parts(name)[:-1]


def plan_matrices(shapes: Mapping[str, tuple[int, ...]], config: Mapping, *, include_embeddings: bool = False,
                  transposed: Collection[str] | None = None) -> tuple[dict[str, Matrix], dict[str, str]]:
    """({JSON name: Matrix} in the base's order, {parameter: why it is not audited}) for every tensor
    of more than one dimension. 1-D tensors (biases, norms) are not matrices and appear in neither.
    ``transposed``: the 2-D weights stored (in x out) (default: ``conv1d_weights`` of the config's
    model type)."""
    if transposed is None:
        transposed = conv1d_weights(shapes, config.get("model_type"))
    hidden = hidden_size(config)
    plan: dict[str, Matrix] = {}
    skipped: dict[str, str] = {}
    for name, shape in shapes.items():
        shape = tuple(shape)
        if len(shape) < 2:
            continue
        if len(shape) == 2 and "bias" in _parts(name)[-1]:
            skipped[name] = f"2-D stack of bias vectors {list(shape)} (one per expert), not a weight matrix"
            continue
        if len(shape) == 2:
            kind = "embedding" if is_embedding(name) else "linear"
            if not include_embeddings and (is_embedding(name) or is_head(name)):
                skipped[name] = "embedding / lm_head: audited only with --include-embeddings"
                continue
            plan[name] = Matrix(name, name, shape, kind, transposed=name in transposed)
        elif name.endswith(".weight"):
            plan[name] = Matrix(name, name, shape, "conv")
        elif is_expert_stack(name, shape):
            t = _expert_orientation(name, shape, hidden)
            if isinstance(t, str):
                skipped[name] = f"stack of {shape[0]} experts {list(shape)}: {t}"
                continue
            for e in range(shape[0]):
                plan[f"{name}[{e}]"] = Matrix(f"{name}[{e}]", name, shape, "expert", expert=e, transposed=t)
        else:
            skipped[name] = (f"{len(shape)}-D tensor {list(shape)}: neither a conv kernel (*.weight, analysed as "
                             "out x in*k) nor a stack of experts (...experts.<name>, one matrix per expert)")
    return plan, skipped


def strip_expert(name: str) -> str:
    """"...experts.gate_up_proj[3]" -> "...experts.gate_up_proj"."""
    return EXPERT_INDEX.sub("", name)
