"""The spectral audit engine: a stream of (name, W0, deltas) in, a ``SpectrumResult`` out.

For every base matrix W0 (out x in) the stream yields, the engine

0. screens W0 and each delta (``screen``): NaN/Inf weights, an update that overflows the audit's
   dtype, or an all-zero W1 make the matrix a finding in that model's ``skipped`` list, never
   a number, and the rest is audited; a broken W0 is a finding for every tuned model,
1. decomposes W0 once (thin SVD; from the on-disk base-spectrum cache when one is given),
2. audits every tuned model's delta against it while it is in memory: the top-k left singular
   vectors y_j of W1 = W0 + dW and c_j = max_i |<y_j, u0_i>| over ALL base left singular
   vectors (Shuttleworth et al. 2024, "LoRA vs Full Fine-tuning: An Illusion of Equivalence",
   Sec. 3); y_j is an intruder dimension when c_j < epsilon. Directions of W1 whose singular
   value is numerically zero (``exact.rank_tolerance``) are not examined: k_used =
   min(k, m, n, numerical rank of W1),
3. measures dW itself (Frobenius norm, effective and stable rank; ``metrics``).

How the top-k of W1 is found depends on the delta (the engine never parses files):

    exact=True            two full SVDs, the paper's algorithm (``exact.exact_topk``)
    LowRank               ``lowrank.lowrank_topk``: W1 in the base's singular basis, O(p r) per
                          product, no second full SVD
    Dense / DoRA          ``dense.block_krylov_topk``: block Krylov top-k of the materialised
                          W1 with diagonal corrections in the base basis, started on the base's
                          top vectors, with a residual check

A fast path that is not installed, declines a case (``NotImplementedError``) or reports that it
did not converge falls back to the exact algorithm, and the matrix record says so in "notes".

Matrices are read (and, with a cache, hashed and looked up, and on the CPU a cached spectrum's
LoRA factors projected onto it: ``lowrank.project``) one group ahead in a background thread while
the current one is audited, and spread over several devices when there are several GPUs
(``schedule``); results come back in stream order either way. The LoRA path's small kernels and
the screens run on one thread in each (``blas.one_thread`` says why).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..checkpoints.deltas import Delta, Dense, DoRA, LowRank, MatrixGroup, is_changed
from ..device import resolve_device
from ..errors import InputError
from ..progress import progress as progress_bar
from ..startup import release
from ..results.spectrum import MatrixResult, SkippedMatrix, SpectrumResult, TunedResult, split_name
from ..settings import SpectrumSettings
from . import calibration, schedule
from .blas import one_thread, threads
from .exact import base_spectrum, exact_topk, examined
from .metrics import UpdateMetrics, count_intruders, intruder_details, sweep_counts, update_metrics
from .schedule import devices_for
from .findings import (ZERO_TUNED, count_nonfinite, finding, nonfinite_numbers, screen_base, screen_delta,
                       screen_values)
from .types import BaseSpectrum, TopK


def delta_type(delta: Delta) -> str:
    return {Dense: "dense", LowRank: "lowrank", DoRA: "dora"}.get(type(delta), type(delta).__name__.lower())


# ---- top-k dispatch ---------------------------------------------------------------------------
def _fast_topk(base: BaseSpectrum, W0: torch.Tensor, delta: Delta, k: int, projection=None) -> TopK:
    """The fast path for this delta type; ImportError/NotImplementedError when there is none.

    LowRank -> ``lowrank_topk``; DoRA -> ``lowrank_topk`` if it takes it, else (a row rescaling is
    not low rank in the base basis) ``block_krylov_topk`` on the materialised W1; Dense ->
    ``block_krylov_topk``. ``projection``: ``lowrank.project(base, delta)`` of a LowRank delta,
    when the reader thread computed it already.
    """
    if isinstance(delta, (LowRank, DoRA)):
        from .lowrank import lowrank_topk

        try:
            return lowrank_topk(base, delta, k, projection=projection)
        except NotImplementedError:
            if not isinstance(delta, DoRA):
                raise
    if isinstance(delta, (Dense, DoRA)):
        from .dense import block_krylov_topk

        return block_krylov_topk(base, delta.merged(W0), k)
    raise NotImplementedError(f"no fast path for {type(delta).__name__}")


# Below this many rows or columns the paper's exact SVD is as fast as the fast paths or faster:
# measured on 2 cores, one thread, k = 10 (seconds, fast vs exact): LoRA r=8 128x128 0.008 vs 0.003,
# 192x576 0.008 vs 0.013, 576x576 0.007 vs 0.070; dense 128x128 0.014 vs 0.003, 192x576 0.011 vs
# 0.013, 576x576 0.026 vs 0.070. So SmolLM2's 576-wide layers take the fast paths too.
EXACT_BELOW = 192


def takes_fast_path(shape: Sequence[int], exact: bool) -> bool:
    return not exact and min(shape) >= EXACT_BELOW


def tuned_topk(base: BaseSpectrum, W0: torch.Tensor, delta: Delta, k: int, *, exact: bool,
               projection=None) -> tuple[TopK, list[str]]:
    """Top-k of W1 measured against the base, without W1's numerically null directions
    (``exact.examined``: ``len(top.singular_values)`` is k_used); (TopK, notes about fallbacks)."""
    notes: list[str] = []
    if takes_fast_path(base.shape, exact):
        try:
            top = _fast_topk(base, W0, delta, k, projection)
        except (ImportError, NotImplementedError) as e:
            notes.append(f"fast path unavailable ({e}); exact SVD used")
        else:
            if top.converged:
                return examined(top, base.shape, base.U.dtype), notes
            why = top.note or f"residual {top.residual}"
            notes.append(f"{top.method} did not converge ({why}); exact SVD used")
    return examined(exact_topk(base, delta.merged(W0), k), base.shape, base.U.dtype), notes


# ---- one matrix group ---------------------------------------------------------------------------
@dataclass
class Outcome:
    """What auditing one base matrix gave for one tuned model: a record, a finding
    (``screen``: the matrix is left out of the statistics), or neither (unchanged)."""

    matrix: MatrixResult | None = None
    skipped: SkippedMatrix | None = None
    seconds: float = 0.0


def audit_matrix(group: MatrixGroup, base: BaseSpectrum, W0: torch.Tensor, delta: Delta,
                 settings: SpectrumSettings, *, base_norm: float, projection=None) -> Outcome:
    """Audit one tuned model's (screened, changed) delta against one base matrix.

    An all-zero W1 (no direction above the numerical-rank tolerance) and any NaN/Inf number in
    the record (an overflow the screens did not foresee) become findings, never numbers."""
    small = isinstance(delta, LowRank) and W0.device.type == "cpu" and takes_fast_path(base.shape, settings.exact)
    with one_thread() if small else nullcontext():  # the LoRA path's kernels are small: blas.one_thread says why
        metrics = update_metrics(delta, W0, base_norm=base_norm, spectrum=settings.dense_metrics)
        if metrics.delta_norm == 0.0:
            return Outcome()
        top, notes = tuned_topk(base, W0, delta, settings.k, exact=settings.exact, projection=projection)
    if top.singular_values.numel() == 0:
        return Outcome(skipped=finding(group.name, "tuned", ZERO_TUNED))
    rec = _matrix_result(group, base, delta, top, metrics, settings, notes)
    bad = nonfinite_numbers(rec.max_cos + rec.tuned_singular_values + [  # type: ignore[arg-type]
        rec.delta_norm, rec.relative_delta_norm, rec.spectral_norm, rec.effective_rank, rec.stable_rank])  # type: ignore[list-item]
    if bad:
        dtype = settings.dtype_name
        return Outcome(skipped=finding(group.name, "update", f"the audit in {dtype} gave {bad} NaN/Inf number(s) "
                                                             "(an overflow)", bad))
    return Outcome(matrix=rec)


def _matrix_result(group: MatrixGroup, base: BaseSpectrum, delta: Delta, top: TopK, metrics: UpdateMetrics,
                   settings: SpectrumSettings, notes: list[str]) -> MatrixResult:
    max_cos = [float(c) for c in top.max_cos.detach().cpu().double().tolist()]
    sv = [float(s) for s in top.singular_values.detach().cpu().double().tolist()]
    module, layer = split_name(group.name)
    return MatrixResult(
        name=group.name, shape=list(group.shape), max_cos=max_cos,
        intruders=count_intruders(max_cos, settings.epsilon), module=module, layer=layer, kind=group.kind,
        transposed=bool(group.transposed), delta_type=delta_type(delta),
        adapter_rank=delta.rank if isinstance(delta, (LowRank, DoRA)) else None,
        method=top.method, converged=bool(top.converged),
        tuned_singular_values=sv,
        base_index=[int(i) for i in top.argmax_base.detach().cpu().tolist()],
        cos_top_base=_cos_top_base(top, settings.k),
        sweep_counts=sweep_counts(max_cos, settings.epsilon_sweep),
        intruder_details=intruder_details(top, settings.epsilon, base.S),
        delta_norm=metrics.delta_norm, relative_delta_norm=metrics.relative_delta_norm,
        spectral_norm=metrics.spectral_norm, effective_rank=metrics.effective_rank,
        stable_rank=metrics.stable_rank, notes=list(group.notes) + notes + _noise_note(group, metrics.spectral_norm),
        reshaped_from=list(group.reshaped_from) if group.reshaped_from else None, expert=group.expert,
        dequantization=group.dequantization,
        null_max_cos=calibration.null_for_shape(group.shape), drift=calibration.drift(max_cos),
        intruder_energy=calibration.intruder_energy(sv, max_cos, settings.epsilon),
        sweep_energy=calibration.sweep_energy(sv, max_cos, settings.epsilon_sweep),
    )


def _noise_note(group: MatrixGroup, spectral_norm: float | None) -> list[str]:
    """A quantised base's matrix whose update is no larger than the possible quantisation error
    (||dW||_2 <= bound on ||E||_F >= ||E||_2): its intruders may be quantisation noise."""
    bound = (group.dequantization or {}).get("error_fro_bound")
    if bound is None or spectral_norm is None or spectral_norm > bound:
        return []
    return [f"update spectral norm {spectral_norm:.3g} <= quantisation error bound {bound:.3g}: "
            "this update cannot be told apart from quantisation noise"]


def _cos_top_base(top: TopK, k: int) -> list[list[float]] | None:
    """|cos| of each tuned top vector with the top-k base vectors, rows = tuned (4 decimals)."""
    if top.base_coords is None:
        return None
    block = top.base_coords[:k].abs().T  # (p, k') -> (k', k'')
    return [[round(float(x), 4) for x in row] for row in block.detach().cpu().double().tolist()]


def audit_group(group: MatrixGroup, settings: SpectrumSettings, device: torch.device,
                spectrum_of: Callable[[torch.Tensor, torch.device], BaseSpectrum],
                projections: Mapping[int, Any] | None = None, *, finite_base: bool = False) -> list[Outcome]:
    """Screen W0, then every tuned model's delta; decompose W0 once (the first time a delta
    needs it) and audit every delta that passes against it. One Outcome per tuned model, in order.
    A base with NaN/Inf values is a finding for every tuned model that has a delta there.
    ``projections``: {delta index: ``lowrank.project``} computed by the reader thread.
    ``finite_base``: W0 is known to be finite and ``spectrum_of`` costs no SVD (its content key
    found a verified cache entry with finite singular values: ``_prepare``), so W0's screen and
    norm pass are skipped (||W0||_F = ||S0||_2) and a LoRA audit never reads W0's values."""
    W0 = group.base.to(device=device, dtype=settings.torch_dtype)  # (m, n)
    if not finite_base:
        with one_thread():  # reductions over W0 (the screens): blas.one_thread says why
            bad_base = screen_base(group.name, W0)
        if bad_base is not None:
            return [Outcome(skipped=None if d is None else replace(bad_base)) for d in group.deltas]
    decomposed: list[tuple[BaseSpectrum, float]] = []

    def base_of() -> tuple[BaseSpectrum, float]:
        if not decomposed:
            spec = spectrum_of(W0, device)
            decomposed.append((spec, float(spec.S.double().norm())))  # ||W0||_F = ||S0||_2
        return decomposed[0]

    projections = projections or {}
    return [Outcome() if d is None else _audit_delta(group, W0, d, settings, base_of, projections.get(i),
                                                     finite_base=finite_base)
            for i, d in enumerate(group.deltas)]


