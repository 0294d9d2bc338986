"""Structural checks of tuned files: one adapter built to show each red flag (real peft adapters on
tiny Llama / Mixtral bases, then edited), the clean adapter showing none, and PEFT's own matching
rules as the reference for the mirrored ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_audit.checkpoints.adapters import read_adapter
from lora_audit.checkpoints.adapters import pattern_key
from lora_audit.checkpoints.structure import _targeted, check_structure, is_router
from lora_audit.errors import FormatError
from lora_audit.results import fingerprint
from tests.checkpoints.test_adapters import _copy, _edit_config, _kohya
from tests.helpers import make_peft_adapter, make_tiny_llama

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("st") / "a", target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """A tiny Mixtral (routers: model.layers.N.mlp.gate) saved as a HF folder."""
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=128, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    folder = tmp_path_factory.mktemp("mixtral") / "base"
    MixtralForCausalLM(cfg).save_pretrained(folder, safe_serialization=True)
    return folder


def _rules(findings):
    return [(f.rule, f.level) for f in findings]


def test_clean_adapter_has_no_findings(tiny_llama, adapter):
    # peft writes auto_mapping {"parent_library": "transformers.models.llama..."}: a transformers class, no flag
    assert json.loads((adapter / "adapter_config.json").read_text())["auto_mapping"] is not None
    assert check_structure(adapter, base=tiny_llama) == []
    assert check_structure(tiny_llama) == []  # a plain model folder


# ---- LA020 base mismatch ------------------------------------------------------------------------------
def test_base_mismatch_other_model(tiny_llama, adapter, tmp_path):
    other = make_tiny_llama(tmp_path / "other", seed=5, tokenizer=False)
    (f,) = check_structure(adapter, base=other)
    assert (f.rule, f.level) == ("LA020", "warning")
    assert str(tiny_llama) in f.message and str(other) in f.message and "files differ" in f.message
    assert f.detail["named_fingerprint"] == fingerprint(tiny_llama)
    assert f.detail["base_fingerprint"] == fingerprint(other) != fingerprint(tiny_llama)
    assert f.file == str(adapter / "adapter_config.json")


def test_base_mismatch_same_content_elsewhere(tiny_llama, adapter, tmp_path):
    twin = _copy(tiny_llama, tmp_path, "twin")
    (f,) = check_structure(adapter, base=twin)
    assert (f.rule, f.level) == ("LA020", "note") and "same files" in f.message


def test_base_mismatch_named_base_absent(tiny_llama, adapter, tmp_path):
    ad = _copy(adapter, tmp_path)
    _edit_config(ad, base_model_name_or_path="/nonexistent/base-model")
    (f,) = check_structure(ad, base=tiny_llama)
    assert (f.rule, f.level) == ("LA020", "warning")
    assert "/nonexistent/base-model" in f.message and str(tiny_llama) in f.message and "not compared" in f.message


def test_base_given_by_another_spelling_is_no_mismatch(tiny_llama, adapter, monkeypatch):
    monkeypatch.chdir(Path(tiny_llama).parent)
    assert check_structure(adapter, base=f"./{Path(tiny_llama).name}/") == []


# ---- LA021 full matrices ----------------------------------------------------------------------------
def test_modules_to_save_lm_head(tiny_llama, tmp_path):
    ad = make_peft_adapter(tiny_llama, tmp_path / "a", target_modules=["q_proj"], modules_to_save=["lm_head"])
    (f,) = check_structure(ad, base=tiny_llama)
    assert (f.rule, f.level) == ("LA021", "warning")
    assert "512x64" in f.message and "lm_head.weight" in f.message and f.detail["modules"] == ["lm_head.weight"]


def test_full_rank_factors(tiny_llama, tmp_path):
    # hidden 64: r = 64 reaches min(rows, cols) of q_proj (64 x 64)
    ad = make_peft_adapter(tiny_llama, tmp_path / "a", r=64, lora_alpha=64, target_modules=["q_proj"])
    (f,) = check_structure(ad, base=tiny_llama)
    assert (f.rule, f.level) == ("LA021", "warning") and f.detail["modules"] == [
        Q0, "model.layers.1.self_attn.q_proj"]


# ---- LA022 routers ------------------------------------------------------------------------------------
def test_router_lora_and_replacement(mixtral, tmp_path):
    lora = make_peft_adapter(mixtral, tmp_path / "lora", r=1, lora_alpha=2, target_modules=[],
                             target_parameters=["mlp.gate.weight"])
    found = check_structure(lora, base=mixtral)
    assert _rules(found) == [("LA022", "warning")]
    assert found[0].detail["modules"] == ["model.layers.0.mlp.gate", "model.layers.1.mlp.gate"]
    saved = make_peft_adapter(mixtral, tmp_path / "mts", r=2, target_modules=["q_proj"], modules_to_save=["gate"])
    found = check_structure(saved, base=mixtral)
    assert _rules(found) == [("LA021", "note"), ("LA021", "note"), ("LA022", "warning")]
    assert found[-1].detail["modules"] == ["model.layers.0.mlp.gate.weight", "model.layers.1.mlp.gate.weight"]


@pytest.mark.parametrize("name,router", [
    ("model.layers.0.block_sparse_moe.gate", True), ("model.layers.0.mlp.gate.weight", True),
    ("model.layers.0.mlp.shared_expert_gate", True), ("encoder.block.1.layer.1.mlp.router.classifier", True),
    ("transformer.blocks.0.ffn.router.layer", True), ("model.layers.0.mlp.gate_proj", False),
    ("model.layers.0.mlp.experts.0.w1", False)])
def test_router_names(name, router):
    assert is_router(name) is router


# ---- LA023 ranks ---------------------------------------------------------------------------------------
def test_declared_rank_disagrees_with_tensors(tiny_llama, adapter, tmp_path):
    ad = _copy(adapter, tmp_path)
    _edit_config(ad, r=8)  # the tensors have r = 4
    found = check_structure(ad, base=tiny_llama)
    assert _rules(found) == [("LA023", "error")]
    assert f"{Q0} has rank 4 in the tensors but r = 8" in found[0].message and len(found[0].detail["mismatches"]) == 4
    af = read_adapter(ad)  # the reader agrees, and audits the tensors as they are (alpha / their rank)
    assert af.rank_mismatches == found[0].detail["mismatches"] and af.scale(Q0) == 8 / 4


def test_rank_pattern_disagrees_and_unused_key(tiny_llama, adapter, tmp_path):
    ad = _copy(adapter, tmp_path)
    _edit_config(ad, rank_pattern={"layers.1.self_attn.v_proj": 2, "o_proj": 16})
    found = check_structure(ad, base=tiny_llama)
    assert _rules(found) == [("LA023", "error"), ("LA023", "note")]
    assert "rank_pattern['layers.1.self_attn.v_proj'] = 2" in found[0].message
    assert found[1].detail["unused_rank_pattern"] == ["o_proj"]


@pytest.mark.parametrize("keys,module", [
    (["q_proj", "layers.1.q_proj"], "model.layers.1.q_proj"), (["layers.1.q_proj", "q_proj"], "model.layers.1.q_proj"),
    (["v_proj"], "model.layers.0.q_proj"), ([r"layers\.\d\.q_proj"], "model.layers.3.q_proj"), ([], "x")])
def test_pattern_key_is_peft_rule(keys, module):
    from peft.utils.other import get_pattern_key

    ref = get_pattern_key(keys, module)
    assert pattern_key(keys, module) == (ref if ref in keys else None)


# ---- LA024 target modules --------------------------------------------------------------------------------
def test_modules_present_but_not_targeted(tiny_llama, adapter, tmp_path):
    ad = _copy(adapter, tmp_path)
    _edit_config(ad, target_modules=["q_proj", "k_proj"])
    found = check_structure(ad, base=tiny_llama)
    assert _rules(found) == [("LA024", "warning"), ("LA024", "note")]
    assert found[0].detail["modules"] == ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.v_proj"]
    assert found[1].detail["absent_targets"] == ["k_proj"] and "B = 0" in found[1].message
    _edit_config(ad, init_lora_weights=False)
    found = check_structure(ad, base=tiny_llama)
    assert _rules(found)[1] == ("LA024", "warning") and "random weights" in found[1].message


CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": r".*\.layers\.1\..*_proj"},
    {"target_modules": ["q_proj"], "exclude_modules": ["layers.0.self_attn.q_proj"]},
    {"target_modules": ["q_proj"], "exclude_modules": r".*layers\.1.*"},
    {"target_modules": ["self_attn.q_proj", "mlp"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj"], "layers_to_transform": 0, "layers_pattern": "layers"},
    {"target_modules": ["q_proj", "lm_head"], "modules_to_save": ["lm_head"]},
]
NAMES = [Q0, "model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.v_proj", "model.layers.1.mlp.down_proj",
         "model.layers.1.mlp", "lm_head", "model.layers.10.self_attn.q_proj"]


@pytest.mark.parametrize("config", CONFIGS)
def test_targeted_is_peft_rule(config):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = LoraConfig(**config)
    for name in NAMES:  # peft answers True, a regex match, None/False or a falsy _ExcludedModule
        assert _targeted(config, name) == bool(check_target_module_exists(peft_config, name)), name


# ---- LA025 / LA026 files and code references ------------------------------------------------------------------
def test_executable_files_next_to_the_adapter(tiny_llama, adapter, tmp_path):
    ad = _copy(adapter, tmp_path)
    (ad / "training_args.bin").write_bytes(b"\x80\x04\x95")  # a pickle's first bytes
    (ad / "sub").mkdir()
    (ad / "sub" / "modeling_evil.py").write_text("import os\n")
    found = check_structure(ad, base=tiny_llama)
    assert _rules(found) == [("LA025", "warning"), ("LA025", "warning")]
    assert [f.file for f in found] == [str(ad / "training_args.bin"), str(ad / "sub" / "modeling_evil.py")]
    assert [f.detail["kind"] for f in found] == ["pickle", "python"]


def test_custom_code_references(tiny_llama, adapter, tmp_path):
    full = _copy(tiny_llama, tmp_path, "full")
    cfg = json.loads((full / "config.json").read_text())
    cfg["auto_map"] = {"AutoModelForCausalLM": "evil--modeling.Model"}
    (full / "config.json").write_text(json.dumps(cfg))
    (f,) = check_structure(full)
    assert (f.rule, f.level) == ("LA026", "warning") and f.detail["references"] == ["evil--modeling.Model"]
    ad = _copy(adapter, tmp_path)
    _edit_config(ad, auto_mapping={"base_model_class": "Model", "parent_library": "evil_package.models"})
    (f,) = check_structure(ad, base=tiny_llama)
    assert (f.rule, f.level, f.detail["key"]) == ("LA026", "warning", "auto_mapping")
    assert "evil_package.models" in f.message


# ---- LA027 scale, LA028 dtypes -------------------------------------------------------------------------------
@pytest.mark.parametrize("alpha,scale,effect", [(1024, 256, "amplifies"), (-8, -2, "reverses"), (0, 0, "switches")])
def test_scale_anomaly(tiny_llama, adapter, tmp_path, alpha, scale, effect):
    ad = _copy(adapter, tmp_path)
    _edit_config(ad, lora_alpha=alpha)
    (f,) = check_structure(ad, base=tiny_llama)
    assert (f.rule, f.level) == ("LA027", "warning") and f.detail["scale"] == scale and effect in f.message
    assert len(f.detail["modules"]) == 4 and f"lora_alpha {alpha}, r 4" in f.message


def test_kohya_scale_anomaly(tmp_path):
    f = _kohya(tmp_path, torch.tensor(100.0))  # r = 2: scale 50
    (found,) = check_structure(f)
    assert (found.rule, found.level, found.file) == ("LA027", "warning", str(f))
    assert found.detail == {"scale": 50.0, "modules": [Q0]} and "lora_alpha" not in found.message
    (tmp_path / "ok").mkdir()
    assert check_structure(_kohya(tmp_path / "ok", torch.tensor(2.0))) == []


def test_usual_scales_pass(tiny_llama, adapter, tmp_path):
    ad = _copy(adapter, tmp_path)
    _edit_config(ad, lora_alpha=64)  # scale 16, the limit
    assert check_structure(ad, base=tiny_llama) == []


def test_dtype_anomalies(tiny_llama, adapter, tmp_path):
    ad = _copy(adapter, tmp_path)
    p = ad / "adapter_model.safetensors"
    sd = load_file(str(p))
    sd = {k: (v.half() if "layers.0" in k else v.double()) for k, v in sd.items()}
    save_file(sd, str(p))
    found = check_structure(ad, base=tiny_llama)
    assert _rules(found) == [("LA028", "note"), ("LA028", "note")]
    assert found[0].detail["dtypes"] == ["F16", "F64"] and found[1].detail["dtypes"] == ["F64"]


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_target_pattern_with_a_repeated_group_is_not_run(tiny_llama, adapter, tmp_path, field):
    ad = _copy(adapter, tmp_path)
    _edit_config(ad, **{field: "(.*_proj)+"})
    # what is audited depends on these patterns (the modules PEFT loads), so the adapter is refused
    with pytest.raises(FormatError, match=rf"adapter_config.json: {field} pattern '\(\.\*_proj\)\+' repeats a group"):
        check_structure(ad, base=tiny_llama)
    with pytest.raises(FormatError, match="repeats a group"):
        read_adapter(ad)
