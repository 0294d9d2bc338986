"""Results of ``lora-audit finetune`` (schema ``"training"``) and ``lora-audit federated`` (schema
``"federated"``).

``training.json`` (inside every folder ``finetune`` writes, and ``finetune --json``)::

    lora_audit             provenance block; settings: method, base, data, steps, rank, alpha, lr,
                           batch_size, max_length, target_modules, seed, warmup, device, examples
    method                 the training method (``training.methods``)
    loss                   the training loss at every step
    final_loss             the last step's loss (null for a method that does not train)
    trainable_parameters   parameters the optimiser updated
    wall_time_s            seconds, loading the model included
    saved_as               how a method's adapter was converted for saving (LoRA-GA, LoRA-SB), or null

``federated --json`` and ``OUT/federated.json``: the aggregation and its FedAvg bias
(``training.federated`` defines it), per module and in total.

Files written by lora-audit 0.1.0 were flat (the provenance fields at the top level next to a copy under
``"lora_audit"``): their fields kept their names, so readers of those fields keep working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from .base import Result
from .schema import Count, NonNeg


@dataclass
class TrainingResult(Result):
    """How a fine-tune was made: its method, loss curve and cost (settings in the provenance block)."""

    SCHEMA: ClassVar[str] = "training"
    SCHEMA_VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "training record"
    WRITTEN_BY: ClassVar[str] = "finetune (OUT/training.json, --json)"

    method: str
    loss: list[float] = field(default_factory=list)
    final_loss: float | None = None
    trainable_parameters: Count = 0
    wall_time_s: NonNeg = 0.0
    saved_as: str | None = None


@dataclass
class FederatedModule:
    bias: NonNeg  # ||mean(B_k A_k) - mean(B_k) mean(A_k)||_F / ||mean(B_k A_k)||_F
    mean_update_norm: NonNeg  # ||mean(B_k A_k)||_F


@dataclass
class FederatedResult(Result):
    """An aggregation of client adapters and its FedAvg aggregation bias (``training.federated``)."""

    SCHEMA: ClassVar[str] = "federated"
    SCHEMA_VERSION: ClassVar[int] = 1
    WHAT: ClassVar[str] = "federated aggregation record"
    WRITTEN_BY: ClassVar[str] = "federated (--json, OUT/federated.json)"

    method: str
    clients: list[str]
    fedavg_bias_total: NonNeg
    aggregate_bias_total: NonNeg
    modules: dict[str, FederatedModule] = field(default_factory=dict)
