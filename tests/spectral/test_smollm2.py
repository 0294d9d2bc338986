"""The real default model: a PEFT LoRA on SmolLM2-135M-Instruct (q_proj and v_proj of the first
and last layer, random B) audited through the CLI; counts and cosines equal the float64
reference on peft's merge_and_unload."""

import json

import pytest
from click.testing import CliRunner

from lora_audit.cli import cli
from tests.helpers import make_peft_adapter
from tests.spectral.reference import reference_audit


@pytest.mark.smollm2
def test_smollm2_lora_through_cli(smollm2_dir, tmp_path):
    adapter = make_peft_adapter(smollm2_dir, tmp_path / "adapter", r=4, lora_alpha=8, init_scale=0.1,
                                target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 29])
    out = tmp_path / "smol.json"
    r = CliRunner().invoke(cli, ["spectrum", str(smollm2_dir), str(adapter), "--json", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    entry = json.loads(out.read_text())["results"][0]
    ref = reference_audit(smollm2_dir, adapter)
    assert len(ref) == 4
    got = {m["name"]: m for m in entry["matrices"]}
    assert set(got) == set(ref)
    for name, (cos, count) in ref.items():
        assert got[name]["intruders"] == count, name
        assert got[name]["max_cos"] == pytest.approx(cos, abs=1e-4), name
    assert got["model.layers.0.self_attn.v_proj.weight"]["shape"] == [192, 576]
    assert entry["total_intruders"] == sum(c for _, c in ref.values()) > 0
