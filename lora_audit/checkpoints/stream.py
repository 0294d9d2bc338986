"""The stream the spectral engine eats: one ``MatrixGroup`` (name, W0, a delta per tuned model)
at a time, for every matrix the base shares with at least one tuned model.

``open_stream`` reads only headers and configs, and checks everything a user can get wrong
(missing paths, corrupted files, adapters that do not fit the base, nothing in common) before
the first matrix is read, so a command fails before any work and writes nothing. Iterating
then reads one base tensor (and the matching tuned tensors or adapter factors) at a time, in
the base's index order: memory stays near a few matrices whatever the model size.

Which tensors are matrices and how each is read as (out x in) is ``layout.plan_matrices``
(2-D weights, conv kernels reshaped, one matrix per expert of a fused stack). An adapter set
(MixLoRA, X-LoRA) is audited as one tuned model per member, labelled ``<path>#<member>``, with
the similarity of the members' updates in each member's ``info``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from ..errors import InputError, ShapeMismatchError
from ..text import printable
from .adapter_sets import is_adapter_set, read_adapter_set, update_similarity
from .adapters import AdapterFile, AdapterMatch, match_adapter, read_adapter
from .deltas import Delta, Dense, DoRA, LowRank, MatrixGroup
from .detect import Kind
from .layout import (CONV1D_MODEL_TYPES, CONV1D_MODULES, EMBEDDING_PARTS, HEAD_PARTS, Matrix,  # noqa: F401
                     conv1d_weights, is_embedding, is_head, plan_matrices, strip_expert)
from .sources import WeightSource, local_path, open_weights

_PER_EXPERT = re.compile(r"\.experts\.(\d+)\.")


@dataclass
class _Tuned:
    path: str  # the TUNED argument
    label: str  # its result's label: the path, or "<path>#<member>" for a member of an adapter set
    kind: Kind
    weights: WeightSource | None = None  # dense tuned models
    adapter: AdapterFile | None = None  # adapters
    match: AdapterMatch = field(default_factory=lambda: AdapterMatch({}, {}))
    info: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


class AuditStream:
    """Iterable of MatrixGroup; ``info[i]``/``warnings[i]`` describe the i-th tuned result and
    ``tuned[i]`` is its label."""

    def __init__(self, base: str, base_source: WeightSource, specs: list[_Tuned], plan: list[Matrix],
                 dtype: torch.dtype, base_warnings: list[str], layout: dict[str, Matrix] | None = None):
        self.base, self.tuned = base, [s.label for s in specs]
        self.sources = [s.path for s in specs]  # the TUNED argument each result comes from
        self.base_source = base_source
        self._specs, self._plan, self.dtype = specs, plan, dtype
        self.info = [s.info for s in specs]
        self.warnings = [s.warnings for s in specs]
        self.base_warnings = base_warnings
        self._last: dict[int, tuple[str, torch.Tensor]] = {}  # source -> its last tensor (expert stacks)
        self._layout = layout if layout is not None else {m.name: m for m in plan}  # every plannable matrix

    def __len__(self) -> int:
        return len(self._plan)

    @property
    def names(self) -> list[str]:
        return [m.name for m in self._plan]

    def __iter__(self) -> Iterator[MatrixGroup]:
        for m in self._plan:
            group = self._group(m)
            if any(d is not None for d in group.deltas):
                yield group

    def skip_untouched(self, which) -> None:
        """Leave out of the iteration the planned matrices that ``which(matrix)`` selects and no tuned
        model can change: an adapter without factors or a replacement for them, a dense model
        without the tensor (a dense model holding it is kept: only reading tells whether it
        changed). Their base tensors are then never read (an embedding table no adapter touches)."""
        def touched(m: Matrix) -> bool:
            for spec in self._specs:
                if spec.weights is not None and m.param in spec.weights:
                    return True
                if spec.weights is None and (m.param in spec.match.replacement_of or m.name in spec.match.module_of):
                    return True
            return False

        self._plan = [m for m in self._plan if not which(m) or touched(m)]

    def _read(self, source: WeightSource, param: str) -> torch.Tensor:
        """``source.get(param)``, kept while consecutive matrices (the experts of a stack) need it."""
        last = self._last.get(id(source))
        if last is None or last[0] != param:
            last = (param, source.get(param))
            self._last[id(source)] = last
        return last[1]

    @property
    def all_names(self) -> list[str]:
        """Every matrix of the base the audit could plan (not only those this stream's tuned models
        touch), in the base's order."""
        return list(self._layout)

    def base_matrix(self, name: str) -> torch.Tensor:
        """The base matrix ``name`` (one of ``all_names``) as the stream's groups carry it: (out x in),
        in the stream's dtype."""
        m = self._layout[name]
        return m.take(self._read(self.base_source, m.param)).to(self.dtype).contiguous()

    def _group(self, m: Matrix) -> MatrixGroup:
        raw = self._read(self.base_source, m.param)
        W0 = m.take(raw).to(self.dtype).contiguous()
        deltas: list[Delta | None] = [self._delta(spec, m, raw) for spec in self._specs]
        note = self.base_source.note(m.param)
        dequantization = self.base_source.dequantization(m.param)
        stored = self.base_source.origin(m.param) if dequantization is None else None
        # W0 is a function of one stored tensor's bytes, named by how it was taken from them (the
        # expert, reshape, transpose and conversion): the same file bytes give the same W0
        how = f"{raw.dtype}|{list(raw.shape)}|expert={m.expert}|transposed={bool(m.transposed)}|{self.dtype}"
        return MatrixGroup(name=m.name, base=W0, deltas=deltas, kind=m.kind, transposed=m.transposed,
                           notes=[note] if note else [], reshaped_from=m.reshaped_from, expert=m.expert,
                           dequantization=dequantization, origin=(*stored, how) if stored is not None else None)

    def _delta(self, spec: _Tuned, m: Matrix, raw: torch.Tensor) -> Delta | None:
        if spec.weights is not None:
            if m.param not in spec.weights:
                return None
            t = self._read(spec.weights, m.param)
            a, b = (t[m.expert], raw[m.expert]) if m.expert is not None else (t, raw)
            if a.shape == b.shape and a.dtype == b.dtype and torch.equal(a, b):
                return None
            return Dense(m.take(t).to(self.dtype).contiguous())
        if m.param in spec.match.replacement_of and m.expert is None:
            t = spec.adapter.tensor(spec.match.replacement_of[m.param])  # type: ignore[union-attr]
            if t.shape == raw.shape and t.dtype == raw.dtype and torch.equal(t, raw):
                return None  # saved unchanged (peft copies every modules_to_save tensor)
            return Dense(m.take(t).to(self.dtype).contiguous())
        module = spec.match.module_of.get(m.name)
        if module is None:
            return None
        B, A, mag = spec.adapter.factors(module, spec.match.expert_of.get(m.name))  # type: ignore[union-attr]
        if m.name in spec.match.flipped:  # the analysed matrix is (B A)^T = A^T B^T
            B, A = A.T, B.T
        s = spec.adapter.scale(module)  # type: ignore[union-attr]
        B, A = B.to(self.dtype), A.to(self.dtype)
        if spec.adapter.modules[module].dora:  # type: ignore[union-attr]
            if mag is None:  # use_dora without a saved magnitude: PEFT starts it at the base's row norms
                mag = m.take(raw).to(self.dtype).norm(dim=1)  # (out,)
            return DoRA(B=B, A=A, scale=s, magnitude=mag.to(self.dtype))
        return LowRank(B=B, A=A, scale=s)


