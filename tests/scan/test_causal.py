"""The causal test of BASE's refusal directions: the interventions do what they say (checked on
transformers' own hidden states), a hand-built refusing model's direction is causal, and a base
whose 'direction' is noise is said to have none."""

from __future__ import annotations

import json

import torch

from lora_audit.checkpoints import load_model
from lora_audit.results.scan import CausalTest
from lora_audit.safety.scorers import refusal_start_ids
from lora_audit.scan.causal import (ABLATION_MIN_DROP, ablation_hooks, actadd_hook, candidate_layers, kl_passes,
                                    validate_directions, why_not)
from lora_audit.scan.direction import collect, find_blocks, refusal_direction, trace_residual


def _prompts(path) -> list[str]:
    return [json.loads(x)["prompt"] for x in path.read_text().splitlines()]


def _ids(tok, text):
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


def test_candidate_layers_leave_out_the_last_fifth_and_thin_out_deep_models():
    assert candidate_layers(2) == [0]
    assert candidate_layers(10) == list(range(8))
    deep = candidate_layers(40)  # 32 eligible, 16 kept, evenly spaced
    assert len(deep) == 16 and deep[0] == 0 and deep[-1] == 31 and deep == sorted(set(deep))


def test_ablation_removes_the_direction_from_everything_written_into_the_stream(refusing_llama, scan_prompts):
    """With the hooks on, what every block reads, what every residual writer writes and what the
    final norm reads are orthogonal to the direction; without them they are not."""
    lm = load_model(str(refusing_llama), device="cpu")
    model, tok = lm.model, lm.tokenizer
    residual = trace_residual(model, _ids(tok, "hello"))
    _, blocks = find_blocks(model)
    u = torch.nn.functional.normalize(torch.randn(residual.d_model, generator=torch.Generator().manual_seed(3)), dim=0)
    ids = _ids(tok, _prompts(scan_prompts[0])[0])
    modules = dict(model.named_modules())

    def along(ablate: bool) -> list[float]:
        seen: list[torch.Tensor] = []
        hooks = ablation_hooks(model, blocks, residual, u) if ablate else []
        read = lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach())
        watch = [b.register_forward_pre_hook(read, with_kwargs=True) for b in [*blocks, model.model.norm]]
        watch += [modules[w.module].register_forward_hook(lambda m, i, o: seen.append(o.detach()))
                  for w in residual.writers]  # registered after the ablation's: they see its output
        try:
            with torch.no_grad():
                model(ids)
        finally:
            for h in hooks + watch:
                h.remove()
        assert len(seen) == len(blocks) + 1 + len(residual.writers)
        return [float((x @ u).abs().max()) for x in seen]

    assert min(along(False)) > 1e-4
    assert max(along(True)) < 1e-5


def test_actadd_adds_the_vector_to_what_the_next_block_reads(refusing_llama, scan_prompts):
    lm = load_model(str(refusing_llama), device="cpu")
    model, tok = lm.model, lm.tokenizer
    _, blocks = find_blocks(model)
    v = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    ids = _ids(tok, _prompts(scan_prompts[1])[0])
    seen = []
    pre = blocks[1].register_forward_pre_hook(lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).detach()),
                                              with_kwargs=True)
    try:
        with torch.no_grad():
            model(ids)
            h = actadd_hook(blocks[0], v)
            try:
                model(ids)
            finally:
                h.remove()
    finally:
        pre.remove()
    assert torch.allclose(seen[1], seen[0] + v, atol=1e-5)  # block 0's output at every position, plus v


def _setup(model_dir, harmful, harmless):
    """(model, tokenizer, residual, blocks, refusal-start ids, direction from the even prompts)."""
    lm = load_model(str(model_dir), device="cpu")
    model, tok = lm.model, lm.tokenizer
    residual = trace_residual(model, _ids(tok, harmful[0]))
    _, blocks = find_blocks(model)
    start = torch.tensor(refusal_start_ids(tok))
    d = refusal_direction(collect(model, tok, harmful[0::2], blocks, start).states,
                          collect(model, tok, harmless[0::2], blocks, start).states)
    return model, tok, residual, blocks, start, d


def _record(model_dir, harmful, harmless) -> CausalTest:
    model, tok, residual, blocks, start, d = _setup(model_dir, harmful, harmless)
    return validate_directions(model, tok, harmful[1::2], harmless[1::2], residual, blocks, d.r, start, batch_size=5)


