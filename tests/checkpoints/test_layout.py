"""Which tensors are matrices (layout.plan_matrices), what is skipped and why, and the clear errors for
layouts lora-audit does not read or cannot tell apart."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_audit.checkpoints import open_stream
from lora_audit.cli import cli
from lora_audit.checkpoints.adapters import read_adapter
from lora_audit.checkpoints.detect import detect
from lora_audit.checkpoints.layout import plan_matrices
from lora_audit.checkpoints.sources import open_weights
from lora_audit.errors import FormatError

SHAPES = {
    "layers.0.attn.q.weight": (32, 32),
    "encoder.conv1.weight": (32, 8, 3),  # Conv1d
    "patch.proj.weight": (32, 3, 4, 4),  # Conv2d
    "video.patch.weight": (32, 3, 2, 4, 4),  # Conv3d
    "layers.0.mlp.experts.gate_up_proj": (3, 48, 32),  # (E, out, in): in = hidden 32
    "layers.0.mlp.experts.down_proj": (3, 32, 24),  # (E, out, in): out = hidden
    "layers.1.mlp.experts.gate_up_proj": (3, 32, 48),  # (E, in, out)
    "layers.1.mlp.experts.down_proj": (3, 24, 32),
    "layers.2.mlp.experts.up_proj": (3, 20, 24),  # the hidden size on neither side
    "layers.1.mlp.experts.gate_up_proj_bias": (3, 48),
    "embeddings.position_embeddings": (1, 17, 32),  # ViT: a 3-D parameter, not a kernel
    "norm.weight": (32,),
}


def test_plan_reads_every_kind_as_out_by_in():
    plan, skipped = plan_matrices(SHAPES, {"hidden_size": 32})
    assert plan["encoder.conv1.weight"].shape == (32, 24) and plan["encoder.conv1.weight"].reshaped_from == (32, 8, 3)
    assert plan["patch.proj.weight"].shape == (32, 48) and plan["video.patch.weight"].shape == (32, 96)
    assert [plan[f"layers.0.mlp.experts.gate_up_proj[{e}]"].shape for e in range(3)] == [(48, 32)] * 3
    assert plan["layers.0.mlp.experts.down_proj[1]"].shape == (32, 24)
    stack = plan["layers.1.mlp.experts.gate_up_proj[2]"]
    assert stack.transposed and stack.shape == (48, 32)
    assert plan["layers.1.mlp.experts.down_proj[0]"].shape == (32, 24)
    t = torch.arange(3 * 32 * 48.0).reshape(3, 32, 48)
    assert torch.equal(plan["layers.1.mlp.experts.gate_up_proj[2]"].take(t), t[2].T)
    assert "norm.weight" not in plan and "norm.weight" not in skipped
    assert "hidden size 32" in skipped["layers.2.mlp.experts.up_proj"]
    assert "stack of bias vectors" in skipped["layers.1.mlp.experts.gate_up_proj_bias"]
    assert "neither a conv kernel" in skipped["embeddings.position_embeddings"]
    _, skipped = plan_matrices({"layers.0.mlp.experts.down_proj": (3, 32, 24)}, {})
    assert "no hidden size" in skipped["layers.0.mlp.experts.down_proj"]


def test_a_changed_tensor_that_is_no_matrix_is_reported_with_why(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=48, image_size=16,
                    patch_size=4)
    ViTModel(cfg, add_pooling_layer=False).save_pretrained(tmp_path / "base")
    sd = load_file(str(tmp_path / "base" / "model.safetensors"))
    sd["embeddings.position_embeddings"] = sd["embeddings.position_embeddings"] + 0.1
    sd["encoder.layer.0.attention.attention.query.weight"] = sd["encoder.layer.0.attention.attention.query.weight"] * 2
    shutil.copytree(tmp_path / "base", tmp_path / "tuned")
    save_file(sd, str(tmp_path / "tuned" / "model.safetensors"))
    s = open_stream(tmp_path / "base", [tmp_path / "tuned"])
    assert [g.name for g in s] == ["encoder.layer.0.attention.attention.query.weight"]
    (skipped,) = [x for x in s.info[0]["skipped"] if x["name"] == "embeddings.position_embeddings"]
    assert "3-D tensor [1, 17, 32]" in skipped["why"] and any("not audited" in w for w in s.warnings[0])


# ---- layouts that are refused, with what was found and what is accepted ------------------------------------
def _file(tmp_path, tensors, name="x.safetensors"):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp_path / name))
    return tmp_path / name


def test_lycoris_layouts_are_named(tmp_path):
    f = _file(tmp_path, {"lora_unet_a_b.hada_w1_a": torch.ones(2, 4), "lora_unet_a_b.hada_w1_b": torch.ones(2, 4)})
    with pytest.raises(FormatError, match=r"LyCORIS LoHa weights, which lora-audit does not read; it reads .*kohya"):
        detect(f)


def test_two_lora_layouts_in_one_file_are_ambiguous(tmp_path):
    f = _file(tmp_path, {"a.lora_down.weight": torch.ones(2, 4), "a.lora_up.weight": torch.ones(4, 2),
                         "b.lora_A.weight": torch.ones(2, 4), "b.lora_B.weight": torch.ones(4, 2)})
    with pytest.raises(FormatError, match=r"ambiguous layout: keys of kohya LoRA .*a.lora_down.weight.* and of "
                                          r"PEFT/diffusers LoRA .*b.lora_A.weight"):
        detect(f)


def test_kohya_file_with_dora_scales_is_refused(tmp_path):
    f = _file(tmp_path, {"lora_unet_a.lora_down.weight": torch.ones(2, 4), "lora_unet_a.dora_scale": torch.ones(1, 4),
                         "lora_unet_a.lora_up.weight": torch.ones(4, 2)})
    with pytest.raises(FormatError, match=r"1 tensors are not kohya LoRA factors .*lora_unet_a.dora_scale "
                                          r"\(DoRA \(kohya/LyCORIS\)\); lora-audit reads plain LoRA and LoCon"):
        read_adapter(f)


@pytest.mark.parametrize("qc, msg", [
    ({"quant_method": "awq", "bits": 4}, r"quant_method 'awq' is not a layout lora-audit dequantises; it reads "
                                         r"bitsandbytes .*fp8 with block scales and GGUF"),
    ({"quant_method": "fp8"}, r"weight_block_size is None; lora-audit reads FP8 with block scales"),
])
def test_quantisation_lora_audit_cannot_read_is_named(tiny_llama, tmp_path, qc, msg):
    shutil.copytree(tiny_llama, tmp_path / "q")
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    (tmp_path / "q" / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    with pytest.raises(FormatError, match=msg):
        open_weights(tmp_path / "q")


def test_bitsandbytes_quant_state_is_checked(tiny_llama, tmp_path):
    """A quant state whose JSON names a dtype outside the accepted set is refused before any getattr."""
    state = json.dumps({"quant_type": "nf4", "blocksize": 64, "dtype": "__class__", "shape": [64, 64]}).encode()
    with pytest.raises(FormatError, match=r"quant_state.bitsandbytes__nf4: field 'dtype' is '__class__'; it must be "
                                          r"float32 or float16 or bfloat16"):
        open_weights(_bnb_folder(tiny_llama, tmp_path, state))


@pytest.mark.parametrize("text_config", ["qwen", [64], 3])
def test_hidden_size_skips_a_text_config_that_is_not_an_object(text_config):
    from lora_audit.checkpoints.layout import hidden_size

    assert hidden_size({"text_config": text_config}) is None
    assert hidden_size({"text_config": text_config, "d_model": 8}) == 8


def test_non_finite_quantisation_tensors_are_refused():
    from lora_audit.checkpoints import quantized as q
    from lora_audit.checkpoints.sources import _int8_format

    nan = torch.tensor([float("nan")])
    with pytest.raises(FormatError, match="w: the stored SCB holds NaN"):
        q.dequantize_bnb_int8(torch.zeros(1, 2, dtype=torch.int8), nan, "w")
    with pytest.raises(FormatError, match="w: the stored weight_scale_inv holds NaN"):
        q.dequantize_fp8_blocks(torch.zeros(2, 2).to(torch.float8_e4m3fn), torch.tensor([[float("inf")]]), (2, 2), "w")
    state = q.Bnb4bit("nf4", 64, torch.float32, (8, 8), None)
    packed = torch.zeros(32, dtype=torch.uint8)
    with pytest.raises(FormatError, match="w: the stored quant_map holds NaN"):
        q.dequantize_bnb_4bit(packed, state, {"absmax": torch.ones(1), "quant_map": torch.full((16,), float("nan"))},
                              "w")
    with pytest.raises(FormatError, match="w: the stored absmax holds NaN"):
        q.dequantize_bnb_4bit(packed, state, {"absmax": nan, "quant_map": torch.linspace(-1, 1, 16)}, "w")
    for bad in (torch.zeros(2), nan, torch.zeros(0)):
        with pytest.raises(FormatError, match="must hold one finite number"):
            _int8_format(bad, "w")
    assert _int8_format(torch.tensor([0], dtype=torch.uint8), "w") == 0


def _fp8_base(tiny_llama, tmp_path, drop: str | None = None, config: bool = True) -> Path:
    from tests.checkpoints.families import fp8_folder

    q = fp8_folder(tiny_llama, tmp_path / "fp8")
    sd = load_file(str(q / "model.safetensors"))
    if drop is not None:
        del sd[drop]
    save_file(sd, str(q / "model.safetensors"))
    if not config:
        cfg = json.loads((q / "config.json").read_text())
        del cfg["quantization_config"]
        (q / "config.json").write_text(json.dumps(cfg))
    return q


def test_fp8_weight_without_its_scale_is_refused_not_read_unscaled(tiny_llama, tmp_path):
    w = "model.layers.1.mlp.down_proj.weight"
    q = _fp8_base(tiny_llama, tmp_path, drop=w + "_scale_inv")
    with pytest.raises(FormatError, match=rf"1 weight\(s\) stored as quantisation codes \(F8_E4M3\) have no "
                                          rf"weight_scale_inv: {w}; without it the codes cannot be dequantised"):
        open_weights(q)
    r = CliRunner().invoke(cli, ["spectrum", str(q), str(tiny_llama), "--no-cache"])
    assert r.exit_code == 1 and "weight_scale_inv" in r.output and "This is a bug" not in r.output


def test_quantisation_tensors_without_a_quantisation_config_are_refused(tiny_llama, tmp_path):
    q = _fp8_base(tiny_llama, tmp_path, config=False)
    with pytest.raises(FormatError, match=r"holds quantisation tensors \(model.layers.0.mlp.down_proj.weight_scale_inv, "
                                          r".*but config.json has no quantization_config"):
        open_weights(q)


def test_bitsandbytes_weight_without_its_quant_state_is_refused(tiny_llama, tmp_path):
    shutil.copytree(tiny_llama, tmp_path / "q")
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    sd["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(2048, 1, dtype=torch.uint8)  # packed, no state
    save_file(sd, str(tmp_path / "q" / "model.safetensors"))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"\(U8\) have no quant_state \(4-bit\) or SCB \(int8\): "
                                          r"model.layers.0.self_attn.q_proj.weight"):
        open_weights(tmp_path / "q")


def _bnb_folder(tiny_llama, tmp_path, state: bytes) -> Path:
    shutil.copytree(tiny_llama, tmp_path / "q")
    sd = load_file(str(tmp_path / "q" / "model.safetensors"))
    w = "model.layers.0.self_attn.q_proj.weight"
    sd.update({w: torch.zeros(2048, 1, dtype=torch.uint8), f"{w}.absmax": torch.ones(64),
               f"{w}.quant_map": torch.linspace(-1, 1, 16),
               f"{w}.quant_state.bitsandbytes__nf4": torch.tensor(list(state), dtype=torch.uint8)})
    save_file(sd, str(tmp_path / "q" / "model.safetensors"))
    cfg = json.loads((tmp_path / "q" / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (tmp_path / "q" / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "q"


@pytest.mark.parametrize("state, msg", [
    (b"[" * 20_000 + b"]" * 20_000, r"not valid JSON \(nested deeper than 100 levels\)"),
    (b'{"quant_type": "nf4", "quant_type": "fp4"}', r"the key 'quant_type' appears twice"),
    (b"\xff\xfe", r"not a JSON object in UTF-8"),
    (b"{" * 70_000, r"70000 bytes; a quant state is a JSON object of a few hundred bytes"),
])
def test_hostile_bitsandbytes_quant_state_is_a_clean_error(tiny_llama, tmp_path, state, msg):
    q = _bnb_folder(tiny_llama, tmp_path, state)
    with pytest.raises(FormatError, match=msg):
        open_weights(q)
    r = CliRunner().invoke(cli, ["spectrum", str(q), str(tiny_llama), "--no-cache"])
    assert r.exit_code == 1 and "quant_state.bitsandbytes__nf4" in r.output and "This is a bug" not in r.output
