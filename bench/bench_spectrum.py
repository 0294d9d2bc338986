"""Speed and memory of ``lora-audit spectrum`` against the paper's plain algorithm, in one run.

The reference (implemented here, independent of lora_audit): read W0 and the tuned weights from
the safetensors files, merge a LoRA as W1 = W0 + (alpha / r) * B @ A in float32, take two full
SVDs per matrix with ``torch.linalg.svd``, and count the top-k left singular vectors of W1 whose
max |cos| against ALL left singular vectors of W0 is below epsilon (Shuttleworth et al. 2024).

lora-audit: ``open_stream`` + ``engine.audit`` (the library call behind ``lora-audit spectrum``)
with the on-disk base-spectrum cache; the LoRA fast path works in the base's singular basis, the
full fine-tune path uses block Krylov top-k.

The targets are judged on WHOLE PROCESSES, as the issue sets them: for lora-audit with the base
cached, a real ``lora-audit spectrum BASE TUNED --json ...`` process (counts read from its JSON);
for the reference and the long cold runs, the in-process time plus the start-up of a process that
imports what it needs (measured here: Python + torch is ~2 s on this machine, which alone caps a
whole-process ratio for a small model). In-process wall clock, from file paths to counts
(reading, hashing, cache, SVDs), is printed alongside. Peak memory is measured in subprocesses
(VmHWM and sampled RssAnon from /proc/self/status) for models of 4 and 16 layers.

Synthetic checkpoints (decaying spectra like trained weights, PEFT-format adapters, a full
fine-tune) are written to a temporary folder and deleted afterwards.

    python bench/bench_spectrum.py --threads 1              # 2048/4096-wide layers, ~7 min
    python bench/bench_spectrum.py --threads 1 --width 4096 # 4096/8192-wide layers, ~30 min
    python bench/bench_spectrum.py --quick                  # 1024-wide, ~2 min
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record

K, EPS = 10, 0.5
ALPHA, RANK = 32, 16


# ---- synthetic checkpoints ---------------------------------------------------------------------
def decaying(m: int, n: int, g: torch.Generator) -> torch.Tensor:
    """A matrix whose singular values decay like trained weights': (G1 * d) @ G2, d_i ~ i^-0.6."""
    p = min(m, n)
    d = torch.arange(1, p + 1, dtype=torch.float32).pow(-0.6)
    return (torch.randn(m, p, generator=g) * d) @ torch.randn(p, n, generator=g) / n ** 0.5


def top_singular_value(W: torch.Tensor, iters: int = 30) -> float:
    """sigma_1 by power iteration (close enough to size the updates; no SVD)."""
    x = torch.ones(W.shape[1]) / W.shape[1] ** 0.5
    for _ in range(iters):
        x = W.T @ (W @ x)
        x = x / x.norm()
    return float((W @ x).norm())


def module_shapes(width: int) -> dict[str, tuple[int, int]]:
    """Per layer: two square attention projections and a tall MLP projection (out = 2 x width)."""
    return {"self_attn.q_proj": (width, width), "self_attn.o_proj": (width, width), "mlp.up_proj": (2 * width, width)}


