"""A tiny llama GGUF file written with ``gguf.GGUFWriter``, in the layout llama.cpp's converter
produces and transformers' GGUF loader reads: llama.cpp tensor names, Q and K rows permuted for
its rotary layout, tokenizer as byte-level BPE metadata (vocabulary, merges, token types, special
ids, chat template). Built from the same tiny Llama as ``make_tiny_llama``, so the dequantised
weights can be compared with the HF model they came from.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from .helpers import CHATML_TEMPLATE, make_tokenizer, tiny_llama_config

# HF parameter name (per layer) -> llama.cpp tensor name, as convert_hf_to_gguf.py maps them.
_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight", "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight", "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
}


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's rotary re-ordering of Q/K rows (convert_hf_to_gguf.py LlamaModel.permute),
    which transformers' loader undoes: (heads, 2, d/2, in) -> (heads, d/2, 2, in)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _tokenizer_metadata(folder: Path, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens by id, token types, merges) of the byte-level BPE tokenizer ``make_tokenizer`` trains."""
    make_tokenizer(folder, vocab_size=vocab_size)
    tj = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))
    vocab: dict[str, int] = dict(tj["model"]["vocab"])
    special = {t["content"]: t["id"] for t in tj.get("added_tokens", [])}
    vocab.update(special)
    tokens = [""] * len(vocab)
    for tok, i in vocab.items():
        tokens[i] = tok
    types = [3 if t in special else 1 for t in tokens]  # 3 CONTROL, 1 NORMAL
    merges = [m if isinstance(m, str) else " ".join(m) for m in tj["model"]["merges"]]
    return tokens, types, merges


def make_tiny_gguf(path: str | Path, *, seed: int = 0, quantize: bool = True, **config_kw) -> tuple[Path, dict]:
    """Write a tiny llama GGUF at ``path``; return (path, HF state dict it encodes).

    ``quantize`` stores the 2-D projection weights as Q8_0 (as a real quantised GGUF would, so the
    loader's quantised path runs); the returned state dict then holds their dequantised values,
    computed with gguf's own reference dequantiser, in HF layout.
    """
    import gguf
    from gguf.quants import dequantize, quantize as q
    from transformers import LlamaForCausalLM

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cfg = tiny_llama_config(**config_kw)
    torch.manual_seed(seed)
    state = {k: v.detach().float() for k, v in LlamaForCausalLM(cfg).state_dict().items()}
    with tempfile.TemporaryDirectory() as tmp:
        tokens, types, merges = _tokenizer_metadata(Path(tmp), cfg.vocab_size)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None)
                         else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quantize else gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(cfg.bos_token_id)
    w.add_eos_token_id(cfg.eos_token_id)
    w.add_pad_token_id(cfg.pad_token_id)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML_TEMPLATE)

    encoded: dict[str, torch.Tensor] = {}

    def put(gguf_name: str, hf_name: str, t: torch.Tensor, permute_heads: int | None = None) -> None:
        a = t.numpy().astype(np.float32)
        if permute_heads is not None:
            a = _permute(a, permute_heads)
        if quantize and a.ndim == 2:
            qa = q(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, qa, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            a_back = dequantize(qa, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape)
        else:
            w.add_tensor(gguf_name, a)
            a_back = a
        if permute_heads is not None:  # undo llama.cpp's permutation: the HF layout of what is stored
            n = permute_heads
            a_back = a_back.reshape(n, a.shape[0] // n // 2, 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)
        encoded[hf_name] = torch.from_numpy(np.ascontiguousarray(a_back))

    put("token_embd.weight", "model.embed_tokens.weight", state["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in _LAYER_NAMES.items():
            heads = {"attn_q.weight": cfg.num_attention_heads, "attn_k.weight": cfg.num_key_value_heads}.get(gg)
            put(f"blk.{i}.{gg}", f"model.layers.{i}.{hf}", state[f"model.layers.{i}.{hf}"], heads)
    put("output_norm.weight", "model.norm.weight", state["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        put("output.weight", "lm_head.weight", state["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, encoded
