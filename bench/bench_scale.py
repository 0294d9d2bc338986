"""How lora-audit scales to the models people ship: a 7B-shaped checkpoint on disk, and 16-bit loading.

Part ``spectrum`` (issue 22, 5a): a synthetic Llama of the 7B shape (32 layers, hidden 4096, MLP
11008, vocab 32000) written as sharded bf16 safetensors, one shard per layer, built layer by layer
so the builder's memory stays near one layer; its weights have the spectra of trained weights, not
Gaussian noise: W = U diag(s) V^T with U, V random orthogonal (a Haar sample of each shape, its
rows permuted and signs flipped per matrix: each factor is again Haar-distributed) and
s_i ~ i^-0.5 with three outliers (x6, x4, x2.5 on the top values), scaled to an entry std of 0.02.
The TUNED is a PEFT LoRA r=16 (alpha 32) on all seven projections, its update's top singular value
a random 0.02-0.6 x the base matrix's, so some matrices get intruders and some do not.

``lora-audit spectrum BASE ADAPTER`` then runs as a real process (``measure``: wall time, peak RSS
as the process's VmHWM (its own, not ru_maxrss, which also carries the forking parent's peak across
exec) and as sampled anonymous memory, bytes read from storage by /proc/self/io), cold (an empty
base-spectrum cache, the page cache of the files dropped with posix_fadvise first) and cached (the
same again: the base spectra come from the cache). The storage's sequential read bandwidth is
measured on the same files (page cache dropped), so the bytes read convert to the physical lower
bound of a run. Growth with layers: adapters on the first 1, 2, 4, ... layers of the same
checkpoint (the audit touches only adapted matrices); with width: the same construction at hidden
1024 / 2048 / 4096 (MLP 2.6875 x hidden, as 11008 / 4096).

Part ``memory`` (issue 22, 5b): a synthetic Llama of about 0.5B or 1B parameters (bf16 safetensors,
the SmolLM2 tokenizer from the embedded GGUF, ChatML template) through ``safety-eval`` and
``safety-scan`` with ``--dtype float32`` and ``--dtype bfloat16``: peak RSS (VmHWM of the
process) and generated tokens per second, the ratio bfloat16 / float32 against the goal <= 0.6.

Every run appends one JSON record (command, machine, date, git hash, load average before/after, the
figures) to bench/results/scale.jsonl, and prints a summary.

    python bench/bench_scale.py spectrum --layers 1,2 --widths 1024,2048,4096 --full-layers 32
    python bench/bench_scale.py memory --size 0.5B
    python bench/bench_scale.py summary          # the recorded figures as Markdown tables
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "scale.jsonl"
PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
MLP_RATIO = 11008 / 4096
VOCAB = 32000
RANK, ALPHA = 16, 32


# ---- the machine and the record ----------------------------------------------------------------------------
def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    mem = next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)
    return {"cpu": cpu, "cores": os.cpu_count(), "ram_gb": round(mem / 2**30, 1), "python": platform.python_version(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "platform": platform.platform()}


def git_hash() -> str | None:
    try:
        h = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True).stdout.strip()
        return h + ("-dirty" if dirty else "") if h else None
    except OSError:
        return None


def record(part: str, figures: dict) -> dict:
    rec = {"bench": "bench_scale", "part": part, "command": " ".join([Path(sys.executable).name, *sys.argv]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "git": git_hash(),
           "machine": machine(), "load_average_end": os.getloadavg(), **figures}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')} load {os.getloadavg()[0]:.1f}] {msg}", flush=True)


# ---- a synthetic checkpoint with trained-like spectra, written layer by layer --------------------------------
class Factors:
    """Haar-random orthonormal factors, one per shape, each use a fresh row permutation and signs."""

    def __init__(self, g: torch.Generator):
        self.g, self.pool = g, {}

    def get(self, rows: int, cols: int) -> torch.Tensor:
        if (rows, cols) not in self.pool:
            q, r = torch.linalg.qr(torch.randn(rows, cols, generator=self.g))
            self.pool[(rows, cols)] = q * torch.sign(torch.diagonal(r))  # Haar: fix QR's sign convention
        q = self.pool[(rows, cols)]
        perm = torch.randperm(rows, generator=self.g)
        signs = torch.randint(0, 2, (rows, 1), generator=self.g).float() * 2 - 1
        return q[perm] * signs


def trained_like(m: int, n: int, f: Factors, g: torch.Generator) -> tuple[torch.Tensor, float]:
    """(W (m, n) float32, its top singular value): U diag(s) V^T, s_i ~ i^-0.5 plus three outliers."""
    p = min(m, n)
    s = torch.arange(1, p + 1, dtype=torch.float32).pow(-0.5)
    s[:3] *= torch.tensor([6.0, 4.0, 2.5])
    s *= 0.02 * (m * n) ** 0.5 / s.norm()  # entry std 0.02, as in trained 7B models
    U, V = f.get(m, p), f.get(n, p)
    return (U * s) @ V.T, float(s[0])


def shapes(hidden: int) -> dict[str, tuple[int, int]]:
    inter = int(round(hidden * MLP_RATIO / 64)) * 64 if hidden != 4096 else 11008
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
            "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
            "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}


def build_model(folder: Path, *, layers: int, hidden: int, seed: int = 0, vocab: int = VOCAB,
                adapters_for: tuple[int, ...] = (), distinct: int | None = None) -> dict:
    """A 7B-shaped (at hidden 4096) Llama folder in bf16, one shard per layer, and LoRA adapters on the
    first N layers for each N in ``adapters_for`` (folder/adapter-N; every layer's factors its own);
    returns the build record. With ``distinct`` = R, layer i's base weights are layer (i mod R)'s (the
    base-spectrum cache is content-addressed, so a cold audit decomposes R layers and reads all)."""
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True)
    t0 = time.perf_counter()
    g = torch.Generator().manual_seed(seed)
    f = Factors(g)
    heads = hidden // 128
    inter = shapes(hidden)["mlp.gate_proj"][0]
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=heads, vocab_size=vocab, tie_word_embeddings=False, dtype="bfloat16")
    cfg.save_pretrained(folder)
    n_shards = layers + 1
    weight_map, total = {}, 0
    lora: dict[str, torch.Tensor] = {}
    lg = torch.Generator().manual_seed(seed + 1000)
    first: dict[tuple[int, str], tuple[torch.Tensor, float]] = {}  # the distinct layers' weights, bf16
    for i in range(layers):
        tensors = {}
        for mod, (m, n) in shapes(hidden).items():
            name = f"model.layers.{i}.{mod}.weight"
            if distinct and i >= distinct:
                W, top = first[(i % distinct, mod)]
            else:
                W, top = trained_like(m, n, f, g)
                W = W.to(torch.bfloat16).contiguous()
                if distinct:
                    first[(i, mod)] = (W, top)
            tensors[name] = W
            if adapters_for and i < max(adapters_for):
                lora.update(lora_factors(f"model.layers.{i}.{mod}", m, n, top, lg))
            del W
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        save_file(tensors, str(folder / shard), metadata={"format": "pt"})
        for k, v in tensors.items():
            weight_map[k], total = shard, total + v.numel() * v.element_size()
        del tensors
        if i % 4 == 3 or i == layers - 1:
            log(f"built layer {i + 1}/{layers}")
    emb = {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(torch.bfloat16),
           "lm_head.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(torch.bfloat16),
           "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    shard = f"model-{n_shards:05d}-of-{n_shards:05d}.safetensors"
    save_file(emb, str(folder / shard), metadata={"format": "pt"})
    for k, v in emb.items():
        weight_map[k], total = shard, total + v.numel() * v.element_size()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                     "weight_map": weight_map}))
    for n in adapters_for:
        write_adapter(folder / f"adapter-{n}", {k: v for k, v in lora.items() if int(k.split(".")[4]) < n}, folder)
    return {"layers": layers, "distinct_layers": distinct or layers, "hidden": hidden, "intermediate": inter,
            "params": total // 2, "bytes": total, "build_s": round(time.perf_counter() - t0, 1)}


def lora_factors(module: str, m: int, n: int, top: float, g: torch.Generator) -> dict[str, torch.Tensor]:
    """PEFT factors of an r=16 update whose top singular value is 0.02-0.6 x the base's (s = alpha / r)."""
    c = 0.02 + 0.58 * float(torch.rand(1, generator=g))
    A = torch.randn(RANK, n, generator=g) / n ** 0.5
    B = torch.randn(m, RANK, generator=g) / m ** 0.5
    s = ALPHA / RANK
    small = torch.linalg.qr(B)[1] @ torch.linalg.qr(A.T)[1].T  # (r, r): ||B A||_2 without forming B A
    B *= c * top / (s * float(torch.linalg.matrix_norm(small, ord=2)))
    key = f"base_model.model.{module}"
    return {f"{key}.lora_A.weight": A.contiguous(), f"{key}.lora_B.weight": B.contiguous()}


def write_adapter(folder: Path, tensors: dict[str, torch.Tensor], base: Path) -> None:
    from peft import LoraConfig
    from safetensors.torch import save_file

    folder.mkdir()
    LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[p.split(".")[1] for p in PROJECTIONS],
               task_type="CAUSAL_LM", base_model_name_or_path=str(base)).save_pretrained(str(folder))
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


