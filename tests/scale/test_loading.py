"""Loading whole models: --dtype (auto, bfloat16, float16, float32), --device-map, bitsandbytes 4-/8-bit
with PEFT adapters kept separate, the vllm options, and one-line errors before any model is loaded."""

from __future__ import annotations

import json
import sys
import types

import pytest
import torch
from click.testing import CliRunner

from lora_audit.checkpoints import load_model
from lora_audit.checkpoints import loading as L
from lora_audit.checkpoints.models import contiguous_head_input, match_adapter_to_model
from lora_audit.checkpoints.adapters import read_peft_adapter
from lora_audit.cli import cli
from lora_audit.errors import DeviceError, InputError

from ..helpers import make_peft_adapter, make_tiny_llama

FAST = ["--limit", "2", "--max-new-tokens", "3", "--tasks", "none", "--batch-size", "2", "--benign", "none",
        "--device", "cpu"]


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory):
    """A tiny Llama stored in bfloat16, as checkpoints ship."""
    return make_tiny_llama(tmp_path_factory.mktemp("bf16") / "m", dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("load_ad") / "ad", seed=3, init_scale=0.5,
                             target_modules=["q_proj", "v_proj", "down_proj"])


@pytest.fixture(scope="module")
def q_llama(tmp_path_factory):
    """A tiny Llama whose widths are multiples of bitsandbytes' 64-value blocks (its CPU kernels need them,
    as every real model has them), and an adapter on it."""
    d = tmp_path_factory.mktemp("q")
    m = make_tiny_llama(d / "m", intermediate=128)
    return m, make_peft_adapter(m, d / "ad", seed=3, init_scale=0.5, target_modules=["q_proj", "v_proj", "down_proj"])


