"""The residual stream of a decoder model, its activations at the last prompt token, and the
refusal direction (Arditi et al. 2024, "Refusal in language models is mediated by a single
direction", arXiv 2406.11717), per layer.

What is computed, next to the reference code (andyrdt/refusal_direction, pipeline/submodules/
generate_directions.py, which takes mean activations in float64 over harmful and harmless
instructions and their difference, unnormalised):

- Position: the LAST token of each chat-templated prompt, assistant prefix included (left
  padding, so position -1 of every row): where the model decides how to answer. The reference
  computes candidates at every post-instruction template position and picks one by validation;
  -1 is one of them. Keeping one position and every layer is cheaper and shows where along the
  depth the direction lives.
- Layer: the reference reads the stream at the input of block l (resid_pre). Here the OUTPUT of
  block l (resid_post, l = 0 .. L-1): the stream that block l's attention-output and MLP-down
  matrices write into, so a layer's weight update is compared with the direction of the stream
  it writes to. The final norm's output is never used.
- r_l = mean_harmful(x_l) - mean_harmless(x_l) (float64); r̂_l = r_l / ||r_l||.

How trustworthy r_l is (``Direction``): split-half stability, the cosine between r_l from the
even- and from the odd-numbered prompts of both sets; separation d'_l, the difference of the mean
projections on r̂_l over their pooled standard deviation (in-sample, so optimistic); and the
base's own refusal of the harmful prompts by the first-token score (a base that refuses nothing
has no refusal direction to find).

The residual stream (``Residual``): the decoder blocks are the one ``nn.ModuleList`` of
``config.num_hidden_layers`` modules. The matrices that write into the stream are read off one
forward pass with hooks on every linear module (``nn.Linear``, transformers' ``Conv1D``) inside
the blocks: within each direct child of a block (a sub-layer: attention, MLP), the LAST linear
module called whose output has the stream's width writes into it: Llama's o_proj and down_proj,
GPT-2's attn.c_proj and mlp.c_proj, parallel-attention blocks alike. No name list is consulted.
A sub-layer holding a list of modules (mixture-of-experts) is refused: which experts write
depends on the routing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..errors import InputError
from ..safety.scorers import last_position_logits, refusal_log_odds

UNSUPPORTED = ("it has no residual stream lora-audit understands (a decoder-only transformer whose blocks "
               "are one list of config.num_hidden_layers modules, each adding attention and MLP outputs to "
               "the stream)")
STABLE_COS = 0.8  # a layer's direction counts as stable when its split-half cosine reaches this


@dataclass
class Writer:
    """A matrix that writes into the residual stream after block ``layer``."""

    module: str  # module path in the model, e.g. "model.layers.3.mlp.down_proj"
    layer: int
    sublayer: str  # the block's child it belongs to, e.g. "mlp"
    in_features: int


@dataclass
class Residual:
    """Where a model's residual stream is and which matrices write into it."""

    blocks: str  # module path of the decoder blocks, e.g. "model.layers"
    n_layers: int
    d_model: int
    writers: list[Writer] = field(default_factory=list)
    embeddings: list[str] = field(default_factory=list)  # embedding tables added into the stream (token, position)

    def to_meta(self) -> dict:
        return {"blocks": self.blocks, "n_layers": self.n_layers, "d_model": self.d_model,
                "writers": [[w.module, w.layer, w.sublayer, w.in_features] for w in self.writers],
                "embeddings": list(self.embeddings)}

    @classmethod
    def from_meta(cls, meta: dict) -> Residual:
        return cls(blocks=str(meta["blocks"]), n_layers=int(meta["n_layers"]), d_model=int(meta["d_model"]),
                   writers=[Writer(str(m), int(la), str(s), int(n)) for m, la, s, n in meta["writers"]],
                   embeddings=[str(e) for e in meta.get("embeddings", [])])

    def is_embedding(self, name: str) -> bool:
        """Whether the checkpoint parameter ``name`` is one of the stream's embedding tables (with or
        without a wrapper prefix)."""
        known: set[str] = set()
        for e in self.embeddings:
            parts = f"{e}.weight".split(".")
            known.update(".".join(parts[i:]) for i in range(len(parts) - 1))
        parts = name.split(".")
        return any(".".join(parts[i:]) in known for i in range(len(parts) - 1))

    def writer_index(self) -> dict[str, Writer]:
        """Writer by parameter name (``<module>.weight``) and by every dotted suffix of it, so that
        checkpoint names with or without a wrapper prefix ("transformer.h.0..." / "h.0...") find it."""
        out: dict[str, Writer] = {}
        for w in self.writers:
            parts = f"{w.module}.weight".split(".")
            for i in range(len(parts) - 2):
                out.setdefault(".".join(parts[i:]), w)
        return out

    def writer_of(self, name: str, index: dict[str, Writer] | None = None) -> Writer | None:
        """The writer a checkpoint parameter name belongs to, or None."""
        index = self.writer_index() if index is None else index
        parts = name.split(".")
        for i in range(len(parts) - 2):
            w = index.get(".".join(parts[i:]))
            if w is not None:
                return w
        return None


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(module path, blocks) of the decoder stack: the one ModuleList of config.num_hidden_layers
    modules. InputError (the model's architecture named) when there is none or more than one."""
    cfg = getattr(model, "config", None)
    n = getattr(cfg, "num_hidden_layers", None)
    arch = getattr(cfg, "model_type", None) or type(model).__name__
    if not isinstance(n, int) or n < 1:
        raise InputError(f"the model ({arch}) has no num_hidden_layers in its config: {UNSUPPORTED}")
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == n
             and any(isinstance(c, nn.Module) and any(True for _ in c.parameters()) for c in m)]
    if len(found) != 1:
        what = "no" if not found else f"{len(found)} ({', '.join(x for x, _ in found)})"
        raise InputError(f"the model ({arch}) has {what} stack of {n} decoder blocks: {UNSUPPORTED}")
    return found[0]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _hidden(output) -> Tensor:
    """The hidden states of a block's output (a tensor, or a tuple whose first item is one)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _check_sublayer(child: nn.Module, where: str, arch: str) -> None:
    """InputError for a sub-layer whose matrices are not all weights of linear modules: a list of
    expert modules, or experts fused into 3-D tensors (routing decides which of them write)."""
    if any(isinstance(m, nn.ModuleList) for m in child.modules()):
        raise InputError(f"the model ({arch}) has a list of modules in {where} (a mixture of experts?): {UNSUPPORTED}")
    linear = {id(m.weight) for m in child.modules() if _is_linear(m)}
    odd = [n for n, p in child.named_parameters() if p.dim() >= 2 and id(p) not in linear]
    if odd:
        raise InputError(f"the model ({arch}) has matrices in {where} that are not linear modules ({odd[0]}: fused "
                         f"experts?): {UNSUPPORTED}")


@torch.no_grad()
def trace_residual(model: nn.Module, input_ids: Tensor) -> Residual:
    """The residual stream's blocks and writers (module docstring), from one forward pass of
    ``input_ids`` (1, T) with hooks on the blocks, their sub-layers and every linear module."""
    path, blocks = find_blocks(model)
    calls: list[tuple[int, str, str, int, int]] = []  # (layer, sublayer, module, out width, in width)
    widths: dict[tuple[int, str], int] = {}  # output width of each block (sublayer "") and sub-layer
    hooks = []
    arch = getattr(model.config, "model_type", None) or type(model).__name__

    def record(key):
        return lambda mod, inp, out: widths.__setitem__(key, int(_hidden(out).shape[-1]))

    for layer, block in enumerate(blocks):
        for child_name, child in block.named_children():
            _check_sublayer(child, f"{path}.{layer}.{child_name}", arch)
            hooks.append(child.register_forward_hook(record((layer, child_name))))
            for sub, m in child.named_modules():
                if _is_linear(m):
                    full = f"{path}.{layer}.{child_name}" + (f".{sub}" if sub else "")
                    hooks.append(m.register_forward_hook(
                        lambda mod, inp, out, key=(layer, child_name, full):
                        calls.append((*key, int(out.shape[-1]), int(inp[0].shape[-1])))))
        hooks.append(block.register_forward_hook(record((layer, ""))))
    try:
        model(input_ids=input_ids.to(next(model.parameters()).device))
    finally:
        for h in hooks:
            h.remove()
    stream = {widths.get((i, "")) for i in range(len(blocks))}
    if len(stream) != 1 or None in stream:
        raise InputError(f"the model ({arch})'s blocks in {path} do not all return one stream width: {UNSUPPORTED}")
    width = stream.pop()
    last: dict[tuple[int, str], tuple[str, int]] = {}
    for layer, child, module, out_w, in_w in calls:
        if out_w == width:
            last[(layer, child)] = (module, in_w)
    for layer, block in enumerate(blocks):
        for child_name, child in block.named_children():
            has_matrix = any(p.dim() >= 2 for p in child.parameters())
            if has_matrix and widths.get((layer, child_name)) == width and (layer, child_name) not in last:
                raise InputError(f"the model ({arch}): no linear module of {path}.{layer}.{child_name} writes into "
                                 f"the stream: {UNSUPPORTED}")
    writers = [Writer(module, layer, child, in_w)  # by layer, then in call order
               for (layer, child), (module, in_w) in sorted(last.items(), key=lambda kv: kv[0][0])]
    if not writers:
        raise InputError(f"the model ({arch}): no linear module in {path} writes into the stream: {UNSUPPORTED}")
    inside = {id(m) for m in blocks.modules()}
    embeddings = [name for name, m in model.named_modules()  # token and position tables feeding the first block
                  if isinstance(m, nn.Embedding) and m.embedding_dim == width and id(m) not in inside]
    return Residual(blocks=path, n_layers=len(blocks), d_model=width, writers=writers, embeddings=embeddings)


@dataclass
class Collected:
    """Last-token activations of a batch of prompts."""

    states: Tensor  # (n, L, d) float32: the output of every block at the last token
    scores: Tensor  # (n,) float64: first-token refusal log-odds
    input_means: dict[str, Tensor] = field(default_factory=dict)  # writer module -> (in,) float64 mean input


@torch.no_grad()
def collect(model: nn.Module, tokenizer, texts: list[str], blocks: nn.ModuleList, start_ids: Tensor, *,
            batch_size: int = 16, inputs_of: dict[str, nn.Module] | None = None, desc: str = "activations") -> Collected:
    """One forward pass per batch of chat-formatted ``texts`` (``scorers.last_position_logits``):
    every block's output at the last token, the first-token refusal log-odds there
    (``scorers.refusal_log_odds`` of ``start_ids``), and with ``inputs_of`` the mean last-token input
    of those modules."""
    states: list[Tensor] = []
    batch: dict[int, Tensor] = {}
    sums = {k: torch.zeros(0, dtype=torch.float64) for k in (inputs_of or {})}
    hooks = [b.register_forward_hook(lambda mod, inp, out, i=i: batch.__setitem__(i, _hidden(out)[:, -1, :].float()))
             for i, b in enumerate(blocks)]
    for key, m in (inputs_of or {}).items():
        def add(mod, inp, key=key):
            x = inp[0][:, -1, :].double().sum(dim=0).cpu()  # (in,)
            sums[key] = x if sums[key].numel() == 0 else sums[key] + x
        hooks.append(m.register_forward_pre_hook(add))
    scores: list[Tensor] = []
    try:
        for logits in last_position_logits(model, tokenizer, texts, batch_size=batch_size, desc=desc):
            scores.append(refusal_log_odds(logits, start_ids.to(logits.device)).double().cpu())
            states.append(torch.stack([batch[j] for j in range(len(blocks))], dim=1).cpu())  # (b, L, d)
            batch.clear()
    finally:
        for h in hooks:
            h.remove()
    n = max(len(texts), 1)
    return Collected(states=torch.cat(states), scores=torch.cat(scores),
                     input_means={k: v / n for k, v in sums.items()})


@dataclass
class Direction:
    """The refusal direction of every layer and how far to trust it."""

    r: Tensor  # (L, d) float64: mean_harmful - mean_harmless
    unit: Tensor  # (L, d) float64: r / ||r||
    separation: Tensor  # (L,) ||r_l||
    stability: Tensor  # (L,) split-half cosine
    dprime: Tensor  # (L,) in-sample d'
    n_harmful: int
    n_harmless: int

    @property
    def stable(self) -> Tensor:
        """(L,) bool: layers whose direction is stable enough to measure against."""
        return self.stability >= STABLE_COS


def _diff(h: Tensor, b: Tensor) -> Tensor:
    return h.double().mean(dim=0) - b.double().mean(dim=0)  # (L, d)


def refusal_direction(harmful: Tensor, harmless: Tensor) -> Direction:
    """The direction and its quality (module docstring) from last-token states (n, L, d) of the
    harmful and the harmless prompts."""
    r = _diff(harmful, harmless)
    sep = r.norm(dim=-1)
    unit = r / sep.clamp_min(1e-300)[:, None]
    even, odd = _diff(harmful[0::2], harmless[0::2]), _diff(harmful[1::2], harmless[1::2])
    stability = torch.nn.functional.cosine_similarity(even, odd, dim=-1)
    ph = torch.einsum("nld,ld->nl", harmful.double(), unit)  # (n_h, L) projections
    pb = torch.einsum("nld,ld->nl", harmless.double(), unit)
    pooled = ((ph.var(dim=0) * (len(ph) - 1) + pb.var(dim=0) * (len(pb) - 1)) / max(len(ph) + len(pb) - 2, 1)).sqrt()
    dprime = (ph.mean(dim=0) - pb.mean(dim=0)) / pooled.clamp_min(1e-300)
    return Direction(r=r, unit=unit, separation=sep, stability=stability, dprime=dprime,
                     n_harmful=len(harmful), n_harmless=len(harmless))


def prompts_needed(n: int, stability: float, target: float = STABLE_COS) -> int | None:
    """About how many prompts per set give a split-half cosine of ``target``, from the one measured
    with ``n`` per set. The error of a mean difference shrinks as 1/m with m prompts, so the
    signal-to-noise ratio rho = ||r||^2 / E||noise||^2 of a half grows linearly with m, and two
    independent halves have cos ~ rho / (1 + rho). None when the measured cosine says nothing
    (<= 0): far more prompts, or no direction at all."""
    if stability <= 0:
        return None
    rho_half = stability / (1 - stability) if stability < 1 else math.inf
    want = target / (1 - target)
    return n if rho_half >= want else int(math.ceil(n * want / rho_half - 1e-9))