def _audit_delta(group: MatrixGroup, W0: torch.Tensor, delta: Delta, settings: SpectrumSettings,
                 base_of: Callable[[], tuple[BaseSpectrum, float]], projection=None, *,
                 finite_base: bool = False) -> Outcome:
    """Screen one delta (``findings.screen_delta``) and audit it when it passes."""
    delta = delta.to(device=W0.device, dtype=settings.torch_dtype)
    with one_thread():
        changed, found = screen_delta(group.name, W0, delta, base_norm=base_of()[1] if finite_base else None)
    if not changed:
        return Outcome()
    if found is not None:
        return Outcome(skipped=found)
    base, base_norm = base_of()
    t0 = time.perf_counter()
    out = audit_matrix(group, base, W0, delta, settings, base_norm=base_norm, projection=projection)
    out.seconds = time.perf_counter() - t0
    return out


def _spectrum_function(cache) -> Callable[[torch.Tensor, torch.device], BaseSpectrum]:
    if cache is None:
        return lambda W0, device: base_spectrum(W0.to(device))
    return lambda W0, device: cache.base_spectrum(W0, device)


@dataclass
class _Prepared:
    """What the reader thread found for one group: the base spectrum (held in memory, or read from
    the cache under ``key``; None on a miss) and the projections of its LoRA deltas onto it."""

    key: str | None
    spectrum: BaseSpectrum | None
    held: bool = False
    projections: dict[int, Any] = field(default_factory=dict)
    finite: bool = False  # W0 is known finite: see audit_group's finite_base


