"""Saving: adapters in PEFT format, full models as safetensors folders, each written atomically
(``lora_audit.io.atomic_dir``, which never replaces a folder lora-audit did not write) with
``training.json`` inside."""

from __future__ import annotations

from pathlib import Path

from ..io import atomic_dir
from ..results.training import TrainingResult


def save(model, tokenizer, out: str | Path, record: TrainingResult, *, full: bool, overwrite: bool = False) -> Path:
    with atomic_dir(out, overwrite=overwrite, what="finetune") as tmp:
        if full:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
        else:
            model.save_pretrained(tmp)  # adapter_config.json + adapter_model.safetensors
        record.write_json(tmp / "training.json")
    return Path(out)
