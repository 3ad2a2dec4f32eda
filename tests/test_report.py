"""The report's arithmetic: relative gains and which way is better."""

import pytest

from simulations.report import gains, relative_gain


def test_relative_gain_for_higher_and_lower_is_better():
    assert relative_gain(0.5, 0.55, True) == pytest.approx(0.10)
    assert relative_gain(1.0, 0.8, False) == pytest.approx(0.20)  # MAE went down: a gain
    assert relative_gain(0.5, 0.45, True) == pytest.approx(-0.10)


def test_gains_lists_each_stage_transition_that_was_run():
    res = {
        "task_type": "classification",
        "methods": {
            "population": {"metrics": {"accuracy": 0.40}},
            "proper_group": {"metrics": {"accuracy": 0.44}},
            "proper": {"metrics": {"accuracy": 0.462}},
            "oppu": {"metrics": {"accuracy": 0.42}},
        },
    }
    lines = gains(res)
    assert any("stage 1 -> 2" in x and "+10.0 %" in x for x in lines)
    assert any("stage 2 -> 3" in x and "+5.0 %" in x for x in lines)
    assert not any("end-to-end" in x for x in lines)
