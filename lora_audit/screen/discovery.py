"""What to screen: the adapters found under folders, or listed in a manifest.

Under a folder, an item is whatever ``lora-audit spectrum`` takes as TUNED:

- a folder holding ``adapter_config.json`` (a PEFT adapter), or ``config.json`` next to
  ``*.safetensors`` / ``*.gguf`` weights (a full fine-tuned model): taken whole, not searched;
- a ``*.safetensors`` file (a kohya/diffusers LoRA, or a model state dict) or a ``*.gguf`` file.

Other folders are searched recursively (hidden names skipped, symbolic links to folders not
followed, so a link cannot loop); other files are ignored. Paths are listed sorted, so a screen of
the same folders always has the same order.

A manifest is a UTF-8 text file with one adapter per line: a path (relative to the manifest's
folder, or absolute) or a Hugging Face hub id, optionally followed by a TAB and a display name.
Blank lines and lines starting with ``#`` are skipped. An entry that does not exist is not an error
here: it is screened, and recorded as failed with the reason, like any other adapter that cannot
be read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..checkpoints.detect import is_hub_id
from ..errors import FormatError, InputError
from ..io import read_user_text, user_path
from ..text import printable

WEIGHT_SUFFIXES = (".safetensors", ".gguf")


@dataclass(frozen=True)
class Entry:
    """One adapter of a screen: ``adapter`` as given (its key in the store and the summary),
    ``path`` what to open (a local path or a hub id), ``name`` what to call it."""

    adapter: str
    path: str
    name: str = ""

    @property
    def label(self) -> str:
        return self.name or self.adapter


def _is_item_folder(folder: Path, names: set[str]) -> bool:
    if "adapter_config.json" in names:
        return True
    return "config.json" in names and any(n.endswith(WEIGHT_SUFFIXES) for n in names)


def _names(folder: Path) -> set[str]:
    try:
        return set(os.listdir(folder))
    except OSError:  # unreadable: searched (and reported) by _walk, or not an item
        return set()


def _walk(folder: Path, shown: str, excluded: set[str], out: list[Entry]) -> None:
    """Append the items under ``folder`` (named ``shown`` as the user wrote it) to ``out``, depth first
    in name order. Iterative: an upload can nest folders deeper than Python's recursion limit. A
    folder inside that cannot be listed is an entry (recorded as failed, with the reason)."""
    try:
        stack = [(iter(sorted(os.scandir(folder), key=lambda d: d.name)), shown)]
    except OSError as e:
        raise InputError(f"{shown}: cannot list this folder ({e.strerror or e})") from None
    while stack:
        child = next(stack[-1][0], None)
        if child is None:
            stack.pop()
            continue
        if child.name.startswith("."):
            continue
        path, name = Path(child.path), os.path.join(stack[-1][1], child.name)
        if os.path.realpath(path) in excluded:  # not Path.resolve: that raises on a link loop
            continue
        try:
            is_dir = child.is_dir(follow_symlinks=True)
        except OSError:  # a link loop: not a folder to search
            is_dir = False
        if is_dir:
            if _is_item_folder(path, _names(path)):
                out.append(Entry(name, name))
            elif not child.is_symlink():
                try:
                    stack.append((iter(sorted(os.scandir(path), key=lambda d: d.name)), name))
                except OSError:
                    out.append(Entry(name, name))
        elif child.name.endswith(WEIGHT_SUFFIXES):
            out.append(Entry(name, name))


def discover(paths: Iterable[str], *, exclude: Iterable[str | os.PathLike] = ()) -> tuple[list[Entry], list[str]]:
    """The adapters at or under ``paths`` (see the module docstring), and warnings (a folder with
    none). ``exclude``: paths never taken (the base, the screen's own folder). InputError for a
    path that does not exist."""
    excluded = {os.path.realpath(user_path(p)) for p in exclude}
    entries: list[Entry] = []
    warnings: list[str] = []
    for given in paths:
        p = user_path(given)
        if not os.path.exists(p):  # os.path: False, not an OSError, for a name too long
            raise InputError(f"{given}: no such file or folder (give adapter folders or files, or --manifest)")
        if not p.is_dir() or _is_item_folder(p, _names(p)):  # a file (or a FIFO, a device: recorded as failed)
            entries.append(Entry(str(given), str(given)))
            continue
        before = len(entries)
        _walk(p, str(given), excluded, entries)
        if len(entries) == before:
            warnings.append(f"{printable(given)}: no adapter found under this folder (looked for PEFT adapter "
                            "folders, model folders, *.safetensors and *.gguf files)")
    return entries, warnings


def read_manifest(path: str | os.PathLike) -> list[Entry]:
    """The entries of a manifest file (see the module docstring); FormatError naming the line for
    a line with more than one TAB or an empty adapter."""
    text = read_user_text(path, "screen manifest")
    folder = user_path(path).parent
    entries = []
    for i, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip("\r\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) > 2:
            raise FormatError(f"{path}: line {i} has {len(parts) - 1} TABs; a line is ADAPTER or ADAPTER<TAB>NAME")
        adapter, name = parts[0].strip(), (parts[1].strip() if len(parts) == 2 else "")
        if not adapter:
            raise FormatError(f"{path}: line {i} has a name but no adapter; a line is ADAPTER or ADAPTER<TAB>NAME")
        entries.append(Entry(adapter, _manifest_path(adapter, folder), name))
    return entries


def _manifest_path(adapter: str, folder: Path) -> str:
    """What a manifest entry opens: an absolute path as is; a relative one inside the manifest's
    folder when it exists there; else a hub id when it looks like one; else the (missing) path
    relative to the manifest, which the screen records as failed."""
    p = user_path(adapter)
    if p.is_absolute():
        return str(p)
    local = folder / p
    if os.path.exists(local) or not is_hub_id(adapter):
        return str(local)
    return adapter


def _identity(e: Entry) -> str:
    """What makes two entries the same adapter: the resolved path of a local one (``a0``, ``./a0``,
    ``a0/``, its absolute path and a link to it are one adapter), the id of a hub one."""
    p = user_path(e.path)
    if os.path.lexists(p) or not is_hub_id(e.path):
        return os.path.realpath(p)  # not Path.resolve: that raises on a link loop
    return e.path


def unique(entries: list[Entry]) -> tuple[list[Entry], list[str]]:
    """``entries`` without repeats of the same adapter (the first is kept, see ``_identity``), and one
    warning naming the repeats."""
    seen: dict[str, Entry] = {}
    out, repeats = [], []
    for e in entries:
        key = _identity(e)
        if key in seen:
            first = seen[key]
            repeats.append(printable(e.adapter) + ("" if e.adapter == first.adapter else f" (= {printable(first.adapter)})"))
            continue
        seen[key] = e
        out.append(e)
    if not repeats:
        return out, []
    shown = ", ".join(repeats[:5]) + (f" and {len(repeats) - 5} more" if len(repeats) > 5 else "")
    verb = "names an adapter" if len(repeats) == 1 else "name adapters"
    return out, [f"{shown}: {verb} listed before (the same path, however written); screened once"]