def write_base(folder: Path, layers: int, width: int, seed: int = 0, repeat: int | None = None) -> dict:
    """A HF-style folder; with ``repeat`` the layers repeat the first ``repeat`` layers' weights."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for i in range(layers):
        for mod, (m, n) in module_shapes(width).items():
            if repeat is not None and i >= repeat:
                tensors[f"model.layers.{i}.{mod}.weight"] = tensors[f"model.layers.{i % repeat}.{mod}.weight"].clone()
            else:
                tensors[f"model.layers.{i}.{mod}.weight"] = decaying(m, n, g).contiguous()
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                    "hidden_size": width, "num_hidden_layers": layers}))
    return tensors


_TOP: dict[int, float] = {}  # id(base tensor) -> top singular value, computed once for all adapters


def _top(W: torch.Tensor) -> float:
    if id(W) not in _TOP:
        _TOP[id(W)] = top_singular_value(W)
    return _TOP[id(W)]


def write_adapter(folder: Path, base: dict, seed: int, *, rank: int = RANK, alpha: float = ALPHA,
                  modules: tuple[str, ...] | None = None) -> None:
    """A PEFT LoRA adapter (default r = 16, alpha = 32, every matrix of ``base``; ``modules``: only
    the matrices whose module name is one of these) whose update's norm is a random fraction (0.05
    to 1.5) of the base matrix's top singular value: some matrices get intruders, some do not."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(1000 + seed)
    s = alpha / rank
    out = {}
    targets = {n: W0 for n, W0 in base.items() if modules is None or n.split(".")[-2] in modules}
    for name, W0 in targets.items():
        m, n = W0.shape
        top = _top(W0)
        c = 0.05 + 1.45 * float(torch.rand(1, generator=g))
        A = torch.randn(rank, n, generator=g) / n ** 0.5
        B = torch.randn(m, rank, generator=g) / m ** 0.5 * (c * top / s)
        mod = name[: -len(".weight")]
        out[f"base_model.model.{mod}.lora_A.weight"] = A.contiguous()
        out[f"base_model.model.{mod}.lora_B.weight"] = B.contiguous()
    save_file(out, str(folder / "adapter_model.safetensors"))
    mods = sorted({n.split(".")[-2] for n in targets})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": mods, "use_rslora": False,
        "use_dora": False, "fan_in_fan_out": False, "base_model_name_or_path": "synthetic"}))


def write_full_ft(folder: Path, base: dict, seed: int = 7) -> None:
    """A full fine-tune: a small dense change plus a rank-8 change of 0.05 to 1.5 x the top
    singular value (intruders in some matrices)."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, W0 in base.items():
        m, n = W0.shape
        c = 0.05 + 1.45 * float(torch.rand(1, generator=g))
        top = _top(W0)
        dense = 1e-3 * top / n ** 0.5 * torch.randn(m, n, generator=g)
        low = (torch.randn(m, 8, generator=g) / m ** 0.5) @ (torch.randn(8, n, generator=g) / n ** 0.5) * c * top
        out[name] = (W0 + dense + low).contiguous()
    save_file(out, str(folder / "model.safetensors"))
    shutil.copy(folder.parent / "base" / "config.json", folder / "config.json")


# ---- the reference ---------------------------------------------------------------------------
CPU: dict[str, float] = {}  # label -> process CPU seconds of the last call (all threads)


def reference(base_dir: Path, tuned_dir: Path) -> tuple[dict[str, int], float]:
    """The paper's algorithm, end to end from the files: {matrix name: intruders}, seconds."""
    t0, c0 = time.perf_counter(), time.process_time()
    counts = {}
    adapter = (tuned_dir / "adapter_config.json").is_file()
    with safe_open(str(base_dir / "model.safetensors"), "pt") as fb:
        if adapter:
            cfg = json.loads((tuned_dir / "adapter_config.json").read_text())
            scale = cfg["lora_alpha"] / cfg["r"]
            ft = safe_open(str(tuned_dir / "adapter_model.safetensors"), "pt")
        else:
            ft = safe_open(str(tuned_dir / "model.safetensors"), "pt")
        for name in fb.keys():
            W0 = fb.get_tensor(name).float()
            if adapter:
                mod = "base_model.model." + name[: -len(".weight")]
                W1 = W0 + scale * (ft.get_tensor(mod + ".lora_B.weight") @ ft.get_tensor(mod + ".lora_A.weight"))
            else:
                W1 = ft.get_tensor(name).float()
            U0 = torch.linalg.svd(W0, full_matrices=False)[0]
            U1 = torch.linalg.svd(W1, full_matrices=False)[0]
            cos = (U0.T @ U1[:, :K]).abs().max(dim=0).values  # (k,): max over ALL base vectors
            counts[name] = int((cos < EPS).sum())
    CPU["last"] = time.process_time() - c0
    return counts, time.perf_counter() - t0


