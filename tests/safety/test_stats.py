"""Wilson interval against values computed by hand from the formula (Wilson 1927)."""

import math

import pytest

from lora_audit.safety.stats import wilson_interval


def test_wilson_hand_computed():
    # k=3, n=16, z=1.96: p=0.1875; z^2=3.8416; denom=1+3.8416/16=1.2401;
    # centre=(0.1875+3.8416/32)/1.2401=(0.1875+0.12005)/1.2401=0.248004...
    # half=1.96/1.2401*sqrt(0.1875*0.8125/16+3.8416/1024)=1.580518*sqrt(0.009521484+0.003751563)
    #     =1.580518*0.115209=0.182090 -> [0.06591, 0.43009]
    lo, hi = wilson_interval(3, 16, z=1.96)
    assert lo == pytest.approx(0.065914, abs=2e-5)
    assert hi == pytest.approx(0.430094, abs=2e-5)


def test_wilson_edges():
    lo, hi = wilson_interval(0, 10, z=1.96)  # k=0: lower bound 0, upper z^2/(n+z^2)
    assert lo == 0.0 and hi == pytest.approx(3.8416 / 13.8416, rel=1e-9)
    lo, hi = wilson_interval(10, 10, z=1.96)
    assert hi == 1.0 and lo == pytest.approx(10 / 13.8416, rel=1e-9)
    assert wilson_interval(0, 12)[0] == 0.0 and wilson_interval(12, 12)[1] == 1.0  # exact, not 1e-17
    assert wilson_interval(0, 0) == (0.0, 1.0)
    with pytest.raises(ValueError):
        wilson_interval(5, 3)


def test_wilson_default_is_95_percent():
    lo, hi = wilson_interval(50, 100)
    assert (lo + hi) / 2 == pytest.approx(0.5)
    assert hi - lo == pytest.approx(2 * 1.959964 / (1 + 1.959964**2 / 100) * math.sqrt(0.0025 + 1.959964**2 / 40000),
                                    rel=1e-6)
