"""Nothing of ours in a storyboard: the worked examples, the instructions, the user turn,
the continue and re-ask turns, or talk about the task, in any field.

Against a real llama-cpp-python server, 10 of 18 storyboards held the worked
example (the cast "Tom, an old fisherman" and the dragon Pip, its shot, title and
logline), one was all example and came back ``degraded: false``, and narrations
and loglines echoed the user turn and the re-ask. Each of those answers is
replayed here through a scripted backend.
"""

from __future__ import annotations

import json

import pytest
from llm.story_doubles import CAST, STORY, answers_for, shot, write_board
from storyreel_llm.prompts import EXAMPLE_CAST, EXAMPLE_SHOT

from storyreel.errors import UpstreamFailed

# Words of the worked examples (storyreel_llm.prompts) that no storyboard may keep.
EXAMPLE_WORDS = ("Tom", "Pip", "dragon", "fisherman", "fish soup", "wooden kitchen")


@pytest.fixture
def settings(settings_for):
    return settings_for(repair_attempts=2)


def texts_of(board) -> list[str]:
    return [
        board.title,
        board.logline,
        *(f"{c.name} {c.appearance}" for c in board.characters),
        *(f"{s.narration} {s.image_prompt} {s.setting} {s.action}" for s in board.scenes),
    ]


def assert_no_example(board) -> None:
    for text in texts_of(board):
        for word in EXAMPLE_WORDS:
            assert word not in text, (word, text)


def test_a_cast_copied_from_the_worked_example_is_asked_again(settings):
    answers = [STORY, json.dumps(EXAMPLE_CAST), *answers_for(2)[1:]]
    board, backend = write_board(settings, answers)
    repair = backend.calls[2].messages[-1]["content"]
    assert "from the instructions or the example" in repair
    assert [c.name for c in board.characters] == ["Ada", "Moby"]
    assert board.degraded is False
    assert_no_example(board)


def test_a_shot_copied_from_the_worked_example_is_asked_again(settings):
    answers = [
        STORY,
        json.dumps(CAST),
        json.dumps(EXAMPLE_SHOT),
        json.dumps(shot()),
        *[json.dumps(shot())],
    ]
    board, backend = write_board(settings, answers)
    assert "not from this story" in backend.calls[3].messages[-1]["content"]
    assert board.scenes[0].setting == "on a rocky beach at dawn"
    assert board.degraded is False
    assert_no_example(board)


def test_a_storyboard_that_is_all_worked_example_is_never_passed_as_clean(settings):
    cast = [json.dumps(EXAMPLE_CAST)] * 3
    shots = [json.dumps(EXAMPLE_SHOT)] * 6
    board, _ = write_board(settings, [STORY, *cast, *shots])
    assert board.degraded is True
    assert_no_example(board)
    assert board.characters == ()  # nothing of the example's cast was kept
    assert board.title == "A whale story"  # from the caller's prompt


@pytest.mark.parametrize(
    ("story", "ours"),
    [
        pytest.param(
            'Story idea: "a whale story" Write a short story of 3 sentences. Give the characters '
            "names. Ada kept the lighthouse.",
            ("Story idea", "sentences", "Give the characters names"),
            id="user-turn",
        ),
        pytest.param(
            "You write very short stories for narrated picture books: plain prose in the third "
            "person and past tense.",
            ("picture books",),
            id="instructions",
        ),
        # Seen from Gemma 3 270M (a base model) on llama-cpp-python: our system and user
        # turns, reworded, as the story.
        pytest.param(
            "You write stories for pictures with narration. Give the character names.",
            ("You write stories", "character names"),
            id="paraphrased-instructions",
        ),
    ],
)
def test_a_story_that_repeats_our_text_is_asked_again(settings, story, ours):
    board, backend = write_board(settings, [story, *answers_for(2)])
    assert backend.calls[1].kind == "text"  # asked again
    narration = " ".join(s.narration for s in board.scenes)
    assert [text for text in ours if text in narration] == []
    assert board.degraded is False


