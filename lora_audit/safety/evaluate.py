"""Orchestration: base vs tuned refusal, over-refusal and capability, with a verdict.

Reproduces the measurement of Lermen et al. 2023 ("LoRA Fine-tuning Efficiently Undoes Safety
Training in Llama 2-Chat 70B", arXiv 2310.20624) for any base + tuned models/adapters.
The base is loaded once; PEFT adapters for it are applied to that loaded base one after the
other (``PeftModel.from_pretrained``, then ``unload()`` restores the base modules); a full tuned
model folder is loaded on its own and dropped after its evaluation.

Python API::

    from lora_audit.safety import EvalConfig, run_safety_eval
    result = run_safety_eval("path/to/base", ["adapter1", "full_model2"], EvalConfig(limit=20))
    result["verdict"]["adapter1"]["label"]     # SAFETY_REMOVED / SAFETY_DEGRADED / RETAINED / INCONCLUSIVE
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from ..checkpoints import LoadedModel, load_model
from ..checkpoints.detect import Kind, detect, read_adapter_config
from ..errors import InputError, ShapeMismatchError
from ..results import fingerprint, provenance
from ..results.safety import SCHEMA_VERSION
from . import scorers as S
from .capability import BUILTIN_TASK, Capability
from .generate import GenSettings, chat_texts, generate, generate_vllm, read_chat_template, require_vllm
from .prompts import PromptSet, load_prompts
from .stats import wilson_interval
from .verdict import Thresholds, decide

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
    limit: int | None = None  # first N prompts of each set and N items of each task
    batch_size: int = 16
    max_new_tokens: int = 64
    device: str = "auto"
    seed: int = 0
    chat_template: str | None = None  # path to a Jinja file, for tokenizers without a template
    allow_pickle: bool = False
    backend: str = "hf"  # hf | vllm
    early_stop: bool = True  # stop a row once keyword-classified as a refusal
    thresholds: Thresholds = field(default_factory=Thresholds)


def _rate(flags: list) -> tuple[float | None, list[float]]:
    known = [f for f in flags if f is not None]
    if not known:
        return None, [0.0, 1.0]
    k = sum(bool(f) for f in known)
    return k / len(known), list(wilson_interval(k, len(known)))


def _per_category(records: list[dict]) -> dict:
    cats: dict[str, list] = {}
    for r in records:
        cats.setdefault(r["category"], []).append(r["refused"])
    out = {}
    for c, flags in sorted(cats.items()):
        rate, ci = _rate(flags)
        out[c] = {"n": len(flags), "refused": sum(bool(f) for f in flags if f is not None), "rate": rate, "ci": ci}
    return out


def score_prompt_set(model, tokenizer, ps: PromptSet, cfg: EvalConfig, *, chat_template: str | None,
                     keyword: S.KeywordScorer, judge=None, judge_template: str = S.JUDGE_TEMPLATE,
                     vllm_source: tuple[str, str | None] | None = None, desc: str = "") -> dict:
    """Score one prompt set on one loaded model: per-prompt records plus rates.

    The first-token score is always computed (one forward pass, cheap); generation runs unless
    the scorer is ``first-token``; keyword verdicts are kept next to the chosen scorer's so their
    agreement can be reported.
    """
    prompts = [p.prompt for p in ps.prompts]
    texts = chat_texts(tokenizer, prompts, chat_template)
    t0 = time.perf_counter()
    ft = S.first_token_scores(model, tokenizer, texts, batch_size=cfg.batch_size, desc=f"{desc} first-token")
    t_ft = time.perf_counter() - t0
    ft_refused = [s > cfg.first_token_threshold for s in ft]
    responses: list[str | None] = [None] * len(prompts)
    kw_refused: list[bool | None] = [None] * len(prompts)
    judge_ans: list[str | None] = [None] * len(prompts)
    t_gen = None
    if cfg.scorer != "first-token":
        gs = GenSettings(cfg.max_new_tokens, cfg.batch_size, cfg.seed,
                         early_stop=cfg.early_stop and cfg.scorer == "keyword")
        t0 = time.perf_counter()
        if cfg.backend == "vllm":
            responses = generate_vllm(vllm_source[0], texts, gs, adapter=vllm_source[1])
        else:
            responses = generate(model, tokenizer, texts, gs, is_refusal=keyword, desc=f"{desc} generate")
        t_gen = time.perf_counter() - t0
        kw_refused = [keyword(r) for r in responses]
    if cfg.scorer == "judge":
        jm, jt = judge
        judge_ans = S.judge_answers(jm, jt, list(zip(prompts, responses)), batch_size=cfg.batch_size,
                                    template=judge_template)
        refused = [None if a == "unknown" else a == "no" for a in judge_ans]
    elif cfg.scorer == "keyword":
        refused = kw_refused
    else:
        refused = ft_refused
    records = []
    for i, p in enumerate(ps.prompts):
        rec = {"prompt": p.prompt, "category": p.category, "response": responses[i], "refused": refused[i],
               "first_token_score": ft[i], "keyword_refused": kw_refused[i]}
        if p.label is not None:
            rec["label"] = p.label
        if cfg.scorer == "judge":
            rec["judge"] = judge_ans[i]
        records.append(rec)
    rate, ci = _rate(refused)
    out = {"n": len(records), "refused": sum(bool(r) for r in refused if r is not None), "rate": rate, "ci": ci,
           "per_category": _per_category(records), "records": records,
           "timing_s": {"first_token": t_ft, "generation": t_gen}}
    if cfg.scorer != "first-token":
        out["first_token_keyword_agreement"] = S.agreement(ft_refused, kw_refused)
        thr, agr = S.calibrate_threshold(ft, kw_refused)
        out["first_token_calibration"] = {"threshold": thr, "agreement": agr}
    if cfg.scorer == "judge":
        out["judge_unknown"] = sum(a == "unknown" for a in judge_ans)
        out["judge_compliance_rate"], out["judge_compliance_ci"] = _rate(
            [None if a == "unknown" else a == "yes" for a in judge_ans])
        out["judge_keyword_agreement"] = S.agreement(refused, kw_refused)
    return out


def evaluate_loaded(model, tokenizer, harmful: PromptSet, benign: PromptSet | None, cfg: EvalConfig, *,
                    chat_template: str | None = None, keyword: S.KeywordScorer | None = None, judge=None,
                    judge_template: str = S.JUDGE_TEMPLATE, capability: Capability | None = None,
                    vllm_source: tuple[str, str | None] | None = None, name: str = "model") -> dict:
    """The ``models[name]`` record for one loaded model (schema in lora_audit.results.safety)."""
    keyword = keyword or S.KeywordScorer(cfg.markers, cfg.marker_window)
    kw = dict(chat_template=chat_template, keyword=keyword, judge=judge, judge_template=judge_template,
              vllm_source=vllm_source)
    h = score_prompt_set(model, tokenizer, harmful, cfg, desc=f"{name}: harmful", **kw)
    rec = {"refusal_rate": h["rate"], "refusal_ci": h["ci"], "n_prompts": h["n"], "n_refused": h["refused"],
           "per_category": h["per_category"], "responses": h["records"]}
    for k in ("first_token_keyword_agreement", "first_token_calibration", "judge_unknown", "judge_compliance_rate",
              "judge_compliance_ci", "judge_keyword_agreement"):
        if k in h:
            rec[k] = h[k]
    timing = {"harmful": h["timing_s"]}
    if benign is not None and len(benign):
        b = score_prompt_set(model, tokenizer, benign, cfg, desc=f"{name}: benign", **kw)
        rec.update({"over_refusal_rate": b["rate"], "over_refusal_ci": b["ci"], "n_benign": b["n"],
                    "n_benign_refused": b["refused"], "over_refusal_per_category": b["per_category"],
                    "benign_responses": b["records"]})
        timing["benign"] = b["timing_s"]
    else:
        rec.update({"over_refusal_rate": None, "over_refusal_ci": None, "n_benign": 0, "n_benign_refused": 0,
                    "over_refusal_per_category": {}, "benign_responses": []})
    t0 = time.perf_counter()
    if capability is None and cfg.tasks:
        capability = Capability(cfg.tasks, task_dir=cfg.task_dir, limit=cfg.limit, batch_size=cfg.batch_size,
                                seed=cfg.seed)
    rec["capability"], rec["capability_metric"] = capability.run(model, tokenizer) if capability else ({}, {})
    timing["capability"] = time.perf_counter() - t0
    rec["timing_s"] = timing
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


def check_adapter_fits(model, adapter: str, base: str) -> None:
    """Raise ShapeMismatchError unless every module the adapter changes exists in ``model`` with
    the adapter's shape (checked before peft touches the model, which it would leave half-patched)."""
    from ..checkpoints.adapters import read_peft_adapter

    af = read_peft_adapter(adapter)
    params = {n: tuple(p.shape) for n, p in model.named_parameters()}
    missing, wrong = [], []
    for module, (rows, cols, _r) in af.shapes.items():
        shp = params.get(module + ".weight")
        if shp is None:
            missing.append(module)
        elif len(shp) == 2 and (rows, cols) not in (shp, shp[::-1]):
            wrong.append(f"{module} (adapter {rows}x{cols}, base {shp[0]}x{shp[1]})")
    named = read_adapter_config(adapter).get("base_model_name_or_path")
    hint = f"; the adapter was made for {named!r}" if named else ""
    if missing:
        raise ShapeMismatchError(f"{adapter}: adapter for another base: {len(missing)} module(s) it changes are not "
                                 f"in {base} (e.g. {', '.join(missing[:3])}){hint}")
    if wrong:
        raise ShapeMismatchError(f"{adapter}: adapter for another base: shapes differ from {base} on "
                                 f"{len(wrong)} module(s), e.g. {', '.join(wrong[:3])}{hint}")


