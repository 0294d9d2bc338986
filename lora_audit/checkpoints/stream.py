"""The stream the spectral engine eats: one ``MatrixGroup`` (name, W0, a delta per tuned model)
at a time, for every matrix the base shares with at least one tuned model.

``open_stream`` reads only headers and configs, and checks everything a user can get wrong
(missing paths, corrupted files, adapters that do not fit the base, nothing in common) before
the first matrix is read, so a command fails before any work and writes nothing. Iterating
then reads one base tensor (and the matching tuned tensors or adapter factors) at a time, in
the base's index order: memory stays near a few matrices whatever the model size.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import torch

from ..errors import InputError, ShapeMismatchError
from .adapters import AdapterFile, match_adapter, read_adapter
from .deltas import Delta, Dense, DoRA, LowRank, MatrixGroup
from .detect import Kind
from .sources import WeightSource, local_path, open_weights

# Parameter-name pieces of input/output embeddings and LM heads (excluded unless asked for).
EMBEDDING_PARTS = ("embed_tokens", "wte", "wpe", "word_embeddings", "position_embeddings", "embed_positions",
                   "token_embedding", "tok_embeddings", "embed_in", "shared")
HEAD_PARTS = ("lm_head", "embed_out", "output")
# Models whose attention/MLP weights are transformers' Conv1D, stored (in x out).
CONV1D_MODEL_TYPES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")
CONV1D_MODULES = ("c_attn", "c_proj", "c_fc", "q_attn")


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


@dataclass
class _Tuned:
    path: str
    kind: Kind
    weights: WeightSource | None = None  # dense tuned models
    adapter: AdapterFile | None = None  # adapters
    module_of: dict[str, str] = field(default_factory=dict)  # base name -> adapter module
    replacement_of: dict[str, str] = field(default_factory=dict)  # base name -> tensor key (modules_to_save)
    info: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class AuditStream:
    """Iterable of MatrixGroup; ``info[i]``/``warnings[i]`` describe the i-th tuned source."""

    def __init__(self, base: str, tuned: list[str], base_source: WeightSource, specs: list[_Tuned],
                 plan: list[str], transposed: set[str], dtype: torch.dtype, base_warnings: list[str]):
        self.base, self.tuned = base, tuned
        self.base_source = base_source
        self._specs, self._plan, self._transposed, self.dtype = specs, plan, transposed, dtype
        self.info = [s.info for s in specs]
        self.warnings = [s.warnings for s in specs]
        self.base_warnings = base_warnings

    def __len__(self) -> int:
        return len(self._plan)

    @property
    def names(self) -> list[str]:
        return list(self._plan)

    def __iter__(self) -> Iterator[MatrixGroup]:
        for name in self._plan:
            group = self._group(name)
            if any(d is not None for d in group.deltas):
                yield group

    def base_matrix(self, name: str) -> torch.Tensor:
        """The base parameter ``name`` as the stream's groups carry it: (out x in), in the stream's
        dtype. Any 2-D (or conv) base parameter, also one outside this stream's plan."""
        return self._orient(name, self.base_source.get(name))

    def _orient(self, name: str, t: torch.Tensor) -> torch.Tensor:
        if t.dim() == 4:  # conv kernel (out, in, kh, kw) -> (out, in*kh*kw)
            t = t.reshape(t.shape[0], -1)
        if name in self._transposed:
            t = t.T
        return t.to(self.dtype).contiguous()

    def _group(self, name: str) -> MatrixGroup:
        raw = self.base_source.get(name)
        W0 = self._orient(name, raw)
        deltas: list[Delta | None] = []
        for spec in self._specs:
            deltas.append(self._delta(spec, name, raw))
        kind = "embedding" if is_embedding(name) else ("conv" if raw.dim() == 4 else "linear")
        return MatrixGroup(name=name, base=W0, deltas=deltas, kind=kind, transposed=name in self._transposed)

    def _delta(self, spec: _Tuned, name: str, raw: torch.Tensor) -> Delta | None:
        if spec.weights is not None:
            if name not in spec.weights:
                return None
            t = spec.weights.get(name)
            if t.shape == raw.shape and t.dtype == raw.dtype and torch.equal(t, raw):
                return None
            return Dense(self._orient(name, t))
        if name in spec.replacement_of:
            return Dense(self._orient(name, spec.adapter.tensor(spec.replacement_of[name])))
        module = spec.module_of.get(name)
        if module is None:
            return None
        B, A, mag = spec.adapter.factors(module)
        s = spec.adapter.scale(module)
        B, A = B.to(self.dtype), A.to(self.dtype)
        if mag is not None:
            return DoRA(B=B, A=A, scale=s, magnitude=mag.to(self.dtype))
        return LowRank(B=B, A=A, scale=s)


