"""lora-audit: audit fine-tuned language models against their base.

Rooms (imports run one way: commands -> spectral|safety|training|report -> checkpoints -> results):
    checkpoints/  formats and streaming: the (name, W0, deltas) stream, whole-model loading
    spectral/     intruder dimensions (Shuttleworth et al. 2024) and spectral measures
    safety/       refusal / over-refusal / capability audit (Lermen et al. 2023)
    training/     reference fine-tuning methods (LoRA, rsLoRA, DoRA, LoRA-GA, LoRA-SB, ...)
    report/       HTML / Markdown reports from result JSON
    commands/     thin click commands; lora_audit.cli is the entry point
    studies/      experiments that use the product (the demo's study, the zoo panel); the product
                  never imports them, their commands plug in through an entry point

Distribution name on the package index: ``lora-auditor`` (the command stays ``lora-audit``).
"""

__version__ = "0.1.0"
