"""Weight-only signals against dense float64 products: each adapter's update is formed from its
file (PEFT's own merge for DoRA) and every statistic computed directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lora_audit.checkpoints import LowRank, open_stream
from lora_audit.scan.weights import MatrixStats, aggregate, dense_top, lowrank_top, matrix_stats


def _reference(dW: torch.Tensor, r: torch.Tensor, dx: torch.Tensor, W0: torch.Tensor) -> dict:
    dW, r, dx = dW.double(), r.double(), dx.double()
    U, S, _ = torch.linalg.svd(dW)
    frob2 = float((dW * dW).sum())
    return {"frob2": frob2, "share": float((r @ dW).square().sum()) / frob2, "shift": float(r @ dW @ dx),
            "base_shift": float(r @ W0.double() @ dx), "top_cos": abs(float(U[:, 0] @ r)),
            "rank1": float(S[0] ** 2) / frob2}


def _check(s: MatrixStats, ref: dict, rel: float = 1e-6) -> None:
    assert s.frob2 == pytest.approx(ref["frob2"], rel=rel)
    assert s.energy_share == pytest.approx(ref["share"], rel=rel, abs=1e-12)
    assert s.shift == pytest.approx(ref["shift"], rel=rel, abs=1e-9)
    assert s.base_shift == pytest.approx(ref["base_shift"], rel=1e-5, abs=1e-6)
    assert s.top_cos == pytest.approx(ref["top_cos"], rel=1e-5, abs=1e-7)
    assert s.rank1_share == pytest.approx(ref["rank1"], rel=rel)


def _unit(d: int, seed: int) -> torch.Tensor:
    r = torch.randn(d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return r / r.norm()


def test_lora_signals_match_the_dense_update(refusing_llama, scan_adapter):
    """dW = (alpha / r) B A from the adapter file, in float64, for every matrix of the stream."""
    cfg = json.loads((scan_adapter / "adapter_config.json").read_text())
    tensors = load_file(str(scan_adapter / "adapter_model.safetensors"))
    seen = 0
    for group in open_stream(str(refusing_llama), [str(scan_adapter)]):
        delta = group.deltas[0]
        assert isinstance(delta, LowRank)
        key = "base_model.model." + group.name[: -len(".weight")]
        B, A = tensors[f"{key}.lora_B.weight"].double(), tensors[f"{key}.lora_A.weight"].double()
        dW = cfg["lora_alpha"] / cfg["r"] * (B @ A)
        r, dx = _unit(dW.shape[0], seen), torch.randn(dW.shape[1], generator=torch.Generator().manual_seed(seen))
        _check(matrix_stats(group.name, delta, group.base, layer=0, r=r, dx=dx), _reference(dW, r, dx, group.base))
        seen += 1
    assert seen == 14  # 7 linear modules x 2 layers


def test_dense_and_dora_signals_match_the_dense_update(refusing_llama, scan_full, scan_dora):
    """A full fine-tune (W1 - W0 from the two files) and DoRA (peft's merged weights - W0)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = load_file(str(refusing_llama / "model.safetensors"))
    full = load_file(str(scan_full / "model.safetensors"))
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(refusing_llama), dtype=torch.float32),
                                       str(scan_dora)).merge_and_unload().state_dict()
    for folder, tuned in ((scan_full, full), (scan_dora, merged)):
        checked = 0
        for i, group in enumerate(open_stream(str(refusing_llama), [str(folder)])):
            dW = tuned[group.name].double() - base[group.name].double()
            r, dx = _unit(dW.shape[0], i), torch.randn(dW.shape[1], generator=torch.Generator().manual_seed(i))
            _check(matrix_stats(group.name, group.deltas[0], group.base, layer=0, r=r, dx=dx),
                   _reference(dW, r, dx, group.base), rel=1e-5)
            checked += 1
        assert checked == (14 if folder == scan_full else 6)


