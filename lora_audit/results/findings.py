"""Findings: what a release gate, a code-scanning UI or a hub's triage acts on, each under a stable
rule id.

A ``Finding`` is one problem found in one input file: a rule id from ``RULES``, a level
(``error`` / ``warning`` / ``note``, SARIF's levels), a one-line message (names from the files
already made printable), the file it concerns and machine-readable details. The structural
checks of tuned files (``lora_audit.checkpoints.structure``) produce them before any matrix is
read and the spectrum result keeps them per tuned model (``TunedResult.findings``); the SARIF
export (``lora_audit.report.sarif``) also turns intruders, verdicts and non-finite matrices into
findings under the rules below. Rule ids are part of the contract: never renumbered or reused.

    LA001  intruder-dimension        a matrix with intruder dimensions (Shuttleworth et al. 2024)
    LA002  adapter-intruders         a screened adapter with intruder dimensions (its matrices listed)
    LA010  safety-verdict            a tuned model whose safety verdict is not RETAINED
    LA011  capability-degraded       a capability drop beyond the verdict threshold
    LA012  over-refusal              over-refusal rose beyond the verdict threshold
    LA013  predicted-safety-loss     safety-scan predicts the tuned model lost its safety training
    LA014  safety-scan-unknown       safety-scan could not compute a tuned model's risk
    LA020  base-mismatch             adapter_config.json names another base than BASE
    LA021  full-matrix-in-adapter    full matrices (modules_to_save, full-rank factors) in an adapter
    LA022  moe-router-adapted        LoRA or a replacement on a mixture-of-experts router
    LA023  rank-mismatch             declared r / rank_pattern disagree with the tensors
    LA024  target-modules-mismatch   declared target_modules disagree with the modules present
    LA025  executable-file           pickle or Python files next to the weights
    LA026  custom-code-reference     configs that make loaders import code (auto_map, ...)
    LA027  scale-anomaly             alpha / r far outside the usual range, or not positive
    LA028  dtype-anomaly             unusual or mixed factor dtypes
    LA030  non-finite-matrix         a matrix left out of the audit for NaN/Inf values
    LA031  adapter-not-audited       a screened adapter that could not be audited

A new rule is one ``Rule`` line in ``_RULES``: the SARIF export lists it, and a result that carries
a ``Finding`` under its id (``TunedResult.findings``, ``ModelScan.findings``) reaches SARIF with no
other change.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError

LEVELS = ("error", "warning", "note")


@dataclass(frozen=True)
class Rule:
    id: str
    name: str
    short: str  # one sentence: what was found
    help: str  # why it matters and what to do
    level: str  # the default level (a finding may say otherwise)


_RULES = [
    Rule("LA001", "intruder-dimension", "Intruder dimensions in a tuned matrix.",
         "Top singular vectors of the tuned matrix with no counterpart among the base's (max |cos| below epsilon; "
         "Shuttleworth et al. 2024). LoRA fine-tunes that carry many of them forget more of the pre-training "
         "distribution; compare with other fine-tunes of the same base, or fine-tune with a higher rank.",
         "warning"),
    Rule("LA002", "adapter-intruders", "Intruder dimensions in a screened adapter.",
         "One result per adapter of a screen (its matrices with intruders as locations, most first): the same "
         "measure as LA001, summed over the adapter, so that a screen of thousands of adapters stays readable. "
         "Rank adapters by it and look at the detail pages of the worst.", "warning"),
    Rule("LA010", "safety-verdict", "The behavioural audit's verdict is not RETAINED.",
         "SAFETY_REMOVED (error): the tuned model refuses harmful requests far less than its base; "
         "SAFETY_DEGRADED (warning): a drop beyond the thresholds; INCONCLUSIVE (note): the base refuses too "
         "little to tell. See the reasons in the safety JSON.", "warning"),
    Rule("LA011", "capability-degraded", "Capability dropped beyond the verdict threshold.",
         "An lm-eval task's score fell by more than the capability threshold against the base.", "warning"),
    Rule("LA012", "over-refusal", "Over-refusal rose beyond the verdict threshold.",
         "The tuned model refuses more benign look-alike prompts than its base.", "note"),
    Rule("LA013", "predicted-safety-loss", "safety-scan predicts that the tuned model lost its safety training.",
         "The risk fitted on a labelled panel of fine-tunes (weights along the base's refusal direction, first-token "
         "refusal, activation shift) is above its threshold. Confirm with safety-eval, which generates and scores "
         "responses.", "warning"),
    Rule("LA014", "safety-scan-unknown", "safety-scan could not compute the tuned model's risk.",
         "A signal the risk model needs is missing (see the warnings in the scan JSON); nothing is predicted "
         "either way.", "note"),
    Rule("LA020", "base-mismatch", "The adapter names a different base model than the one audited against.",
         "adapter_config.json's base_model_name_or_path differs from BASE. When the named base is on this machine "
         "the two are compared by content; an adapter applied to another base than the one it was trained on "
         "is not the model that will be published.", "warning"),
    Rule("LA021", "full-matrix-in-adapter", "An adapter ships full weight matrices.",
         "modules_to_save replacements (full lm_head or embedding matrices, classifier heads) or LoRA factors whose "
         "rank reaches the matrix size can hold any full fine-tune: the adapter is not the low-rank update its "
         "format suggests. Audit with --include-embeddings to examine embeddings and lm_head.", "warning"),
    Rule("LA022", "moe-router-adapted", "A mixture-of-experts router is adapted.",
         "Changing a router changes which experts every token is sent to, a large behavioural change from few "
         "parameters, and one the spectral audit of single matrices does not weigh.", "warning"),
    Rule("LA023", "rank-mismatch", "Declared ranks disagree with the ranks in the tensors.",
         "adapter_config.json's r / rank_pattern give another rank than the lora_A tensors have: PEFT cannot load "
         "the adapter as declared, and its scale alpha / r is not the one it was trained with.", "error"),
    Rule("LA024", "target-modules-mismatch", "Declared target_modules disagree with the modules present.",
         "Weights for modules that target_modules does not select are ignored by PEFT (the audited model is not "
         "the one PEFT runs); selected modules without weights keep their initialisation (random with "
         "init_lora_weights=false).", "warning"),
    Rule("LA025", "executable-file", "Files that can execute code lie next to the weights.",
         "Pickle files (.bin, .pt, .pkl, ...) run code when loaded with torch.load(weights_only=False) or "
         "pickle; Python files run with trust_remote_code. lora-audit never loads them; anyone else may.",
         "warning"),
    Rule("LA026", "custom-code-reference", "A config makes loaders import code.",
         "auto_map (transformers, with trust_remote_code) or auto_mapping (PEFT) name classes to import when the "
         "model is loaded.", "warning"),
    Rule("LA027", "scale-anomaly", "The LoRA scale alpha / r is far outside the usual range.",
         "Usual recipes give alpha / r between 0.25 and 2 (alpha = 2r at most, sqrt(r) with rsLoRA). A scale "
         "above 16 amplifies the update beyond any common recipe; a scale of 0 or below switches the update off "
         "or reverses it.", "warning"),
    Rule("LA028", "dtype-anomaly", "Unusual or mixed dtypes among the adapter's factors.",
         "Factors stored in float64, float8 or in several dtypes are unusual for adapters and worth a look "
         "(size, precision, hand-edited files).", "note"),
    Rule("LA030", "non-finite-matrix", "A matrix was left out of the audit.",
         "NaN/Inf values in the base, the tuned weights or the adapter factors, or an update that overflows: "
         "the matrix was not audited and the result is incomplete (exit status 4).", "warning"),
    Rule("LA031", "adapter-not-audited", "A screened adapter could not be audited.",
         "The screen recorded the adapter as failed, with the reason (unreadable files, another base, a format "
         "lora-audit does not read); the screen is incomplete (exit status 4). Fix the input and resume the "
         "screen with --retry-failed.", "warning"),
]
RULES: dict[str, Rule] = {r.id: r for r in _RULES}


@dataclass
class Finding:
    """One problem in one file: ``rule`` (an id of ``RULES``), ``level``, ``message``, ``file``
    (the path it concerns, or None) and ``detail`` (machine-readable specifics)."""

    rule: str
    level: str
    message: str
    file: str | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.level not in LEVELS:
            raise InputError(f"finding {self.rule}: level {self.level!r} is not one of {', '.join(LEVELS)}")

    @property
    def name(self) -> str:
        rule = RULES.get(self.rule)
        return rule.name if rule else self.rule

    @property
    def counts(self) -> bool:
        """Whether the gate's ``structural`` field counts it (errors and warnings, not notes)."""
        return self.level in ("error", "warning")

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        """``[warning] LA021 full-matrix-in-adapter: message`` (the message is already printable)."""
        return f"[{self.level}] {self.rule} {self.name}: {self.message}"
