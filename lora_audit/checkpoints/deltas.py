"""The one idea at the centre: a stream of (name, W0, delta) for every weight base and tuned share.

Every matrix is in (out x in) orientation, the nn.Linear layout, so that left singular vectors
live in the layer's output space. Loaders transpose GPT-2 Conv1D weights (stored in x out) and
embedding matrices' LoRA deltas before they get here; the engine never sees a file.

A delta stays in the form the checkpoint stores it in: a LoRA adapter stays factored
(``LowRank``), which is what lets the spectral engine take its fast path instead of
materialising W0 + s·B·A.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import Tensor


@dataclass(frozen=True)
class Dense:
    """A tuned matrix given in full (full fine-tuning, merged models, modules_to_save)."""

    tuned: Tensor  # W1, (out, in)

    def merged(self, base: Tensor) -> Tensor:
        return self.tuned

    def update(self, base: Tensor) -> Tensor:
        """dW = W1 - W0."""
        return self.tuned - base

    def to(self, device=None, dtype=None) -> Dense:
        return Dense(self.tuned.to(device=device, dtype=dtype))


@dataclass(frozen=True)
class LowRank:
    """W1 = W0 + scale · B @ A (LoRA, rsLoRA, LoRA-SB with B·R, converted LoRA-GA).

    ``scale`` is already resolved by the loader (alpha/r, alpha/sqrt(r) for rsLoRA, the
    rank/alpha patterns, kohya's per-module alpha).
    """

    B: Tensor  # (out, r)
    A: Tensor  # (r, in)
    scale: float

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def update(self, base: Tensor | None = None) -> Tensor:
        # (out, r) @ (r, in) -> (out, in)
        return self.scale * (self.B @ self.A)

    def merged(self, base: Tensor) -> Tensor:
        return base + self.update(base).to(base.dtype)

    def to(self, device=None, dtype=None) -> LowRank:
        return replace(self, B=self.B.to(device=device, dtype=dtype), A=self.A.to(device=device, dtype=dtype))


@dataclass(frozen=True)
class DoRA:
    """Weight-decomposed low-rank adaptation (Liu et al. 2024), PEFT's convention:

        V  = W0 + scale · B @ A                  (out, in)
        W1 = magnitude[:, None] · V / ||V||_row  (norm over the input dimension, per output row)
    """

    B: Tensor  # (out, r)
    A: Tensor  # (r, in)
    scale: float
    magnitude: Tensor  # (out,)

    @property
    def rank(self) -> int:
        return int(self.A.shape[0])

    def merged(self, base: Tensor) -> Tensor:
        V = base + self.scale * (self.B @ self.A)  # (out, in)
        norm = V.norm(p=2, dim=1, keepdim=True)  # (out, 1)
        return self.magnitude.to(V.dtype).unsqueeze(1) * V / norm

    def update(self, base: Tensor) -> Tensor:
        return self.merged(base) - base

    def to(self, device=None, dtype=None) -> DoRA:
        return replace(self, B=self.B.to(device=device, dtype=dtype), A=self.A.to(device=device, dtype=dtype),
                       magnitude=self.magnitude.to(device=device, dtype=dtype))


Delta = Dense | LowRank | DoRA


@dataclass
class MatrixGroup:
    """One base matrix and what each tuned model did to it.

    ``deltas[i]`` belongs to the i-th tuned source; ``None`` means that model left this
    matrix unchanged (or does not touch it). The base tensor is float32 (or float64 when
    asked), in (out x in) orientation.
    """

    name: str  # the BASE model's parameter name, e.g. "model.layers.0.self_attn.q_proj.weight"
    base: Tensor  # W0, (out, in)
    deltas: list[Delta | None]
    kind: str = "linear"  # "linear" | "embedding" | "conv" (kernels reshaped to out x in*k) | "expert"
    transposed: bool = False  # the stored tensor was (in x out) (GPT-2 Conv1D, some expert stacks)
    notes: list[str] = field(default_factory=list)
    reshaped_from: tuple[int, ...] | None = None  # a conv kernel's stored shape
    expert: int | None = None  # the expert of a fused (experts x out x in) stack; the name ends "[e]"
    dequantization: dict | None = None  # quantisation error record of a quantised base (checkpoints.quantized)
    origin: tuple | None = None  # (file, identity, stored name, how W0 was taken from it): WeightSource.origin

    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.base.shape[0]), int(self.base.shape[1]))


def materialize(delta: Delta, base: Tensor) -> Tensor:
    """W1 for any delta type (float32 unless the inputs are float64)."""
    return delta.merged(base)


def is_changed(delta: Delta | None, base: Tensor) -> bool:
    """False when the delta leaves W0 exactly as it was (a zero-initialised, untrained B)."""
    if delta is None:
        return False
    if isinstance(delta, Dense):
        return not torch.equal(delta.tuned, base)
    if isinstance(delta, LowRank):
        return delta.scale != 0 and bool(delta.B.abs().amax() > 0) and bool(delta.A.abs().amax() > 0)
    return True
