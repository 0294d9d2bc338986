"""The table of reference fine-tuning methods: how each one prepares the model before the shared
training loop (``loop.fit``), what it does around each step, and how its result is saved.

Each entry's ``prepare(setup)`` returns a ``Prepared``: the model to train, the alpha to record,
optional per-step hooks (LoRA-MGPO perturbs the base weights around forward/backward) and an
optional ``export`` that turns the trained model into what is saved (LoRA-GA and LoRA-SB are saved
as plain LoRA adapters against the ORIGINAL base). The methods' own modules cite their papers.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import InputError


@dataclass
class Setup:
    """What a method needs to prepare the model (the loop builds it)."""

    model: object  # the loaded base model (transformers), modified in place by most methods
    batches: object  # training.data.Batches: LoRA-GA and LoRA-SB estimate gradients from it
    rank: int
    alpha: float
    lr: float
    target_modules: list[str] | None
    seed: int
    load_base: Callable[[], object]  # a fresh copy of the base model (for exports against it)


@dataclass
class Prepared:
    model: object
    alpha: float  # recorded in training.json (ALLoRA: r, i.e. scale 1)
    before_forward: Callable[[], None] | None = None
    after_backward: Callable[[], None] | None = None
    optimizer_hook: Callable[[object], None] | None = None  # called once with the optimizer
    export: Callable[[object], tuple[object, str]] | None = None  # trained model -> (model to save, note)


def _full(s: Setup) -> Prepared:
    from . import full

    return Prepared(full.prepare(s.model), s.alpha)


def _peft(method: str) -> Callable[[Setup], Prepared]:
    def prepare(s: Setup) -> Prepared:
        from . import lora

        return Prepared(lora.wrap(s.model, method, s.rank, s.alpha, s.target_modules, s.seed), s.alpha)

    return prepare


def _allora(s: Setup) -> Prepared:
    from . import allora

    return Prepared(allora.wrap(s.model, s.rank, s.target_modules, s.seed), float(s.rank))


def _lora_ga(s: Setup) -> Prepared:
    from . import lora, lora_ga

    # peft's LoRA-GA gradient pass runs before get_peft_model, which is where "all-linear" is expanded:
    # it matches no layer, so the default targets are named here (every linear layer but the head)
    targets = s.target_modules or sorted({n.rsplit(".", 1)[-1] for n in lora.linear_shapes(s.model)})
    model, init = lora_ga.wrap(s.model, s.batches, method_cfg=lora.lora_config("lora", s.rank, s.alpha, targets),
                               seed=s.seed)

    def export(trained):
        note = (f"plain LoRA of rank {2 * s.rank} against the original base "
                "([B_final, -B_init] [A_final; A_init])")
        return lora_ga.to_plain_lora(trained, init, s.load_base()), note

    return Prepared(model, s.alpha, export=export)


def _lora_sb(s: Setup) -> Prepared:
    from . import lora_sb

    model, names = lora_sb.wrap(s.model, s.batches, rank=s.rank, lr=s.lr, target_modules=s.target_modules)

    def export(trained):
        return lora_sb.to_plain_lora(trained, names, s.load_base(), s.rank), \
            "plain LoRA with B' = B R, A, lora_alpha = r (scale 1)"

    return Prepared(model, s.alpha, export=export)


def _lora_mgpo(s: Setup) -> Prepared:
    from . import lora
    from .mgpo import MGPO

    model = lora.wrap(s.model, "lora", s.rank, s.alpha, s.target_modules, s.seed)
    prepared = Prepared(model, s.alpha)

    def attach(optimizer):
        mgpo = MGPO(model, optimizer)
        prepared.before_forward, prepared.after_backward = mgpo.apply, mgpo.restore

    prepared.optimizer_hook = attach
    return prepared


@dataclass(frozen=True)
class Method:
    name: str
    prepare: Callable[[Setup], Prepared]
    default_lr: float = 2e-4
    full: bool = False  # saved as a model folder, not an adapter
    rank_factor: int = 1  # singular directions per unit of --rank (LoRA-GA initialises from 2r)


METHODS_TABLE: dict[str, Method] = {m.name: m for m in (
    Method("lora", _peft("lora")),
    Method("rslora", _peft("rslora")),
    Method("dora", _peft("dora")),
    Method("ffa-lora", _peft("ffa-lora")),
    Method("allora", _allora),
    Method("lora-ga", _lora_ga, rank_factor=2),
    Method("lora-sb", _lora_sb, default_lr=2e-3),
    Method("lora-mgpo", _lora_mgpo),
    Method("full", _full, default_lr=2e-5, full=True),
)}
METHODS = tuple(METHODS_TABLE)
DEFAULT_LR = {name: m.default_lr for name, m in METHODS_TABLE.items()}


def get_method(method: str) -> Method:
    """The table entry for ``method`` (case-insensitive); InputError with a suggestion otherwise."""
    m = str(method).lower()
    if m not in METHODS_TABLE:
        close = difflib.get_close_matches(m, METHODS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise InputError(f"unknown method {method!r}.{hint} Available: {', '.join(METHODS)}")
    return METHODS_TABLE[m]
