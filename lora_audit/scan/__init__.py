"""Safety-undo risk without generation: the refusal direction of BASE (Arditi et al. 2024), how
much each TUNED update writes along it (weights only), Safe LoRA's alignment score (Hsu et al.
2024), the refusal score and activation shift of TUNED (one forward pass), and a risk score
combining them with weights fitted on a labelled panel of fine-tunes (``zoo``).

    from lora_audit.scan import ScanConfig, run_safety_scan
    result = run_safety_scan("released/", ["adapter/"], ScanConfig())
    result.models["adapter/"].risk, result.models["adapter/"].signals["refusal_energy_ratio"]

Rooms: ``direction`` (activations, the direction, the residual stream), ``cache`` (the base
profile on disk), ``weights`` (weight-only signals), ``safelora``, ``forward`` (forward-pass
signals), ``risk`` (the combined score), ``run`` (the pipeline), ``zoo`` (the validation panel).
"""

from .run import ScanConfig, run_safety_scan

__all__ = ["ScanConfig", "run_safety_scan"]