def open_stream(base: str | os.PathLike, tuned: list[str | os.PathLike], *, include_embeddings: bool = False,
                dtype: torch.dtype = torch.float32, allow_pickle: bool = False) -> AuditStream:
    """Open BASE and every TUNED (full models, adapters or adapter sets on BASE), validate, and plan
    the stream.

    When an adapter names parameters as transformers builds the model in memory rather than as the
    files store them (fused MoE experts over per-expert files: transformers renames and fuses on
    load), the base is read through transformers instead, and a base warning says so.

    Raises InputError / FormatError / ShapeMismatchError (user-facing messages) before any
    tensor data is read.
    """
    if not tuned:
        raise InputError("no TUNED model given")
    base = str(base)
    base_src = open_weights(base, allow_pickle=allow_pickle)
    try:
        return _open(base, base_src, tuned, include_embeddings, dtype, allow_pickle, loaded=False)
    except ShapeMismatchError:
        alt = _loaded_source(base, base_src)
        if alt is None:
            raise
        try:
            stream = _open(base, alt, tuned, include_embeddings, dtype, allow_pickle, loaded=True)
        except ShapeMismatchError:
            pass
        else:
            stream.base_warnings.append("the adapter names parameters as transformers builds the model (renamed or "
                                        "fused on load), so the base was read through transformers")
            return stream
        raise