# ---- lora-audit, in process --------------------------------------------------------------------
def run_lora_audit(base_dir: Path, tuned: list[Path], cache_dir: Path | None) -> tuple[list[dict[str, int]], float, object]:
    """``lora-audit spectrum`` as a library call: per tuned model {matrix: intruders}, seconds."""
    from lora_audit.checkpoints import open_stream
    from lora_audit.spectral.cache import SpectrumCache
    from lora_audit.spectral.engine import audit

    t0, c0 = time.perf_counter(), time.process_time()
    cache = SpectrumCache(cache_dir) if cache_dir is not None else None
    stream = open_stream(str(base_dir), [str(t) for t in tuned])
    try:
        res = audit(stream, k=K, epsilon=EPS, device="cpu", cache=cache, progress=False, dense_metrics=False)
    finally:
        close = getattr(stream, "close", None)
        if close:
            close()
    secs = time.perf_counter() - t0
    CPU["last"] = time.process_time() - c0
    return [{m.name: m.intruders for m in r.matrices} for r in res.results], secs, res


# ---- peak memory, in a subprocess --------------------------------------------------------------
def _status(field: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def rss_child(base_dir: str, adapter: str, cache_dir: str) -> None:
    """Run in a subprocess: audit, sampling RssAnon every 5 ms; print JSON."""
    import lora_audit.checkpoints  # imports counted in the baseline
    import lora_audit.spectral.engine
    import lora_audit.spectral.lowrank  # noqa: F401
    import peft.utils.other  # noqa: F401  (the adapter reader imports it, and with it transformers)

    before = _status("VmRSS")
    peak_anon = [_status("RssAnon")]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak_anon[0] = max(peak_anon[0], _status("RssAnon"))
            time.sleep(0.005)

    t = threading.Thread(target=sample, daemon=True)
    anon0 = _status("RssAnon")
    t.start()
    counts, secs, _ = run_lora_audit(Path(base_dir), [Path(adapter)], Path(cache_dir))
    stop.set()
    t.join()
    print(json.dumps({"rss_after_imports": before, "anon_after_imports": anon0, "peak_anon": peak_anon[0],
                      "vm_hwm": _status("VmHWM"), "matrices": len(counts[0]), "seconds": secs}))


def _child_env() -> dict:
    env = {**os.environ, "LORA_AUDIT_NO_PROGRESS": "1"}
    env.setdefault("OMP_NUM_THREADS", str(torch.get_num_threads()))
    return env


def measure_rss(base_dir: Path, adapter: Path, cache_dir: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--_rss", str(base_dir), str(adapter), str(cache_dir)],
                         capture_output=True, text=True, env=_child_env())
    if out.returncode:
        raise RuntimeError(f"memory subprocess failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the run -----------------------------------------------------------------------------------
_HEADER = ("case", "lora-audit, whole process", "reference, whole process", "ratio", "in process", "ratio in process",
           "target", "met")
_LABELS = {"lora_cold": "cold cache, one LoRA adapter", "lora_cached": "base cached, one LoRA adapter",
           "full_cached": "base cached, full fine-tune (--no-metrics)",
           "many_vs_one_cold": "50 adapters in one run vs one (time ratio, lower is better)"}


def _rows(figures: dict) -> list[tuple]:
    rows = []
    for key, r in figures.get("ratios", {}).items():
        target = f">= {r['target']}x" if key != "many_vs_one_cold" else f"< {r['target']}x"
        met = "met" if r["met"] else "missed"
        if "target_in_process" in r:
            target += f" whole; >= {r['target_in_process']}x in process"
            met += f"; {'met' if r['met_in_process'] else 'missed'} in process"
        rows.append((_LABELS.get(key, key), f"{r['measured_whole_s']:.2f} s", f"{r['baseline_whole_s']:.2f} s",
                     f"{r['ratio_whole']:.1f}x", f"{r['measured_in_process_s']:.3f} s vs {r['baseline_in_process_s']:.2f} s",
                     f"{r['ratio_in_process']:.0f}x", target, met))
    same = figures.get("identical", {})
    rows.append(("intruder counts vs the reference", "identical per matrix in every case" if all(same.values())
                 else f"DIFFER in {[k for k, v in same.items() if not v]}", "", "", "", "", "", ""))
    return rows


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1024-wide matrices (a couple of minutes)")
    ap.add_argument("--width", type=int, default=None, help="hidden width (default 2048; --quick: 1024)")
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--adapters", type=int, default=50,
                    help="adapters of one base audited in one run (0: skip that case)")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory case")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--keep", type=Path, default=None, help="build the checkpoints here and keep them")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures as JSON")
    ap.add_argument("--repeats", type=int, default=5, help="cached in-process runs (the median is judged)")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/results/")
    ap.add_argument("--_rss", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args._rss:
        rss_child(*args._rss)
        return 0
    run = record.start(f"bench_spectrum-{args.layers}x{args.width or (1024 if args.quick else 2048)}")
    width = args.width or (1024 if args.quick else 2048)
    root = Path(tempfile.mkdtemp(prefix="bench-spectrum-")) if args.keep is None else args.keep
    root.mkdir(parents=True, exist_ok=True)
    os.environ["LORA_AUDIT_NO_PROGRESS"] = "1"
    figures: dict = {"cpu_seconds": {}, "width": width, "layers": args.layers, "threads": torch.get_num_threads(),
                     "judged_on": "whole processes"}
    ok = True
    cpu: dict[str, float] = {}  # process CPU seconds (all threads), robust when other jobs share the CPU
    try:
        print(f"lora-audit spectrum bench: {args.layers} layers x {list(module_shapes(width).values())}, LoRA r={RANK}, "
              f"k={K}, epsilon={EPS}, torch threads={torch.get_num_threads()}, cpu count={os.cpu_count()}")
        print("targets judged on whole processes (wall clock, start-up included); in-process wall clock and "
              "process CPU time alongside\n")
        t = time.perf_counter()
        base = write_base(root / "base", args.layers, width)
        write_adapter(root / "adapter", base, seed=0)
        write_full_ft(root / "full", base)
        for i in range(1, max(args.adapters, 1)):
            write_adapter(root / f"adapters/a{i:02d}", base, seed=i)
        print(f"checkpoints built in {time.perf_counter() - t:.1f}s in {root}")

        def check(label, ref_counts, got):
            nonlocal ok
            same = ref_counts == got
            ok &= same
            print(f"  intruders: reference {sum(ref_counts.values())}, lora-audit {sum(got.values())} "
                  f"({'identical per matrix' if same else 'DIFFERENT: ' + str({k: (ref_counts[k], got.get(k)) for k in ref_counts if ref_counts[k] != got.get(k)})})")
            figures.setdefault("identical", {})[label] = same

        def judge(label, base_whole, fast_whole, base_in, fast_in, target, higher=True):
            """The target is judged on whole processes; in-process figures are printed alongside."""
            nonlocal ok
            r, r_in = base_whole / fast_whole, base_in / fast_in
            met = r >= target if higher else r < target
            ok &= met
            figures.setdefault("ratios", {})[label] = {
                "baseline_whole_s": base_whole, "measured_whole_s": fast_whole, "ratio_whole": r,
                "baseline_in_process_s": base_in, "measured_in_process_s": fast_in, "ratio_in_process": r_in,
                "target": target, "met": met}
            return r, r_in, "met" if met else "MISSED"

        def startup(code: str) -> float:
            t = time.perf_counter()
            subprocess.run([sys.executable, "-c", code], check=True, env=_child_env())
            return time.perf_counter() - t

        def cli(tuned: list[Path], cache_dir: Path, extra: tuple[str, ...] = ()) -> tuple[list[dict[str, int]], float]:
            """One whole `lora-audit spectrum` process: (per tuned model {matrix: intruders}, seconds)."""
            out = root / "cli.json"
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "lora_audit", "spectrum", str(root / "base"), *map(str, tuned),
                            "--cache-dir", str(cache_dir), "--device", "cpu", "-q", "--json", str(out), *extra],
                           check=True, capture_output=True, env=_child_env())
            secs = time.perf_counter() - t
            res = json.loads(out.read_text())["results"]
            return [{m["name"]: m["intruders"] for m in r["matrices"]} for r in res], secs

        # 0. start-up of a process: the reference needs torch + safetensors; lora-audit its modules
        start_ref = min(startup("import torch, safetensors.torch") for _ in range(2))
        start_ours = min(startup("from lora_audit import startup; startup.hold(); "  # as the console script does
                                 "import torch, lora_audit.cli, lora_audit.spectral.engine, lora_audit.checkpoints")
                         for _ in range(2))
        figures["startup_s"] = {"reference": start_ref, "lora_audit": start_ours}
        print(f"process start-up (Python + imports): reference {start_ref:.2f}s, lora-audit {start_ours:.2f}s")

        # 1. reference on the LoRA adapter and on the full fine-tune
        # warm-up on a tiny model: lazy imports (the adapter reader imports peft, which imports
        # transformers: seconds) belong to start-up, which is measured above
        tiny = write_base(root / "tiny", 1, 64)
        write_adapter(root / "tiny-adapter", tiny, seed=0)
        run_lora_audit(root / "tiny", [root / "tiny-adapter"], None)
        reference(root / "tiny", root / "tiny-adapter")

        ref_lora, t_ref_lora = reference(root / "base", root / "adapter")
        cpu["ref_lora"] = CPU["last"]
        print(f"\nreference, LoRA adapter:  {t_ref_lora:.2f}s in process, {t_ref_lora + start_ref:.2f}s whole "
              f"({len(ref_lora)} matrices, two full SVDs each)")
        ref_full, t_ref_full = reference(root / "base", root / "full")
        cpu["ref_full"] = CPU["last"]
        print(f"reference, full fine-tune: {t_ref_full:.2f}s in process, {t_ref_full + start_ref:.2f}s whole")
        w_ref_lora, w_ref_full = t_ref_lora + start_ref, t_ref_full + start_ref

        # 2. cold cache, one adapter
        cold_dir = root / "cache-cold"
        (cold,), t_cold, _ = run_lora_audit(root / "base", [root / "adapter"], cold_dir)
        cpu["cold"] = CPU["last"]
        r, r_in, verdict = judge("lora_cold", w_ref_lora, t_cold + start_ours, t_ref_lora, t_cold, 1.8)
        print(f"\n[cold cache] one LoRA adapter: whole {t_cold + start_ours:.2f}s vs reference {w_ref_lora:.2f}s -> "
              f"{r:.1f}x (target >= 1.8x: {verdict}); in process {t_cold:.2f}s vs {t_ref_lora:.2f}s -> {r_in:.1f}x; "
              f"CPU time {cpu['cold']:.2f}s vs {cpu['ref_lora']:.2f}s")
        check("lora_cold", ref_lora, cold)

        # 3. base cached, one adapter (the cache the cold run wrote): in process (the median of
        # --repeats runs, judged against issue 25's goal) and a real CLI process (issue 3's target)
        warm_runs = []
        for _ in range(args.repeats):
            (warm,), t, _ = run_lora_audit(root / "base", [root / "adapter"], cold_dir)
            warm_runs.append((t, CPU["last"]))
            check("lora_cached", ref_lora, warm)
        t_warm, cpu["warm"] = sorted(warm_runs)[len(warm_runs) // 2]
        figures["lora_cached_in_process_runs_s"] = [t for t, _ in warm_runs]
        clis = [cli([root / "adapter"], cold_dir) for _ in range(max(1, args.repeats // 2))]
        ((warm_cli,), w_warm) = sorted(clis, key=lambda c: c[1])[len(clis) // 2]
        r, r_in, verdict = judge("lora_cached", w_ref_lora, w_warm, t_ref_lora, t_warm, 100)
        goal_in = 150 if width < 4096 else 100  # issue 25: in process, >= 150x at 2048 wide, >= 100x at 4 x 4096
        met_in = r_in >= goal_in
        ok &= met_in
        figures["ratios"]["lora_cached"].update(target_in_process=goal_in, met_in_process=met_in)
        print(f"[base cached] one LoRA adapter: in process {t_warm:.3f}s (median of {len(warm_runs)}) vs "
              f"{t_ref_lora:.2f}s -> {r_in:.0f}x (goal >= {goal_in}x in process: {'met' if met_in else 'MISSED'}); "
              f"`lora-audit spectrum` process {w_warm:.2f}s vs reference {w_ref_lora:.2f}s -> {r:.0f}x (target >= "
              f"100x: {verdict}); CPU time {cpu['warm']:.2f}s")
        check("lora_cached_cli", ref_lora, warm_cli)

        # 4. full fine-tune, base cached
        (full,), t_full, _ = run_lora_audit(root / "base", [root / "full"], cold_dir)
        cpu["full"] = CPU["last"]
        (full_cli,), w_full = cli([root / "full"], cold_dir, ("--no-metrics",))
        r, r_in, verdict = judge("full_cached", w_ref_full, w_full, t_ref_full, t_full, 20)
        print(f"[base cached] full fine-tune (--no-metrics): process {w_full:.2f}s vs reference {w_ref_full:.2f}s -> "
              f"{r:.0f}x (target >= 20x: {verdict}); in process {t_full:.3f}s vs {t_ref_full:.2f}s -> {r_in:.0f}x; "
              f"CPU time {cpu['full']:.2f}s")
        check("full_cached", ref_full, full)
        check("full_cached_cli", ref_full, full_cli)

        # 5. many adapters of one base, cold cache, one run
        if args.adapters > 1:
            many = [root / "adapter"] + [root / f"adapters/a{i:02d}" for i in range(1, args.adapters)]
            counts, t_many, _ = run_lora_audit(root / "base", many, root / "cache-many")
            cpu["many"] = CPU["last"]
            r, r_in, verdict = judge("many_vs_one_cold", t_many + start_ours, t_cold + start_ours, t_many, t_cold, 3,
                                     higher=False)
            print(f"[cold cache] {len(many)} adapters in one run: whole {t_many + start_ours:.2f}s vs one cold adapter "
                  f"{t_cold + start_ours:.2f}s -> {r:.2f}x the time (target < 3x: {verdict}); in process {r_in:.2f}x; "
                  f"CPU time {cpu['many']:.2f}s vs {cpu['cold']:.2f}s -> {cpu['many'] / cpu['cold']:.2f}x")
            check("many_first", ref_lora, counts[0])

        # 7. peak memory: 4 vs 16 layers (the 16 repeat the 4 layers' weights, so one warm cache serves both)
        if not args.no_memory:
            mw = max(256, width // 2)
            m4 = write_base(root / "mem4", 4, mw, seed=3)
            write_adapter(root / "mem4-adapter", m4, seed=99)
            m16 = write_base(root / "mem16", 16, mw, seed=3, repeat=4)
            write_adapter(root / "mem16-adapter", m16, seed=99)
            run_lora_audit(root / "mem4", [root / "mem4-adapter"], root / "cache-mem")  # warm the cache
            matrix = 4 * mw * mw
            print(f"\npeak memory (subprocess, base cached, matrices {[s for s in module_shapes(mw).values()]}; "
                  f"one {mw}x{mw} float32 matrix = {_mib(matrix)}):")
            figures["memory"] = {}
            for label, b, a in (("4 layers", "mem4", "mem4-adapter"), ("16 layers", "mem16", "mem16-adapter")):
                m = measure_rss(root / b, root / a, root / "cache-mem")
                model = (root / b / "model.safetensors").stat().st_size
                grow = m["peak_anon"] - m["anon_after_imports"]
                figures["memory"][label] = {**m, "model_bytes": model}
                print(f"  {label} ({m['matrices']} matrices, model file {_mib(model)}): peak anonymous RSS "
                      f"+{_mib(grow)} over the {_mib(m['anon_after_imports'])} after imports "
                      f"(= {grow / matrix:.1f} matrices); VmHWM {_mib(m['vm_hwm'])} (includes memory-mapped file pages)")
            g4 = figures["memory"]["4 layers"]["peak_anon"] - figures["memory"]["4 layers"]["anon_after_imports"]
            g16 = figures["memory"]["16 layers"]["peak_anon"] - figures["memory"]["16 layers"]["anon_after_imports"]
            bounded = g16 < g4 + 4 * matrix
            ok &= bounded
            figures["memory_bounded"] = bounded
            print(f"  growth 4 -> 16 layers: {_mib(g16 - g4)} ({'bounded: does not grow with layers' if bounded else 'GROWS with layers'})")
    finally:
        if args.keep is None:
            shutil.rmtree(root, ignore_errors=True)
    figures["cpu_seconds"] = cpu
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    if not args.no_record:
        print(f"results: {record.write(run, figures, _rows(figures), header=_HEADER)}")
    print("\nall targets met" if ok else "\nSOME TARGETS MISSED (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
