"""The safety-scan pipeline: BASE's profile (``profile``: one forward pass, cached), the weight-only
signals of every TUNED from one pass over the checkpoint stream (``weights``, ``safelora``), the
forward-pass signals of every TUNED (``forward``; PEFT adapters applied to the loaded BASE one
after the other, full models loaded one at a time), the risk score (``risk``), one typed result
(``results.scan.SafetyScanResult``).

Everything a user can get wrong is checked before the slow part: prompt files and counts, the
chat template, tuned sources that cannot be run, adapters or models that do not fit BASE, an
``--unaligned`` model whose matrices differ in shape. A BASE that refuses nothing, a direction
too unstable to measure against, or an architecture without a residual stream lora-audit
understands are ``InputError``s before any TUNED is touched; nothing is written half.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ..checkpoints import LoadedModel, is_changed, load_model, open_stream
from ..checkpoints.detect import Kind
from ..checkpoints.sources import local_path, open_weights
from ..errors import InputError, ShapeMismatchError
from ..progress import step
from ..results import fingerprint, provenance
from ..results.safety import Thresholds
from ..results.scan import (SCHEMA, SCHEMA_VERSION, DirectionInfo, LayerValues, ModelScan, PromptRecord,
                            RiskModelInfo, SafetyScanResult)
from ..results.spectrum import split_name
from ..safety.prompts import DEFAULT_MAX_PROMPT_CHARS
from . import risk as R
from .direction import STABLE_COS, Direction, check_prompt_counts, collect, find_blocks, prompts_needed
from .forward import ForwardSignals, forward_signals
from .profile import CONTENT_LIMIT, BaseProfile, PromptInfo, cache_dir, compute_profile, lookup, profile_key, store
from .safelora import aggregate as safelora_aggregate
from .safelora import alignment_cos
from .weights import WeightSignals, aggregate, matrix_stats


@dataclass
class ScanConfig:
    """Every setting of a scan (the CLI options map onto these fields)."""

    prompts: str = "builtin:harmful"  # harmful prompts (as safety-eval's --prompts)
    benign: str = "builtin:benign"  # harmless prompts for the direction (as safety-eval's --benign)
    limit: int | None = None  # first N prompts of each set
    batch_size: int = 16
    device: str = "auto"
    seed: int = 0  # bootstrap intervals
    chat_template: str | None = None  # Jinja file, for tokenizers without a template
    allow_pickle: bool = False
    max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS
    weights_only: bool = False  # no forward pass of TUNED
    unaligned: str | None = None  # BASE before safety training: Safe LoRA's score
    use_cache: bool = True  # the base profile cache
    cache_dir: str | None = None  # default <lora-audit cache>/scan-profiles
    risk_file: str | None = None  # fitted risk models (default: the packaged lora_audit/data/scan/risk.json)


@dataclass
class _Inputs:
    harmful: list[str]
    harmless: list[str]
    prompts: dict[str, PromptInfo]
    template: str | None
    kinds: list[Kind]
    risk_models: dict[str, RiskModelInfo]
    panel: dict


def _inputs(tuned: list[str], cfg: ScanConfig) -> _Inputs:
    from ..safety.evaluate import EvalConfig, prompt_sets, tuned_sources
    from ..safety.generate import read_chat_template
    from .profile import prompt_hash

    if cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise InputError("batch_size and limit must be at least 1")
    ecfg = EvalConfig(prompts=cfg.prompts, benign=cfg.benign, limit=cfg.limit, max_prompt_chars=cfg.max_prompt_chars,
                      allow_pickle=cfg.allow_pickle, tasks=[])
    harmful, harmless = prompt_sets(ecfg)
    if harmless is None or not len(harmless):
        raise InputError(f"{cfg.benign}: the refusal direction needs harmless prompts next to the harmful ones")
    check_prompt_counts(len(harmful), len(harmless), f"{cfg.prompts} and {cfg.benign}")
    texts = {"harmful": [p.prompt for p in harmful.prompts], "harmless": [p.prompt for p in harmless.prompts]}
    infos = {k: PromptInfo(source=ps.source, layout=ps.layout, n=len(ps), sha256=prompt_hash(texts[k]))
             for k, ps in (("harmful", harmful), ("harmless", harmless))}
    template = read_chat_template(cfg.chat_template)
    if cfg.weights_only:
        kinds = [local_path(t)[1] for t in tuned]
    else:
        kinds = [k for _, k in tuned_sources(tuned, ecfg)]
    models, panel = R.load_risk_models(cfg.risk_file)
    return _Inputs(texts["harmful"], texts["harmless"], infos, template, kinds, models, panel)


def _check_unaligned(path: str, stream, allow_pickle: bool):
    """The --unaligned weights, checked against BASE's shapes for every matrix the scan reads."""
    src = open_weights(path, allow_pickle=allow_pickle)
    base = stream.base_source
    bad = [n for n in stream.names if n not in src or tuple(src.shape(n)) != tuple(base.shape(n))]
    if bad:
        raise ShapeMismatchError(f"--unaligned {path} does not fit base {stream.base}: {len(bad)} matrices missing or "
                                 f"of another shape (e.g. {bad[0]}); it must be the same architecture as BASE "
                                 "before safety training")
    return src


