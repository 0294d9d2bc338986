"""Results of ``lora-audit screen``: one record per adapter, the screen's setup, and its summary.

Three kinds, each a tree of dataclasses that ``results.schema.parse`` checks:

``ScreenRecord`` (schema ``"screen-record"``): one adapter's outcome, one line of the store's
JSONL shards (``lora_audit.screen.store``). Fields marked [contract] are fixed::

    {
      "lora_audit": {"schema": "screen-record", "schema_version": 1, "tool_version": str},
      "adapter": str,          [contract] the adapter as given (found path, or manifest entry)
      "name": str,             display name: the manifest's, else the adapter
      "status": "ok"|"failed", [contract]
      "error": str,            [contract] why it failed; "" when ok
      "fingerprint": str,      content hash of the adapter's files (``results.fingerprint``)
      "seconds": float,        wall time of the audit, in the worker
      "attempts": int,         tries it took (a failure that is not the input's fault is retried once)
      "worker": str,           where it ran: host, process id, device
      "finished": str,         UTC time (ISO 8601)
      "result": {...} | null   [contract] the adapter's ``TunedResult``: exactly the entry
                               ``lora-audit spectrum BASE ADAPTER`` writes under "results"
                               (its "seconds" aside); null when failed
    }

``ScreenSetup`` (schema ``"screen-setup"``, ``screen.json`` in the screen folder): what every record
of the folder was computed with (base, its fingerprint, k, epsilon, sweep, dtype, ...). A resumed
screen must have the same setup, so every stored record stays comparable with the new ones.

``ScreenResult`` (schema ``"screen"``, ``summary.json``): every adapter of the screen, ranked::

    {
      "lora_audit": {...},     provenance; settings: engine, workers, spectra sharing, device, ...
      "base": str, "k": int, "epsilon": float, "epsilon_sweep": [float],
      "ranked_by": [str],      the sort keys, most important first (``RANK_KEYS``)
      "counts": {"adapters", "ok", "failed", "audited_now", "skipped_stored"},
      "seconds": float,        wall time of this run
      "warnings": [str],
      "adapters": [ScreenRow]  [contract] in rank order: ok adapters by ``RANK_KEYS``, then the
                               failed ones in input order; see ``ScreenRow``
    }

The ranking is a list of keys so that a later signal (a behavioural ``risk`` score) can be added
as a row field and put first in ``RANK_KEYS`` without touching anything else; the CSV's columns
follow ``ScreenRow``'s fields. This module imports neither torch nor model code.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import InputError
from . import PROVENANCE_KEY, check_schema, parse_result, provenance, read_result, write_result
from .gate import GateOutcome, tuned_values
from .schema import parse
from .spectrum import DEFAULT_EPSILON_SWEEP, TunedResult

SCHEMA = "screen"
SCHEMA_VERSION = 1
RECORD_SCHEMA = "screen-record"
SETUP_SCHEMA = "screen-setup"
OK, FAILED = "ok", "failed"

# (ScreenRow field, descending?) most important first. Missing values sort last.
RANK_KEYS: tuple[tuple[str, bool], ...] = (("total_intruders", True), ("relative_delta_norm", True),
                                           ("min_max_cos", False))


@dataclass
class ScreenRecord:
    """One adapter's outcome (see the module docstring)."""

    SCHEMA = RECORD_SCHEMA
    SCHEMA_VERSION = 1

    adapter: str
    status: str
    error: str = ""
    name: str = ""
    fingerprint: str = ""
    seconds: float = 0.0
    attempts: int = 1
    worker: str = ""
    finished: str = ""
    result: TunedResult | None = None

    def __post_init__(self):
        self.name = self.name or self.adapter

    def to_json(self) -> dict[str, Any]:
        return {PROVENANCE_KEY: {"schema": RECORD_SCHEMA, "schema_version": 1, "tool_version": __version__},
                "adapter": self.adapter, "name": self.name, "status": self.status, "error": self.error,
                "fingerprint": self.fingerprint, "seconds": round(float(self.seconds), 3),
                "attempts": int(self.attempts), "worker": self.worker, "finished": self.finished,
                "result": self.result.to_json() if self.result is not None else None}

    @classmethod
    def from_json(cls, obj: Any, *, source: str = "screen record") -> "ScreenRecord":
        if not isinstance(obj, dict):
            raise InputError(f"{source}: expected a JSON object")
        check_schema(obj.get(PROVENANCE_KEY), RECORD_SCHEMA, 1, source, what="screen record")
        rec = parse(cls, {k: v for k, v in obj.items() if k != PROVENANCE_KEY}, source, what="screen record")
        if rec.status not in (OK, FAILED):
            raise InputError(f"{source}: malformed screen record: status: expected 'ok' or 'failed', "
                             f"got {rec.status!r}")
        if rec.status == OK and rec.result is None:
            raise InputError(f"{source}: malformed screen record: result: missing for an 'ok' record")
        return rec