def _open(base: str, base_src: WeightSource, tuned, include_embeddings: bool, dtype: torch.dtype,
          allow_pickle: bool, loaded: bool) -> AuditStream:
    shapes = {n: tuple(base_src.shape(n)) for n in base_src.names()}
    plan, plan_skipped = plan_matrices(shapes, base_src.config, include_embeddings=include_embeddings)
    specs: list[_Tuned] = []
    for t in tuned:
        path, kind = local_path(t)
        if kind == Kind.PEFT_ADAPTER and is_adapter_set(path):
            specs += _open_set(str(t), path, base, shapes, base_src.config, plan)
        elif kind in (Kind.PEFT_ADAPTER, Kind.KOHYA_LORA, Kind.DIFFUSERS_LORA):
            spec = _Tuned(str(t), str(t), kind, adapter=read_adapter(path))
            _map_adapter(spec, base, shapes, base_src.config, plan)
            similarity = _expert_similarity(spec)
            if similarity:
                spec.info["expert_similarity"] = similarity
            specs.append(spec)
        else:
            weights = open_weights(path, allow_pickle=allow_pickle)
            if loaded:
                weights = _loaded_source(str(path), weights) or weights
            spec = _Tuned(str(t), str(t), kind, weights=weights)
            spec.info = {"kind": kind.value, "format": spec.weights.format, "model_type": spec.weights.model_type}  # type: ignore[union-attr]
            _check_dense(spec, base, base_src, plan, plan_skipped)
            specs.append(spec)
    for spec in specs:
        spec.info["base_format"] = base_src.format
    touched: set[str] = set()
    for spec in specs:
        touched |= set(spec.match.module_of) | {m.name for m in plan.values() if m.param in spec.match.replacement_of}
        if spec.weights is not None:
            touched |= {m.name for m in plan.values() if m.param in spec.weights}
    order = [m for m in plan.values() if m.name in touched]
    if not order:
        hint = "" if include_embeddings else " (embeddings and lm_head are skipped unless --include-embeddings)"
        raise InputError(f"base {base} and the tuned model(s) have no weight matrix in common to audit{hint}")
    base_warnings = []
    n_t = sum(1 for m in order if m.transposed and m.kind != "expert")
    if n_t:
        base_warnings.append(f"{n_t} Conv1D weights (stored in x out) are analysed transposed, as (out x in)")
    n_conv = sum(1 for m in order if m.kind == "conv")
    if n_conv:
        base_warnings.append(f"{n_conv} conv kernels (out, in, k...) are analysed as (out x in*k) matrices; the "
                             "JSON gives each one's stored shape in reshaped_from")
    return AuditStream(base, base_src, specs, order, dtype, base_warnings, layout=plan)


def _map_adapter(spec: _Tuned, base: str, shapes: dict[str, tuple[int, ...]], config: dict,
                 plan: dict[str, Matrix]) -> None:
    """Match the adapter to the base (ShapeMismatchError when it does not fit); keep the matrices the
    audit plans; state skipped modules and new heads in info and warnings."""
    af = spec.adapter
    spec.info, spec.warnings = af.info(), list(af.warnings)  # type: ignore[union-attr]
    match = match_adapter(af, shapes, base=f"base {base}", config=config)  # type: ignore[arg-type]
    out_of_plan = [n for n in match.module_of if n not in plan]
    for n in out_of_plan:
        match.module_of.pop(n)
        match.expert_of.pop(n, None)
    match.replacement_of = {n: k for n, k in match.replacement_of.items()
                            if any(m.param == n and m.expert is None for m in plan.values())}
    spec.match = match
    if out_of_plan:
        spec.warnings.append(f"{len(out_of_plan)} adapted embedding/lm_head module(s) not audited "
                             "(use --include-embeddings)")
    if match.skipped:
        spec.info["skipped"] = [{"name": n, "why": w} for n, w in match.skipped.items()]
        spec.warnings.append(f"{len(match.skipped)} adapted module(s) not audited, each with the reason in "
                             f"info.skipped (e.g. {printable(next(iter(match.skipped)))}: "
                             f"{printable(next(iter(match.skipped.values())))})")
    if match.new_modules:
        spec.info["new_modules"] = list(match.new_modules)
        spec.warnings.append(f"modules_to_save: {len(match.new_modules)} tensor(s) the base does not have (new heads, "
                             f"e.g. {printable(match.new_modules[0])}): reported, not audited")


def _open_set(path: str, local, base: str, shapes, config: dict, plan: dict[str, Matrix]) -> list[_Tuned]:
    """One _Tuned per member of an adapter set, and the similarity of the members' updates."""
    aset = read_adapter_set(local)
    specs = []
    for label, af in aset.members.items():
        spec = _Tuned(path, f"{path}#{label}", Kind.PEFT_ADAPTER, adapter=af)
        _map_adapter(spec, base, shapes, config, plan)
        spec.info.update({"format": aset.format, "adapter_set": {
            "source": path, "format": aset.format, "member": label, "members": list(aset.members),
            "router": aset.router}})
        spec.warnings.append(f"member {printable(label)} of a {aset.format} set: its update on its own (the router "
                             "mixes the members per token; the router weights are new, not audited)")
        specs.append(spec)
    by_matrix: dict[str, list[_Tuned]] = {}
    for spec in specs:
        for name in spec.match.module_of:
            by_matrix.setdefault(name, []).append(spec)
    for name, group in by_matrix.items():
        if len(group) < 2:
            continue
        sim = update_similarity([_factors(s, name) for s in group])
        labels = [s.label.rsplit("#", 1)[-1] for s in group]
        for i, s in enumerate(group):
            s.info.setdefault("update_similarity", {})[name] = {
                "to": labels, "update_cos": sim["update_cos"][i], "output_overlap": sim["output_overlap"][i]}
    return specs


