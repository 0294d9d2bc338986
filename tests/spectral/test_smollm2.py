"""The real default model: a PEFT LoRA on SmolLM2-135M-Instruct (q_proj and v_proj of the first
and last layer, random B) audited through the CLI; counts and cosines equal the float64
reference on peft's merge_and_unload (cosines within what float32 can resolve: ``cos_tolerance``)."""

import json

import pytest
import torch
from click.testing import CliRunner

from lora_audit.cli import cli
from tests.helpers import make_peft_adapter, reference_intruders
from tests.spectral.reference import cos_tolerance, merged_weights


@pytest.mark.smollm2
def test_smollm2_lora_through_cli(smollm2_dir, tmp_path):
    adapter = make_peft_adapter(smollm2_dir, tmp_path / "adapter", r=4, lora_alpha=8, init_scale=0.1,
                                target_modules=["q_proj", "v_proj"], layers_to_transform=[0, 29])
    out = tmp_path / "smol.json"
    r = CliRunner().invoke(cli, ["spectrum", str(smollm2_dir), str(adapter), "--json", str(out), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    entry = json.loads(out.read_text())["results"][0]
    base_w, tuned_w = merged_weights(smollm2_dir, adapter)
    ref = {n: reference_intruders(base_w[n], W1) for n, W1 in tuned_w.items() if not torch.equal(base_w[n], W1)}
    assert len(ref) == 4
    got = {m["name"]: m for m in entry["matrices"]}
    assert set(got) == set(ref)
    for name, (cos, count) in ref.items():
        assert got[name]["intruders"] == count, name
        # layer 29's v_proj has singular values 10.0166 and 10.0092: their vectors are known in
        # float32 only to ~1e-4 (cos_tolerance), elsewhere the agreement is 1e-4
        for c, want, tol in zip(got[name]["max_cos"], cos, cos_tolerance(tuned_w[name]), strict=True):
            assert c == pytest.approx(want, abs=tol), name
    assert got["model.layers.0.self_attn.v_proj.weight"]["shape"] == [192, 576]
    assert entry["total_intruders"] == sum(c for _, c in ref.values()) > 0
