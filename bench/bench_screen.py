"""Throughput and peak memory of ``lora-audit screen`` on this machine, against ``lora-audit spectrum``
with every TUNED in one process, in one run.

Synthetic checkpoints (bench_spectrum's builders): a base of ``--layers`` (2) layers of 2048-wide
matrices (q_proj and o_proj 2048 x 2048, up_proj 4096 x 2048, decaying spectra like trained
weights) and ``--adapters`` PEFT adapters with mixed ranks (4, 8, 16, 32), targets (q; q+o;
q+o+up) and update sizes (a random 0.05 to 1.5 of each matrix's top singular value: some
matrices get intruders, some do not). Written to a temporary folder, deleted afterwards.

Every case is a whole CLI process (``python -m lora_audit ...``, as the console script runs), with the base spectra
cached first (the goal is stated for a cached base):

    spectrum        lora-audit spectrum BASE A1 ... AN --json   (one process, every TUNED at once)
    screen local    lora-audit screen BASE ADAPTERS --workers W --detail 0
    screen ray      the same with --engine ray (a local Ray runtime of W CPUs, started by the CLI)

Adapters per minute: N / wall time of the process (start-up, scan, summary included), and the
screen's own rate (summary.json: adapters audited / seconds of the run). Peak memory: anonymous
RSS (RssAnon: memory-mapped weights and cache entries are shared, reclaimable page cache) of the
process and all its descendants (workers, Ray's own processes), summed, sampled every 50 ms; for
Ray also the object store's shared memory (the largest RssShmem of one process). Both are measured
at N and at N/4 adapters: a screen's memory must not grow with N.

Cost terms of the README's throughput model, measured here: ``a`` + ``b`` x (LoRA matrices) seconds
per adapter (least squares over the local screen's records: a = opening and hashing an adapter,
b = one LoRA matrix against its held base spectrum), ``t_svd`` = one base matrix's SVD (a cold
cache minus a warm one, on one adapter that changes every matrix).

    python bench/bench_screen.py                       # 200 adapters, 2 layers, 2 workers: ~8 min
    python bench/bench_screen.py --adapters 40 --no-ray
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record
from bench_spectrum import write_adapter, write_base

ROOT = Path(__file__).resolve().parents[1]
RANKS = (4, 8, 16, 32)
TARGETS = (("q_proj",), ("q_proj", "o_proj"), ("q_proj", "o_proj", "up_proj"))
GOAL = 200  # adapters per minute on the 2-core CPU, base cached


# ---- whole processes, with the memory of their process tree ---------------------------------------
def _status(pid: int, fields: tuple[str, ...]) -> dict[str, int]:
    out = dict.fromkeys(fields, 0)
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in out:
                    out[key] = int(line.split()[1]) * 1024
    except OSError:  # the process ended meanwhile
        pass
    return out


def run(cmd: list[str], env: dict, log: Path) -> dict:
    """Run ``cmd``; wall seconds, exit code, and peak RssAnon of the driver and of its whole tree."""
    import psutil

    peak = {"driver_anon": 0, "tree_anon": 0, "shmem": 0}
    done = threading.Event()
    with open(log, "w") as fh:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, cwd=ROOT)

        def sample():
            root = psutil.Process(proc.pid)
            while not done.is_set():
                try:
                    pids = [proc.pid] + [c.pid for c in root.children(recursive=True)]
                except psutil.Error:
                    break
                st = [_status(p, ("RssAnon", "RssShmem")) for p in pids]
                peak["driver_anon"] = max(peak["driver_anon"], st[0]["RssAnon"])
                peak["tree_anon"] = max(peak["tree_anon"], sum(s["RssAnon"] for s in st))
                peak["shmem"] = max([peak["shmem"]] + [s["RssShmem"] for s in st])
                done.wait(0.05)

        th = threading.Thread(target=sample, daemon=True)
        th.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        done.set()
        th.join()
    return {"seconds": seconds, "rc": rc, **peak}


def _mib(n: float) -> str:
    return f"{n / 2**20:.0f} MiB"


# ---- the checkpoints ------------------------------------------------------------------------------
def build(root: Path, layers: int, width: int, n: int) -> tuple[Path, list[Path]]:
    base = write_base(root / "base", layers, width)
    adapters = []
    for i in range(n):
        folder = root / "adapters" / f"a{i:04d}"
        r = RANKS[(i // len(TARGETS)) % len(RANKS)]
        write_adapter(folder, base, seed=i, rank=r, alpha=2 * r, modules=TARGETS[i % len(TARGETS)])
        adapters.append(folder)
    return root / "base", adapters


# ---- results --------------------------------------------------------------------------------------
def spectrum_totals(path: Path) -> dict[str, int]:
    return {r["tuned"]: r["total_intruders"] for r in json.loads(path.read_text())["results"]}


def screen_records(out: Path) -> list[dict]:
    latest = {}
    for line in (out / "index.jsonl").read_text().splitlines():
        e = json.loads(line)
        latest[e["adapter"]] = e
    recs = []
    for e in latest.values():
        with open(out / "records" / e["shard"], "rb") as fh:
            fh.seek(e["offset"])
            recs.append(json.loads(fh.read(e["length"])))
    return recs


def compare(spectrum_json: Path, out: Path) -> tuple[int, float]:
    """(adapters whose total differs, max |max_cos difference|) between a screen and spectrum."""
    ref = {r["tuned"]: r for r in json.loads(spectrum_json.read_text())["results"]}
    differ, worst = 0, 0.0
    for rec in screen_records(out):
        r, mine = ref[rec["adapter"]], rec["result"]
        differ += r["total_intruders"] != mine["total_intruders"]
        for a, b in zip(r["matrices"], mine["matrices"], strict=True):
            worst = max([worst] + [abs(x - y) for x, y in zip(a["max_cos"], b["max_cos"], strict=True)])
    return differ, worst


def cost_terms(out: Path) -> tuple[float, float]:
    """Least-squares a, b of seconds = a + b * matrices over the screen's records."""
    pts = [(len(r["result"]["matrices"]), r["seconds"]) for r in screen_records(out) if r["status"] == "ok"]
    X = torch.tensor([[1.0, m] for m, _ in pts], dtype=torch.float64)
    y = torch.tensor([s for _, s in pts], dtype=torch.float64)
    a, b = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    return a, b


