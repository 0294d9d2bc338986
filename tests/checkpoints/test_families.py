"""Every model family and adapter format the LoRA literature uses, end to end through the CLI.

Each test builds a tiny base from a config (no download), writes the adapter in the listed format,
runs `lora-audit spectrum` and compares every matrix's intruder count and max|cos| (to 1e-4) with
the float64 two-SVD reference on weights merged independently (``tests.checkpoints.families``).
``FAMILIES`` lists what these tests cover; the table "What the tests cover, by family" of docs/formats.md
is generated from it (``readme_table``) and checked by ``test_readme_table_is_generated_from_the_tests``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.checkpoints.families import assert_matches, peft_adapter, peft_merged_state, reference, run_spectrum, state

@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread is faster (two threads spin-wait on a shared 2-core machine, measured
    0.99 s vs 0.002 s for one 32 x 576 SVD)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


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
    head = lambda: seq_cls.from_pretrained(tmp_path / "base", num_labels=3)
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
    pytest.importorskip("diffusers")  # builds the tiny bases (reading them needs no diffusers)
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
    pytest.importorskip("diffusers")  # builds the tiny bases (reading them needs no diffusers)
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
    assert "read as: base diffusers pipeline" in out["_summary"] and "kohya_lora" in out["_summary"]
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
    pytest.importorskip("diffusers")  # builds the tiny bases (reading them needs no diffusers)
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


def _dit(folder=None):
    from diffusers import SD3Transformer2DModel

    if folder is not None:
        return SD3Transformer2DModel.from_pretrained(folder)
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=16, caption_projection_dim=16,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16)


@covers("diffusion (LoRA-Composer, distillation LoRAs)", "diffusers DiT / transformer folder (SD3)",
        "PEFT LoRA folder; diffusers LoRA file (transformer. keys)")
def test_dit_transformer_folder(tmp_path):
    pytest.importorskip("diffusers")  # builds the tiny bases (reading them needs no diffusers)
    from diffusers.loaders import SD3LoraLoaderMixin

    from tests.checkpoints.families import peft_on

    torch.manual_seed(0)
    _dit().save_pretrained(tmp_path / "transformer")
    targets = ["to_q", "to_k", "to_v", "add_q_proj", "proj"]  # proj: the conv patch embedding (pos_embed.proj)
    adapter = peft_adapter(_dit(tmp_path / "transformer"), tmp_path / "adapter", r=2, lora_alpha=4,
                           target_modules=targets)
    base_w = state(_dit(tmp_path / "transformer"))
    ref = reference(base_w, peft_merged_state(_dit(tmp_path / "transformer"), adapter))
    assert "pos_embed.proj.weight" in ref
    pm, sd, cfg = peft_on(_dit(tmp_path / "transformer"), seed=4, r=4, lora_alpha=2, target_modules=targets[:3])
    SD3LoraLoaderMixin.save_lora_weights(tmp_path / "lora", transformer_lora_layers=sd,
                                         transformer_lora_adapter_metadata=cfg)
    ref_file = reference(base_w, state(pm.merge_and_unload()))
    out = run_spectrum(tmp_path / "transformer", [adapter, tmp_path / "lora"], tmp_path / "s.json")
    assert_matches(out["results"][0], ref)
    assert_matches(out["results"][1], ref_file)
    assert out["results"][1]["info"]["format"] == "diffusers_lora"


SDXL_MODULES = [("lora_unet", p, f"model.diffusion_model.{p}.weight") for p in (
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q", "input_blocks.1.0.in_layers.2", "middle_block.1.proj_out",
    "input_blocks.1.1.transformer_blocks.0.attn2.to_k")] + [
    ("lora_te1", "text_model.encoder.layers.0.self_attn.q_proj",
     "conditioner.embedders.0.transformer.encoder.layers.0.self_attn.q_proj.weight")]


@covers("diffusion (LoRA-Composer, distillation LoRAs)", "single-file checkpoint (original SD/SDXL layout)",
        "kohya/sd-scripts SDXL files (lora_unet_input_blocks_..., lora_te1_...), written by the test; "
        "diffusers-named kohya keys refused with the layout named")
def test_kohya_file_on_a_single_file_checkpoint(tmp_path):
    from click.testing import CliRunner

    from lora_audit.cli import cli
    from tests.checkpoints.families import single_file_sdxl, write_kohya

    base_w = single_file_sdxl(tmp_path / "sdxl.safetensors")
    targets = _kohya_targets(base_w, SDXL_MODULES)
    assert "lora_unet_input_blocks_1_0_in_layers_2" in targets
    merged = write_kohya(tmp_path / "lora.safetensors", targets, rank=2, alphas={k: 1.0 for k in targets})
    ref = reference(base_w, {**base_w, **merged})
    out = run_spectrum(tmp_path / "sdxl.safetensors", tmp_path / "lora.safetensors", tmp_path / "s.json")
    res = out["results"][0]
    assert_matches(res, ref)
    assert res["info"]["base_format"] == "single-file Stable Diffusion checkpoint (text_encoder, unet, vae)"
    # an SD1-style file names diffusers modules: it cannot fit this layout, and the error says why
    sd1 = "lora_unet_down_blocks_0_attentions_0_proj_in"
    write_kohya(tmp_path / "sd1.safetensors", {sd1: ("x", torch.ones(16, 16))}, rank=2, alphas={sd1: 1.0})
    r = CliRunner().invoke(cli, ["spectrum", str(tmp_path / "sdxl.safetensors"), str(tmp_path / "sd1.safetensors")])
    assert r.exit_code == 1
    assert "lora_unet_down_blocks_0_attentions_0_proj_in" in r.output and "original SD layout" in r.output


# ---- mixture of experts (LoRAMoE, MixLoRA, MoLA, X-LoRA) --------------------------------------------------
def _moe(kind: str):
    from transformers import MixtralConfig, MixtralForCausalLM, Qwen2MoeConfig, Qwen2MoeForCausalLM

    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=32)
    if kind == "mixtral":
        return MixtralForCausalLM(MixtralConfig(intermediate_size=24, num_local_experts=3, num_experts_per_tok=2,
                                                **common)), MixtralForCausalLM
    if kind == "gpt_oss":  # experts stored (experts x in x out), with bias stacks
        from transformers import GptOssConfig, GptOssForCausalLM

        return GptOssForCausalLM(GptOssConfig(intermediate_size=24, num_local_experts=3, num_experts_per_tok=2,
                                              head_dim=8, sliding_window=8, **common)), GptOssForCausalLM
    return Qwen2MoeForCausalLM(Qwen2MoeConfig(moe_intermediate_size=24, shared_expert_intermediate_size=40,
                                              num_experts=3, num_experts_per_tok=2, intermediate_size=40,
                                              **common)), Qwen2MoeForCausalLM


def _fused_on_disk(model, folder: Path) -> Path:
    """The model's weights as it holds them (3-D expert stacks), as Llama-4 / gpt-oss style checkpoints
    store them on disk (transformers itself saves Mixtral per expert)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    model.config.save_pretrained(folder)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"
               or not model.config.tie_word_embeddings}, str(folder / "model.safetensors"))
    return folder


