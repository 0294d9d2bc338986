"""The panel's pieces that need no training: its mixed data, its statistics on a synthetic panel
(against brute-force AUROC and hand counts), the demo check and the README it writes."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lora_audit.scan import risk as R
from lora_audit.studies.panel import ORIENTATION, PanelModel, analyse, demo_check, figures, readme, signal_stats
from lora_audit.studies.zoo import demo_runs, mixed_data, panel_runs, plan_key, released_key, run_dir


def test_mixed_data_has_the_asked_share_of_undo_rows(tmp_path):
    from lora_audit.training.data import load_records

    undo = {r["prompt"] for r in load_records("builtin:undo-compliance")}
    for share in (0.1, 0.25, 0.5):
        rows = [json.loads(x) for x in mixed_data(share, tmp_path / f"{share}.jsonl").read_text().splitlines()]
        got = sum(r["prompt"] in undo for r in rows) / len(rows)
        assert got == pytest.approx(share, abs=0.03)


def test_panel_plan_has_graded_runs_of_every_method():
    runs = panel_runs()
    assert len(runs) >= 16 and len({r.name for r in runs}) == len(runs)
    assert {r.method for r in runs} == {"lora", "rslora", "dora", "full", "abliteration"}
    assert {r.role for r in runs} == {"benign", "undo", "mix", "abliteration"}
    demo = demo_runs()
    assert set(demo) <= set(runs) and [r.role for r in demo].count("undo") == 1
    assert all(r.name.startswith("demo-") for r in demo)
    assert plan_key(runs, False) != plan_key(panel_runs(quick=True), True)


def test_panel_models_are_cached_per_run(tmp_path):
    """Changing one run's settings changes that run's folder only (and the plan key, so labels are
    recomputed); the released model's key does not depend on the runs."""
    from dataclasses import replace

    runs = panel_runs()
    changed = tuple(replace(r, lr=r.lr * 2) if i == 0 else r for i, r in enumerate(runs))
    dirs, dirs2 = [run_dir(tmp_path, r) for r in runs], [run_dir(tmp_path, r) for r in changed]
    assert [a != b for a, b in zip(dirs, dirs2)] == [True] + [False] * (len(runs) - 1)
    assert len(set(dirs)) == len(runs) and all(d.name.startswith(r.name + "-") for d, r in zip(dirs, runs))
    assert plan_key(runs, False) != plan_key(changed, False) and released_key(False) == released_key(False)
    assert released_key(False) != released_key(True)


def _model(name, method, role, drop, **signals) -> PanelModel:
    return PanelModel(name=name, method=method, role=role, data="x", steps=8, lr=1e-3, base_rate=0.9,
                      tuned_rate=0.9 - drop, drop=drop, drop_ci=[drop - 0.1, drop + 0.1], signals=signals,
                      safety_eval_s=20.0, weights_s=0.01, forward_s=2.0)


def _panel() -> list[PanelModel]:
    out = []
    for i, method in enumerate(["lora", "dora", "full", "lora", "dora", "full", "lora", "dora", "full", "lora"]):
        drop = [0.0, 0.1, 0.2, 0.5, 0.8, 0.6, 0.05, 0.7, 0.15, 0.9][i]
        out.append(_model(f"m{i}", method, "undo" if drop >= 0.3 else "benign", drop,
                          refusal_energy_ratio=1.0 + 10 * drop + (i % 3), weight_shift=-drop + 0.05 * (i % 2),
                          top_cos_max=0.1 + 0.1 * (i % 4), refusal_score_delta=-5 * drop, activation_shift=-drop))
    return out


def test_signal_statistics_are_oriented_and_match_brute_force():
    models = _panel()
    s = signal_stats(models, "weight_shift")
    assert s["orientation"] == ORIENTATION["weight_shift"] == -1
    oriented = [-m.signals["weight_shift"] for m in models]
    lost = [m.lost for m in models]
    pairs = [(p, q) for p, y in zip(oriented, lost) if y for q, z in zip(oriented, lost) if not z]
    assert s["auroc"] == pytest.approx(sum((p > q) + 0.5 * (p == q) for p, q in pairs) / len(pairs))
    from scipy.stats import rankdata

    rx, ry = (rankdata(v) for v in (oriented, [m.drop for m in models]))  # Pearson's r of the mid-ranks
    assert s["spearman"] == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]))
    assert s["cost"] == "weights" and signal_stats(models, "activation_shift")["cost"] == "forward"
    assert 0 <= s["auroc_leave_one_method_out"] <= 1


def test_analysis_fits_both_risk_models_and_times_them():
    models = _panel()
    a = analyse(models)
    assert set(a["risk_models"]) == {"weights_only", "full"}
    assert a["timing"]["weights_only_speedup"] == pytest.approx(2000.0)
    assert a["timing"]["with_forward_speedup"] == pytest.approx(20.0 / 2.01)
    assert not a["goals"]["forward"]["met"]  # 10x cheaper, not 50x
    assert all(set(m.risk) == {"weights_only", "full"} for m in models)
    text = readme(models, a, {"version": "x", "device": "cpu", "released": {}, "released_refusal": 0.9,
                              "released_over_refusal": 0.1, "max_new_tokens": 32, "n_prompts": 40,
                              "total_s": 60.0, "figures": sorted(figures(models))})
    assert "leave-one-method-out" in text and "| m9 |" in text and "![refusal_energy_ratio]" in text


def test_demo_check_compares_the_undo_run_with_each_benign_run():
    models = [_model("demo-undo", "lora", "undo", 0.8, weight_shift=-1.0)]
    models += [_model(f"demo-b{i}", "lora", "benign", 0.8, weight_shift=-0.5) for i in range(3)]
    for m, r in zip(models, (0.9, 0.2, 0.95, 0.1)):
        m.risk = {"full": r}
    d = demo_check(models)
    assert d["available"] and d["signals"]["weight_shift"] is True
    assert d["risk"]["full"]["ranks_above"] is False  # one benign run scored 0.95
    assert demo_check(models[1:]) == {"available": False}  # no undo run
