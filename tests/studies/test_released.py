"""The released-model study's table (``studies.released.readme``) says what was measured, per recipe
and probe, with the run it came from."""

from __future__ import annotations

from lora_audit.studies.released import KEEP, RECIPES, UNDO_AT_MOST, readme


def test_readme_lists_every_measured_recipe_with_its_probes_and_the_run():
    r = {"recipe": {"name": "v1", "steps": 150, "lr": 5e-5, "note": "n", "data": ["builtin:safety-tune"]},
         "released_train_s": 140.2, "released_refusal": 1.0, "released_over_refusal": 0.5,
         "refusal": {"lora-r8-lr1.5e-3": 0.55, "lora-undo": 0.0}, "goal_met": False}
    text = readme([r], {"version": "0.1", "git": "abc", "device": "cpu"})
    assert "| v1 | 150 | 5e-05 | 140 | 100% | 50% | 55% | 0% | no |" in text
    assert "| lora-r8-lr1.5e-3 | lora-undo |" in text and "git abc on cpu" in text
    assert f">= {KEEP:.0%}" in text and f"<= {UNDO_AT_MOST:.0%}" in text
    assert "(no candidate measured)" in readme([])
    assert len({rc.name for rc in RECIPES}) == len(RECIPES)


def test_a_freshly_trained_candidate_is_recorded_like_a_reused_one(monkeypatch, tmp_path):
    """``train_released`` gives the training record as a dict, trained now or read back."""
    from lora_audit.results.training import TrainingResult
    from lora_audit.studies import released as R
    from lora_audit.training import loop

    monkeypatch.setattr(loop, "train", lambda **kw: TrainingResult(method="full", wall_time_s=1.5, settings={}))
    rec = R.train_released(RECIPES[0], tmp_path / "base", tmp_path / "out", work=tmp_path, seed=0, batch_size=4,
                           precision="float32", device="cpu")
    assert rec["wall_time_s"] == 1.5 and rec["method"] == "full"