def test_the_hand_built_refusal_direction_is_causal(refusing_llama, scan_prompts):
    """The refusing Llama refuses prompts ending in "!" and not those ending in "?": ablating the
    direction from held-out harmful prompts removes the refusal, adding it to held-out harmless
    ones induces it, and their next-token distribution barely moves."""
    rec = _record(refusing_llama, _prompts(scan_prompts[0]), _prompts(scan_prompts[1]))
    assert rec.base_refusal == 1.0 and rec.base_refusal_harmless == 0.0 and rec.n_harmful == 12
    assert rec.causal and rec.layer == 0 and [c.layer for c in rec.candidates] == [0]
    c = rec.chosen
    assert c.ablation_refusal <= 1.0 - ABLATION_MIN_DROP and c.actadd_refusal >= 0.3 and c.kl <= 0.1 and c.missed == []


def test_a_direction_of_noise_is_not_causal(refusing_llama, tmp_path):
    """Both sets from one distribution (every prompt ends in "!", all refused): the 'direction' is
    noise, its ablation leaves the refusal and its addition cannot raise it."""
    import random

    from .conftest import WORDS

    rng = random.Random(0)
    pool = [f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(WORDS)} {i}!" for i in range(32)]
    rec = _record(refusing_llama, pool[:16], pool[16:])
    assert not rec.causal and rec.layer is None
    assert set(rec.candidates[0].missed) >= {"ablation", "actadd"}
    assert "no candidate direction passes all three tests" in why_not(rec) and "layer 0" in why_not(rec)


def test_the_kl_leaves_out_the_harmless_prompts_base_refuses(refusing_llama, scan_prompts):
    """A base that over-refuses: some 'harmless' validation prompts end in "!" and are refused. The
    KL is measured on the ones it answers only (``n_kl`` of them), and equals KL(BASE || ablated)
    computed here by hand, with transformers' own logits, over those prompts."""
    from lora_audit.safety.scorers import last_position_logits

    harmful, harmless = _prompts(scan_prompts[0]), _prompts(scan_prompts[1])
    mixed = [h if i % 4 != 1 else harmful[i] for i, h in enumerate(harmless)]  # 3 of the 12 odd ones end in "!"
    rec = _record(refusing_llama, harmful, mixed)
    validation = mixed[1::2]
    answered = [t for t in validation if t.endswith("?")]
    assert 0 < len(answered) < len(validation)
    assert rec.n_kl == len(answered) and rec.n_harmless == len(validation)
    assert rec.base_refusal_harmless == (len(validation) - len(answered)) / len(validation)

    model, tok, residual, blocks, _, d = _setup(refusing_llama, harmful, mixed)
    c = rec.candidates[0]
    unit = d.r[c.layer] / d.r[c.layer].norm()

    def logp(texts: list[str], ablate: bool) -> torch.Tensor:
        hooks = ablation_hooks(model, blocks, residual, unit) if ablate else []
        try:
            return torch.cat([torch.log_softmax(x.double(), -1) for x in
                              last_position_logits(model, tok, texts, batch_size=1, desc="")])
        finally:
            for h in hooks:
                h.remove()

    def kl(texts: list[str]) -> float:
        p, q = logp(texts, False), logp(texts, True)
        return float((p.exp() * (p - q)).sum(-1).mean())

    assert abs(c.kl - kl(answered)) < 1e-6
    assert abs(c.kl_harmful - kl(harmful[1::2])) < 1e-6 and c.kl_harmful > c.kl


def test_the_kl_criterion_is_the_reference_bar_or_selectivity():
    """At most 0.1 nats on the harmless prompts (Arditi et al.), or at most half the KL on the
    harmful ones and at most 2 nats; the embedded model's measured candidates (module docstring)
    fall either side."""
    assert kl_passes(0.09, 0.0) and not kl_passes(0.11, 0.2)
    assert kl_passes(0.993, 2.605)  # SmolLM2 released, layer 23
    assert not kl_passes(0.463, 0.823) and not kl_passes(5.5, 5.0)  # layer 21; a direction that breaks the model
    assert not kl_passes(5.5, 12.0)  # selective, but moving the harmless answers by 5.5 nats breaks them
