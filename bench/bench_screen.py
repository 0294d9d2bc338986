"""Throughput and peak memory of ``lora-audit screen`` on this machine, against ``lora-audit spectrum``
with every TUNED in one process, in one run.

Synthetic checkpoints (bench_spectrum's builders): a base of ``--layers`` (2) layers of 2048-wide
matrices (q_proj and o_proj 2048 x 2048, up_proj 4096 x 2048, decaying spectra like trained
weights) and ``--adapters`` PEFT adapters with mixed ranks (4, 8, 16, 32), targets (q; q+o;
q+o+up) and update sizes (a random 0.05 to 1.5 of each matrix's top singular value: some
matrices get intruders, some do not). Written to a temporary folder, deleted afterwards.

Every case is a whole CLI process (``python -m lora_audit.cli ...``), with the base spectra
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
from bench_spectrum import write_adapter, write_base  # noqa: E402

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
        for a, b in zip(r["matrices"], mine["matrices"]):
            worst = max([worst] + [abs(x - y) for x, y in zip(a["max_cos"], b["max_cos"])])
    return differ, worst


def cost_terms(out: Path) -> tuple[float, float]:
    """Least-squares a, b of seconds = a + b * matrices over the screen's records."""
    pts = [(len(r["result"]["matrices"]), r["seconds"]) for r in screen_records(out) if r["status"] == "ok"]
    X = torch.tensor([[1.0, m] for m, _ in pts], dtype=torch.float64)
    y = torch.tensor([s for _, s in pts], dtype=torch.float64)
    a, b = torch.linalg.lstsq(X, y[:, None]).solution[:, 0].tolist()
    return a, b


# ---- the cases --------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--adapters", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--width", type=int, default=2048)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-ray", action="store_true", help="skip the Ray engine")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-screen-"))
    try:
        return _bench(tmp, args)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _bench(tmp: Path, args) -> int:
    env = {**os.environ, "LORA_AUDIT_CACHE": str(tmp / "cache"), "LORA_AUDIT_CONFIG": str(tmp / "config"),
           "LORA_AUDIT_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    base, adapters = build(tmp / "data", args.layers, args.width, args.adapters)
    size = sum(f.stat().st_size for a in adapters for f in a.iterdir()) / len(adapters)
    print(f"built a base of {args.layers} x 3 matrices {args.width} wide and {len(adapters)} adapters "
          f"(mean {size / 2**20:.1f} MiB) in {time.perf_counter() - t:.0f} s; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f}")
    cli = [sys.executable, "-m", "lora_audit.cli"]
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
              f"difference| {worst:.1e} (the workers run torch on 1 thread, spectrum on torch's default)")
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