@dataclass
class ScreenSetup:
    """What a screen folder's records were computed with; a resumed screen must match it."""

    SCHEMA = SETUP_SCHEMA
    SCHEMA_VERSION = 1

    base: str
    base_fingerprint: str
    k: int
    epsilon: float
    epsilon_sweep: list[float]
    dtype: str = "float32"
    exact: bool = False
    include_embeddings: bool = False
    dense_metrics: bool = True
    created: str = ""

    def comparable(self) -> dict[str, Any]:
        """The fields two setups must share for their records to be comparable."""
        d = asdict(self)
        d.pop("created")
        return d

    def to_json(self) -> dict[str, Any]:
        return {PROVENANCE_KEY: provenance(SETUP_SCHEMA, 1), **asdict(self)}

    @classmethod
    def from_json(cls, obj: Any, *, source: str = "screen.json") -> "ScreenSetup":
        if not isinstance(obj, dict):
            raise InputError(f"{source}: expected a JSON object")
        check_schema(obj.get(PROVENANCE_KEY), SETUP_SCHEMA, 1, source, what="screen setup")
        return parse(cls, {k: v for k, v in obj.items() if k != PROVENANCE_KEY}, source, what="screen setup")


@dataclass
class ScreenRow:
    """One adapter in the summary. ``relative_delta_norm``: the relative size of its whole update,
    sqrt(sum ||dW||_F^2) / sqrt(sum ||W0||_F^2) over the matrices it changes (a single matrix's
    ``relative_delta_norm`` in the spectrum JSON, taken over the whole adapter; the largest single
    matrix's is ``max_relative_delta_norm``); ``min_max_cos``: the lowest similarity of any of its
    top singular vectors to the base (lower = further from the base); ``record``: where its full
    record lies in the store (``records/<shard>:<line>``); ``position``: its place in the ranking.
    Older files called ``relative_delta_norm`` "drift" (the spectrum JSON's name for 1 - lowest
    max|cos|) and ``position`` "rank" (a LoRA rank elsewhere); they are read."""

    adapter: str
    name: str
    status: str
    total_intruders: int | None = None
    error: str = ""
    position: int | None = None  # in the ranking, 1 = first (not a LoRA rank: "rank" was its old name)
    matrices_audited: int | None = None
    relative_delta_norm: float | None = None
    max_relative_delta_norm: float | None = None
    min_max_cos: float | None = None
    sweep_totals: list[int] = field(default_factory=list)
    seconds: float | None = None
    fingerprint: str = ""
    record: str = ""
    gate_values: dict[str, float | None] = field(default_factory=dict)  # the spectrum fields of --fail-on

    @classmethod
    def _from_json_hook(cls, raw: dict) -> dict:
        for old, new in (("drift", "relative_delta_norm"), ("rank", "position")):  # the fields' old names
            if old in raw and new not in raw:
                raw[new] = raw.pop(old)
        return raw

    @classmethod
    def from_record(cls, rec: ScreenRecord, location: str = "") -> "ScreenRow":
        row = cls(adapter=rec.adapter, name=rec.name, status=rec.status, error=rec.error, seconds=rec.seconds,
                  fingerprint=rec.fingerprint, record=location)
        r = rec.result
        if rec.status != OK or r is None:
            return row
        row.total_intruders = r.total_intruders
        row.matrices_audited = len(r.matrices)
        row.sweep_totals = list(r.sweep_totals)
        cos = [m.min_cos for m in r.matrices if m.min_cos is not None]
        row.min_max_cos = min(cos) if cos else None
        rel = [m.relative_delta_norm for m in r.matrices if m.relative_delta_norm is not None]
        row.max_relative_delta_norm = max(rel) if rel else None
        row.relative_delta_norm = relative_delta_norm(r)
        row.gate_values = {name: m.value for name, m in tuned_values(r).items()}
        return row


