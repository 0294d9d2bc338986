"""Every training method runs on a GGUF base (loaded as a plain float model) and saves a result
that loads on the weights the GGUF holds."""

from __future__ import annotations

import json

import pytest
import torch

from lora_audit.training import METHODS, train


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_a_gguf_base(tiny_gguf, tmp_path, method):
    path, want = tiny_gguf
    out = tmp_path / method
    record = train(method=method, base=str(path), data="builtin:alpaca-mini", out=out, steps=2, batch_size=2,
                   max_length=32, rank=2, alpha=4, device="cpu", target_modules=["q_proj", "v_proj"])
    assert record["method"] == method and len(record["loss"]) == 2
    assert json.loads((out / "training.json").read_text())["method"] == method
    if method == "full":
        from safetensors.torch import load_file

        saved = load_file(str(out / "model.safetensors"))
        assert set(want) <= set(saved)
        assert not torch.equal(saved["model.layers.0.self_attn.q_proj.weight"],
                               want["model.layers.0.self_attn.q_proj.weight"]), "training changed nothing"
    else:
        from lora_audit.checkpoints import load_model

        loaded = load_model(str(out), base=str(path), device="cpu")  # the adapter fits the GGUF's weights
        assert any("lora_A" in n for n, _ in loaded.model.named_parameters())


def test_lora_ga_with_its_default_targets_on_a_gguf_base(tiny_gguf, tmp_path):
    """No --target-modules: peft's LoRA-GA gradient pass cannot expand "all-linear" (it runs before
    get_peft_model), so the linear layers are named for it; the adapter covers all of them."""
    path, _ = tiny_gguf
    train(method="lora-ga", base=str(path), data="builtin:alpaca-mini", out=tmp_path / "ga", steps=1, batch_size=2,
          max_length=32, rank=2, alpha=4, device="cpu")
    cfg = json.loads((tmp_path / "ga" / "adapter_config.json").read_text())
    assert sorted(cfg["target_modules"]) == ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj",
                                             "v_proj"] and cfg["r"] == 4