def _run(args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def _never_load(monkeypatch):
    """Fail the test if any model is loaded (errors must come first)."""
    import lora_audit.checkpoints.models as M

    monkeypatch.setattr(M, "_from_pretrained", lambda *a, **k: pytest.fail("a model was loaded"))


# ---- dtype ----------------------------------------------------------------------------------------------------
def test_auto_is_the_checkpoints_dtype_on_cuda_and_float32_elsewhere(tiny_llama, bf16_llama):
    from lora_audit.checkpoints.sources import read_model_config

    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    cfg16 = read_model_config(bf16_llama)
    assert L.load_dtype("auto", cpu, bf16_llama, cfg16) == torch.float32
    assert L.load_dtype("auto", cuda, bf16_llama, cfg16) == torch.bfloat16
    assert L.load_dtype("auto", cuda, tiny_llama, read_model_config(tiny_llama)) == torch.float32
    no_dtype = {k: v for k, v in cfg16.items() if k not in ("dtype", "torch_dtype")}
    assert L.load_dtype("auto", cuda, bf16_llama, no_dtype) == torch.bfloat16  # from the safetensors header
    assert L.load_dtype("float16", cpu) == torch.float16
    with pytest.raises(InputError, match="--dtype 'half': expected one of auto, bfloat16, float16, float32"):
        L.load_dtype("half", cpu)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_load_model_in_a_dtype(bf16_llama, dtype):
    loaded = load_model(str(bf16_llama), device="cpu", dtype=dtype)
    assert loaded.dtype == getattr(torch, dtype)
    assert {p.dtype for p in loaded.model.parameters()} == {getattr(torch, dtype)}


def test_the_output_layer_reads_a_contiguous_input_and_gives_the_same_logits(bf16_llama, tmp_path):
    """``logits_to_keep`` hands the output layer a strided view of the last position; load_model makes
    it contiguous (torch's CPU 16-bit linear converts the whole frozen weight for a strided input).
    The logits equal those of the plain transformers model, loaded here without lora-audit."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    seen = []
    lm = load_model(str(bf16_llama), device="cpu", dtype="bfloat16")
    ad = make_peft_adapter(bf16_llama, tmp_path / "ad", seed=3, init_scale=0.5)
    pm = PeftModel.from_pretrained(lm.model, str(ad), is_trainable=False).eval()  # freezes the base, as safety-eval
    head = lm.model.get_output_embeddings()
    head.register_forward_pre_hook(lambda m, a: seen.append(a[0].is_contiguous()))  # runs after load_model's
    ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(bf16_llama), dtype=torch.bfloat16),
                                    str(ad), is_trainable=False).eval()
    ids = torch.randint(0, 100, (3, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = pm(input_ids=ids, logits_to_keep=1).logits, ref(input_ids=ids, logits_to_keep=1).logits
    assert seen == [True] and got.shape == (3, 1, want.shape[-1])
    assert torch.equal(got, want)
    contiguous_head_input(lm.model)  # applied again: still one hook of its own
    assert len(head._forward_pre_hooks) == 2


def test_safety_eval_in_bfloat16_records_the_dtype(tiny_llama, adapter, tmp_path):
    out = tmp_path / "s.json"
    r = _run(["safety-eval", tiny_llama, adapter, *FAST, "--dtype", "bfloat16", "--json", out])
    assert r.exit_code == 0, r.output
    settings = json.loads(out.read_text())["lora_audit"]["settings"]
    assert settings["dtype"] == "bfloat16" and settings["dtype_option"] == "bfloat16"
    assert settings["device_map"] is None and settings["quantization"] is None
    out32 = tmp_path / "s32.json"
    r = _run(["safety-eval", tiny_llama, adapter, *FAST, "--json", out32])  # default: auto
    assert r.exit_code == 0, r.output
    s32 = json.loads(out32.read_text())["lora_audit"]["settings"]
    assert s32["dtype"] == "float32" and s32["dtype_option"] == "auto"


def test_finetune_keeps_16_bit_bases_to_adapter_methods(tiny_llama, tmp_path):
    out = tmp_path / "lora"
    r = _run(["finetune", tiny_llama, "--method", "lora", "--data", "builtin:alpaca-mini", "--out", out,
              "--steps", "2", "--batch-size", "2", "--max-length", "64", "--device", "cpu", "--dtype", "bfloat16"])
    assert r.exit_code == 0, r.output
    rec = json.loads((out / "training.json").read_text())
    assert rec["lora_audit"]["settings"]["dtype"] == "bfloat16"
    r = _run(["finetune", tiny_llama, "--method", "full", "--data", "builtin:alpaca-mini", "--out",
              tmp_path / "full", "--steps", "2", "--device", "cpu", "--dtype", "bfloat16"])
    assert r.exit_code == 1 and "full fine-tuning trains the weights themselves and needs float32" in r.output


# ---- bad options: one line, before any model is loaded ------------------------------------------------------
@pytest.mark.parametrize("extra,code,msg", [
    (["--dtype", "half"], 2, "Invalid value for '--dtype'"),
    (["--load-in-4bit", "--load-in-8bit"], 2, "--load-in-4bit and --load-in-8bit exclude each other"),
    (["--device-map", "auto", "--device", "cpu"], 1, "--device-map auto places the layers itself; it cannot be "
                                                     "combined with --device cpu"),
    (["--device-map", "everywhere"], 2, "Invalid value for '--device-map'"),
    (["--backend", "vllm", "--device-map", "auto", "--device", "auto"], 1, "vllm splits a model across GPUs"),
    (["--tensor-parallel-size", "2"], 1, "--tensor-parallel-size applies to --backend vllm"),
    (["--model-args", "batch_size=4"], 1, "batch_size: set by lora-audit, use --batch-size"),
    (["--model-args", "pretrained=x,dtype=float16"], 1, "dtype: set by lora-audit, use --dtype; pretrained: set by"),
    (["--model-args", "max_length"], 1, "'max_length' is not key=value"),
    (["--fewshot-as-multiturn"], 1, "--fewshot-as-multiturn needs --apply-chat-template"),
])
def test_bad_loading_options_fail_first(tiny_llama, tmp_path, monkeypatch, extra, code, msg):
    _never_load(monkeypatch)
    args = ["safety-eval", tiny_llama, *FAST, *extra, "--json", tmp_path / "s.json"]
    if "--device" in extra:
        i = args.index("--device")
        del args[i:i + 2]  # the test's own --device replaces FAST's
    r = _run(args)
    assert r.exit_code == code, r.output
    assert msg in r.output and "Traceback" not in r.output
    assert not (tmp_path / "s.json").exists()


def test_4bit_without_a_bitsandbytes_backend_is_one_line(tiny_llama, adapter, tmp_path, monkeypatch):
    _never_load(monkeypatch)
    monkeypatch.setattr(L, "bitsandbytes_devices", lambda: {"cuda"})  # bitsandbytes before its CPU backend
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for cmd in (["safety-eval", tiny_llama, adapter, *FAST],
                ["safety-scan", tiny_llama, adapter, "--device", "cpu"],
                ["audit", tiny_llama, adapter, "--out", tmp_path / "a", "--device", "cpu"]):
        r = _run([*cmd, "--load-in-4bit"])
        assert r.exit_code == 1, r.output
        lines = r.output.strip().splitlines()
        assert len(lines) == 1 and "--load-in-4bit: bitsandbytes" in lines[0] and "runs on cuda" in lines[0] \
            and "no CUDA device" in lines[0], r.output
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(L.importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    with pytest.raises(InputError, match="--load-in-8bit needs the 'bitsandbytes' package"):
        L.LoadOptions(quantization="8bit").check("cpu")
    with pytest.raises(DeviceError):
        monkeypatch.setattr(L.importlib.util, "find_spec", real)
        L.LoadOptions(quantization="4bit").check("cpu")


# ---- bitsandbytes 4-bit (recent bitsandbytes quantises on the CPU too: these run here) -------------------------------
needs_bnb_here = pytest.mark.skipif(
    "cpu" not in L.bitsandbytes_devices() and not torch.cuda.is_available(),
    reason="this bitsandbytes has no backend on this machine")


@needs_bnb_here
def test_adapter_on_a_4bit_base_stays_a_peft_model(q_llama):
    import bitsandbytes as bnb
    from peft import PeftModel

    tiny_llama, adapter = q_llama
    opts = L.LoadOptions(quantization="4bit")
    base = load_model(str(tiny_llama), device="cpu", options=opts)
    q = base.model.model.layers[0].self_attn.q_proj
    assert isinstance(q, bnb.nn.Linear4bit)
    match_adapter_to_model(read_peft_adapter(adapter), base.model, base="base")  # packed weights: their real shapes
    ids = base.tokenizer("Hello there", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = base.model(ids).logits
    tuned = load_model(str(adapter), base=str(tiny_llama), device="cpu", options=opts)
    assert isinstance(tuned.model, PeftModel)
    assert isinstance(tuned.model.base_model.model.model.layers[0].self_attn.q_proj.base_layer, bnb.nn.Linear4bit)
    with torch.no_grad():
        adapted = tuned.model(ids).logits
    assert not torch.allclose(plain, adapted)  # the adapter acts on top of the quantised base
    with pytest.raises(InputError, match="an adapter is not merged into a quantised base"):
        load_model(str(adapter), base=str(tiny_llama), device="cpu", options=opts, merge=True)


@needs_bnb_here
def test_audit_in_4bit_records_it_and_the_weight_audit_reads_the_files(q_llama, tmp_path):
    tiny_llama, adapter = q_llama
    out = tmp_path / "a"
    r = _run(["audit", tiny_llama, adapter, "--out", out, "--device", "cpu", "--load-in-4bit", "--limit", "2",
              "--max-new-tokens", "3", "--tasks", "none", "--batch-size", "2", "--benign", "none", "--skip-scan",
              "--quiet"])
    assert r.exit_code == 0, r.output
    safety = json.loads((out / "safety.json").read_text())["lora_audit"]["settings"]
    assert safety["quantization"] == "bitsandbytes 4-bit nf4 (double quantisation)"
    assert safety["dtype"] == "float32"  # the compute dtype on the CPU under auto
    s = tmp_path / "s.json"
    r = _run(["spectrum", tiny_llama, adapter, "--json", s, "--device", "cpu", "--no-cache", "--quiet"])
    assert r.exit_code == 0, r.output
    spec_audit = json.loads((out / "spectrum.json").read_text())["results"][0]["matrices"]
    spec_plain = json.loads(s.read_text())["results"][0]["matrices"]
    assert [(m["name"], m["intruders"]) for m in spec_audit] == [(m["name"], m["intruders"]) for m in spec_plain]


@needs_bnb_here
def test_safety_scan_in_8bit(q_llama, tmp_path):
    tiny_llama, adapter = q_llama
    from lora_audit.scan import ScanConfig, run_safety_scan
    from lora_audit.scan import run as scan_run

    cfg = ScanConfig(device="cpu", limit=None, use_cache=False, load=L.LoadOptions(quantization="8bit"))
    seen = {}
    real = scan_run.load_model

    def spy(*a, **k):
        loaded = real(*a, **k)
        seen["q"] = type(loaded.model.model.layers[0].self_attn.q_proj).__name__
        return loaded
    scan_run.load_model = spy
    try:
        with pytest.raises(InputError, match="BASE refuses"):  # a random tiny model refuses nothing
            run_safety_scan(str(tiny_llama), [str(adapter)], cfg)
    finally:
        scan_run.load_model = real
    assert seen["q"] == "Linear8bitLt"


# ---- device map ------------------------------------------------------------------------------------------------
def test_device_map_lets_accelerate_place_the_model(tiny_llama, adapter, tmp_path):
    loaded = load_model(str(tiny_llama), options=L.LoadOptions(device_map="auto"))
    assert L.placement(loaded.model) and set(L.placement(loaded.model)) <= {"cpu", *[f"cuda:{i}" for i in range(8)]}
    out = tmp_path / "s.json"
    r = _run(["safety-eval", tiny_llama, adapter, "--limit", "2", "--max-new-tokens", "3",
              "--tasks", "none", "--batch-size", "2", "--benign", "none", "--device-map", "auto", "--json", out])
    assert r.exit_code == 0, r.output
    settings = json.loads(out.read_text())["lora_audit"]["settings"]
    assert settings["device_map"] == "auto" and sum(settings["placement"].values()) >= 1


# ---- vllm (not installed here: a stand-in module records what lora-audit asks of it) --------------------------
def test_vllm_backend_gets_dtype_tensor_parallel_and_the_pinned_path(monkeypatch):
    from lora_audit.safety.generate import GenSettings, generate_vllm

    seen = {}

    class LLM:
        def __init__(self, **kw):
            seen.update(kw)

        def generate(self, texts, params, lora_request=None):
            seen["lora"] = lora_request
            return [types.SimpleNamespace(outputs=[types.SimpleNamespace(text="ok")]) for _ in texts]

    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = LLM, lambda **kw: kw
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda *a: a
    monkeypatch.setitem(sys.modules, "vllm", fake)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)
    out = generate_vllm("/snap/abc", ["a", "b"], GenSettings(max_new_tokens=4), adapter="/ad", dtype="bfloat16",
                        tensor_parallel_size=4, quantization="4bit")
    assert out == ["ok", "ok"]
    assert seen["model"] == "/snap/abc" and seen["dtype"] == "bfloat16" and seen["tensor_parallel_size"] == 4
    assert seen["quantization"] == "bitsandbytes" and seen["enable_lora"] and seen["lora"] == ("tuned", 1, "/ad")