def relative_delta_norm(r: TunedResult) -> float | None:
    """sqrt(sum ||dW||_F^2) / sqrt(sum ||W0||_F^2) over the matrices with both norms; ||W0||_F is
    ||dW||_F / relative_delta_norm. None when no matrix has a relative norm."""
    num = den = 0.0
    for m in r.matrices:
        if m.delta_norm is None or not m.relative_delta_norm:
            continue
        num += m.delta_norm ** 2
        den += (m.delta_norm / m.relative_delta_norm) ** 2
    return math.sqrt(num / den) if den > 0 else None


def rank_rows(rows: list[ScreenRow]) -> list[ScreenRow]:
    """Rows in rank order, ``position`` set (1 = first): ok rows sorted by ``RANK_KEYS`` (a missing value
    sorts after every present one, ties keep input order), then failed rows in input order."""
    def key(row: ScreenRow) -> tuple:
        out = []
        for name, descending in RANK_KEYS:
            v = getattr(row, name)
            out += [v is None, 0.0 if v is None else (-v if descending else v)]
        return tuple(out)

    ok = sorted((r for r in rows if r.status == OK), key=key)
    failed = [r for r in rows if r.status != OK]
    for i, r in enumerate(ok):
        r.position = i + 1
    for r in failed:
        r.position = None
    return ok + failed


@dataclass
class ScreenResult:
    SCHEMA = SCHEMA
    SCHEMA_VERSION = SCHEMA_VERSION
    WRITTEN_BY = "screen"

    base: str
    k: int
    epsilon: float
    epsilon_sweep: list[float] = field(default_factory=lambda: list(DEFAULT_EPSILON_SWEEP))
    ranked_by: list[str] = field(default_factory=lambda: [f"{n} {'desc' if d else 'asc'}" for n, d in RANK_KEYS])
    counts: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    adapters: list[ScreenRow] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    provenance_block: dict[str, Any] | None = None
    gate: GateOutcome | None = None  # the --fail-on outcome, when a gate was given

    def to_json(self) -> dict[str, Any]:
        if self.provenance_block is None:
            self.provenance_block = provenance(SCHEMA, SCHEMA_VERSION, k=self.k, epsilon=self.epsilon,
                                               epsilon_sweep=list(self.epsilon_sweep), **self.settings)
        return {PROVENANCE_KEY: self.provenance_block, "base": self.base, "k": int(self.k),
                "epsilon": float(self.epsilon), "epsilon_sweep": [float(e) for e in self.epsilon_sweep],
                "ranked_by": list(self.ranked_by), "counts": dict(self.counts),
                "seconds": round(float(self.seconds), 3), "warnings": list(self.warnings),
                "adapters": [asdict(r) for r in self.adapters],
                "gate": None if self.gate is None else self.gate.to_json()}

    REQUIRED = ("base", "k", "epsilon", "adapters")

    @classmethod
    def looks_like(cls, obj: dict[str, Any]) -> bool:
        """A screen summary JSON without a provenance block (fields only)."""
        return all(key in obj for key in cls.REQUIRED)

    @classmethod
    def from_json(cls, obj: dict[str, Any], *, source: str = "screen summary") -> "ScreenResult":
        """Parse and validate a screen's summary.json; InputError naming the field."""
        return parse_result(cls, obj, source, what="screen summary", required=cls.REQUIRED)

    def write_json(self, path: str | os.PathLike) -> Path:
        return write_result(path, self.to_json())

    # ---- the CSV ------------------------------------------------------------------------
    def csv_columns(self) -> list[str]:
        names = [f.name for f in fields(ScreenRow) if f.name != "sweep_totals"]
        return names + [f"intruders_eps_{e:g}" for e in self.epsilon_sweep]

    def csv_rows(self) -> list[dict[str, Any]]:
        out = []
        for r in self.adapters:
            row = {k: v for k, v in asdict(r).items() if k != "sweep_totals"}
            for e, c in zip(self.epsilon_sweep, r.sweep_totals):
                row[f"intruders_eps_{e:g}"] = c
            out.append(row)
        return out

    def to_csv(self) -> str:
        """One row per adapter in rank order; text cells a spreadsheet would run as a formula are
        neutralised (``text.csv_cell``); empty cells for values a failed adapter lacks."""
        import csv
        import io

        from ..text import csv_cell

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=self.csv_columns(), lineterminator="\n")
        w.writeheader()
        for row in self.csv_rows():
            w.writerow({k: ("" if v is None else csv_cell(v)) for k, v in row.items()})
        return buf.getvalue()


def load_screen(path: str | os.PathLike) -> ScreenResult:
    """Read a screen's ``summary.json`` (InputError when it is not one)."""
    return ScreenResult.from_json(read_result(path), source=str(path))
