"""Adapters for the screen tests, built once per module in temp folders: real PEFT adapters made
with peft (tests.helpers.make_peft_adapter), a kohya LoRA file written by hand, and a corrupt
adapter (a PEFT folder whose weights file is truncated)."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import make_peft_adapter, make_tiny_llama

QV = ["q_proj", "v_proj"]


def make_kohya(base_dir: Path, out: Path, *, seed: int, r: int = 3, alpha: float = 6.0, scale: float = 0.5,
               modules=("self_attn.q_proj", "mlp.up_proj")) -> Path:
    """A kohya LoRA file (``<module>.lora_down.weight`` (r, in), ``lora_up.weight`` (out, r),
    ``.alpha``) for every layer's ``modules`` of the base in ``base_dir``."""
    from safetensors import safe_open

    g = torch.Generator().manual_seed(seed)
    with safe_open(str(base_dir / "model.safetensors"), framework="pt") as f:
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    tensors = {}
    for name, (m, n) in ((k, s) for k, s in shapes.items() if any(k.endswith(f"{mod}.weight") for mod in modules)):
        mod = name[: -len(".weight")]
        tensors[f"{mod}.lora_down.weight"] = torch.randn(r, n, generator=g)
        tensors[f"{mod}.lora_up.weight"] = scale * torch.randn(m, r, generator=g)
        tensors[f"{mod}.alpha"] = torch.tensor(alpha)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out))
    return out


@contextlib.contextmanager
def isolated(session_cache: Path, session_config: Path):
    """For module-scoped fixtures, which run before the function-scoped autouse ones of
    tests/conftest.py: the same isolated cache and config folders, and the fast paths on tiny
    matrices, while the block runs."""
    from lora_audit.spectral import engine

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_AUDIT_CACHE", str(session_cache))
        mp.setenv("LORA_AUDIT_CONFIG", str(session_config))
        mp.delenv("LORA_AUDIT_CACHE_KEY_FILE", raising=False)
        mp.setattr(engine, "EXACT_BELOW", 0)
        yield


def make_corrupt(good: Path, out: Path) -> Path:
    """A copy of the PEFT adapter ``good`` whose weights file is cut in half."""
    shutil.copytree(good, out)
    f = out / "adapter_model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return out


def adapter_set(base: Path, root: Path) -> dict[str, Path]:
    """Four adapters of ``base`` with mixed ranks, targets and sizes (from 0 intruders to many), a
    kohya file, and a corrupt adapter, under ``root/adapters``."""
    a = root / "adapters"
    out = {
        "big": make_peft_adapter(base, a / "big", seed=1, r=4, init_scale=1.0, target_modules=QV),
        "mid": make_peft_adapter(base, a / "mid", seed=2, r=2, init_scale=0.3, target_modules=["q_proj", "o_proj"]),
        "tiny1": make_peft_adapter(base, a / "tiny1", seed=3, r=2, init_scale=1e-4, target_modules=QV),
        "tiny2": make_peft_adapter(base, a / "tiny2", seed=4, r=2, init_scale=4e-4, target_modules=QV),
    }
    out["kohya"] = make_kohya(base, a / "more" / "style.safetensors", seed=5)
    out["corrupt"] = make_corrupt(out["big"], a / "zz-corrupt")
    return out


@pytest.fixture(scope="module")
def screen_set(tiny_llama, tmp_path_factory):
    """(base, {name: adapter path}) on the session's tiny Llama (64 wide)."""
    return tiny_llama, adapter_set(tiny_llama, tmp_path_factory.mktemp("screen_adapters"))


@pytest.fixture(scope="module")
def wide_set(tmp_path_factory):
    """(base, {name: adapter path}) on a tiny Llama whose matrices are all at least 192 wide, so that
    the fast paths run whatever ``engine.EXACT_BELOW`` a process has (worker processes do not see
    the tests' monkeypatch)."""
    root = tmp_path_factory.mktemp("screen_wide")
    base = make_tiny_llama(root / "base", hidden=192, intermediate=256, heads=4, kv_heads=4, tokenizer=False)
    return base, adapter_set(base, root)


def spectrum_of(base: Path, adapter: str, *, threads: int | None = None) -> dict:
    """What ``lora-audit spectrum BASE ADAPTER --json`` writes for the adapter (its entry under
    "results", via the library call the command makes), without the timing. ``threads``: torch
    threads for the reference (bits depend on it: a worker runs with one)."""
    from lora_audit.spectral.api import run_spectrum

    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        out = run_spectrum(str(base), [adapter], progress=False).results[0].to_json()
    finally:
        torch.set_num_threads(before)
    out.pop("seconds")
    return out


def stop_driver_after(monkeypatch, n: int) -> None:
    """Make the screen's driver stop (KeyboardInterrupt, as Ctrl-C or a killed process would) when it
    is about to store its (n + 1)-th record: n records are stored, the rest in flight or not started."""
    from lora_audit.screen.store import ScreenStore

    real_append = ScreenStore.append

    def append_then_stop(self, record):
        if len(self.latest) == n:
            raise KeyboardInterrupt
        return real_append(self, record)

    monkeypatch.setattr(ScreenStore, "append", append_then_stop)


def stored_results(out: Path) -> dict[str, dict]:
    """adapter -> the record of its last index line, read straight from the files (no lora_audit)."""
    latest = {}
    for line in (out / "index.jsonl").read_text().splitlines():
        e = json.loads(line)
        latest[e["adapter"]] = e
    records = {}
    for adapter, e in latest.items():
        with open(out / "records" / e["shard"], "rb") as fh:
            fh.seek(e["offset"])
            records[adapter] = json.loads(fh.read(e["length"]))
    return records
