"""One flat training loop for every method (no transformers Trainer): AdamW, constant LR after a
short linear warm-up, gradient clipping at 1.0, seeded batches with dynamic padding. What differs
between methods is in the method table (``methods.METHODS_TABLE``)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..errors import InputError
from ..progress import stage
from .data import DEFAULT_MAX_ROW_CHARS, IGNORE
from .methods import DEFAULT_LR, METHODS, Setup, get_method

__all__ = ["METHODS", "DEFAULT_LR", "check_method", "train", "fit"]


def check_method(method: str) -> str:
    """The canonical name of ``method``; InputError with a suggestion when there is none."""
    return get_method(method).name


def _check_dtype(m, dtype: str) -> str:
    """The dtype BASE is loaded in. Full fine-tuning updates every weight in place: in a 16-bit dtype
    most small AdamW steps round away (there are no float32 master weights here), so it trains in
    float32 only (``auto`` included)."""
    if m.full and dtype not in ("float32", "auto"):
        raise InputError(f"--method {m.name} --dtype {dtype}: full fine-tuning trains the weights themselves and "
                         "needs float32 (16-bit weights lose most small updates); 16-bit bases are for adapter methods")
    return "float32" if m.full else dtype


def _check_hyper(steps: int, rank: int, alpha: float, lr: float, batch_size: int, max_length: int) -> None:
    if steps < 1 or rank < 1 or batch_size < 1 or max_length < 2:
        raise InputError("steps, rank and batch size must be >= 1 and max length >= 2")
    for name, v in (("--lr", lr), ("--alpha", alpha)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InputError(f"{name} must be a finite number above 0, got {v}")


def train(*, method: str, base: str, data: str, out: str | Path, steps: int = 100, rank: int = 8,
          alpha: float = 16.0, lr: float | None = None, batch_size: int = 4, max_length: int = 256,
          target_modules: list[str] | None = None, seed: int = 0, device: str = "auto",
          warmup: int | None = None, overwrite: bool = False, max_row_chars: int | None = DEFAULT_MAX_ROW_CHARS,
          dtype: str = "float32", precision: str = "float32"):
    """Fine-tune ``base`` and save to ``out`` (a PEFT adapter, or a safetensors model folder for
    ``full``) with ``out/training.json``; see ``fit`` for the arguments. An existing ``out`` is
    replaced only when lora-audit wrote it and ``overwrite`` is set (checked before training).
    Returns the training record (``results.training.TrainingResult``)."""
    from ..io import check_output_dir, check_outputs

    check_outputs([], [base, data], folders=[out])
    check_output_dir(out, overwrite=overwrite)
    model, tok, record = fit(method=method, base=base, data=data, steps=steps, rank=rank, alpha=alpha, lr=lr,
                             batch_size=batch_size, max_length=max_length, target_modules=target_modules,
                             seed=seed, device=device, warmup=warmup, max_row_chars=max_row_chars, dtype=dtype,
                             precision=precision)
    from . import export

    export.save(model, tok, out, record, full=get_method(record.method).full, overwrite=overwrite)
    return record


def _adamw(params: list, lr: float):
    """AdamW, fused (one kernel over all parameters) where torch has it for the parameters' device:
    the same update to float32 rounding, with optimizer steps about 3x faster on CPU for a 135M
    model, full fine-tuning steps about 1.3x (``bench/bench_training.py``); torch's default
    implementation otherwise."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0, fused=True)
    except (RuntimeError, ValueError):  # a device or dtype the fused kernel does not support
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


PRECISIONS = ("float32", "bfloat16")


def check_precision(precision: str) -> str:
    if precision not in PRECISIONS:
        raise InputError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return precision


def bfloat16_is_fast(device: str) -> bool:
    """Whether bfloat16 matrix products run natively on ``device`` (a CUDA GPU that supports them, a
    CPU with AMX or AVX-512 BF16): where mixed precision pays off rather than being emulated."""
    if device.startswith("cuda"):
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device != "cpu":
        return False
    probes = [getattr(torch.cpu, name, None) for name in ("_is_amx_tile_supported", "_is_avx512_bf16_supported")]
    return any(bool(p()) for p in probes if p is not None)  # torch's own CPU feature probes (private, may go)


def response_loss(model, batch: dict, trim: bool = True) -> torch.Tensor:
    """The mean next-token cross-entropy over the labelled (response) tokens of ``batch``, as the
    model's own ``labels`` loss computes it, but with the output layer applied only from the first
    position that predicts a labelled token (``logits_to_keep``): the prompt and system-prompt
    positions before it need no logits. With a 49k-token vocabulary and chat prompts that make up
    most of each row, that is most of the output layer's work (``bench/bench_training.py``)."""
    if not trim:
        return model(**batch).loss
    labels = batch["labels"]
    targets = labels[:, 1:]  # position p predicts token p + 1
    seen = (targets != IGNORE).any(dim=0).nonzero()
    first = int(seen[0]) if len(seen) else 0
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                logits_to_keep=labels.shape[1] - first)
    logits = out.logits[:, :-1, :]  # positions first .. T-2
    return torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                             targets[:, first:].reshape(-1), ignore_index=IGNORE)


