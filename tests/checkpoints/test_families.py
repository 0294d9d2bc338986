"""Every model family and adapter format the LoRA literature uses, end to end through the CLI.

Each test builds a tiny base from a config (no download), writes the adapter in the listed format,
runs `lora-audit spectrum` and compares every matrix's intruder count and max|cos| (to 1e-4) with
the float64 two-SVD reference on weights merged independently (``tests.checkpoints.families``).
``FAMILIES`` lists what these tests cover; the README's "What it reads" table is generated from it
(``readme_table``) and checked by ``test_readme_table_is_generated_from_the_tests``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.checkpoints.families import assert_matches, peft_adapter, peft_merged_state, reference, run_spectrum, state

# family -> (bases, adapter formats, test functions that cover the row)
FAMILIES: list[tuple[str, str, str, tuple[str, ...]]] = []


def covers(family: str, base: str, adapters: str):
    """Register a test as covering one row of the README table."""
    def deco(fn):
        for i, (f, b, a, tests) in enumerate(FAMILIES):
            if (f, b, a) == (family, base, adapters):
                FAMILIES[i] = (f, b, a, tests + (fn.__name__,))
                break
        else:
            FAMILIES.append((family, base, adapters, (fn.__name__,)))
        return fn
    return deco


# ---- encoders (the intruder paper: RoBERTa, DeBERTa-v2; LoRA-BERT) ------------------------------------------
def _encoder(kind: str):
    from transformers import (BertConfig, BertForMaskedLM, BertForSequenceClassification, DebertaV2Config,
                              DebertaV2ForMaskedLM, DebertaV2ForSequenceClassification, RobertaConfig,
                              RobertaForMaskedLM, RobertaForSequenceClassification)

    common = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                  max_position_embeddings=40)
    return {"roberta": (RobertaConfig(**common), RobertaForMaskedLM, RobertaForSequenceClassification,
                        ["query", "value"]),
            "deberta-v2": (DebertaV2Config(**common), DebertaV2ForMaskedLM, DebertaV2ForSequenceClassification,
                           ["query_proj", "value_proj", "dense"]),
            "bert": (BertConfig(**common), BertForMaskedLM, BertForSequenceClassification,
                     ["query", "value", "dense"])}[kind]


@covers("encoders (intruder paper; LoRA-BERT)", "RoBERTa, DeBERTa-v2, BERT (masked-LM folders)",
        "PEFT LoRA on query/value/dense (RoBERTa r=1, alpha=2 on query/value: the paper's setting); "
        "classifier heads in modules_to_save reported as new modules, not audited")
@pytest.mark.parametrize("kind", ["roberta", "deberta-v2", "bert"])
def test_encoders(kind, tmp_path):
    cfg, masked_lm, seq_cls, targets = _encoder(kind)
    torch.manual_seed(0)
    masked_lm(cfg).save_pretrained(tmp_path / "base")
    r, alpha = (1, 2) if kind == "roberta" else (2, 4)
    head = lambda: seq_cls.from_pretrained(tmp_path / "base", num_labels=3)  # noqa: E731
    adapter = peft_adapter(head(), tmp_path / "adapter", r=r, lora_alpha=alpha, target_modules=targets,
                           task_type="SEQ_CLS")
    base_w = state(masked_lm.from_pretrained(tmp_path / "base"))
    tuned_w = peft_merged_state(head(), adapter)
    ref = reference(base_w, tuned_w)
    assert ref and all(any(t in n for t in targets) for n in ref)
    out = run_spectrum(tmp_path / "base", adapter, tmp_path / "s.json")
    res = out["results"][0]
    assert_matches(res, ref)
    assert any(n.startswith("classifier.") for n in res["info"]["new_modules"])  # the task head: new, not audited
    assert res["info"]["format"] == "peft_lora" and "transformers folder" in res["info"]["base_format"]
    assert "new heads" in out["_summary"]


# ---- encoder-decoder (S2-LoRA on Whisper; T5) ------------------------------------------------------------
def _seq2seq(kind: str):
    from transformers import T5Config, T5ForConditionalGeneration, WhisperConfig, WhisperForConditionalGeneration

    if kind == "whisper":
        cfg = WhisperConfig(vocab_size=100, num_mel_bins=8, d_model=32, encoder_layers=2, decoder_layers=2,
                            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=48,
                            decoder_ffn_dim=48, max_source_positions=16, max_target_positions=16,
                            decoder_start_token_id=1, pad_token_id=0)
        return WhisperForConditionalGeneration(cfg), WhisperForConditionalGeneration, ["q_proj", "v_proj", "conv1"]
    cfg = T5Config(vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4,
                   decoder_start_token_id=0)
    return T5ForConditionalGeneration(cfg), T5ForConditionalGeneration, ["q", "v"]


@covers("encoder-decoder (S2-LoRA on Whisper; T5)", "Whisper, T5",
        "PEFT LoRA on encoder and decoder attention (self and cross), Whisper's Conv1d front-end (analysed as "
        "out x in*k); names keep their stack")
@pytest.mark.parametrize("kind", ["whisper", "t5"])
def test_encoder_decoder(kind, tmp_path):
    torch.manual_seed(0)
    model, cls, targets = _seq2seq(kind)
    model.save_pretrained(tmp_path / "base")
    adapter = peft_adapter(cls.from_pretrained(tmp_path / "base"), tmp_path / "adapter", r=2, lora_alpha=4,
                           target_modules=targets)
    ref = reference(state(cls.from_pretrained(tmp_path / "base")),
                    peft_merged_state(cls.from_pretrained(tmp_path / "base"), adapter))
    out = run_spectrum(tmp_path / "base", adapter, tmp_path / "s.json")
    got = assert_matches(out["results"][0], ref)
    stacks = {n.split(".")[0 if kind == "t5" else 1] for n in got}
    assert stacks == {"encoder", "decoder"}  # base names, which keep the stack
    cross = "encoder_attn" if kind == "whisper" else "EncDecAttention"
    assert any(cross in n for n in got)
    if kind == "whisper":
        conv = got["model.encoder.conv1.weight"]
        assert conv["kind"] == "conv" and conv["reshaped_from"] == [32, 8, 3] and conv["shape"] == [32, 24]


# ---- vision (LoRA3D, ViT adapters) -----------------------------------------------------------------------
def _vision(kind: str):
    from transformers import CLIPVisionConfig, CLIPVisionModel, ViTConfig, ViTModel

    if kind == "vit":
        cfg = ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                        image_size=16, patch_size=4, num_channels=3)
        return ViTModel(cfg, add_pooling_layer=False), lambda p: ViTModel.from_pretrained(p, add_pooling_layer=False), \
            ["query", "value", "projection"], "embeddings.patch_embeddings.projection.weight"
    cfg = CLIPVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                           image_size=16, patch_size=4, projection_dim=16)
    return CLIPVisionModel(cfg), CLIPVisionModel.from_pretrained, ["q_proj", "v_proj", "patch_embedding"], \
        "embeddings.patch_embedding.weight"


@covers("vision (LoRA3D, ViT adapters)", "ViT, CLIP vision tower",
        "PEFT LoRA on attention and on the conv patch embedding (out x in*kh*kw, stated in the JSON)")
@pytest.mark.parametrize("kind", ["vit", "clip"])
def test_vision(kind, tmp_path):
    torch.manual_seed(0)
    model, load, targets, patch = _vision(kind)
    model.save_pretrained(tmp_path / "base")
    adapter = peft_adapter(load(tmp_path / "base"), tmp_path / "adapter", r=2, lora_alpha=4, target_modules=targets)
    ref = reference(state(load(tmp_path / "base")), peft_merged_state(load(tmp_path / "base"), adapter))
    out = run_spectrum(tmp_path / "base", adapter, tmp_path / "s.json")
    got = assert_matches(out["results"][0], ref)
    assert got[patch]["kind"] == "conv" and got[patch]["reshaped_from"] == [32, 3, 4, 4]
    assert got[patch]["shape"] == [32, 48] and any("conv kernels" in w for w in out["warnings"])


# ---- diffusion (LoRA-Composer, distillation LoRAs) ------------------------------------------------------
def _unet(folder):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel.from_pretrained(folder)


UNET_ATTN = "down_blocks.0.attentions.0.transformer_blocks.0.attn1"


@covers("diffusion (LoRA-Composer, distillation LoRAs)", "diffusers UNet folder",
        "PEFT LoRA on attention, 1x1 proj_in and 3x3 resnet convs (conv kernels out x in*kh*kw)")
def test_diffusers_unet_folder_peft(tmp_path):
    torch.manual_seed(0)
    from tests.checkpoints.families import tiny_unet

    tiny_unet().save_pretrained(tmp_path / "unet")
    adapter = peft_adapter(_unet(tmp_path / "unet"), tmp_path / "adapter", r=2, lora_alpha=4,
                           target_modules=["to_q", "to_v", "proj_in", "conv1"])
    ref = reference(state(_unet(tmp_path / "unet")), peft_merged_state(_unet(tmp_path / "unet"), adapter))
    out = run_spectrum(tmp_path / "unet", adapter, tmp_path / "s.json")
    got = assert_matches(out["results"][0], ref)
    assert got["down_blocks.0.resnets.0.conv1.weight"]["reshaped_from"] == [16, 16, 3, 3]
    assert got["down_blocks.0.attentions.0.proj_in.weight"]["shape"] == [16, 16]
    assert "diffusers folder (UNet2DConditionModel)" in out["results"][0]["info"]["base_format"]


def _kohya_targets(base_w: dict, modules: list[tuple[str, str, str]]):
    """kohya name -> (JSON name, stored weight) for ``modules``: (kohya prefix, module path as the
    trainer named it, the base's parameter)."""
    from tests.checkpoints.families import kohya_name

    return {kohya_name(prefix, path): (param, base_w[param]) for prefix, path, param in modules}


# (kohya prefix, module path in sd-scripts' model, parameter in the pipeline folder). sd-scripts named
# CLIPTextModel's modules "text_model.encoder..."; transformers 5 saves them without "text_model.".
SD_MODULES = [("lora_unet", f"{UNET_ATTN}.{m}", f"unet.{UNET_ATTN}.{m}.weight") for m in ("to_q", "to_out.0")] + [
    ("lora_unet", p, f"unet.{p}.weight") for p in (
        "down_blocks.0.attentions.0.proj_in", "down_blocks.0.resnets.0.conv1",
        "mid_block.attentions.0.transformer_blocks.0.attn2.to_k")] + [
    ("lora_te", f"text_model.{p}", f"text_encoder.{p}.weight") for p in (
        "encoder.layers.0.self_attn.q_proj", "encoder.layers.1.mlp.fc1")]


@covers("diffusion (LoRA-Composer, distillation LoRAs)", "diffusers pipeline folder (model_index.json)",
        "kohya/sd-scripts files (lora_unet_/lora_te_ keys, alpha scalars, LoCon 3x3 conv), written by the test")
def test_kohya_file_on_a_diffusers_pipeline(tmp_path):
    from tests.checkpoints.families import pipeline_state, tiny_pipeline, write_kohya

    base = tiny_pipeline(tmp_path / "pipe")
    base_w = pipeline_state(base)
    targets = _kohya_targets(base_w, SD_MODULES)
    assert {"lora_unet_down_blocks_0_attentions_0_proj_in",  # the real key layout
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj"} <= set(targets)
    alphas = {k: (1.0 if i % 2 else 4.0) for i, k in enumerate(targets)}
    merged = write_kohya(tmp_path / "lora.safetensors", targets, rank=4, alphas=alphas)
    ref = reference(base_w, {**base_w, **merged})
    out = run_spectrum(base, tmp_path / "lora.safetensors", tmp_path / "s.json")
    res = out["results"][0]
    got = assert_matches(res, ref)
    assert len(got) == len(SD_MODULES) and res["info"]["format"] == "kohya_lora"
    assert got["unet.down_blocks.0.resnets.0.conv1.weight"]["reshaped_from"] == [16, 16, 3, 3]
    assert res["info"]["base_format"].startswith("diffusers pipeline (text_encoder: transformers folder")
    # the same file against the UNet alone: the text-encoder modules are reported as skipped, with why
    out = run_spectrum(base / "unet", tmp_path / "lora.safetensors", tmp_path / "u.json")
    res = out["results"][0]
    assert len(res["matrices"]) == 5
    assert {s["name"] for s in res["info"]["skipped"]} == {k for k in targets if k.startswith("lora_te_")}
    assert all("holds no text_encoder" in s["why"] for s in res["info"]["skipped"])


@covers("diffusion (LoRA-Composer, distillation LoRAs)", "diffusers pipeline folder (model_index.json)",
        "diffusers LoRA files (save_lora_weights: unet./text_encoder. PEFT keys, r and alpha from "
        "lora_adapter_metadata)")
def test_diffusers_lora_file_on_a_pipeline(tmp_path):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin
    from transformers import CLIPTextModel

    from tests.checkpoints.families import peft_on, pipeline_state, tiny_pipeline

    base = tiny_pipeline(tmp_path / "pipe")
    unet, sd_u, cfg_u = peft_on(_unet(base / "unet"), r=2, lora_alpha=8, target_modules=["to_q", "to_k", "to_out.0"])
    te, sd_t, cfg_t = peft_on(CLIPTextModel.from_pretrained(base / "text_encoder"), seed=2, r=4, lora_alpha=4,
                              target_modules=["q_proj", "v_proj"])
    StableDiffusionLoraLoaderMixin.save_lora_weights(tmp_path / "lora", unet_lora_layers=sd_u,
                                                     text_encoder_lora_layers=sd_t, unet_lora_adapter_metadata=cfg_u,
                                                     text_encoder_lora_adapter_metadata=cfg_t)
    merged = {f"unet.{k}": v for k, v in state(unet.merge_and_unload()).items()}
    merged.update({f"text_encoder.{k}": v for k, v in state(te.merge_and_unload()).items()})
    ref = reference(pipeline_state(base), merged)
    out = run_spectrum(base, tmp_path / "lora", tmp_path / "s.json")
    res = out["results"][0]
    assert_matches(res, ref)
    assert res["info"]["format"] == "diffusers_lora" and res["info"]["components"]["unet"]["lora_alpha"] == 8
