"""The loading layer: every delta the stream yields, merged, equals peft's own merge_and_unload
(the independent reference), for each adapter feature; bad inputs fail before any tensor is read."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from lora_audit.checkpoints import Dense, DoRA, LowRank, open_stream
from lora_audit.errors import FormatError, InputError, ShapeMismatchError
from tests.helpers import make_peft_adapter, make_tiny_gpt2, make_tiny_llama


def peft_merged(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    return {k: v.detach().clone() for k, v in PeftModel.from_pretrained(m, str(adapter_dir)).merge_and_unload()
            .state_dict().items()}


def stream_merged(base_dir, tuned, **kw) -> dict[str, tuple[torch.Tensor, object, bool]]:
    out = {}
    for g in open_stream(str(base_dir), [str(tuned)], **kw):
        (d,) = g.deltas
        W1 = d.merged(g.base)
        out[g.name] = (W1.T if g.transposed else W1, d, g.transposed)
    return out


@pytest.mark.parametrize("kw, delta_type", [
    (dict(r=4, lora_alpha=8), LowRank),
    (dict(r=8, lora_alpha=4, use_rslora=True), LowRank),
    (dict(r=4, lora_alpha=8, rank_pattern={"v_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 32}), LowRank),
    (dict(r=4, lora_alpha=8, use_dora=True), DoRA),
])
def test_adapter_deltas_equal_peft_merge(tiny_llama, tmp_path, kw, delta_type):
    adapter = make_peft_adapter(tiny_llama, tmp_path / "a", target_modules=["q_proj", "v_proj", "down_proj"], **kw)
    ref = peft_merged(tiny_llama, adapter)
    got = stream_merged(tiny_llama, adapter)
    assert len(got) == 6
    for name, (W1, d, _) in got.items():
        assert isinstance(d, delta_type)
        torch.testing.assert_close(W1, ref[name], rtol=1e-5, atol=1e-5)


def test_rank_pattern_and_rslora_scales(tiny_llama, tmp_path):
    a = make_peft_adapter(tiny_llama, tmp_path / "a", r=8, lora_alpha=16, use_rslora=True,
                          rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 3}, target_modules=["q_proj", "v_proj"])
    scales = {g.name.split(".")[-2]: g.deltas[0].scale for g in open_stream(str(tiny_llama), [str(a)])}
    assert scales["q_proj"] == pytest.approx(16 / 8 ** 0.5)
    assert scales["v_proj"] == pytest.approx(3 / 2 ** 0.5)


def test_gpt2_conv1d_adapter_is_analysed_out_by_in(tiny_gpt2, tmp_path):
    a = make_peft_adapter(tiny_gpt2, tmp_path / "a", r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    ref = peft_merged(tiny_gpt2, a)
    got = stream_merged(tiny_gpt2, a)
    assert got and all(t for (_, _, t) in got.values())
    for name, (W1, _, _) in got.items():
        torch.testing.assert_close(W1, ref[name], rtol=1e-5, atol=1e-5)
    g = next(iter(open_stream(str(tiny_gpt2), [str(a)])))
    assert g.name.endswith("c_attn.weight") and g.shape == (192, 64)  # (out, in): 3 * 64 outputs


def test_embedding_lora_and_modules_to_save(tiny_llama, tmp_path):
    a = make_peft_adapter(tiny_llama, tmp_path / "a", r=2, target_modules=["q_proj", "embed_tokens"],
                          modules_to_save=["lm_head"])
    with torch.no_grad():  # make the saved lm_head differ from the base one
        sd = load_file(str(a / "adapter_model.safetensors"))
        sd["base_model.model.lm_head.weight"] += 0.5
        save_file(sd, str(a / "adapter_model.safetensors"))
    ref = peft_merged(tiny_llama, a)
    default = stream_merged(tiny_llama, a)
    assert all("embed" not in n and "lm_head" not in n for n in default)
    got = stream_merged(tiny_llama, a, include_embeddings=True)
    assert {"model.embed_tokens.weight", "lm_head.weight"} <= set(got)
    assert isinstance(got["lm_head.weight"][1], Dense)
    for name, (W1, _, _) in got.items():
        torch.testing.assert_close(W1, ref[name], rtol=1e-5, atol=1e-5)


def test_dense_tuned_bf16_and_sharded(tmp_path):
    base = make_tiny_llama(tmp_path / "base", dtype=torch.bfloat16, shard_size="20KB", tokenizer=False)
    assert (base / "model.safetensors.index.json").exists()
    tuned = make_tiny_llama(tmp_path / "tuned", dtype=torch.bfloat16, tokenizer=False)
    sd = load_file(str(tuned / "model.safetensors"))
    sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"] * 2
    save_file(sd, str(tuned / "model.safetensors"), metadata={"format": "pt"})
    groups = list(open_stream(str(base), [str(tuned)]))
    assert [g.name for g in groups] == ["model.layers.1.mlp.up_proj.weight"]  # unchanged matrices are skipped
    g = groups[0]
    assert g.base.dtype == torch.float32 and isinstance(g.deltas[0], Dense)
    torch.testing.assert_close(g.deltas[0].tuned, sd["model.layers.1.mlp.up_proj.weight"].float())


def test_stream_reads_one_tensor_at_a_time(tiny_llama, tmp_path, monkeypatch):
    a = make_peft_adapter(tiny_llama, tmp_path / "a", target_modules=["q_proj", "v_proj"])
    stream = open_stream(str(tiny_llama), [str(a)])
    reads = []
    src = stream.base_source
    orig = src.get
    monkeypatch.setattr(src, "get", lambda n: reads.append(n) or orig(n))
    assert reads == []  # opening reads headers only
    it = iter(stream)
    next(it)
    assert len(reads) == 1
    assert len(stream) == 4 and len(list(it)) == 3


# ---- bad input ------------------------------------------------------------------------------
def test_missing_path(tiny_llama):
    with pytest.raises(InputError, match="no such file"):
        open_stream(str(tiny_llama), ["/nonexistent/adapter"])


def test_truncated_safetensors(tiny_llama, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(FormatError, match="truncated or corrupted"):
        open_stream(str(tiny_llama), [str(bad)])
    (bad / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(FormatError):
        open_stream(str(bad), [str(tiny_llama)])


def test_adapter_for_another_base_names_the_modules(tiny_llama, tmp_path):
    other = make_tiny_llama(tmp_path / "other", hidden=32, intermediate=48, tokenizer=False)
    a = make_peft_adapter(other, tmp_path / "a", target_modules=["q_proj"])
    with pytest.raises(ShapeMismatchError, match=r"q_proj: adapter 32x32, base 64x64"):
        open_stream(str(tiny_llama), [str(a)])
    g = make_peft_adapter(make_tiny_gpt2(tmp_path / "g", tokenizer=False), tmp_path / "ga", target_modules=["c_attn"],
                          fan_in_fan_out=True)
    with pytest.raises(ShapeMismatchError, match="does not have"):
        open_stream(str(tiny_llama), [str(g)])


def test_nothing_in_common(tiny_llama, tiny_gpt2, tmp_path):
    with pytest.raises(InputError, match="shares no weight name"):
        open_stream(str(tiny_llama), [str(tiny_gpt2)])
    a = make_peft_adapter(tiny_llama, tmp_path / "a", target_modules=["embed_tokens"])
    with pytest.raises(InputError, match="--include-embeddings"):
        open_stream(str(tiny_llama), [str(a)])


def test_pickle_refused_unless_asked(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    p = tmp_path / "pkl"
    AutoModelForCausalLM.from_pretrained(str(tiny_llama)).save_pretrained(p, safe_serialization=False)
    for f in p.glob("*.safetensors"):
        f.unlink()
    if not list(p.glob("*.bin")):
        torch.save(load_file(str(tiny_llama / "model.safetensors")), p / "pytorch_model.bin")
    with pytest.raises(InputError, match="--allow-pickle"):
        open_stream(str(tiny_llama), [str(p)])
    groups = list(open_stream(str(tiny_llama), [str(p)], allow_pickle=True))
    assert groups == []  # same weights: nothing changed


def test_unsupported_file_and_offline_hub_id(tiny_llama, tmp_path):
    f = tmp_path / "weights.npz"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="unsupported file type"):
        open_stream(str(tiny_llama), [str(f)])


def test_offline_hub_id_is_a_clear_error(tiny_llama, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(InputError, match="no such file or folder; as a Hugging Face hub id it is not in the local "
                                         "cache .* HF_HUB_OFFLINE=1 forbids downloading"):
        open_stream(str(tiny_llama), ["someone/some-adapter-that-is-not-here"])


def test_base_rewriting_init_is_flagged(tiny_llama, tmp_path):
    a = make_peft_adapter(tiny_llama, tmp_path / "a", target_modules=["q_proj"])
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["init_lora_weights"] = "pissa_niter_4"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    s = open_stream(str(tiny_llama), [str(a)])
    assert any("MODIFIED base" in w for w in s.warnings[0])
    assert s.info[0]["init_lora_weights"] == "pissa_niter_4"


def test_kohya_lora_file(tiny_llama, tmp_path):
    torch.manual_seed(0)
    B, A = torch.randn(64, 2), torch.randn(2, 64)
    f = tmp_path / "k.safetensors"
    save_file({"model.layers.0.self_attn.q_proj.lora_up.weight": B,
               "model.layers.0.self_attn.q_proj.lora_down.weight": A,
               "model.layers.0.self_attn.q_proj.alpha": torch.tensor(4.0)}, str(f))
    (g,) = list(open_stream(str(tiny_llama), [str(f)]))
    assert isinstance(g.deltas[0], LowRank) and g.deltas[0].scale == pytest.approx(2.0)
    torch.testing.assert_close(g.deltas[0].update(), 2.0 * B @ A)


@pytest.mark.smollm2
def test_gguf_source_equals_converted_folder(smollm2_dir):
    from lora_audit.checkpoints.default_model import default_gguf_path
    from lora_audit.checkpoints.sources import open_weights

    g, f = open_weights(default_gguf_path()), open_weights(smollm2_dir)
    names = [n for n in f.names() if n != "lm_head.weight"]
    assert set(names) <= set(g.names())
    for n in ("model.layers.0.self_attn.q_proj.weight", "model.layers.29.self_attn.k_proj.weight",
              "model.layers.7.mlp.down_proj.weight"):
        torch.testing.assert_close(g.get(n).float(), f.get(n).float())


def test_gguf_dequantisation_bar_is_quiet_with_the_libraries(tiny_gguf, monkeypatch, capfd):
    """transformers draws its own tqdm bar while it dequantises a GGUF; lora-audit's quiet mode (the
    default without --verbose) turns it off, --verbose leaves it on."""
    from lora_audit import progress
    from lora_audit.checkpoints.sources import load_gguf_model

    path, _ = tiny_gguf
    monkeypatch.setitem(progress._LIBRARY_OUTPUT, "on", False)
    load_gguf_model(path)
    assert "de-quantizing" not in capfd.readouterr().err
    monkeypatch.setitem(progress._LIBRARY_OUTPUT, "on", True)
    load_gguf_model(path)
    assert "de-quantizing" in capfd.readouterr().err


@pytest.mark.parametrize("architectures", [{"LlamaForCausalLM": 1}, 5, [], [3]])
def test_loaded_source_ignores_odd_architectures(architectures):
    from types import SimpleNamespace

    from lora_audit.checkpoints.stream import _loaded_source

    src = SimpleNamespace(config={"architectures": architectures}, format="transformers folder")
    assert _loaded_source("m", src) is None
