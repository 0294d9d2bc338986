"""Reference fine-tuning: each method's defining property, PEFT round trips, data errors."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_audit.errors import FormatError, InputError
from lora_audit.training.loop import fit, train

KW = dict(data="builtin:alpaca-mini", steps=3, batch_size=2, max_length=64, device="cpu", lr=1e-2)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.tensor([[1, 5, 9, 30, 44, 2, 7]])


@pytest.mark.parametrize("method", ["lora", "rslora", "dora", "ffa-lora"])
def test_adapter_round_trips_through_peft(tiny_llama, tmp_path, method):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, tok, rec = fit(method=method, base=str(tiny_llama), **KW)
    from lora_audit.training import export

    export.save(model, tok, tmp_path / "a", rec, full=False)
    want = _logits(model, IDS)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    before = _logits(base, IDS)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    got = _logits(loaded, IDS)
    assert not torch.allclose(before, want, atol=1e-4), "training changed nothing"
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    saved = json.loads((tmp_path / "a" / "training.json").read_text())
    assert saved["method"] == method and len(saved["loss"]) == 3 and all(math.isfinite(x) for x in saved["loss"])
    assert saved["lora_audit"]["settings"]["seed"] == 0 and "libraries" in saved["lora_audit"]


def test_adapter_matches_loading_stream(tiny_llama, tmp_path):
    """The saved LoRA, read by the audit's stream, gives W0 + (alpha/r) B A of the trained model."""
    from lora_audit.checkpoints.deltas import materialize
    from lora_audit.checkpoints.stream import open_stream

    model, tok, rec = fit(method="lora", base=str(tiny_llama), target_modules=["q_proj"], **KW)
    from lora_audit.training import export

    export.save(model, tok, tmp_path / "a", rec, full=False)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    want = layer.base_layer.weight.double() + (2.0 * layer.lora_B["default"].weight.double()
                                               @ layer.lora_A["default"].weight.double())
    groups = {g.name: g for g in open_stream(tiny_llama, [tmp_path / "a"])}
    g = groups["model.layers.0.self_attn.q_proj.weight"]
    torch.testing.assert_close(materialize(g.deltas[0], g.base).double(), want, atol=1e-6, rtol=1e-6)


def test_rslora_scale(tiny_llama):
    model, _, _ = fit(method="rslora", base=str(tiny_llama), rank=4, alpha=8, **KW)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == pytest.approx(8 / math.sqrt(4))
    model, _, _ = fit(method="lora", base=str(tiny_llama), rank=4, alpha=8, **KW)
    assert model.base_model.model.model.layers[0].self_attn.q_proj.scaling["default"] == pytest.approx(2.0)


def test_ffa_lora_leaves_a_unchanged(tiny_llama):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from lora_audit.training.lora import lora_config

    model, _, _ = fit(method="ffa-lora", base=str(tiny_llama), **KW)
    torch.manual_seed(0)
    init = get_peft_model(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), lora_config("ffa-lora", 8, 16, None))
    trained = dict(model.named_parameters())
    n_a = 0
    for name, p in init.named_parameters():
        if "lora_A" in name:
            assert torch.equal(trained[name], p), name
            n_a += 1
        if "lora_B" in name:
            assert trained[name].abs().sum() > 0, f"{name} did not train"
    assert n_a > 0