def _projections(group: MatrixGroup, base: BaseSpectrum, settings: SpectrumSettings) -> dict[int, Any]:
    """``lowrank.project`` of every changed LoRA delta of ``group`` that takes the fast path: the
    one pass over U0 and V0 of the LoRA path, done in the reader thread so that the main thread
    searches while the next matrix is projected. A delta the screens will skip is left out."""
    if not takes_fast_path(base.shape, settings.exact):
        return {}
    from .lowrank import project

    out = {}
    for i, d in enumerate(group.deltas):
        if type(d) is not LowRank or screen_values(group.name, d) is not None or not is_changed(d, group.base):
            continue
        try:
            out[i] = project(base, d)
        except RuntimeError:  # e.g. an SVD that does not converge: the main thread redoes it and says so
            pass
    return out


def _workers(settings: SpectrumSettings, cache, base_spectra: Mapping[str, BaseSpectrum] | None = None, *,
             project: bool = False, n_threads: int | None = None) -> tuple[Callable | None, Callable]:
    """(prepare, work) for ``schedule.run``: ``prepare`` (in the reader thread) takes a base
    spectrum held in memory (``base_spectra``), or with a SpectrumCache hashes W0 and reads its
    cached spectrum, and with ``project`` (spectra and work on the CPU) projects the group's LoRA
    deltas onto it; ``work`` audits one group on one device, on ``n_threads`` torch threads (the
    caller's count before the reader started: ``blas.threads`` says why) but for the small kernels."""
    n_threads = n_threads or torch.get_num_threads()
    spectrum_of = _spectrum_function(cache)
    lookup = getattr(cache, "lookup", None)

    def prepare(group: MatrixGroup) -> _Prepared | None:
        with one_thread():  # the reader's reductions and projections are small: blas.one_thread says why
            return _prepare(group)

    def _prepare(group: MatrixGroup) -> _Prepared | None:
        held = base_spectra.get(group.name) if base_spectra is not None else None
        if held is not None:
            found = _Prepared(None, held, held=True)
        else:
            if lookup is None or not any(d is not None and is_changed(d, group.base) for d in group.deltas):
                return None
            W0 = group.base.to(dtype=settings.torch_dtype)
            found = _Prepared(*lookup(W0, origin=group.origin))  # key, spectrum or None, on the CPU
            # An entry is written only for the spectrum of a screened, finite W0 with these very
            # bytes (the key is their BLAKE3 hash, the entry is authenticated): finite singular
            # values there prove W0 finite, and neither thread needs to read W0 to screen it.
            found.finite = found.spectrum is not None and math.isfinite(float(found.spectrum.S.double().norm()))
            if not found.finite and count_nonfinite(W0):
                return None
        if project and found.spectrum is not None:
            found.projections = _projections(group, found.spectrum, settings)
        return found

    def work(group: MatrixGroup, device: torch.device, found: _Prepared | None) -> tuple[str, list[Outcome]]:
        of = spectrum_of
        if found is not None and found.held:
            of = lambda W0, d: _on_device(found.spectrum, d)  # type: ignore[arg-type]
        elif found is not None:
            of = lambda W0, d: cache.base_spectrum(W0, d, key=found.key, found=found.spectrum)

        def on_every_thread(W0: torch.Tensor, d: torch.device) -> BaseSpectrum:
            with threads(n_threads):  # whatever the small blocks before it left: blas.threads says why
                return of(W0, d)

        with threads(n_threads):  # the dense paths use every thread the caller had too
            return group.name, audit_group(group, settings, device, on_every_thread,
                                           found.projections if found is not None else None,
                                           finite_base=found is not None and found.finite)

    return (prepare if lookup is not None or base_spectra is not None else None), work


