"""``lora-audit cache ls|clear``: look at or empty the base-spectrum cache.

Thin: the cache itself is ``lora_audit.spectral.cache.SpectrumCache``; the folder defaults to
the one ``lora-audit spectrum`` uses (``<lora-audit cache>/spectra``). Both commands deal only
with files that are provably cache entries (``SpectrumCache.scan``): pointed at any other
folder, they list nothing, delete nothing and say how many files they ignored.
"""

from __future__ import annotations

import time
from pathlib import Path

import click

from ..text import printable
from ._common import CONTEXT, check_paths, echo, json_option, quiet, user_errors, verbosity_options, write_json_output


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


@click.group("cache", context_settings=CONTEXT)
def cache():
    """List or clear the base-spectrum cache.

    \b
    `lora-audit spectrum` stores the singular value decomposition of every base matrix it
    decomposes (keyed by a hash of the matrix's contents), so auditing further adapters of the
    same base skips the expensive half of the work. Entries are authenticated with a secret key
    kept outside the cache folder (~/.config/lora-audit/cache-key, or $LORA_AUDIT_CACHE_KEY_FILE)
    and verified when read (an entry verified before whose file has not changed since is not
    hashed again); a damaged, stale or forged one is recomputed. Only files that are provably
    the cache's own are listed or deleted.
    """


def _ignored(n: int) -> str:
    return f"{n} other file{'' if n == 1 else 's'} ignored (not cache entries)"


def _listing(c, scan):
    """The result of ``cache ls --json``: the folder, its entries and what was ignored."""
    from ..results.cache import CacheListing

    return CacheListing(root=str(c.root), entries=[e.as_dict() for e in scan.entries], count=len(scan.entries),
                        total_bytes=sum(e.size for e in scan.entries), temporary_files=len(scan.temporary),
                        ignored_files=scan.ignored)


def _table(entries) -> list[str]:
    rows = [(e.key[:16], "x".join(map(str, e.shape)) if e.shape else "?", e.dtype or "?", human_bytes(e.size),
             time.strftime("%Y-%m-%d %H:%M", time.localtime(e.created)) + ("" if e.ok else f"  ({e.problem})"))
            for e in entries]
    head = ("KEY", "SHAPE", "DTYPE", "SIZE", "CREATED")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(4)]
    return [printable(f"{r[0]:<{widths[0]}}  {r[1]:>{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}  {r[4]}")
            for r in [head, *rows]]


@cache.command("ls", context_settings=CONTEXT)
@_cache_dir_option
@json_option("the entries, total size and provenance")
@verbosity_options
@user_errors
def ls(cache_dir, json_path):
    """List cached base spectra (shape, dtype, size) and the total size."""
    c = _open(cache_dir)
    check_paths(files=[json_path])
    scan = c.scan()
    write_json_output(json_path, _listing(c, scan))
    root = printable(c.root)
    if scan.entries:
        if not quiet():
            echo("\n".join(_table(scan.entries)))
        total = sum(e.size for e in scan.entries)
        echo(f"{len(scan.entries)} {'entry' if len(scan.entries) == 1 else 'entries'}, {human_bytes(total)} in {root}")
    else:
        echo(f"No cached spectra in {root}")
    if scan.temporary:
        echo(f"{len(scan.temporary)} temporary files left by an interrupted write; 'cache clear' removes them")
    if scan.ignored:
        echo(_ignored(scan.ignored))
    if json_path not in (None, "-"):
        echo(f"JSON written to {json_path}")


@cache.command("clear", context_settings=CONTEXT)
@_cache_dir_option
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
@verbosity_options
@user_errors
def clear(cache_dir, yes):
    """Delete every cached base spectrum (they are recomputed when needed).

    Only cache entries, the cache's verification memo and its own temporary files are deleted;
    any other file in the folder is left alone."""
    c = _open(cache_dir)
    scan = c.scan()
    root = printable(c.root)
    ignored = f"; {_ignored(scan.ignored)}" if scan.ignored else ""
    if not scan.entries and not scan.temporary and scan.memo is None:
        echo(f"No cached spectra in {root}{ignored}")
        return
    if not yes:
        size = sum(e.size for e in scan.entries)
        click.confirm(f"Delete {len(scan.entries)} cached spectra ({human_bytes(size)}) in {root}?", abort=True)
    n, freed = c.clear()
    echo(f"Removed {n} files ({human_bytes(freed)}) from {root}{ignored}")
