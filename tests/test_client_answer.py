"""`proper-fed client generate` (client.enroll.answer) on a store that cannot answer yet: each case names what
is missing and what to do, before any model is loaded."""

import pytest

from client.enroll import answer
from proper_fed.errors import BundleError, ConfigError


def test_a_store_without_enrollment_needs_the_user_named(tmp_path):
    with pytest.raises(ConfigError, match="no enrollment.json; pass --user-id"):
        answer(tmp_path, "hello")


def test_a_store_that_never_took_part_in_a_run_says_it_holds_no_bundle(tmp_path):
    with pytest.raises(BundleError, match="holds no bundle yet"):
        answer(tmp_path, "hello", user_id="alice")