# ---- where the time goes: one in-process screen with its stages timed -----------------------------------
STAGES = (  # (module, owner attribute path, label): what a screen does per adapter
    ("lora_audit.screen.worker", "input_fingerprint", "hash the adapter's files (fingerprint)"),
    ("lora_audit.checkpoints.structure", "check_structure", "load: structural checks (headers, config)"),
    ("lora_audit.checkpoints", "open_stream", "load: open base + adapter, match, plan"),
    ("lora_audit.checkpoints.stream", "AuditStream._group", "load: read W0 view and the LoRA factors"),
    ("lora_audit.screen.spectra", "HeldSpectra.get", "base spectra held by the worker (first use: cache read)"),
    ("lora_audit.spectral.engine", "screen_base", "screens of W0 and the update"),
    ("lora_audit.spectral.engine", "screen_delta", "screens of W0 and the update"),
    ("lora_audit.spectral.lowrank", "project", "top-k: projections U0^T B, V0^T A^T"),
    ("lora_audit.spectral.engine", "audit_matrix", "top-k: search, certificate, metrics, record"),
    ("lora_audit.screen.store", "ScreenStore.append", "write: the record (append + fsync, index + fsync)"),
    ("lora_audit.screen.summary", "write_outputs", "write: summary.csv/json, report.html (once)"),
)


def staged_child(out: str, argv: list[str]) -> None:
    """``lora-audit screen ... --workers 0`` (``argv``) in this process with each stage's wall and
    thread CPU time summed, per thread (the engine's reader thread reads and projects the next
    matrix while the main thread audits this one); JSON to ``out``."""
    import functools
    import importlib
    from collections import defaultdict

    import threading

    wall: dict = defaultdict(float)
    cpu: dict = defaultdict(float)
    calls: dict = defaultdict(int)
    local = threading.local()  # nested stages count once, in the outermost, per thread

    def timed(owner, attr: str, label: str) -> None:
        f = getattr(owner, attr)

        @functools.wraps(f)
        def g(*a, **kw):
            if getattr(local, "active", False):
                return f(*a, **kw)
            local.active = True
            w, c = time.perf_counter(), time.thread_time()
            try:
                return f(*a, **kw)
            finally:
                local.active = False
                key = ("reader: " if threading.current_thread().name == "lora-audit-reader" else "main: ") + label
                wall[key] += time.perf_counter() - w
                cpu[key] += time.thread_time() - c
                calls[key] += 1

        setattr(owner, attr, g)

    t0 = time.perf_counter()
    import lora_audit.cli as cli
    for mod, path, label in STAGES:
        owner = importlib.import_module(mod)
        *parents, attr = path.split(".")
        for p in parents:
            owner = getattr(owner, p)
        timed(owner, attr, label)
    t1 = time.perf_counter()
    t_import = t1 - t0
    try:
        cli.cli.main(args=argv, prog_name="lora-audit", standalone_mode=False)
    except SystemExit:
        pass
    total = time.perf_counter() - t1
    Path(out).write_text(json.dumps({"import_s": t_import, "run_s": total,
                                     "stages": {k: {"wall_s": wall[k], "cpu_s": cpu[k], "calls": calls[k]} for k in wall}}))