def _check_direction(profile: BaseProfile, direction: Direction) -> list[str]:
    """InputError when BASE refuses nothing or no layer's direction is stable; warnings otherwise."""
    n = int(profile.harmful.scores.numel())
    k = int((profile.harmful.scores > 0).sum())
    if k <= Thresholds().min_base_refusal * n:
        raise InputError(f"BASE refuses {k} of {n} harmful prompts by the first-token score (p(refusal start) > 1/2): "
                         "it shows no refusal behaviour, so there is no refusal direction to find and no safety to "
                         "lose. safety-scan needs the safety-tuned model the fine-tunes started from as BASE")
    stab = direction.stability
    if not bool(direction.stable.any()):
        best = int(torch.argmax(stab))
        need = prompts_needed(min(direction.n_harmful, direction.n_harmless), float(stab[best]))
        how = f"about {need} prompts of each set are needed" if need else \
            "far more prompts are needed, or BASE has no consistent refusal direction"
        raise InputError(f"the refusal direction is not stable with {direction.n_harmful} harmful and "
                         f"{direction.n_harmless} harmless prompts: the best split-half cosine is {float(stab[best]):.2f} "
                         f"(layer {best}), below {STABLE_COS}; {how} (--prompts / --benign)")
    left = int((~direction.stable).sum())
    return [f"{left} of {len(stab)} layers have a refusal direction with a split-half cosine below {STABLE_COS} and "
            "are left out of the aggregates"] if left else []


def _profile(base: str, inputs: _Inputs, cfg: ScanConfig, base_l: LoadedModel | None
             ) -> tuple[BaseProfile, LoadedModel | None, str]:
    """The base profile from the cache or computed (and stored); the loaded BASE when it was needed."""
    from ..safety.generate import chat_texts
    from ..safety.scorers import DEFAULT_REFUSAL_STARTS
    from ..cache import load_secret

    # the key hashes BASE's files (up to CONTENT_LIMIT): only worth it when the cache is used
    key = profile_key(fingerprint(base, content_limit=CONTENT_LIMIT), inputs.harmful, inputs.harmless,
                      inputs.template, DEFAULT_REFUSAL_STARTS) if cfg.use_cache else ""
    root, secret = cache_dir(cfg.cache_dir), load_secret() if cfg.use_cache else b""
    profile = lookup(root, key, secret) if cfg.use_cache else None
    if profile is not None and cfg.weights_only:
        return profile, base_l, "hit"
    if base_l is None:
        base_l = load_model(base, device=cfg.device, allow_pickle=cfg.allow_pickle)
    if profile is not None:
        return profile, base_l, "hit"
    texts = {"harmful": chat_texts(base_l.tokenizer, inputs.harmful, inputs.template),
             "harmless": chat_texts(base_l.tokenizer, inputs.harmless, inputs.template)}
    profile = compute_profile(base_l.model, base_l.tokenizer, texts, _start_ids(base_l), batch_size=cfg.batch_size,
                              prompts=inputs.prompts, key=key)
    if cfg.use_cache:
        try:
            store(profile, root, secret)
        except OSError as e:
            profile.notes.append(f"the base profile could not be cached in {root} ({e.strerror or e})")
    return profile, base_l, "miss" if cfg.use_cache else "off"


