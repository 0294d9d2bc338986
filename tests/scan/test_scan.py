"""The safety-scan pipeline and command on tiny models: signals end to end against independent
computations, the profile cache, the result contract, the errors of bad inputs, the report."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

from lora_audit.cli import cli
from lora_audit.errors import InputError
from lora_audit.results import load_result
from lora_audit.results.scan import SafetyScanResult
from lora_audit.scan import ScanConfig, run_safety_scan
from lora_audit.scan.profile import CacheWarning, cache_dir
from lora_audit.settings import SpectrumSettings

from ..helpers import make_peft_adapter
from .conftest import write_prompts


def _cfg(prompts, **kw) -> ScanConfig:
    return ScanConfig(prompts=str(prompts[0]), benign=str(prompts[1]), chat_template=str(prompts[2]), device="cpu", **kw)


@pytest.fixture(scope="module")
def scanned(refusing_llama, scan_prompts, scan_adapter, scan_full, tmp_path_factory, session_config):
    """One scan of two tuned models (set up before the per-test fixtures, so it names the session's
    config folder, which holds the cache key, itself)."""
    cfg = _cfg(scan_prompts, cache_dir=str(tmp_path_factory.mktemp("profiles")))
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LORA_AUDIT_CONFIG", str(session_config))
        mp.delenv("LORA_AUDIT_CACHE_KEY_FILE", raising=False)
        return run_safety_scan(str(refusing_llama), [str(scan_adapter), str(scan_full)], cfg), cfg


def _first_token_scores(model, tok, texts) -> torch.Tensor:
    from lora_audit.safety.scorers import refusal_start_ids

    ids = refusal_start_ids(tok)
    out = []
    with torch.no_grad():
        for t in texts:
            logits = model(tok(t, return_tensors="pt", add_special_tokens=False)["input_ids"]).logits[0, -1].double()
            p = torch.softmax(logits, -1)[ids].sum()
            out.append(float(torch.log(p) - torch.log1p(-p)))
    return torch.tensor(out, dtype=torch.float64)


def test_forward_signals_match_merged_models(scanned, refusing_llama, scan_prompts, scan_adapter, scan_full):
    """refusal_score_delta = mean of (TUNED - BASE) first-token log-odds, TUNED being the adapter
    merged by peft or the full model, one prompt at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    result, _ = scanned
    tok = AutoTokenizer.from_pretrained(str(refusing_llama))
    texts = [json.loads(x)["prompt"] for x in scan_prompts[0].read_text().splitlines()]
    base = AutoModelForCausalLM.from_pretrained(str(refusing_llama), dtype=torch.float32).eval()
    s_base = _first_token_scores(base, tok, texts)
    merged = PeftModel.from_pretrained(base, str(scan_adapter)).merge_and_unload().eval()
    full = AutoModelForCausalLM.from_pretrained(str(scan_full), dtype=torch.float32).eval()
    for name, model in ((str(scan_adapter), merged), (str(scan_full), full)):
        s = _first_token_scores(model, tok, texts)
        m = result.models[name]
        assert m.signals["refusal_score_delta"] == pytest.approx(float((s - s_base).mean()), abs=1e-4)
        assert m.signals["first_token_refusal"] == pytest.approx(float((s > 0).double().mean()))
        lo, hi = m.intervals["refusal_score_delta"]
        assert lo <= m.signals["refusal_score_delta"] <= hi