# ---- measuring a whole process --------------------------------------------------------------------------------
HARNESS = r"""
import json, os, resource, sys, threading, time
out = sys.argv[1]
peak = {"anon": 0, "hwm": 0}
def status():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            peak["anon"] = max(peak["anon"], int(line.split()[1]) * 1024)
        elif line.startswith("VmHWM:"):  # this process's own peak (ru_maxrss also counts the parent's before exec)
            peak["hwm"] = max(peak["hwm"], int(line.split()[1]) * 1024)
def sample():
    while True:
        status()
        time.sleep(0.05)
threading.Thread(target=sample, daemon=True).start()
def done():
    status()
    io = dict(l.strip().split(": ") for l in open("/proc/self/io"))
    json.dump({"maxrss": peak["hwm"], "peak_anon": peak["anon"],
               "read_bytes": int(io["read_bytes"]), "rchar": int(io["rchar"]),
               "cpu_s": sum(resource.getrusage(resource.RUSAGE_SELF)[:2])}, open(out, "w"))
import atexit; atexit.register(done)
sys.argv = ["lora-audit", *sys.argv[2:]]
from lora_audit.cli import main
main()
"""


def measure(args: list[str], *, env: dict | None = None, timeout: float | None = None, ok=(0, 3, 4)) -> dict:
    """``lora-audit ARGS`` in a fresh process: exit code, wall seconds, peak memory, bytes read
    (SystemExit when it exits with a status not in ``ok``)."""
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "m.json"
        t0 = time.perf_counter()
        load0 = os.getloadavg()
        p = subprocess.run([sys.executable, "-c", HARNESS, str(out), *args], capture_output=True, text=True,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "LORA_AUDIT_NO_PROGRESS": "1", **(env or {})},
                           timeout=timeout)
        wall = time.perf_counter() - t0
        m = json.loads(out.read_text()) if out.exists() else {}
    if p.returncode not in ok:
        raise SystemExit(f"lora-audit {' '.join(args)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    err = {"error": p.stderr.strip().splitlines()[-1][:300]} if p.returncode and p.stderr.strip() else {}
    return {"exit": p.returncode, "wall_s": round(wall, 2), "load_average_start": load0, **m, **err}


def drop_page_cache(paths: list[Path]) -> None:
    """Evict the files from the page cache (clean pages; no root needed), so the next read is cold."""
    os.sync()
    for p in paths:
        for f in ([p] if p.is_file() else [x for x in p.rglob("*") if x.is_file()]):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_bandwidth(files: list[Path], limit: int = 4 * 2**30) -> dict:
    """Sequential read bandwidth of the storage holding ``files`` (page cache dropped first)."""
    drop_page_cache(files)
    n, t0 = 0, time.perf_counter()
    buf = bytearray(16 * 2**20)
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while n < limit:
                k = fh.readinto(buf)
                if not k:
                    break
                n += k
        if n >= limit:
            break
    secs = time.perf_counter() - t0
    drop_page_cache(files)
    return {"bytes": n, "seconds": round(secs, 2), "gb_per_s": round(n / secs / 1e9, 3)}


def spectrum_run(base: Path, adapter: Path, cache: Path, out: Path, *, cold: bool) -> dict:
    if cold and cache.exists():
        shutil.rmtree(cache)
    drop_page_cache([base, *([cache] if cache.exists() else [])])
    m = measure(["spectrum", str(base), str(adapter), "--json", str(out), "--cache-dir", str(cache),
                 "--device", "cpu", "--quiet"])
    res = json.loads(out.read_text())["results"][0]
    m.update(matrices=len(res["matrices"]), intruders=res["total_intruders"],
             cache_bytes=sum(f.stat().st_size for f in cache.glob("*.safetensors")) if cache.exists() else 0)
    return m


def part_spectrum(a) -> None:
    """Cold and cached spectrum runs: at the small widths every layer distinct and each adapted layer count
    cold then cached; at 4096 the 7B-shaped model (``--model-layers``, ``--distinct-layers``) once cold
    with every layer adapted, then cached with the first N layers adapted for each N of ``--big-layers``."""
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=a.workdir))
    figures: dict = {"runs": [], "builds": [], "disk": None}
    try:
        for width in [int(w) for w in a.widths.split(",") if w]:
            big = width == 4096
            counts = [int(x) for x in (a.big_layers if big else a.layers).split(",") if x]
            n_layers = a.model_layers if big else max(counts)
            folder = work / f"w{width}"
            log(f"building {n_layers} layers at hidden {width} in {folder}")
            b = build_model(folder, layers=n_layers, hidden=width, adapters_for=tuple(sorted(set(counts))),
                            distinct=a.distinct_layers if big else None)
            b["builder_maxrss"] = _maxrss()
            figures["builds"].append(b)
            log(f"built: {b}")
            if big or figures["disk"] is None:
                figures["disk"] = disk_bandwidth(sorted(folder.glob("model-*.safetensors")))
                log(f"disk: {figures['disk']}")
            cache = work / f"cache-w{width}"
            plan = ([(max(counts), True)] + [(n, False) for n in counts]) if big else \
                [(n, cold) for n in counts for cold in (True, False)]
            for n, cold in plan:
                log(f"spectrum hidden {width}, {n} adapted layers, {'cold' if cold else 'cached'}")
                r = spectrum_run(folder, folder / f"adapter-{n}", cache, work / "s.json", cold=cold)
                r.update(hidden=width, adapted_layers=n, cold=cold, model_layers=n_layers,
                         distinct_layers=b["distinct_layers"],
                         physical_min_s=round(r["read_bytes"] / 1e9 / figures["disk"]["gb_per_s"], 1))
                figures["runs"].append(r)
                log(json.dumps(r))
            shutil.rmtree(cache, ignore_errors=True)
            if not a.keep:
                shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)
    rec = record("spectrum", figures)
    print(json.dumps(rec, indent=1))