def _steps(prepared, batches, steps: int, lr: float, warmup: int, method: str,
           precision: str = "float32") -> list[float]:
    """The loop itself; returns the loss curve. ``precision="bfloat16"``: forward and backward under
    ``torch.autocast`` to bfloat16, weights, gradients and optimizer states stay float32."""
    from ..progress import progress

    model = prepared.model
    from ..checkpoints.models import accepts_logits_to_keep

    trim = accepts_logits_to_keep(model)
    model.train()
    dev = next(model.parameters()).device
    params = [p for p in model.parameters() if p.requires_grad]
    opt = _adamw(params, lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / (warmup + 1)))
    if prepared.optimizer_hook is not None:
        prepared.optimizer_hook(opt)
    losses: list[float] = []
    with progress(total=steps, desc=f"finetune {method}", unit="step") as bar:
        for step in range(steps):
            batch = {k: v.to(dev) for k, v in next(batches).items()}
            if prepared.before_forward is not None:
                prepared.before_forward()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                loss = response_loss(model, batch, trim)
            loss.backward()
            if prepared.after_backward is not None:
                prepared.after_backward()
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
    return losses


def fit(*, method: str, base: str, data: str, steps: int = 100, rank: int = 8,
        alpha: float = 16.0, lr: float | None = None, batch_size: int = 4, max_length: int = 256,
        target_modules: list[str] | None = None, seed: int = 0, device: str = "auto",
        warmup: int | None = None, max_row_chars: int | None = DEFAULT_MAX_ROW_CHARS, dtype: str = "float32",
        precision: str = "float32"):
    """Fine-tune ``base`` on ``data`` with ``method`` (nothing is written).

    Args:
        method: one of ``METHODS``.
        base: model folder (anything ``lora_audit.checkpoints.load_model`` opens).
        data: JSONL file ({"prompt","response"} or {"text"}) or ``builtin:NAME``.
        target_modules: module names for the adapters; default every linear layer but the head.
        max_row_chars: longest training row accepted (characters; None: no limit).
        dtype: the dtype BASE is loaded in (``--dtype``: float32, or auto / bfloat16 / float16 for the
            frozen base of adapter methods; the adapter weights peft adds stay float32).
        precision: "float32", or "bfloat16" for mixed precision (``_steps``; about 1.4x faster per
            step where bfloat16 is native, ``bfloat16_is_fast``, e.g. a CPU with AMX). The model then
            uses eager attention for training: torch's fused CPU attention runs its backward pass
            about 10x slower in bfloat16 than in float32 (measured with torch 2.13).
    Returns (trained model in eval mode, tokenizer, record): the record (a ``TrainingResult``) is
    what ``train`` writes to ``out/training.json`` (method, hyper-parameters and seed in its
    settings, loss curve, wall time).
    """
    from ..checkpoints import load_model
    from ..checkpoints.hub import hub_settings
    from ..results.training import TrainingResult
    from .data import Batches, load_records

    m = get_method(method)
    lr = lr if lr is not None else m.default_lr
    dtype = _check_dtype(m, dtype)
    _check_hyper(steps, rank, alpha, lr, batch_size, max_length)
    check_precision(precision)
    rows = load_records(data, max_chars=max_row_chars)  # fail on bad data before loading the model
    if not m.full:
        from .lora import check_rank, header_linear_shapes

        shapes = header_linear_shapes(base)  # a folder's headers: before the model is loaded
        if shapes is not None:
            check_rank(shapes, rank, target_modules, method=m.name, factor=m.rank_factor)
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    stage(f"finetune: loading {base}")
    loaded = load_model(base, device=device, dtype=dtype)
    dev = str(loaded.device)
    if precision == "bfloat16" and hasattr(loaded.model, "set_attn_implementation"):
        loaded.model.set_attn_implementation("eager")
    batches = Batches(rows, loaded.tokenizer, batch_size=batch_size, max_length=max_length, seed=seed)
    setup = Setup(model=loaded.model, batches=batches, rank=rank, alpha=alpha, lr=lr, target_modules=target_modules,
                  seed=seed, load_base=lambda: load_model(base, device=dev, dtype=dtype).model)
    if not m.full:
        from .lora import check_rank, check_targets, linear_shapes

        check_targets(loaded.model, target_modules)
        check_rank(linear_shapes(loaded.model), rank, target_modules, method=m.name, factor=m.rank_factor)
    prepared = m.prepare(setup)
    warmup = min(10, steps // 10) if warmup is None else warmup
    losses = _steps(prepared, batches, steps, lr, warmup, m.name, precision)
    settings = dict(method=m.name, base=str(base), data=str(data), steps=steps, rank=rank, alpha=prepared.alpha, lr=lr,
                    batch_size=batch_size, max_length=max_length, target_modules=target_modules, seed=seed,
                    warmup=warmup, device=dev, examples=len(batches.examples),
                    dtype=str(loaded.dtype).replace("torch.", ""), precision=precision, **hub_settings([base]))
    trainable = sum(p.numel() for p in prepared.model.parameters() if p.requires_grad)
    model, saved_as = prepared.model, None
    if prepared.export is not None:
        model, saved_as = prepared.export(model)
        model = model.eval()
    record = TrainingResult(method=m.name, loss=losses, final_loss=losses[-1], trainable_parameters=trainable,
                            wall_time_s=round(time.perf_counter() - t0, 3), saved_as=saved_as, settings=settings)
    return model, loaded.tokenizer, record
