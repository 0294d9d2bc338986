"""The spectrum JSON contract, its round trip, and the CSV export."""

import io
import json

import pandas as pd
import torch
import pytest

from lora_audit.checkpoints.deltas import Dense, LowRank, MatrixGroup
from lora_audit.errors import InputError
from lora_audit.results.spectrum import SCHEMA_VERSION, SpectrumResult, load_spectrum, split_name
from lora_audit.spectral.engine import audit
from tests.spectral.reference import intruder_case


@pytest.fixture(scope="module")
def result():
    W0, u, v, s = intruder_case(20, 16)
    W0 = W0.float()
    groups = [MatrixGroup(f"model.layers.{i}.mlp.up_proj.weight", W0, [LowRank(u.float(), v.float(), s), Dense(W0 + 0.01)])
              for i in range(2)]
    return audit(groups, k=4, epsilon=0.5, epsilon_sweep=(0.3, 0.7), device="cpu", progress=False, base_label="base/",
                 tuned_labels=["adapter/", "full/"])


def test_json_contract_keys_and_types(result, tmp_path):
    path = result.write_json(tmp_path / "s.json")
    obj = json.loads(path.read_text())
    assert list(obj) == ["lora_audit", "base", "k", "epsilon", "epsilon_sweep", "warnings", "gate", "results"]
    assert obj["gate"] is None  # no --fail-on
    assert obj["lora_audit"]["schema"] == "spectrum" and obj["lora_audit"]["schema_version"] == SCHEMA_VERSION
    assert obj["lora_audit"]["settings"]["k"] == 4
    assert (obj["base"], obj["k"], obj["epsilon"], obj["epsilon_sweep"]) == ("base/", 4, 0.5, [0.3, 0.7])
    r0 = obj["results"][0]
    assert r0["tuned"] == "adapter/" and isinstance(r0["total_intruders"], int)
    assert r0["total_intruders"] == sum(m["intruders"] for m in r0["matrices"]) == 2
    assert r0["by_layer"] == {"0": 1, "1": 1} and r0["by_module"] == {"up_proj": 2}
    m = r0["matrices"][0]
    for key in ("name", "shape", "max_cos", "intruders", "delta_norm", "relative_delta_norm", "effective_rank",
                "stable_rank", "intruder_details", "tuned_singular_values", "method", "module", "layer",
                "sweep_counts", "base_index", "cos_top_base"):
        assert key in m, key
    assert m["name"] == "model.layers.0.mlp.up_proj.weight" and m["shape"] == [20, 16]
    assert len(m["max_cos"]) == 4 and isinstance(m["intruders"], int)
    assert m["intruder_details"][0]["index"] == 0
    assert set(m["intruder_details"][0]) == {"index", "singular_value", "max_cos", "base_index", "base_singular_value"}


def test_round_trip(result, tmp_path):
    path = result.write_json(tmp_path / "s.json")
    back = load_spectrum(path)
    assert back.to_json() == json.loads(path.read_text())
    assert back.results[0].matrices[0].intruder_details[0].max_cos == result.results[0].matrices[0].intruder_details[0].max_cos


def test_from_json_minimal_and_bad(tmp_path):
    minimal = {"base": "b", "k": 2, "epsilon": 0.5, "results": [
        {"tuned": "t", "total_intruders": 1, "matrices": [
            {"name": "model.layers.4.self_attn.v_proj.weight", "shape": [4, 4], "max_cos": [0.2, 0.9], "intruders": 1}]}]}
    res = SpectrumResult.from_json(minimal)
    assert res.results[0].total_intruders == 1
    assert (res.results[0].matrices[0].module, res.results[0].matrices[0].layer) == ("v_proj", 4)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        load_spectrum(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"lora_audit": {"schema": "safety"}, **minimal}))
    with pytest.raises(InputError, match="not a spectrum result"):
        load_spectrum(tmp_path / "other.json")
    (tmp_path / "miss.json").write_text(json.dumps({"base": "b"}))
    with pytest.raises(InputError, match="missing k, epsilon, results"):
        load_spectrum(tmp_path / "miss.json")


def test_csv_one_row_per_tuned_and_matrix(result, tmp_path):
    path = result.write_csv(tmp_path / "s.csv")
    df = pd.read_csv(path)
    assert len(df) == 4 and list(df["tuned"]) == ["adapter/", "adapter/", "full/", "full/"]
    for col in ("name", "module", "layer", "rows", "cols", "intruders", "min_max_cos", "delta_norm",
                "effective_rank", "stable_rank", "intruders_eps_0.3", "intruders_eps_0.7"):
        assert col in df.columns, col
    assert list(df["intruders"]) == [m.intruders for r in result.results for m in r.matrices]
    assert pd.read_csv(io.StringIO(result.to_csv())).shape == df.shape


@pytest.mark.parametrize("name,expected", [
    ("model.layers.3.mlp.down_proj.weight", ("down_proj", 3)),
    ("transformer.h.11.attn.c_attn.weight", ("c_attn", 11)),
    ("lm_head.weight", ("lm_head", None)),
    ("model.embed_tokens.weight", ("embed_tokens", None)),
    ("encoder.layer.2.attention.self.query.weight", ("query", 2)),
])
def test_split_name(name, expected):
    assert split_name(name) == expected


@pytest.mark.parametrize("method", ["randomized", "block_krylov"])
def test_dense_path_method_names_old_and_new_are_read_and_tabulated(method):
    """Files written before the block Krylov path had its name say "randomized": both load, give
    CSV rows, and go through the report's tables."""
    from lora_audit.report.model import gather
    from lora_audit.report.tables import worst_matrices_table
    from tests.report.synth import spectrum as synth_spectrum

    obj = synth_spectrum(["tuned/"])
    for m in obj["results"][0]["matrices"]:
        m["method"] = method
    res = SpectrumResult.from_json(obj)
    assert {m.method for m in res.results[0].matrices} == {method}
    df = pd.read_csv(io.StringIO(res.to_csv()))
    assert set(df["method"]) == {method} and set(df["k_used"]) == {6}  # files without k_used: len(max_cos)
    assert set(worst_matrices_table(gather([obj])).df["method"]) == {method}


def test_skipped_findings_round_trip_and_mark_the_result_incomplete(tmp_path):
    W0, u, v, s = intruder_case(20, 16)
    nan_B = u.float().clone()
    nan_B[0, 0] = float("nan")
    groups = [MatrixGroup("model.layers.0.mlp.up_proj.weight", W0.float(),
                          [LowRank(nan_B, v.float(), s), Dense(torch.zeros(20, 16))])]
    res = audit(groups, k=4, device="cpu", progress=False, tuned_labels=["nan/", "zero/"])
    assert res.incomplete and res.results[0].incomplete and not res.results[1].incomplete
    obj = json.loads(res.write_json(tmp_path / "s.json").read_text())
    assert obj["results"][0]["skipped"] == [{"name": "model.layers.0.mlp.up_proj.weight", "where": "lora_B",
                                              "reason": "1 NaN/Inf value(s) in the lora_B (float32)",
                                              "nonfinite_values": 1}]
    assert obj["results"][1]["skipped"][0]["reason"] == "tuned matrix is all zeros"
    assert [r["matrices_unchanged"] for r in obj["results"]] == [0, 0]
    back = load_spectrum(tmp_path / "s.json")
    assert back.to_json()["results"] == obj["results"] and back.incomplete
    old = dict(obj, results=[{k: v for k, v in r.items() if k != "skipped"} for r in obj["results"]])
    assert not SpectrumResult.from_json(old).incomplete  # files without the field: nothing was skipped