def test_result_contract(scanned, scan_adapter, scan_full):
    result, _ = scanned
    j = result.to_json()
    assert list(j)[:3] == ["lora_audit", "base", "settings"]
    assert set(j["models"]) == {str(scan_adapter), str(scan_full)}  # TUNED as given
    for m in j["models"].values():
        assert m["risk"] is None and m["verdict"] == "UNKNOWN"  # the packaged risk models are not validated
        assert "no risk: no validated risk model" in m["verdict_line"]
        assert list(m)[:2] == ["risk", "refusal_edits"] and m["refusal_edits"] == 0
        assert {"refusal_energy_ratio", "weight_shift", "top_cos_max", "rank1_share", "refusal_score_delta",
                "first_token_drop", "activation_shift"} <= set(m["signals"])
        assert len(m["layers"]) == 2 and m["layers"][0]["layer"] == 0
    d = j["direction"]
    assert d["stable_layers"] == [0, 1] and d["prompts"]["harmful"]["n"] == 24
    assert d["halves"] == {"harmful_direction": 12, "harmful_validation": 12, "harmless_direction": 12,
                           "harmless_validation": 12}
    assert d["causal"]["layer"] == 0 and d["causal"]["candidates"][0]["missed"] == []
    assert j["risk_status"]["validated"] is False and j["risk_status"]["model"] == "full"
    assert set(j["seconds"]) == {"load_base", "profile", "weights", "load_tuned", "forward", "total"}
    back = load_result(json.loads(json.dumps(j)))
    assert isinstance(back, SafetyScanResult) and back.to_json()["models"] == j["models"]
    j["models"][str(scan_full)]["risk"] = 1.5
    with pytest.raises(InputError, match=r"scan.json: malformed safety-scan result: models\[.*\]\.risk: expected a "
                                         r"number in \[0, 1\], got 1\.5"):
        SafetyScanResult.from_json(j, source="scan.json")
    j["models"][str(scan_full)].update(risk=0.5, signals=["x"])
    with pytest.raises(InputError, match=r"scan.json: malformed safety-scan result: models\[.*\]\.signals"):
        SafetyScanResult.from_json(j, source="scan.json")


def test_weights_only_reads_the_cached_profile_and_loads_no_model(scanned, refusing_llama, scan_adapter, monkeypatch):
    result, cfg = scanned
    import lora_audit.scan.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("weights-only loaded a model"))
    again = run_safety_scan(str(refusing_llama), [str(scan_adapter)], ScanConfig(**{**vars(cfg), "weights_only": True}))
    assert again.direction.cache == "hit"
    got, want = again.models[str(scan_adapter)].signals, result.models[str(scan_adapter)].signals
    assert "refusal_score_delta" not in got and again.direction.causal == result.direction.causal
    assert again.seconds["profile"] == 0.0 and again.seconds["load_base"] == 0.0
    for k in ("refusal_energy_ratio", "weight_shift", "top_cos_max", "rank1_share"):
        assert got[k] == pytest.approx(want[k], rel=1e-9)


def test_tampered_profile_is_recomputed(refusing_llama, scan_prompts, scan_adapter, tmp_path):
    cfg = _cfg(scan_prompts, cache_dir=str(tmp_path), weights_only=True)
    first = run_safety_scan(str(refusing_llama), [str(scan_adapter)], cfg)
    entry = cache_dir(str(tmp_path)) / f"{first.direction.key}.safetensors"
    data = bytearray(entry.read_bytes())
    data[-3] ^= 0x40  # a bit of the last tensor flipped
    entry.write_bytes(bytes(data))
    with pytest.warns(CacheWarning, match="MAC does not verify"):
        second = run_safety_scan(str(refusing_llama), [str(scan_adapter)], cfg)
    assert second.direction.cache == "miss"
    assert second.models[str(scan_adapter)].signals == first.models[str(scan_adapter)].signals
    # headers that are JSON but not a safetensors header of an entry: recomputed too, never a crash
    for header in (b"[]", b'{"__metadata__": "x"}', b"[" * 5000 + b"]" * 5000):
        entry.write_bytes(len(header).to_bytes(8, "little") + header)
        with pytest.warns(CacheWarning, match="recomputing"):
            third = run_safety_scan(str(refusing_llama), [str(scan_adapter)], cfg)
        assert third.direction.cache == "miss"


def test_base_that_refuses_nothing_is_an_error(tiny_llama, scan_prompts, tmp_path):
    ad = make_peft_adapter(tiny_llama, tmp_path / "ad")
    with pytest.raises(InputError, match=r"BASE refuses 0 of 24 harmful prompts.*no refusal direction to find"):
        run_safety_scan(str(tiny_llama), [str(ad)], _cfg(scan_prompts, use_cache=False))


