"""The report's arithmetic: relative gains and which way is better."""

import pytest

from simulations.report import by_protocol, gains, relative_gain, write_report


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


def _method(acc: float, parse: float = 1.0) -> dict:
    return {
        "metrics": {"accuracy": acc, "f1": acc / 2},
        "parse_rate": parse,
        "cohorts": {},
        "train_seconds_per_user": 1.0,
        "trainable_parameters_per_user": 10,
    }


def _results(**extra) -> dict:
    return {
        "task": "LaMP_2M",
        "task_type": "classification",
        "answered": "2 of 3 devices answered",
        "users": {"server": 4, "devices": 3, "devices_answered": 2},
        "config": {"scoring": ["generate", "rank"]},
        "methods": {
            "majority": _method(0.2),
            "proper": _method(0.5, parse=0.75),
            "oppu": _method(0.4),
            "proper@rank": _method(0.6),
            "oppu@rank": _method(0.45),
        },
        "timings": {"server_stages_s": 1, "device_phase_s": 1, "total_s": 2, "device_users_per_hour": 1},
        "bytes": {"per_device": {}},
        **extra,
    }


def test_each_protocol_gets_its_own_table_and_the_no_llm_baselines_join_both():
    tables = by_protocol(_results())
    assert set(tables) == {"generate", "rank"}
    assert set(tables["generate"]) == {"majority", "proper", "oppu"}
    assert set(tables["rank"]) == {"majority", "proper", "oppu"}
    assert tables["rank"]["proper"]["metrics"]["accuracy"] == 0.6


def test_report_names_the_protocol_of_every_table_the_parse_rate_and_the_missing_devices(tmp_path):
    res = _results(failed={"7": "device error 422: the device's data does not fit the task"})
    text = write_report(tmp_path, res, {}).read_text()
    assert "2 of 3 devices answered" in text.splitlines()[2]  # the answered count leads the report
    assert "scoring `generate`" in text and "scoring `rank`" in text
    assert "parse rate" in text and "0.750" in text
    assert "## Missing devices" in text and "node 7" in text and "error 422" in text


def test_answer_spread_flags_a_method_that_answers_one_label_for_most_queries(tmp_path):
    import json

    from simulations.report import answer_spread

    preds = tmp_path / "predictions"
    preds.mkdir()
    collapsed = ["skip"] * 9 + ["save"]
    varied = ["skip", "save", "share", "like", "skip"] * 2
    for name, outs in (("proper_group", collapsed), ("proper", varied)):
        golds = [{"id": f"q{i}", "output": o} for i, o in enumerate(outs)]
        (preds / f"{name}.json").write_text(json.dumps({"task": "t", "golds": golds}))
    results = {"methods": {"proper_group": {}, "proper": {}, "oppu": {}}}
    rows = {line.split("|")[1].strip(): line for line in answer_spread(tmp_path, results).splitlines()[2:]}
    assert set(rows) == {"`proper_group`", "`proper`"}  # oppu has no predictions file: no row
    assert "| 2 | `skip` | 0.90 |" in rows["`proper_group`"]
    assert "| 4 | `skip` | 0.40 |" in rows["`proper`"]


def test_bytes_are_shown_per_phase_and_per_federated_round():
    from simulations.report import bytes_lines

    per_device = {
        "1": {
            "federated_stages": {"sent": 3_000_000, "received": 9_000_000},
            "secure_sum": {"sent": 20, "received": 40},
        },
        "2": {
            "federated_stages": {"sent": 5_000_000, "received": 11_000_000},
            "secure_sum": {"sent": 40, "received": 60},
        },
    }
    server = {
        "population.rounds": 2.0,
        "population.bytes_to_device_per_round": 1_000_000.0,
        "population.bytes_from_device_per_round": 2_500_000.0,
    }
    lines = bytes_lines({"bytes": {"per_device": per_device}, "server": {"proper": server}})
    text = "\n".join(lines)
    assert "federated stages 1-2 (SecAgg+ rounds): 4.00 MB to it, 10.00 MB from it" in text
    assert "bytes per device: 4.00 MB sent to it, 10.00 MB received from it" in text  # the mean over devices
    assert "one masked vector): 0.0 kB to it, 0.1 kB from it" in text  # (40 + 60) / 2 bytes from it
    assert "federated population (2 rounds): 1.00 MB to it, 2.50 MB from it" in text
    assert "federated group" not in text  # no group rounds recorded
