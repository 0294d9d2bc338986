"""Weight-only signals: how much a TUNED update writes along BASE's refusal direction, read from
the weights alone (no forward pass of TUNED).

For a matrix W (d_model x n, the nn.Linear layout) that writes into the residual stream after
block l (``direction.Residual``), its update dW = W1 - W0 and the unit refusal direction r̂ of
that stream (``direction.Direction.unit[l]``):

  energy share   e = ||r̂^T dW||^2 / ||dW||_F^2, in [0, 1]. An update with no preferred output
                 direction has e = 1/d_model in expectation; an abliteration edit
                 dW = -r̂ r̂^T W has e = 1. Also given as the ratio to chance, e * d_model.
  shift          s = r̂^T dW (x̄_H - x̄_B), with x̄_H, x̄_B BASE's mean last-token input of W on the
                 harmful and harmless prompts (``profile.BaseProfile.writer_input_shift``): to
                 first order, how much the update changes the harmful-minus-harmless separation
                 along r̂ that W writes. Its sign is the update's sign relative to that mean
                 difference: negative pulls harmful prompts toward harmless ones. Measured against
                 W's own contribution c = r̂^T W0 (x̄_H - x̄_B): the abliteration edit has s = -c.
  top cosine     |cos(u_1, r̂)|, u_1 the top left singular vector of dW.
  rank-1 share   sigma_1^2 / ||dW||_F^2 (every changed matrix, writer or not).

A LoRA update dW = s B A (B: d x r, A: r x n) stays factored:

  r̂^T dW = s (r̂^T B) A                               O(d r + r n)
  B = Qb Rb, A^T = Qa Ra  =>  dW = Qb (s Rb Ra^T) Qa^T    singular values and u_1 = Qb U_core[:, 0]
                                                          from the r x r core (spectral.metrics)

so no d x n (let alone d x d) product is formed. Dense updates (full fine-tuning) and DoRA (which
rescales every row, so its update is not low rank) are formed as dW = W1 - W0, the matrix's own
size, and their top singular pair found by block Krylov (``spectral.krylov.topk_svd``).

Per model (``aggregate``), over the writers of the layers whose direction is stable
(``direction.STABLE_COS``):

  refusal_energy_share       sum ||r̂^T dW||^2 / sum ||dW||_F^2
  refusal_energy_ratio       that share x d_model (1 = chance)
  refusal_energy_max_ratio   the largest per-layer ratio
  weight_shift               sum s / sum |c| over the changed writers: the share of the separation
                             BASE's writers add that the update takes away, to first order
                             (-1: all of it; negative: toward compliance)
  top_cos_max                the largest |cos(u_1, r̂)|
  rank1_share                ||dW||^2-weighted mean rank-1 share of every changed matrix

An update that changes no writer (a LoRA on q_proj and v_proj only) writes nothing into the stream
directly: its first five signals are 0, and they say nothing about what it does through attention
patterns (the forward-pass signals do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..checkpoints.deltas import Delta, LowRank
from ..spectral.krylov import topk_svd

DENSE_FLOAT64_MAX = 2**24  # dense updates up to this many entries are measured in float64


@dataclass
class MatrixStats:
    """One changed matrix of one tuned model."""

    name: str
    layer: int | None  # the writer's layer; None for matrices that do not write into the stream
    frob2: float  # ||dW||_F^2
    sigma1_2: float  # sigma_1(dW)^2
    r_energy: float | None = None  # ||r̂^T dW||^2 (writers)
    shift: float | None = None  # r̂^T dW (x̄_H - x̄_B) (writers)
    base_shift: float | None = None  # r̂^T W0 (x̄_H - x̄_B): the writer's own contribution (writers)
    top_cos: float | None = None  # |cos(u_1, r̂)| (writers)

    @property
    def energy_share(self) -> float | None:
        if self.r_energy is None or self.frob2 <= 0:
            return None
        return self.r_energy / self.frob2

    @property
    def rank1_share(self) -> float | None:
        return self.sigma1_2 / self.frob2 if self.frob2 > 0 else None


def lowrank_top(B: Tensor, A: Tensor, scale: float) -> tuple[float, float, Tensor]:
    """(||dW||_F^2, sigma_1^2, u_1) of dW = scale * B @ A, from the r x r core (float64)."""
    Qb, Rb = torch.linalg.qr(B.double(), mode="reduced")  # (d, r'), (r', r)
    _, Ra = torch.linalg.qr(A.double().T, mode="reduced")  # (n, r''), (r'', r)
    core = scale * (Rb @ Ra.T)  # (r', r) @ (r, r'') -> (r', r'')
    U, S, _ = torch.linalg.svd(core)
    return float((S * S).sum()), float(S[0] ** 2) if S.numel() else 0.0, Qb @ U[:, 0]  # (d, r') @ (r',) -> (d,)


def dense_top(dW: Tensor) -> tuple[float, float, Tensor]:
    """(||dW||_F^2, sigma_1^2, u_1) of a dense update, its top pair by block Krylov with a residual
    check (an exact SVD when that does not converge)."""
    frob2 = float(torch.linalg.vector_norm(dW, dtype=torch.float64) ** 2)
    if frob2 == 0.0:
        return 0.0, 0.0, torch.zeros(dW.shape[0], dtype=torch.float64)
    gen = torch.Generator().manual_seed(0)
    X0 = torch.randn(dW.shape[0], 4, generator=gen, dtype=dW.dtype)
    tol = 1e-10 if dW.dtype == torch.float64 else 1e-5
    top = topk_svd(lambda X: dW @ X, lambda Y: dW.T @ Y, X0, 1, tol=tol)
    if not top.converged:
        U, S, _ = torch.linalg.svd(dW, full_matrices=False)
        return frob2, float(S[0]) ** 2, U[:, 0].double()
    return frob2, float(top.S[0]) ** 2, top.U[:, 0].double()


def _dense_update(delta: Delta, W0: Tensor) -> Tensor:
    dW = delta.update(W0)
    return dW.double() if dW.numel() <= DENSE_FLOAT64_MAX else dW.float()


def matrix_stats(name: str, delta: Delta, W0: Tensor, *, layer: int | None = None, r: Tensor | None = None,
                 dx: Tensor | None = None) -> MatrixStats | None:
    """The signals of one changed matrix (module docstring); ``r`` (unit, (d,)) and ``dx`` ((n,))
    for a writer of ``layer``. None when a value is not finite (NaN/Inf weights, an overflow)."""
    if isinstance(delta, LowRank):
        frob2, s1, u1 = lowrank_top(delta.B, delta.A, float(delta.scale))
        rdW = None if r is None else float(delta.scale) * ((r.double() @ delta.B.double()) @ delta.A.double())  # (n,)
    else:
        dW = _dense_update(delta, W0)
        frob2, s1, u1 = dense_top(dW)
        rdW = None if r is None else (r.to(dW.dtype) @ dW).double()  # (d,) @ (d, n) -> (n,)
    out = MatrixStats(name=name, layer=layer if r is not None else None, frob2=frob2, sigma1_2=s1)
    if r is not None:
        out.r_energy = float(rdW @ rdW)
        if dx is not None:
            out.shift = float(rdW @ dx.double())
            out.base_shift = float((r.to(W0.dtype) @ W0).double() @ dx.double())  # (d,) @ (d, n) @ (n,)
        norm = float(u1.norm())
        out.top_cos = abs(float(u1 @ r.double())) / norm if norm > 0 else 0.0
    values = [frob2, s1] + [v for v in (out.r_energy, out.shift, out.base_shift, out.top_cos) if v is not None]
    return out if all(math.isfinite(v) for v in values) else None


@dataclass
class LayerWeights:
    layer: int
    frob2: float = 0.0
    r_energy: float = 0.0
    shift: float = 0.0
    base_shift: float = 0.0  # sum of |c| of the layer's changed writers
    top_cos: float = 0.0
    writers: int = 0


@dataclass
class WeightSignals:
    """Per model aggregates (module docstring) and per-layer sums."""

    signals: dict[str, float | None]
    layers: dict[int, LayerWeights] = field(default_factory=dict)
    matrices_changed: int = 0
    writers_changed: int = 0


def aggregate(stats: list[MatrixStats], stable: Tensor, d_model: int) -> WeightSignals:
    """The per-model signals from every changed matrix's stats; ``stable`` (L,) bool: the layers
    that count."""
    layers: dict[int, LayerWeights] = {}
    for s in stats:
        if s.layer is None:
            continue
        lw = layers.setdefault(s.layer, LayerWeights(s.layer))
        lw.frob2 += s.frob2
        lw.r_energy += s.r_energy or 0.0
        lw.shift += s.shift or 0.0
        lw.base_shift += abs(s.base_shift or 0.0)
        lw.top_cos = max(lw.top_cos, s.top_cos or 0.0)
        lw.writers += 1
    used = [lw for lw in layers.values() if bool(stable[lw.layer]) and lw.frob2 > 0]
    frob, energy = sum(lw.frob2 for lw in used), sum(lw.r_energy for lw in used)
    share = energy / frob if frob > 0 else 0.0  # no writer changed: nothing written along r directly
    own = sum(lw.base_shift for lw in used)
    total = sum(s.frob2 for s in stats)
    signals = {
        "refusal_energy_share": share,
        "refusal_energy_ratio": share * d_model,
        "refusal_energy_max_ratio": max((lw.r_energy / lw.frob2 * d_model for lw in used), default=0.0),
        "weight_shift": sum(lw.shift for lw in used) / own if own > 0 else 0.0,
        "top_cos_max": max((lw.top_cos for lw in used), default=0.0),
        "rank1_share": sum(s.sigma1_2 for s in stats) / total if total > 0 else None,
    }
    return WeightSignals(signals=signals, layers=layers, matrices_changed=len(stats),
                         writers_changed=sum(lw.writers for lw in layers.values()))
