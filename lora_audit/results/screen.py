"""Results of ``lora-audit screen``: one record per adapter, the screen's setup, and its summary.

Three kinds, each a tree of dataclasses that ``results.schema.parse`` checks:

``ScreenRecord`` (schema ``"screen-record"``): one adapter's outcome, one line of the store's
JSONL shards (``lora_audit.screen.store``). Fields marked [contract] are fixed::

    {
      "lora_audit": {...},     the provenance block (``results.base.Provenance``), schema "screen-record"
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
      "counts": {"adapters", "ok", "failed", "incomplete", "audited_now", "skipped_stored"},
                               incomplete: ok adapters with matrices the audit could not measure
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
from typing import Annotated, Any, ClassVar, Final, Literal

from ..errors import InputError
from .base import Result
from .gate import GateOutcome, tuned_values
from .schema import AT_LEAST_1, Cos, Count, Epsilon, NonNeg
from .spectrum import DEFAULT_EPSILON_SWEEP, TunedResult

SCHEMA = "screen"
SCHEMA_VERSION = 1
RECORD_SCHEMA = "screen-record"
SETUP_SCHEMA = "screen-setup"
OK: Final = "ok"  # Final: the checker reads them as the literals ScreenRecord.status takes
FAILED: Final = "failed"

# (ScreenRow field, descending?) most important first. Missing values sort last.
RANK_KEYS: tuple[tuple[str, bool], ...] = (("total_intruders", True), ("relative_delta_norm", True),
                                           ("min_max_cos", False))


@dataclass
class ScreenRecord(Result):
    """One adapter's outcome (see the module docstring)."""

    SCHEMA: ClassVar[str] = RECORD_SCHEMA
    SCHEMA_VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "screen record"
    WRITTEN_BY: ClassVar[str] = "screen (records/*.jsonl, one per line)"

    adapter: str
    status: Literal["ok", "failed"]
    error: str = ""
    name: str = ""
    fingerprint: str = ""
    seconds: NonNeg = 0.0
    attempts: Annotated[int, AT_LEAST_1] = 1
    worker: str = ""
    finished: str = ""
    result: TunedResult | None = None

    def __post_init__(self):
        super().__post_init__()
        self.name = self.name or self.adapter
        if self.status == OK and self.result is None:
            raise InputError("result: missing for an 'ok' record")

    def body(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "name": self.name, "status": self.status, "error": self.error,
                "fingerprint": self.fingerprint, "seconds": round(float(self.seconds), 3),
                "attempts": int(self.attempts), "worker": self.worker, "finished": self.finished,
                "result": self.result.to_json() if self.result is not None else None}


@dataclass
class ScreenSetup(Result):
    """What a screen folder's records were computed with; a resumed screen must match it."""

    SCHEMA: ClassVar[str] = SETUP_SCHEMA
    SCHEMA_VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "screen setup"
    WRITTEN_BY: ClassVar[str] = "screen (screen.json)"

    base: str
    base_fingerprint: str
    k: Annotated[int, AT_LEAST_1]
    epsilon: Epsilon
    epsilon_sweep: list[Epsilon]
    dtype: str = "float32"
    exact: bool = False
    include_embeddings: bool = False
    dense_metrics: bool = True
    created: str = ""

    def comparable(self) -> dict[str, Any]:
        """The fields two setups must share for their records to be comparable."""
        d = self.body()
        d.pop("created")
        return d


