"""Property-based tests of every reader of untrusted adapter and checkpoint input: generated configs,
safetensors headers, quant states, kohya files and diffusers metadata end in a result or a clean
``LoraAuditError`` (FormatError / InputError), never another exception (hypothesis, small budgets)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from lora_audit.checkpoints.adapters import match_adapter, read_adapter  # noqa: E402
from lora_audit.checkpoints.structure import adapter_findings  # noqa: E402
from lora_audit.errors import LoraAuditError  # noqa: E402

FAST = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])

# A tiny Llama-like base, as shapes only (what match_adapter reads from a weight file's header).
BASE = {f"model.layers.{i}.self_attn.{p}.weight": (8, 8) for i in range(2) for p in ("q_proj", "k_proj", "v_proj")}
BASE.update({"model.embed_tokens.weight": (16, 8), "lm_head.weight": (16, 8), "score.weight": (3, 8),
             "score.bias": (3,)})
BASE_CONFIG = {"model_type": "llama", "hidden_size": 8}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-3, 20) | st.floats(allow_nan=False, allow_infinity=False, width=32)
    | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=8)
# Module-name patterns built from names and regular-expression syntax, valid or not.
patterns = st.text(alphabet="qvkproj_.*+?()[]{}|\\^$0123d", max_size=14) | st.sampled_from(
    ["q_proj", "v_proj", "layers.0.self_attn.q_proj", r"layers\.\d\.q_proj", ".*", "(a+)+$", "", "score"])
names = st.sampled_from(["q_proj", "v_proj", "k_proj", "score", "lm_head", "layers", "self_attn"]) | patterns


def _or_any(s):
    """Mostly a value of the field's own kind (so that later checks are reached), sometimes any JSON."""
    return st.integers(0, 9).flatmap(lambda i: json_values if i == 0 else s)


config_fields = st.fixed_dictionaries({}, optional={
    "peft_type": _or_any(st.sampled_from(["LORA", "lora", "IA3", "MIXLORA"])),
    "r": _or_any(st.integers(0, 6)),
    "lora_alpha": _or_any(st.floats(-4, 1e6, allow_nan=False) | st.integers(0, 64)),
    "use_rslora": _or_any(st.booleans()),
    "use_dora": _or_any(st.booleans()),
    "fan_in_fan_out": _or_any(st.booleans()),
    "rank_pattern": _or_any(st.dictionaries(patterns, st.integers(0, 6), max_size=3)),
    "alpha_pattern": _or_any(st.dictionaries(patterns, st.floats(-2, 64, allow_nan=False), max_size=3)),
    "target_modules": _or_any(patterns | st.lists(names, max_size=3) | st.just("all-linear")),
    "exclude_modules": _or_any(patterns | st.lists(names, max_size=2)),
    "modules_to_save": _or_any(st.lists(names, max_size=2)),
    "layers_to_transform": _or_any(st.integers(0, 2) | st.lists(st.integers(0, 2), max_size=2)),
    "layers_pattern": _or_any(patterns | st.lists(patterns, max_size=2)),
    "target_parameters": _or_any(st.lists(names, max_size=2)),
    "init_lora_weights": _or_any(st.booleans() | st.sampled_from(["gaussian", "pissa", "lora_ga", "eva"])),
    "base_model_name_or_path": _or_any(st.text(max_size=8)),
})


def _adapter_tensors(with_magnitude: bool, with_head: bool) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    t = {}
    for i in range(2):
        for p in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{i}.self_attn.{p}"
            t[f"{key}.lora_A.weight"] = torch.randn(2, 8, generator=g)
            t[f"{key}.lora_B.weight"] = torch.randn(8, 2, generator=g)
            if with_magnitude:
                t[f"{key}.lora_magnitude_vector"] = torch.rand(8, generator=g) + 0.5
    if with_head:  # modules_to_save of a classifier: weight and bias
        t["base_model.model.score.weight"] = torch.randn(3, 8, generator=g)
        t["base_model.model.score.bias"] = torch.randn(3, generator=g)
    return t


def _audit_header_side(path) -> None:
    """What every command does with an adapter before any matrix is read."""
    af = read_adapter(path)
    adapter_findings(af, BASE_CONFIG)
    match_adapter(af, BASE, config=BASE_CONFIG)
    for module in af.modules:
        s = af.scale(module)
        assert isinstance(s, float)


