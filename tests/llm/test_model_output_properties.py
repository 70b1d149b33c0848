"""No INTERNAL from model output: whatever a model writes ends in a storyboard or a clear refusal.

Property-based (hypothesis): arbitrary Unicode text, arbitrary JSON (with the keys
the readers look for, so the deep paths run), empty casts and unknown names go
through the tolerant parser and the writer. The parser must return a storyboard
or raise ``UnusableAnswer``; the writer a valid storyboard or ``UpstreamFailed``
(UNAVAILABLE, with the reason). Anything else (an AssertionError, a KeyError)
would reach the caller as INTERNAL.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from llm.story_doubles import CAST, STORY, ScriptedBackend, shot
from storyreel_llm import freeform, reader
from storyreel_llm.storyboard import Storyboard
from storyreel_llm.writer import StoryboardWriter

from storyreel.errors import UpstreamFailed

# Surrogates cannot be encoded in a request or a file: every other code point can be.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=200)
KEYS = st.sampled_from(
    [
        "title",
        "logline",
        "characters",
        "name",
        "appearance",
        "scenes",
        "narration",
        "image_prompt",
        "setting",
        "action",
        "camera",
        "Scene 1",
    ]
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(KEYS | TEXT, inner, max_size=5),
    max_leaves=16,
)
#: Any answer: prose, JSON as text, or JSON with prose around it.
ANSWER = st.one_of(
    TEXT,
    JSON.map(lambda v: json.dumps(v, ensure_ascii=False)),
    st.tuples(TEXT, JSON, TEXT).map(
        lambda t: f"{t[0]}{json.dumps(t[1], ensure_ascii=False)}{t[2]}"
    ),
)
#: A story the writer can split into scenes, in any script: sentences of arbitrary words.
STORY_ANSWER = st.lists(
    st.lists(st.text(st.characters(categories=("L",)), min_size=1, max_size=8), min_size=2).map(
        lambda words: " ".join(words).capitalize() + "."
    ),
    min_size=1,
    max_size=6,
).map(" ".join)

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    database=None,  # nothing written into the work tree
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)


@PROPERTY
@given(text=ANSWER, scene_count=st.none() | st.integers(1, 6))
@example(text='{"a": ñ}', scene_count=None)
@example(text='{"título": «Él», "scenes": [日本語]}', scene_count=2)
@example(text="[" * 5000, scene_count=None)
@example(text='{"scenes": [{"narration": "١٢٣ ٤", "prompt": "-"}]}', scene_count=1)
def test_the_parser_reads_any_answer_or_says_why_not(text, scene_count):
    try:
        board = freeform.parse_storyboard(text, scene_count)
    except reader.UnusableAnswer as exc:
        assert str(exc)
        return
    Storyboard.model_validate(board.model_dump(), context={"scene_count": scene_count})


@PROPERTY
@given(text=ANSWER)
@example(text="{name: José, appearance: ñandú}")
def test_a_step_answer_is_read_or_refused_with_a_reason(text):
    try:
        data = reader.read_object(text)
    except reader.UnusableAnswer as exc:
        assert str(exc)
        return
    assert isinstance(data, dict)


def test_parse_storyboard_on_a_letter_outside_ascii_answers_without_a_traceback():
    result = subprocess.run(
        [sys.executable, "-m", "storyreel.cli", "parse-storyboard"],
        input='{"a": ñ}',
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "Traceback" not in result.stderr
    if result.returncode == 0:
        Storyboard.model_validate(json.loads(result.stdout))  # the last resort: its prose
    else:
        assert result.returncode == 1 and "no usable storyboard" in result.stderr


class _EndlessBackend(ScriptedBackend):
    """Answers from its script, then the last answer again (the writer may ask many times)."""

    def _next(self, call):
        if len(self.answers) == 1:
            self.calls.append(call)
            return self.answers[0]
        return super()._next(call)


def _write(answers, constrains_json, settings_for, scene_count=2):
    backend = _EndlessBackend(answers, constrains_json=constrains_json)
    writer = StoryboardWriter(backend, settings_for(repair_attempts=1))
    try:
        board = writer.write("a story about anything", scene_count, "", seed=7)
    except UpstreamFailed as exc:
        assert exc.message  # a clear refusal, UNAVAILABLE with the reason
        return None
    Storyboard.model_validate(board.model_dump(), context={"scene_count": scene_count})
    return board


@PROPERTY
@given(
    story=STORY_ANSWER | TEXT, answers=st.lists(ANSWER, min_size=1, max_size=6), free=st.booleans()
)
@example(
    story=STORY,
    answers=[json.dumps(dict(CAST, characters=[])), json.dumps(shot(["Zed"]))],
    free=False,
)
def test_the_writer_turns_any_answers_into_a_storyboard_or_a_clear_refusal(
    settings_for, story, answers, free
):
    _write([story, *answers], constrains_json=not free, settings_for=settings_for)


@PROPERTY
@given(cast=JSON, shots=st.lists(JSON, min_size=1, max_size=3))
def test_the_writer_takes_any_json_as_cast_and_shots(settings_for, cast, shots):
    answers = [STORY, *(json.dumps(v, ensure_ascii=False) for v in (cast, *shots))]
    _write(answers, constrains_json=True, settings_for=settings_for)


def test_an_empty_cast_with_a_shot_that_names_someone_is_no_crash(settings_for):
    """The cast answer never validates (no characters), so the cast is empty; the shot names Zed."""
    empty = json.dumps(dict(CAST, characters=[]))
    answers = [STORY, empty, empty, json.dumps(shot(["Zed"])), json.dumps(shot(["Ada"]))]
    board = _write(answers, constrains_json=True, settings_for=settings_for)
    assert board is not None and board.characters == ()
    assert all(s.characters == () for s in board.scenes)
    assert board.degraded is True


@pytest.mark.parametrize(
    "story",
    [
        "Él caminó por la playa. «Hola», dijo ella. El mar brillaba.",
        "少年は海へ行った。鯨が歌った。二人は友達になった。",
        '"Come home," whispered Ada. The whale sang back.',
    ],
)
def test_stories_in_any_language_give_a_storyboard(settings_for, story):
    answers = [story, json.dumps(CAST), json.dumps(shot()), json.dumps(shot())]
    board = _write(answers, constrains_json=True, settings_for=settings_for)
    assert board is not None
