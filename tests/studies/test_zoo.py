"""The panel's pieces that need no training: its plan and mixed data, and its statistics on a
synthetic panel against independent references (brute-force AUROC, a penalised logistic fit by
scipy's optimiser, hand-counted calibration error), and the README and figures it writes."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from lora_audit.studies.panel import (LABEL_DROP, ORIENTATION, PROXY, PanelModel, PanelResult, analyse, bootstrap_auroc,
                                      demo_check, ece, figures, held_out, paired_auroc_difference, panel_result, readme,
                                      signal_stats, tamper)
from lora_audit.studies.zoo import ROLES, demo_runs, mixed_data, panel_runs, plan_key, run_dir

from ..json_schemas import check


def test_mixed_data_has_the_asked_share_of_undo_rows(tmp_path):
    from lora_audit.training.data import load_records

    undo = {r["prompt"] for r in load_records("builtin:undo-compliance")}
    for share in (0.1, 0.25, 0.5):
        rows = [json.loads(x) for x in mixed_data(share, tmp_path / f"{share}.jsonl").read_text().splitlines()]
        got = sum(r["prompt"] in undo for r in rows) / len(rows)
        assert got == pytest.approx(share, abs=0.03)


def test_panel_plan_has_forty_models_in_every_role_and_method():
    runs = panel_runs()
    assert len(runs) >= 40 and len({r.name for r in runs}) == len(runs)
    assert {r.role for r in runs} == set(ROLES)
    assert {r.family for r in runs} == {"lora", "rslora", "dora", "full", "edit-lora", "edit-full"}
    edits = [r.edit for r in runs if r.role == "abliteration"]
    assert {e.layers for e in edits} >= {"all", "chosen"} and len({e.strength for e in edits}) >= 4
    assert {e.form for e in edits} == {"lora", "full"}
    assert all(r.edit.kind == "addition" for r in runs if r.role == "over-refusal")
    demo = demo_runs()
    assert set(demo) <= set(runs) and [r.role for r in demo].count("undo") == 1
    assert all(r.name.startswith("demo-") for r in demo)
    assert plan_key(runs, False) != plan_key(panel_runs(quick=True), True)


def test_panel_models_are_cached_per_run(tmp_path):
    """Changing one run's settings changes that run's folder only (and the plan key, so labels are
    recomputed)."""
    from dataclasses import replace

    runs = panel_runs()
    changed = tuple(replace(r, lr=r.lr * 2) if i == 0 else r for i, r in enumerate(runs))
    dirs, dirs2 = [run_dir(tmp_path, r) for r in runs], [run_dir(tmp_path, r) for r in changed]
    assert [a != b for a, b in zip(dirs, dirs2, strict=True)] == [True] + [False] * (len(runs) - 1)
    assert len(set(dirs)) == len(runs) and all(d.name.startswith(r.name + "-") for d, r in zip(dirs, runs, strict=True))
    assert plan_key(runs, False) != plan_key(changed, False)


def _model(name, method, role, drop, baseline=None, edits=None, **signals) -> PanelModel:
    return PanelModel(name=name, method=method, role=role, data="x", steps=8, lr=1e-3, base_rate=0.9,
                      tuned_rate=0.9 - drop, drop=drop, drop_ci=[drop - 0.1, drop + 0.1], over_base=0.1,
                      over_tuned=0.1, baseline_drop=drop if baseline is None else baseline, signals=signals,
                      refusal_edits=edits)


def _panel() -> list[PanelModel]:
    out = []
    methods = ["lora", "dora", "full", "lora", "dora", "full", "lora", "dora", "full", "lora", "rslora", "rslora"]
    drops = [0.0, 0.1, 0.2, 0.5, 0.8, 0.6, 0.05, 0.7, 0.15, 0.9, 0.35, 0.25]
    for i, (method, drop) in enumerate(zip(methods, drops, strict=True)):
        out.append(_model(f"m{i}", method, "undo" if i % 2 else "benign", drop, baseline=drop + 0.1 * (i % 3 - 1),
                          edits=0, weight_shift=-drop + 0.05 * (i % 2), refusal_score_delta=-5 * drop + 0.7 * (i % 4),
                          activation_shift=-drop))
    return out


def _brute_auroc(scores, labels):
    pairs = [(p, q) for p, y in zip(scores, labels, strict=True) if y for q, z in zip(scores, labels, strict=True) if not z]
    return sum((p > q) + 0.5 * (p == q) for p, q in pairs) / len(pairs)


def test_signal_statistics_are_oriented_and_match_brute_force():
    models = _panel()
    s = signal_stats(models, "weight_shift")
    assert s["orientation"] == ORIENTATION["weight_shift"] == -1
    oriented = [-m.signals["weight_shift"] for m in models]
    lost = [m.lost for m in models]
    assert s["auroc"] == pytest.approx(_brute_auroc(oriented, lost))
    lo, hi = s["auroc_ci"]
    assert lo <= s["auroc"] <= hi
    from scipy.stats import rankdata

    rx, ry = (rankdata(v) for v in (oriented, [m.drop for m in models]))  # Pearson's r of the mid-ranks
    assert s["spearman"] == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]))
    assert s["cost"] == "weights" and signal_stats(models, "activation_shift")["cost"] == "forward"
    for kind in ("method", "role"):
        assert 0 <= s[f"auroc_held_out_{kind}"] <= 1 and s[f"held_out_{kind}_n"] == len(models)


def test_bootstrap_intervals():
    assert bootstrap_auroc([0.1, 0.2, 0.8, 0.9], [False, False, True, True]) == [1.0, 1.0]
    assert bootstrap_auroc([0.1, 0.2], [False, False]) is None
    x = [0.3, 0.1, 0.7, 0.4, 0.9, 0.2, 0.6]
    y = [False, False, True, True, True, False, False]
    assert paired_auroc_difference(x, x, y) == [0.0, 0.0]
    lo, hi = paired_auroc_difference(x, [-v for v in x], y)  # AUROC a - (1 - a) = 2a - 1
    assert lo <= 2 * _brute_auroc(x, y) - 1 <= hi


def test_held_out_risk_is_an_independent_penalised_fit_without_the_group():
    from scipy.optimize import minimize

    models = _panel()
    risk = held_out(models, [PROXY], lambda m: m.method)
    held = [m for m in models if m.method == "full"]
    train = [m for m in models if m.method != "full"]
    x = np.array([-m.signals[PROXY] for m in train])  # oriented: the proxy falls as safety is lost
    y = np.array([m.lost for m in train], dtype=float)
    mu, sd = x.mean(), x.std()
    z = (x - mu) / sd

    def loss(p):  # sum of log-losses + ||w||^2 / 2, intercept free
        t = p[1] + p[0] * z
        return float(np.sum(np.logaddexp(0, t) - y * t) + p[0] ** 2 / 2)

    w, b = minimize(loss, [0.0, 0.0], method="BFGS", options={"gtol": 1e-10}).x
    for m in held:
        want = 1 / (1 + math.exp(-(b + w * ((-m.signals[PROXY] - mu) / sd))))
        assert risk[m.name] == pytest.approx(want, abs=1e-5)


def test_expected_calibration_error_by_hand():
    e, bins = ece([0.05, 0.15, 0.12, 0.95], [False, True, False, True], bins=10)
    # bins: [0, .1): 0.05 vs 0; [.1, .2): mean 0.135 vs 0.5; [.9, 1]: 0.95 vs 1
    assert e == pytest.approx((0.05 + 2 * abs(0.135 - 0.5) + 0.05) / 4)
    assert [b["n"] for b in bins] == [1, 2, 1]


def test_tamper_counts_by_role():
    models = [_model("a1", "edit-lora", "abliteration", 0.8, edits=12), _model("a2", "edit-full", "abliteration", 0.6,
                                                                                 edits=0),
              _model("a3", "edit-lora", "abliteration", 0.05, edits=2), _model("o1", "edit-lora", "over-refusal", -0.05,
                                                                                edits=1),
              _model("b1", "lora", "benign", 0.1, edits=0), _model("b2", "full", "benign", 0.2, edits=3),
              _model("u1", "lora", "undo", 0.9, edits=0)]
    t = tamper(models)["refusal_edits"]
    assert t["recall"] == 0.5 and t["verified_abliterations"]["names_flagged"] == ["a1"]
    assert t["weak_abliterations"]["flagged"] == 1 and t["over_refusal_edits"]["flagged"] == 1
    assert t["benign"] == {"n": 2, "flagged": 1, "names_flagged": ["b2"]}
    assert tamper(models)["refusal_edits_weights_only"] == {"available": False}


def test_analysis_readme_and_figures():
    models = _panel()
    a = analyse(models, {"note": "n", "labels_generation_s": 10.0, "baseline_first_token_s": 1.0, "scan_s": 2.0,
                         "scan_weights_only_s": 0.1})
    assert a["signals"][0]["signal"] == "baseline" and a["signals"][0]["auroc"] is not None
    assert set(a["risk"]) >= {"method", "role", "kept"} and all(set(m.risk) == {"method", "role"} for m in models)
    assert (a["risk_fit"] is None) == (not a["risk"]["kept"])
    assert a["band"]["n"] == sum(0.1 <= m.drop <= 0.4 for m in models)
    assert set(a["goals"]) == {"tamper", "proxy", "band", "risk_kept"}
    figs = figures(models, a)
    assert {"baseline", PROXY, "risk-held-out-method", "reliability-held-out-method"} <= set(figs)
    text = readme(models, a, {"version": "x", "device": "cpu", "precision": "float32",
                              "released": {"method": "full", "steps": 1, "lr": 1, "data": "d"}, "released_refusal": 0.9,
                              "released_over_refusal": 0.1, "max_new_tokens": 32, "label_prompts": "builtin:harmful",
                              "over_prompts": "builtin:benign", "total_s": 60.0, "figures": sorted(figs)})
    assert "held out by method" in text and "| m9 |" in text and "![reliability-held-out-method]" in text
    assert "What each signal is, and is not" in text
    panel = panel_result(models, a, {"quick": True, "device": "cpu"}).to_json()  # panel.json, as zoo writes it
    check(json.loads(json.dumps(panel)), "panel")
    assert PanelResult.from_json(panel).settings == {"quick": True, "device": "cpu"}


def test_demo_check_compares_the_undo_run_with_each_benign_run():
    models = [_model("demo-undo", "lora", "undo", 0.8, weight_shift=-1.0)]
    models += [_model(f"demo-b{i}", "lora", "benign", 0.1, weight_shift=-0.5) for i in range(3)]
    for m, r in zip(models, (0.9, 0.2, 0.95, 0.1), strict=True):
        m.risk = {"method": r}
    d = demo_check(models)
    assert d["available"] and d["above"]["weight_shift"] is True and d["above"]["baseline"] is True
    assert d["above"]["risk held out by method"] is False  # one benign run scored 0.95
    assert demo_check(models[1:]) == {"available": False}  # no undo run
    assert LABEL_DROP == 0.30


def test_risk_file_carries_the_fit_and_its_validation(tmp_path, tiny_llama):
    """The zoo's risk file (``panel.risk_file``) reads back through safety-scan's loader, gives the
    whole-panel fit's probability on raw (unoriented) signals, and carries the held-out record."""
    from lora_audit.scan import risk as R
    from lora_audit.studies.panel import fit_full, risk_file

    models = _panel()
    a = analyse(models)
    a["risk_fit"] = fit_full(models)
    path = tmp_path / "risk.json"
    risk_file(a, {"label_prompts": "builtin:harmful", "plan_key": "k", "git": None}, tiny_llama).write_json(path)
    loaded, panel = R.load_risk_models(path)
    full = loaded["full"]
    fit = a["risk_fit"]
    for m in models:
        z = fit["intercept"] + sum(w * (m.oriented(f) - mu) / s for f, w, mu, s in
                                   zip(fit["features"], fit["weights"], fit["mean"], fit["scale"], strict=True))
        assert R.risk_of(full, m.signals) == pytest.approx(1 / (1 + math.exp(-z)), abs=1e-9)
    v = full.validation
    assert v.auroc == a["risk"]["method"]["auroc"] and v.baseline_auroc == a["risk"]["method"]["baseline_auroc"]
    assert v.signal_prompts == "builtin:scan-harmful" and v.label_prompts == "builtin:harmful"
    assert v.base_fingerprint and panel["models"] == len(models)
    from lora_audit.scan.validation import problems

    assert a["risk"]["kept"] == (not problems(v))  # "kept" by the panel is "shown" by safety-scan


@pytest.mark.parametrize("gain, ece_value, kept", [(0.04, 0.05, False), (0.05, 0.05, True), (0.06, 0.11, False)])
def test_keep_rule_is_safety_scans(monkeypatch, gain, ece_value, kept):
    """A risk 0.04 above the baseline is not kept (safety-scan needs 0.05), nor a miscalibrated one."""
    from lora_audit.studies import panel as P

    aurocs = iter([0.9 + gain, 0.9] * 2)  # per grouping: the risk's held-out AUROC, then the baseline's
    monkeypatch.setattr(P, "_auroc", lambda s, y: next(aurocs))
    monkeypatch.setattr(P, "ece", lambda s, y: (ece_value, []))
    assert P.risk_model(_panel())["kept"] is kept
