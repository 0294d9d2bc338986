"""``lora-audit cache ls|clear``: look at or empty the base-spectrum cache.

Thin: the cache itself is ``lora_audit.spectral.cache.SpectrumCache``; the folder defaults to
the one ``lora-audit spectrum`` uses (``<lora-audit cache>/spectra``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from ._common import user_errors


def _cache_dir_option(f):
    return click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
                         help="Base-spectrum cache folder [default: ~/.cache/lora-audit/spectra, "
                              "or $LORA_AUDIT_CACHE/spectra].")(f)


def _open(cache_dir):
    from ..checkpoints.default_model import cache_root
    from ..spectral.cache import SpectrumCache

    root = Path(cache_dir).expanduser() if cache_dir else cache_root() / "spectra"
    if root.exists() and not root.is_dir():
        raise click.ClickException(f"{root} is not a folder")
    return SpectrumCache(root)


def human_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; binary units, one decimal above bytes."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"  # pragma: no cover


@click.group("cache")
def cache():
    """List or clear the base-spectrum cache.

    \b
    `lora-audit spectrum` stores the singular value decomposition of every base matrix it
    decomposes (keyed by a hash of the matrix's contents), so auditing further adapters of the
    same base skips the expensive half of the work. Entries are verified on every read; a
    damaged one is recomputed.
    """


@cache.command("ls")
@_cache_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the entries and total size as JSON.")
@user_errors
def ls(cache_dir, as_json):
    """List cached base spectra (shape, dtype, size) and the total size."""
    c = _open(cache_dir)
    entries = c.entries()
    total = sum(e.size for e in entries)
    if as_json:
        click.echo(json.dumps({"root": str(c.root), "entries": [e.as_dict() for e in entries],
                               "count": len(entries), "total_bytes": total}, indent=2))
        return
    if not entries:
        click.echo(f"No cached spectra in {c.root}")
        return
    rows = [(e.key[:16], "x".join(map(str, e.shape)) if e.shape else "?", e.dtype or "?", human_bytes(e.size),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)) + ("" if e.ok else "  (unreadable)"))
            for e in entries]
    head = ("KEY", "SHAPE", "DTYPE", "SIZE", "CREATED")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    fmt = lambda r: (f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  "  # noqa: E731
                     f"{r[3]:>{widths[3]}}  {r[4]}")
    click.echo(fmt(head))
    for r in rows:
        click.echo(fmt(r))
    noun = "entry" if len(entries) == 1 else "entries"
    click.echo(f"{len(entries)} {noun}, {human_bytes(total)} in {c.root}")


@cache.command("clear")
@_cache_dir_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@user_errors
def clear(cache_dir, yes):
    """Delete every cached base spectrum (they are recomputed when needed)."""
    c = _open(cache_dir)
    entries = c.entries()
    if not entries and not c.root.is_dir():
        click.echo(f"No cached spectra in {c.root}")
        return
    if not yes:
        click.confirm(f"Delete {len(entries)} cached spectra ({human_bytes(sum(e.size for e in entries))}) "
                      f"in {c.root}?", abort=True)
    n, freed = c.clear()
    click.echo(f"Removed {n} files ({human_bytes(freed)}) from {c.root}")
