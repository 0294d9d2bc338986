#!/usr/bin/env bash
# Exercise every CUDA path of lora-audit on a machine with a GPU, in at most 10 minutes, offline: the embedded
# SmolLM2-135M-Instruct (lora_audit/checkpoints/default_model.py) and small synthetic models built here.
#
#   device auto   safety-eval --device auto lands on CUDA; --dtype auto loads a bf16 checkpoint in bf16
#   bfloat16      safety-eval --dtype bfloat16 on CUDA (lm-eval's built-in task included)
#   device map    safety-eval --device-map auto (accelerate places the layers; the placement is recorded)
#   4-bit, 8-bit  safety-eval --load-in-4bit / --load-in-8bit with a PEFT adapter on the quantised base
#   spectrum      lora-audit spectrum on CUDA and on the CPU: identical intruder counts per matrix
#
# Writes one JSON summary (default bench/results/gpu_check.json; first argument to change it) with each check's
# status (pass / fail / skip, and why), seconds and details. Exit 1 when a check failed. On a machine without
# CUDA every CUDA check is skipped, saying so, and only the cheap CPU-side checks run (CI runs it that way).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/gpu_check.json}"
PY="${PYTHON:-python}"
[ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && PY=.venv/bin/python
export HF_HUB_OFFLINE=1 LORA_AUDIT_NO_PROGRESS=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec timeout 600 "$PY" - "$OUT" <<'EOF'
import json, os, subprocess, sys, tempfile, time
from pathlib import Path

import torch

out_path = Path(sys.argv[1])
t_start = time.perf_counter()
cuda = torch.cuda.is_available()
checks = []
work = Path(tempfile.mkdtemp(prefix="gpu-check-"))


def lora_audit(*args, timeout=240):
    p = subprocess.run([sys.executable, "-m", "lora_audit", *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    return p.returncode, p.stdout, p.stderr


def check(name, fn, needs_cuda=True):
    t0 = time.perf_counter()
    if needs_cuda and not cuda:
        checks.append({"name": name, "status": "skip", "why": "no CUDA device on this machine"})
        print(f"skip  {name}: no CUDA device", flush=True)
        return
    try:
        details = fn() or {}
        status = "fail" if details.pop("_failed", None) else "pass"
    except Exception as e:  # noqa: BLE001 - a failed check is reported, the others still run
        status, details = "fail", {"error": f"{type(e).__name__}: {str(e)[-1500:]}"}
    checks.append({"name": name, "status": status, "seconds": round(time.perf_counter() - t0, 1), **details})
    print(f"{status:5} {name} ({checks[-1]['seconds']} s)", flush=True)


def settings_of(path):
    return json.loads(Path(path).read_text())["lora_audit"]["settings"]


def run_ok(*args):
    code, so, se = lora_audit(*args)
    if code != 0:
        raise RuntimeError(f"exit {code}: {se.strip()[-1500:]}")
    return so


# ---- models: SmolLM2 (converted once from the embedded GGUF), a synthetic bf16 model, adapters --------------
def models():
    from lora_audit.checkpoints.default_model import default_model_dir
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    smol = default_model_dir()
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_pretrained(str(smol), dtype=torch.float32)
    pm = get_peft_model(m, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0.0, 0.05)
    adapter = work / "smol-adapter"
    pm.save_pretrained(str(adapter))
    tok = AutoTokenizer.from_pretrained(str(smol))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=704, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=False,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    bf16 = work / "synthetic-bf16"
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(str(bf16))
    tok.save_pretrained(str(bf16))
    return smol, adapter, bf16


env = {"torch": torch.__version__, "cuda": cuda, "devices": [torch.cuda.get_device_name(i) for i in
                                                              range(torch.cuda.device_count())] if cuda else []}
try:
    from lora_audit.checkpoints.loading import bitsandbytes_devices
    import bitsandbytes
    env["bitsandbytes"] = {"version": bitsandbytes.__version__, "devices": sorted(bitsandbytes_devices())}
except Exception as e:  # noqa: BLE001
    env["bitsandbytes"] = f"unavailable: {type(e).__name__}"

FAST = ["--limit", "4", "--max-new-tokens", "8", "--batch-size", "4", "--benign", "none"]


def cpu_side():
    """Without CUDA, asking for it is a one-line error before any model is loaded."""
    code, so, se = lora_audit("safety-eval", "no-such-dir/x", "--device", "cuda", "--tasks", "none")
    ok = code == 1 and "CUDA is not available" in se and len(se.strip().splitlines()) == 1
    return {"exit": code, "message": se.strip(), **({} if ok else {"_failed": True})}


check("no CUDA: --device cuda is a one-line error", cpu_side, needs_cuda=False) if not cuda else None

if cuda:
    smol, adapter, bf16 = models()

    def device_auto():
        j = work / "auto.json"
        run_ok("safety-eval", bf16, *FAST, "--tasks", "none", "--device", "auto", "--json", j)
        s = settings_of(j)
        return {"device": s["device"], "dtype": s["dtype"], "_failed": None if s["device"].startswith("cuda") and
                s["dtype"] == "bfloat16" else True}

    def bfloat16():
        j = work / "bf16.json"
        run_ok("safety-eval", smol, adapter, *FAST, "--dtype", "bfloat16", "--json", j)
        s = settings_of(j)
        res = json.loads(j.read_text())
        return {"dtype": s["dtype"], "capability": res["models"]["base"]["capability"],
                "_failed": None if s["dtype"] == "bfloat16" and s["device"].startswith("cuda") else True}

    def device_map():
        j = work / "map.json"
        run_ok("safety-eval", smol, adapter, *FAST, "--tasks", "none", "--device-map", "auto",
               "--json", j)
        s = settings_of(j)
        return {"placement": s.get("placement"), "_failed": None if s.get("placement") else True}

    def quantised(bits):
        def run():
            j = work / f"q{bits}.json"
            run_ok("safety-eval", smol, adapter, *FAST, "--tasks", "none", f"--load-in-{bits}bit",
                   "--json", j)
            s = settings_of(j)
            return {"quantization": s["quantization"], "dtype": s["dtype"],
                    "_failed": None if s["quantization"] and s["device"].startswith("cuda") else True}
        return run

    def spectrum():
        counts = {}
        for dev in ("cuda", "cpu"):
            j = work / f"spectrum-{dev}.json"
            run_ok("spectrum", smol, adapter, "--device", dev, "--no-cache", "--quiet", "--json", j)
            counts[dev] = {m["name"]: m["intruders"] for m in json.loads(j.read_text())["results"][0]["matrices"]}
        differ = {n: (counts["cuda"][n], counts["cpu"].get(n)) for n in counts["cuda"] if counts["cuda"][n] != counts["cpu"].get(n)}
        return {"matrices": len(counts["cuda"]), "intruders_cuda": sum(counts["cuda"].values()),
                "intruders_cpu": sum(counts["cpu"].values()), "differ": differ,
                "_failed": True if differ or counts["cuda"].keys() != counts["cpu"].keys() else None}

    check("device auto (CUDA, auto dtype = the checkpoint's bf16)", device_auto)
    check("bfloat16 on CUDA (with lm-eval)", bfloat16)
    check("device map auto", device_map)
    check("4-bit base + PEFT adapter", quantised(4))
    check("8-bit base + PEFT adapter", quantised(8))
    check("spectrum on CUDA vs CPU: identical counts", spectrum)
else:
    for name in ("device auto (CUDA, auto dtype = the checkpoint's bf16)", "bfloat16 on CUDA (with lm-eval)",
                 "device map auto", "4-bit base + PEFT adapter", "8-bit base + PEFT adapter",
                 "spectrum on CUDA vs CPU: identical counts"):
        check(name, None)

summary = {"environment": env, "checks": checks, "seconds": round(time.perf_counter() - t_start, 1),
           "passed": sum(c["status"] == "pass" for c in checks), "failed": sum(c["status"] == "fail" for c in checks),
           "skipped": sum(c["status"] == "skip" for c in checks)}
out_path.parent.mkdir(parents=True, exist_ok=True)
out_path.write_text(json.dumps(summary, indent=1) + "\n")
print(f"gpu_check: {summary['passed']} passed, {summary['failed']} failed, {summary['skipped']} skipped "
      f"({'CUDA: ' + ', '.join(env['devices']) if cuda else 'no CUDA device: the CUDA checks were skipped'}); "
      f"wrote {out_path}")
import shutil
shutil.rmtree(work, ignore_errors=True)
sys.exit(1 if summary["failed"] else 0)
EOF