# ---- the whole stream ---------------------------------------------------------------------------
def audit(stream: Iterable[MatrixGroup], settings: SpectrumSettings | None = None, *, cache=None,
          progress: bool = True, base_label: str | None = None, tuned_labels: Sequence[str] | None = None,
          extra_settings: dict[str, Any] | None = None, devices: Sequence[str | torch.device] | None = None,
          prefetch: int = 1, base_spectra: Mapping[str, BaseSpectrum] | None = None, **changes) -> SpectrumResult:
    """Audit every tuned model of ``stream`` against its base; see the module docstring.

    Args:
        stream: ``lora_audit.checkpoints.open_stream(...)`` (MatrixGroups plus ``.info[i]`` and
            ``.warnings[i]`` per tuned model), or any iterable of MatrixGroups.
        settings: the ``lora_audit.settings.SpectrumSettings`` of the audit (k, epsilon, sweep,
            exact, float64, dense_metrics, device; ``changes`` are field names that replace some of
            them, for library calls: ``audit(stream, k=4, device="cpu")``). Its ``use_cache`` and
            ``cache_dir`` are the caller's business: the engine uses ``cache``.
        cache: a ``SpectrumCache`` (``.base_spectrum(W0, device)``), or None to decompose afresh.
        base_label / tuned_labels: what to record as "base" and "tuned" (default: the stream's
            ``base`` / ``tuned`` attributes when it has them).
        extra_settings: recorded in the result's provenance settings after the audit's own.
        devices: spread the matrices over these devices, one worker thread each (default: every
            CUDA device when ``settings.device`` resolves to plain "cuda" on a multi-GPU machine,
            else that device alone). Results are the same and in stream order either way.
        prefetch: how many matrix groups to read ahead in a background thread (reading, hashing
            and cache reads overlap the SVDs); 0 reads in the calling thread.
        base_spectra: spectra already in memory, by base parameter name (``.get(name)``, on the
            CPU, in the settings' dtype): a screen decomposes its base once and audits thousands of
            adapters against it. They must be the spectra of this stream's base matrices as the
            stream yields them; a name it lacks goes through ``cache`` (or a fresh SVD).
    Returns:
        A SpectrumResult; matrices with NaN/Inf weights or an overflowing update are in each
        model's ``skipped`` list, and ``result.incomplete`` is True when there is one. Its
        provenance settings are ``settings.to_json()``, with ``device`` the device(s) the audit ran
        on, ``dtype``, ``cache`` (the folder used, or null) and ``matrices_in_stream``.
    Raises:
        InputError: bad settings, or a stream with no matrix at all.
    """
    release()  # the audit is the work: the start-up is over (lora_audit.startup)
    settings = SpectrumSettings.of(settings, **changes)
    run_on = devices_for(resolve_device(settings.device), devices)
    base_label = base_label if base_label is not None else str(getattr(stream, "base", "base"))
    labels = list(tuned_labels) if tuned_labels is not None else _labels(stream, _n_tuned(stream))
    total = len(stream) if hasattr(stream, "__len__") else None  # type: ignore[arg-type]
    prepare, work = _workers(settings, cache, base_spectra, project=all(d.type == "cpu" for d in run_on),
                             n_threads=torch.get_num_threads())  # read here, before the reader thread starts
    results, n_groups = _collect(stream, work, prepare, run_on, prefetch, labels, total=total, progress=progress,
                                 cache=cache)
    if results is None or (n_groups == 0 and not total):
        raise InputError(f"{base_label}: the base and the tuned model(s) have no 2-D weight matrix in common")
    planned = max(n_groups, total or 0)  # the stream may skip matrices no tuned model changes
    for i, res in enumerate(results):
        _finish(res, planned, len(settings.epsilon_sweep), info=_per_tuned(stream, "info", i),
                warnings=_per_tuned(stream, "warnings", i))
    run_settings = {**settings.to_json(), "device": ",".join(str(d) for d in run_on), "dtype": settings.dtype_name,
                    "cache": getattr(cache, "root", None) and str(cache.root),
                    "matrices_in_stream": planned, **(extra_settings or {})}
    return SpectrumResult(base=base_label, k=settings.k, epsilon=settings.epsilon,
                          epsilon_sweep=list(settings.epsilon_sweep), results=results, settings=run_settings,
                          warnings=list(getattr(stream, "base_warnings", None) or []))


