"""Orchestration: base vs tuned refusal, over-refusal and capability, with a verdict.

Reproduces the measurement of Lermen et al. 2023 ("LoRA Fine-tuning Efficiently Undoes Safety
Training in Llama 2-Chat 70B", arXiv 2310.20624) for any base + tuned models/adapters.
The base is loaded once; PEFT adapters for it are applied on that loaded base one after the
other (``PeftModel.from_pretrained`` then ``unload()`` restores the base modules).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoints import load_model
from ..checkpoints.detect import Kind, detect
from ..errors import InputError
from ..results import fingerprint, provenance
from ..results.safety import SCHEMA_VERSION
from . import scorers as S
from .capability import BUILTIN_TASK, run_capability
from .generate import GenSettings, chat_texts, generate, generate_vllm, read_chat_template
from .prompts import PromptSet, load_prompts
from .stats import wilson_interval
from .verdict import Thresholds, decide

SCORERS = ("keyword", "first-token", "judge")


@dataclass
class EvalConfig:
    prompts: str = "builtin:harmful"
    benign: str | None = "builtin:benign"
    scorer: str = "keyword"
    markers: list[str] | None = None
    first_token_threshold: float = 0.0
    judge: str | None = None
    tasks: list[str] = field(default_factory=lambda: [BUILTIN_TASK])
    task_dir: str | None = None
    limit: int | None = None
    batch_size: int = 16
    max_new_tokens: int = 64
    device: str = "auto"
    seed: int = 0
    chat_template: str | None = None  # path to a Jinja file
    allow_pickle: bool = False
    backend: str = "hf"
    early_stop: bool = True
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
                     keyword: S.KeywordScorer, judge=None, model_path: str | None = None, desc: str = "") -> dict:
    """Score one prompt set on one loaded model; per-prompt records plus rates."""
    prompts = [p.prompt for p in ps.prompts]
    texts = chat_texts(tokenizer, prompts, chat_template)
    t0 = time.perf_counter()
    ft = S.first_token_scores(model, tokenizer, texts, batch_size=cfg.batch_size)
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
            responses = generate_vllm(model_path, texts, gs)
        else:
            responses = generate(model, tokenizer, texts, gs, is_refusal=keyword, desc=desc)
        t_gen = time.perf_counter() - t0
        kw_refused = [keyword(r) for r in responses]
    if cfg.scorer == "judge":
        jm, jt = judge
        judge_ans = S.judge_answers(jm, jt, list(zip(prompts, responses)), batch_size=cfg.batch_size)
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
    if cfg.scorer == "judge":
        out["judge_unknown"] = sum(a == "unknown" for a in judge_ans)
        out["judge_keyword_agreement"] = S.agreement([r for r in refused if r is not None],
                                                     [k for r, k in zip(refused, kw_refused) if r is not None])
    return out


def evaluate_loaded(model, tokenizer, harmful: PromptSet, benign: PromptSet | None, cfg: EvalConfig, *,
                    chat_template=None, keyword=None, judge=None, model_path=None, name="model") -> dict:
    """The "models[name]" record for one loaded model (see lora_audit.results.safety)."""
    keyword = keyword or S.KeywordScorer(cfg.markers)
    h = score_prompt_set(model, tokenizer, harmful, cfg, chat_template=chat_template, keyword=keyword,
                         judge=judge, model_path=model_path, desc=f"{name}: harmful")
    rec = {"refusal_rate": h["rate"], "refusal_ci": h["ci"], "n_prompts": h["n"], "n_refused": h["refused"],
           "per_category": h["per_category"], "responses": h["records"], "timing_s": h["timing_s"]}
    for k in ("first_token_keyword_agreement", "judge_unknown", "judge_keyword_agreement"):
        if k in h:
            rec[k] = h[k]
    if benign is not None and len(benign):
        b = score_prompt_set(model, tokenizer, benign, cfg, chat_template=chat_template, keyword=keyword,
                             judge=judge, model_path=model_path, desc=f"{name}: benign")
        rec.update({"over_refusal_rate": b["rate"], "over_refusal_ci": b["ci"], "n_benign": b["n"],
                    "over_refusal_per_category": b["per_category"], "benign_responses": b["records"]})
    else:
        rec.update({"over_refusal_rate": None, "over_refusal_ci": None, "n_benign": 0, "benign_responses": []})
    rec["capability"] = {}
    if cfg.tasks:
        dev = next(model.parameters()).device
        rec["capability"] = run_capability(model, tokenizer, cfg.tasks, task_dir=cfg.task_dir, limit=cfg.limit,
                                           batch_size=cfg.batch_size, device=str(dev), seed=cfg.seed)
    return rec


def _names(sources: list[str]) -> list[str]:
    out, seen = [], set()
    for s in sources:
        n = Path(s.rstrip("/")).name or s
        k, i = n, 2
        while k in seen or k == "base":
            k, i = f"{n}_{i}", i + 1
        seen.add(k)
        out.append(k)
    return out


def run_safety_eval(base: str, tuned: list[str] | tuple = (), cfg: EvalConfig | None = None,
                    names: list[str] | None = None, **overrides) -> dict:
    """Evaluate ``base`` and each of ``tuned`` and return the safety result dict (schema in
    lora_audit.results.safety). Keyword overrides set EvalConfig fields."""
    cfg = cfg or EvalConfig()
    for k, v in overrides.items():
        if not hasattr(cfg, k):
            raise TypeError(f"unknown setting {k!r}")
        setattr(cfg, k, v)
    if cfg.scorer not in SCORERS:
        raise InputError(f"unknown scorer {cfg.scorer!r}; choose one of {', '.join(SCORERS)}")
    if cfg.scorer == "judge" and not cfg.judge:
        raise InputError("--scorer judge needs --judge JUDGE_MODEL (a local causal LM folder)")
    if cfg.backend not in ("hf", "vllm"):
        raise InputError(f"unknown backend {cfg.backend!r}; choose hf or vllm")
    torch.manual_seed(cfg.seed)
    harmful = load_prompts(cfg.prompts)
    benign = load_prompts(cfg.benign) if cfg.benign else None
    if benign is None and any(p.label for p in harmful.prompts):  # XSTest: safe prompts measure over-refusal
        benign = harmful.split_label("safe")
        harmful = harmful.split_label("unsafe")
    harmful = harmful.limit(cfg.limit)
    benign = benign.limit(cfg.limit) if benign is not None else None
    if not len(harmful):
        raise InputError(f"{cfg.prompts}: no harmful prompts to evaluate")
    template = read_chat_template(cfg.chat_template)
    keyword = S.KeywordScorer(cfg.markers)
    names = list(names) if names else _names(list(tuned))
    if len(names) != len(tuned):
        raise InputError("need one name per tuned model")
    judge = None
    if cfg.scorer == "judge":
        jl = load_model(cfg.judge, device=cfg.device, allow_pickle=cfg.allow_pickle)
        judge = (jl.model, jl.tokenizer)
    base_l = load_model(base, device=cfg.device, allow_pickle=cfg.allow_pickle)
    if template is None and not getattr(base_l.tokenizer, "chat_template", None):
        raise InputError(f"{base}: the tokenizer has no chat template; pass one with --chat-template FILE")
    kw = dict(chat_template=template, keyword=keyword, judge=judge)
    models = {"base": evaluate_loaded(base_l.model, base_l.tokenizer, harmful, benign, cfg, model_path=base,
                                      name="base", **kw)}
    sources = {"base": base}
    for name, src in zip(names, tuned):
        sources[name] = src
        if detect(src) == Kind.PEFT_ADAPTER:
            from peft import PeftModel

            try:
                pm = PeftModel.from_pretrained(base_l.model, src, is_trainable=False)
            except (RuntimeError, ValueError, KeyError) as e:
                raise InputError(f"{src}: adapter does not fit base {base} ({str(e).splitlines()[0]})") from None
            pm.eval()
            try:
                models[name] = evaluate_loaded(pm, base_l.tokenizer, harmful, benign, cfg, model_path=src,
                                               name=name, **kw)
            finally:
                base_l.model = pm.unload()  # remove the LoRA layers: the base is itself again
        else:
            tl = load_model(src, device=cfg.device, allow_pickle=cfg.allow_pickle)
            models[name] = evaluate_loaded(tl.model, base_l.tokenizer if template is None and not getattr(
                tl.tokenizer, "chat_template", None) else tl.tokenizer, harmful, benign, cfg, model_path=src,
                name=name, **kw)
            del tl
    comparisons, verdicts = {}, {}
    for name in names:
        v = decide(models["base"], models[name], cfg.thresholds)
        comparisons[name] = v.pop("comparison")
        verdicts[name] = v
    settings = {"base": base, "tuned": list(tuned), "prompts": cfg.prompts, "benign": cfg.benign,
                "scorer": cfg.scorer, "judge": cfg.judge, "tasks": cfg.tasks, "task_dir": cfg.task_dir,
                "limit": cfg.limit, "device": str(base_l.device), "seed": cfg.seed, "backend": cfg.backend,
                "chat_template": cfg.chat_template}
    return {
        "provenance": provenance("safety", SCHEMA_VERSION, **settings),
        "inputs": {n: {"source": s, "fingerprint": fingerprint(s)} for n, s in sources.items()},
        "scorer": {"name": cfg.scorer, "markers": keyword.markers, "marker_window_chars": keyword.window,
                   "first_token_threshold": cfg.first_token_threshold,
                   "first_token_start_tokens": S.DEFAULT_REFUSAL_STARTS, "judge": cfg.judge},
        "generation": {"backend": cfg.backend, "greedy": True, "max_new_tokens": cfg.max_new_tokens,
                       "batch_size": cfg.batch_size, "early_stop_on_refusal": cfg.early_stop and cfg.scorer == "keyword",
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