# ---- the cases --------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    ap.add_argument("--no-record", action="store_true", help="do not write bench/results/")
    ap.add_argument("--_staged", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._staged:
        staged_child(args._staged[0], args._staged[1:])
        return 0
    context = record.start("bench_screen")
    tmp = Path(tempfile.mkdtemp(prefix="bench-screen-"))
    try:
        return _bench(tmp, args, context)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(tmp: Path, args, context: dict) -> int:
    env = {**os.environ, "LORA_AUDIT_CACHE": str(tmp / "cache"), "LORA_AUDIT_CONFIG": str(tmp / "config"),
           "LORA_AUDIT_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    base, adapters = build(tmp / "data", args.layers, args.width, args.adapters)
    size = sum(f.stat().st_size for a in adapters for f in a.iterdir()) / len(adapters)
    print(f"built a base of {args.layers} x 3 matrices {args.width} wide and {len(adapters)} adapters "
          f"(mean {size / 2**20:.1f} MiB) in {time.perf_counter() - t:.0f} s; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    cli = [sys.executable, "-m", "lora_audit"]
    (tmp / "small").mkdir()
    small = []  # the first N/4 adapters, in a folder of their own (links)
    for a in adapters[: max(1, args.adapters // 4)]:
        os.symlink(a, tmp / "small" / a.name)
        small.append(tmp / "small" / a.name)

    # the base's spectra: cold, then warm, on an adapter that changes every matrix (q+o+up)
    full = adapters[len(TARGETS) - 1]
    cold = run(cli + ["spectrum", str(base), str(full), "-q"], env, tmp / "cold.log")
    warm = run(cli + ["spectrum", str(base), str(full), "-q"], env, tmp / "warm.log")
    t_svd = (cold["seconds"] - warm["seconds"]) / (3 * args.layers)
    print(f"base spectra: cold {cold['seconds']:.1f} s, warm {warm['seconds']:.1f} s -> t_svd ~ {t_svd:.2f} s "
          "per matrix (the driver pays it once per screen)")

    cases = {}

    def case(label, cmd, n, out=None):
        log = tmp / (label.replace(" ", "_").replace("/", "-") + ".log")
        r = run(cmd, env, log)
        if r["rc"] not in (0, 4):
            print(f"{label}: exit code {r['rc']}; the end of its output:\n" + log.read_text()[-3000:])
            raise SystemExit(1)
        r["n"], r["rate"] = n, n / r["seconds"] * 60
        if out is not None:
            s = json.loads((out / "summary.json").read_text())
            r["own_rate"] = s["counts"]["audited_now"] / s["seconds"] * 60
        cases[label] = r
        own = f", in-run {r['own_rate']:.0f}/min" if "own_rate" in r else ""
        print(f"  {label:<22} {n:>4} adapters  {r['seconds']:7.1f} s  {r['rate']:6.0f} adapters/min{own}   "
              f"peak RssAnon: driver {_mib(r['driver_anon'])}, all processes {_mib(r['tree_anon'])}"
              + (f", object store (shm) {_mib(r['shmem'])}" if r["shmem"] > 2**20 else ""))

    print("\nwhole processes, base cached:")
    w = str(args.workers)
    for label, group, folder in (("N", adapters, tmp / "data" / "adapters"), ("N/4", small, tmp / "small")):
        js = tmp / f"spectrum-{len(group)}.json"
        case(f"spectrum {label}", cli + ["spectrum", str(base), *map(str, group), "--json", str(js), "-q"],
             len(group))
        out = tmp / f"screen-local-{len(group)}"
        case(f"screen local {label}", cli + ["screen", str(base), str(folder), "--out", str(out), "--workers", w,
                                             "--detail", "0", "-q"], len(group), out)
        differ, worst = compare(js, out)
        print(f"    screen local vs spectrum: {differ} adapters with another intruder total; max |max_cos "
              f"difference| {worst:.1e} (the LoRA path runs on one thread in both: the same bits expected)")
    if not args.no_ray:
        out = tmp / "screen-ray"
        case("screen ray N", cli + ["screen", str(base), str(tmp / "data" / "adapters"), "--out", str(out),
                                    "--engine", "ray", "--workers", w, "--detail", "0", "-q"], len(adapters), out)
        differ, worst = compare(tmp / f"spectrum-{len(adapters)}.json", out)
        print(f"    screen ray vs spectrum: {differ} adapters with another intruder total; max |max_cos "
              f"difference| {worst:.1e}")

    recs = screen_records(tmp / f"screen-local-{len(adapters)}")
    a, b = cost_terms(tmp / f"screen-local-{len(adapters)}")
    matrices = sum(len(r["result"]["matrices"]) for r in recs)
    per_matrix = sum(r["seconds"] for r in recs) / matrices
    print(f"\ncost terms (per worker, one CPU thread): least squares a = {a * 1000:.0f} ms per adapter (open, hash, "
          f"plan), b = {b * 1000:.0f} ms per LoRA matrix ({args.width} wide, base spectrum held)"
          + (" (a < 0: not separable from the noise of this run)" if a < 0 else "")
          + f"; all worker time / all matrices = {per_matrix * 1000:.0f} ms per matrix; mean "
          f"{matrices / len(recs):.1f} matrices per adapter; t_svd {t_svd:.2f} s")
    print(f"load average at the end: {os.getloadavg()[0]:.1f} (other work on the machine slows every case)")
    local = cases["screen local N"]
    print(f"\ngoal >= {GOAL} adapters/min on this machine (screen local, whole process): {local['rate']:.0f} "
          f"({'met' if local['rate'] >= GOAL else 'NOT met'}); spectrum in one process: {cases['spectrum N']['rate']:.0f}")
    for label in ("spectrum", "screen local"):
        big, little = cases[f"{label} N"], cases[f"{label} N/4"]
        print(f"peak RssAnon of {label}, all processes: {_mib(little['tree_anon'])} at {little['n']} adapters, "
              f"{_mib(big['tree_anon'])} at {big['n']} ({big['tree_anon'] / max(little['tree_anon'], 1):.2f}x)")

    # where the time goes: the N/4 adapters screened again in one process (--workers 0), stages timed
    staged = tmp / "stages.json"
    subprocess.run([sys.executable, __file__, "--_staged", str(staged), "screen", str(base), str(tmp / "small"), "--out",
                    str(tmp / "screen-staged"), "--workers", "0", "--detail", "0", "-q"], env=env, check=True, cwd=ROOT)
    st = json.loads(staged.read_text())
    n_small = len(small)
    print(f"\nwhere the time goes (one process, --workers 0, {n_small} adapters, {matrices / len(recs):.1f} LoRA matrices "
          f"each; imports {st['import_s']:.2f} s, screen {st['run_s']:.2f} s):")
    by_label: dict = {}
    for k, v in st["stages"].items():
        by_label.setdefault(k, [0.0, 0.0])
        by_label[k][0] += v["wall_s"]
        by_label[k][1] += v["cpu_s"]
    accounted = sum(w for k, (w, _) in by_label.items() if k.startswith("main"))
    for k, (w, c) in sorted(by_label.items(), key=lambda kv: (kv[0].startswith("reader"), -kv[1][0])):
        print(f"  {k:<66} {1000 * w / n_small:7.1f} ms per adapter (thread CPU {1000 * c / n_small:6.1f})")
    print(f"  {'main: other (discovery, the driver, waiting for the reader)':<66} "
          f"{1000 * (st['run_s'] - accounted) / n_small:7.1f} ms per adapter")
    figures = {"adapters": args.adapters, "layers": args.layers, "width": args.width, "workers": args.workers,
               "t_svd_s": t_svd, "cost_a_s": a, "cost_b_s": b, "per_matrix_s": per_matrix,
               "cases": cases, "stages": st, "goal_per_min": GOAL}
    rows = [(label, f"{c['n']} adapters", f"{c['seconds']:.1f} s", f"{c['rate']:.0f}/min",
             f"{c['own_rate']:.0f}/min" if "own_rate" in c else "", f"{_mib(c['tree_anon'])}") for label, c in cases.items()]
    rows.append((f"goal: screen local N >= {GOAL}/min", "", "", f"{local['rate']:.0f}/min", "",
                 "met" if local["rate"] >= GOAL else "missed"))
    if not args.no_record:
        print(f"results: {record.write(context, figures, rows, header=('case (whole process)', 'adapters', 'wall', 'rate', 'rate inside the run', 'peak RssAnon / verdict'))}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
