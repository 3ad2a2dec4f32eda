"""Task specs: output parsing, the registry, and the checks a custom TOML spec goes through."""

import pytest

from proper_fed.data import TaskSpec, find_task, get_task, load_task_spec
from proper_fed.data.task_spec import task_spec_from_mapping
from proper_fed.data.types import ProfileItem, User
from proper_fed.errors import ConfigError, DataError


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("comedy", "comedy"),
        ("  The tag is Dark Comedy.", "dark comedy"),  # longest label at the earliest position
        ("comedy, or maybe dark comedy", "comedy"),  # first label in the text
        ("SCI-FI!", "sci-fi"),
        ("no idea", "no idea"),  # unknown answers stay raw, so they score as wrong
        ("comedyish", "comedyish"),  # whole words only
    ],
)
def test_classification_parse_takes_first_label_case_insensitively(text, expected):
    assert get_task("LaMP-2").parse_output(text) == expected


def test_short_labels_need_word_boundaries():
    task = get_task("commit_tagging")
    assert task.parse_output("special case") == "special case"  # not CI
    assert task.parse_output("ci: bump runner") == "CI"


@pytest.mark.parametrize(
    ("text", "expected"),
    [("4", 4), ("I'd say 5/5", 5), ("0 then 3", 3), ("score: 4.5", None), ("ten", None), ("", None)],
)
def test_rating_parse_takes_first_integer_in_range(text, expected):
    assert get_task("LaMP-3").parse_output(text) == expected


def test_registry_finds_tasks_by_alias():
    assert get_task("LaMP_2M") is get_task("movie_tagging") is get_task("lamp-2")
    assert get_task("LaMP_2N").name == "LaMP-2N"
    assert get_task("LaMP_1").name == "LaMP-1"
    assert find_task("commit_tagging").labels[:3] == ("MAINT", "DOC", "BUG")
    assert find_task("synthetic_groups").type == "classification"
    assert find_task("nope") is None
    with pytest.raises(ConfigError, match="unknown task 'nope'"):
        get_task("nope")


def test_packaged_commit_spec_prompt_matches_the_numpy_query_wording():
    task = get_task("commit_tagging")
    prompt = task.profile_prompt(ProfileItem("x", {"description": "Fix it", "tag": "BUG"}))
    assert prompt == (
        "Which tag does this commit relate to among the following tags? Just answer with the tag name "
        "without further explanation. tags: [MAINT, DOC, BUG, ENH, TST, TYP, BLD, STY, CI, DEP, API, NEP, "
        "BENCH, REL, DEV, SIMD] commit: Fix it"
    )


def test_query_template_retemplates_the_question():
    spec = TaskSpec(
        name="t",
        type="classification",
        labels=("a", "b"),
        input_field="x",
        output_field="y",
        query_template="Pick {labels}: {input}",
    )
    user = User("u", (ProfileItem("1", {"x": "hi", "y": "a"}),))
    from proper_fed.data.types import Query

    assert spec.query_to_example(user, Query("q", "text", "b")).prompt == "Pick a, b: text"


def test_profile_item_missing_a_key_is_a_data_error():
    task = get_task("LaMP-2")
    with pytest.raises(DataError, match=r"profile item '7' of user 'u' lacks \['description'\]"):
        task.profile_to_example(
            User("u", (ProfileItem("7", {"tag": "comedy"}),)), ProfileItem("7", {"tag": "comedy"})
        )


BASE = {"name": "t", "type": "classification", "labels": ["a", "b"], "input_field": "x", "output_field": "y"}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"type": "ranking"}, "type = 'ranking'"),
        ({"labels": []}, "needs labels"),
        ({"labels": ["a", "A"]}, "labels repeat"),
        ({"type": "rating", "labels": [], "scale": [5, 1]}, "scale"),
        ({"profile_template": "{x} -> {y}"}, "the answer itself"),
        ({"profile_template": "{}"}, "not a plain key"),
        ({"profile_template": "{x"}, "literal braces"),
        ({"query_template": "{input} {user}"}, "may only use"),
        ({"metrics": ["rouge1"]}, "do not apply"),
        ({"labelz": ["a"]}, "unknown key"),
        ({"input_field": 3}, "wrong type"),
    ],
)
def test_bad_spec_is_a_config_error_naming_the_problem(change, message):
    with pytest.raises(ConfigError, match=message):
        task_spec_from_mapping({**BASE, **change}, "spec.toml")


def test_spec_missing_required_keys(tmp_path):
    path = tmp_path / "spec.toml"
    path.write_text('name = "t"\ntype = "generation"\n')
    with pytest.raises(ConfigError, match=r"missing key\(s\) \['input_field', 'output_field'\]"):
        load_task_spec(path)
    path.write_text("name = \n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_task_spec(path)


def test_rating_spec_derives_labels_from_scale():
    spec = task_spec_from_mapping(
        {"name": "stars", "type": "rating", "scale": [1, 3], "input_field": "x", "output_field": "y"}
    )
    assert spec.labels == ("1", "2", "3") and spec.metric_names == ("mae", "rmse")
