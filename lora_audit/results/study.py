"""Result of a pre-registered study: a grid of fine-tuning runs fixed before any of them ran, the
numbers each point measured, and the claims the grid was set up to test, each with the rule
that decides it and whether it held in this run.

Schema ``"study"``, version ``SCHEMA_VERSION``. Top level, in this order::

    {
      "lora_audit": {...},          provenance (schema, versions, settings)
      "title": str,                 what the study is, for people
      "question": str,              the dependence it measures
      "k": int, "epsilon": float,   the intruder test every point was audited with
      "settings": {...},            what every point shares (data, steps, batch, base, ...)
      "series": [                   one line of the figures per method, in the grid's order
        {"name": str, "method": str, "rank": int | null, "alpha": float | null,
         "usual_lrs": [float, ...]} the method's usual learning-rate range, as pre-registered
      ],
      "points": [                   one per grid point, in the grid's order
        {"name": str,               the tuned model's label in spectrum.json
         "series": str, "lr": float, "steps": int,
         "intruders": int | null,   total at (k, epsilon); null when the point was not audited
         "directions": int | null,  top-k directions examined (sum of k_used)
         "lowest_max_cos": float | null, "lowest_matrix": str | null,
         "null_max_cos": float | null,   the null reference at lowest_matrix's shape
         "intruder_energy": float | null, "mean_drift": float | null,
         "loss_first": float | null, "final_loss": float | null}
      ],
      "claims": [                   decided from "points" by the rule stated in each
        {"claim": str, "rule": str, "measured": str, "holds": bool, "note": str | null}
      ]
    }

Read by ``lora-audit report`` (``results.load_result``) like every other result kind.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, ClassVar

from .base import Result
from .schema import AT_LEAST_1, POSITIVE, Cos, Count, Epsilon, Rate

SCHEMA = "study"
SCHEMA_VERSION = 1


@dataclass
class StudySeries:
    name: str  # e.g. "LoRA r=8"
    method: str  # the training method (training.methods)
    rank: Annotated[int, AT_LEAST_1] | None = None
    alpha: float | None = None
    usual_lrs: list[Annotated[float, POSITIVE]] = field(default_factory=list)


@dataclass
class StudyPoint:
    name: str
    series: str
    lr: Annotated[float, POSITIVE]
    steps: Annotated[int, AT_LEAST_1]
    intruders: Count | None = None
    directions: Count | None = None
    lowest_max_cos: Cos | None = None
    lowest_matrix: str | None = None
    null_max_cos: Cos | None = None
    intruder_energy: Rate | None = None
    mean_drift: float | None = None
    loss_first: float | None = None
    final_loss: float | None = None


@dataclass
class StudyClaim:
    claim: str
    rule: str  # how "holds" is decided, fixed with the grid
    measured: str
    holds: bool
    note: str | None = None


@dataclass
class StudyResult(Result):
    """A pre-registered study: its grid of runs, what each point measured, and whether each claim held."""

    SCHEMA: ClassVar[str] = SCHEMA
    SCHEMA_VERSION: ClassVar[int] = SCHEMA_VERSION
    WHAT: ClassVar[str] = "study result"
    WRITTEN_BY: ClassVar[str] = "demo (study.json)"
    REQUIRED: ClassVar[tuple[str, ...]] = ("question", "points", "claims")
    SETTINGS_IN_BODY: ClassVar[bool] = True

    title: str
    question: str
    k: Annotated[int, AT_LEAST_1]
    epsilon: Epsilon
    series: list[StudySeries] = field(default_factory=list)
    points: list[StudyPoint] = field(default_factory=list)
    claims: list[StudyClaim] = field(default_factory=list)

    def points_of(self, series: str) -> list[StudyPoint]:
        """The points of one series, by ascending learning rate."""
        return sorted((p for p in self.points if p.series == series), key=lambda p: p.lr)