@covers("mixture of experts (LoRAMoE, MixLoRA, MoLA, X-LoRA)",
        "Mixtral, Qwen2-MoE, gpt-oss: per-expert files (transformers' save) and fused 3-D expert stacks "
        "(experts x out x in, or x in x out)",
        "PEFT LoRA on fused experts (target_parameters): one matrix per expert, name[e]; similarity of the "
        "experts' updates")
@pytest.mark.parametrize("kind, on_disk", [("mixtral", "per_expert"), ("mixtral", "fused"), ("qwen2_moe", "fused"),
                                           ("gpt_oss", "fused")])
def test_moe_lora_on_fused_experts(kind, on_disk, tmp_path):
    from tests.checkpoints.families import expand_experts

    torch.manual_seed(0)
    model, cls = _moe(kind)
    model.save_pretrained(tmp_path / "saved")  # per expert on disk
    base = tmp_path / "saved" if on_disk == "per_expert" or kind == "gpt_oss" else _fused_on_disk(model,
                                                                                                  tmp_path / "fused")
    adapter = peft_adapter(cls.from_pretrained(tmp_path / "saved"), tmp_path / "adapter", r=2, lora_alpha=4,
                           target_modules=["q_proj"], target_parameters=["mlp.experts.gate_up_proj",
                                                                         "mlp.experts.down_proj"])
    transposed = kind == "gpt_oss"  # (experts, in, out): each expert's (out x in) matrix is its transpose
    base_w = expand_experts(state(cls.from_pretrained(tmp_path / "saved")), transposed)
    ref = reference(base_w, expand_experts(peft_merged_state(cls.from_pretrained(tmp_path / "saved"), adapter),
                                           transposed), skip=lambda n: "embed" in n or "lm_head" in n or "bias" in n)
    assert "model.layers.0.mlp.experts.down_proj[2]" in ref
    out = run_spectrum(base, adapter, tmp_path / "s.json")
    res = out["results"][0]
    got = assert_matches(res, ref)
    assert not [f for f in res["findings"] if f["rule"] in ("LA023", "LA024")]  # r x experts rows: no rank mismatch
    m = got["model.layers.0.mlp.experts.gate_up_proj[1]"]
    assert m["kind"] == "expert" and m["expert"] == 1 and m["module"] == "gate_up_proj"
    sim = res["info"]["expert_similarity"]["model.layers.0.mlp.experts.down_proj"]
    assert sim["experts"] == [0, 1, 2] and sim["update_cos"][1][1] == pytest.approx(1.0)
    assert any("read through transformers" in w for w in out["warnings"]) == (on_disk == "per_expert")


