"""The study's learning-rate figure: counts spanning hundreds get a log axis above 1, so a count of
1 or 6 is not drawn as 0 next to 325; small counts keep a linear integer axis."""

from __future__ import annotations

from lora_audit.report.figures import lr_curves


def _svg(counts: list[int]) -> str:
    return lr_curves([("LoRA r=8", [5e-4, 1.5e-3, 5e-3], counts)], ylabel="intruders", integer=True)


def test_wide_counts_get_a_log_axis_above_one():
    wide, narrow = _svg([0, 6, 325]), _svg([0, 1, 13])
    assert "log scale above 1" in wide and "log scale above 1" not in narrow
    # the x ticks are the grid's own values, as text
    assert all(t in wide for t in ("5e-4", "1.5e-3", "5e-3"))
