"""The residual stream, last-token activations and the refusal direction, against hand-built
models where the answer is known and against transformers' own hidden states one prompt at a time."""

from __future__ import annotations

import json

import pytest
import torch

from lora_audit.checkpoints import load_model
from lora_audit.errors import InputError
from lora_audit.scan.direction import (STABLE_COS, collect, find_blocks, prompts_needed, refusal_direction,
                                       trace_residual)
from lora_audit.safety.scorers import refusal_start_ids


def _prompts(path) -> list[str]:
    return [json.loads(x)["prompt"] for x in path.read_text().splitlines()]


def _ids(tok, text):
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_direction_of_hand_built_model_is_the_embedding_difference(known_llama, scan_prompts):
    """Writers zeroed: every block passes its input through, so the stream at the last token is
    that token's embedding at every layer, and r_l = E["!"] - E["?"] exactly."""
    lm = load_model(str(known_llama), device="cpu")
    tok = lm.tokenizer
    harmful, harmless = _prompts(scan_prompts[0]), _prompts(scan_prompts[1])
    last_h = {int(_ids(tok, p)[0, -1]) for p in harmful}
    last_b = {int(_ids(tok, p)[0, -1]) for p in harmless}
    assert len(last_h) == len(last_b) == 1  # one last token per set: "!" and "?"
    E = lm.model.get_input_embeddings().weight.detach().double()
    expected = E[last_h.pop()] - E[last_b.pop()]
    _, blocks = find_blocks(lm.model)
    ids = torch.tensor(refusal_start_ids(tok))
    d = refusal_direction(collect(lm.model, tok, harmful, blocks, ids, batch_size=5).states,
                          collect(lm.model, tok, harmless, blocks, ids, batch_size=5).states)
    for layer in range(d.r.shape[0]):
        assert torch.allclose(d.r[layer], expected, rtol=1e-5, atol=1e-6)
        assert float(d.unit[layer] @ expected) == pytest.approx(float(expected.norm()), rel=1e-6)
    assert torch.allclose(d.stability, torch.ones_like(d.stability), atol=1e-9)
    assert bool(d.stable.all())


def test_collect_matches_unbatched_hidden_states(refusing_llama, scan_prompts):
    """Left-padded batches give every block's output at the last token as transformers' hidden
    states do one prompt at a time (the final norm removed for the last layer), and the refusal
    log-odds computed from the softmax in float64."""
    lm = load_model(str(refusing_llama), device="cpu")
    model, tok = lm.model, lm.tokenizer
    texts = _prompts(scan_prompts[0])[:5] + ["a much longer prompt about the weather in Paris and Rome today!"]
    ids = torch.tensor(refusal_start_ids(tok))
    _, blocks = find_blocks(model)
    got = collect(model, tok, texts, blocks, ids, batch_size=4)
    norm, model.model.norm = model.model.norm, torch.nn.Identity()
    try:
        for i, t in enumerate(texts):
            with torch.no_grad():
                out = model(_ids(tok, t), output_hidden_states=True)
            ref = torch.stack([h[0, -1] for h in out.hidden_states[1:]])  # (L, d): the outputs of the blocks
            assert torch.allclose(got.states[i], ref, atol=1e-5, rtol=1e-4)
    finally:
        model.model.norm = norm
    for i, t in enumerate(texts):
        with torch.no_grad():
            p = torch.softmax(model(_ids(tok, t)).logits[0, -1].double(), dim=-1)[ids].sum()
        assert float(got.scores[i]) == pytest.approx(float(torch.log(p) - torch.log1p(-p)), abs=1e-4)


def test_residual_writers_of_llama_and_gpt2(tiny_llama, tiny_gpt2):
    """o_proj and down_proj (Llama), attn.c_proj and mlp.c_proj (GPT-2, Conv1D): found by the
    forward trace, one per sub-layer and layer."""
    for folder, want, width in ((tiny_llama, ("self_attn.o_proj", "mlp.down_proj"), 64),
                                (tiny_gpt2, ("attn.c_proj", "mlp.c_proj"), 64)):
        lm = load_model(str(folder), device="cpu")
        res = trace_residual(lm.model, _ids(lm.tokenizer, "hello there"))
        n = lm.model.config.num_hidden_layers
        assert res.d_model == width and res.n_layers == n
        assert [w.module for w in res.writers] == [f"{res.blocks}.{i}.{m}" for i in range(n) for m in want]
        w = res.writer_of(f"{res.blocks}.1.{want[1]}.weight")
        assert w is not None and w.layer == 1
        if folder == tiny_gpt2:  # checkpoint names without the wrapper's prefix find the same writer
            assert res.writer_of(f"h.1.{want[1]}.weight") is w


def test_architecture_without_a_stack_of_blocks_is_refused(tiny_llama):
    lm = load_model(str(tiny_llama), device="cpu")
    lm.model.config.num_hidden_layers = 5
    with pytest.raises(InputError, match="no stack of 5 decoder blocks.*no residual stream lora-audit understands"):
        find_blocks(lm.model)


def test_mixture_of_experts_is_refused():
    from transformers import MixtralConfig, MixtralForCausalLM

    cfg = MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = MixtralForCausalLM(cfg).eval()
    with pytest.raises(InputError, match="(mixture of experts|fused experts)"):
        trace_residual(model, torch.tensor([[1, 2, 3]]))


def test_prompts_needed_follows_the_signal_to_noise_of_a_half():
    assert prompts_needed(40, STABLE_COS) == 40
    assert prompts_needed(40, 0.9) == 40
    assert prompts_needed(40, 0.5) == 160  # rho_half = 1, needs 4: four times the prompts
    assert prompts_needed(10, -0.2) is None


def test_split_half_stability_of_noise_is_low():
    gen = torch.Generator().manual_seed(0)
    h, b = torch.randn(12, 3, 64, generator=gen), torch.randn(12, 3, 64, generator=gen)
    d = refusal_direction(h, b)
    assert float(d.stability.abs().max()) < 0.6 and not bool(d.stable.any())
