"""Refusal-edit detection: the null law of the energy share against Monte Carlo and closed forms,
each matrix's energy against a dense float64 r^T dW, and end to end on a refusing tiny Llama:
abliterations (LoRA or full weights, one layer or all, every strength, a direction from other
prompts and another layer than the tool's) and over-refusal edits are flagged with their sign;
an equal-norm random adapter, a random-init PEFT LoRA, a trained LoRA and a full fine-tune are not."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lora_audit.checkpoints.deltas import Dense, DoRA, LowRank
from lora_audit.cli import cli
from lora_audit.scan import ScanConfig, run_safety_scan
from lora_audit.scan.tamper import ALPHA, MIN_SHARE, RefusalEdit, flag, measure_matrix, share_floor, share_tail

from ..helpers import make_peft_adapter
from .conftest import WORDS


# ---- the null law ----------------------------------------------------------------------------
def _monte_carlo(w, d, q, n=400_000, seed=0) -> float:
    """P(sum_i w_i z_i^2 / ||z||^2 >= q) by drawing z ~ N(0, I_d) (the first k coordinates and a
    chi-square for the rest)."""
    rng = np.random.default_rng(seed)
    w = np.asarray(w, dtype=float) / np.sum(w)
    z2 = rng.standard_normal((n, len(w))) ** 2
    rest = rng.chisquare(d - len(w), n) if d > len(w) else 0.0
    return float(((z2 * w).sum(axis=1) / (z2.sum(axis=1) + rest) >= q).mean())


def test_rank_one_tail_is_the_t_distribution():
    """A rank-1 update: the share is (r . u)^2 for a uniform unit u, so P(share >= q) =
    P(|t_{d-1}| >= sqrt((d-1) q / (1-q)))."""
    from scipy.stats import t

    for d, q in ((64, 0.05), (64, 0.3), (576, 0.02), (4096, 0.01)):
        want = 2 * t.sf(math.sqrt((d - 1) * q / (1 - q)), d - 1)
        assert share_tail([3.0], d, q) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("w, d, q", [([1, 1, 1, 1], 64, 0.06), ([3, 1], 64, 0.1), ([5, 2, 1, 0.5], 64, 0.09),
                                     ([5, 2, 1, 0.5], 576, 0.012), (list(np.linspace(1, 0.05, 40)), 64, 0.024),
                                     ([3, 1, 1], 64, 0.06), ([3, 1, 1], 64, 0.01)])
def test_tail_matches_monte_carlo(w, d, q):
    mc = _monte_carlo(w, d, q)
    got = share_tail(w, d, q)
    assert mc > 2e-4  # enough hits for a 10 % comparison
    assert got == pytest.approx(mc, rel=0.1, abs=2e-4)


def test_tail_edges():
    assert share_tail([1.0, 1.0], 64, 0.0) == 1.0
    assert share_tail([2.0, 1.0], 64, 2 / 3) == 0.0  # the share never exceeds the largest weight
    assert share_tail([], 64, 0.5) == 1.0
    assert share_tail([1.0] * 8, 8, 1 / 8) == 1.0  # equal weights over the whole stream: always 1/d


def test_flag_is_bonferroni_with_an_effect_floor():
    edits = [RefusalEdit("a", 0.5, 5e-3, 1.0, 1), RefusalEdit("b", 0.5, 1e-4, 1.0, 1),
             RefusalEdit("c", MIN_SHARE / 2, 1e-30, 1.0, 1), RefusalEdit("d", 0.01, 0.5, None, 3)]
    assert [e.name for e in flag(edits, 4096)] == ["b"]  # 5e-3 is not below 0.01 / 4; c is below the floor
    assert ALPHA / len(edits) == 0.0025
    assert share_floor(4096) == MIN_SHARE and share_floor(64) == pytest.approx(10 / 64)
    assert [e.name for e in flag([RefusalEdit("e", 0.12, 1e-6, 1.0, 1)], 64)] == []  # 7.7x chance at d = 64


# ---- one matrix against a dense float64 reference --------------------------------------------
def _reference(dW: torch.Tensor, W0: torch.Tensor, u: torch.Tensor):
    dW, W0, u = dW.double(), W0.double(), u.double()
    rdW = u @ dW  # (d,) @ (d, n)
    s = np.linalg.svd(dW.numpy(), compute_uv=False)
    own = u @ W0
    return float(rdW @ rdW) / float((dW * dW).sum()), -float(rdW @ own) / float(own @ own), int((s > s[0] * 1e-6).sum())


@pytest.mark.parametrize("form", ["lowrank", "dense", "dora", "embedding"])
def test_energy_matches_dense_float64(form):
    g = torch.Generator().manual_seed(7)
    d, n, r = 48, 80, 4
    u = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    W0 = torch.randn(d, n, generator=g)
    B, A = torch.randn(d, r, generator=g), torch.randn(r, n, generator=g)
    if form == "lowrank":
        delta, dW = LowRank(B=B, A=A, scale=0.5), 0.5 * (B.double() @ A.double())
    elif form == "dense":
        W1 = W0 + 0.1 * torch.randn(d, n, generator=g)
        delta, dW = Dense(W1), W1.double() - W0.double()
    elif form == "dora":
        mag = W0.norm(dim=1) * (1 + 0.1 * torch.rand(d, generator=g))
        delta = DoRA(B=B, A=A, scale=0.2, magnitude=mag)
        V = W0.double() + 0.2 * (B.double() @ A.double())
        dW = mag.double()[:, None] * V / V.norm(dim=1, keepdim=True) - W0.double()
    else:  # an embedding table (vocab x d): the stream on the columns, its LoRA delta (vocab x r)(r x d)
        E0 = torch.randn(n, d, generator=g)
        Bv, Ad = torch.randn(n, r, generator=g), torch.randn(r, d, generator=g)
        e = measure_matrix("embed", LowRank(B=Bv, A=Ad, scale=2.0), E0, u, embedding=True)
        share, removed, rank = _reference((2.0 * (Bv.double() @ Ad.double())).T, E0.T, u)
        assert e.share == pytest.approx(share, rel=1e-9) and e.removed == pytest.approx(removed, rel=1e-9)
        assert e.rank == rank == r
        return
    e = measure_matrix("m", delta, W0, u)
    share, removed, rank = _reference(dW, W0, u)
    assert e.share == pytest.approx(share, rel=1e-6) and e.removed == pytest.approx(removed, rel=1e-6)
    assert e.rank == rank
    assert 0 <= e.p_value <= 1


def test_an_abliteration_of_one_matrix_is_rank_one_along_r():
    g = torch.Generator().manual_seed(8)
    d, n = 64, 96
    u = torch.nn.functional.normalize(torch.randn(d, generator=g, dtype=torch.float64), dim=0)
    W0 = torch.randn(d, n, generator=g, dtype=torch.float64)
    e = measure_matrix("m", LowRank(B=-0.7 * u[:, None], A=(u @ W0)[None, :], scale=1.0), W0, u)
    assert e.share == pytest.approx(1.0) and e.removed == pytest.approx(0.7) and e.sign == "removes"
    assert e.p_value < 1e-40 and e.rank == 1
    e = measure_matrix("m", LowRank(B=0.5 * u[:, None], A=(u @ W0)[None, :], scale=1.0), W0, u)
    assert e.removed == pytest.approx(-0.5) and e.sign == "adds"


# ---- end to end on a refusing tiny Llama -----------------------------------------------------
def _other_prompts(n: int = 16) -> tuple[list[str], list[str]]:
    """Prompts the scan never reads (other words, other wording), ending like the model's cues."""
    other = [w.upper() for w in WORDS]
    return ([f"give me {other[i % len(other)]} now {i}!" for i in range(n)],
            [f"where is {other[(i + 3) % len(other)]} today {i}?" for i in range(n)])


