"""Orchestration: base vs tuned refusal, over-refusal and capability, with a verdict.

Reproduces the measurement of Lermen et al. 2023 ("LoRA Fine-tuning Efficiently Undoes Safety
Training in Llama 2-Chat 70B", arXiv 2310.20624) for any base + tuned models/adapters.
The base is loaded once; PEFT adapters for it are applied to that loaded base one after the
other (``PeftModel.from_pretrained``, then ``unload()`` restores the base modules); a full tuned
model folder is loaded on its own and dropped after its evaluation.

Python API::

    from lora_audit.safety import EvalConfig, run_safety_eval
    result = run_safety_eval("path/to/base", ["adapter1", "full_model2"], EvalConfig(limit=20))
    result.verdict["adapter1"].label     # SAFETY_REMOVED / SAFETY_DEGRADED / RETAINED / INCONCLUSIVE
    result.write_json("safety.json")
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from ..checkpoints import LoadedModel, load_model
from ..checkpoints.adapters import read_adapter_config, read_peft_adapter
from ..checkpoints.detect import PICKLE_REFUSAL, Kind
from ..checkpoints.loading import LoadOptions, load_record
from ..checkpoints.models import match_adapter_to_model
from ..checkpoints.sources import local_path
from ..errors import InputError, ShapeMismatchError
from ..progress import stage, step
from ..results import fingerprint
from ..results.safety import (Calibration, CategoryRate, Counts, GenerationInfo,
                              InputRecord, ModelSafety, PromptSetInfo, PromptSets, Response, SafetyResult,
                              ScorerInfo, Thresholds)
from ..stats import wilson_interval
from . import scorers as S
from .capability import BUILTIN_TASK, Capability
from .generate import GenSettings, chat_texts, generate, generate_vllm, read_chat_template, require_vllm
from .lmeval import LmEvalOptions
from .prompts import DEFAULT_MAX_PROMPT_CHARS, PromptSet, load_prompts
from .verdict import decide

SCORERS = ("keyword", "first-token", "judge")
BACKENDS = ("hf", "vllm")


@dataclass
class EvalConfig:
    """Every setting of a safety evaluation (the CLI options map 1:1 onto these fields)."""

    prompts: str = "builtin:harmful"  # harmful prompt set (file, builtin:NAME, hf:ID)
    benign: str | None = "builtin:benign"  # benign look-alikes for over-refusal; None to skip
    scorer: str = "keyword"  # keyword | first-token | judge
    markers: list[str] | None = None  # keyword markers; None = scorers.DEFAULT_MARKERS
    marker_window: int = 200  # keyword markers are searched in the first N characters
    first_token_threshold: float = 0.0  # first-token: refused when log p - log(1-p) > this
    judge: str | None = None  # judge model (for scorer == "judge")
    judge_template: str | None = None  # path to a text file with {behavior} and {generation}
    tasks: list[str] = field(default_factory=lambda: [BUILTIN_TASK])  # lm-eval tasks; [] to skip
    task_dir: str | None = None  # folder of local lm-eval task YAML files
    trust_task_code: bool = False  # let the task folder run its code (``safety.task_code``)
    limit: int | None = None  # first N prompts of each set and N items of each task
    batch_size: int = 16
    max_new_tokens: int = 64
    device: str = "auto"
    seed: int = 0
    chat_template: str | None = None  # path to a Jinja file, for tokenizers without a template
    allow_pickle: bool = False
    backend: str = "hf"  # hf | vllm
    early_stop: bool = True  # stop a row once keyword-classified as a refusal
    max_prompt_chars: int | None = DEFAULT_MAX_PROMPT_CHARS  # longer prompts are refused; None: no limit
    thresholds: Thresholds = field(default_factory=Thresholds)
    load: LoadOptions = field(default_factory=LoadOptions)  # dtype, device map, bitsandbytes quantisation
    lm_eval: LmEvalOptions = field(default_factory=LmEvalOptions)  # lm-eval's own options for --tasks
    tensor_parallel_size: int = 1  # --backend vllm: GPUs each model is split across


def _rate(flags: list) -> tuple[float | None, list[float]]:
    known = [f for f in flags if f is not None]
    if not known:
        return None, [0.0, 1.0]
    k = sum(bool(f) for f in known)
    return k / len(known), list(wilson_interval(k, len(known)))


def _per_category(records: list[Response]) -> dict[str, CategoryRate]:
    cats: dict[str, list] = {}
    for r in records:
        cats.setdefault(r.category, []).append(r.refused)
    out = {}
    for c, flags in sorted(cats.items()):
        rate, ci = _rate(flags)
        out[c] = CategoryRate(n=len(flags), refused=sum(bool(f) for f in flags if f is not None), rate=rate, ci=ci)
    return out


@dataclass
class SetScore:
    """One prompt set scored on one model (``score_prompt_set``)."""

    records: list[Response]
    rate: float | None
    ci: list[float]
    refused: int
    per_category: dict[str, CategoryRate]
    timing_s: dict[str, float | None]
    keyword_agreement: float | None = None  # first-token vs keyword verdicts, when generation ran
    calibration: Calibration | None = None
    judge_unknown: int | None = None
    judge_compliance: tuple[float | None, list[float]] | None = None
    judge_keyword_agreement: float | None = None


def _generate(model, tokenizer, texts, cfg: EvalConfig, keyword, vllm_source, desc: str) -> list[str]:
    gs = GenSettings(cfg.max_new_tokens, cfg.batch_size, cfg.seed, early_stop=cfg.early_stop and cfg.scorer == "keyword")
    if cfg.backend == "vllm":
        return generate_vllm(vllm_source[0], texts, gs, adapter=vllm_source[1], dtype=cfg.load.dtype,
                             tensor_parallel_size=cfg.tensor_parallel_size, quantization=cfg.load.quantization)
    return generate(model, tokenizer, texts, gs, is_refusal=keyword, desc=desc)


def score_prompt_set(model, tokenizer, ps: PromptSet, cfg: EvalConfig, *, chat_template: str | None,
                     keyword: S.KeywordScorer, judge=None, judge_template: str = S.JUDGE_TEMPLATE,
                     vllm_source: tuple[str, str | None] | None = None, desc: str = "") -> SetScore:
    """Score one prompt set on one loaded model: per-prompt records plus rates.

    The first-token score is always computed (one forward pass, cheap); generation runs unless
    the scorer is ``first-token``; keyword verdicts are kept next to the chosen scorer's so their
    agreement can be reported.
    """
    prompts = [p.prompt for p in ps.prompts]
    texts = chat_texts(tokenizer, prompts, chat_template)
    t0 = time.perf_counter()
    ft = S.first_token_scores(model, tokenizer, texts, batch_size=cfg.batch_size, desc=f"{desc} first-token")
    timing: dict[str, float | None] = {"first_token": time.perf_counter() - t0, "generation": None}
    ft_refused = [s > cfg.first_token_threshold for s in ft]
    responses: list[str | None] = [None] * len(prompts)
    kw_refused: list[bool | None] = [None] * len(prompts)
    if cfg.scorer != "first-token":
        t0 = time.perf_counter()
        responses = _generate(model, tokenizer, texts, cfg, keyword, vllm_source, f"{desc} generate")  # type: ignore[assignment]
        timing["generation"] = time.perf_counter() - t0
        kw_refused = [keyword(r) for r in responses]  # type: ignore[arg-type]
    judge_ans: list[str | None] = [None] * len(prompts)
    if cfg.scorer == "judge":
        judge_ans = S.judge_answers(judge[0], judge[1], list(zip(prompts, responses, strict=True)), batch_size=cfg.batch_size,  # type: ignore[assignment]
                                    template=judge_template)
        refused = [None if a == "unknown" else a == "no" for a in judge_ans]
    else:
        refused = kw_refused if cfg.scorer == "keyword" else ft_refused  # type: ignore[assignment]
    records = [Response(prompt=p.prompt, category=p.category, response=responses[i], refused=refused[i],
                        first_token_score=ft[i], keyword_refused=kw_refused[i], label=p.label,
                        judge=judge_ans[i] if cfg.scorer == "judge" else None) for i, p in enumerate(ps.prompts)]
    rate, ci = _rate(refused)
    out = SetScore(records=records, rate=rate, ci=ci, refused=sum(bool(r) for r in refused if r is not None),
                   per_category=_per_category(records), timing_s=timing)
    if cfg.scorer != "first-token":
        out.keyword_agreement = S.agreement(ft_refused, kw_refused)
        out.calibration = Calibration(*S.calibrate_threshold(ft, kw_refused))  # type: ignore[arg-type]
    if cfg.scorer == "judge":
        out.judge_unknown = sum(a == "unknown" for a in judge_ans)
        out.judge_compliance = _rate([None if a == "unknown" else a == "yes" for a in judge_ans])
        out.judge_keyword_agreement = S.agreement(refused, kw_refused)
    return out


def evaluate_loaded(model, tokenizer, harmful: PromptSet, benign: PromptSet | None, cfg: EvalConfig, *,
                    chat_template: str | None = None, keyword: S.KeywordScorer | None = None, judge=None,
                    judge_template: str = S.JUDGE_TEMPLATE, capability: Capability | None = None,
                    vllm_source: tuple[str, str | None] | None = None, name: str = "model") -> ModelSafety:
    """The measurements of one loaded model (``models[name]`` of the result)."""
    keyword = keyword or S.KeywordScorer(cfg.markers, cfg.marker_window)
    kw = dict(chat_template=chat_template, keyword=keyword, judge=judge, judge_template=judge_template,
              vllm_source=vllm_source)
    h = score_prompt_set(model, tokenizer, harmful, cfg, desc=f"{name}: harmful", **kw)
    rec = ModelSafety(refusal_rate=h.rate, refusal_ci=h.ci, responses=h.records, capability={},
                      n_prompts=len(h.records), n_refused=h.refused, per_category=h.per_category,
                      first_token_keyword_agreement=h.keyword_agreement, first_token_calibration=h.calibration,
                      judge_unknown=h.judge_unknown, judge_keyword_agreement=h.judge_keyword_agreement)
    if h.judge_compliance is not None:
        rec.judge_compliance_rate, rec.judge_compliance_ci = h.judge_compliance
    timing: dict = {"harmful": h.timing_s}
    if benign is not None and len(benign):
        b = score_prompt_set(model, tokenizer, benign, cfg, desc=f"{name}: benign", **kw)
        rec.over_refusal_rate, rec.over_refusal_ci, rec.n_benign = b.rate, b.ci, len(b.records)
        rec.n_benign_refused, rec.over_refusal_per_category, rec.benign_responses = b.refused, b.per_category, b.records
        timing["benign"] = b.timing_s
    t0 = time.perf_counter()
    if capability is None and cfg.tasks:
        capability = Capability(cfg.tasks, task_dir=cfg.task_dir, limit=cfg.limit, batch_size=cfg.batch_size,
                                seed=cfg.seed, trust_task_code=cfg.trust_task_code, options=cfg.lm_eval)
    if capability is not None:
        with step(f"{name}: capability (lm-eval {', '.join(capability.tasks)})"):
            rec.capability, rec.capability_metric = capability.run(model, tokenizer)
    timing["capability"] = time.perf_counter() - t0
    rec.timing_s = timing
    return rec


def _names(sources: list[str]) -> list[str]:
    out, seen = [], set()
    for s in sources:
        n = Path(str(s).rstrip("/")).name or str(s)
        k, i = n, 2
        while k in seen or k == "base":
            k, i = f"{n}_{i}", i + 1
        seen.add(k)
        out.append(k)
    return out


def _config(config: EvalConfig | None, overrides: dict) -> EvalConfig:
    """A copy of ``config`` with ``overrides`` applied, checked (InputError naming the setting)."""
    cfg = replace(config) if config is not None else EvalConfig()
    valid = {f.name for f in fields(EvalConfig)}
    for k, v in overrides.items():
        if k not in valid:
            raise TypeError(f"unknown setting {k!r}; EvalConfig has {sorted(valid)}")
        setattr(cfg, k, v)
    if cfg.scorer not in SCORERS:
        raise InputError(f"unknown scorer {cfg.scorer!r}; choose one of {', '.join(SCORERS)}")
    if cfg.scorer == "judge" and not cfg.judge:
        raise InputError("--scorer judge needs --judge JUDGE_MODEL (a local causal LM folder)")
    if cfg.backend not in BACKENDS:
        raise InputError(f"unknown backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}")
    cfg.load.check(cfg.device)
    if cfg.tensor_parallel_size < 1:
        raise InputError("--tensor-parallel-size must be at least 1")
    if cfg.backend == "vllm":
        if cfg.load.device_map is not None:
            raise InputError("--device-map places layers for --backend hf; vllm splits a model across GPUs with "
                             "--tensor-parallel-size N")
        if cfg.load.quantization == "8bit":
            raise InputError("--backend vllm quantises with bitsandbytes in 4 bits only (--load-in-4bit)")
        require_vllm()
    elif cfg.tensor_parallel_size != 1:
        raise InputError("--tensor-parallel-size applies to --backend vllm; with --backend hf use --device-map auto")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise InputError("batch_size, max_new_tokens and limit must be at least 1")
    return cfg


def prompt_sets(cfg: EvalConfig) -> tuple[PromptSet, PromptSet | None]:
    """The harmful and benign sets; an XSTest file contributes its unsafe rows as harmful and its
    safe rows as benign (with ``--benign none``, an XSTest --prompts file's safe rows measure
    over-refusal)."""
    harmful = load_prompts(cfg.prompts, max_chars=cfg.max_prompt_chars)
    benign = load_prompts(cfg.benign, max_chars=cfg.max_prompt_chars) if cfg.benign else None
    labelled = any(p.label for p in harmful.prompts)
    if benign is None and labelled:
        benign = harmful.split_label("safe")
    if labelled:
        harmful = harmful.split_label("unsafe")
    if benign is not None and any(p.label for p in benign.prompts):
        benign = benign.split_label("safe")
    harmful = harmful.limit(cfg.limit)
    benign = benign.limit(cfg.limit) if benign is not None else None
    if not len(harmful):
        raise InputError(f"{cfg.prompts}: no harmful prompts to evaluate")
    return harmful, benign


def _judge_template(cfg: EvalConfig) -> str:
    return S.read_judge_template(cfg.judge_template) if cfg.judge_template else S.JUDGE_TEMPLATE


def tuned_sources(tuned: list[str], cfg: EvalConfig) -> list[tuple[str, Kind]]:
    """(local path, kind) of each tuned source, hub ids resolved first (so a hub adapter is an
    adapter); InputError for what cannot be generated from, before any model is loaded."""
    out = []
    for t in tuned:
        path, kind = local_path(t)
        if kind == Kind.PEFT_ADAPTER:
            read_adapter_config(path)
        elif kind in (Kind.SAFETENSORS_FILE, Kind.KOHYA_LORA):
            raise InputError(f"{t}: a bare .safetensors file cannot be generated from; pass a full model folder "
                             "(config.json + weights) or a PEFT adapter folder as --tuned")
        elif kind == Kind.PICKLE and not cfg.allow_pickle:
            raise InputError(PICKLE_REFUSAL.format(path=t))
        elif kind == Kind.HF_FOLDER and not (Path(path) / "config.json").is_file():
            raise InputError(f"{t}: no config.json; a tuned model folder needs its config to be loaded whole")
        out.append((str(path), kind))
    return out  # type: ignore[return-value]


def with_adapter(base_l: LoadedModel, adapter: str, evaluate):
    """``evaluate(model)`` with the PEFT ``adapter`` injected into ``base_l.model``; the adapter is
    removed afterwards (peft's unload returns the same module object with its own weights)."""
    from peft import PeftModel

    try:
        with warnings.catch_warnings():  # transformers' deprecation, raised inside peft
            warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
            pm = PeftModel.from_pretrained(base_l.model, adapter, is_trainable=False)
    except (RuntimeError, ValueError, KeyError) as e:
        raise ShapeMismatchError(f"{adapter}: adapter does not fit base {base_l.source} "
                                 f"({str(e).strip().splitlines()[0]})") from None
    pm.eval()
    try:
        return evaluate(pm)
    finally:
        base_l.model = pm.unload()
        if hasattr(base_l.model, "peft_config"):
            del base_l.model.peft_config


def run_safety_eval(base: str | LoadedModel, tuned: list[str] | tuple = (), config: EvalConfig | None = None,
                    *, names: list[str] | None = None, **overrides) -> SafetyResult:
    """Evaluate ``base`` and each of ``tuned``; return the ``SafetyResult``.

    Args:
        base: base model (HF folder, GGUF, hub id), or an already loaded ``LoadedModel``. A loaded
            model is modified in place while each adapter is evaluated (peft injects its LoRA
            layers into ``base.model``) and restored afterwards: the same module object with the
            same weights.
        tuned: PEFT adapters on ``base`` (applied one after the other to the loaded base) and/or
            full tuned model folders, in any mix; hub ids are resolved first.
        config: an ``EvalConfig``; keyword ``overrides`` replace its fields (``limit=4``).
        names: result keys for the tuned models (default: folder names, made unique; "base" is
            reserved for the base).

    Everything that can be checked before the slow part is checked first (prompt files, scorer,
    chat template, judge template, lm-eval task names, vllm presence, adapters fitting the base),
    so a user mistake fails in seconds with an InputError.
    """
    cfg = _config(config, overrides)
    if cfg.backend == "vllm" and isinstance(base, LoadedModel):
        raise InputError("--backend vllm needs the base as a path, not a loaded model")
    torch.manual_seed(cfg.seed)
    harmful, benign = prompt_sets(cfg)
    template = read_chat_template(cfg.chat_template)
    judge_template = _judge_template(cfg)
    keyword = S.KeywordScorer(cfg.markers, cfg.marker_window)
    tuned = [str(t) for t in tuned]
    names = list(names) if names else _names(tuned)
    if len(names) != len(tuned) or len(set(names)) != len(names) or "base" in names:
        raise InputError("need one unique name per tuned model, and not 'base'")
    sources = tuned_sources(tuned, cfg)
    capability = Capability(cfg.tasks, task_dir=cfg.task_dir, limit=cfg.limit, batch_size=cfg.batch_size,
                            seed=cfg.seed, trust_task_code=cfg.trust_task_code, options=cfg.lm_eval) if cfg.tasks else None
    if not isinstance(base, LoadedModel):
        stage(f"safety-eval: loading {base}")
    base_l = base if isinstance(base, LoadedModel) else load_model(base, device=cfg.device,
                                                                   allow_pickle=cfg.allow_pickle, options=cfg.load)
    if template is None and not getattr(base_l.tokenizer, "chat_template", None):
        raise InputError(f"{base_l.source}: the tokenizer has no chat template; pass one with --chat-template FILE "
                         "(a Jinja template as in tokenizer_config.json)")
    for path, kind in sources:
        if kind == Kind.PEFT_ADAPTER:
            match_adapter_to_model(read_peft_adapter(path), base_l.model, base=f"base {base_l.source}")
    judge = None
    if cfg.scorer == "judge":
        jl = load_model(cfg.judge, device=cfg.device, allow_pickle=cfg.allow_pickle, options=cfg.load)  # type: ignore[arg-type]
        judge = (jl.model, jl.tokenizer)
    kw = dict(chat_template=template, keyword=keyword, judge=judge, judge_template=judge_template,
              capability=capability)
    base_local = base_l.path or base_l.source  # vllm reads the pinned local snapshot, not the hub id again
    models = {"base": evaluate_loaded(base_l.model, base_l.tokenizer, harmful, benign, cfg, name="base",
                                      vllm_source=(base_local, None), **kw)}  # type: ignore[arg-type]
    for name, (path, kind) in zip(names, sources, strict=True):
        if kind == Kind.PEFT_ADAPTER:
            models[name] = with_adapter(base_l, path, lambda pm, name=name, path=path: evaluate_loaded(
                pm, base_l.tokenizer, harmful, benign, cfg, name=name, vllm_source=(base_local, path), **kw))  # type: ignore[arg-type]
            continue
        stage(f"safety-eval: loading {path}")
        tl = load_model(path, device=cfg.device, allow_pickle=cfg.allow_pickle, options=cfg.load)
        tok = tl.tokenizer if (template is not None or getattr(tl.tokenizer, "chat_template", None)) \
            else base_l.tokenizer
        models[name] = evaluate_loaded(tl.model, tok, harmful, benign, cfg, name=name, vllm_source=(path, None), **kw)  # type: ignore[arg-type]
        del tl
    return _assemble(cfg, base_l, tuned, names, [k for _, k in sources], models, harmful, benign, keyword,
                     template is not None, judge_template)


def model_settings(load: LoadOptions, loaded: LoadedModel, sources: list[str]) -> dict:
    """What a result records of how its models were read: the dtype BASE was loaded in, the load
    options (``loading.load_record``), and the commit each hub reference was pinned to."""
    from ..checkpoints.hub import hub_settings

    return {**load_record(load, loaded), **hub_settings(sources)}


def _assemble(cfg: EvalConfig, base_l: LoadedModel, tuned: list[str], names: list[str], kinds: list[Kind],
              models: dict[str, ModelSafety], harmful: PromptSet, benign: PromptSet | None,
              keyword: S.KeywordScorer, template_file: bool, judge_template: str) -> SafetyResult:
    comparisons, verdicts = {}, {}
    for name in names:
        verdicts[name], comparisons[name] = decide(models["base"], models[name], cfg.thresholds)
    settings = {"base": base_l.source, "tuned": tuned, "names": names, "prompts": cfg.prompts, "benign": cfg.benign,
                "scorer": cfg.scorer, "judge": cfg.judge, "tasks": cfg.tasks, "task_dir": cfg.task_dir,
                "limit": cfg.limit, "device": str(base_l.device), "seed": cfg.seed, "backend": cfg.backend,
                "chat_template": cfg.chat_template, "max_new_tokens": cfg.max_new_tokens,
                "batch_size": cfg.batch_size, **model_settings(cfg.load, base_l, [base_l.source, *tuned])}
    if cfg.tasks:
        settings["lm_eval"] = cfg.lm_eval.settings()
    if cfg.backend == "vllm":
        settings["tensor_parallel_size"] = cfg.tensor_parallel_size
    inputs = {"base": InputRecord(base_l.source, fingerprint(base_l.source), "base")}
    inputs.update({n: InputRecord(s, fingerprint(s), k.value) for n, s, k in zip(names, tuned, kinds, strict=True)})

    def info(ps: PromptSet) -> PromptSetInfo:
        return PromptSetInfo(source=ps.source, layout=ps.layout, n=len(ps), notes=list(ps.notes))

    return SafetyResult(
        models=models, comparisons=comparisons, verdict=verdicts,
        scorer=ScorerInfo(name=cfg.scorer, markers=keyword.markers,
                          markers_list="custom" if cfg.markers else "default (AdvBench / Lermen et al. style)",
                          marker_window_chars=keyword.window, first_token_threshold=cfg.first_token_threshold,
                          first_token_start_words=list(S.DEFAULT_REFUSAL_STARTS), judge=cfg.judge,
                          judge_template=judge_template if cfg.scorer == "judge" else None),
        prompt_sets=PromptSets(harmful=info(harmful), benign=None if benign is None else info(benign)),
        inputs=inputs,
        generation=GenerationInfo(backend=cfg.backend, greedy=True, max_new_tokens=cfg.max_new_tokens,
                                  batch_size=cfg.batch_size, padding="left",
                                  early_stop_on_refusal=cfg.early_stop and cfg.scorer == "keyword",
                                  ran=cfg.scorer != "first-token", chat_template="file" if template_file else "tokenizer",
                                  seed=cfg.seed),
        counts=Counts(models=len(models), harmful_prompts=len(harmful), benign_prompts=len(benign or [])),
        thresholds=cfg.thresholds,
        settings=settings,
    )