def _collect(stream, work, prepare, run_on, prefetch: int, labels: list[str] | None, *, total: int | None,
             progress: bool, cache) -> tuple[list[TunedResult] | None, int]:
    """Run the stream through ``schedule`` and gather each tuned model's outcomes in stream order.
    Returns (results, number of groups seen); results is None for an empty stream without labels."""
    results = [TunedResult(tuned=t) for t in labels] if labels else None
    n_groups = 0
    bar = progress_bar(total=total, desc="spectrum", unit="matrix") if progress else _NoBar()
    try:
        for name, outcomes in schedule.run(stream, work, run_on, prepare=prepare, depth=prefetch):
            n_groups += 1
            if results is None:
                results = [TunedResult(tuned=f"tuned[{i}]") for i in range(len(outcomes))]
            if len(outcomes) != len(results):
                raise ValueError(f"{name}: {len(outcomes)} deltas for {len(results)} tuned models")
            for res, out in zip(results, outcomes, strict=True):
                if out.matrix is not None:
                    res.matrices.append(out.matrix)
                if out.skipped is not None:
                    res.skipped.append(out.skipped)
                res.seconds += out.seconds
            bar.set_postfix_str(name[-40:], refresh=False)
            bar.update(1)
    finally:
        bar.close()
        flush = getattr(cache, "flush", None)  # new cache entries are written in the background
        if flush is not None:
            flush()
    return results, n_groups