def _maxrss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# ---- 16-bit loading: safety-eval and safety-scan at about 0.5B / 1B parameters --------------------------------
SIZES = {  # hidden, layers, intermediate (Llama-shaped, untied head, SmolLM2's vocabulary of 49152)
    "0.5B": (1024, 24, 4096),
    "1B": (2048, 16, 5632),
}


def build_lm(folder: Path, size: str, seed: int = 0) -> dict:
    """A Llama of about ``size`` parameters in bf16 with trained-like spectra (built from a config,
    layer by layer through ``Factors``) and the SmolLM2 tokenizer (from the embedded GGUF)."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, LlamaConfig

    from lora_audit.checkpoints.default_model import default_gguf_path

    hidden, layers, inter = SIZES[size]
    gguf = default_gguf_path()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    vocab = len(tok)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64, vocab_size=vocab,
                      tie_word_embeddings=False, dtype="bfloat16", bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, max_position_embeddings=2048)
    folder.mkdir(parents=True)
    cfg.save_pretrained(folder)
    tok.save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)
    f = Factors(g)
    tensors = {"model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(torch.bfloat16),
               "lm_head.weight": (torch.randn(vocab, hidden, generator=g) * 0.02).to(torch.bfloat16),
               "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}
    sh = {k: (inter if "gate" in k or "up" in k else hidden, hidden if "down" not in k else inter)
          for k in PROJECTIONS}
    for i in range(layers):
        for mod, (m, n) in sh.items():
            tensors[f"model.layers.{i}.{mod}.weight"] = trained_like(m, n, f, g)[0].to(torch.bfloat16)
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    params = sum(t.numel() for t in tensors.values())
    return {"size": size, "params": params, "hidden": hidden, "layers": layers, "intermediate": inter,
            "vocab": vocab}


def part_memory(a) -> None:
    work = Path(tempfile.mkdtemp(prefix="bench-scale-mem-", dir=a.workdir))
    try:
        model = work / "model"
        log(f"building a {a.size} model")
        info = build_lm(model, a.size)
        log(f"built {info}")
        adapter = work / "adapter"
        _small_adapter(model, adapter)
        runs = []
        for dtype in ("float32", "bfloat16"):
            for cmd in ("safety-eval", "safety-scan"):
                out = work / f"{cmd}-{dtype}.json"
                if cmd == "safety-eval":
                    args = ["safety-eval", str(model), str(adapter), "--tasks", "none",
                            "--limit", str(a.prompts), "--max-new-tokens", str(a.new_tokens), "--batch-size",
                            str(a.prompts), "--no-early-stop", "--benign", "none"]
                else:
                    args = ["safety-scan", str(model), str(adapter), "--limit", "40", "--batch-size", "8",
                            "--no-cache"]
                args += ["--device", "cpu", "--dtype", dtype, "--json", str(out)]
                drop_page_cache([model])
                log(f"{cmd} --dtype {dtype}")
                # a random model refuses nothing, so safety-scan stops (status 1) at its check of BASE's refusal,
                # after loading BASE and computing its profile (a forward pass over every prompt): measured so far
                m = measure(args, timeout=a.timeout, ok=(0, 1) if cmd == "safety-scan" else (0,))
                m.update(command=cmd, dtype=dtype)
                if not out.exists():
                    runs.append(m)
                    log(json.dumps(m))
                    continue
                obj = json.loads(out.read_text())
                settings = obj["lora_audit"]["settings"]
                m.update(recorded_dtype=settings.get("dtype"))
                if cmd == "safety-eval":
                    gen = [obj["models"][k]["timing_s"]["harmful"]["generation"] for k in obj["models"]]
                    toks = len(obj["models"]) * a.prompts * a.new_tokens  # --no-early-stop: every token generated
                    m.update(generation_s=round(sum(gen), 2), tokens=toks, tokens_per_s=round(toks / sum(gen), 2))
                runs.append(m)
                log(json.dumps(m))
        ratios = {}
        for cmd in ("safety-eval", "safety-scan"):
            f32 = next((r for r in runs if r.get("command") == cmd and r["dtype"] == "float32" and "maxrss" in r), None)
            b16 = next((r for r in runs if r.get("command") == cmd and r["dtype"] == "bfloat16" and "maxrss" in r), None)
            if f32 and b16:
                ratios[cmd] = {"maxrss_bf16_over_f32": round(b16["maxrss"] / f32["maxrss"], 3),
                               "peak_anon_bf16_over_f32": round(b16["peak_anon"] / f32["peak_anon"], 3),
                               "goal_maxrss_ratio_at_most": 0.6}
                if "tokens_per_s" in f32:
                    ratios[cmd]["tokens_per_s_bf16_over_f32"] = round(b16["tokens_per_s"] / f32["tokens_per_s"], 3)
        rec = record("memory", {"model": info, "runs": runs, "ratios": ratios})
        print(json.dumps(rec, indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(work, ignore_errors=True)


def _small_adapter(model: Path, out: Path) -> None:
    """An r=16 LoRA on q_proj/v_proj of every layer, made with peft on the meta device (no weights loaded)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(model)
    with torch.device("meta"):
        m = AutoModelForCausalLM.from_config(cfg)
    pm = get_peft_model(m, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj"]))
    g = torch.Generator().manual_seed(3)
    state = {}
    for name, p in pm.named_parameters():
        if "lora_" in name:
            key = name.replace(".default", "")
            state[key] = (torch.randn(p.shape, generator=g) * (0.02 if "lora_A" in name else 0.01)).contiguous()
    from safetensors.torch import save_file

    out.mkdir()
    pm.peft_config["default"].base_model_name_or_path = str(model)
    pm.peft_config["default"].save_pretrained(str(out))
    save_file(state, str(out / "adapter_model.safetensors"), metadata={"format": "pt"})


def part_summary(a) -> None:
    """Markdown tables of the records in bench/results/scale.jsonl (the last record of each part)."""
    recs = [json.loads(line) for line in open(RESULTS)] if RESULTS.exists() else []
    gb = lambda b: f"{b / 1e9:.2f}"
    for rec in [r for r in recs if r["part"] == "spectrum"][-1:]:
        print(f"spectrum: {rec['date']}, git {rec['git']}, {rec['machine']['cpu']} x {rec['machine']['cores']}, "
              f"disk {rec['disk']['gb_per_s']} GB/s\n")
        print("| hidden | model layers (distinct) | adapted layers | run | wall s | CPU s | VmHWM GB | anon GB | "
              "read GB | read / disk bw, s | load avg | intruders / matrices |")
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rec["runs"]:
            print(f"| {r['hidden']} | {r['model_layers']} ({r['distinct_layers']}) | {r['adapted_layers']} | "
                  f"{'cold' if r['cold'] else 'cached'} | {r['wall_s']:.0f} | {r['cpu_s']:.0f} | {gb(r['maxrss'])} | "
                  f"{gb(r['peak_anon'])} | {gb(r['read_bytes'])} | {r['physical_min_s']:.0f} | "
                  f"{r['load_average_start'][0]:.1f} | {r['intruders']} / {r['matrices']} |")
    for rec in [r for r in recs if r["part"] == "memory"]:
        m = rec["model"]
        print(f"\nmemory: {m['size']} ({m['params'] / 1e9:.2f} B parameters), {rec['date']}, git {rec['git']}\n")
        print("| command | --dtype | exit | wall s | VmHWM GB | anon GB | tokens/s | load avg |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rec["runs"]:
            print(f"| {r['command']} | {r['dtype']} | {r['exit']} | {r['wall_s']:.0f} | {gb(r['maxrss'])} | "
                  f"{gb(r['peak_anon'])} | {r.get('tokens_per_s', '–')} | {r['load_average_start'][0]:.1f} |")
        print("\nratios bfloat16 / float32: " + json.dumps(rec["ratios"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="part", required=True)
    s = sub.add_parser("spectrum")
    s.add_argument("--layers", default="1,2,4", help="adapted layer counts at the small widths (all distinct)")
    s.add_argument("--widths", default="1024,2048,4096")
    s.add_argument("--model-layers", type=int, default=32, help="layers of the 4096-wide model (7B shape: 32)")
    s.add_argument("--distinct-layers", type=int, default=1,
                   help="4096 wide: layer i repeats layer i mod R's base weights (R SVD layers in a cold run)")
    s.add_argument("--big-layers", default="1,2,4,8,16,32", help="adapted layer counts of the cached runs at 4096")
    m = sub.add_parser("memory")
    m.add_argument("--size", choices=sorted(SIZES), default="0.5B")
    m.add_argument("--prompts", type=int, default=4)
    m.add_argument("--new-tokens", type=int, default=16)
    m.add_argument("--timeout", type=float, default=7200)
    for p in (s, m):
        p.add_argument("--workdir", default=None, help="folder for the temporary checkpoints [default: the temp dir]")
        p.add_argument("--keep", action="store_true", help="keep the checkpoints (default: deleted)")
    sub.add_parser("summary", help="Markdown tables of the recorded results")
    a = ap.parse_args()
    {"spectrum": part_spectrum, "memory": part_memory, "summary": part_summary}[a.part](a)


if __name__ == "__main__":
    main()