def test_abliteration_edit_has_all_its_energy_along_r():
    """dW = -r r^T W as a rank-1 LoRA: energy share 1, top cosine 1, shift -(r^T W dx): minus the
    matrix's own contribution, so the weight shift is -1."""
    gen = torch.Generator().manual_seed(0)
    W = torch.randn(32, 48, generator=gen, dtype=torch.float64)
    r = _unit(32, 1)
    dx = torch.randn(48, generator=gen, dtype=torch.float64)
    delta = LowRank(B=-r[:, None], A=(r @ W)[None, :], scale=1.0)
    s = matrix_stats("w", delta, W, layer=3, r=r, dx=dx)
    assert s.energy_share == pytest.approx(1.0, abs=1e-12) and s.top_cos == pytest.approx(1.0, abs=1e-12)
    assert s.shift == pytest.approx(-float(r @ W @ dx), rel=1e-12) and s.base_shift == pytest.approx(-s.shift)
    assert s.rank1_share == pytest.approx(1.0, abs=1e-12)
    got = aggregate([s], torch.tensor([True] * 4), d_model=32).signals
    assert got["weight_shift"] == pytest.approx(-1.0 if s.base_shift > 0 else 1.0)


def test_top_pairs_of_factored_and_dense_updates_agree():
    gen = torch.Generator().manual_seed(2)
    B, A = torch.randn(40, 6, generator=gen), torch.randn(6, 70, generator=gen)
    f1, s1, u1 = lowrank_top(B, A, 0.7)
    f2, s2, u2 = dense_top(0.7 * (B.double() @ A.double()))
    assert f1 == pytest.approx(f2, rel=1e-9) and s1 == pytest.approx(s2, rel=1e-9)
    assert abs(float(u1 @ u2)) == pytest.approx(1.0, abs=1e-9)


def test_aggregate_weights_layers_by_energy_and_skips_unstable_ones():
    stats = [MatrixStats("a", 0, frob2=4.0, sigma1_2=4.0, r_energy=1.0, shift=-0.5, base_shift=1.0, top_cos=0.5),
             MatrixStats("b", 0, frob2=1.0, sigma1_2=0.5, r_energy=0.0, shift=0.1, base_shift=-1.0, top_cos=0.1),
             MatrixStats("c", 1, frob2=2.0, sigma1_2=1.0, r_energy=2.0, shift=-3.0, base_shift=2.0, top_cos=0.9),
             MatrixStats("q", None, frob2=3.0, sigma1_2=3.0)]
    got = aggregate(stats, torch.tensor([True, False]), d_model=8).signals
    assert got["refusal_energy_share"] == pytest.approx(1.0 / 5.0)  # layer 1 is not stable
    assert got["refusal_energy_ratio"] == pytest.approx(8 / 5)
    assert got["weight_shift"] == pytest.approx(-0.4 / 2.0)  # sum of shifts / sum of |own contributions|
    assert got["top_cos_max"] == pytest.approx(0.5)
    assert got["rank1_share"] == pytest.approx((4.0 + 0.5 + 1.0 + 3.0) / 10.0)
    both = aggregate(stats, torch.tensor([True, True]), d_model=8).signals
    assert both["refusal_energy_max_ratio"] == pytest.approx(8.0) and both["weight_shift"] == pytest.approx(-3.4 / 4.0)


def test_random_updates_put_about_one_over_d_of_their_energy_along_r():
    """The chance level the energy ratio is measured against: E[e] = 1/d for an update whose
    output directions are uniformly random."""
    gen = torch.Generator().manual_seed(4)
    r = _unit(64, 9)
    shares = [matrix_stats("w", LowRank(torch.randn(64, 4, generator=gen), torch.randn(4, 32, generator=gen), 1.0),
                           torch.zeros(64, 32), layer=0, r=r).energy_share for _ in range(400)]
    assert np.mean(shares) * 64 == pytest.approx(1.0, abs=0.15)


def test_an_update_that_changes_no_writer_has_zero_weight_signals():
    stats = [MatrixStats("q", None, frob2=3.0, sigma1_2=1.0)]
    got = aggregate(stats, torch.tensor([True]), d_model=8)
    assert got.writers_changed == 0 and got.matrices_changed == 1
    assert {k: got.signals[k] for k in ("refusal_energy_ratio", "weight_shift", "top_cos_max")} == \
        {"refusal_energy_ratio": 0.0, "weight_shift": 0.0, "top_cos_max": 0.0}
    assert got.signals["rank1_share"] == pytest.approx(1 / 3)