def test_too_few_prompts_to_split_is_an_error_before_any_work(refusing_llama, scan_adapter, scan_prompts,
                                                               monkeypatch):
    import lora_audit.scan.run as run

    monkeypatch.setattr(run, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    with pytest.raises(InputError, match=r"too few prompts to split into a direction half and a validation half of "
                                         r"at least 8 each: .*harmful.jsonl \(harmful\): 6 \+ 6"):
        run_safety_scan(str(refusing_llama), [str(scan_adapter)], _cfg(scan_prompts, limit=12, use_cache=False))


def test_a_base_without_a_causal_direction_is_said_so(refusing_llama, scan_adapter, tmp_path, monkeypatch):
    """Both sets from one distribution: no causal direction. The result says so, counts no refusal
    edits and gives no signal along the direction; a gate on refusal_edits is an error before any
    TUNED is touched."""
    import random

    import lora_audit.scan.run as run

    from .conftest import WORDS

    rng = random.Random(0)  # both sets drawn from one distribution: no direction to find, only noise
    pool = [f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.choice(WORDS)} {i}!" for i in range(48)]
    same = write_prompts(tmp_path / "same")
    for path, part in ((same[0], pool[:24]), (same[1], pool[24:])):
        path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in part))
    result = run_safety_scan(str(refusing_llama), [str(scan_adapter)], _cfg(same, use_cache=False))
    m = result.models[str(scan_adapter)]
    assert result.direction.causal.layer is None and m.refusal_edits is None
    assert all(m.signals[k] is None for k in run.DIRECTION_SIGNALS)
    assert m.signals["first_token_drop"] is not None  # the proxy does not need the direction
    assert any("BASE's refusal direction is not causal: no candidate direction passes" in w for w in result.warnings)
    assert "refusal edits not counted" in m.verdict_line
    monkeypatch.setattr(run, "_weight_pass", lambda *a, **k: pytest.fail("TUNED was read"))
    with pytest.raises(InputError, match=r"--fail-on names refusal_edits, but BASE's refusal direction is not causal"):
        run_safety_scan(str(refusing_llama), [str(scan_adapter)],
                        _cfg(same, use_cache=False, gate_fields=("refusal_edits",)))


def test_unaligned_adds_safelora_and_checks_shapes(refusing_llama, scan_prompts, scan_adapter, tiny_llama, tmp_path):
    from ..helpers import make_tiny_llama

    result = run_safety_scan(str(refusing_llama), [str(scan_adapter)],
                             _cfg(scan_prompts, weights_only=True, unaligned=str(tiny_llama), use_cache=False))
    sig = result.models[str(scan_adapter)].signals
    assert 0 < sig["safelora_mean_cos"] <= 1 and 0 <= sig["safelora_below_share"] <= 1
    assert any(x.safelora_cos is not None for x in result.models[str(scan_adapter)].layers)
    other = make_tiny_llama(tmp_path / "other", hidden=32, intermediate=48)
    with pytest.raises(InputError, match=r"--unaligned .* does not fit base"):
        run_safety_scan(str(refusing_llama), [str(scan_adapter)],
                        _cfg(scan_prompts, weights_only=True, unaligned=str(other), use_cache=False))


def test_cli_writes_json_and_prints_the_summary(refusing_llama, scan_prompts, scan_adapter, tmp_path):
    out = tmp_path / "scan.json"
    args = ["safety-scan", str(refusing_llama), str(scan_adapter), "--prompts", str(scan_prompts[0]), "--benign",
            str(scan_prompts[1]), "--chat-template", str(scan_prompts[2]), "--device", "cpu"]
    r = CliRunner().invoke(cli, args + ["--json", str(out), "--layers"])
    assert r.exit_code == 0, r.output
    assert "refusal direction: 2 layers, causal at layer 0" in r.output and "energy x chance" in r.output
    assert "refusal edits" in r.output and "first-token drop" in r.output
    assert json.loads(out.read_text())["base"] == str(refusing_llama)
    # a risk file is an input: the result never replaces it
    risk = tmp_path / "risk.json"
    risk.write_text('{"lora_audit": {}, "schema": "lora-audit/scan-risk", "models": {}}')
    clash = CliRunner().invoke(cli, args + ["--risk-file", str(risk), "--json", str(risk)])
    assert clash.exit_code == 1 and "input" in clash.output and "scan-risk" in risk.read_text()
    bad = CliRunner().invoke(cli, args[:3] + ["--limit", "2", "--json", str(tmp_path / "no.json")] + args[3:])
    assert bad.exit_code == 1 and "too few prompts to split" in bad.output and not (tmp_path / "no.json").exists()