@pytest.mark.parametrize(
    "logline",
    [
        "The user wants a story about a keeper and a whale.",
        "Write a short story of 3 sentences about a whale.",
        "That answer could not be used, so the keeper sang.",
        "Here is the story of a keeper who saves a whale.",
    ],
)
def test_a_logline_that_talks_about_the_task_is_asked_again(settings, logline):
    answers = [STORY, json.dumps(dict(CAST, logline=logline)), *answers_for(2)[1:]]
    board, backend = write_board(settings, answers)
    assert backend.calls[2].kind == "json" and len(backend.calls) == 5
    assert board.logline == CAST["logline"]


def test_an_answer_that_echoes_the_re_ask_is_asked_again(settings):
    bad = json.dumps(dict(CAST, logline="I wrote it."))
    echo = json.dumps(
        dict(CAST, logline="Answer again with these problems fixed and a whale swims.")
    )
    board, backend = write_board(settings, [STORY, bad, echo, *answers_for(2)[1:]])
    assert len([c for c in backend.calls if c.kind == "json"]) == 5
    assert board.logline == CAST["logline"]


def test_after_the_last_attempt_the_clean_sentences_are_salvaged_and_degraded(settings):
    echo = "Story idea: a whale. " + STORY
    board, backend = write_board(settings, [echo, echo, echo, *answers_for(2)[1:]])
    assert [c.kind for c in backend.calls[:3]] == ["text"] * 3
    assert board.degraded is True
    assert all("Story idea" not in s.narration for s in board.scenes)
    assert "Ada kept the lighthouse" in board.scenes[0].narration


def test_a_story_that_is_nothing_but_our_text_is_refused(settings):
    echo = 'Story idea: "a whale story". Write a short story of 3 sentences.'
    with pytest.raises(UpstreamFailed, match=r"repeats .Story idea. from the instructions"):
        write_board(settings, [echo, echo, echo])


def test_a_callers_idea_may_share_words_with_the_worked_example(settings):
    """Text the story has is the story's, even where the worked example has it too."""
    story = (
        "Old Tom the fisherman found a tiny dragon named Pip in his net. "
        "Tom fed Pip fish soup in his small wooden kitchen by the fire."
    )
    cast = {
        "title": "Tom and the Tiny Dragon",
        "logline": "Old Tom the fisherman finds a tiny dragon named Pip in his net.",
        "characters": [
            {"name": "Tom", "appearance": "an old fisherman with a net"},
            {"name": "Pip", "appearance": "a tiny dragon"},
        ],
    }
    kitchen = dict(
        EXAMPLE_SHOT,
        setting="in his small wooden kitchen by the fire",
        action="Tom fed Pip fish soup",
    )
    answers = [story, json.dumps(cast), json.dumps(kitchen), json.dumps(kitchen)]
    board, backend = write_board(settings, answers, prompt="an old fisherman finds a tiny dragon")
    assert len(backend.calls) == 4  # nothing re-asked
    assert [c.name for c in board.characters] == ["Tom", "Pip"]
    assert board.degraded is False


def test_a_title_that_paraphrases_the_instructions_is_not_kept(settings):
    title = json.dumps(dict(CAST, title="Story for a picture with narration"))
    board, _ = write_board(
        settings, [STORY, title, *answers_for(2)[1:]], prompt="a keeper and a whale"
    )
    assert board.title == CAST["title"]


def test_borrowed_finds_our_text_but_not_the_storys():
    from storyreel_llm.prompts import borrowed

    assert borrowed("Tom feeds fish soup to the little dragon", "a whale story")
    assert borrowed("Pip", "a whale story") == "Pip"
    assert borrowed("a tiny green dragon", "a fox story")
    assert borrowed("Give the characters names.", "a fox")
    assert borrowed("The user wants a fox story.", "a fox")
    assert borrowed("Scene 2 of 3: the fox ran.", "a fox")
    assert borrowed("Continue the story with 2 more sentences.", "a fox")
    assert borrowed("You write stories for pictures with narration.", "two chefs")
    assert borrowed("Use the following characters to tell a story.", "a snail race")
    # The story's own words, and everyday phrases, are not ours.
    assert borrowed("Ada rows a small boat toward the whale", "Ada rowed to the whale") is None
    assert borrowed("in a cave by the fire", "a campfire in a cave") is None
    assert borrowed("Mila", "Mila the fox") is None
    assert borrowed("an old fisherman with a grey cap", "Old Sam the fisherman") is None
    assert borrowed("Grandpa would tell a story about the old days.", "a grandpa") is None