@dataclass
class ScreenRow:
    """One adapter in the summary. ``relative_delta_norm``: the relative size of its whole update,
    sqrt(sum ||dW||_F^2) / sqrt(sum ||W0||_F^2) over the matrices it changes (a single matrix's
    ``relative_delta_norm`` in the spectrum JSON, taken over the whole adapter; the largest single
    matrix's is ``max_relative_delta_norm``); ``min_max_cos``: the lowest similarity of any of its
    top singular vectors to the base (lower = further from the base); ``record``: where its full
    record lies in the store (``records/<shard>:<line>``); ``position``: its place in the ranking;
    ``unmeasured``: the matrices its audit could not measure (NaN/Inf values: the row is incomplete,
    as ``lora-audit spectrum`` says with exit code 4).
    Older files called ``relative_delta_norm`` "drift" (the spectrum JSON's name for 1 - lowest
    max|cos|) and ``position`` "rank" (a LoRA rank elsewhere); they are read."""

    adapter: str
    name: str
    status: Literal["ok", "failed"]
    total_intruders: Count | None = None
    error: str = ""
    position: Annotated[int, AT_LEAST_1] | None = None  # in the ranking, 1 = first (not a LoRA rank: "rank" was its old name)
    matrices_audited: Count | None = None
    unmeasured: Count | None = None  # matrices left out for NaN/Inf values or an overflowing update
    relative_delta_norm: NonNeg | None = None
    max_relative_delta_norm: NonNeg | None = None
    min_max_cos: Cos | None = None
    sweep_totals: list[Count] = field(default_factory=list)
    seconds: NonNeg | None = None
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
    def from_record(cls, rec: ScreenRecord, location: str = "") -> ScreenRow:
        row = cls(adapter=rec.adapter, name=rec.name, status=rec.status, error=rec.error, seconds=rec.seconds,
                  fingerprint=rec.fingerprint, record=location)
        r = rec.result
        if rec.status != OK or r is None:
            return row
        row.total_intruders = r.total_intruders
        row.matrices_audited = len(r.matrices)
        row.unmeasured = sum(1 for sk in r.skipped if sk.unmeasured)
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
class ScreenResult(Result):
    """Every adapter of a screen, ranked (summary.json); each one's full record is in the store."""

    SCHEMA: ClassVar[str] = SCHEMA
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    WHAT: ClassVar[str] = "screen summary"
    WRITTEN_BY: ClassVar[str] = "screen (summary.json)"
    REQUIRED: ClassVar[tuple[str, ...]] = ("base", "k", "epsilon", "adapters")

    base: str
    k: Annotated[int, AT_LEAST_1]
    epsilon: Epsilon
    epsilon_sweep: list[Epsilon] = field(default_factory=lambda: list(DEFAULT_EPSILON_SWEEP))
    ranked_by: list[str] = field(default_factory=lambda: [f"{n} {'desc' if d else 'asc'}" for n, d in RANK_KEYS])
    counts: dict[str, Count] = field(default_factory=dict)
    seconds: NonNeg = 0.0
    warnings: list[str] = field(default_factory=list)
    adapters: list[ScreenRow] = field(default_factory=list)
    gate: GateOutcome | None = None  # the --fail-on outcome, when a gate was given

    def body(self) -> dict[str, Any]:
        return {"base": self.base, "k": int(self.k),
                "epsilon": float(self.epsilon), "epsilon_sweep": [float(e) for e in self.epsilon_sweep],
                "ranked_by": list(self.ranked_by), "counts": dict(self.counts),
                "seconds": round(float(self.seconds), 3), "warnings": list(self.warnings),
                "adapters": [asdict(r) for r in self.adapters],
                "gate": None if self.gate is None else self.gate.to_json()}

    # ---- the CSV ------------------------------------------------------------------------
    def csv_columns(self) -> list[str]:
        names = [f.name for f in fields(ScreenRow) if f.name != "sweep_totals"]
        return names + [f"intruders_eps_{e:g}" for e in self.epsilon_sweep]

    def csv_rows(self) -> list[dict[str, Any]]:
        out = []
        for r in self.adapters:
            row = {k: v for k, v in asdict(r).items() if k != "sweep_totals"}
            # not strict: a result read from a file may carry a shorter sweep; the row has what is there
            for e, c in zip(self.epsilon_sweep, r.sweep_totals, strict=False):
                row[f"intruders_eps_{e:g}"] = c
            out.append(row)
        return out

    def to_csv(self) -> str:
        """One row per adapter in rank order, written by ``io.csv_text`` (no cell a spreadsheet would
        run as a formula, no control character); empty cells for values a failed adapter lacks."""
        from ..io import csv_text

        return csv_text(self.csv_rows(), self.csv_columns())


def load_screen(path: str | os.PathLike) -> ScreenResult:
    """Read a screen's ``summary.json`` (InputError when it is not one)."""
    return ScreenResult.load(path)