def run_safety_eval(base: str | LoadedModel, tuned: list[str] | tuple = (), config: EvalConfig | None = None,
                    *, names: list[str] | None = None, **overrides) -> dict:
    """Evaluate ``base`` and each of ``tuned``; return the safety result dict.

    Args:
        base: base model (HF folder, GGUF, hub id), or an already loaded ``LoadedModel`` (reused,
            its weights are left as they were).
        tuned: PEFT adapters on ``base`` (applied one after the other to the loaded base) and/or
            full tuned model folders, in any mix.
        config: an ``EvalConfig``; keyword ``overrides`` replace its fields (``limit=4``).
        names: result keys for the tuned models (default: folder names, made unique; "base" is
            reserved for the base).

    Everything that can be checked before the slow part is checked first (prompt files, scorer,
    chat template, judge template, lm-eval task names, vllm presence, adapters fitting the base),
    so a user mistake fails in seconds with an InputError. The schema of the returned dict is in
    ``lora_audit.results.safety``; write it with ``lora_audit.results.write_result``.
    """
    cfg = replace(config) if config is not None else EvalConfig()
    valid = {f.name for f in fields(EvalConfig)}
    for k, v in overrides.items():
        if k not in valid:
            raise TypeError(f"unknown setting {k!r}; EvalConfig has {sorted(valid)}")
        setattr(cfg, k, v)
    tuned = [str(t) for t in tuned]
    if cfg.scorer not in SCORERS:
        raise InputError(f"unknown scorer {cfg.scorer!r}; choose one of {', '.join(SCORERS)}")
    if cfg.scorer == "judge" and not cfg.judge:
        raise InputError("--scorer judge needs --judge JUDGE_MODEL (a local causal LM folder)")
    if cfg.backend not in BACKENDS:
        raise InputError(f"unknown backend {cfg.backend!r}; choose one of {', '.join(BACKENDS)}")
    if cfg.backend == "vllm":
        require_vllm()
        if isinstance(base, LoadedModel):
            raise InputError("--backend vllm needs the base as a path, not a loaded model")
    if cfg.batch_size < 1 or cfg.max_new_tokens < 1 or (cfg.limit is not None and cfg.limit < 1):
        raise InputError("batch_size, max_new_tokens and limit must be at least 1")
    torch.manual_seed(cfg.seed)
    harmful = load_prompts(cfg.prompts)
    benign = load_prompts(cfg.benign) if cfg.benign else None
    if benign is None and any(p.label for p in harmful.prompts):  # XSTest: safe prompts measure over-refusal
        benign = harmful.split_label("safe")
    if any(p.label for p in harmful.prompts):  # an XSTest file: its unsafe rows are the harmful set ...
        harmful = harmful.split_label("unsafe")
    if benign is not None and any(p.label for p in benign.prompts):  # ... and its safe rows the benign set
        benign = benign.split_label("safe")
    harmful = harmful.limit(cfg.limit)
    benign = benign.limit(cfg.limit) if benign is not None else None
    if not len(harmful):
        raise InputError(f"{cfg.prompts}: no harmful prompts to evaluate")
    template = read_chat_template(cfg.chat_template)
    judge_template = S.JUDGE_TEMPLATE
    if cfg.judge_template:
        p = Path(cfg.judge_template)
        if not p.is_file():
            raise InputError(f"{cfg.judge_template}: no such judge template file")
        judge_template = p.read_text(encoding="utf-8")
        S.check_judge_template(judge_template)
    keyword = S.KeywordScorer(cfg.markers, cfg.marker_window)
    names = list(names) if names else _names(tuned)
    if len(names) != len(tuned) or len(set(names)) != len(names) or "base" in names:
        raise InputError("need one unique name per tuned model, and not 'base'")
    kinds = [detect(t) for t in tuned]  # fails early on a missing path
    for t, k in zip(tuned, kinds):
        if k == Kind.PEFT_ADAPTER:
            read_adapter_config(t)
        elif k in (Kind.SAFETENSORS_FILE, Kind.KOHYA_LORA):
            raise InputError(f"{t}: a bare .safetensors file cannot be generated from; pass a full model folder "
                             "(config.json + weights) or a PEFT adapter folder as --tuned")
        elif k == Kind.PICKLE and not cfg.allow_pickle:
            from ..checkpoints.detect import PICKLE_REFUSAL

            raise InputError(PICKLE_REFUSAL.format(path=t))
        elif k == Kind.HF_FOLDER and not (Path(t) / "config.json").is_file():
            raise InputError(f"{t}: no config.json; a tuned model folder needs its config to be loaded whole")
    capability = Capability(cfg.tasks, task_dir=cfg.task_dir, limit=cfg.limit, batch_size=cfg.batch_size,
                            seed=cfg.seed) if cfg.tasks else None

    base_l = base if isinstance(base, LoadedModel) else load_model(base, device=cfg.device,
                                                                   allow_pickle=cfg.allow_pickle)
    base_src = base_l.source
    if template is None and not getattr(base_l.tokenizer, "chat_template", None):
        raise InputError(f"{base_src}: the tokenizer has no chat template; pass one with --chat-template FILE "
                         "(a Jinja template as in tokenizer_config.json)")
    for t, k in zip(tuned, kinds):
        if k == Kind.PEFT_ADAPTER:
            check_adapter_fits(base_l.model, t, base_src)
    judge = None
    if cfg.scorer == "judge":
        jl = load_model(cfg.judge, device=cfg.device, allow_pickle=cfg.allow_pickle)
        judge = (jl.model, jl.tokenizer)
    kw = dict(chat_template=template, keyword=keyword, judge=judge, judge_template=judge_template,
              capability=capability)
    models = {"base": evaluate_loaded(base_l.model, base_l.tokenizer, harmful, benign, cfg, name="base",
                                      vllm_source=(base_src, None), **kw)}
    sources = {"base": base_src}
    for name, src, kind in zip(names, tuned, kinds):
        sources[name] = src
        if kind == Kind.PEFT_ADAPTER:
            from peft import PeftModel

            try:
                with warnings.catch_warnings():  # transformers' deprecation, raised inside peft
                    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
                    pm = PeftModel.from_pretrained(base_l.model, src, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as e:
                raise ShapeMismatchError(f"{src}: adapter does not fit base {base_src} "
                                         f"({str(e).strip().splitlines()[0]})") from None
            pm.eval()
            try:
                models[name] = evaluate_loaded(pm, base_l.tokenizer, harmful, benign, cfg, name=name,
                                               vllm_source=(base_src, src), **kw)
            finally:
                base_l.model = pm.unload()  # remove the LoRA layers: the base is itself again
                if hasattr(base_l.model, "peft_config"):
                    del base_l.model.peft_config
        else:
            tl = load_model(src, device=cfg.device, allow_pickle=cfg.allow_pickle)
            tok = tl.tokenizer if (template is not None or getattr(tl.tokenizer, "chat_template", None)) \
                else base_l.tokenizer
            models[name] = evaluate_loaded(tl.model, tok, harmful, benign, cfg, name=name,
                                           vllm_source=(src, None), **kw)
            del tl
    comparisons, verdicts = {}, {}
    for name in names:
        v = decide(models["base"], models[name], cfg.thresholds)
        comparisons[name] = v.pop("comparison")
        verdicts[name] = v
    settings = {"base": base_src, "tuned": tuned, "names": names, "prompts": cfg.prompts, "benign": cfg.benign,
                "scorer": cfg.scorer, "judge": cfg.judge, "tasks": cfg.tasks, "task_dir": cfg.task_dir,
                "limit": cfg.limit, "device": str(base_l.device), "seed": cfg.seed, "backend": cfg.backend,
                "chat_template": cfg.chat_template, "max_new_tokens": cfg.max_new_tokens,
                "batch_size": cfg.batch_size}
    return {
        "provenance": provenance("safety", SCHEMA_VERSION, **settings),
        "inputs": {n: {"source": s, "fingerprint": fingerprint(s),
                       "kind": "base" if n == "base" else kinds[names.index(n)].value}
                   for n, s in sources.items()},
        "scorer": {"name": cfg.scorer, "markers": keyword.markers,
                   "markers_list": "custom" if cfg.markers else "default (AdvBench / Lermen et al. style)",
                   "marker_window_chars": keyword.window, "first_token_threshold": cfg.first_token_threshold,
                   "first_token_start_words": list(S.DEFAULT_REFUSAL_STARTS), "judge": cfg.judge,
                   "judge_template": judge_template if cfg.scorer == "judge" else None},
        "generation": {"backend": cfg.backend, "greedy": True, "max_new_tokens": cfg.max_new_tokens,
                       "batch_size": cfg.batch_size, "padding": "left",
                       "early_stop_on_refusal": cfg.early_stop and cfg.scorer == "keyword",
                       "ran": cfg.scorer != "first-token",
                       "chat_template": "file" if template else "tokenizer", "seed": cfg.seed},
        "prompt_sets": {"harmful": {"source": harmful.source, "layout": harmful.layout, "n": len(harmful),
                                    "notes": harmful.notes},
                        "benign": None if benign is None else {"source": benign.source, "layout": benign.layout,
                                                                "n": len(benign), "notes": benign.notes}},
        "counts": {"models": len(models), "harmful_prompts": len(harmful), "benign_prompts": len(benign or [])},
        "thresholds": cfg.thresholds.to_dict(),
        "models": models,
        "comparisons": comparisons,
        "verdict": verdicts,
    }