@FAST
@given(config=config_fields, magnitude=st.booleans(), head=st.booleans())
def test_any_adapter_config_is_read_or_refused_cleanly(tmp_path_factory, config, magnitude, head):
    folder = tmp_path_factory.mktemp("cfg")
    save_file(_adapter_tensors(magnitude, head), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(config))
    try:
        _audit_header_side(folder)
    except LoraAuditError:
        pass


@FAST
@given(text=st.text(max_size=40) | json_values.map(json.dumps)
       | st.integers(1, 400).map(lambda n: "[" * n + "]" * n) | st.integers(1, 400).map(lambda n: '{"r":' * n))
def test_any_adapter_config_text_is_read_or_refused_cleanly(tmp_path_factory, text):
    folder = tmp_path_factory.mktemp("cfgtext")
    save_file(_adapter_tensors(False, False), str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(text)
    try:
        _audit_header_side(folder)
    except LoraAuditError:
        pass


# ---- safetensors headers -------------------------------------------------------------------------------
DTYPES = ["F32", "F16", "BF16", "F64", "I8", "U8", "I64", "BOOL", "F8_E4M3", "XX", 3]
header_entry = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(DTYPES), "shape": st.lists(st.integers(-1, 9), max_size=4) | json_values,
    "data_offsets": st.lists(st.integers(-2, 300), min_size=0, max_size=3) | json_values})
tensor_names = st.sampled_from(["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
                                "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
                                "lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha",
                                "unet.x.lora_A.weight", "model.layers.0.self_attn.q_proj.weight", "__metadata__"]) \
    | st.text(max_size=12)


@FAST
@given(header=st.dictionaries(tensor_names, header_entry | json_values, max_size=4), payload=st.binary(max_size=300),
       declared=st.none() | st.integers(0, 2**40), kind=st.sampled_from(["file", "peft", "model"]))
def test_any_safetensors_header_is_read_or_refused_cleanly(tmp_path_factory, header, payload, declared, kind):
    from lora_audit.checkpoints.sources import open_weights

    folder = tmp_path_factory.mktemp("st")
    raw = json.dumps(header).encode()
    blob = struct.pack("<Q", len(raw) if declared is None else declared) + raw + payload
    name = {"file": "x.safetensors", "peft": "adapter_model.safetensors", "model": "model.safetensors"}[kind]
    (folder / name).write_bytes(blob)
    try:
        if kind == "peft":
            (folder / "adapter_config.json").write_text('{"r": 2, "lora_alpha": 4}')
            _audit_header_side(folder)
        elif kind == "model":
            (folder / "config.json").write_text("{}")
            src = open_weights(folder)
            for n in src.names()[:3]:
                src.get(n)
        else:
            _audit_header_side(folder / name)
    except LoraAuditError:
        pass


# ---- kohya files: alpha scalars and key names ------------------------------------------------------------
ALPHA_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int64,
                torch.bool]
kohya_names = st.sampled_from(["lora_unet_down_blocks_0_attn1_to_q", "lora_te_text_model_q_proj", "lora_unet_a",
                               "lora_te1_x", "model.layers.0.self_attn.q_proj"]) | st.text(
    alphabet="abc_.0123", min_size=1, max_size=10)


@FAST
@given(modules=st.lists(st.tuples(kohya_names, st.integers(1, 3), st.booleans()), min_size=1, max_size=3),
       alpha_shape=st.lists(st.integers(0, 2), max_size=2), alpha_dtype=st.sampled_from(ALPHA_DTYPES),
       alpha=st.floats(allow_nan=True, allow_infinity=True) | st.integers(-5, 300), extra=st.sampled_from(
           [None, "hada_w1_a", "dora_scale", "lora_A.weight", "weird"]))
def test_any_kohya_file_is_read_or_refused_cleanly(tmp_path_factory, modules, alpha_shape, alpha_dtype, alpha, extra):
    tensors = {}
    for name, r, conv in modules:
        down, up = ((r, 4, 3, 3), (6, r, 1, 1)) if conv else ((r, 4), (6, r))
        tensors[f"{name}.lora_down.weight"] = torch.ones(down)
        tensors[f"{name}.lora_up.weight"] = torch.ones(up)
        try:
            value = torch.full(tuple(alpha_shape), float(alpha)).to(alpha_dtype)
        except (OverflowError, RuntimeError):
            value = torch.zeros(tuple(alpha_shape), dtype=alpha_dtype)
        tensors[f"{name}.alpha"] = value
    if extra is not None:
        tensors[f"{modules[0][0]}.{extra}"] = torch.ones(2, 2)
    f = tmp_path_factory.mktemp("kohya") / "lora.safetensors"
    save_file(tensors, str(f))
    try:
        af = read_adapter(f)
        for m in af.modules:
            assert math.isfinite(af.scale(m))
        adapter_findings(af)
    except LoraAuditError:
        pass


