"""Reference fine-tuning implementations of the LoRA variants lora-audit audits.

Python API::

    from lora_audit.training import train
    record = train(method="lora", base="path/to/model", data="builtin:alpaca-mini",
                   out="out/adapter", steps=50, rank=8, alpha=16)

``record`` is the dict written to ``out/training.json``. Methods: see ``METHODS``.
"""

from .loop import METHODS, train

__all__ = ["METHODS", "train"]