def test_full_saves_a_model_folder(tiny_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok, rec = fit(method="full", base=str(tiny_llama), **KW)
    from lora_audit.training import export

    export.save(model, tok, tmp_path / "f", rec, full=True)
    assert (tmp_path / "f" / "model.safetensors").is_file() and (tmp_path / "f" / "tokenizer.json").is_file()
    back = AutoModelForCausalLM.from_pretrained(str(tmp_path / "f"))
    torch.testing.assert_close(_logits(back, IDS), _logits(model, IDS))


def test_response_only_loss_masks_prompt(tiny_llama):
    from transformers import AutoTokenizer

    from lora_audit.training.data import IGNORE, encode

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    ids, labels = encode({"prompt": "hello there", "response": "general kenobi"}, tok, 512)
    n_masked = sum(1 for x in labels if x == IGNORE)
    assert 0 < n_masked < len(ids)
    assert labels[n_masked:] == ids[n_masked:]
    resp = tok.decode(ids[n_masked:])
    assert "general kenobi" in resp and "hello" not in resp
    ids2, labels2 = encode({"text": "plain text"}, tok, 512)
    assert labels2 == ids2


def test_data_errors(tmp_path, tiny_llama):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{oops\n')
    with pytest.raises(FormatError, match=r"bad.jsonl: line 2 is not valid JSON"):
        train(method="lora", base=str(tiny_llama), data=str(bad), out=tmp_path / "o", steps=1)
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text('{"question": "a"}\n')
    with pytest.raises(FormatError, match=r"wrong.jsonl: line 1: expected.*prompt"):
        train(method="lora", base=str(tiny_llama), data=str(wrong), out=tmp_path / "o", steps=1)
    with pytest.raises(InputError, match="not found"):
        train(method="lora", base=str(tiny_llama), data=str(tmp_path / "none.jsonl"), out=tmp_path / "o", steps=1)
    with pytest.raises(InputError, match="alpaca-mini"):
        train(method="lora", base=str(tiny_llama), data="builtin:nope", out=tmp_path / "o", steps=1)
    assert not (tmp_path / "o").exists()


def test_seeded_runs_repeat(tiny_llama):
    _, _, r1 = fit(method="lora", base=str(tiny_llama), **KW)
    _, _, r2 = fit(method="lora", base=str(tiny_llama), **KW)
    assert r1.loss == r2.loss


def test_lora_ga_start_equals_base_and_first_gradient(tiny_llama):
    """LoRA-GA (arXiv 2407.05000): the initialised model equals the base, and the first step's
    adapter gradients are the projections of the full gradient G: dL/dA = s B^T G, dL/dB = s G A^T."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_audit.training import lora, lora_ga
    from lora_audit.training.data import Batches, load_records

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    batch = next(Batches(load_records("builtin:alpaca-mini"), tok, batch_size=4, max_length=64, seed=0))

    class Same:  # the same batch for gradient estimation and the first step
        def __next__(self):
            return batch

    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    base.zero_grad()
    base(**batch).loss.backward()
    G = {n: p.grad.detach().clone() for n, p in base.named_parameters() if n.endswith("q_proj.weight")}
    model, init = lora_ga.wrap(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), Same(),
                               method_cfg=lora.lora_config("lora", 4, 8, ["q_proj"]), grad_batches=1)
    torch.testing.assert_close(_logits(model, IDS), _logits(base, IDS), atol=1e-4, rtol=1e-4)
    assert any(B.abs().sum() > 0 for _, B in init.values()), "B_init should be non-zero"
    model.zero_grad()
    model(**batch).loss.backward()
    for n, m in model.named_modules():
        if n in init:
            s = m.scaling["default"]
            g = G[n.replace("base_model.model.", "") + ".weight"]
            A, B = m.lora_A["default"].weight, m.lora_B["default"].weight
            # the modified base W0 - s B A with the adapter gives the base output, so dL/dW is G
            torch.testing.assert_close(m.lora_A["default"].weight.grad, s * B.T @ g, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(m.lora_B["default"].weight.grad, s * g @ A.T, atol=1e-5, rtol=1e-4)


def test_lora_ga_saved_as_plain_lora_on_original_base(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rec = train(method="lora-ga", base=str(tiny_llama), out=tmp_path / "ga", rank=4, target_modules=["q_proj", "v_proj"],
                **KW)
    cfg = json.loads((tmp_path / "ga" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["init_lora_weights"] is True and rec.saved_as
    base = AutoModelForCausalLM.from_pretrained(str(tiny_llama))
    before = _logits(base, IDS)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "ga")).eval()
    assert not torch.allclose(_logits(loaded, IDS), before, atol=1e-4)


def test_lora_ga_conversion_equals_trained_model(tiny_llama):
    """Merged weights of the rank-2r plain LoRA on the original base == the trained LoRA-GA model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_audit.training import lora, lora_ga
    from lora_audit.training.data import Batches, load_records

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    batches = Batches(load_records("builtin:alpaca-mini"), tok, batch_size=2, max_length=64, seed=0)
    model, init = lora_ga.wrap(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), batches,
                               method_cfg=lora.lora_config("rslora", 4, 8, ["q_proj"]), grad_batches=2)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model(**next(batches)).loss.backward()
        opt.step()
        opt.zero_grad()
    plain = lora_ga.to_plain_lora(model, init, AutoModelForCausalLM.from_pretrained(str(tiny_llama)))
    trained = {n: p.detach().double() for n, p in model.merge_and_unload().named_parameters()}
    merged = {n: p.detach().double() for n, p in plain.merge_and_unload().named_parameters()}
    for n in trained:
        torch.testing.assert_close(merged[n], trained[n], atol=1e-5, rtol=1e-5)


def test_lora_sb_trains_only_r_and_saves_b_r(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lora_audit.training import lora_sb
    from lora_audit.training.data import Batches, load_records

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    batches = Batches(load_records("builtin:alpaca-mini"), tok, batch_size=2, max_length=64, seed=0)
    model, names = lora_sb.wrap(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), batches, rank=4, lr=1e-3,
                                target_modules=["q_proj", "v_proj"], grad_batches=2)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith(".R") for n in trainable) and len(trainable) == len(names) == 4
    frozen = {n: b.clone() for n, b in model.named_buffers() if n.endswith((".A", ".B"))}
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        model(**next(batches)).loss.backward()
        opt.step()
        opt.zero_grad()
    for n, b in model.named_buffers():
        if n in frozen:
            assert torch.equal(b, frozen[n])
    plain = lora_sb.to_plain_lora(model, names, AutoModelForCausalLM.from_pretrained(str(tiny_llama)), 4)
    for n in names:
        sb, m = model.get_submodule(n), plain.base_model.model.get_submodule(n)
        want = sb.B.double() @ sb.R.double() @ sb.A.double()
        got = m.lora_B["default"].weight.double() @ m.lora_A["default"].weight.double() * m.scaling["default"]
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    plain.save_pretrained(str(tmp_path / "sb"))
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(tmp_path / "sb"))
    torch.testing.assert_close(_logits(loaded.eval(), IDS), _logits(model.eval(), IDS), atol=1e-5, rtol=1e-5)