def _finish(res: TunedResult, planned: int, n_sweep: int, *, info, warnings) -> None:
    """Fill in one tuned model's totals, loader info and warnings (mutates ``res``)."""
    res.info = dict(info or {})
    res.warnings = list(warnings or [])
    res.matrices_unchanged = planned - len(res.matrices) - len(res.skipped)
    if not res.matrices and not res.skipped:
        res.warnings.append("no weight matrix differs from the base: nothing to audit")
    res.sweep_totals = [sum(m.sweep_counts[j] for m in res.matrices) for j in range(n_sweep)]
    fallbacks = sum(1 for m in res.matrices if any("exact SVD used" in n for n in m.notes))
    if fallbacks:
        res.warnings.append(f"{fallbacks} matrices fell back from the fast path to the exact SVD")
    broken = [s.name for s in res.skipped if s.unmeasured]
    if broken:
        res.warnings.append(f"{_matrices(len(broken))} not audited (NaN/Inf weights or an overflowing update; "
                            f"see 'skipped'): {', '.join(broken[:3])}{', ...' if len(broken) > 3 else ''}")
    zeros = len(res.skipped) - len(broken)
    if zeros:
        res.warnings.append(f"{_matrices(zeros)} all zeros in the tuned model: no direction to examine")


def _matrices(n: int) -> str:
    return f"{n} matrix" if n == 1 else f"{n} matrices"


def _on_device(spec: BaseSpectrum, device: torch.device) -> BaseSpectrum:
    return BaseSpectrum(U=spec.U.to(device), S=spec.S.to(device), Vh=spec.Vh.to(device), key=spec.key)


class _NoBar:
    def update(self, n=1):
        pass

    def set_postfix_str(self, *a, **k):
        pass

    def close(self):
        pass


def _n_tuned(stream) -> int | None:
    for attr in ("tuned", "info"):
        v = getattr(stream, attr, None)
        if isinstance(v, (list, tuple)):
            return len(v)
    return None


def _labels(stream, n: int | None) -> list[str] | None:
    tuned = getattr(stream, "tuned", None)
    if isinstance(tuned, (list, tuple)):
        return [str(t) for t in tuned]
    return [f"tuned[{i}]" for i in range(n)] if n else None


def _per_tuned(stream, attr: str, i: int):
    seq = getattr(stream, attr, None)
    try:
        return seq[i] if seq is not None else None
    except (IndexError, KeyError, TypeError):
        return None