def _start_ids(loaded: LoadedModel) -> torch.Tensor:
    from ..safety.scorers import refusal_start_ids

    return torch.tensor(refusal_start_ids(loaded.tokenizer))


def _oriented(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    t = t.reshape(t.shape[0], -1) if t.dim() == 4 else t
    return (t.T if transposed else t).double()


@dataclass
class _WeightPass:
    signals: list[WeightSignals]
    safelora: list[list[tuple[int | None, float]]]  # per model: (layer, score) of each changed matrix
    seconds: list[float]
    warnings: list[list[str]] = field(default_factory=list)


def _weight_pass(stream, profile: BaseProfile, direction: Direction, unaligned) -> _WeightPass:
    """One pass over the checkpoint stream: every changed matrix of every tuned model."""
    n = len(stream.tuned)
    res, index = profile.residual, profile.residual.writer_index()
    stats: list[list] = [[] for _ in range(n)]
    safe: list[list] = [[] for _ in range(n)]
    own, warns = [0.0] * n, [[] for _ in range(n)]
    t_all = time.perf_counter()
    for group in stream:
        w = res.writer_of(group.name, index)
        if w is not None and group.shape != (res.d_model, w.in_features):
            raise ShapeMismatchError(f"base {stream.base}: {group.name} is {group.shape[0]} x {group.shape[1]}, but the "
                                     f"loaded model's {w.module} maps {w.in_features} to {res.d_model}")
        r = None if w is None else direction.unit[w.layer]
        dx = None if w is None else profile.writer_input_shift(w.module)
        V = None if unaligned is None else \
            group.base.double() - _oriented(unaligned.get(group.name), group.transposed)
        for i, delta in enumerate(group.deltas):
            if not is_changed(delta, group.base):
                continue
            t0 = time.perf_counter()
            s = matrix_stats(group.name, delta, group.base, layer=None if w is None else w.layer, r=r, dx=dx)
            if s is None:
                warns[i].append(f"{group.name}: the update has non-finite values; left out")
                continue
            stats[i].append(s)
            if V is not None:
                c = alignment_cos(delta, group.base, V)
                if c is not None:
                    safe[i].append((split_name(group.name)[1], c))
            own[i] += time.perf_counter() - t0
    shared = (time.perf_counter() - t_all - sum(own)) / max(n, 1)  # reading, attributed evenly
    signals = [aggregate(s, direction.stable, res.d_model) for s in stats]
    for sig, w in zip(signals, warns):
        if sig.matrices_changed and not sig.writers_changed:
            w.append("no matrix writing into the residual stream changed (an adapter on attention inputs only?): "
                     "the weight-only signals are 0 and say nothing about effects through attention patterns; "
                     "the forward-pass signals measure those")
    return _WeightPass(signals, safe, [o + shared for o in own], warns)


def _forward(base_l: LoadedModel, path: str, kind: Kind, texts: list[str], profile: BaseProfile, cfg: ScanConfig
             ) -> ForwardSignals:
    """TUNED's pass over the harmful prompts (BASE's tokenizer and texts), against BASE's."""
    from ..safety.evaluate import with_adapter

    start = _start_ids(base_l)
    kw = dict(batch_size=cfg.batch_size, desc=f"{path}: harmful")
    if kind == Kind.PEFT_ADAPTER:
        _, blocks = find_blocks(base_l.model)
        got = with_adapter(base_l, path, lambda pm: collect(pm, base_l.tokenizer, texts, blocks, start, **kw))
    else:
        tl = load_model(path, device=cfg.device, allow_pickle=cfg.allow_pickle)
        emb_t, emb_b = tl.model.get_input_embeddings(), base_l.model.get_input_embeddings()
        if emb_t.weight.shape != emb_b.weight.shape:
            raise ShapeMismatchError(f"{path}: its vocabulary or width differs from BASE's ({tuple(emb_t.weight.shape)} "
                                     f"vs {tuple(emb_b.weight.shape)}); the forward-pass signals compare the same token "
                                     "sequences, so they need BASE's tokenizer (use --weights-only)")
        _, blocks = find_blocks(tl.model)
        got = collect(tl.model, base_l.tokenizer, texts, blocks, start, **kw)
        del tl
    if got.states.shape != profile.harmful.states.shape:
        raise ShapeMismatchError(f"{path}: its residual stream is {tuple(got.states.shape[1:])} (layers x width), "
                                 f"BASE's {tuple(profile.harmful.states.shape[1:])}")
    return forward_signals(got, profile.harmful, profile.direction, seed=cfg.seed)


def _layers(L: int, direction: Direction, ws: WeightSignals, safe: list[tuple[int | None, float]],
            fw: ForwardSignals | None, d_model: int) -> list[LayerValues]:
    out = []
    for layer in range(L):
        lw = ws.layers.get(layer)
        scores = [c for la, c in safe if la == layer]
        share = lw.r_energy / lw.frob2 if lw is not None and lw.frob2 > 0 else None
        out.append(LayerValues(
            layer=layer, stable=bool(direction.stable[layer]), writers_changed=lw.writers if lw else 0,
            energy_share=share, energy_ratio=None if share is None else share * d_model,
            weight_shift=lw.shift / lw.base_shift if lw is not None and lw.base_shift > 0 else None,
            top_cos=lw.top_cos if lw is not None else None,
            safelora_cos=sum(scores) / len(scores) if scores else None,
            activation_shift=fw.layer_shift[layer] if fw is not None else None))
    return out


def _verdict_line(model: RiskModelInfo | None, risk: float | None, verdict: str) -> str:
    if model is None:
        return "no fitted risk model (lora_audit/data/scan/risk.json is missing or names none): signals only"
    if risk is None:
        return f"risk unknown: a signal of the {model.name} risk model could not be computed"
    says = "predicts" if verdict == R.LABELS[0] else "does not predict"
    fit = model.fit or {}
    honest = fit.get("auroc_leave_one_method_out")
    where = (f"; {model.name} risk model, AUROC {honest:.2f} leave-one-method-out on {fit.get('n')} panel models"
             if isinstance(honest, (int, float)) else f"; {model.name} risk model")
    return f"risk {risk:.2f}: {says} a refusal drop of {100 * R.LABEL_DROP:.0f} points or more{where}"


def _direction_info(profile: BaseProfile, direction: Direction, cache: str) -> DirectionInfo:
    res = profile.residual
    return DirectionInfo(
        n_layers=res.n_layers, d_model=res.d_model, blocks=res.blocks, writers=[w.module for w in res.writers],
        prompts={k: PromptRecord(**vars(v)) for k, v in profile.prompts.items()},
        separation=direction.separation.tolist(), stability=direction.stability.tolist(),
        dprime=direction.dprime.tolist(), stable_layers=[i for i, s in enumerate(direction.stable.tolist()) if s],
        base_first_token_refusal=float((profile.harmful.scores > 0).double().mean()),
        base_first_token_refusal_harmless=float((profile.harmless.scores > 0).double().mean()),
        cache=cache, key=profile.key, seconds=round(profile.seconds, 3))


def run_safety_scan(base: str, tuned: list[str] | tuple = (), config: ScanConfig | None = None, *,
                    names: list[str] | None = None, loaded_base: LoadedModel | None = None) -> SafetyScanResult:
    """Scan every TUNED (PEFT adapters on BASE, full model folders; with ``weights_only`` any adapter
    file the spectrum command reads) against BASE; return the ``SafetyScanResult``.

    ``names``: result keys (default: the TUNED arguments as given). ``loaded_base``: BASE already
    loaded (the audit pipeline shares it with safety-eval); adapters are applied to it one after
    the other and removed again, leaving the same module with the same weights.
    """
    cfg = config or ScanConfig()
    base, tuned = str(base), [str(t) for t in tuned]
    names = list(names) if names else list(tuned)
    if not tuned or len(names) != len(tuned) or len(set(names)) != len(names):
        raise InputError("give at least one TUNED model, and one unique name per tuned model")
    inputs = _inputs(tuned, cfg)
    stream = open_stream(base, tuned, allow_pickle=cfg.allow_pickle)
    unaligned = _check_unaligned(cfg.unaligned, stream, cfg.allow_pickle) if cfg.unaligned else None
    profile, base_l, cache = _profile(base, inputs, cfg, loaded_base)
    direction = profile.direction
    warnings = _check_direction(profile, direction) + list(profile.notes)
    with step(f"safety-scan: weight signals of {len(tuned)} tuned model{'s' if len(tuned) != 1 else ''}"):
        wp = _weight_pass(stream, profile, direction, unaligned)
    texts = None
    if not cfg.weights_only:
        from ..safety.generate import chat_texts

        texts = chat_texts(base_l.tokenizer, inputs.harmful, inputs.template)
    models = {}
    risk_model = inputs.risk_models.get("weights_only" if cfg.weights_only else "full")
    for i, (name, path, kind) in enumerate(zip(names, tuned, inputs.kinds)):
        t0 = time.perf_counter()
        fw = None if texts is None else _forward(base_l, path, kind, texts, profile, cfg)
        signals = dict(wp.signals[i].signals)
        signals.update(safelora_aggregate([c for _, c in wp.safelora[i]]) if unaligned is not None else {})
        signals.update(fw.signals if fw is not None else {})
        risk = R.risk_of(risk_model, signals) if risk_model is not None else None
        verdict = R.verdict_of(risk_model, risk) if risk_model is not None else "UNKNOWN"
        seconds = {"weights": round(wp.seconds[i], 4)} | ({"forward": round(time.perf_counter() - t0, 3)} if fw else {})
        models[name] = ModelScan(
            risk=risk, verdict=verdict, verdict_line=_verdict_line(risk_model, risk, verdict), signals=signals,
            intervals=dict(fw.intervals) if fw is not None else {},
            layers=_layers(profile.residual.n_layers, direction, wp.signals[i], wp.safelora[i], fw,
                           profile.residual.d_model),
            risk_model=risk_model.name if risk_model is not None else None, source=path, kind=kind.value,
            fingerprint=fingerprint(path), matrices_changed=wp.signals[i].matrices_changed,
            writers_changed=wp.signals[i].writers_changed, seconds=seconds, warnings=wp.warnings[i])
    settings = {"prompts": cfg.prompts, "benign": cfg.benign, "limit": cfg.limit, "batch_size": cfg.batch_size,
                "device": str(base_l.device) if base_l is not None else cfg.device, "seed": cfg.seed,
                "chat_template": cfg.chat_template, "weights_only": cfg.weights_only, "unaligned": cfg.unaligned,
                "tuned": tuned, "names": names, "label": f"refusal drop >= {R.LABEL_DROP:g}",
                "risk_file": cfg.risk_file or "lora_audit/data/scan/risk.json", "panel": inputs.panel}
    return SafetyScanResult(base=base, models=models, direction=_direction_info(profile, direction, cache),
                            risk_models={m.name: m for m in [risk_model] if m is not None}, settings=settings,
                            warnings=warnings, provenance_block=provenance(SCHEMA, SCHEMA_VERSION, base=base, **settings))
