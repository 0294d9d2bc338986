"""Speed of ``lora-audit mitigate`` against peft's ``reduce_intruder_dimension`` on the same adapter,
in one run, with the agreement of their merged updates.

Both do the whole job, from the files on disk to a mitigated adapter on disk:

- peft 0.21: load the base with transformers and the adapter with ``PeftModel.from_pretrained``,
  ``reduce_intruder_dimension`` (three full SVDs per adapted matrix: W0, W1 and the mitigated
  update), save the new adapter with ``save_pretrained``;
- lora-audit: ``spectral.mitigate.mitigate_adapter`` on the checkpoint stream (no model load; per
  matrix the SVDs of W0 and W1 and a small core), which writes the adapter and mitigate.json;
  "cold" without the base-spectrum cache, "warm" with a cache that already holds the base's
  spectra (what ``lora-audit spectrum`` leaves behind: then only W1 is decomposed).

The checkpoint is synthetic: a Llama built from a config (random weights, SmolLM2-135M's widths
by default: hidden 576, MLP 1536) saved by transformers, and a PEFT LoRA on every linear layer
made by peft, with B filled with random values large enough to create intruders. Written to a
temporary folder and deleted afterwards. Each side runs ``--repeat`` times (the best is
reported), alternating, in this process.

    python bench/bench_mitigate.py                 # 6 layers, ~1-2 min on 2 cores
    python bench/bench_mitigate.py --layers 30     # SmolLM2-135M's depth
    python bench/bench_mitigate.py --quick         # 2 narrow layers, seconds
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record

import torch


def build(root: Path, *, layers: int, hidden: int, intermediate: int, rank: int, seed: int = 0) -> tuple[Path, Path]:
    """(base folder, adapter folder) for a random Llama and a LoRA on all its linear layers."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 192),
                      max_position_embeddings=256, tie_word_embeddings=False)
    base = root / "base"
    LlamaForCausalLM(cfg).save_pretrained(base, safe_serialization=True)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=rank, lora_alpha=2 * rank, target_modules="all-linear"))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    adapter = root / "adapter"
    model.save_pretrained(adapter, safe_serialization=True)
    return base, adapter


def run_peft(base: Path, adapter: Path, out: Path, lam: float) -> float:
    from peft import PeftModel
    from peft.tuners.lora.intruders import reduce_intruder_dimension
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter))
    reduce_intruder_dimension(model, mitigation_lambda=lam, logging_sink=None)
    model.save_pretrained(out, selected_adapters=["intruder_reduced"], safe_serialization=True)
    return time.perf_counter() - t0


def run_lora_audit(base: Path, adapter: Path, out: Path, lam: float, cache_dir: Path | None) -> tuple[float, dict]:
    from lora_audit.spectral.api import open_cache
    from lora_audit.spectral.mitigate import mitigate_adapter

    t0 = time.perf_counter()
    rec = mitigate_adapter(base, adapter, out, lam=lam, device="cpu", overwrite=True, progress=False,
                           cache=open_cache(cache_dir) if cache_dir else None)
    return time.perf_counter() - t0, rec


def merged_deltas(base: Path, adapter: Path, name: str) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32), str(adapter),
                                      adapter_name=name)
    return {n: m.get_delta_weight(name).detach().double() for n, m in model.named_modules()
            if isinstance(m, LoraLayer) and name in m.scaling}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=576)
    ap.add_argument("--intermediate", type=int, default=1536)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--lam", type=float, default=0.75)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--quick", action="store_true", help="2 layers, hidden 256, MLP 512")
    args = ap.parse_args()
    if args.quick:
        args.layers, args.hidden, args.intermediate, args.repeat = 2, 256, 512, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    root = Path(tempfile.mkdtemp(prefix="bench-mitigate-"))
    try:
        base, adapter = build(root, layers=args.layers, hidden=args.hidden, intermediate=args.intermediate,
                              rank=args.rank)
        print(f"{args.layers} layers, hidden {args.hidden}, MLP {args.intermediate}, LoRA r={args.rank} on all "
              f"{7 * args.layers} linear layers; lambda {args.lam}; {torch.get_num_threads()} torch threads")
        run_lora_audit(base, adapter, root / "warm", args.lam, root / "spectra")  # fills the cache
        peft_s, cold_s, warm_s = [], [], []
        for _ in range(args.repeat):
            peft_s.append(run_peft(base, adapter, root / "peft", args.lam))
            secs, rec = run_lora_audit(base, adapter, root / "ours", args.lam, None)
            cold_s.append(secs)
            warm_s.append(run_lora_audit(base, adapter, root / "warm", args.lam, root / "spectra")[0])
        print(f"intruders: {rec.intruders_before} -> {rec.intruders_after} "
              f"({rec.matrices_rewritten} matrices rewritten)")
        theirs = merged_deltas(base, root / "peft" / "intruder_reduced", "intruder_reduced")
        ours = merged_deltas(base, root / "ours", "default")
        worst = max(float((ours[k] - theirs[k]).norm() / theirs[k].norm()) for k in theirs)
        print(f"merged dW, lora-audit vs peft: largest relative Frobenius difference {worst:.2e} "
              f"over {len(theirs)} matrices")
        show = lambda xs: "[" + ", ".join(f"{x:.2f}" for x in xs) + "]"
        print(f"peft reduce_intruder_dimension (load + reduce + save): best {min(peft_s):.2f} s of {show(peft_s)}")
        print(f"lora-audit mitigate, no cache (stream + mitigate + write): best {min(cold_s):.2f} s of {show(cold_s)}")
        print(f"lora-audit mitigate, base spectra cached:                 best {min(warm_s):.2f} s of {show(warm_s)}")
        print(f"ratio peft / lora-audit: {min(peft_s) / min(cold_s):.2f}x without the cache, "
              f"{min(peft_s) / min(warm_s):.2f}x with it")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    with record.printed("bench_mitigate"):
        code = main()
    sys.exit(code)
