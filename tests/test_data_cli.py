"""`proper-fed data`: inspect and synth, and a one-line error (exit 2, no traceback) for every bad input."""

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

import proper_fed_cli.data_cmd  # noqa: F401  (registers the `data` sub-app)
from proper_fed_cli.main import app

FIXTURES = Path(__file__).parent / "fixtures" / "data"
NUMPY = Path(__file__).parents[2] / "shared" / "data" / "numpy-commit-tags" / "questions.json"
runner = CliRunner()


def test_inspect_numpy_commit_tags_prints_the_done_when_figures():
    if not NUMPY.is_file():
        pytest.skip(f"numpy-commit-tags not found at {NUMPY}")
    result = runner.invoke(app, ["data", "inspect", str(NUMPY)])
    assert result.exit_code == 0, result.output
    for text in ("commit_tagging", "85", "425", "majority (MAINT)", "0.247", "0.447", "p90"):
        assert text in result.output


def test_inspect_json():
    result = runner.invoke(app, ["data", "inspect", str(FIXTURES / "lamp2_user"), "--json"])
    assert result.exit_code == 0, result.output
    stats = json.loads(result.stdout)
    assert stats["task"] == "LaMP-2" and stats["users"] == 3 and stats["queries"] == 3
    assert set(stats["baselines"]) == {"majority", "user_majority"}


def test_inspect_with_spec():
    result = runner.invoke(
        app,
        ["data", "inspect", str(FIXTURES / "custom"), "--spec", str(FIXTURES / "custom" / "song_mood.toml")],
    )
    assert result.exit_code == 0, result.output
    assert "song_mood" in result.output


def test_synth_writes_refuses_to_overwrite_and_forces(tmp_path):
    out = tmp_path / "syn"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--users", "12", "--seed", "2"])
    assert result.exit_code == 0, result.output
    assert "oracle_user_rule" in result.output and (out / "questions.json").is_file()
    again = runner.invoke(app, ["data", "synth", "--out", str(out)])
    assert again.exit_code == 2 and "not empty" in again.output and "--force" in again.output
    forced = runner.invoke(app, ["data", "synth", "--out", str(out), "--users", "10", "--force"])
    assert forced.exit_code == 0, forced.output
    inspected = runner.invoke(app, ["data", "inspect", str(out), "--json"])
    assert json.loads(inspected.stdout)["users"] == 10


def test_synth_bad_config_writes_nothing(tmp_path):
    out = tmp_path / "syn"
    result = runner.invoke(app, ["data", "synth", "--out", str(out), "--labels", "20"])
    _assert_one_line_error(result, "labels")
    assert not out.exists() and list(tmp_path.iterdir()) == []


def _assert_one_line_error(result, *fragments):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    message = result.output.strip()
    assert message.startswith("error: ") and "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, message


def _lamp2(tmp_path, edit_questions=None, edit_outputs=None):
    """A copy of the LaMP-2 fixture with one defect planted."""
    folder = tmp_path / "bad"
    shutil.copytree(FIXTURES / "lamp2_user", folder)
    for name, edit in (("dev_questions.json", edit_questions), ("dev_outputs.json", edit_outputs)):
        if edit is not None:
            doc = json.loads((folder / name).read_text())
            edit(doc)
            (folder / name).write_text(json.dumps(doc))
    return folder


def _drop_input(q):
    del q[1]["input"]


def _empty_profile(q):
    q[2]["profile"] = []


def _dup_question(q):
    q[1]["id"] = "110"


def _conflicting_item(q):
    q[0]["profile"][1]["id"] = "1100"


def _bad_profile_label(q):
    q[0]["profile"][0]["tag"] = "horror"


def _profile_without_description(q):
    del q[1]["profile"][0]["description"]


def _mismatched_ids(o):
    o["golds"][2]["id"] = "999"


def _dup_gold(o):
    o["golds"].append({"id": "110", "output": "comedy"})


def _bad_gold_label(o):
    o["golds"][0]["output"] = "horror"


def _unknown_task(o):
    o["task"] = "LaMP_42"


@pytest.mark.parametrize(
    ("edit_q", "edit_o", "fragments"),
    [
        (_drop_input, None, ["dev_questions.json", "record 1 (id '111')", "'input'"]),
        (_empty_profile, None, ["dev_questions.json", "user '112'", "empty profile"]),
        (_dup_question, None, ["question id '110' appears twice"]),
        (_conflicting_item, None, ["'1100' appears twice with different content"]),
        (_bad_profile_label, None, ["profile item '1100'", "'horror' is not in the label set of LaMP-2"]),
        (_profile_without_description, None, ["profile item '1110' of user '111' lacks ['description']"]),
        (None, _mismatched_ids, ["do not match", "'112'", "'999'"]),
        (None, _dup_gold, ["dev_outputs.json", "gold id '110' appears twice"]),
        (None, _bad_gold_label, ["gold of question '110' is 'horror'", "label set"]),
        (None, _unknown_task, ["dev_outputs.json", "unknown task 'LaMP_42'", "--task"]),
    ],
    ids=lambda v: getattr(v, "__name__", None) if callable(v) else None,
)
def test_bad_input_is_a_one_line_error(tmp_path, edit_q, edit_o, fragments):
    folder = _lamp2(tmp_path, edit_q, edit_o)
    _assert_one_line_error(runner.invoke(app, ["data", "inspect", str(folder)]), *fragments)


def test_malformed_json(tmp_path):
    result = runner.invoke(app, ["data", "inspect", str(FIXTURES / "malformed.json"), "--task", "LaMP-2"])
    _assert_one_line_error(result, "malformed.json", "malformed JSON at line 1")


def test_unknown_task_option_and_missing_path(tmp_path):
    _assert_one_line_error(
        runner.invoke(app, ["data", "inspect", str(FIXTURES / "lamp2_user"), "--task", "LaMP-9"]),
        "unknown task 'LaMP-9'",
    )
    _assert_one_line_error(runner.invoke(app, ["data", "inspect", str(tmp_path / "nope")]), "no such file")
    _assert_one_line_error(runner.invoke(app, ["data", "inspect", str(tmp_path)]), "no *questions*.json")


def test_custom_task_without_its_spec_is_unknown():
    _assert_one_line_error(
        runner.invoke(app, ["data", "inspect", str(FIXTURES / "custom")]), "unknown task 'song_mood'"
    )


def test_bad_spec_file(tmp_path):
    spec = tmp_path / "spec.toml"
    spec.write_text('name = "x"\ntype = "classification"\ninput_field = "a"\noutput_field = "b"\n')
    result = runner.invoke(app, ["data", "inspect", str(FIXTURES / "custom"), "--spec", str(spec)])
    _assert_one_line_error(result, "spec.toml", "needs labels")