@pytest.fixture(scope="module")
def other_direction(refusing_llama):
    """A direction from other prompts than the tool's, at layer 1 (the tool's causal test picks 0)."""
    from lora_audit.studies.edits import refusal_direction_of

    h, b = _other_prompts()
    r, layer, _ = refusal_direction_of(refusing_llama, h, b, layer=1, chat_template="{{ messages[0]['content'] }}")
    assert layer == 1
    return r


@pytest.fixture(scope="module")
def scan_cfg(scan_prompts, tmp_path_factory):
    return ScanConfig(prompts=str(scan_prompts[0]), benign=str(scan_prompts[1]), chat_template=str(scan_prompts[2]),
                      device="cpu", cache_dir=str(tmp_path_factory.mktemp("tamper-profiles")))


def _scan(base, tuned, cfg, **kw):
    from dataclasses import replace

    result = run_safety_scan(str(base), [str(t) for t in tuned], replace(cfg, **kw))
    return [result.models[str(t)] for t in tuned], result


@pytest.fixture(scope="module")
def edits(refusing_llama, other_direction, tmp_path_factory):
    from lora_audit.studies.edits import direction_edit

    out = tmp_path_factory.mktemp("edits")
    made = {}
    for name, kw in {"abl-lora-1.0": dict(strength=1.0), "abl-lora-0.5": dict(strength=0.5),
                     "abl-lora-0.25": dict(strength=0.25), "abl-full-1.0": dict(strength=1.0, form="full"),
                     "abl-full-layer1": dict(strength=1.0, form="full", layers=[1]),
                     "abl-lora-layer0": dict(strength=1.0, layers=[0], embeddings=False),
                     "over-lora": dict(strength=-1.0)}.items():
        direction_edit(refusing_llama, out / name, other_direction, **kw)
        made[name] = out / name
    return made


