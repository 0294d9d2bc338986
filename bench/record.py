"""Where a bench's figures go: ``bench/results/<bench>-<date>-<host tag>.json`` and a short Markdown
table beside it, each with the command, the machine (CPU model, cores, memory), the date, the git
commit (and whether the tree had uncommitted changes), and the load average at the start and the
end of the run. docs/performance.md cites these files; a figure that is not in one is not quoted.

Every bench calls ``start()`` before its work and ``write(...)`` at the end:

    run = record.start("bench_cached_audit")
    ...
    record.write(run, figures, rows=[("cached audit, whole process", "3.1 s", "74x", ">= 60x", "met")])

``figures`` is the bench's own JSON (ratios measured in the same run, with their baselines);
``rows`` become the Markdown table (what, measured, ratio to the baseline, goal, verdict).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from collections.abc import Callable, Iterator

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict:
    """CPU model, logical cores, memory, OS and the versions that set the speed of the numbers."""
    model = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    out = {"cpu": model, "logical_cores": os.cpu_count(), "memory_gib": mem, "os": platform.platform(),
           "python": platform.python_version()}
    try:
        import torch

        out["torch"] = torch.__version__
        out["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    return out


def git() -> dict:
    def run(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}


def compile_package() -> str:
    """Compile lora_audit's modules to bytecode, as ``pip install`` does for an installed package, so
    that whole-process cases time a user's start-up: a checkout (an editable install) run with
    PYTHONDONTWRITEBYTECODE=1, as this project's machines set it, compiles every module it imports
    at every start (about 0.1 s of a 2 s cached audit, measured with cProfile). Returns what the
    run record says about it."""
    subprocess.run([sys.executable, "-m", "compileall", "-q", str(ROOT / "lora_audit")], check=True)
    return "lora_audit compiled to bytecode before the run (python -m compileall), as pip install does"


def start(bench: str) -> dict:
    """The run's context, taken before the work: command, machine, date, git, load average; the
    package is compiled to bytecode first (``compile_package``)."""
    bytecode = compile_package()
    return {"bench": bench, "command": " ".join(["python", *sys.argv]), "machine": machine(), "git": git(),
            "date_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "load_average_start": _load(),
            "bytecode": bytecode, "_t0": time.perf_counter()}


def _load() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def write(run: dict, figures: dict, rows: list[tuple[str, ...]] | None = None, *,
          header: tuple[str, ...] = ("case", "measured", "baseline (same run)", "ratio", "goal", "verdict"),
          out_dir: Path | None = None) -> Path:
    """Write ``<bench>-<date>.json`` (the context and ``figures``) and ``.md`` (a table of ``rows``)
    under ``bench/results`` (or ``out_dir``); the JSON's path. A run with uncommitted changes says
    so in both files."""
    out_dir = out_dir or RESULTS
    out_dir.mkdir(parents=True, exist_ok=True)
    ctx = {k: v for k, v in run.items() if not k.startswith("_")}
    ctx["load_average_end"] = _load()
    ctx["seconds"] = round(time.perf_counter() - run["_t0"], 1)
    stem = f"{run['bench']}-{ctx['date_utc'][:10]}"
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps({**ctx, "figures": figures}, indent=2) + "\n")
    m = ctx["machine"]
    lines = [f"# {run['bench']}, {ctx['date_utc']}", "",
             f"- command: `{ctx['command']}`",
             f"- machine: {m.get('cpu')}, {m.get('logical_cores')} logical cores, {m.get('memory_gib')} GiB; "
             f"Python {m.get('python')}, torch {m.get('torch', '?')}",
             f"- git: {ctx['git']['commit'][:12] or '?'}{' (uncommitted changes)' if ctx['git']['dirty'] else ''}",
             f"- load average (1, 5, 15 min): {ctx['load_average_start']} at the start, "
             f"{ctx['load_average_end']} at the end; the run took {ctx['seconds']} s",
             f"- figures: `{path.name}`", ""]
    if rows:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return path


class _Tee:
    def __init__(self, stream):
        self.stream, self.parts = stream, []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


@contextmanager
def printed(bench: str, figures: Callable[[], dict] | None = None) -> Iterator[dict]:
    """For benches that print their figures: run the block with stdout also captured, then write
    the run's context and what it printed (and ``figures()``, when given) under bench/results/.
    Nothing is written when the block raises."""
    run = start(bench)
    tee = _Tee(sys.stdout)
    sys.stdout = tee
    try:
        yield run
    finally:
        sys.stdout = tee.stream
    text = "".join(tee.parts)
    path = write(run, {"printed": text.splitlines(), **(figures() if figures else {})})
    md = path.with_suffix(".md")
    md.write_text(md.read_text() + "\n```\n" + text.rstrip() + "\n```\n")
    print(f"results: {path}")
