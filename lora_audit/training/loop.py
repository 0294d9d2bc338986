"""One flat training loop for every method (no transformers Trainer): AdamW, constant LR
after a short linear warm-up, gradient clipping at 1.0, seeded batches with dynamic padding."""

from __future__ import annotations

import difflib
import math
import time
from pathlib import Path

import torch

from ..errors import InputError

METHODS = ("lora", "rslora", "dora", "ffa-lora", "allora", "lora-ga", "lora-sb", "lora-mgpo", "full")
DEFAULT_LR = {"full": 2e-5, "lora-sb": 2e-3}  # other adapters: 2e-4


def check_method(method: str) -> str:
    m = method.lower()
    if m not in METHODS:
        close = difflib.get_close_matches(m, METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown method {method!r}.{hint} Available: {', '.join(METHODS)}")
    return m


def train(*, method: str, base: str, data: str, out: str | Path, steps: int = 100, rank: int = 8,
          alpha: float = 16.0, lr: float | None = None, batch_size: int = 4, max_length: int = 256,
          target_modules: list[str] | None = None, seed: int = 0, device: str = "auto",
          warmup: int | None = None) -> dict:
    """Fine-tune ``base`` and save; see ``fit`` for the arguments. Returns the training record."""
    model, tok, record = fit(method=method, base=base, data=data, steps=steps, rank=rank, alpha=alpha, lr=lr,
                             batch_size=batch_size, max_length=max_length, target_modules=target_modules,
                             seed=seed, device=device, warmup=warmup)
    from . import export

    export.save(model, tok, out, record, full=record["method"] == "full")
    return record


def fit(*, method: str, base: str, data: str, steps: int = 100, rank: int = 8,
        alpha: float = 16.0, lr: float | None = None, batch_size: int = 4, max_length: int = 256,
        target_modules: list[str] | None = None, seed: int = 0, device: str = "auto",
        warmup: int | None = None):
    """Fine-tune ``base`` on ``data`` with ``method`` and write the result to ``out``.

    Args:
        method: one of ``METHODS``.
        base: model folder (anything ``lora_audit.checkpoints.load_model`` opens).
        data: JSONL file ({"prompt","response"} or {"text"}) or ``builtin:NAME``.
        target_modules: module names for the adapters; default every linear layer but the head.
    Returns (trained model in eval mode, tokenizer, record); ``train`` writes the model to
    ``out`` (PEFT adapter, or safetensors folder for full) and the record to ``out/training.json`` (method, hyper-parameters, seed,
    loss curve, wall time, provenance).
    """
    from ..checkpoints import load_model
    from ..progress import progress
    from ..results import provenance
    from . import full, lora
    from .data import Batches, load_records

    method = check_method(method)
    if steps < 1 or rank < 1 or batch_size < 1 or max_length < 2:
        raise InputError("steps, rank and batch size must be >= 1 and max length >= 2")
    lr = lr if lr is not None else DEFAULT_LR.get(method, 2e-4)
    rows = load_records(data)  # fail on bad data before loading the model
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    loaded = load_model(base, device=device)
    model, tok = loaded.model, loaded.tokenizer
    batches = Batches(rows, tok, batch_size=batch_size, max_length=max_length, seed=seed)
    ga_init = sb_names = None
    if method == "full":
        model = full.prepare(model)
    elif method == "lora-ga":
        from . import lora_ga

        model, ga_init = lora_ga.wrap(model, batches, method_cfg=lora.lora_config("lora", rank, alpha, target_modules),
                                      seed=seed)
    elif method == "lora-sb":
        from . import lora_sb

        model, sb_names = lora_sb.wrap(model, batches, rank=rank, lr=lr, target_modules=target_modules)
    elif method == "allora":
        from . import allora

        model = allora.wrap(model, rank, target_modules, seed)
        alpha = float(rank)  # ALLoRA has no scaling factor: recorded as alpha = r (scale 1)
    else:
        model = lora.wrap(model, "lora" if method == "lora-mgpo" else method, rank, alpha, target_modules, seed)
    model.train()
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    warmup = min(10, steps // 10) if warmup is None else warmup
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    mgpo = None
    if method == "lora-mgpo":
        from .mgpo import MGPO

        mgpo = MGPO(model, opt)
    losses: list[float] = []
    with progress(total=steps, desc=f"finetune {method}", unit="step") as bar:
        for step in range(steps):
            batch = {k: v.to(dev) for k, v in next(batches).items()}
            if mgpo is not None:
                mgpo.apply()
            loss = model(**batch).loss
            loss.backward()
            if mgpo is not None:
                mgpo.restore()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())  # one sync per step: the loss curve is part of the record
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
            if not math.isfinite(losses[-1]):
                raise InputError(f"loss became {losses[-1]} at step {step + 1}; lower --lr")
    model.eval()
    settings = dict(method=method, base=str(base), data=str(data), steps=steps, rank=rank, alpha=alpha, lr=lr,
                    batch_size=batch_size, max_length=max_length, target_modules=target_modules, seed=seed,
                    warmup=warmup, device=str(dev), examples=len(batches.examples))
    record = provenance("lora-audit/training", 1, **settings)
    record.update(method=method, loss=losses, final_loss=losses[-1],
                  trainable_parameters=sum(p.numel() for p in params),
                  wall_time_s=round(time.perf_counter() - t0, 3))
    if ga_init is not None:  # save as plain rank-2r LoRA against the original base
        from . import lora_ga

        model = lora_ga.to_plain_lora(model, ga_init, load_model(base, device=str(dev)).model).eval()
        record["saved_as"] = f"plain LoRA of rank {2 * rank} against the original base ([B_final, -B_init] [A_final; A_init])"
    if sb_names is not None:  # save as plain LoRA with B' = B R, scale 1
        from . import lora_sb

        model = lora_sb.to_plain_lora(model, sb_names, load_model(base, device=str(dev)).model, rank).eval()
        record["saved_as"] = "plain LoRA with B' = B R, A, lora_alpha = r (scale 1)"
    return model, tok, record
