"""Time of one full fine-tuning step (forward, backward, clipping, optimizer) with the fused AdamW
``lora_audit.training.loop`` uses against torch's default AdamW, in one run, on the same model.

The model is a Llama built from a config with SmolLM2-135M's shape (30 layers, hidden 576, MLP
1536, vocabulary 49152, tied embeddings; random weights), batches of 4 x 64 random tokens as the
demo trains. Both optimizers step the same parameters, alternating, ``--steps`` times each after
one warm-up step; the median of each part is printed, and the ratio of the optimizer steps and
of the whole steps. The two updates agree to float32 rounding, which is also printed (the
largest parameter difference after one step of each from the same state).

    python bench/bench_training.py              # ~1 min on 2 cores
    python bench/bench_training.py --layers 4   # seconds
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record

import torch


def build(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers, num_attention_heads=9,
                      num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).train()


def timed_steps(model, opt, batches) -> dict[str, list[float]]:
    params = [p for p in model.parameters() if p.requires_grad]
    out: dict[str, list[float]] = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for ids in batches:
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        t1 = time.perf_counter()
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t3 = time.perf_counter()
        for k, v in zip(out, (t1 - t0, t2 - t1, t3 - t2, t3 - t0), strict=True):
            out[k].append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--steps", type=int, default=5)
    args = ap.parse_args()
    base = build(args.layers)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 49152, (4, 64), generator=g) for _ in range(args.steps + 1)]
    models = {"default": base, "fused": copy.deepcopy(base)}
    opts = {name: torch.optim.AdamW([p for p in m.parameters()], lr=1e-5, weight_decay=0.0,
                                    **({"fused": True} if name == "fused" else {}))
            for name, m in models.items()}
    # agreement: one step of each from the same state
    for name in models:
        timed_steps(models[name], opts[name], batches[:1])
    diff = max((a - b).abs().max().item() for a, b in zip(models["default"].parameters(),
                                                           models["fused"].parameters(), strict=True))
    times: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for ids in batches[1:]:  # alternate, so both see the same machine load
        for name in models:
            for k, v in timed_steps(models[name], opts[name], [ids]).items():
                times[name].setdefault(k, []).extend(v)
    print(f"{args.layers} layers, {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M parameters, "
          f"{torch.get_num_threads()} threads, {args.steps} steps each (median s):")
    for name, t in times.items():
        print(f"  {name:8s} " + "  ".join(f"{k} {statistics.median(v):.3f}" for k, v in t.items()))
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    print(f"fused vs default: optimizer step {med['default']['optimizer'] / med['fused']['optimizer']:.2f}x faster, "
          f"whole step {med['default']['step'] / med['fused']['step']:.2f}x faster; "
          f"largest parameter difference after one step {diff:.1e}")


if __name__ == "__main__":
    with record.printed("bench_training"):
        main()
