"""The one result contract: every kind is a Result with one provenance envelope; to_json is pure
(two calls, the same JSON, the result unchanged); from_json(to_json()) gives the result back;
files written before keep reading."""

from __future__ import annotations

import copy
import json

import pytest

from lora_audit.errors import InputError
from lora_audit.results import PROVENANCE_KEY, Provenance, Result, load_result
from lora_audit.results.cache import CacheListing
from lora_audit.results.mitigate import MitigatedMatrix, MitigateResult
from lora_audit.results.risk import RiskModelFile
from lora_audit.results.safety import SafetyResult
from lora_audit.results.scan import DirectionInfo, ModelScan, RiskModelInfo, SafetyScanResult
from lora_audit.results.screen import ScreenRecord, ScreenResult, ScreenRow, ScreenSetup
from lora_audit.results.spectrum import SpectrumResult
from lora_audit.results.study import StudyClaim, StudyPoint, StudyResult
from lora_audit.results.training import FederatedModule, FederatedResult, TrainingResult

from . import synth


def _risk_model() -> RiskModelInfo:
    return RiskModelInfo(name="full", features=["refusal_score_delta"], transforms=["identity"], mean=[0.0],
                         scale=[1.0], weights=[-1.0], intercept=0.0, fit={"n": 3})


def examples() -> list[Result]:
    """One result of every kind, built the way the tool builds them."""
    spectrum = synth.spectrum_result()
    spectrum.settings = {"k": 3, "epsilon": 0.5, "device": "cpu"}
    return [
        spectrum,
        synth.safety_result(),
        SafetyScanResult(base="b", models={"t": ModelScan(risk=0.25, signals={"refusal_score_delta": -1.0},
                                                          intervals={"refusal_score_delta": [-1.5, -0.5]})},
                         direction=DirectionInfo(n_layers=2, d_model=8), risk_models={"full": _risk_model()},
                         settings={"prompts": "builtin:harmful"}),
        StudyResult(title="t", question="q", k=10, epsilon=0.5, points=[StudyPoint("p", "s", 1e-4, 10, intruders=2)],
                    claims=[StudyClaim("c", "r", "m", True)], settings={"steps": 10}),
        ScreenResult(base="b", k=10, epsilon=0.5, adapters=[ScreenRow("a", "a", "ok", total_intruders=1, position=1)],
                     counts={"adapters": 1}, settings={"engine": "local"}),
        ScreenRecord(adapter="a", status="ok", result=synth.spectrum_result().results[1]),
        ScreenSetup(base="b", base_fingerprint="sha256:0", k=10, epsilon=0.5, epsilon_sweep=[0.3, 0.5]),
        TrainingResult(method="lora", loss=[2.0, 1.5], final_loss=1.5, trainable_parameters=64, wall_time_s=1.0,
                       settings={"seed": 0, "rank": 8}),
        FederatedResult(method="fedavg", clients=["a", "b"], fedavg_bias_total=0.1, aggregate_bias_total=0.1,
                        modules={"m": FederatedModule(bias=0.1, mean_update_norm=2.0)}, settings={"out": None}),
        MitigateResult(base="b", adapter="a", out="o", lam=0.5, k=10, epsilon=0.5, intruders_before=3,
                       intruders_after=1, matrices_rewritten=1,
                       modules={"m.weight": MitigatedMatrix(3, 1, 10, True, 0.01)}, settings={"lam": 0.5}),
        RiskModelFile(models={"full": _risk_model()}, panel={"models": 21}),
        CacheListing(root="/c", entries=[{"key": "abc", "bytes": 10}], count=1, total_bytes=10),
    ]


@pytest.mark.parametrize("result", examples(), ids=lambda r: type(r).__name__)
def test_to_json_is_pure_and_round_trips(result):
    before = copy.deepcopy(result)
    prov = result.provenance
    a, b = result.to_json(), result.to_json()
    assert json.dumps(a) == json.dumps(b)  # the same text, twice
    assert result == before and result.provenance is prov and prov == before.provenance  # nothing changed
    a["lora_audit"]["settings"]["injected"] = 1  # the JSON shares nothing with the result
    assert "injected" not in result.settings and "injected" not in result.to_json()["lora_audit"]["settings"]
    obj = result.to_json()
    assert list(obj)[0] == PROVENANCE_KEY
    block = obj[PROVENANCE_KEY]
    assert block["schema"] == type(result).SCHEMA and block["schema_version"] == type(result).SCHEMA_VERSION
    assert block["settings"] == result.settings and block["tool_version"] and block["created"]
    back = type(result).from_json(json.loads(json.dumps(obj)), source="x.json")
    assert back == result and back.provenance == result.provenance and back.settings == result.settings
    assert back.to_json() == obj


def test_every_kind_has_its_own_schema_name():
    names = [type(r).SCHEMA for r in examples()]
    assert len(set(names)) == len(names) and all(names)


def test_a_result_names_its_kind_and_refuses_another(tmp_path):
    spec = synth.spectrum_result().to_json()
    with pytest.raises(InputError, match="not a safety-eval result"):
        SafetyResult.from_json(spec, source="s.json")
    future = json.loads(json.dumps(spec))
    future[PROVENANCE_KEY]["schema_version"] = SpectrumResult.SCHEMA_VERSION + 1
    with pytest.raises(InputError, match="newer than this lora-audit understands"):
        SpectrumResult.from_json(future, source="s.json")
    with pytest.raises(InputError, match="not a training record"):
        TrainingResult.from_json({"method": "lora"}, source="t.json")  # no block, no identifying fields


def test_older_files_keep_reading():
    """Safety results with the block under "provenance" (or both keys), risk files with a top-level
    "schema", spectrum results without any block."""
    safety = synth.safety_result().to_json()
    legacy = {"provenance": safety.pop(PROVENANCE_KEY), **safety}
    assert load_result(legacy).verdict == synth.safety_result().verdict
    both = {PROVENANCE_KEY: legacy["provenance"], **legacy}
    assert SafetyResult.from_json(both).provenance.schema == "safety"
    old_risk = {"schema": "lora-audit/scan-risk", "version": 1, "panel": {"models": 21},
                "models": {"full": json.loads(json.dumps(_risk_model().__dict__))}}
    read = RiskModelFile.from_json(old_risk, source="risk.json")
    assert read.models["full"] == _risk_model() and read.panel == {"models": 21}
    with pytest.raises(InputError, match="not a lora-audit risk model file"):
        RiskModelFile.from_json({"schema": "other", "models": {}}, source="risk.json")
    bare = synth.spectrum_result().to_json()
    bare.pop(PROVENANCE_KEY)
    got = load_result(bare)
    assert isinstance(got, SpectrumResult) and got.provenance == Provenance("spectrum", 1)


def test_the_packaged_risk_file_reads():
    from lora_audit.scan.risk import load_risk_models

    models, panel = load_risk_models()
    assert set(models) == {"full"} and panel["models"] == 62  # the zoo panel's fit (no weights-only model)