def _factors(spec: _Tuned, name: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    module = spec.match.module_of[name]
    B, A, _ = spec.adapter.factors(module, spec.match.expert_of.get(name))  # type: ignore[union-attr]
    return B, A, spec.adapter.scale(module)  # type: ignore[union-attr]


def _expert_similarity(spec: _Tuned) -> dict:
    """{expert stack: update_cos / output_overlap among its experts' LoRA updates} for the experts an
    adapter changes: the experts of a fused stack ("param[e]") or per-expert modules (".experts.<e>.")."""
    groups: dict[str, dict[int, str]] = {}
    for name in spec.match.module_of:
        if name in spec.match.expert_of:
            groups.setdefault(strip_expert(name), {})[spec.match.expert_of[name]] = name
        elif (m := _PER_EXPERT.search(name)) is not None:
            groups.setdefault(_PER_EXPERT.sub(".experts.*.", name, count=1), {})[int(m.group(1))] = name
    out = {}
    for key, members in groups.items():
        if len(members) >= 2 and not spec.adapter.modules[spec.match.module_of[next(iter(members.values()))]].dora:  # type: ignore[union-attr]
            experts = sorted(members)
            out[key] = {"experts": experts, **update_similarity([_factors(spec, members[e]) for e in experts])}
    return out


def _check_dense(spec: _Tuned, base: str, base_src: WeightSource, plan: dict[str, Matrix],
                 plan_skipped: dict[str, str]) -> None:
    w = spec.weights
    params = list(dict.fromkeys(m.param for m in plan.values()))
    common = [n for n in params if n in w]  # type: ignore[operator]
    bad = [f"{n}: tuned {tuple(w.shape(n))} vs base {tuple(base_src.shape(n))}" for n in common  # type: ignore[union-attr]
           if tuple(w.shape(n)) != tuple(base_src.shape(n))]  # type: ignore[union-attr]
    if bad:
        raise ShapeMismatchError(f"tuned {spec.path} does not fit base {base}: {len(bad)} matrices differ in shape:\n  "
                                 + "\n  ".join(bad[:10]) + _more(bad) + "\nAre they the same architecture?")
    if not common:
        raise InputError(f"tuned {spec.path} shares no weight name with base {base}; are they the same architecture "
                         "(and both in Hugging Face naming)?")
    missing = [n for n in params if n not in w]  # type: ignore[operator]
    if missing:
        spec.warnings.append(f"{len(missing)} base matrices absent from the tuned model (e.g. {missing[0]}); "
                             "not audited")
    skipped = {n: why for n, why in plan_skipped.items() if n in w and not (is_embedding(n) or is_head(n))}  # type: ignore[operator]
    if skipped:
        spec.info["skipped"] = [{"name": n, "why": why} for n, why in skipped.items()]
        spec.warnings.append(f"{len(skipped)} tensor(s) of more than one dimension not audited, each with the reason "
                             f"in info.skipped (e.g. {printable(next(iter(skipped)))})")


def _loaded_source(path: str, src: WeightSource) -> WeightSource | None:
    """The weights of a transformers folder as transformers builds the model (its load-time renaming
    and fusing applied, e.g. per-expert MoE files fused into 3-D stacks), or None when the folder is
    not a transformers model or its names are the same either way. Loads the whole model."""
    from .sources import StateDictSource

    archs = src.config.get("architectures")
    arch = archs[0] if isinstance(archs, list) and archs else None
    if not isinstance(arch, str) or not arch.isidentifier() or not src.format.startswith("transformers folder"):
        return None
    import transformers

    cls = getattr(transformers, arch, None)
    if not (isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel)):
        return None
    try:
        model = cls.from_pretrained(str(path), dtype=torch.float32, use_safetensors=True, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - not loadable this way: the caller keeps the error of the file names
        return None
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if set(state) == set(src.names()):
        return None
    return StateDictSource(src.path, state, src.config,
                           fmt=f"{src.format}, read through transformers (names as the model builds them)")


def _more(items: list, shown: int = 10) -> str:
    return f" (and {len(items) - shown} more)" if len(items) > shown else ""
