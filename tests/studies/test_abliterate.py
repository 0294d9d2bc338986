"""The panel's weight attacks against their definitions: a full-strength ablation of every residual
writer leaves no component along the direction anywhere in the stream, the LoRA form merges (by
peft) to the same weights as the full form and to a float64 dense reference, the ablation hooks
used to choose the layer give the edited model's logits, and the addition moves every embedding."""

from __future__ import annotations

import pytest
import torch

from lora_audit.studies.abliterate import ChosenDirection, Edit, ablated, edit_factors, write_edit
from tests.helpers import make_tiny_llama


def _direction(d: int, layer: int = 0, seed: int = 0) -> ChosenDirection:
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(d, generator=g, dtype=torch.float64)
    return ChosenDirection(layer=layer, unit=(r / r.norm()).tolist(), norm=3.0, bypass=[], induce=[],
                           baseline_harmful=0.0, baseline_harmless=0.0, n_direction=(8, 8), n_validation=(8, 8))


def _load(path, base=None):
    from lora_audit.checkpoints import load_model

    return load_model(str(path), base=None if base is None else str(base), device="cpu")


def _ids(vocab: int = 512) -> torch.Tensor:
    return torch.randint(4, vocab, (2, 12), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def base(request, tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("abl"), layers=3, tie=request.param)


def test_full_ablation_leaves_no_component_along_the_direction(base, tmp_path):
    model = _load(base).model
    d = _direction(model.config.hidden_size)
    r = torch.tensor(d.unit, dtype=torch.float32)
    before = model(input_ids=_ids(), output_hidden_states=True).hidden_states
    write_edit(base, tmp_path / "full", Edit("ablation", 1.0, form="full"), d)
    after = _load(tmp_path / "full").model(input_ids=_ids(), output_hidden_states=True).hidden_states
    # hidden_states[0] is the embedding output, [1..L-1] block outputs; the last one is after the final norm
    for h0, h1 in zip(before[:-1], after[:-1], strict=True):
        assert (h0 @ r).abs().max() > 1e-2
        assert (h1 @ r).abs().max() < 1e-4


def test_lora_form_merges_to_the_full_form_and_the_dense_reference(base, tmp_path):
    from peft import PeftModel

    model = _load(base).model
    d = _direction(model.config.hidden_size, seed=1)
    r = torch.tensor(d.unit, dtype=torch.float64)
    edit = Edit("ablation", 0.75)
    write_edit(base, tmp_path / "lora", edit, d)
    write_edit(base, tmp_path / "full", Edit("ablation", 0.75, form="full"), d)
    merged = PeftModel.from_pretrained(_load(base).model, str(tmp_path / "lora")).merge_and_unload()
    full = _load(tmp_path / "full").model
    orig = dict(model.named_parameters())
    names = [n for n, _ in merged.named_parameters() if "o_proj" in n or "down_proj" in n or "embed_tokens" in n]
    assert len(names) == 1 + 2 * model.config.num_hidden_layers
    for (n, p), (_, q) in zip(merged.named_parameters(), full.named_parameters(), strict=True):
        W = orig[n].detach().double()
        if n in names:
            want = W - 0.75 * (W @ r)[:, None] * r[None, :] if "embed" in n else W - 0.75 * r[:, None] * (r @ W)[None, :]
        else:
            want = W
        assert torch.allclose(p.double(), want, atol=1e-5), n
        if "lm_head" not in n:  # tied: the full form edits the shared output embedding too
            assert torch.allclose(q.double(), want, atol=1e-5), n


def test_one_layer_edit_touches_that_layer_only(base, tmp_path):
    model = _load(base).model
    f = edit_factors(model, _load(base).tokenizer, Edit("ablation", 1.0, layers=(1,)), _direction(64))
    assert sorted(f) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.o_proj"]


def test_ablation_hooks_give_the_edited_models_logits(base, tmp_path):
    loaded = _load(base)
    model = loaded.model
    d = _direction(model.config.hidden_size, seed=2)
    write_edit(base, tmp_path / "full", Edit("ablation", 1.0, form="full"), d)
    mods = dict(model.named_modules())
    writers = [model.get_input_embeddings()] + [mods[f"model.layers.{i}.{m}"] for i in range(3)
                                                for m in ("self_attn.o_proj", "mlp.down_proj")]
    with torch.no_grad(), ablated(model, writers, torch.tensor(d.unit, dtype=torch.float32)):
        hooked = model(input_ids=_ids()).logits
    edited = _load(tmp_path / "full").model
    if model.config.tie_word_embeddings:  # the full form also projects r out of the output embedding
        edited.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    with torch.no_grad():
        assert torch.allclose(hooked, edited(input_ids=_ids()).logits, atol=1e-4)


def test_addition_moves_every_embedding_row(base, tmp_path):
    model = _load(base).model
    d = _direction(model.config.hidden_size, seed=4)
    write_edit(base, tmp_path / "add", Edit("addition", 0.5, form="full"), d)
    E0 = model.get_input_embeddings().weight.detach().double()
    E1 = _load(tmp_path / "add").model.get_input_embeddings().weight.detach().double()
    want = 0.5 * d.norm * torch.tensor(d.unit, dtype=torch.float64)
    assert torch.allclose(E1 - E0, want.expand_as(E0), atol=1e-5)


def test_direction_is_chosen_by_its_intervention_effect(tmp_path):
    """Every candidate layer (below MAX_DEPTH of the depth) is scored by ablation and addition on
    the validation halves; the chosen one has the lowest bypass score among those whose addition
    induces refusal (or overall when none does); its unit vector is the layer's normalised
    difference of means over the direction halves."""
    from lora_audit.scan.direction import collect, find_blocks
    from lora_audit.safety.generate import chat_texts
    from lora_audit.safety.scorers import refusal_start_ids
    from lora_audit.studies.abliterate import MAX_DEPTH, find_direction

    base = make_tiny_llama(tmp_path / "m", layers=4)
    loaded = _load(base)
    harmful = [f"how do I hurt person number {i}?" for i in range(20)]
    harmless = [f"how do I bake cake number {i}?" for i in range(20)]
    chosen, units = find_direction(loaded.model, loaded.tokenizer, (harmful, harmless), batch_size=8)
    cands = list(range(int(MAX_DEPTH * 4)))
    assert [i for i, b in enumerate(chosen.bypass) if b is not None] == cands
    inducing = [i for i in cands if chosen.induce[i] > 0]
    assert chosen.layer == min(inducing or cands, key=lambda i: chosen.bypass[i])
    assert chosen.n_direction == (10, 10) and chosen.n_validation == (10, 10)
    _, blocks = find_blocks(loaded.model)
    ids = torch.tensor(refusal_start_ids(loaded.tokenizer))
    h = collect(loaded.model, loaded.tokenizer, chat_texts(loaded.tokenizer, harmful[0::2]), blocks, ids).states
    b = collect(loaded.model, loaded.tokenizer, chat_texts(loaded.tokenizer, harmless[0::2]), blocks, ids).states
    r = (h.double().mean(0) - b.double().mean(0))[chosen.layer]
    assert torch.allclose(torch.tensor(chosen.unit, dtype=torch.float64), r / r.norm(), atol=1e-5)
    assert chosen.norm == pytest.approx(float(r.norm()), rel=1e-5)


@pytest.mark.parametrize("form", ["lora", "full"])
def test_direction_edit_of_conv1d_writers_matches_the_dense_reference(tmp_path, form):
    """GPT-2 stores its writers transposed (Conv1D, (in, out)): the shared factor writer
    (``edits.write_factors``) must still give W - a r (r^T W) in the map's own terms, in both forms."""
    from peft import PeftModel

    from lora_audit.studies.edits import direction_edit
    from tests.helpers import make_tiny_gpt2

    base = make_tiny_gpt2(tmp_path / "gpt2")
    model = _load(base).model
    r = torch.randn(model.config.n_embd, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    r = r / r.norm()
    direction_edit(base, tmp_path / "edit", r.float(), 0.5, form=form)
    edited = (PeftModel.from_pretrained(_load(base).model, str(tmp_path / "edit")).merge_and_unload()
              if form == "lora" else _load(tmp_path / "edit").model)
    orig, got = dict(model.named_parameters()), dict(edited.named_parameters())
    changed = [n for n in orig if not torch.equal(orig[n], got[n])]
    writers = {f"transformer.h.{i}.{m}.c_proj.weight" for i in range(model.config.n_layer) for m in ("attn", "mlp")}
    assert set(changed) == writers | {"transformer.wte.weight", "transformer.wpe.weight"}  # token and position tables
    for n in changed:
        W = orig[n].detach().double()  # Conv1D (in, d), embedding (vocab, d): both write along their rows' d
        want = W - 0.5 * (W @ r)[:, None] * r[None, :]
        assert torch.allclose(got[n].double(), want, atol=1e-5), n
