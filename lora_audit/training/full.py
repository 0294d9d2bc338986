"""Full fine-tuning: every parameter trains; saved as a safetensors model folder."""

from __future__ import annotations


def prepare(model):
    for p in model.parameters():
        p.requires_grad_(True)
    return model