def open_stream(base: str | os.PathLike, tuned: list[str | os.PathLike], *, include_embeddings: bool = False,
                dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> AuditStream:
    """Open BASE and every TUNED (full models or adapters on BASE), validate, and plan the stream.

    Raises InputError / FormatError / ShapeMismatchError (user-facing messages) before any
    tensor data is read.
    """
    if not tuned:
        raise InputError("no TUNED model given")
    base = str(base)
    base_src = open_weights(base, allow_pickle=allow_pickle)
    shapes = {n: tuple(base_src.shape(n)) for n in base_src.names()}
    transposed = conv1d_weights(shapes, base_src.model_type)
    analysable = [n for n, shape in shapes.items() if len(shape) in (2, 4)
                  and (include_embeddings or not (is_embedding(n) or is_head(n)))]
    specs: list[_Tuned] = []
    for t in tuned:
        path, kind = local_path(t)
        spec = _Tuned(str(t), kind)
        if kind in (Kind.PEFT_ADAPTER, Kind.KOHYA_LORA):
            spec.adapter = read_adapter(path)
            spec.info, spec.warnings = spec.adapter.info(), list(spec.adapter.warnings)
            _map_adapter(spec, base, shapes, set(analysable), transposed)
        else:
            spec.weights = open_weights(path, allow_pickle=allow_pickle)
            spec.info = {"kind": kind.value, "model_type": spec.weights.model_type}
            _check_dense(spec, base, base_src, analysable, transposed)
        specs.append(spec)

    touched: set[str] = set()
    for spec in specs:
        touched |= set(spec.module_of) | set(spec.replacement_of)
        if spec.weights is not None:
            touched |= {n for n in analysable if n in spec.weights}
    plan = [n for n in analysable if n in touched]
    if not plan:
        hint = "" if include_embeddings else " (embeddings and lm_head are skipped unless --include-embeddings)"
        raise InputError(f"base {base} and the tuned model(s) have no 2-D weight matrix in common to audit{hint}")
    base_warnings = []
    if transposed:
        base_warnings.append(f"{len(transposed)} Conv1D weights (stored in x out) are analysed transposed, as (out x in)")
    return AuditStream(base, [str(t) for t in tuned], base_src, specs, plan, transposed, dtype, base_warnings)


def _map_adapter(spec: _Tuned, base: str, shapes: dict[str, tuple[int, ...]], analysable: set[str],
                 transposed: set[str]) -> None:
    """Fill spec.module_of / replacement_of with the analysable base matrices the adapter changes."""
    match = match_adapter(spec.adapter, shapes, transposed=transposed, base=f"base {base}")
    spec.module_of = {n: m for n, m in match.module_of.items() if n in analysable}
    spec.replacement_of = {n: k for n, k in match.replacement_of.items() if n in analysable}
    skipped = len(match.module_of) - len(spec.module_of)
    if skipped:
        spec.warnings.append(f"{skipped} adapted embedding/lm_head module(s) not audited (use --include-embeddings)")


def _check_dense(spec: _Tuned, base: str, base_src: WeightSource, analysable: list[str], transposed: set[str]) -> None:
    w = spec.weights
    common = [n for n in analysable if n in w]
    bad = [f"{n}: tuned {tuple(w.shape(n))} vs base {tuple(base_src.shape(n))}" for n in common
           if tuple(w.shape(n)) != tuple(base_src.shape(n))]
    if bad:
        raise ShapeMismatchError(f"tuned {spec.path} does not fit base {base}: {len(bad)} matrices differ in shape:\n  "
                                 + "\n  ".join(bad[:10]) + _more(bad) + "\nAre they the same architecture?")
    if not common:
        raise InputError(f"tuned {spec.path} shares no weight name with base {base}; are they the same architecture "
                         "(and both in Hugging Face naming)?")
    missing = [n for n in analysable if n not in w]
    if missing:
        spec.warnings.append(f"{len(missing)} base matrices absent from the tuned model (e.g. {missing[0]}); not audited")


def _more(items: list, shown: int = 10) -> str:
    return f" (and {len(items) - shown} more)" if len(items) > shown else ""