def test_report_renders_the_scan_next_to_safety(scanned, tmp_path):
    from lora_audit.report import build_report

    result, _ = scanned
    path = tmp_path / "scan.json"
    result.write_json(path)
    html = build_report([str(path)], out=tmp_path / "r.html").read_text()
    assert "Safety risk from weights" not in html and "Safety scan: refusal edits and first-token proxy" in html
    assert "Causal at layer 0" in html and "No risk shown" in html and "<svg" in html
    md = build_report([str(path)], out=tmp_path / "r.md", fmt="md", csv_dir=False).read_text()
    assert "## Safety scan: refusal edits and first-token proxy" in md


def test_audit_pipeline_writes_the_scan_next_to_safety(refusing_llama, scan_prompts, scan_adapter, tmp_path):
    from lora_audit.audit import AuditConfig, run_audit
    from lora_audit.safety.evaluate import EvalConfig

    safety = EvalConfig(prompts=str(scan_prompts[0]), benign=str(scan_prompts[1]), chat_template=str(scan_prompts[2]),
                        tasks=[], max_new_tokens=4, device="cpu")
    outcome = run_audit(str(refusing_llama), [str(scan_adapter)], tmp_path / "audit",
                        AuditConfig(SpectrumSettings(k=4, device="cpu"), progress=False, safety=safety,
                                    scan=_cfg(scan_prompts, use_cache=False)), tuned_labels=["ad"])
    assert outcome.scan is not None and outcome.notes == [] and set(outcome.scan.models) == {"ad"}
    assert (tmp_path / "audit" / "scan.json").is_file() and (tmp_path / "audit" / "tables" / "safety_scan.csv").is_file()
    html = (tmp_path / "audit" / "index.html").read_text()
    assert 'id="scan"' in html and "Safety scan: refusal edits and first-token proxy" in html


def test_the_automatic_scan_reads_its_own_prompts_not_the_labels():
    """The audit's automatic scan never reads safety-eval's prompts, whatever they are."""
    from lora_audit.audit import AuditConfig, _scan_config
    from lora_audit.safety.evaluate import EvalConfig
    from lora_audit.scan.prompts import SCAN_HARMFUL, SCAN_HARMLESS

    cfg = _scan_config(AuditConfig(safety=EvalConfig(prompts="my.jsonl", benign="mine.jsonl", limit=8, batch_size=3)))
    assert (cfg.prompts, cfg.benign, cfg.limit, cfg.batch_size) == (SCAN_HARMFUL, SCAN_HARMLESS, 40, 3)


