"""The end of a screen: every adapter's row, ranked, as summary.json, summary.csv and report.html
(with a detail page for the top adapters), read from the store one record at a time.

Only the rows (a few numbers per adapter) are held, never the records: a screen of any size
summarises in flat memory. ``report.html`` links each of the top ``detail`` adapters to
``detail/<position>.html``, the same page ``lora-audit report`` draws for a spectrum result of that
adapter alone; every row gives its record's place in the store (``records/<shard>:<line>``).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..io import atomic_dir, atomic_write_text
from ..results.findings import Finding
from ..results.screen import FAILED, OK, ScreenResult, ScreenRow, ScreenSetup, rank_rows
from ..results.spectrum import SpectrumResult
from .discovery import Entry
from .store import DETAIL, REPORT, SUMMARY_CSV, SUMMARY_JSON, ScreenStore


def summary_rows(store: ScreenStore, entries: Iterable[Entry], *,
                 findings: dict[str, list[Finding]] | None = None) -> list[ScreenRow]:
    """One row per entry from its latest stored record, ranked (``results.screen.rank_rows``). An entry
    without a record (the run stopped before it) or with a damaged one is a failed row saying so.
    ``findings``, when given, receives each audited adapter's findings for the SARIF export
    (``report.sarif.tuned_findings``, one LA002 per adapter), read on the same pass over the store."""
    from ..report.sarif import tuned_findings

    rows = []
    for e in entries:
        stored = store.latest.get(e.adapter)
        if stored is None:
            rows.append(ScreenRow(adapter=e.adapter, name=e.label, status=FAILED,
                                  error="not screened: the run stopped before this adapter; resume it"))
            continue
        try:
            record = store.read(stored)
            row = ScreenRow.from_record(record, stored.location)
            if findings is not None and record.result is not None:
                findings[e.adapter] = tuned_findings(record.result, epsilon=store.setup.epsilon, k=store.setup.k,
                                                     per_matrix=False, path=e.path)
        except InputError as err:
            row = ScreenRow(adapter=e.adapter, name=e.label, status=FAILED, error=str(err), record=stored.location)
        row.name = e.label
        rows.append(row)
    return rank_rows(rows)


def summarize(store: ScreenStore, entries: list[Entry], *, settings: dict[str, Any], seconds: float,
              audited: int, warnings: list[str], findings: dict[str, list[Finding]] | None = None) -> ScreenResult:
    """The ``ScreenResult`` of the screen's current entries (``summary.json``); ``findings`` as
    ``summary_rows``."""
    setup = store.setup
    rows = summary_rows(store, entries, findings=findings)
    ok = sum(1 for r in rows if r.status == OK)
    incomplete = sum(1 for r in rows if r.status == OK and r.unmeasured)
    counts = {"adapters": len(rows), "ok": ok, "failed": len(rows) - ok, "incomplete": incomplete, "audited_now": audited,
              "skipped_stored": len(rows) - audited}
    return ScreenResult(base=setup.base, k=setup.k, epsilon=setup.epsilon, epsilon_sweep=list(setup.epsilon_sweep),
                        counts=counts, seconds=seconds, warnings=list(warnings), adapters=rows,
                        settings={**settings, "base_fingerprint": setup.base_fingerprint, "dtype": setup.dtype,
                                  "exact": setup.exact, "include_embeddings": setup.include_embeddings,
                                  "dense_metrics": setup.dense_metrics})


def _detail_page(store: ScreenStore, setup: ScreenSetup, row: ScreenRow, title: str) -> str:
    from ..report import gather, render

    record = store.read(store.latest[row.adapter])
    spectrum = SpectrumResult(base=setup.base, k=setup.k, epsilon=setup.epsilon, epsilon_sweep=list(setup.epsilon_sweep),
                              results=[record.result], settings={"dtype": setup.dtype, "exact": setup.exact})  # type: ignore[list-item]
    return render(gather([spectrum], title=f"{title}: #{row.position} {row.name}", labels=[row.record]), "html")


def write_outputs(folder: Path, store: ScreenStore, result: ScreenResult, *, detail: int = 10,
                  title: str | None = None) -> dict[str, Path]:
    """Write summary.json, summary.csv, report.html and detail/ into the screen folder, each atomically;
    {name: path} of what was written."""
    from ..report.screen import render_screen

    title = title or f"lora-audit screen of {len(result.adapters)} adapters on {result.base}"
    top = [r for r in result.adapters if r.status == OK][:detail]
    links = {}
    with atomic_dir(folder / DETAIL, overwrite=True, what="screen detail pages") as tmp:
        for row in top:
            name = f"{row.position:05d}.html"
            (tmp / name).write_text(_detail_page(store, store.setup, row, title), encoding="utf-8")
            links[row.adapter] = f"{DETAIL}/{name}"
    result.write_json(folder / SUMMARY_JSON)
    atomic_write_text(folder / SUMMARY_CSV, result.to_csv())
    atomic_write_text(folder / REPORT, render_screen(result, links=links, title=title))
    return {n: folder / n for n in (SUMMARY_JSON, SUMMARY_CSV, REPORT, DETAIL)}