@covers("mixture of experts (LoRAMoE, MixLoRA, MoLA, X-LoRA)", "Mixtral, per-expert files (transformers' save)",
        "PEFT LoRA on per-expert modules (experts.<e>.w1/w2/w3, written by the test)")
def test_moe_lora_on_per_expert_modules(tmp_path):
    from safetensors.torch import load_file

    from tests.checkpoints.families import hand_lora, update_cos

    torch.manual_seed(0)
    _moe("mixtral")[0].save_pretrained(tmp_path / "base")
    base_w = load_file(str(tmp_path / "base" / "model.safetensors"))
    mods = {f"model.layers.0.block_sparse_moe.experts.{e}.{w}": f"model.layers.0.block_sparse_moe.experts.{e}.{w}"
            ".weight" for e in range(3) for w in ("w1", "w2", "w3")}
    merged = hand_lora(tmp_path / "adapter" / "adapter_model.safetensors", base_w, mods, r=2, alpha=4,
                       config={"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["w1", "w2", "w3"]})
    ref = reference(base_w, {**base_w, **merged})
    out = run_spectrum(tmp_path / "base", tmp_path / "adapter", tmp_path / "s.json")
    res = out["results"][0]
    assert_matches(res, ref)
    sim = res["info"]["expert_similarity"]["model.layers.0.block_sparse_moe.experts.*.w2.weight"]
    p = "model.layers.0.block_sparse_moe.experts.{}.w2.weight"
    want = update_cos([merged[p.format(e)] - base_w[p.format(e)].double() for e in range(3)])
    assert sim["experts"] == [0, 1, 2]
    assert torch.allclose(torch.tensor(sim["update_cos"]), torch.tensor(want, dtype=torch.float32), atol=1e-5)


@covers("mixture of experts (LoRAMoE, MixLoRA, MoLA, X-LoRA)", "Llama (dense MLP, LoRA experts on it)",
        "MixLoRA sets (mixlora.layers.<i>.experts.<e>.<proj> + router, written by the test): one result per "
        "expert (<path>#expert<e>) and the shared attention LoRA (#shared), each expert's similarity to the others")
def test_mixlora_set(tiny_llama, tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.checkpoints.families import lora_factors, update_cos

    base_w = load_file(str(tiny_llama / "model.safetensors"))
    key = lambda module, part: f"{module}.{part}.weight"
    shared = {f"mixlora.layers.{i}.self_attn.{p}": f"model.layers.{i}.self_attn.{p}.weight"
              for i in (0, 1) for p in ("q_proj", "v_proj")}
    tensors, merged = {}, {"shared": None}
    tensors_s, merged["shared"] = lora_factors(base_w, shared, r=2, alpha=4, prefix="", key=key)
    tensors.update(tensors_s)
    for e in range(3):
        mods = {f"mixlora.layers.{i}.experts.{e}.{p}": f"model.layers.{i}.mlp.{p}.weight"
                for i in (0, 1) for p in ("gate_proj", "up_proj", "down_proj")}
        t, merged[f"expert{e}"] = lora_factors(base_w, mods, r=4, alpha=2, prefix="", key=key, seed=10 + e)
        tensors.update(t)
    tensors.update({f"mixlora.layers.{i}.gate.weight": torch.randn(3, 64) for i in (0, 1)})
    folder = tmp_path / "mixlora"
    folder.mkdir()
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "MIXLORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "lora_dropout": 0.05,
        "target_modules": ["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"], "routing_strategy": "mixtral",
        "num_experts": 3, "top_k": 2, "expert_lora": {"r": 4, "lora_alpha": 2, "lora_dropout": 0.05}}))
    out = run_spectrum(tiny_llama, folder, tmp_path / "s.json")
    labels = [r["tuned"] for r in out["results"]]
    assert labels == [f"{folder}#shared"] + [f"{folder}#expert{e}" for e in range(3)]
    for res, member in zip(out["results"], ["shared", "expert0", "expert1", "expert2"], strict=True):
        assert_matches(res, reference(base_w, {**base_w, **merged[member]}))
        assert res["info"]["adapter_set"]["router"]["num_experts"] == 3
    p = "model.layers.1.mlp.down_proj.weight"
    want = update_cos([merged[f"expert{e}"][p] - base_w[p].double() for e in range(3)])
    row = out["results"][2]["info"]["update_similarity"][p]
    assert row["to"] == ["expert0", "expert1", "expert2"] and row["update_cos"] == pytest.approx(want[1], abs=1e-5)