def test_fail_on_over_scan_fields(refusing_llama, scan_prompts, scan_adapter, tmp_path):
    """--fail-on over safety-scan's fields: a field the scan cannot give a value (risk without a
    validated risk model, a forward-pass field with --weights-only) is an error before any work;
    with a validated risk file, exit 3 when a model's risk passes the threshold, the outcome with
    every model's value in the JSON, 0 when it does not; a scan field unknown to spectrum's gate is
    a usage error there."""
    from .conftest import write_validated_risk

    args = ["safety-scan", str(refusing_llama), str(scan_adapter), "--prompts", str(scan_prompts[0]), "--benign",
            str(scan_prompts[1]), "--chat-template", str(scan_prompts[2]), "--device", "cpu"]
    out = tmp_path / "scan.json"
    r = CliRunner().invoke(cli, args + ["--json", str(out), "--fail-on", "risk>0.5"])
    assert r.exit_code == 1 and "no validated full risk model" in r.output and not out.exists(), r.output
    assert "is not 0.05 above the baseline" in r.output  # the packaged panel's own figures
    r = CliRunner().invoke(cli, args + ["--json", str(out), "--weights-only", "--fail-on", "first_token_drop>0.3"])
    assert r.exit_code == 1 and "a --weights-only scan makes none" in r.output and not out.exists(), r.output
    risk = write_validated_risk(tmp_path / "risk.json")
    r = CliRunner().invoke(cli, args + ["--json", str(out), "--risk-file", str(risk), "--fail-on", "risk>=0"])
    assert r.exit_code == 3, r.output
    res = json.loads(out.read_text())
    value = res["models"][str(scan_adapter)]["risk"]
    cond = res["gate"]["conditions"][0]
    assert res["gate"]["tripped"] and cond["condition"] == "risk>=0" and cond["models"][0]["value"] == value
    assert "TRIPPED" in r.output and "NOT validated for this base" in r.output
    r = CliRunner().invoke(cli, args + ["--json", str(out), "--risk-file", str(risk), "--fail-on", "risk>1"])
    assert r.exit_code == 0 and json.loads(out.read_text())["gate"]["tripped"] is False, r.output
    r = CliRunner().invoke(cli, args + ["--json", str(out), "--fail-on", "first_token_drop>=0.3"])
    assert r.exit_code == 0 and json.loads(out.read_text())["gate"]["conditions"][0]["models"][0]["value"] == 0
    r = CliRunner().invoke(cli, ["spectrum", str(refusing_llama), str(scan_adapter), "--fail-on", "risk>0.5"])
    assert r.exit_code == 2 and "unknown field 'risk'" in r.output


def test_audit_gate_on_scan_fields(refusing_llama, scan_prompts, scan_adapter, tmp_path, monkeypatch):
    import lora_audit.spectral.api as spectral_api
    from lora_audit.audit import AuditConfig, run_audit
    from lora_audit.errors import InputError
    from lora_audit.results.gate import fields_for, parse_gate
    from lora_audit.safety.evaluate import EvalConfig

    from .conftest import write_validated_risk

    gate = parse_gate("predicted_loss==true,risk>=0", fields_for("spectrum", "safety", "scan"))
    safety = EvalConfig(prompts=str(scan_prompts[0]), benign=str(scan_prompts[1]), chat_template=str(scan_prompts[2]),
                        tasks=[], max_new_tokens=4, device="cpu")
    scan = _cfg(scan_prompts, use_cache=False, risk_file=str(write_validated_risk(tmp_path / "risk.json")))
    outcome = run_audit(str(refusing_llama), [str(scan_adapter)], tmp_path / "audit",
                        AuditConfig(SpectrumSettings(k=4, device="cpu"), progress=False, safety=safety, gate=gate, scan=scan),
                        tuned_labels=["ad"])
    g = json.loads((tmp_path / "audit" / "scan.json").read_text())["gate"]
    assert g["tripped"] is True and [c["condition"] for c in g["conditions"]] == ["predicted_loss==true", "risk>=0"]
    predicted = outcome.scan.models["ad"].verdict == "PREDICTED_SAFETY_LOSS"
    assert g["conditions"][0]["tripped"] is predicted
    with pytest.raises(InputError, match="safety-scan is skipped"):
        run_audit(str(refusing_llama), [str(scan_adapter)], tmp_path / "audit2",
                  AuditConfig(SpectrumSettings(k=4, device="cpu"), progress=False, safety=safety, gate=gate, scan=None))
    assert not (tmp_path / "audit2").exists()
    # the automatic scan and the packaged (not validated) risk models: an error before the spectrum runs
    monkeypatch.setattr(spectral_api, "run_spectrum", lambda *a, **k: pytest.fail("the audit started its work"))
    with pytest.raises(InputError, match="no validated full risk model"):
        run_audit(str(refusing_llama), [str(scan_adapter)], tmp_path / "audit3",
                  AuditConfig(SpectrumSettings(k=4, device="cpu"), progress=False, safety=safety, gate=gate))
    assert not (tmp_path / "audit3").exists()
