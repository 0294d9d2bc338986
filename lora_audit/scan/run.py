"""The safety-scan pipeline: BASE's profile (``profile``: one forward pass over the scan's prompts
and the causal test of its refusal directions, cached), the weight-only signals and the refusal-edit
test of every TUNED from one pass over the checkpoint stream (``weights``, ``tamper``,
``safelora``), the forward-pass signals of every TUNED (``forward``; PEFT adapters applied to the
loaded BASE one after the other, full models loaded one at a time), a risk score only from a
validated risk model (``risk``, ``validation``), one typed result (``results.scan.SafetyScanResult``).

Everything a user can get wrong is checked before the slow part: prompt files, their counts and
halves, the chat template, the risk file, --fail-on fields the scan cannot give a value
(``gate_fields``: a forward-pass field in --weights-only, ``risk`` without a validated risk
model), tuned sources that cannot be run, adapters or models that do not fit BASE, an
``--unaligned`` model whose matrices differ in shape. A BASE that refuses nothing, or an
architecture without a residual stream lora-audit understands, is an ``InputError`` before any
TUNED is touched; a BASE whose refusal direction is not causal is said so in the result (no
refusal edits counted, no direction-based signal given), and is an ``InputError`` before any
TUNED is touched when --fail-on names ``refusal_edits``. Nothing is written half.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import LoadedModel, is_changed, load_model, open_stream
from ..checkpoints.detect import Kind
from ..checkpoints.layout import is_head
from ..checkpoints.loading import LoadOptions, numerics_tag
from ..checkpoints.sources import local_path, open_weights
from ..errors import InputError, ShapeMismatchError
from ..progress import step
from ..results import fingerprint
from ..results.safety import Thresholds
from ..results.scan import (FORWARD_ONLY_FIELDS, SIGNAL_MODES, DirectionInfo, LayerValues,
                            ModelScan, PromptRecord, RiskModelInfo, RiskStatus, SafetyScanResult)
from ..results.spectrum import split_name
from ..safety.prompts import DEFAULT_MAX_PROMPT_CHARS
from . import risk as R
from . import tamper as T
from . import validation as V
from .causal import why_not
from .direction import STABLE_COS, Direction, collect, find_blocks, prompts_needed
from .forward import ForwardSignals, forward_signals
from .profile import (BaseProfile, PromptInfo, base_fingerprint, cache_dir, compute_profile, lookup,
                      profile_key, store)
from .prompts import SCAN_HARMFUL, SCAN_HARMLESS, check_halves, split_halves
from .safelora import aggregate as safelora_aggregate
from .safelora import alignment_cos
from .weights import WeightSignals, aggregate, matrix_stats

# Signals measured along BASE's refusal direction: without a causal direction they mean nothing.
DIRECTION_SIGNALS = ("refusal_energy_share", "refusal_energy_ratio", "refusal_energy_max_ratio", "weight_shift",
                     "top_cos_max", "activation_shift", "refusal_edit_max_share")
RISK_FIELDS = ("risk", "predicted_loss")


@dataclass
class ScanConfig:
    """Every setting of a scan (the CLI options map onto these fields)."""

    prompts: str = SCAN_HARMFUL  # harmful prompts (the formats safety-eval's --prompts reads)
    benign: str = SCAN_HARMLESS  # harmless prompts for the direction (the formats safety-eval's --benign reads)
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
    gate_fields: tuple[str, ...] = ()  # the fields a --fail-on condition names: each must get a value
    load: LoadOptions = field(default_factory=LoadOptions)  # dtype, device map, bitsandbytes quantisation


@dataclass
class _Inputs:
    harmful: list[str]
    harmless: list[str]
    prompts: dict[str, PromptInfo]
    halves: dict[str, tuple[list[int], list[int]]]
    template: str | None
    kinds: list[Kind]
    risk_model: RiskModelInfo | None
    risk_status: RiskStatus
    panel: dict


def _risk_file_name(cfg: ScanConfig) -> str:
    return cfg.risk_file or "lora_audit/data/scan/risk.json (packaged)"


def _inputs(tuned: list[str], cfg: ScanConfig) -> _Inputs:
    from ..safety.evaluate import EvalConfig, prompt_sets, tuned_sources
    from ..safety.generate import read_chat_template
    from .profile import prompt_hash

    if cfg.batch_size < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise InputError("batch_size and limit must be at least 1")
    cfg.load.check(cfg.device)
    ecfg = EvalConfig(prompts=cfg.prompts, benign=cfg.benign, limit=cfg.limit, max_prompt_chars=cfg.max_prompt_chars,
                      allow_pickle=cfg.allow_pickle, tasks=[])
    harmful, harmless = prompt_sets(ecfg)
    if harmless is None or not len(harmless):
        raise InputError(f"{cfg.benign}: the refusal direction needs harmless prompts next to the harmful ones")
    halves = {"harmful": split_halves([p.category for p in harmful.prompts]),
              "harmless": split_halves([p.category for p in harmless.prompts])}
    check_halves(halves, {"harmful": cfg.prompts, "harmless": cfg.benign})
    texts = {"harmful": [p.prompt for p in harmful.prompts], "harmless": [p.prompt for p in harmless.prompts]}
    infos = {k: PromptInfo(source=ps.source, layout=ps.layout, n=len(ps), sha256=prompt_hash(texts[k]))
             for k, ps in (("harmful", harmful), ("harmless", harmless))}
    template = read_chat_template(cfg.chat_template)
    models, panel = R.load_risk_models(cfg.risk_file)
    mode = "weights_only" if cfg.weights_only else "full"
    model = models.get(mode)
    status = RiskStatus(model=model.name if model else None, file=_risk_file_name(cfg))
    status.problems = V.problems(model.validation) if model is not None else \
        [f"{_risk_file_name(cfg)} has no {mode} risk model" if models or cfg.risk_file else
         "no risk model is packaged"]
    status.validated = model is not None and not status.problems
    _check_gate_fields(cfg, status, mode, model)
    if cfg.weights_only:
        kinds = [local_path(t)[1] for t in tuned]
    else:
        kinds = [k for _, k in tuned_sources(tuned, ecfg)]
    return _Inputs(texts["harmful"], texts["harmless"], infos, halves, template, kinds,
                   model, status, panel)


def check_config(cfg: ScanConfig) -> None:
    """The checks of a scan's settings that need no model (prompt files and halves, the chat
    template, the risk file, the --fail-on fields), for callers that run other work first (the
    audit pipeline): InputError before that work."""
    _inputs([], cfg)


def _check_gate_fields(cfg: ScanConfig, status: RiskStatus, mode: str, model: RiskModelInfo | None) -> None:
    """InputError before any work for a --fail-on field this scan cannot give a value (its
    condition could never hold, and the gate would pass unseen)."""
    fields = set(cfg.gate_fields)
    forward = sorted(fields & set(FORWARD_ONLY_FIELDS))
    if cfg.weights_only and forward:
        raise InputError(f"--fail-on names {', '.join(forward)}, which needs a forward pass of TUNED; a --weights-only "
                         "scan makes none, so the condition could never hold. Drop --weights-only, or gate on "
                         "refusal_edits (weights only)")
    risky = sorted(fields & set(RISK_FIELDS))
    if risky and not status.validated:
        raise InputError(f"--fail-on names {', '.join(risky)}, but there is no validated {mode} risk model "
                         f"({'; '.join(status.problems)}), so the scan reports no risk and the condition could never "
                         "hold. Gate on refusal_edits" + ("" if cfg.weights_only else " or first_token_drop") +
                         ", or give a validated --risk-file")
    needs = [f for f in (model.features if model is not None else []) if SIGNAL_MODES.get(f) == "unaligned"]
    if risky and needs and cfg.unaligned is None:
        raise InputError(f"--fail-on names {', '.join(risky)}, but the {mode} risk model reads {', '.join(needs)}, "
                         "which needs --unaligned (BASE before safety training); without it there is no risk")


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


def _check_direction(profile: BaseProfile, direction: Direction, cfg: ScanConfig,
                     risk_model: RiskModelInfo | None = None) -> list[str]:
    """InputError when BASE refuses nothing, or when --fail-on needs refusal edits and BASE's
    direction is not causal; statements about the direction otherwise."""
    n = int(profile.harmful.scores.numel())
    k = int((profile.harmful.scores > 0).sum())
    if k <= Thresholds().min_base_refusal * n:
        raise InputError(f"BASE refuses {k} of {n} harmful prompts by the first-token score (p(refusal start) > 1/2): "
                         "it shows no refusal behaviour, so there is no refusal direction to find and no safety to "
                         "lose. safety-scan needs the safety-tuned model the fine-tunes started from as BASE")
    out = []
    causal = profile.causal
    if causal is None or not causal.causal:
        why = why_not(causal) if causal is not None else "it was not tested"
        if "refusal_edits" in cfg.gate_fields:
            raise InputError(f"--fail-on names refusal_edits, but BASE's refusal direction is not causal ({why}), so "
                             "no edit along it can be counted and the condition could never hold")
        along = [f for f in (risk_model.features if risk_model is not None else []) if f in DIRECTION_SIGNALS]
        risky = sorted(set(cfg.gate_fields) & set(RISK_FIELDS))
        if risky and along:
            raise InputError(f"--fail-on names {', '.join(risky)}, but the risk model reads {', '.join(along)}, "
                             f"measured along BASE's refusal direction, which is not causal ({why}): there is no risk")
        stab = direction.stability
        best = int(torch.argmax(stab))
        need = prompts_needed(min(direction.n_harmful, direction.n_harmless), float(stab[best]))
        noisy = "" if float(stab[best]) >= STABLE_COS else (
            f"; its best split-half cosine is {float(stab[best]):.2f} (layer {best}): "
            + (f"about {need} prompts per direction half would make it stable" if need else
               "far more prompts are needed, or BASE has no consistent direction"))
        out.append(f"BASE's refusal direction is not causal: {why}{noisy}. No refusal edits are counted and no "
                   f"signal measured along the direction ({', '.join(DIRECTION_SIGNALS)}) is given for this base")
    left = int((~direction.stable).sum())
    if left:
        out.append(f"{left} of {len(direction.stability)} layers have a refusal direction with a split-half cosine "
                   f"below {STABLE_COS} and are left out of the per-layer aggregates")
    return out


def _profile(base: str, inputs: _Inputs, cfg: ScanConfig, base_l: LoadedModel | None, base_fp: str | None,
             base_path: Path
             ) -> tuple[BaseProfile, LoadedModel | None, str, float]:
    """(the base profile from the cache or computed (and stored), the loaded BASE when it was needed,
    the cache outcome, the seconds spent loading BASE)."""
    from ..safety.generate import chat_texts
    from ..safety.scorers import DEFAULT_REFUSAL_STARTS
    from ..cache import load_secret

    # the key: BASE's content (up to CONTENT_LIMIT; a hub reference's pinned snapshot), the prompts and the
    # dtype and quantisation its activations are computed in: only worth it when the cache is used
    key = ""
    if cfg.use_cache:
        from ..device import resolve_device

        tag = numerics_tag(cfg.load, resolve_device(cfg.device), base_path)
        key = profile_key(base_fp + (f"|{tag}" if tag else ""), inputs.harmful, inputs.harmless, inputs.template,  # type: ignore[operator]
                          DEFAULT_REFUSAL_STARTS, inputs.halves)
    root, secret = cache_dir(cfg.cache_dir), load_secret() if cfg.use_cache else b""
    profile = lookup(root, key, secret) if cfg.use_cache else None
    if profile is not None and cfg.weights_only:
        return profile, base_l, "hit", 0.0
    t0 = time.perf_counter()
    if base_l is None:
        base_l = load_model(base, device=cfg.device, allow_pickle=cfg.allow_pickle, options=cfg.load)
    load_s = time.perf_counter() - t0
    if profile is not None:
        return profile, base_l, "hit", load_s
    texts = {"harmful": chat_texts(base_l.tokenizer, inputs.harmful, inputs.template),
             "harmless": chat_texts(base_l.tokenizer, inputs.harmless, inputs.template)}
    profile = compute_profile(base_l.model, base_l.tokenizer, texts, _start_ids(base_l), batch_size=cfg.batch_size,
                              prompts=inputs.prompts, key=key, halves=inputs.halves,
                              min_refusal=Thresholds().min_base_refusal)
    if cfg.use_cache:
        try:
            store(profile, root, secret)
        except OSError as e:
            profile.notes.append(f"the base profile could not be cached in {root} ({e.strerror or e})")
    return profile, base_l, "miss" if cfg.use_cache else "off", load_s


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
    edits: list[list[T.RefusalEdit]]  # per model: every changed stream-writing matrix's test
    seconds: list[float]
    warnings: list[list[str]] = field(default_factory=list)
    total: float = 0.0


def _weight_pass(stream, profile: BaseProfile, direction: Direction, unaligned) -> _WeightPass:
    """One pass over the checkpoint stream: every changed matrix of every tuned model. Embedding
    tables that feed the stream and lm_heads are read only when a tuned model changes them; the
    tables get the refusal-edit test only, lm_heads nothing (they read the stream)."""
    n = len(stream.tuned)
    res, index = profile.residual, profile.residual.writer_index()
    u = profile.refusal_unit
    stats: list[list] = [[] for _ in range(n)]
    safe: list[list] = [[] for _ in range(n)]
    edits: list[list[T.RefusalEdit]] = [[] for _ in range(n)]
    own = [0.0] * n
    warns: list[list[str]] = [[] for _ in range(n)]
    t_all = time.perf_counter()
    for group in stream:
        table = group.kind == "embedding"
        if (table and not res.is_embedding(group.name)) or is_head(group.name):
            continue
        w = None if table else res.writer_of(group.name, index)
        if table and group.shape[1] != res.d_model:
            raise ShapeMismatchError(f"base {stream.base}: {group.name} is {group.shape[0]} x {group.shape[1]}, but the "
                                     f"loaded model's embeddings have width {res.d_model}")
        if w is not None and group.shape != (res.d_model, w.in_features):
            raise ShapeMismatchError(f"base {stream.base}: {group.name} is {group.shape[0]} x {group.shape[1]}, but the "
                                     f"loaded model's {w.module} maps {w.in_features} to {res.d_model}")
        r = None if w is None else direction.unit[w.layer]
        dx = None if w is None else profile.writer_input_shift(w.module)
        V_ = None if unaligned is None or table else \
            group.base.double() - _oriented(unaligned.get(group.name), group.transposed)
        for i, delta in enumerate(group.deltas):
            if not is_changed(delta, group.base):
                continue
            t0 = time.perf_counter()
            if (table or w is not None) and u is not None:
                e = T.measure_matrix(group.name, delta, group.base, u, embedding=table)
                if e is None:
                    warns[i].append(f"{group.name}: the update has non-finite values; left out of the refusal-edit test")
                else:
                    edits[i].append(e)
            if not table:
                s = matrix_stats(group.name, delta, group.base, layer=None if w is None else w.layer, r=r, dx=dx)
                if s is None:
                    warns[i].append(f"{group.name}: the update has non-finite values; left out")
                else:
                    stats[i].append(s)
                    if V_ is not None:
                        c = alignment_cos(delta, group.base, V_)
                        if c is not None:
                            safe[i].append((split_name(group.name)[1], c))
            own[i] += time.perf_counter() - t0
    total = time.perf_counter() - t_all
    shared = (total - sum(own)) / max(n, 1)  # reading, attributed evenly
    signals = [aggregate(s, direction.stable, res.d_model) for s in stats]
    for sig, notes in zip(signals, warns, strict=True):
        if sig.matrices_changed and not sig.writers_changed:
            notes.append("no matrix writing into the residual stream changed (an adapter on attention inputs only?): "
                     "nothing was written along the refusal direction directly, and the weight-only signals are 0; "
                     "effects through attention patterns show in the forward-pass signals only")
    return _WeightPass(signals, safe, edits, [o + shared for o in own], warns, total)


def _forward(base_l: LoadedModel, path: str, kind: Kind, texts: list[str], profile: BaseProfile, cfg: ScanConfig
             ) -> tuple[ForwardSignals, float]:
    """(TUNED's pass over the harmful prompts (BASE's tokenizer and texts) against BASE's, the
    seconds spent loading TUNED: reading a full model, or injecting an adapter into BASE)."""
    from ..safety.evaluate import with_adapter

    start = _start_ids(base_l)
    kw = dict(batch_size=cfg.batch_size, desc=f"{path}: harmful")
    t0 = time.perf_counter()
    if kind == Kind.PEFT_ADAPTER:
        _, blocks = find_blocks(base_l.model)
        timed = {}

        def run(pm):
            timed["load"] = time.perf_counter() - t0
            return collect(pm, base_l.tokenizer, texts, blocks, start, **kw)

        got = with_adapter(base_l, path, run)
        load_s = timed.get("load", 0.0)
    else:
        tl = load_model(path, device=cfg.device, allow_pickle=cfg.allow_pickle, options=cfg.load)
        load_s = time.perf_counter() - t0
        emb_t, emb_b = tl.model.get_input_embeddings(), base_l.model.get_input_embeddings()  # type: ignore[operator]
        if emb_t.weight.shape != emb_b.weight.shape:
            raise ShapeMismatchError(f"{path}: its vocabulary or width differs from BASE's ({tuple(emb_t.weight.shape)} "
                                     f"vs {tuple(emb_b.weight.shape)}); the forward-pass signals compare the same token "
                                     "sequences, so they need BASE's tokenizer (use --weights-only)")
        _, blocks = find_blocks(tl.model)
        got = collect(tl.model, base_l.tokenizer, texts, blocks, start, **kw)  # type: ignore[arg-type]
        del tl
    if got.states.shape != profile.harmful.states.shape:
        raise ShapeMismatchError(f"{path}: its residual stream is {tuple(got.states.shape[1:])} (layers x width), "
                                 f"BASE's {tuple(profile.harmful.states.shape[1:])}")
    return forward_signals(got, profile.harmful, profile.direction, seed=cfg.seed), load_s


def _layers(L: int, direction: Direction, ws: WeightSignals, safe: list[tuple[int | None, float]],
            fw: ForwardSignals | None, d_model: int, causal: bool) -> list[LayerValues]:
    out = []
    for layer in range(L):
        lw = ws.layers.get(layer)
        scores = [c for la, c in safe if la == layer]
        share = lw.r_energy / lw.frob2 if causal and lw is not None and lw.frob2 > 0 else None
        out.append(LayerValues(
            layer=layer, stable=bool(direction.stable[layer]), writers_changed=lw.writers if lw else 0,
            energy_share=share, energy_ratio=None if share is None else share * d_model,
            weight_shift=lw.shift / lw.base_shift if causal and lw is not None and lw.base_shift > 0 else None,
            top_cos=lw.top_cos if causal and lw is not None else None,
            safelora_cos=sum(scores) / len(scores) if scores else None,
            activation_shift=fw.layer_shift[layer] if causal and fw is not None else None))
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _edits_phrase(m: ModelScan, causal: bool) -> str:
    if not causal:
        return "refusal edits not counted (BASE's refusal direction is not causal)"
    if not m.refusal_edits:
        return (f"no edit along BASE's refusal direction ({m.stream_matrices_changed} changed matrices writing into "
                "the residual stream tested)")
    parts = [f"{n} {what}" for n, what in ((m.refusal_edits_removing, "remove it (abliteration-like)"),
                                            (m.refusal_edits_adding, "add to it (toward over-refusal)")) if n]
    return (f"REFUSAL EDITS: {m.refusal_edits} of {m.stream_matrices_changed} changed stream-writing matrices are "
            f"edited along BASE's refusal direction ({', '.join(parts)})")


def _proxy_phrase(m: ModelScan, base_share: float, n: int) -> str | None:
    drop = m.signals.get("first_token_drop")
    if drop is None:
        return None
    lo, hi = m.intervals.get("first_token_drop", [drop, drop])
    return (f"first-token refusal proxy on {n} scan prompts: {_pct(base_share)} -> {_pct(base_share - drop)} "
            f"(drop {100 * drop:+.0f} points, 95% CI {100 * lo:+.0f} to {100 * hi:+.0f})")


def _risk_phrase(model: RiskModelInfo | None, status: RiskStatus, risk: float | None, verdict: str) -> str:
    if model is None or not status.validated:
        return f"no risk: no validated risk model ({'; '.join(status.problems)})"
    if risk is None:
        return f"risk unknown: a signal of the {model.name} risk model could not be computed"
    says = "predicts" if verdict == R.LABELS[0] else "does not predict"
    head = f"risk {risk:.2f} ({says} a refusal drop of {100 * R.LABEL_DROP:.0f} points or more)"
    if status.base_matches:
        return f"{head}; {model.name} risk model validated on this base's panel: {V.summary(model.validation)}"  # type: ignore[arg-type]
    return (f"{head}; the {model.name} risk model is NOT validated for this base (its panel was built on "
            f"{model.validation.base or 'another model'}), so this figure is not evidence of anything here")  # type: ignore[union-attr]


def _direction_info(profile: BaseProfile, direction: Direction, cache: str) -> DirectionInfo:
    res = profile.residual
    return DirectionInfo(
        n_layers=res.n_layers, d_model=res.d_model, blocks=res.blocks, writers=[w.module for w in res.writers],
        prompts={k: PromptRecord(**vars(v)) for k, v in profile.prompts.items()},
        separation=direction.separation.tolist(), stability=direction.stability.tolist(),
        dprime=direction.dprime.tolist(), stable_layers=[i for i, s in enumerate(direction.stable.tolist()) if s],
        base_first_token_refusal=float((profile.harmful.scores > 0).double().mean()),
        base_first_token_refusal_harmless=float((profile.harmless.scores > 0).double().mean()),
        cache=cache, key=profile.key, seconds=round(profile.seconds, 3), causal=profile.causal,
        halves={f"{s}_{h}": len(profile.halves[s][j]) for s in ("harmful", "harmless")
                for j, h in enumerate(("direction", "validation"))})


def _model_edits(edits: list[T.RefusalEdit], d: int) -> dict:
    flagged = T.flag(edits, d)
    removing = sum(e.sign == "removes" for e in flagged)
    return dict(refusal_edits=len(flagged), refusal_edits_removing=removing,
                refusal_edits_adding=len(flagged) - removing, refusal_edit_matrices=[e.to_json() for e in flagged])


def _load_settings(cfg: ScanConfig, base_l: LoadedModel | None, sources: list) -> dict:
    """The dtype and load options of the models of a scan (none loaded: weights only, cached
    profile) and the commits its hub references were pinned to."""
    from ..checkpoints.hub import hub_settings
    from ..safety.evaluate import model_settings

    if base_l is not None:
        return model_settings(cfg.load, base_l, sources)
    return {"dtype": None, **cfg.load.settings(), **hub_settings(sources)}


def run_safety_scan(base: str, tuned: list[str] | tuple = (), config: ScanConfig | None = None, *,
                    names: list[str] | None = None, loaded_base: LoadedModel | None = None) -> SafetyScanResult:
    """Scan every TUNED (PEFT adapters on BASE, full model folders; with ``weights_only`` any adapter
    file the spectrum command reads) against BASE; return the ``SafetyScanResult``.

    ``names``: result keys (default: the TUNED arguments as given). ``loaded_base``: BASE already
    loaded (the audit pipeline shares it with safety-eval); adapters are applied to it one after
    the other and removed again, leaving the same module with the same weights.
    """
    t_start = time.perf_counter()
    cfg = config or ScanConfig()
    base, tuned = str(base), [str(t) for t in tuned]
    names = list(names) if names else list(tuned)
    if not tuned or len(names) != len(tuned) or len(set(names)) != len(names):
        raise InputError("give at least one TUNED model, and one unique name per tuned model")
    inputs = _inputs(tuned, cfg)
    stream = open_stream(base, tuned, allow_pickle=cfg.allow_pickle, include_embeddings=True)  # type: ignore[arg-type]
    stream.skip_untouched(lambda m: m.kind == "embedding" or is_head(m.name))
    unaligned = _check_unaligned(cfg.unaligned, stream, cfg.allow_pickle) if cfg.unaligned else None
    record = inputs.risk_model.validation if inputs.risk_model is not None else None
    needs_fp = cfg.use_cache or (inputs.risk_status.validated and record.base_fingerprint is not None)  # type: ignore[union-attr]
    base_path = local_path(base)[0]  # a hub reference's pinned snapshot
    base_fp = base_fingerprint(str(base_path)) if needs_fp else None
    inputs.risk_status.base_matches = bool(record is not None and base_fp is not None
                                           and record.base_fingerprint == base_fp)
    profile, base_l, cache, load_s = _profile(base, inputs, cfg, loaded_base, base_fp, base_path)
    direction = profile.direction
    causal = profile.refusal_unit is not None
    warnings = _check_direction(profile, direction, cfg,
                                inputs.risk_model if inputs.risk_status.validated else None) + list(profile.notes)
    with step(f"safety-scan: weight signals of {len(tuned)} tuned model{'s' if len(tuned) != 1 else ''}"):
        wp = _weight_pass(stream, profile, direction, unaligned)
    texts = None
    if not cfg.weights_only:
        from ..safety.generate import chat_texts

        texts = chat_texts(base_l.tokenizer, inputs.harmful, inputs.template)  # type: ignore[union-attr]
    models = {}
    risk_model = inputs.risk_model if inputs.risk_status.validated else None
    base_share = float((profile.harmful.scores > 0).double().mean())
    load_tuned = forward_s = 0.0
    for i, (name, path, kind) in enumerate(zip(names, tuned, inputs.kinds, strict=True)):
        t0 = time.perf_counter()
        fw, tl_s = (None, 0.0) if texts is None else _forward(base_l, path, kind, texts, profile, cfg)  # type: ignore[arg-type]
        t_fw = time.perf_counter() - t0
        signals = dict(wp.signals[i].signals)
        signals["refusal_edit_max_share"] = max((e.share for e in wp.edits[i]), default=0.0) if causal else None
        signals.update(safelora_aggregate([c for _, c in wp.safelora[i]]) if unaligned is not None else {})
        signals.update(fw.signals if fw is not None else {})
        intervals = dict(fw.intervals) if fw is not None else {}
        if not causal:
            signals.update({k: None for k in DIRECTION_SIGNALS if k in signals})
            intervals.pop("activation_shift", None)
        risk = R.risk_of(risk_model, signals) if risk_model is not None else None
        verdict = R.verdict_of(risk_model, risk) if risk_model is not None else "UNKNOWN"
        seconds = {"weights": round(wp.seconds[i], 4)}
        if fw is not None:
            seconds |= {"load": round(tl_s, 3), "forward": round(t_fw - tl_s, 3)}
            load_tuned, forward_s = load_tuned + tl_s, forward_s + t_fw - tl_s
        m = ModelScan(
            risk=risk, verdict=verdict, signals=signals, intervals=intervals,
            stream_matrices_changed=len(wp.edits[i]) if causal else 0,
            layers=_layers(profile.residual.n_layers, direction, wp.signals[i], wp.safelora[i], fw,
                           profile.residual.d_model, causal),
            risk_model=risk_model.name if risk_model is not None else None, source=path, kind=kind.value,
            fingerprint=fingerprint(path), matrices_changed=wp.signals[i].matrices_changed,
            writers_changed=wp.signals[i].writers_changed, seconds=seconds, warnings=wp.warnings[i],
            **(_model_edits(wp.edits[i], profile.residual.d_model) if causal else {}))
        parts = [_edits_phrase(m, causal), _proxy_phrase(m, base_share, len(inputs.harmful)),
                 _risk_phrase(inputs.risk_model, inputs.risk_status, risk, verdict)]
        m.verdict_line = "; ".join(p for p in parts if p)
        models[name] = m
    settings = {"prompts": cfg.prompts, "benign": cfg.benign, "limit": cfg.limit, "batch_size": cfg.batch_size,
                "device": str(base_l.device) if base_l is not None else cfg.device, "seed": cfg.seed,
                "chat_template": cfg.chat_template, "weights_only": cfg.weights_only, "unaligned": cfg.unaligned,
                "tuned": tuned, "names": names, "label": f"refusal drop >= {R.LABEL_DROP:g}",
                "risk_file": _risk_file_name(cfg), "panel": inputs.panel}
    settings.update(_load_settings(cfg, base_l, [base, *tuned, cfg.unaligned]))
    timing = {"load_base": round(load_s, 3), "profile": 0.0 if profile.cached else round(profile.seconds, 3),
              "weights": round(wp.total, 3), "load_tuned": round(load_tuned, 3), "forward": round(forward_s, 3),
              "total": round(time.perf_counter() - t_start, 3)}
    return SafetyScanResult(base=base, models=models, direction=_direction_info(profile, direction, cache),
                            risk_models={m.name: m for m in [inputs.risk_model] if m is not None}, settings=settings,
                            warnings=warnings, risk_status=inputs.risk_status, seconds=timing)