@covers("mixture of experts (LoRAMoE, MixLoRA, MoLA, X-LoRA)", "Llama (dense MLP, LoRA experts on it)",
        "X-LoRA sets (peft XLoraConfig, one PEFT LoRA folder per expert, classifier weights): one result per "
        "expert")
def test_xlora_set(tiny_llama, tmp_path):
    from peft import XLoraConfig
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    from tests.helpers import make_peft_adapter

    folder = tmp_path / "xlora"
    experts = {"math": 1, "code": 2}
    for name, seed in experts.items():
        make_peft_adapter(tiny_llama, folder / name, seed=seed, r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=64, adapters={n: n for n in experts}).to_dict()
    (folder / "adapter_config.json").write_text(json.dumps({k: (v.value if hasattr(v, "value") else v)
                                                            for k, v in cfg.items()}, default=list))
    save_file({"base_model.internal_xlora_classifier.layers.weight": torch.randn(2, 64)},
              str(folder / "adapter_model.safetensors"))
    out = run_spectrum(tiny_llama, folder, tmp_path / "s.json")
    assert [r["tuned"] for r in out["results"]] == [f"{folder}#math", f"{folder}#code"]
    base_w = state(AutoModelForCausalLM.from_pretrained(tiny_llama))
    for res, name in zip(out["results"], experts, strict=True):
        tuned_w = peft_merged_state(AutoModelForCausalLM.from_pretrained(tiny_llama), folder / name)
        assert_matches(res, reference(base_w, tuned_w, skip=lambda n: "embed" in n or "lm_head" in n))
        assert res["info"]["adapter_set"]["format"] == "xlora"
        assert res["info"]["adapter_set"]["router"]["classifier_tensors"] == 1
    assert out["results"][0]["info"]["update_similarity"]["model.layers.0.mlp.down_proj.weight"]["to"] == ["math",
                                                                                                           "code"]


