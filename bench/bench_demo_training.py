"""Where the demo's training time goes, and what each of its speed-ups buys, in one run.

1. Per step (forward, backward, clipping, fused AdamW) of full fine-tuning and of LoRA r=8 on every
   linear layer, on the demo's batches (4 rows of builtin:alpaca-mini in the chat template, at
   most 64 tokens): float32 with the model's own loss over every position (the baseline), float32
   with the output layer only from the first position that predicts a response token
   (``training.loop.response_loss``), and that in bfloat16 mixed precision with eager attention
   (``precision="bfloat16"``, where bfloat16 is native). Medians of ``--steps`` steps after two
   warm-up steps, alternating between the settings so that a change in the machine's load hits
   them alike.
2. Two demo-sized LoRA runs (``--run-steps`` steps each, through ``training.loop.fit``) one after
   the other with every core, against the same two runs at once in two processes with
   ``cores / 2`` threads each (``studies.demo.train_runs``' worker setup).

The model is SmolLM2-135M-Instruct when its converted folder is in the lora-audit cache, else a
random Llama of its shape. Prints the load average before and after: on a shared machine the
figures are only as good as it was quiet.

    python bench/bench_demo_training.py             # a few minutes on 2 cores
    python bench/bench_demo_training.py --steps 3 --run-steps 8
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import multiprocessing as mp
import os
import statistics
import time

import torch


def model_and_tokenizer():
    from lora_audit.checkpoints import load_model
    from lora_audit.checkpoints.default_model import cache_root

    path = cache_root() / "models" / "SmolLM2-135M-Instruct"
    if not (path / "config.json").is_file():
        raise SystemExit(f"{path}: run `lora-audit model path` (or the demo) once first")
    loaded = load_model(str(path), device="cpu")
    return loaded.model, loaded.tokenizer, str(path)


def step_times(model, batches, params, settings: dict, steps: int) -> dict[str, float]:
    from lora_audit.training.loop import _adamw, response_loss

    opt = _adamw(params, 1e-5)
    times: dict[str, list[float]] = {k: [] for k in settings}
    for i in range(steps + 2):
        for name, (trim, bf16) in settings.items():
            batch = batches[i % len(batches)]
            model.set_attn_implementation("eager" if bf16 else "sdpa")
            t0 = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = response_loss(model, batch, trim)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if i >= 2:
                times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def _run(base: str, threads: int, steps: int, seed: int, precision: str) -> float:
    torch.set_num_threads(threads)
    os.environ["LORA_AUDIT_NO_PROGRESS"] = "1"
    from lora_audit.training.loop import fit

    t0 = time.perf_counter()
    fit(method="lora", base=base, data="builtin:alpaca-mini", steps=steps, rank=8, alpha=16.0, lr=1.5e-3,
        batch_size=4, max_length=64, seed=seed, device="cpu", precision=precision)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--run-steps", type=int, default=20)
    args = ap.parse_args()
    from lora_audit.training.data import Batches, load_records
    from lora_audit.training.loop import bfloat16_is_fast
    from lora_audit.training.lora import wrap

    print(f"load average before: {os.getloadavg()}; {os.cpu_count()} cores; torch threads {torch.get_num_threads()}")
    model, tok, base = model_and_tokenizer()
    batches = [next(b) for b in [Batches(load_records("builtin:alpaca-mini"), tok, batch_size=4, max_length=64,
                                         seed=0)] for _ in range(args.steps + 2)]
    settings = {"float32, every position": (False, False), "float32, response positions": (True, False)}
    precision = "bfloat16" if bfloat16_is_fast("cpu") else "float32"
    if precision == "bfloat16":
        settings["bfloat16, response positions"] = (True, True)
    model.train()
    full = step_times(model, batches, [p for p in model.parameters()], settings, args.steps)
    lora_model = wrap(model, "lora", 8, 16.0, None, 0)
    lora = step_times(lora_model, batches, [p for p in lora_model.parameters() if p.requires_grad], settings,
                      args.steps)
    first = next(iter(settings))
    for what, t in (("full fine-tuning", full), ("LoRA r=8", lora)):
        print(f"\n{what}: seconds per step (median of {args.steps})")
        for k, v in t.items():
            print(f"  {k:32s} {v:6.3f} s   {t[first] / v:5.2f}x the baseline")

    cores = os.cpu_count() or 2
    t0 = time.perf_counter()
    for seed in (0, 1):
        _run(base, cores, args.run_steps, seed, precision)
    seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    with cf.ProcessPoolExecutor(2, mp_context=mp.get_context("spawn")) as pool:
        list(pool.map(_run, [base, base], [max(1, cores // 2)] * 2, [args.run_steps] * 2, [0, 1], [precision] * 2))
    par = time.perf_counter() - t0
    print(f"\ntwo LoRA runs of {args.run_steps} steps ({precision}), loading included: one after the other with "
          f"{cores} threads {seq:.1f} s; at once in two processes of {max(1, cores // 2)} {par:.1f} s "
          f"({seq / par:.2f}x)")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
