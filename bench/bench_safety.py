"""Speed of the safety-eval generation and scoring paths on SmolLM2-135M-Instruct, in one run.

1. Generation throughput: the same N prompts (the built-in harmful set, chat template applied)
   generated greedily one at a time (the baseline) and in one batch of 16 with left padding
   (lora-audit's path), ``--max-new-tokens`` each, no early stop (so both make the same number of
   tokens). Reports generated tokens/s, the ratio (target >= 4x), and how many batched outputs
   are token-identical to the one-by-one outputs.
2. First-token refusal score (Arditi et al. 2024: one forward pass, no generation) against
   generation on the same prompts: ratio vs batched generation of the same length (the honest
   comparison) and vs one-by-one generation (target >= 20x). Also the agreement of the
   first-token verdict (threshold 0 and the calibrated one) with keyword scoring of the
   generated responses, on harmful + benign prompts.

Each timed step runs ``--repeats`` times, interleaved, and the median is reported: the machine
may be shared, so single timings are noisy. Threads: torch.set_num_threads(--threads).

    python bench/bench_safety.py                 # 16 prompts, 64 new tokens, 3 repeats
    python bench/bench_safety.py --quick         # 16 prompts, 32 new tokens, 1 repeat
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record

import torch

os.environ.setdefault("LORA_AUDIT_NO_PROGRESS", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=16, help="prompts (default 16, one batch)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    if a.quick:
        a.max_new_tokens, a.repeats = 32, 1
    torch.set_num_threads(a.threads)

    from lora_audit.checkpoints import load_model
    from lora_audit.checkpoints.default_model import default_model_dir
    from lora_audit.safety.generate import GenSettings, chat_texts, generate
    from lora_audit.safety.prompts import load_prompts
    from lora_audit.safety.scorers import KeywordScorer, agreement, calibrate_threshold, first_token_scores

    m = load_model(default_model_dir(), device="cpu")
    model, tok = m.model, m.tokenizer
    harmful = [p.prompt for p in load_prompts("builtin:harmful").prompts[:a.n]]
    benign = [p.prompt for p in load_prompts("builtin:benign").prompts[:a.n]]
    texts = chat_texts(tok, harmful)
    n_prompt_tokens = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
    print(f"SmolLM2-135M-Instruct, float32, CPU, {a.threads} threads; {len(texts)} prompts "
          f"({min(n_prompt_tokens)}-{max(n_prompt_tokens)} tokens with the chat template), greedy, "
          f"{a.max_new_tokens} new tokens, median of {a.repeats}")
    if hasattr(os, "getloadavg"):
        print(f"load average at start: {os.getloadavg()[0]:.1f}")

    one = GenSettings(a.max_new_tokens, batch_size=1, early_stop=False)
    bat = GenSettings(a.max_new_tokens, batch_size=a.batch_size, early_stop=False)
    generate(model, tok, texts[:2], GenSettings(4, 2, early_stop=False))  # warm-up
    first_token_scores(model, tok, texts[:2])
    t_one, t_bat, t_ft = [], [], []
    for _ in range(a.repeats):  # interleaved, so a noisy neighbour hits all three alike
        t0 = time.perf_counter()
        _, ids_one = generate(model, tok, texts, one, return_ids=True)
        t_one.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        out_bat, ids_bat = generate(model, tok, texts, bat, return_ids=True)
        t_bat.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        ft = first_token_scores(model, tok, texts, batch_size=a.batch_size)
        t_ft.append(time.perf_counter() - t0)
    T1, TB, TF = (statistics.median(x) for x in (t_one, t_bat, t_ft))
    tok_one, tok_bat = sum(map(len, ids_one)), sum(map(len, ids_bat))
    same = sum(x == y for x, y in zip(ids_one, ids_bat, strict=True))

    print("\n1. generation throughput")
    print(f"   one-by-one (baseline): {T1:7.2f} s  {tok_one / T1:6.1f} generated tokens/s")
    print(f"   batch {a.batch_size:<3d} left pad:  {TB:7.2f} s  {tok_bat / TB:6.1f} generated tokens/s")
    print(f"   speed-up {(tok_bat / TB) / (tok_one / T1):.1f}x (target >= 4x); "
          f"{same}/{len(texts)} batched outputs token-identical to one-by-one")

    print("\n2. first-token refusal score vs generation")
    print(f"   first-token (1 forward pass, batch {a.batch_size}): {TF:7.2f} s")
    print(f"   vs batched generation of {a.max_new_tokens} tokens:  {TB / TF:5.1f}x cheaper")
    print(f"   vs one-by-one generation:              {T1 / TF:5.1f}x cheaper (target >= 20x)")

    kw = KeywordScorer()
    btexts = chat_texts(tok, benign)
    out_ben = generate(model, tok, btexts, bat)
    ft_all = ft + first_token_scores(model, tok, btexts, batch_size=a.batch_size)
    kw_all = [kw(r) for r in out_bat + out_ben]
    thr, agr_cal = calibrate_threshold(ft_all, kw_all)
    print(f"   agreement with keyword scoring on {len(kw_all)} prompts ({len(texts)} harmful + {len(btexts)} benign; "
          f"keyword refusals: {sum(kw_all)}):")
    print(f"     threshold 0 (p > 0.5): {agreement([s > 0 for s in ft_all], kw_all):.1%};  "
          f"calibrated threshold {thr:.2f}: {agr_cal:.1%}")
    print(f"   first-token scores: harmful median {statistics.median(ft):.2f}, "
          f"benign median {statistics.median(ft_all[len(ft):]):.2f}")
    if hasattr(os, "getloadavg"):
        print(f"\nload average at end: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (other processes skew "
              "the ratios: batched generation is compute-bound and suffers most from a shared CPU)")
    print(f"per-repeat times (s): one-by-one {[round(x, 1) for x in t_one]}, batched {[round(x, 1) for x in t_bat]}, "
          f"first-token {[round(x, 2) for x in t_ft]}")


if __name__ == "__main__":
    with record.printed("bench_safety"):
        main()
