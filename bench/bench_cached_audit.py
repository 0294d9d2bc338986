"""A whole-process ``lora-audit spectrum`` of an adapter on a cached base, against the paper's
two-SVD algorithm in float64, in one run: where each matrix's time goes, and the ratios.

The model: a Llama-shaped base of ``--layers`` (8) layers ``--width`` (2048) wide (q, k, v, o
projections width x width with decaying spectra like trained weights; gate/up/down projections
``--intermediate`` wide, random; embeddings and norms), and a PEFT LoRA adapter r = 16, alpha 32
on q, k, v and o (32 changed matrices at the defaults) whose updates are a random 0.05 to 1.5 of
each matrix's top singular value, so some matrices get intruders and some do not (bench_spectrum's
builders). Built in a temporary folder, deleted afterwards.

Every case is a whole process, started from the shell as a user would start it, torch on its
default threads:

    reference   python this-file --_reference BASE ADAPTER OUT: safetensors + torch, W1 = W0 + s B A
                and two full SVDs per changed matrix in float64, max |cos| of each of W1's top-10
                left singular vectors over ALL of W0's, intruder if < 0.5 (Shuttleworth et al.)
    cold        lora-audit spectrum BASE ADAPTER --json OUT, empty cache (computes and stores
                every base spectrum)
    cached      the same with the cache the cold run wrote (``--repeats`` runs, the median); the
                first of them verifies every entry in full and writes the verification memo
                (lora_audit.cache), the others read the entries without hashing them again
    unmemoised  cached runs with the memo deleted before each: every entry hashed (keyed BLAKE3)
    start-up    python -c "import torch": the floor of any process that computes with torch

"work" = cached - start-up. The intruder counts of every lora-audit run must equal the
reference's per matrix. Then one more cached process runs with every stage timed (thread CPU
and wall clock of the reader thread's read, screen, hash and cache read, and the main thread's
screens, projections, search, certificate, metrics, record and JSON), which says where each
matrix's time goes. Results: printed, and written under bench/results/ (``record.py``).

    python bench/bench_cached_audit.py                   # 8 x 2048, ~6 min (the reference: ~4)
    python bench/bench_cached_audit.py --reference-matrices 4   # a busy machine: reference on 4 of 32
    python bench/bench_cached_audit.py --layers 2 --reference-runs 0   # stages only, quick
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record
from bench_spectrum import decaying, write_adapter

ROOT = Path(__file__).resolve().parents[1]
K, EPS = 10, 0.5
GOAL_CACHED, GOAL_COLD, GOAL_WORK = 60.0, 2.5, 1.5
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


# ---- the model ------------------------------------------------------------------------------------
def write_llama(folder: Path, layers: int, width: int, intermediate: int, vocab: int = 512, seed: int = 0) -> dict:
    """A Llama-shaped HF folder (config.json + model.safetensors); the attention matrices (the
    ones the adapter changes) returned by name."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    tensors, attention = {"model.embed_tokens.weight": torch.randn(vocab, width, generator=g) * 0.02,
                          "model.norm.weight": torch.ones(width)}, {}
    for i in range(layers):
        p = f"model.layers.{i}"
        for mod in ATTENTION:
            attention[f"{p}.self_attn.{mod}.weight"] = decaying(width, width, g).contiguous()
        for mod, shape in (("gate_proj", (intermediate, width)), ("up_proj", (intermediate, width)),
                           ("down_proj", (width, intermediate))):
            tensors[f"{p}.mlp.{mod}.weight"] = torch.randn(*shape, generator=g) / shape[1] ** 0.5
        tensors[f"{p}.input_layernorm.weight"] = torch.ones(width)
        tensors[f"{p}.post_attention_layernorm.weight"] = torch.ones(width)
    tensors.update(attention)
    save_file(tensors, str(folder / "model.safetensors"))
    heads = max(1, width // 128)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": width,
        "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
        "num_key_value_heads": heads, "vocab_size": vocab, "rms_norm_eps": 1e-5, "torch_dtype": "float32"}))
    return attention


