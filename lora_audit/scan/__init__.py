"""Safety checks without generation, against BASE's refusal direction (Arditi et al. 2024), shown to
be causal per base: edits of TUNED's weights along it (``refusal_edits``, a tamper finding, weights
only), a first-token refusal proxy on the scan's own prompts (one forward pass), further signals
(energy along the direction, activation shift, Safe LoRA's score, Hsu et al. 2024), and a risk
only from a risk model validated on held-out data.

    from lora_audit.scan import ScanConfig, run_safety_scan
    result = run_safety_scan("released/", ["adapter/"], ScanConfig())
    m = result.models["adapter/"]
    m.refusal_edits, m.signals["first_token_drop"], m.intervals["first_token_drop"], m.risk

Rooms: ``prompts`` (the scan's prompt sets and their halves), ``direction`` (activations, the
directions, the residual stream), ``causal`` (the intervention test of each direction),
``profile`` (BASE's profile, cached), ``tamper`` (refusal edits), ``weights`` (weight-only
signals), ``safelora``, ``forward`` (forward-pass signals), ``risk`` (risk models and their file),
``validation`` (the held-out record a risk must pass), ``run`` (the pipeline). docs/safety-scan.md
says what each signal is and is not.
"""

from .run import ScanConfig, run_safety_scan

__all__ = ["ScanConfig", "run_safety_scan"]