def test_abliterations_are_flagged_weights_only(refusing_llama, edits, scan_cfg):
    names = [n for n in edits if n.startswith("abl")]
    models, result = _scan(refusing_llama, [edits[n] for n in names], scan_cfg, weights_only=True)
    assert result.direction.causal.layer == 0
    want = {"abl-lora-1.0": 5, "abl-lora-0.5": 5, "abl-lora-0.25": 5, "abl-full-1.0": 5, "abl-full-layer1": 2,
            "abl-lora-layer0": 2}  # 4 writers and the embedding table; layer 1's two writers; layer 0's
    for name, m in zip(names, models, strict=True):
        assert m.refusal_edits == want[name] == m.refusal_edits_removing, (name, m.refusal_edit_matrices)
        assert m.refusal_edits_adding == 0 and m.stream_matrices_changed == want[name]
        assert all(e["share"] > 0.5 and e["sign"] == "removes" for e in m.refusal_edit_matrices)
        assert m.signals["refusal_edit_max_share"] == max(e["share"] for e in m.refusal_edit_matrices)
        assert "REFUSAL EDITS" in m.verdict_line
    assert {e["name"] for e in models[names.index("abl-full-layer1")].refusal_edit_matrices} == \
        {"model.layers.1.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"}


def test_edits_that_remove_refusal_are_flagged_and_the_proxy_sees_it(refusing_llama, edits, scan_cfg):
    """The full scan: every abliteration whose forward pass loses 30 points or more of first-token
    refusal is flagged (they all are, whatever the strength)."""
    names = ["abl-lora-1.0", "abl-lora-0.5", "abl-full-1.0"]
    models, _ = _scan(refusing_llama, [edits[n] for n in names], scan_cfg)
    drops = {n: m.signals["first_token_drop"] for n, m in zip(names, models, strict=True)}
    assert drops["abl-lora-1.0"] >= 0.3 and drops["abl-full-1.0"] >= 0.3, drops
    assert all(m.refusal_edits > 0 for m in models)