# ---- diffusers metadata ----------------------------------------------------------------------------------
@FAST
@given(meta=st.none() | st.text(max_size=30) | json_values.map(json.dumps)
       | st.dictionaries(st.sampled_from(["r", "lora_alpha", "unet.r", "unet.lora_alpha", "use_dora", "unet.use_dora",
                                           "target_modules", "unet.rank_pattern", "text_encoder.r", "unet."]),
                         json_values | st.integers(0, 8), max_size=4).map(json.dumps)
       | st.integers(1, 5000).map(lambda n: "[" * n + "]" * n), magnitude=st.booleans())
def test_any_diffusers_metadata_is_read_or_refused_cleanly(tmp_path_factory, meta, magnitude):
    tensors = {"unet.a.lora_A.weight": torch.ones(2, 4), "unet.a.lora_B.weight": torch.ones(4, 2)}
    if magnitude:
        tensors["unet.a.lora_magnitude_vector"] = torch.ones(4)
    f = tmp_path_factory.mktemp("diff") / "pytorch_lora_weights.safetensors"
    save_file(tensors, str(f), metadata=None if meta is None else {"lora_adapter_metadata": meta})
    try:
        af = read_adapter(f)
        assert math.isfinite(af.scale("unet.a"))
        match_adapter(af, {"unet.a.weight": (4, 4)})
    except LoraAuditError:
        pass


# ---- quantisation states: bitsandbytes and FP8 ----------------------------------------------------------------
bnb_states = st.fixed_dictionaries({}, optional={
    "quant_type": _or_any(st.sampled_from(["nf4", "fp4"])), "blocksize": _or_any(st.integers(-1, 128)),
    "dtype": _or_any(st.sampled_from(["float32", "float16", "bfloat16", "__class__"])),
    "shape": _or_any(st.lists(st.integers(-1, 16), max_size=3)),
    "nested_blocksize": _or_any(st.integers(0, 300)), "nested_dtype": _or_any(st.just("float32")),
    "nested_offset": _or_any(st.floats(allow_nan=False, allow_infinity=False))})


@FAST
@given(state=bnb_states.map(lambda d: json.dumps(d).encode()) | st.binary(max_size=64),
       packed=st.integers(0, 80), absmax=st.integers(0, 4), book=st.integers(0, 20),
       nested=st.booleans(), absmax_u8=st.booleans())
def test_any_bitsandbytes_quant_state_is_read_or_refused_cleanly(state, packed, absmax, book, nested, absmax_u8):
    from lora_audit.checkpoints import quantized as q

    raw = torch.tensor(list(state), dtype=torch.uint8)
    aux = {"absmax": torch.ones(absmax, dtype=torch.uint8) if absmax_u8 else torch.rand(absmax),
           "quant_map": torch.linspace(-1, 1, book)}
    if nested:
        aux.update(nested_absmax=torch.ones(1), nested_quant_map=torch.linspace(-1, 1, 256))
    try:
        s = q.parse_bnb_state(raw, "w")
        W, rec = q.dequantize_bnb_4bit(torch.zeros(packed, 1, dtype=torch.uint8), s, aux, "w")
        assert W.shape == s.shape and math.isfinite(rec["error_fro_bound"])
    except LoraAuditError:
        pass


@FAST
@given(rows=st.integers(1, 12), cols=st.integers(1, 12), bo=st.integers(1, 8), bi=st.integers(1, 8),
       srows=st.integers(0, 4), scols=st.integers(0, 4), dtype=st.sampled_from(
           [torch.float8_e4m3fn, torch.float8_e5m2, torch.float32, torch.int8]),
       scale=st.floats(allow_nan=True, allow_infinity=True, width=32))
def test_any_fp8_block_layout_is_read_or_refused_cleanly(rows, cols, bo, bi, srows, scols, dtype, scale):
    from lora_audit.checkpoints import quantized as q

    weight = torch.ones(rows, cols).to(dtype)
    try:
        W, rec = q.dequantize_fp8_blocks(weight, torch.full((srows, scols), scale), (bo, bi), "w")
        assert W.shape == (rows, cols) and bool(torch.isfinite(W).all())
    except LoraAuditError:
        pass


def test_property_budget_is_small():
    """The budgets above stay small: these tests are meant for every run of the suite."""
    assert FAST.max_examples <= 50 and FAST.deadline is None
    assert Path(__file__).stat().st_size < 20_000