# ---- the reference, a process of its own ------------------------------------------------------------
def reference_child(base: str, adapter: str, out: str, limit: str = "0") -> None:
    """The paper's algorithm in float64, from the files to the counts (runs as its own process), on
    the first ``limit`` changed matrices (0: all of them)."""
    from safetensors import safe_open

    cfg = json.loads((Path(adapter) / "adapter_config.json").read_text())
    scale = cfg["lora_alpha"] / cfg["r"]
    counts = {}
    with safe_open(str(Path(base) / "model.safetensors"), "pt") as fb, \
            safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as fa:
        adapted = {k[len("base_model.model."): -len(".lora_A.weight")] for k in fa.keys() if k.endswith(".lora_A.weight")}
        for name in fb.keys():
            mod = name[: -len(".weight")]
            if mod not in adapted or (int(limit) and len(counts) >= int(limit)):
                continue
            W0 = fb.get_tensor(name).double()
            pre = f"base_model.model.{mod}"
            W1 = W0 + scale * (fa.get_tensor(pre + ".lora_B.weight").double() @ fa.get_tensor(pre + ".lora_A.weight").double())
            U0 = torch.linalg.svd(W0, full_matrices=False)[0]
            U1 = torch.linalg.svd(W1, full_matrices=False)[0]
            cos = (U0.T @ U1[:, :K]).abs().max(dim=0).values  # max over ALL base vectors
            counts[name] = int((cos < EPS).sum())
    Path(out).write_text(json.dumps(counts))


# ---- one cached process with its stages timed --------------------------------------------------------
def staged_child(out: str, argv: list[str]) -> None:
    """``lora-audit spectrum`` (``argv``) with the stages of the cached path timed: thread CPU and
    wall seconds per stage, summed over calls. Runs as its own process; the import of the CLI is
    timed as a stage too."""
    t_start = time.perf_counter()
    from lora_audit import startup

    startup.hold()  # as the console script does (lora_audit.startup)
    cpu: dict[str, float] = defaultdict(float)
    wall: dict[str, float] = defaultdict(float)
    calls: dict[str, int] = defaultdict(int)

    def timed(owner, attr: str, label: str, thread: str) -> None:
        f = getattr(owner, attr)

        @functools.wraps(f)
        def g(*a, **kw):
            c, w = time.thread_time(), time.perf_counter()
            try:
                return f(*a, **kw)
            finally:
                key = f"{thread}: {label}"
                cpu[key] += time.thread_time() - c
                wall[key] += time.perf_counter() - w
                calls[key] += 1

        setattr(owner, attr, g)

    import lora_audit.cli as cli
    import lora_audit.commands.spectrum as command
    from lora_audit import cache as store
    from lora_audit.checkpoints import stream
    from lora_audit.spectral import cache, engine, lowrank
    t_imported = time.perf_counter()
    # reader thread (schedule's prefetch): the stream's next group, W0's screen, its key, its entry
    timed(stream.AuditStream, "_group", "read W0 and the adapter factors", "reader")
    timed(engine, "count_nonfinite", "screen W0 for NaN/Inf (one reduction)", "reader")
    timed(cache, "tensor_key", "hash W0 (BLAKE3 content key)", "reader")
    timed(store.EntryStore, "read", "read the cached spectrum (keyed BLAKE3 unless the memo covers it)", "reader")
    memo = {"hits": 0}
    has = store.EntryStore._memo_has

    def memo_has(self, key, identity):
        found = has(self, key, identity)
        memo["hits"] += found
        return found

    store.EntryStore._memo_has = memo_has
    # main thread: per matrix
    timed(engine, "screen_base", "screen W0", "main")
    timed(engine, "screen_delta", "screen the update (norm bounds)", "main")
    timed(engine, "update_metrics", "metrics of dW (QR of B, A; r x r SVD)", "main")
    timed(lowrank, "project", "project the LoRA factors (U0^T B, V0^T A^T)", "reader")
    timed(lowrank, "topk_svd", "top-k search (Davidson, float64)", "main")
    timed(lowrank, "count_above", "certificate (inertia count)", "main")
    timed(engine, "_matrix_result", "record (cosines, sweep, calibration)", "main")
    timed(command, "write_json_output", "write the JSON", "main")
    rc = 0
    try:
        cli.cli.main(args=argv, prog_name="lora-audit", standalone_mode=False)
    except SystemExit as e:
        rc = int(e.code or 0)
    stages = {k: {"cpu_s": cpu[k], "wall_s": wall[k], "calls": calls[k]} for k in cpu}
    Path(out).write_text(json.dumps({"rc": rc, "import_s": t_imported - t_start, "total_s": time.perf_counter() - t_start,
                                     "stages": stages, "memo_hits": memo["hits"]}))


