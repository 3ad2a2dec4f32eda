"""Every layout loads into the normalized form, with the task detected and golds in label-set spelling."""

from pathlib import Path

import pytest

from proper_fed.data import get_task, load_dataset, load_task_spec
from proper_fed.data.example import Example

FIXTURES = Path(__file__).parent / "fixtures" / "data"
NUMPY = Path(__file__).parents[2] / "shared" / "data" / "numpy-commit-tags"


def test_user_based_lamp_makes_each_question_its_own_user():
    ds = load_dataset(FIXTURES / "lamp2_user" / "dev_questions.json")
    assert ds.task.name == "LaMP-2"
    assert [u.user_id for u in ds.users] == ["110", "111", "112"]
    assert [len(u.profile) for u in ds.users] == [2, 1, 3]
    assert [q.gold for q in ds.queries] == ["sci-fi", "violence", "classic"]


def test_folder_with_one_questions_file_loads_like_the_file():
    by_folder = load_dataset(FIXTURES / "lamp2_user")
    by_file = load_dataset(FIXTURES / "lamp2_user" / "dev_questions.json")
    assert by_folder.users == by_file.users


def test_time_based_lamp_groups_by_user_and_merges_profiles_without_duplicates():
    ds = load_dataset(FIXTURES / "lamp2_time" / "train_questions.json")
    assert [u.user_id for u in ds.users] == ["u1", "u2"]
    u1 = ds.user("u1")
    assert [it.id for it in u1.profile] == ["p1", "p2"]
    assert [q.id for q in u1.queries] == ["t1", "t2"]


def test_old_news_lamp2_is_recognised_by_its_category_items():
    ds = load_dataset(FIXTURES / "lamp2n")
    assert ds.task.name == "LaMP-2N"
    example = ds.task.profile_to_example(ds.users[0], ds.users[0].profile[0])
    assert example.target == "sports"
    assert example.prompt.endswith("article: A late goal decided it.")
    assert example.prompt == ds.queries[0].input.replace("The team won the cup.", "A late goal decided it.")


def test_movie_profile_prompt_reads_like_the_query():
    ds = load_dataset(FIXTURES / "lamp2_user")
    user = ds.users[0]
    example = ds.task.profile_to_example(user, user.profile[0])
    assert example == Example(
        "110", user.queries[0].input.replace("A robot learns to love.", "Aliens invade a farm."), "sci-fi"
    )


def test_rating_task_normalizes_scores():
    ds = load_dataset(FIXTURES / "lamp3")
    assert ds.task.name == "LaMP-3" and ds.task.labels == ("1", "2", "3", "4", "5")
    user = ds.users[0]
    assert [ds.task.profile_target(it) for it in user.profile] == ["5", "4"]
    assert ds.task.query_to_example(user, user.queries[0]).target == "4"


def test_lamp1_trains_on_abstract_to_title_and_answers_with_a_reference_number():
    ds = load_dataset(FIXTURES / "lamp1")
    user = ds.users[0]
    example = ds.task.profile_to_example(user, user.profile[0])
    assert (
        example.prompt == "Generate a title for the following abstract of a paper: We study linear attention."
    )
    assert example.target == "Linear attention revisited"
    assert ds.task.parse_output("I think [1] is right") == "[1]"


@pytest.mark.parametrize(
    ("folder", "task", "target"),
    [("lamp4", "LaMP-4", "Mayor cuts ribbon"), ("lamp5", "LaMP-5", "Tiny models"), ("lamp7", "LaMP-7", None)],
)
def test_generation_tasks_load(folder, task, target):
    ds = load_dataset(FIXTURES / folder)
    assert ds.task.name == task and ds.task.type == "generation"
    user = ds.users[0]
    example = ds.task.profile_to_example(user, user.profile[0])
    if target is None:  # LaMP-7: the tweet itself, asked for as a paraphrase
        assert example.target == "coffee first, then the world"
        assert example.prompt.startswith("Paraphrase the following tweet") and example.prompt.endswith(
            example.target
        )
    else:
        assert example.target == target


def test_test_split_without_outputs_has_no_golds_and_detects_the_task_from_wording():
    ds = load_dataset(FIXTURES / "lamp_test" / "test_questions.json")
    assert ds.task.name == "LaMP-2"
    assert ds.queries[0].gold is None
    assert ds.task.query_to_example(ds.users[0], ds.queries[0]).target == ""


def test_explicit_task_overrides_detection():
    ds = load_dataset(FIXTURES / "lamp_test", task="movie_tagging")
    assert ds.task is get_task("LaMP-2")


def test_oppu_folder_loads_both_files_and_marks_server_users():
    ds = load_dataset(FIXTURES / "oppu" / "movie_tagging")
    assert ds.task.name == "LaMP-2"
    assert [u.user_id for u in ds.users] == ["o1", "o2", "d1"]
    assert ds.server_user_ids == ("o1", "o2")
    golds = {q.id: q.gold for q in ds.queries}
    assert golds == {"o1q1": "comedy", "o2q1": "dystopia", "d1q1": "romance", "d1q2": "classic"}


def test_oppu_single_file_loads():
    ds = load_dataset(FIXTURES / "oppu" / "movie_tagging" / "user_top_100_history.json")
    assert [u.user_id for u in ds.users] == ["d1"] and ds.server_user_ids == ()


def test_custom_spec_loads_and_canonicalizes_golds():
    spec_path = FIXTURES / "custom" / "song_mood.toml"
    ds = load_dataset(FIXTURES / "custom", spec=spec_path)
    assert ds.task == load_task_spec(spec_path)
    assert [u.user_id for u in ds.users] == ["ann", "bob"]
    assert [q.gold for q in ds.queries] == ["sad", "happy"]
    user = ds.users[0]
    assert ds.task.profile_to_example(user, user.profile[0]) == Example(
        "ann", "Mood of this song? Options: happy, sad. Song: sunny hills", "happy"
    )


@pytest.fixture(scope="module")
def numpy_tags():
    if not (NUMPY / "questions.json").is_file():
        pytest.skip(f"numpy-commit-tags not found at {NUMPY} (shared data is outside the repo)")
    return load_dataset(NUMPY / "questions.json")


def test_numpy_commit_tags_loads_through_the_packaged_spec(numpy_tags):
    ds = numpy_tags
    assert ds.task.name == "commit_tagging" and len(ds.task.labels) == 16
    assert len(ds.users) == 85
    assert len(ds.queries) == 425
    assert all(len(u.queries) == 5 for u in ds.users)
    # History prompts use the query's own wording, so train and test prompts differ only in the commit.
    user = ds.users[0]
    prompt = ds.task.profile_prompt(user.profile[0])
    prefix = prompt[: prompt.index("commit: ") + len("commit: ")]
    assert all(q.input.startswith(prefix) for q in ds.queries)
