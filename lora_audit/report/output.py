"""Writing a report: the page (HTML or Markdown) and a CSV of every table, atomically, never over
a file or folder lora-audit did not write (``lora_audit.io``)."""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..io import atomic_dir, atomic_write_text, check_output_dir, check_output_file, csv_text
from .model import gather
from .render import render
from .tables import Table, all_tables


def write_csvs(tables: dict[str, Table], folder: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write every table as <key>.csv into the new folder ``folder`` (atomically; an earlier
    lora-audit tables folder is replaced only with ``overwrite``). Text cells that a spreadsheet
    would run as a formula are neutralised (``io.csv_text``)."""
    folder = Path(folder)
    with atomic_dir(folder, overwrite=overwrite, what="report tables") as tmp:
        for key, t in tables.items():
            (tmp / f"{key}.csv").write_text(csv_text(t.df), encoding="utf-8")
    return folder


def default_csv_dir(out: Path) -> Path:
    return out.with_name(out.stem + "-tables")


def build_report(inputs: Iterable[Any] | None = None, safety: Iterable[Any] | None = None,
                 out: str | os.PathLike | None = None, title: str | None = None, fmt: str = "html",
                 csv_dir: str | os.PathLike | None | bool = None, overwrite: bool = False) -> str | Path:
    """Render results into a report.

    ``inputs``: spectrum and/or safety results (JSON paths, JSON dicts or typed results; the kind is
    detected, so ``safety`` is only a convenience for passing them separately). ``out``: file to
    write atomically (returns its path); None returns the text. ``csv_dir``: where to export every
    table as CSV (default ``<out stem>-tables/`` next to ``out``; False for none). Both outputs are
    checked before anything is rendered.
    """
    if out is not None:
        out = check_output_file(out, "report")
        if csv_dir is None:
            csv_dir = default_csv_dir(out)
    if csv_dir:
        check_output_dir(csv_dir, overwrite=overwrite, what="tables folder")
    data = gather(list(inputs or []) + list(safety or []), title=title)
    tables = all_tables(data)
    text = render(data, fmt, tables)
    if csv_dir:
        write_csvs(tables, csv_dir, overwrite=overwrite)
    if out is None:
        return text
    atomic_write_text(out, text)
    return out