# ---- the run ------------------------------------------------------------------------------------------
def _env(tmp: Path) -> dict:
    return {**os.environ, "LORA_AUDIT_NO_PROGRESS": "1", "LORA_AUDIT_CONFIG": str(tmp / "config"),
            "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def _timed_run(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    secs = time.perf_counter() - t
    if out.returncode not in (0, 3):
        raise SystemExit(f"{' '.join(cmd[:4])} ... failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return secs


def _counts(path: Path) -> dict[str, int]:
    (res,) = json.loads(path.read_text())["results"]
    return {m["name"]: m["intruders"] for m in res["matrices"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=5632)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5, help="cached whole processes (the median is judged)")
    ap.add_argument("--cold-runs", type=int, default=1)
    ap.add_argument("--unmemoised-runs", type=int, default=3, help="cached runs with the verification memo deleted first")
    ap.add_argument("--reference-runs", type=int, default=1, help="0: no reference (no ratios)")
    ap.add_argument("--reference-matrices", type=int, default=0,
                    help="run the reference on the first N changed matrices only and scale its time to all of "
                         "them (every matrix has the same shape; for a machine too busy to run it whole); 0: all")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/results/")
    ap.add_argument("--_reference", nargs=4, help=argparse.SUPPRESS)
    ap.add_argument("--_staged", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._reference:
        reference_child(*args._reference)
        return 0
    if args._staged:
        staged_child(args._staged[0], args._staged[1:])
        return 0
    run = record.start(f"bench_cached_audit-{args.layers}x{args.width}")
    tmp = Path(tempfile.mkdtemp(prefix="bench-cached-"))
    try:
        return _bench(tmp, args, run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(tmp: Path, args, run: dict) -> int:
    env = _env(tmp)
    t = time.perf_counter()
    base = write_llama(tmp / "base", args.layers, args.width, args.intermediate)
    write_adapter(tmp / "adapter", base, seed=0, rank=args.rank, alpha=2 * args.rank, modules=ATTENTION)
    n_matrices = len(base)
    del base
    print(f"{args.layers} layers x {args.width} wide (MLP {args.intermediate}), LoRA r={args.rank} on "
          f"{'/'.join(m[0] for m in ATTENTION)}: {n_matrices} changed matrices; built in {time.perf_counter() - t:.0f} s; "
          f"{os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    py = sys.executable
    spectrum = [py, "-m", "lora_audit", "spectrum", str(tmp / "base"), str(tmp / "adapter"), "--device", "cpu", "-q",
                "--cache-dir", str(tmp / "cache")]
    figures: dict = {"layers": args.layers, "width": args.width, "rank": args.rank, "matrices": n_matrices,
                     "torch_threads": torch.get_num_threads()}
    ok = True

    startup = min(_timed_run([py, "-c", "import torch"], env) for _ in range(3))
    figures["startup_s"] = startup
    print(f"start-up (python -c 'import torch', best of 3): {startup:.2f} s")

    ref_counts, ref_times = None, []
    part = args.reference_matrices if 0 < args.reference_matrices < n_matrices else n_matrices
    for i in range(args.reference_runs):
        out = tmp / f"reference-{i}.json"
        secs = _timed_run([py, __file__, "--_reference", str(tmp / "base"), str(tmp / "adapter"), str(out), str(part)], env)
        ref_counts = json.loads(out.read_text())
        # scaled to every matrix: the start-up once, the per-matrix work n / part times
        ref_times.append(startup + (secs - startup) * n_matrices / part)
        print(f"reference (float64, two SVDs per matrix), whole process: {secs:.1f} s on {part} of {n_matrices} matrices"
              + (f" -> {ref_times[-1]:.1f} s scaled to all {n_matrices} (start-up counted once)" if part < n_matrices else "")
              + f"; {sum(ref_counts.values())} intruders")
    figures.update(reference_s=ref_times, reference_matrices=part)

    def same(label: str, path: Path) -> None:
        nonlocal ok
        if ref_counts is None:
            return
        got = {k: v for k, v in _counts(path).items() if k in ref_counts}  # the reference's matrices
        identical = got == ref_counts and len(got) == len(ref_counts)
        ok &= identical
        figures.setdefault("identical_counts", {})[label] = identical
        if not identical:
            print(f"  {label}: counts DIFFER from the reference: "
                  f"{ {k: (ref_counts.get(k), got.get(k)) for k in set(ref_counts) | set(got) if ref_counts.get(k) != got.get(k)} }")

    cold = []
    for i in range(args.cold_runs):
        shutil.rmtree(tmp / "cache", ignore_errors=True)
        cold.append(_timed_run(spectrum + ["--json", str(tmp / f"cold-{i}.json")], env))
        same(f"cold-{i}", tmp / f"cold-{i}.json")
    print(f"lora-audit, cold cache, whole process: {', '.join(f'{c:.1f}' for c in cold)} s")
    cached = []
    for i in range(args.repeats):
        cached.append(_timed_run(spectrum + ["--json", str(tmp / f"cached-{i}.json")], env))
        same(f"cached-{i}", tmp / f"cached-{i}.json")
    unmemoised = []
    for i in range(args.unmemoised_runs):
        for memo in (tmp / "cache").glob("*.verified.json"):
            memo.unlink()
        unmemoised.append(_timed_run(spectrum + ["--json", str(tmp / f"unmemoised-{i}.json")], env))
        same(f"unmemoised-{i}", tmp / f"unmemoised-{i}.json")
    if unmemoised:
        print(f"lora-audit, base cached, every entry hashed (memo deleted before each run): "
              f"median {statistics.median(unmemoised):.2f} s of {', '.join(f'{c:.2f}' for c in unmemoised)}")
        figures["unmemoised_s"] = unmemoised
        _timed_run(spectrum + ["--json", str(tmp / "rememo.json")], env)  # writes the memo again for the stages
    med = statistics.median(cached)
    work = med - startup
    print(f"lora-audit, base cached, whole process: median {med:.2f} s of {', '.join(f'{c:.2f}' for c in cached)}; "
          f"work (minus start-up) {work:.2f} s = {1000 * work / n_matrices:.0f} ms per matrix")
    figures.update(cold_s=cold, cached_s=cached, cached_median_s=med, work_s=work,
                   work_per_matrix_ms=1000 * work / n_matrices)

    rows = []
    if ref_times:
        ref = statistics.median(ref_times)
        r_cached, r_cold = ref / med, ref / statistics.median(cold)
        verdicts = {"cached": r_cached >= GOAL_CACHED, "cold": r_cold >= GOAL_COLD, "work": work < GOAL_WORK}
        ok &= all(verdicts.values())
        figures["ratios"] = {"cached": r_cached, "cold": r_cold, "goals": {"cached": GOAL_CACHED, "cold": GOAL_COLD,
                                                                          "work_s": GOAL_WORK}, "met": verdicts}
        v = {k: "met" if x else "MISSED" for k, x in verdicts.items()}
        print(f"\nbase cached: {r_cached:.0f}x the reference (goal >= {GOAL_CACHED:.0f}x: {v['cached']}); work "
              f"{work:.2f} s (goal < {GOAL_WORK} s: {v['work']}); cold: {r_cold:.1f}x (goal >= {GOAL_COLD}x: {v['cold']})")
        scaled = f" (measured on {part} of {n_matrices} matrices, scaled)" if part < n_matrices else ""
        rows = [(f"reference: float64, two SVDs per matrix{scaled}", f"{ref:.1f} s", "", "1x", "", ""),
                ("lora-audit spectrum, base cached (median)", f"{med:.2f} s", f"{ref:.1f} s", f"{r_cached:.0f}x",
                 f">= {GOAL_CACHED:.0f}x", v["cached"]),
                ("  of which work (minus `import torch`)", f"{work:.2f} s", "", "", f"< {GOAL_WORK} s", v["work"]),
                ("lora-audit spectrum, cold cache", f"{statistics.median(cold):.1f} s", f"{ref:.1f} s", f"{r_cold:.1f}x",
                 f">= {GOAL_COLD}x", v["cold"])]
        if unmemoised:
            um = statistics.median(unmemoised)
            rows.insert(3, ("  the same, every entry hashed (no verification memo; median)", f"{um:.2f} s", f"{ref:.1f} s",
                            f"{ref / um:.0f}x", "", ""))

    # where the time goes: one more cached process, its stages timed
    out = tmp / "stages.json"
    t = time.perf_counter()
    subprocess.run([py, __file__, "--_staged", str(out), *spectrum[3:], "--json", str(tmp / "staged.json")],
                   env=env, check=True, cwd=ROOT)
    whole = time.perf_counter() - t
    st = json.loads(out.read_text())
    print(f"\nwhere the time goes (one cached process, {whole:.2f} s wall; per matrix = over {n_matrices} matrices):")
    print(f"  {'process start + imports':<62} wall {whole - st['total_s'] + st['import_s']:6.2f} s")
    for key, s in sorted(st["stages"].items(), key=lambda kv: (kv[0].split(":")[0] != "reader", -kv[1]["cpu_s"])):
        print(f"  {key:<62} cpu {s['cpu_s']:6.3f} s  wall {s['wall_s']:6.3f} s  "
              f"{1000 * s['cpu_s'] / n_matrices:6.1f} ms cpu per matrix  ({s['calls']} calls)")
    print(f"  (the reader thread runs one matrix ahead of the main thread; hashing also runs on BLAKE3's own "
          f"threads, whose CPU time the reader's thread time does not include; the verification memo spared "
          f"{st.get('memo_hits', 0)} of {n_matrices} entries their keyed hash)")
    figures["stages"] = {"whole_s": whole, **st}
    print(f"\nload average at the end: {os.getloadavg()[0]:.1f}")
    if not args.no_record:
        print(f"results: {record.write(run, figures, rows)}")
    if not ref_times:
        print("\nno reference run (--reference-runs 0): no goal judged, no counts compared")
    else:
        print("\nall goals met" if ok else "\nSOME GOALS MISSED or counts differ (see above)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