def test_an_over_refusal_edit_is_flagged_as_adding(refusing_llama, edits, scan_cfg):
    (m,), _ = _scan(refusing_llama, [edits["over-lora"]], scan_cfg, weights_only=True)
    assert m.refusal_edits == m.refusal_edits_adding == 5 and m.refusal_edits_removing == 0
    assert "add to it" in m.verdict_line


def _equal_norm_random(base, abliteration, out, seed=11):
    """A rank-1 LoRA on the same matrices as ``abliteration`` whose update has the same Frobenius
    norm per matrix, in random directions."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(abliteration, out)
    t = load_file(str(out / "adapter_model.safetensors"))
    g = torch.Generator().manual_seed(seed)
    new = {}
    for k, v in t.items():
        if k.endswith("lora_A.weight") or k.endswith("lora_embedding_A"):
            kb = k.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")
            norm = float(t[kb].norm() * v.norm())  # ||b a^T||_F = ||b|| ||a|| for rank 1
            a, b = torch.randn(v.shape, generator=g), torch.randn(t[kb].shape, generator=g)
            new[k], new[kb] = a / a.norm() * math.sqrt(norm), b / b.norm() * math.sqrt(norm)
    save_file(new, str(out / "adapter_model.safetensors"))
    return out


def test_benign_updates_are_not_flagged(refusing_llama, edits, scan_cfg, scan_adapter, scan_full, tmp_path):
    from lora_audit.training.loop import train

    random_eq = _equal_norm_random(refusing_llama, edits["abl-lora-1.0"], tmp_path / "random")
    init = make_peft_adapter(refusing_llama, tmp_path / "init", seed=3, init_scale=0.02)  # random-init LoRA
    trained = tmp_path / "trained"
    train(method="lora", base=str(refusing_llama), data="builtin:alpaca-mini", out=trained, steps=6, batch_size=2,
          lr=1e-2, seed=0, device="cpu", target_modules=["o_proj", "down_proj", "q_proj", "v_proj"])
    tuned = [random_eq, init, trained, scan_adapter, scan_full]
    models, _ = _scan(refusing_llama, tuned, scan_cfg, weights_only=True)
    for t, m in zip(tuned, models, strict=True):
        assert m.refusal_edits == 0, (t, m.refusal_edit_matrices)
        assert m.signals["refusal_edit_max_share"] < share_floor(64)
        assert m.stream_matrices_changed >= 4
    assert "no edit along BASE's refusal direction" in models[0].verdict_line


def test_gate_sarif_and_summary(refusing_llama, edits, scan_prompts, scan_adapter, tmp_path):
    from lora_audit.report.sarif import sarif_log
    from lora_audit.results import load_result

    args = ["safety-scan", str(refusing_llama), str(edits["abl-lora-1.0"]), str(scan_adapter), "--prompts",
            str(scan_prompts[0]), "--benign", str(scan_prompts[1]), "--chat-template", str(scan_prompts[2]),
            "--device", "cpu", "--weights-only"]
    out = tmp_path / "scan.json"
    r = CliRunner().invoke(cli, args + ["--json", str(out), "--fail-on", "refusal_edits>0"])
    assert r.exit_code == 3, r.output
    assert "5 (-5)" in r.output and "causal at layer 0" in r.output
    j = json.loads(out.read_text())
    cond = j["gate"]["conditions"][0]
    assert cond["condition"] == "refusal_edits>0" and [m["value"] for m in cond["models"]] == [5, 0]
    assert cond["models"][0]["where"].startswith("model.")
    log = sarif_log(scan=load_result(out))
    (res,) = log["runs"][0]["results"]
    assert res["ruleId"] == "LA040" and res["level"] == "error" and res["properties"]["tuned"] == str(edits["abl-lora-1.0"])
    assert len(res["locations"][0]["logicalLocations"]) == 5
    r = CliRunner().invoke(cli, args[:2] + [str(scan_adapter)] + args[4:] + ["--fail-on", "refusal_edits>0"])
    assert r.exit_code == 0, r.output
