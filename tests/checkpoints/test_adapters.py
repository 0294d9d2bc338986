"""The one adapter reader: hostile or broken adapters give messages naming the file, the field or
tensor, and what is accepted; ``match_adapter`` fits adapters to bases with one set of messages."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_audit.checkpoints.adapters import match_adapter, read_adapter, read_peft_adapter
from lora_audit.checkpoints.models import match_adapter_to_model, model_shapes
from lora_audit.checkpoints.sources import open_weights
from lora_audit.errors import FormatError, InputError, ShapeMismatchError
from tests.helpers import copy_with, make_peft_adapter

Q0 = "model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("ad") / "a", target_modules=["q_proj", "v_proj"])


@pytest.fixture(scope="module")
def dora(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("dora") / "a", target_modules=["q_proj"],
                             use_dora=True)


def _copy(src, tmp_path, name="copy"):
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder, **fields):
    p = folder / "adapter_config.json"
    cfg = json.loads(p.read_text())
    cfg.update(fields)
    p.write_text(json.dumps(cfg).replace("Infinity", "1e999"))  # JSON has no inf; 1e999 parses as inf


def _edit_weights(folder, fn):
    p = folder / "adapter_model.safetensors"
    sd = load_file(str(p))
    fn(sd)
    save_file(sd, str(p))


@pytest.mark.parametrize("text, msg", [
    ("[1, 2]", "must be a JSON object, got a JSON list"),
    ("null", "must be a JSON object, got null"),
    (b"\xff\xfe{", "not UTF-8"),
    ('{"r": 8,', "not valid JSON"),
    ('{"r": NaN}', "not valid JSON"),
])
def test_adapter_config_not_a_json_object(adapter, tmp_path, text, msg):
    p = copy_with(adapter, tmp_path / "a", "adapter_config.json", text)
    with pytest.raises(InputError, match=msg) as e:
        read_peft_adapter(p.parent)
    assert str(p) in str(e.value)


@pytest.mark.parametrize("field, value, accepted", [
    ("r", 0, "a positive integer"),
    ("r", -4, "a positive integer"),
    ("r", "4", "a positive integer"),
    ("r", True, "a positive integer"),
    ("r", 4.5, "a positive integer"),
    ("lora_alpha", 1e999, "a finite number"),  # json reads 1e999 as inf
    ("lora_alpha", "8", "a finite number"),
    ("use_rslora", "yes", "true or false"),
    ("use_dora", 1, "true or false"),
    ("fan_in_fan_out", "false", "true or false"),
    ("rank_pattern", {"v_proj": 0}, "positive integers"),
    ("rank_pattern", [2], "positive integers"),
    ("alpha_pattern", {"v_proj": "big"}, "finite numbers"),
    ("alpha_pattern", {"v_proj": -1e999}, "finite numbers"),
    ("target_modules", 5, "a string, a list of strings or null"),
    ("target_modules", ["q_proj", 1], "a string, a list of strings or null"),
    ("modules_to_save", "lm_head", "a list of strings or null"),
    ("peft_type", 3, "a string"),
    ("init_lora_weights", 2, "true, false or an init method"),
])
def test_adapter_config_field_of_wrong_type_or_range(adapter, tmp_path, field, value, accepted):
    a = _copy(adapter, tmp_path)
    _edit_config(a, **{field: value})
    with pytest.raises(FormatError, match=f"field '{field}' is .*; it must be .*{accepted}") as e:
        read_peft_adapter(a)
    assert str(a / "adapter_config.json") in str(e.value)


def test_pattern_key_that_is_not_a_regex(adapter, tmp_path):
    a = _copy(adapter, tmp_path)
    _edit_config(a, rank_pattern={"q_proj(": 2})
    with pytest.raises(FormatError, match=r"rank_pattern key 'q_proj\(' is not a valid regular expression"):
        read_peft_adapter(a)


def test_unsupported_peft_type_names_the_field(adapter, tmp_path):
    a = _copy(adapter, tmp_path)
    _edit_config(a, peft_type="IA3")
    with pytest.raises(InputError, match="adapter_config.json: peft_type IA3 is not supported"):
        read_peft_adapter(a)


def test_config_rank_differs_from_the_weights(adapter, tmp_path):
    a = _copy(adapter, tmp_path)
    _edit_config(a, rank_pattern={"v_proj": 2})  # the weights have rank 4
    af = read_peft_adapter(a)  # recorded (structural finding LA023), audited with the tensors' rank
    assert "model.layers.0.self_attn.v_proj has rank 4 in the tensors but rank_pattern['v_proj'] = 2" in \
        af.rank_mismatches and af.scale("model.layers.0.self_attn.v_proj") == 8 / 4
    _edit_config(a, rank_pattern={}, r=8)
    assert f"{Q0} has rank 4 in the tensors but r = 8" in read_peft_adapter(a).rank_mismatches
    del_r = json.loads((a / "adapter_config.json").read_text())
    del del_r["r"]
    (a / "adapter_config.json").write_text(json.dumps(del_r))  # absent: PEFT's default r = 8
    assert f"{Q0} has rank 4 in the tensors but r (absent: PEFT's default) = 8" in read_peft_adapter(a).rank_mismatches


def test_dora_magnitude_of_the_wrong_length(dora, tmp_path):
    a = _copy(dora, tmp_path)
    key = f"base_model.model.{Q0}.lora_magnitude_vector"
    _edit_weights(a, lambda sd: sd.__setitem__(key, sd[key][:-1].contiguous()))
    with pytest.raises(FormatError, match=rf"module {Q0}: lora_magnitude_vector has shape \[63\]; DoRA needs one "
                                          r"magnitude per output row \(64\)") as e:
        read_peft_adapter(a)
    assert str(a) in str(e.value)


@pytest.mark.parametrize("change, msg", [
    (lambda t: t.to(torch.int64), r"lora_A \(.*lora_A.weight\) is stored as I64; factors must be floating point"),
    (lambda t: t.to(torch.bool), r"lora_A \(.*\) is stored as BOOL"),
    (lambda t: t[None], r"lora_B \[64, 4\] does not fit lora_A \[1, 4, 64\]: a conv LoRA has lora_A \(r, in, k...\)"),
    (lambda t: t[0], r"lora_A \(.*\) has 1 dimensions \[64\]; expected 2 to 5"),
])
def test_factor_of_wrong_dtype_or_dimensions(adapter, tmp_path, change, msg):
    a = _copy(adapter, tmp_path)
    key = f"base_model.model.{Q0}.lora_A.weight"
    _edit_weights(a, lambda sd: sd.__setitem__(key, change(sd[key]).contiguous()))
    with pytest.raises(FormatError, match=rf"module {Q0}: {msg}"):
        read_peft_adapter(a)


def test_only_one_factor(adapter, tmp_path):
    a = _copy(adapter, tmp_path)
    _edit_weights(a, lambda sd: sd.pop(f"base_model.model.{Q0}.lora_B.weight"))
    with pytest.raises(FormatError, match=f"only one of lora_A / lora_B.*{Q0}"):
        read_peft_adapter(a)


def _kohya(tmp_path, alpha):
    torch.manual_seed(0)
    f = tmp_path / "k.safetensors"
    save_file({f"{Q0}.lora_up.weight": torch.randn(64, 2), f"{Q0}.lora_down.weight": torch.randn(2, 64),
               f"{Q0}.alpha": alpha}, str(f))
    return f


@pytest.mark.parametrize("alpha, msg", [
    (torch.tensor([4.0, 2.0]), r"has shape \[2\]; a kohya alpha must be one number"),
    (torch.tensor(float("inf")), "is inf; a kohya alpha must be a finite number"),
    (torch.tensor(float("nan")), "is nan; a kohya alpha must be a finite number"),
    (torch.tensor(True), "is BOOL; a kohya alpha must be a number"),
])
def test_kohya_alpha_must_be_one_finite_number(tmp_path, alpha, msg):
    f = _kohya(tmp_path, alpha)
    with pytest.raises(FormatError, match=rf"{f}: tensor {Q0}.alpha {msg}"):
        read_adapter(f)


def test_kohya_alpha_as_integer_and_scale(tmp_path):
    af = read_adapter(_kohya(tmp_path, torch.tensor([[4]], dtype=torch.int64)))
    assert af.kind == "kohya_lora" and af.scale(Q0) == pytest.approx(2.0)


def test_non_finite_factor_values_are_read(adapter, tmp_path):
    """Non-finite values are findings for the engine, not reading errors: reading must not choke."""
    a = _copy(adapter, tmp_path)
    key = f"base_model.model.{Q0}.lora_B.weight"

    def poison(sd):
        sd[key][0, 0] = float("nan")
        sd[key][1, 0] = float("inf")
    _edit_weights(a, poison)
    B, A, mag = read_peft_adapter(a).factors(Q0)
    assert torch.isnan(B[0, 0]) and torch.isinf(B[1, 0]) and mag is None


def test_public_accessors(adapter):
    af = read_adapter(adapter)
    want = load_file(str(adapter / "adapter_model.safetensors"))
    assert set(af.keys) == set(want)
    key = f"base_model.model.{Q0}.lora_A.weight"
    assert af.tensor_shape(key) == (4, 64) and af.tensor_dtype(key) == "F32"
    torch.testing.assert_close(af.tensor(key), want[key])
    B, A, _ = af.factors(Q0)
    torch.testing.assert_close(B @ A, want[f"base_model.model.{Q0}.lora_B.weight"] @ want[key])
    assert af.shapes[Q0] == (64, 64, 4) and af.scale(Q0) == pytest.approx(8 / 4)


# ---- matching ---------------------------------------------------------------------------------
def test_match_from_header_equals_match_from_loaded_model(tiny_llama, adapter):
    from transformers import AutoModelForCausalLM

    af = read_adapter(adapter)
    src = open_weights(tiny_llama)
    from_file = match_adapter(af, {n: src.shape(n) for n in src.names()})
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    from_model = match_adapter_to_model(af, model, base="base")
    assert from_file.module_of == from_model.module_of
    assert from_file.module_of[f"{Q0}.weight"] == Q0 and len(from_file.module_of) == 4


def test_transposed_shape_is_refused_unless_stored_transposed(adapter):
    """A (out x in) delta fits an (in x out) weight only when that weight is a Conv1D stored so."""
    af = read_adapter(adapter)
    shapes = {f"model.layers.{i}.self_attn.{m}.weight": s for i in (0, 1)
              for m, s in (("q_proj", (64, 64)), ("v_proj", (32, 64)))}
    with pytest.raises(ShapeMismatchError, match=r"adapter for another base: shapes differ from B on 2 module\(s\): "
                                                 r"model.layers.0.self_attn.v_proj: adapter 32x64, base 64x32"):
        match_adapter(af, {n: s[::-1] for n, s in shapes.items()}, base="B")
    transposed = {n for n in shapes if "v_proj" in n}
    m = match_adapter(af, {n: (s[::-1] if n in transposed else s) for n, s in shapes.items()}, transposed=transposed)
    assert len(m.module_of) == 4


def test_missing_module_names_the_base_and_the_adapters_base(adapter):
    af = read_adapter(adapter)
    with pytest.raises(ShapeMismatchError, match=r"adapter for another base: B does not have 4 module\(s\) it "
                                                 r"changes: .*; the adapter was made for '.*tiny_llama"):
        match_adapter(af, {"model.layers.0.mlp.up_proj.weight": (96, 64)}, base="B")


def test_gpt2_adapter_matches_the_loaded_conv1d_model(tiny_gpt2, tmp_path):
    from transformers import AutoModelForCausalLM

    a = make_peft_adapter(tiny_gpt2, tmp_path / "g", target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_gpt2))
    m = match_adapter_to_model(read_adapter(a), model, base="gpt2")
    assert m.module_of["transformer.h.0.attn.c_attn.weight"] == "transformer.h.0.attn.c_attn"
    assert model_shapes(model)["transformer.h.0.attn.c_attn.weight"] == (64, 192)  # stored (in x out)


def test_not_an_adapter(tiny_llama):
    with pytest.raises(InputError, match="not an adapter .* it is a hf folder"):
        read_adapter(tiny_llama)


def test_pattern_key_that_could_backtrack_forever_is_refused(adapter, tmp_path):
    """A rank_pattern key with a repeated group ("(a+)+$") can make regular-expression matching take
    exponential time on a hostile module name: refused before any matching."""
    bad = tmp_path / "redos"
    shutil.copytree(adapter, bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"(a+)+$": 4}
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="exponential time"):
        read_adapter(bad)


def test_pattern_matching_runs_under_a_time_limit(tmp_path, monkeypatch):
    """Patterns run through ``regex`` (which already defuses most backtracking) under a time limit: a
    pattern that takes longer ends in a FormatError naming it. Here the limit is made 100x shorter
    than this pattern takes on this name, instead of a pattern slow enough for the real limit."""
    from lora_audit.checkpoints import adapters

    mod = "model." + "a." * 150 + "q_proj"
    folder = tmp_path / "a"
    folder.mkdir()
    save_file({f"base_model.model.{mod}.lora_A.weight": torch.ones(2, 4),
               f"base_model.model.{mod}.lora_B.weight": torch.ones(4, 2)}, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 2, "rank_pattern": {".*.*.*.*.*.*.*.*q": 2}}))
    assert read_adapter(folder).scale(mod) == 1.0
    monkeypatch.setattr(adapters, "PATTERN_SECONDS", 1e-4)
    with pytest.raises(FormatError, match=r"a/adapter_config.json: the pattern '\.\*\.\*.*q' takes over 0.0001 s to "
                                          r"match the module name 'model.a.a.a"):
        read_adapter(folder)


def test_absent_lora_alpha_is_peft_default(tiny_llama, adapter, tmp_path):
    """LoraConfig's defaults apply to fields the config leaves out (lora_alpha = 8), as peft loads it."""
    from tests.spectral.reference import peft_deltas

    a = _copy(adapter, tmp_path)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["lora_alpha"] = 16  # the adapter's own: scale 4
    del cfg["lora_alpha"]
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    deltas, _ = peft_deltas(tiny_llama, a)
    af = read_adapter(a)
    B, A, _ = af.factors(Q0)
    assert torch.allclose(af.scale(Q0) * (B.double() @ A.double()), deltas[Q0 + ".weight"], atol=1e-6)
    assert af.scale(Q0) == 8 / 4


@pytest.mark.parametrize("meta, msg", [
    ("[" * 100_000 + "]" * 100_000, r"lora_adapter_metadata\): not valid JSON \(nested deeper than 100 levels\)"),
    ('{"unet.r": 2, "unet.r": 4}', r"the key 'unet.r' appears twice"),
    ('["r", 2]', r"lora_adapter_metadata must be a JSON object"),
    ('{"lora_alpha": "8"}', r"\(lora_adapter_metadata\): field 'lora_alpha' is \"8\"; it must be a finite number"),
])
def test_hostile_diffusers_metadata_is_a_clean_error(tmp_path, meta, msg):
    f = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.a.lora_A.weight": torch.ones(2, 4), "unet.a.lora_B.weight": torch.ones(4, 2)}, str(f),
              metadata={"lora_adapter_metadata": meta})
    with pytest.raises(FormatError, match=msg):
        read_adapter(f)