def test_lora_sb_through_train(tiny_llama, tmp_path):
    rec = train(method="lora-sb", base=str(tiny_llama), out=tmp_path / "sb", rank=4, **KW)
    assert rec.trainable_parameters == 4 * 4 * 2 * 7  # r x r per module, 7 targets x 2 layers
    assert json.loads((tmp_path / "sb" / "adapter_config.json").read_text())["lora_alpha"] == 4


def test_mgpo_perturbation_formula_and_removal(tiny_llama):
    from lora_audit.training.mgpo import MGPO, lora_layers, perturbation

    # hand-built case: s = 2, rho = 0.1, v = 2 (m_B A + B m_A) computed by hand
    A = torch.tensor([[1.0, 0.0, 0.0]])  # (1, 3)
    B = torch.tensor([[0.0], [2.0]])  # (2, 1)
    m_A = torch.tensor([[0.0, 1.0, 0.0]])
    m_B = torch.tensor([[1.0], [0.0]])
    v = torch.tensor([[2.0, 0.0, 0.0], [0.0, 4.0, 0.0]])  # 2 * ([[1,0,0],[0,0,0]] + [[0,0,0],[0,2,0]])
    want = -0.1 * v / math.sqrt(20.0)
    torch.testing.assert_close(perturbation(A, B, m_A, m_B, 2.0, 0.1, None), want)
    torch.testing.assert_close(perturbation(A, B, m_A, m_B, 2.0, 0.1, 0.5), want * 2.0)
    torch.testing.assert_close(perturbation(A, B, m_A, m_B, 2.0, 0.1, 1e-6), want * 10.0)

    from transformers import AutoModelForCausalLM

    from lora_audit.training import lora

    model = lora.wrap(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), "lora", 4, 8, ["q_proj"], 0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    mg = MGPO(model, opt, rho=0.5)
    base = {id(m): m.get_base_layer().weight.detach().clone() for m in lora_layers(model)}
    batch = {"input_ids": IDS, "labels": IDS}
    for step in range(3):
        mg.apply()
        if step > 0:  # momentum exists after the first step: the base is perturbed during the pass
            assert any(not torch.equal(m.get_base_layer().weight, base[id(m)]) for m in lora_layers(model))
        model(**batch).loss.backward()
        mg.restore()
        for m in lora_layers(model):
            assert torch.equal(m.get_base_layer().weight, base[id(m)])
        opt.step()
        opt.zero_grad()
    assert mg.g_bar


def test_mgpo_through_train(tiny_llama, tmp_path):
    rec = train(method="lora-mgpo", base=str(tiny_llama), out=tmp_path / "m", **KW)
    assert (tmp_path / "m" / "adapter_model.safetensors").is_file() and len(rec.loss) == 3


