"""Adapters whose files say one thing and whose library loads another (issue 24, cases 6-9, 24, 25):
each audit is compared with the model the library itself builds, merged in float64 by peft
(``PeftModel.from_pretrained`` + ``merge_and_unload``) or diffusers (``load_lora_adapter`` +
``fuse_lora``), never with lora-audit's own output."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from lora_audit.cli import cli
from tests.checkpoints.families import (assert_matches, peft_adapter, peft_merged_state, reference, run_spectrum,
                                        state)
from tests.helpers import make_peft_adapter, make_tiny_llama
from tests.spectral.reference import reference_audit


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("peft_load") / "base", tokenizer=False)


def _edit(folder: Path, drop=(), **fields) -> Path:
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    for k in drop:
        cfg.pop(k, None)
    cfg.update(fields)
    p.write_text(json.dumps(cfg))
    return folder


def _findings(res: dict, rule: str) -> list[dict]:
    return [f for f in res["findings"] if f["rule"] == rule]


# ---- 6: target_modules absent, or not selecting every module with weights --------------------------------
def test_absent_target_modules_are_peft_defaults(base, tmp_path):
    ad = make_peft_adapter(base, tmp_path / "a", target_modules=["q_proj", "k_proj", "v_proj"])
    _edit(ad, drop=["target_modules"])  # PEFT then applies its Llama default: q_proj, v_proj
    ref = reference_audit(base, ad)
    assert ref and {n.split(".")[-2] for n in ref} == {"q_proj", "v_proj"}
    res = run_spectrum(base, ad, tmp_path / "s.json")["results"][0]
    assert_matches(res, ref)
    skipped = {s["name"]: s["why"] for s in res["info"]["skipped"]}
    assert set(skipped) == {f"model.layers.{i}.self_attn.k_proj" for i in (0, 1)}
    assert all("PEFT's default target_modules for llama" in w and "ignores these weights" in w
               for w in skipped.values())
    found = _findings(res, "LA024")
    assert [f["level"] for f in found] == ["note", "warning"]
    assert "PEFT applies its default for the base's model type 'llama', [\"q_proj\", \"v_proj\"]" in found[0]["message"]
    assert "PEFT ignores them" in found[1]["message"] and found[1]["detail"]["modules"] == sorted(skipped)


def test_weights_target_modules_does_not_select_are_not_what_peft_runs(base, tmp_path):
    ad = _edit(make_peft_adapter(base, tmp_path / "a", target_modules=["q_proj", "v_proj"]),
               target_modules=["q_proj"])
    ref = reference_audit(base, ad)
    assert {n.split(".")[-2] for n in ref} == {"q_proj"}
    res = run_spectrum(base, ad, tmp_path / "s.json")["results"][0]
    assert_matches(res, ref)
    (f,) = _findings(res, "LA024")
    assert f["level"] == "warning" and "target_modules does not select" in f["message"]


def test_absent_target_modules_without_a_peft_default(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from lora_audit.checkpoints.structure import check_structure

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=1, n_head=4)).save_pretrained(
        tmp_path / "gpt2")
    ad = peft_adapter(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), tmp_path / "a", r=2,
                      target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    _edit(ad, drop=["target_modules"])  # gpt2's default is c_attn
    ref = reference(state(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2")),
                    peft_merged_state(GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), ad),
                    skip=lambda n: "wte" in n or "wpe" in n or "lm_head" in n)
    ref = {n: v for n, v in ref.items()}
    got = run_spectrum(tmp_path / "gpt2", ad, tmp_path / "s.json")["results"][0]
    assert {m["name"] for m in got["matrices"]} == set(ref) == {"transformer.h.0.attn.c_attn.weight"}
    cfg = json.loads((tmp_path / "gpt2" / "config.json").read_text())
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({**cfg, "model_type": "no-such-type"}))
    f = [f for f in check_structure(ad, base=tmp_path / "gpt2") if f.rule == "LA024"]
    assert [x.level for x in f] == ["warning"] and "PEFT refuses to load this adapter" in f[0].message


def test_default_targets_are_peft_s():
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    from lora_audit.checkpoints.adapters import PEFT_DEFAULT_TARGETS

    assert PEFT_DEFAULT_TARGETS == TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING


# ---- 7: DoRA as PEFT loads it ------------------------------------------------------------------------------
def _drop_magnitudes(ad: Path) -> Path:
    sd = load_file(str(ad / "adapter_model.safetensors"))
    save_file({k: v for k, v in sd.items() if "lora_magnitude_vector" not in k}, str(ad / "adapter_model.safetensors"))
    return ad


def test_dora_without_magnitude_starts_from_the_base_norms(base, tmp_path):
    ad = _drop_magnitudes(make_peft_adapter(base, tmp_path / "a", use_dora=True, target_modules=["q_proj", "v_proj"]))
    ref = reference_audit(base, ad)  # PEFT: magnitude = ||W0||_row, then DoRA's merge
    out = run_spectrum(base, ad, tmp_path / "s.json")
    got = assert_matches(out["results"][0], ref)
    from tests.spectral.reference import merged_weights

    b, m = merged_weights(base, ad)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert got[q]["delta_norm"] == pytest.approx(float((m[q] - b[q]).norm()), rel=1e-5)
    assert any("no lora_magnitude_vector" in w and "||W0||_row" in w for w in out["results"][0]["warnings"])


def test_magnitudes_without_use_dora_are_ignored_as_peft_does(base, tmp_path):
    ad = _edit(make_peft_adapter(base, tmp_path / "a", use_dora=True, target_modules=["q_proj"]), use_dora=False)
    ref = reference_audit(base, ad)  # PEFT: plain LoRA, the magnitudes are unexpected keys
    out = run_spectrum(base, ad, tmp_path / "s.json")
    assert_matches(out["results"][0], ref)
    assert any("does not set use_dora, so PEFT ignores them" in w for w in out["results"][0]["warnings"])


# ---- 8: LoRA on fused expert parameters (peft's ParamWrapper) ----------------------------------------------
def test_lora_on_fused_experts_is_no_rank_mismatch(tmp_path):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from tests.checkpoints.families import expand_experts

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                         num_key_value_heads=2, moe_intermediate_size=24, num_experts=3, num_experts_per_tok=2,
                         intermediate_size=40, head_dim=8)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path / "base")
    load = lambda: Qwen3MoeForCausalLM.from_pretrained(tmp_path / "base")
    ad = peft_adapter(load(), tmp_path / "a", r=2, lora_alpha=4, target_modules=["q_proj"],
                      target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"])
    ref = reference(expand_experts(state(load())), expand_experts(peft_merged_state(load(), ad)),
                    skip=lambda n: "embed" in n or "lm_head" in n)
    res = run_spectrum(tmp_path / "base", ad, tmp_path / "s.json")["results"][0]
    assert "model.layers.0.mlp.experts.gate_up_proj[2]" in assert_matches(res, ref)
    assert res["findings"] == []  # no rank mismatch (lora_A holds r x experts rows), no target warning


# ---- 9: structural errors are findings a gate sees -----------------------------------------------------------
def test_rank_lie_trips_the_structural_gate_in_spectrum_and_screen(base, tmp_path):
    ad = _edit(make_peft_adapter(base, tmp_path / "a", target_modules=["q_proj"]), r=2)  # the tensors have r = 4
    r = CliRunner().invoke(cli, ["spectrum", str(base), str(ad), "--no-cache", "--device", "cpu", "--fail-on",
                                 "structural_errors>0", "--json", str(tmp_path / "s.json")])
    assert r.exit_code == 3, r.output
    res = json.loads((tmp_path / "s.json").read_text())["results"][0]
    (f,) = _findings(res, "LA023")
    assert f["level"] == "error" and "has rank 4 in the tensors but r = 2" in f["message"]
    ads = tmp_path / "uploads"
    ads.mkdir()
    shutil.copytree(ad, ads / "liar")
    r = CliRunner().invoke(cli, ["screen", str(base), str(ads), "--out", str(tmp_path / "screen"), "--workers", "0",
                                 "--device", "cpu", "--fail-on", "structural_errors>0"])
    assert r.exit_code == 3, r.output
    assert "passed (n/a)" not in r.output
    clean = CliRunner().invoke(cli, ["spectrum", str(base), str(make_peft_adapter(base, tmp_path / "ok")), "--no-cache",
                                     "--device", "cpu", "--fail-on", "structural_errors>0"])
    assert clean.exit_code == 0, clean.output


# ---- 24: a sequence classifier's head in modules_to_save ------------------------------------------------------
def test_roberta_classifier_in_modules_to_save(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from tests.checkpoints.families import randomize_lora

    torch.manual_seed(0)
    cfg = RobertaConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=48, max_position_embeddings=40, num_labels=3)
    RobertaForSequenceClassification(cfg).save_pretrained(tmp_path / "base")
    load = lambda: RobertaForSequenceClassification.from_pretrained(tmp_path / "base")
    pm = get_peft_model(load(), LoraConfig(r=2, lora_alpha=4, target_modules=["query", "value"], task_type="SEQ_CLS"))
    randomize_lora(pm)
    with torch.no_grad():  # the head is trained in full (modules_to_save), its biases too
        for n, p in pm.named_parameters():
            if "modules_to_save" in n:
                p.add_(0.3 * torch.randn_like(p))
    pm.save_pretrained(str(tmp_path / "a"), safe_serialization=True)
    assert any(k.endswith("classifier.dense.bias") for k in load_file(str(tmp_path / "a" / "adapter_model.safetensors")))
    ref = reference(state(load()), peft_merged_state(load(), tmp_path / "a"))
    assert {"classifier.dense.weight", "classifier.out_proj.weight"} <= set(ref)
    res = run_spectrum(tmp_path / "base", tmp_path / "a", tmp_path / "s.json")["results"][0]
    assert_matches(res, ref)


# ---- 25: diffusers' save_lora_adapter (a model's LoRA, its LoraConfig in the header) ---------------------------
def test_diffusers_save_lora_adapter_applies_the_metadata_alpha(tmp_path):
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    from tests.checkpoints.families import randomize_lora, tiny_unet

    torch.manual_seed(0)
    tiny_unet().save_pretrained(tmp_path / "unet")
    load = lambda: UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    unet = load()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0", "proj_in",
                                                                     "conv1"]))
    randomize_lora(unet, scale=0.1)
    unet.save_lora_adapter(str(tmp_path / "lora"))
    fused = load()  # diffusers' own load and fuse
    fused.load_lora_adapter(str(tmp_path / "lora"), prefix=None, weight_name="pytorch_lora_weights.safetensors")
    fused.fuse_lora()
    tuned = {k.replace(".base_layer", ""): v for k, v in state(fused).items() if ".lora_" not in k}
    ref = reference(state(load()), tuned)
    res = run_spectrum(tmp_path / "unet", tmp_path / "lora", tmp_path / "s.json")["results"][0]
    assert len(assert_matches(res, ref)) == 44
    assert res["info"]["format"] == "diffusers_lora" and res["info"]["lora_alpha"] == 8
