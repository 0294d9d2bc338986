"""Whole-model loading: the no-pickle rule for every source (local folders and hub ids), hub ids
classified on their local snapshot (a hub adapter is an adapter), and GGUF files as plain float
models (``load_gguf_model``) that every command can use as BASE."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from lora_audit.checkpoints import Kind, load_model, open_stream
from lora_audit.checkpoints import sources as S
from lora_audit.errors import InputError
from tests.helpers import make_peft_adapter

REFUSAL = "holds only pickle weights .* refuses it by default"


@pytest.fixture(scope="module")
def pickled(tiny_llama, tmp_path_factory):
    """The tiny Llama saved as config.json + pytorch_model.bin (a pickle) + tokenizer."""
    import shutil

    p = tmp_path_factory.mktemp("pkl") / "pickled"
    shutil.copytree(tiny_llama, p)
    (p / "model.safetensors").unlink()
    torch.save(load_file(str(tiny_llama / "model.safetensors")), p / "pytorch_model.bin")
    return p


@pytest.fixture(scope="module")
def adapter(tiny_llama, tmp_path_factory):
    return make_peft_adapter(tiny_llama, tmp_path_factory.mktemp("ad") / "a", target_modules=["q_proj"])


def _hub(monkeypatch, folder):
    """Make every hub id resolve to ``folder`` (offline stand-in for the download)."""
    calls = []
    monkeypatch.setattr(S, "resolve_hub_id", lambda repo_id, patterns=S.HUB_PATTERNS: calls.append(repo_id) or folder)
    return calls


# ---- pickle -----------------------------------------------------------------------------------
def test_pickled_base_is_refused_unless_allowed(pickled):
    with pytest.raises(InputError, match=REFUSAL) as e:
        load_model(str(pickled), device="cpu")
    assert str(e.value).startswith(f"{pickled}: holds only pickle weights")
    loaded = load_model(str(pickled), device="cpu", allow_pickle=True)
    assert loaded.kind == Kind.PICKLE


def test_pickled_base_refused_by_safety_eval(pickled, adapter):
    from lora_audit.safety import EvalConfig, run_safety_eval

    with pytest.raises(InputError, match=REFUSAL) as e:
        run_safety_eval(str(pickled), [str(adapter)], EvalConfig(limit=1, max_new_tokens=2, tasks=[], benign=None))
    assert str(pickled) in str(e.value)


def test_pickled_adapter_base_is_refused(pickled, adapter):
    with pytest.raises(InputError, match=REFUSAL):
        load_model(str(adapter), base=str(pickled), device="cpu")


def test_hub_model_with_only_pickle_weights_is_refused(pickled, monkeypatch):
    calls = _hub(monkeypatch, pickled)
    with pytest.raises(InputError, match=REFUSAL) as e:
        load_model("someone/pickled-model", device="cpu")
    assert calls == ["someone/pickled-model"] and "someone/pickled-model" in str(e.value)


def test_hub_snapshot_without_usable_weights(tmp_path, monkeypatch):
    (tmp_path / "config.json").write_text("{}")
    _hub(monkeypatch, tmp_path)
    with pytest.raises(InputError, match=r"someone/m: the hub repository has no safetensors or GGUF weights .*pickle "
                                         "weights never are"):
        load_model("someone/m", device="cpu")


def test_every_folder_load_asks_transformers_for_safetensors_only(tiny_llama, pickled, monkeypatch):
    from transformers import AutoModelForCausalLM

    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kw):
        seen.append(kw.get("use_safetensors"))
        return real(cls, *args, **kw)
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    load_model(str(tiny_llama), device="cpu")
    _hub(monkeypatch, tiny_llama)
    load_model("someone/tiny", device="cpu")
    load_model(str(pickled), device="cpu", allow_pickle=True)
    assert seen == [True, True, False]


# ---- hub ids ----------------------------------------------------------------------------------
def test_hub_adapter_is_an_adapter(tiny_llama, adapter, monkeypatch):
    _hub(monkeypatch, adapter)
    loaded = load_model("someone/adapter", base=str(tiny_llama), device="cpu")
    assert loaded.kind == Kind.PEFT_ADAPTER and loaded.base == str(tiny_llama)
    assert any("lora_A" in n for n, _ in loaded.model.named_parameters())
    loaded = load_model("someone/adapter", device="cpu")  # the base named in its config exists locally
    assert loaded.kind == Kind.PEFT_ADAPTER
    groups = list(open_stream(str(tiny_llama), ["someone/adapter"]))
    assert [g.name for g in groups] == ["model.layers.0.self_attn.q_proj.weight",
                                        "model.layers.1.self_attn.q_proj.weight"]


def test_adapter_for_another_base_fails_before_peft(tmp_path, adapter):
    from tests.helpers import make_tiny_llama

    other = make_tiny_llama(tmp_path / "o", hidden=32, intermediate=48)
    with pytest.raises(InputError, match=r"adapter for another base: shapes differ from base .*o on 2 module\(s\): "
                                         r"model.layers.0.self_attn.q_proj: adapter 64x64, base 32x32"):
        load_model(str(adapter), base=str(other), device="cpu")


# ---- GGUF -------------------------------------------------------------------------------------
def test_gguf_gives_a_plain_float_model(tiny_gguf, tmp_path):
    path, want = tiny_gguf
    model = S.load_gguf_model(path)
    assert getattr(model, "hf_quantizer", None) is None and not hasattr(model.config, "quantization_config")
    sd = model.state_dict()
    for name, w in want.items():  # the builder's reference: gguf's own dequantiser, Q/K permutation undone
        assert torch.equal(sd[name], w), name
    model.save_pretrained(tmp_path / "saved")  # a quantised-marked model refuses this
    assert (tmp_path / "saved" / "model.safetensors").is_file()


def test_load_model_on_gguf(tiny_gguf):
    path, want = tiny_gguf
    loaded = load_model(str(path), device="cpu")
    assert loaded.kind == Kind.GGUF and getattr(loaded.model, "hf_quantizer", None) is None
    torch.testing.assert_close(loaded.model.state_dict()["model.layers.1.mlp.down_proj.weight"],
                               want["model.layers.1.mlp.down_proj.weight"])
    assert "<|im_start|>" in loaded.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


def test_gguf_base_in_spectrum_and_safety_eval(tiny_gguf, adapter, tmp_path):
    from click.testing import CliRunner

    from lora_audit.commands.spectrum import spectrum
    from lora_audit.safety import EvalConfig, run_safety_eval

    path, want = tiny_gguf
    (g,) = [g for g in open_stream(str(path), [str(adapter)]) if g.name == "model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(g.base, want[g.name])
    out = tmp_path / "s.json"
    r = CliRunner().invoke(spectrum, [str(path), str(adapter), "--json", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    res = run_safety_eval(str(path), [str(adapter)], EvalConfig(limit=1, max_new_tokens=2, tasks=[], benign=None,
                                                                 device="cpu"))
    assert set(res.models) == {"base", "a"}


def test_truncated_gguf_is_a_format_error(tiny_gguf, tmp_path):
    from lora_audit.errors import FormatError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(tiny_gguf[0].read_bytes()[:5000])
    with pytest.raises(FormatError, match=f"{bad}: could not read this GGUF file"):
        load_model(str(bad), device="cpu")