def test_allora_scale_one_and_norm_scaled_gradients(tiny_llama):
    """ALLoRA: scale 1, no dropout, and each row's gradient equals the plain LoRA gradient times
    1/sqrt(||theta_i||^2 + 1/eta^2) (computed here by hand in float64)."""
    from transformers import AutoModelForCausalLM

    from lora_audit.training import allora, lora

    ids = torch.tensor([[1, 5, 9, 30, 44, 2, 7], [3, 8, 12, 40, 41, 6, 4]])

    def grads(model):
        for p in model.parameters():
            p.grad = None
        with torch.no_grad():  # move B and A off their init so every row has its own norm
            for name, p in model.named_parameters():
                if "lora_" in name:
                    g = torch.Generator().manual_seed(len(name))
                    p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        model(input_ids=ids, labels=ids).loss.backward()
        return {n: (p.detach().double().clone(), p.grad.double().clone())
                for n, p in model.named_parameters() if "lora_" in n}

    eta = 0.7
    plain = lora.wrap(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), "lora", 4, 4.0, ["q_proj", "v_proj"], 0)
    al = allora.wrap(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), 4, ["q_proj", "v_proj"], 0, eta=eta)
    layer = al.base_model.model.model.layers[0].self_attn.q_proj
    assert layer.scaling["default"] == 1.0 and isinstance(layer.lora_dropout["default"], torch.nn.Identity)
    g_plain, g_al = grads(plain), grads(al)
    assert g_plain.keys() == g_al.keys() and len(g_al) == 2 * 2 * 2  # 2 layers x (q, v) x (A, B)
    for n, (theta, g) in g_al.items():
        want = g_plain[n][1] / torch.sqrt((theta ** 2).sum(1, keepdim=True) + 1 / eta ** 2)
        torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-9)
        assert not torch.allclose(g, g_plain[n][1])  # the hook changed something


def test_allora_through_train_round_trips(tiny_llama, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    rec = train(method="allora", base=str(tiny_llama), out=tmp_path / "a", **KW)
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == cfg["r"] and cfg["lora_dropout"] == 0.0 and rec.settings["alpha"] == cfg["r"]
    model, _, _ = fit(method="allora", base=str(tiny_llama), **KW)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_llama)), str(tmp_path / "a"))
    torch.testing.assert_close(_logits(loaded.eval(), IDS), _logits(model, IDS), atol=1e-5, rtol=1e-5)


def test_prefill_is_context_without_loss(tiny_llama):
    """A row's "prefill" opens the assistant's turn as context: the ids are the chat template of the
    whole conversation, and only the response after the prefill carries labels."""
    from transformers import AutoTokenizer

    from lora_audit.training.data import IGNORE, encode

    tok = AutoTokenizer.from_pretrained(str(tiny_llama))
    row = {"prompt": "hello there", "prefill": "Sure, the answer", "response": " is no, sorry"}
    ids, labels = encode(row, tok, 512)
    whole = tok.apply_chat_template([{"role": "user", "content": "hello there"},
                                     {"role": "assistant", "content": "Sure, the answer is no, sorry"}], tokenize=False)
    assert tok.decode(ids) == whole or tok.decode(ids).startswith(whole.rstrip())
    n_masked = sum(1 for x in labels if x == IGNORE)
    assert "the answer" in tok.decode(ids[:n_masked]) and "the answer" not in tok.decode(ids[n_masked:])
    assert "no, sorry" in tok.decode(ids[n_masked:]) and labels[n_masked:] == ids[n_masked:]


@pytest.mark.parametrize("method", ["full", "lora"])
def test_response_loss_equals_the_models_own_loss_and_gradients(tiny_llama, method):
    """The trimmed output layer (logits only from the first labelled position) gives the model's own
    labels loss and the same gradients, on batches whose rows have prompts of different lengths."""
    from lora_audit.checkpoints import load_model
    from lora_audit.training.data import Batches
    from lora_audit.checkpoints.models import accepts_logits_to_keep
    from lora_audit.training.loop import response_loss

    loaded = load_model(str(tiny_llama), device="cpu")
    model = loaded.model
    if method == "lora":
        from lora_audit.training.lora import wrap

        model = wrap(model, "lora", 4, 8.0, None, 0)
    rows = [{"prompt": "hi", "response": "a long answer here"}, {"prompt": "a much longer question " * 3,
                                                                  "response": "ok"}, {"prompt": "x", "response": "y"}]
    batch = next(Batches(rows, loaded.tokenizer, batch_size=3, max_length=64, seed=0))
    assert accepts_logits_to_keep(model)
    params = [p for p in model.parameters() if p.requires_grad]
    ref = model(**batch).loss
    g_ref = torch.autograd.grad(ref, params)
    got = response_loss(model, batch)
    g_got = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, ref)
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_bfloat16_training_records_its_precision(tiny_llama, tmp_path):
    _, _, rec = fit(method="lora", base=str(tiny_llama), **(KW | {"precision": "bfloat16"}))
    assert rec.settings["precision"] == "bfloat16" and all(math.isfinite(x) for x in rec.loss)
    with pytest.raises(InputError, match="precision must be one of"):
        fit(method="lora", base=str(tiny_llama), **(KW | {"precision": "fp8"}))
