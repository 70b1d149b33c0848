"""Job ids and the object keys of a job's revisions (storyreel.ids)."""

from __future__ import annotations

import pytest

from storyreel.errors import InvalidInput
from storyreel.ids import (
    MAX_REVISION,
    SHOWN_CHARS,
    check_job_id,
    check_revision,
    is_job_id,
    job_key,
    new_job_id,
    shown,
)


def test_revision_zero_keeps_the_jobs_own_folder():
    assert job_key("job-1", "images", "scene-001.png") == "jobs/job-1/images/scene-001.png"
    assert job_key("job-1", "manifest.json", revision=0) == "jobs/job-1/manifest.json"


@pytest.mark.parametrize(
    ("revision", "key"),
    [
        (1, "jobs/job-1/r1/video/video.mp4"),
        (2, "jobs/job-1/r2/video/video.mp4"),
        (MAX_REVISION, f"jobs/job-1/r{2**31 - 1}/video/video.mp4"),
    ],
)
def test_a_later_revision_gets_a_folder_of_its_own(revision, key):
    assert job_key("job-1", "video", "video.mp4", revision=revision) == key


def test_every_revision_of_a_job_has_different_keys():
    keys = {job_key("job-1", "images", "scene-001.png", revision=n) for n in range(5)}
    assert len(keys) == 5
    assert all(key.startswith("jobs/job-1/") for key in keys)


@pytest.mark.parametrize("revision", [-1, 2**31, 2**32 - 1, True, False, 1.0, "2", None], ids=repr)
def test_a_revision_outside_0_to_2_31_or_not_an_int_is_invalid_input(revision):
    with pytest.raises(InvalidInput, match=r"revision must be a whole number from 0 to 2\*\*31-1"):
        job_key("job-1", "images", "scene-001.png", revision=revision)
    with pytest.raises(InvalidInput):
        check_revision(revision)


def test_check_revision_returns_a_good_revision():
    assert [check_revision(n) for n in (0, 7, MAX_REVISION)] == [0, 7, 2**31 - 1]


def test_a_part_that_looks_like_a_revision_folder_is_refused():
    # jobs/<id>/r2/... at revision 0 would alias revision 2's keys.
    with pytest.raises(ValueError, match="reserved for revision folders"):
        job_key("job-1", "r2", "video.mp4")
    assert job_key("job-1", "reports", "r2.json") == "jobs/job-1/reports/r2.json"


@pytest.mark.parametrize("job_id", ["", "../x", "-x", "a/b", "x" * 65])
def test_a_bad_job_id_is_invalid_input_at_any_revision(job_id):
    for revision in (0, 3):
        with pytest.raises(InvalidInput, match="job_id must be"):
            job_key(job_id, "images", revision=revision)


def test_new_job_ids_are_usable_in_keys():
    job_id = new_job_id()
    assert job_key(job_id, "video", revision=4) == f"jobs/{job_id}/r4/video"


@pytest.mark.parametrize("job_id", ["abc\n", "abc\r\n", "\nabc", "abc\x00"], ids=repr)
def test_a_job_id_with_a_newline_or_control_character_is_refused(job_id):
    # re.match with "$" accepted "abc\n": the id checks match the whole string.
    assert not is_job_id(job_id)
    with pytest.raises(InvalidInput, match="job_id must be"):
        check_job_id(job_id)


def test_the_message_about_a_huge_job_id_shows_only_its_start():
    job_id = "x" * (3 * 1024 * 1024)
    with pytest.raises(InvalidInput) as caught:
        check_job_id(job_id)
    assert len(caught.value.message) < 300
    assert f"({len(job_id)} characters)" in caught.value.message


def test_shown_cuts_long_values_and_keeps_short_ones():
    assert shown("abc") == "'abc'"
    assert shown("a" * 1000) == f"{'a' * SHOWN_CHARS!r}... (1000 characters)"
    assert len(shown(list(range(10_000)))) <= 2 * SHOWN_CHARS + 3
    assert "too long" in shown(10**5000)