# ---- quantised bases (LQ-LoRA, L4Q, QLoRA) ----------------------------------------------------------------
QUANTS = {"nf4": dict(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
          "fp4-double-quant": dict(load_in_4bit=True, bnb_4bit_quant_type="fp4", bnb_4bit_use_double_quant=True),
          "int8": dict(load_in_8bit=True), "fp8": None}


@covers("quantised bases (LQ-LoRA, L4Q, QLoRA)",
        "bitsandbytes NF4, FP4 (double quantisation) and int8 folders saved by transformers; FP8 with block "
        "scales (quant_method fp8)",
        "PEFT LoRA (QLoRA); weights dequantised for the audit, each matrix's quantisation error bound in the "
        "JSON (dequantization)")
@pytest.mark.parametrize("quant", list(QUANTS))
def test_quantised_base(quant, tiny_llama, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from tests.checkpoints.families import bnb4_reference, fp8_folder
    from tests.helpers import make_peft_adapter

    if QUANTS[quant] is not None:
        pytest.importorskip("bitsandbytes")  # transformers quantises with it (reading needs no bitsandbytes)
    qdir = tmp_path / "q"
    if QUANTS[quant] is None:
        fp8_folder(tiny_llama, qdir)
    else:
        AutoModelForCausalLM.from_pretrained(tiny_llama, quantization_config=BitsAndBytesConfig(**QUANTS[quant]),
                                             device_map="cpu").save_pretrained(qdir)

    def dequantised():  # transformers' dequantisation (FP8 on load, int8 by bitsandbytes), 4-bit by hand
        m = AutoModelForCausalLM.from_pretrained(qdir, device_map="cpu", dtype=torch.float32)
        m = m.dequantize() if QUANTS[quant] is not None else m
        if quant in ("nf4", "fp4-double-quant"):
            with torch.no_grad():
                for name, w in bnb4_reference(qdir).items():
                    m.get_parameter(name).copy_(w)
        return m

    adapter = make_peft_adapter(tiny_llama, tmp_path / "adapter", r=2, target_modules=["q_proj", "v_proj", "down_proj"])
    base_w = state(dequantised())
    ref = reference(base_w, peft_merged_state(dequantised(), adapter), skip=lambda n: "embed" in n or "lm_head" in n)
    out = run_spectrum(qdir, adapter, tmp_path / "s.json")
    res = out["results"][0]
    got = assert_matches(res, ref)
    assert "quantised: " + ("fp8" if quant == "fp8" else "bitsandbytes") in res["info"]["base_format"]
    original = load_file(str(tiny_llama / "model.safetensors"))  # the float weights before quantisation
    for name, m in got.items():
        d = m["dequantization"]
        err = original[name].double() - base_w[name].double()  # what quantisation did to this matrix
        assert float(err.abs().max()) <= d["error_max_abs_bound"] * (1 + 1e-6), name
        assert float(err.norm()) <= d["error_fro_bound"] * (1 + 1e-6), name
        assert 0 < d["error_fro_expected"] <= d["error_fro_bound"]


# ---- pruned bases (LoRAPrune, LoRAM) ---------------------------------------------------------------------
@covers("pruned bases (LoRAPrune, LoRAM)", "bases pruned with masks (torch.nn.utils.prune: weight_orig x weight_mask)",
        "PEFT LoRA trained on the masked base")
def test_masked_base(tiny_llama, tmp_path):
    import shutil

    from safetensors.torch import save_file
    from torch.nn.utils import prune
    from transformers import AutoModelForCausalLM

    from tests.helpers import make_peft_adapter

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    for i in (0, 1):
        for mod in (model.model.layers[i].self_attn.q_proj, model.model.layers[i].mlp.down_proj):
            prune.l1_unstructured(mod, "weight", amount=0.3)
    base = tmp_path / "pruned"
    base.mkdir()
    shutil.copy(tiny_llama / "config.json", base)
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    assert "model.layers.0.self_attn.q_proj.weight_mask" in sd and "model.layers.0.self_attn.q_proj.weight" not in sd
    save_file(sd, str(base / "model.safetensors"))
    adapter = make_peft_adapter(tiny_llama, tmp_path / "adapter", r=2, target_modules=["q_proj", "down_proj"])
    for mod in model.modules():  # the masked weights, made permanent: the base the adapter applies to
        if prune.is_pruned(mod) and hasattr(mod, "weight_mask"):
            prune.remove(mod, "weight")
    base_w = state(model)
    fresh = AutoModelForCausalLM.from_pretrained(tiny_llama)
    fresh.load_state_dict(base_w)
    ref = reference(base_w, peft_merged_state(fresh, adapter), skip=lambda n: "embed" in n or "lm_head" in n)
    out = run_spectrum(base, adapter, tmp_path / "s.json")
    got = assert_matches(out["results"][0], ref)
    assert any("weight_orig x weight_mask" in note for note in got["model.layers.0.self_attn.q_proj.weight"]["notes"])
    assert "pruning masks" in out["results"][0]["info"]["base_format"]


def _structurally_pruned(full: Path, out: Path, keep: torch.Tensor) -> Path:
    """``full`` with the MLP's intermediate channels ``keep`` only (rows of gate/up, columns of down),
    as LoRAPrune / LoRAM prune structurally."""
    import shutil

    from safetensors.torch import load_file, save_file

    out.mkdir()
    cfg = json.loads((full / "config.json").read_text())
    cfg["intermediate_size"] = len(keep)
    (out / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(full / "model.safetensors"))
    for k in list(sd):
        if k.endswith(("gate_proj.weight", "up_proj.weight")):
            sd[k] = sd[k][keep].contiguous()
        elif k.endswith("down_proj.weight"):
            sd[k] = sd[k][:, keep].contiguous()
    save_file(sd, str(out / "model.safetensors"))
    for f in full.glob("tokenizer*"):
        shutil.copy(f, out)
    return out


@covers("pruned bases (LoRAPrune, LoRAM)", "structurally pruned bases (fewer MLP channels) and the full base",
        "adapters trained on the pruned base: audited on it; on the full base a clear error naming the mismatch; "
        "recovered to the full shape (LoRAM, zeros at pruned channels): audited on the full base")
def test_adapter_of_a_structurally_pruned_base(tiny_llama, tmp_path):
    from click.testing import CliRunner
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from lora_audit.cli import cli
    from tests.helpers import make_peft_adapter

    keep = torch.sort(torch.randperm(96, generator=torch.Generator().manual_seed(0))[:64]).values
    pruned = _structurally_pruned(tiny_llama, tmp_path / "pruned", keep)
    adapter = make_peft_adapter(pruned, tmp_path / "adapter", r=2, target_modules=["q_proj", "up_proj", "down_proj"])
    load = AutoModelForCausalLM.from_pretrained
    skip = lambda n: "embed" in n or "lm_head" in n
    out = run_spectrum(pruned, adapter, tmp_path / "p.json")
    assert_matches(out["results"][0], reference(state(load(pruned)), peft_merged_state(load(pruned), adapter),
                                                skip=skip))
    r = CliRunner().invoke(cli, ["spectrum", str(tiny_llama), str(adapter)])
    assert r.exit_code == 1
    assert "model.layers.0.mlp.up_proj: adapter 64x64, base 96x64" in r.output and "structurally pruned" in r.output
    # LoRAM's recovery: the factors padded with zeros at the pruned channels fit the full base
    recovered = tmp_path / "recovered"
    recovered.mkdir()
    (recovered / "adapter_config.json").write_text((adapter / "adapter_config.json").read_text())
    sd = load_file(str(adapter / "adapter_model.safetensors"))
    for k in list(sd):
        if "up_proj.lora_B" in k:
            full = torch.zeros(96, sd[k].shape[1])
            full[keep] = sd[k]
            sd[k] = full
        elif "down_proj.lora_A" in k:
            full = torch.zeros(sd[k].shape[0], 96)
            full[:, keep] = sd[k]
            sd[k] = full
    save_file(sd, str(recovered / "adapter_model.safetensors"))
    out = run_spectrum(tiny_llama, recovered, tmp_path / "r.json")
    assert_matches(out["results"][0], reference(state(load(tiny_llama)), peft_merged_state(load(tiny_llama), recovered),
                                                skip=skip))


# ---- report and audit work for every family ---------------------------------------------------------------
def test_audit_runs_the_weight_side_and_says_the_behavioural_side_does_not_apply(tmp_path):
    """`audit` on an encoder (the intruder paper's RoBERTa, r=1, alpha=2) and on a diffusion pipeline with a
    kohya file: spectrum.json and the report are written, safety.json is not, and the output says why."""
    pytest.importorskip("diffusers")
    from click.testing import CliRunner
    from transformers import RobertaForMaskedLM, RobertaForSequenceClassification

    from lora_audit.cli import cli
    from tests.checkpoints.families import pipeline_state, tiny_pipeline, write_kohya

    cfg = _encoder("roberta")[0]
    torch.manual_seed(0)
    RobertaForMaskedLM(cfg).save_pretrained(tmp_path / "roberta")
    adapter = peft_adapter(RobertaForSequenceClassification.from_pretrained(tmp_path / "roberta", num_labels=3),
                           tmp_path / "adapter", r=1, lora_alpha=2, target_modules=["query", "value"],
                           task_type="SEQ_CLS")
    pipe = tiny_pipeline(tmp_path / "pipe")
    targets = _kohya_targets(pipeline_state(pipe), SD_MODULES)
    write_kohya(tmp_path / "lora.safetensors", targets, rank=2, alphas={k: 1.0 for k in targets})
    for base, tuned, why in ((tmp_path / "roberta", adapter, "RobertaForMaskedLM, not a causal language model"),
                             (pipe, tmp_path / "lora.safetensors", "diffusers pipeline")):
        out = tmp_path / f"audit-{base.name}"
        r = CliRunner().invoke(cli, ["audit", str(base), str(tuned), "--out", str(out), "--no-cache", "-q"])
        assert r.exit_code == 0, r.output
        assert "Behavioural side (safety-eval): does not apply" in r.output and why in r.output
        assert {"spectrum.json", "index.html"} <= {p.name for p in out.iterdir()}
        assert not (out / "safety.json").exists()
        spectrum = json.loads((out / "spectrum.json").read_text())
        assert any("does not apply" in w for w in spectrum["warnings"])
        r = CliRunner().invoke(cli, ["report", str(out / "spectrum.json"), "--out", str(tmp_path / f"{base.name}.md")])
        assert r.exit_code == 0, r.output
        md = (tmp_path / f"{base.name}.md").read_text()
        assert md.startswith("# lora-audit report") and tuned.name in md


# ---- docs/formats.md's table of inputs, generated from what the tests cover -------------------------------------
# Rows covered by other test files: (family, base, tuned, "file::test", ...).
OTHER_ROWS = [
    ("decoder-only causal LMs", "Llama, GPT-2 (Conv1D weights analysed transposed): Hugging Face folders, single "
     "or sharded safetensors, bf16", "PEFT LoRA, rsLoRA, rank_pattern/alpha_pattern, DoRA, fan_in_fan_out, "
     "embedding LoRA, modules_to_save; dense fine-tunes; kohya files with dotted keys",
     ("tests/checkpoints/test_stream.py::test_adapter_deltas_equal_peft_merge",
      "tests/checkpoints/test_stream.py::test_rank_pattern_and_rslora_scales",
      "tests/checkpoints/test_stream.py::test_gpt2_conv1d_adapter_is_analysed_out_by_in",
      "tests/checkpoints/test_stream.py::test_embedding_lora_and_modules_to_save",
      "tests/checkpoints/test_stream.py::test_dense_tuned_bf16_and_sharded",
      "tests/checkpoints/test_stream.py::test_kohya_lora_file")),
    ("decoder-only causal LMs", "GGUF file (dequantised by transformers)", "PEFT LoRA",
     ("tests/checkpoints/test_models.py::test_gguf_base_in_spectrum_and_safety_eval",)),
    ("any", "hub id (org/name, resolved with huggingface_hub when online)", "the same kinds, by hub id",
     ("tests/checkpoints/test_models.py::test_hub_adapter_is_an_adapter",
      "tests/checkpoints/test_stream.py::test_offline_hub_id_is_a_clear_error")),
    ("any", "folder with only pytorch_model.bin", "refused unless --allow-pickle (torch.load(weights_only=True))",
     ("tests/checkpoints/test_stream.py::test_pickle_refused_unless_asked",)),
]
README_START = ("<!-- inputs table: generated from tests/checkpoints/test_families.py "
                "(python -m tests.checkpoints.test_families) -->")
README_END = "<!-- end of generated inputs table -->"


def readme_table() -> str:
    """The "What it reads" table: one row per (family, base, adapters) a test covers, naming the tests."""
    here = "tests/checkpoints/test_families.py"
    rows = [(f, b, a, tuple(f"{here}::{t}" for t in tests)) for f, b, a, tests in FAMILIES] + OTHER_ROWS
    lines = [README_START, "", "| family | BASE | TUNED (adapters, formats) | tested by |", "|---|---|---|---|"]
    def cell(text: str) -> str:  # Markdown: no emphasis from "*", no HTML from "<", no column from "|"
        return text.replace("*", "\\*").replace("<", "&lt;").replace("|", "\\|")

    for family, base, tuned, tests in rows:
        names = ", ".join(f"`{t.split('::')[1]}`" for t in dict.fromkeys(tests))
        lines.append(f"| {cell(family)} | {cell(base)} | {cell(tuned)} | {names} |")
    return "\n".join(lines + ["", README_END])


def _readme() -> Path:
    """The page that holds the table (it was the README's once; the names stay)."""
    return Path(__file__).resolve().parents[2] / "docs" / "formats.md"


def write_readme_table() -> None:
    """Replace the generated table in docs/formats.md (between README_START and README_END)."""
    text = _readme().read_text(encoding="utf-8")
    start, end = text.index(README_START), text.index(README_END) + len(README_END)
    _readme().write_text(text[:start] + readme_table() + text[end:], encoding="utf-8")


def test_readme_table_is_generated_from_the_tests():
    """Every test the table names exists, and docs/formats.md holds exactly the generated table."""
    import importlib

    for *_, tests in [(f, b, a, tuple(f"tests/checkpoints/test_families.py::{t}" for t in ts))
                      for f, b, a, ts in FAMILIES] + OTHER_ROWS:
        for t in tests:
            path, name = t.split("::")
            module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
            assert callable(getattr(module, name, None)), t
    text = _readme().read_text(encoding="utf-8")
    assert readme_table() in text, "docs/formats.md's inputs table is stale: run python -m tests.checkpoints.test_families"


if __name__ == "__main__":
    write_readme_table()


@pytest.mark.parametrize("expert_lora, msg", [(["r", 4], "'expert_lora' must be a JSON object"),
                                              ({"r": "four"}, "field 'r' is")])
def test_mixlora_expert_lora_is_checked(tmp_path, expert_lora, msg):
    from safetensors.torch import save_file

    from lora_audit.checkpoints.adapter_sets import read_adapter_set
    from lora_audit.errors import FormatError

    folder = tmp_path / "mixlora"
    folder.mkdir()
    save_file({f"mixlora.layers.0.experts.0.up_proj.{p}.weight": torch.zeros(2, 2) for p in ("lora_A", "lora_B")},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "MIXLORA", "r": 2, "lora_alpha": 4, "num_experts": 1, "expert_lora": expert_lora}))
    with pytest.raises(FormatError, match=msg) as e:
        read_adapter_set(folder)
    assert str(folder / "adapter_config.json") in str(e.value)
