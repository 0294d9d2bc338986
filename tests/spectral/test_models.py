"""End to end on real checkpoints: lora_audit.checkpoints.open_stream + spectral.engine.audit
against the float64 two-SVD reference on weights merged by peft's own merge_and_unload.

Cases: PEFT LoRA (plain; rsLoRA with rank and alpha patterns), DoRA, GPT-2 Conv1D
(fan_in_fan_out), a dense "full fine-tune" saved as a folder, a sharded base, an adapter that
leaves the spectrum alone (no intruders) and one that certainly has intruders."""

import pytest
import torch

from lora_audit.checkpoints import open_stream
from lora_audit.spectral.engine import audit
from tests.helpers import make_peft_adapter, make_tiny_llama
from tests.spectral.fixtures import make_full_finetune, randomize_embedding_A
from tests.spectral.reference import reference_audit


def run(base, tuned: list, *, exact=False, dtype=torch.float32, k=10, epsilon=0.5, include_embeddings=False):
    stream = open_stream(str(base), [str(t) for t in tuned], include_embeddings=include_embeddings, dtype=dtype,
                         allow_pickle=False)
    return audit(stream, k=k, epsilon=epsilon, exact=exact, float64=dtype == torch.float64, device="cpu",
                 progress=False, base_label=str(base), tuned_labels=[str(t) for t in tuned])


def assert_matches_reference(tuned_result, ref: dict, *, tol=1e-4):
    got = {m.name: m for m in tuned_result.matrices}
    assert set(got) == set(ref), (sorted(set(got) ^ set(ref)))
    for name, (cos, count) in ref.items():
        assert got[name].intruders == count, name
        assert got[name].max_cos == pytest.approx(cos, abs=tol), name
    assert tuned_result.total_intruders == sum(c for _, c in ref.values())


@pytest.fixture(scope="module")
def adapters(tiny_llama, tiny_gpt2, tmp_path_factory):
    d = tmp_path_factory.mktemp("spectral_models")
    return {
        "lora": make_peft_adapter(tiny_llama, d / "lora", r=4, lora_alpha=8, seed=1),
        "rslora": make_peft_adapter(tiny_llama, d / "rslora", r=4, lora_alpha=8, use_rslora=True, seed=2,
                                    rank_pattern={"q_proj": 2, "layers.1.mlp.down_proj": 6},
                                    alpha_pattern={"v_proj": 3}),
        "dora": make_peft_adapter(tiny_llama, d / "dora", r=4, lora_alpha=8, use_dora=True, seed=3,
                                  target_modules=["q_proj", "v_proj", "down_proj"]),
        "quiet": make_peft_adapter(tiny_llama, d / "quiet", r=4, lora_alpha=8, seed=4, init_scale=1e-4),
        "gpt2": make_peft_adapter(tiny_gpt2, d / "gpt2", r=4, lora_alpha=8, seed=5, fan_in_fan_out=True,
                                  target_modules=["c_attn", "c_proj", "c_fc"]),
        "full": make_full_finetune(tiny_llama, d / "full"),
        "embedding": randomize_embedding_A(make_peft_adapter(tiny_llama, d / "embedding", r=4, lora_alpha=8, seed=6,
                                                             target_modules=["embed_tokens", "o_proj"])),
        "sharded_base": make_tiny_llama(d / "sharded", shard_size="60KB", tokenizer=False),  # same seed as tiny_llama
    }


@pytest.mark.parametrize("exact", [False, True], ids=["default", "exact"])
def test_llama_adapters_and_full_finetune(tiny_llama, adapters, exact):
    names = ["lora", "rslora", "dora", "quiet", "full"]
    res = run(tiny_llama, [adapters[n] for n in names], exact=exact)
    for name, tuned_result in zip(names, res.results, strict=True):
        assert_matches_reference(tuned_result, reference_audit(tiny_llama, adapters[name]))
    totals = dict(zip(names, (r.total_intruders for r in res.results), strict=True))
    assert totals["quiet"] == 0  # tiny B: the tuned spectrum is the base's
    assert totals["lora"] > 0 and totals["full"] >= 1  # random B dominates / the planted rank-1 intruder
    full = {m.name: m for m in res.results[-1].matrices}
    assert full["model.layers.1.mlp.down_proj.weight"].max_cos[0] < 0.5
    # the rank pattern reached the loader: q_proj has r=2, layer-1 down_proj r=6
    rs = {m.name: m for m in res.results[1].matrices}
    assert rs["model.layers.0.self_attn.q_proj.weight"].adapter_rank == 2
    assert rs["model.layers.1.mlp.down_proj.weight"].adapter_rank == 6


def test_gpt2_conv1d_adapter(tiny_gpt2, adapters):
    res = run(tiny_gpt2, [adapters["gpt2"]])
    m = {x.name: x for x in res.results[0].matrices}
    assert m["transformer.h.0.attn.c_attn.weight"].shape == [192, 64]  # analysed as (out x in)
    assert m["transformer.h.0.attn.c_attn.weight"].transposed
    assert any("Conv1D" in w for w in res.warnings)  # the stream's note about the base reaches the result
    assert_matches_reference(res.results[0], reference_audit(tiny_gpt2, adapters["gpt2"]))


def test_sharded_base_gives_the_same_audit(tiny_llama, adapters):
    sharded = run(adapters["sharded_base"], [adapters["lora"]])
    assert_matches_reference(sharded.results[0], reference_audit(tiny_llama, adapters["lora"]))


def test_float64_metrics_equal_direct_formulas(tiny_llama, adapters):
    """Per-matrix ||dW||, effective and stable rank of a real rsLoRA adapter vs numpy formulas on
    peft's own float64 delta (``LoraLayer.get_delta_weight``)."""
    from tests.spectral.reference import np_metrics, peft_deltas

    res = run(tiny_llama, [adapters["rslora"]], dtype=torch.float64)
    deltas, base_w = peft_deltas(tiny_llama, adapters["rslora"])
    assert {m.name for m in res.results[0].matrices} == set(deltas)
    for m in res.results[0].matrices:
        expected = np_metrics(deltas[m.name].numpy(), base_w[m.name].numpy())
        for key, value in expected.items():
            assert getattr(m, key) == pytest.approx(value, rel=1e-6), (m.name, key)


def test_embedding_lora_only_with_include_embeddings(tiny_llama, adapters):
    without = run(tiny_llama, [adapters["embedding"]])
    assert {m.module for m in without.results[0].matrices} == {"o_proj"}
    assert_matches_reference(without.results[0], reference_audit(tiny_llama, adapters["embedding"]))
    res = run(tiny_llama, [adapters["embedding"]], include_embeddings=True)
    emb = {m.name: m for m in res.results[0].matrices}["model.embed_tokens.weight"]
    assert emb.kind == "embedding" and emb.shape == [512, 64]
    assert_matches_reference(res.results[0], reference_audit(tiny_llama, adapters["embedding"], include_embeddings=True))
