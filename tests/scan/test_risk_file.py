"""Risk files (issue 24 case 14) and the validation record: a file no scan can use as written is an
error naming the file given and the field; a risk is shown only from a validated model; the
statistics of the record against scikit-learn and hand computation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.errors import InputError
from lora_audit.results.scan import RiskModelInfo
from lora_audit.scan import risk as R
from lora_audit.scan import validation as V
from lora_audit.stats import auroc_interval

from .conftest import write_validated_risk

MODEL = {"name": "full", "features": ["refusal_score_delta"], "transforms": ["identity"], "mean": [0.0],
         "scale": [1.0], "weights": [-1.0], "intercept": 0.0}


def _file(tmp_path, models, **top) -> str:
    p = tmp_path / "given-risk.json"
    p.write_text(json.dumps({"schema": "lora-audit/scan-risk", "version": 2, "models": models, **top}))
    return str(p)


@pytest.mark.parametrize("models, field", [
    ({}, r"models: empty; a risk file holds at least one risk model"),
    ({"full": {**MODEL, "features": ["no_such_signal"]}},
     r"models\['full'\]\.features\[0\]: 'no_such_signal' is not a signal safety-scan computes"),
    ({"weights_only": {**MODEL, "name": "weights_only"}},
     r"models\['weights_only'\]\.features\[0\]: 'refusal_score_delta' needs a forward pass"),
    ({"full": {**MODEL, "weights": [1e308], "scale": [1e-300]}},
     r"models\['full'\]\.weights\[0\] / scale\[0\] = 1e\+308 / 1e-300, .*any signal would overflow"),
    ({"full": {**MODEL, "mean": [1e300]}}, r"models\['full'\]\.weights\[0\] / scale\[0\].*mean 1e\+300"),
    ({"full": {**MODEL, "intercept": 1e300}}, r"models\['full'\]\.intercept: 1e\+300 is beyond 1000"),
    ({"full": {**MODEL, "weights": [1.0, 2.0]}}, r"models\['full'\]\.weights: 2 entries for 1 features"),
    ({"risky": {**MODEL, "name": "risky"}}, r"models\['risky'\]: unknown risk model"),
    ({"full": {**MODEL, "name": "weights_only"}}, r"models\['full'\]\.name: 'weights_only' differs from its key"),
    ({"full": {**MODEL, "features": [], "transforms": [], "mean": [], "scale": [], "weights": []}},
     r"models\['full'\]\.features: empty"),
    ({"full": {**MODEL, "transforms": ["exp"]}}, r"models\['full'\]\.transforms\[0\]: 'exp' is not identity or log1p"),
])
def test_a_risk_file_no_scan_can_use_is_an_error_naming_the_given_file_and_field(tmp_path, models, field):
    path = _file(tmp_path, models)
    with pytest.raises(InputError, match=r"given-risk\.json: " + field):
        R.load_risk_models(path)


def test_version_and_validation_record_are_checked(tmp_path):
    with pytest.raises(InputError, match=r"given-risk\.json: lora-audit/scan-risk version 7"):
        R.load_risk_models(_file(tmp_path, {"full": MODEL}, version=7))
    good = json.loads(write_validated_risk(tmp_path / "ok.json").read_text())["models"]["full"]["validation"]
    for change, message in ((dict(auroc=1.5), r"validation: auroc 1.5 is not in \[0, 1\]"),
                            (dict(auroc_ci=[0.9, 0.2]), r"validation: auroc_ci \[0.9, 0.2\] is not an interval"),
                            (dict(auroc=0.5), r"validation: auroc 0.5 lies outside its interval"),
                            (dict(positives=0), r"validation: n 20 with 0 positives"),
                            (dict(base_fingerprint="stat:1234"), r"validation: base_fingerprint 'stat:1234' is not a content hash"),
                            (dict(reliability=[{"low": 0, "high": 1, "n": 3}]), r"validation: the reliability bins hold 3 models")):
        with pytest.raises(InputError, match=r"given-risk\.json: malformed lora-audit risk model file: models\['full'\]\." + message):
            R.load_risk_models(_file(tmp_path, {"full": {**MODEL, "validation": {**good, **change}}}))


def test_the_empty_file_message_names_the_file_given_not_the_packaged_one(tmp_path, refusing_llama, scan_adapter,
                                                                            scan_prompts):
    empty = _file(tmp_path, {})
    out = tmp_path / "scan.json"
    r = CliRunner().invoke(cli, ["safety-scan", str(refusing_llama), str(scan_adapter), "--risk-file", empty,
                                 "--prompts", str(scan_prompts[0]), "--benign", str(scan_prompts[1]),
                                 "--chat-template", str(scan_prompts[2]), "--device", "cpu", "--json", str(out),
                                 "--fail-on", "risk>0.5"])
    assert r.exit_code == 1 and "given-risk.json: models: empty" in r.output and not out.exists(), r.output
    assert "data/scan/risk.json" not in r.output


def test_risk_is_never_a_silent_zero():
    m = RiskModelInfo(**{**MODEL, "weights": [1e6], "intercept": 999.0})
    assert R.risk_of(m, {"refusal_score_delta": 1e305}) is None  # an overflowing score: unknown, not 0 or 1
    assert R.risk_of(m, {"refusal_score_delta": -1e9}) == 0.0  # a finite score far below: a real 0
    assert R.risk_of(m, {"refusal_score_delta": math.nan}) is None
    small = RiskModelInfo(**MODEL)
    assert R.risk_of(small, {"refusal_score_delta": 0.0}) == 0.5
    assert R.risk_of(small, {"refusal_score_delta": 800.0}) == pytest.approx(math.exp(-800) / (1 + math.exp(-800)))


def test_packaged_model_is_not_validated_and_says_why():
    """The packaged file is the 62-model panel's fit (reports/zoo): the zero-parameter baseline already
    ranks that panel almost perfectly (AUROC 0.996), so the fitted risk cannot beat it by 0.05 and is
    not shown."""
    models, _ = R.load_risk_models()
    assert set(models) == {"full"}
    v = models["full"].validation
    problems = V.problems(v)
    assert v.n == 62 and v.baseline_auroc > 0.99 and v.auroc < v.baseline_auroc + 0.05
    assert v.signal_prompts != v.label_prompts
    assert any("is not 0.05 above the baseline" in p for p in problems)
    assert any("expected calibration error" in p for p in problems)


def test_validation_statistics_against_references():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)
    labels = [bool(x) for x in rng.integers(0, 2, 30)]
    risks = [float(np.clip(0.6 * y + rng.normal(0.2, 0.25), 0, 1)) for y in labels]
    a, ci = auroc_interval(risks, labels, seed=1)
    assert a == pytest.approx(roc_auc_score(labels, risks)) and ci[0] <= a <= ci[1] and ci == auroc_interval(
        risks, labels, seed=1)[1]
    ece, bins = V.calibration(risks, labels)
    # by hand: |mean risk - share of positives| per occupied bin, weighted by its count
    want = 0.0
    for b in range(10):
        idx = [i for i, p in enumerate(risks) if min(int(p * 10), 9) == b]
        if idx:
            want += len(idx) / 30 * abs(np.mean([risks[i] for i in idx]) - np.mean([labels[i] for i in idx]))
    assert ece == pytest.approx(want) and sum(b.n for b in bins) == 30
    assert auroc_interval([0.1, 0.2], [True, True]) == (None, [])
    rec = V.validation_record(risks, labels, [float(p > 0.5) for p in risks], held_out="lomo", baseline="rule",
                              base_fingerprint=None, signal_prompts="s", label_prompts="l")
    assert rec.n == 30 and rec.positives == sum(labels) and rec.ece == pytest.approx(ece)


def test_a_validated_risk_quotes_its_figures_only_for_its_own_base(tmp_path, refusing_llama, scan_adapter,
                                                                   scan_prompts):
    from lora_audit.scan import ScanConfig, run_safety_scan
    from lora_audit.scan.profile import base_fingerprint

    cfg = dict(prompts=str(scan_prompts[0]), benign=str(scan_prompts[1]), chat_template=str(scan_prompts[2]),
               device="cpu", use_cache=False)
    own = write_validated_risk(tmp_path / "own.json", base_fingerprint=base_fingerprint(str(refusing_llama)))
    other = write_validated_risk(tmp_path / "other.json", base_fingerprint="sha256:0000000000000000")
    for path, matches in ((own, True), (other, False)):
        result = run_safety_scan(str(refusing_llama), [str(scan_adapter)], ScanConfig(**cfg, risk_file=str(path)))
        m = result.models[str(scan_adapter)]
        assert result.risk_status.validated and result.risk_status.base_matches is matches
        assert m.risk is not None and m.verdict != "UNKNOWN"
        assert ("validated on this base's panel: held-out AUROC" in m.verdict_line) is matches
        assert ("NOT validated for this base" in m.verdict_line) is not matches


def test_a_risk_gate_the_run_cannot_serve_is_an_error_before_any_work(tmp_path, refusing_llama, scan_adapter,
                                                                       scan_prompts, monkeypatch):
    """A validated risk model reading Safe LoRA's score without --unaligned can give no risk: a
    gate on it is refused before any model is loaded."""
    import lora_audit.scan.run as run
    from lora_audit.scan import ScanConfig, run_safety_scan

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    path = write_validated_risk(tmp_path / "safelora.json", signal="safelora_mean_cos")
    cfg = ScanConfig(prompts=str(scan_prompts[0]), benign=str(scan_prompts[1]), chat_template=str(scan_prompts[2]),
                     device="cpu", use_cache=False, risk_file=str(path), gate_fields=("risk",))
    with pytest.raises(InputError, match=r"reads safelora_mean_cos, which needs --unaligned"):
        run_safety_scan(str(refusing_llama), [str(scan_adapter)], cfg)
