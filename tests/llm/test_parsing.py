"""The tolerant parser: a corpus of raw LLM answers, each with its expected extraction.

Each ``corpus/NN-name.txt`` is an answer as a model might write it (JSON in many
shapes, labels, lists, delimiters, plain prose, cut-off or wrong ones) and
``NN-name.json`` says what must come out: the storyboard (title, characters,
scenes with narration and image prompt, degraded), or the reason it is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from storyreel_llm.freeform import group_sentences, parse_storyboard
from storyreel_llm.reader import (
    UnusableAnswer,
    labeled_fields,
    loads_lenient,
    mentioned,
    read_object,
    split_clauses,
    split_sentences,
    structured_scenes,
)

CORPUS = Path(__file__).parent / "corpus"
CASES = sorted(CORPUS.glob("*.txt"))
ACCEPTED = [
    case
    for case in CASES
    if "error" not in json.loads(case.with_suffix(".json").read_text(encoding="utf-8"))
]


def test_the_corpus_has_at_least_forty_answers_of_every_kind():
    assert len(CASES) >= 40
    kinds = {case.stem.split("-", 2)[1] for case in CASES}
    assert {"json", "labels", "list", "delimiters", "mixed", "reject"} <= kinds


def extraction(raw: str, scene_count: int | None) -> dict:
    board = parse_storyboard(raw, scene_count).to_dict()
    return {
        "title": board["title"],
        "characters": [
            {"name": c["name"], "appearance": c["appearance"]} for c in board["characters"]
        ],
        "scenes": [
            {key: s[key] for key in ("index", "narration", "image_prompt")} for s in board["scenes"]
        ],
        "degraded": board["degraded"],
    }


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_corpus_answer_is_parsed_as_expected_or_refused_for_the_right_reason(case: Path):
    raw = case.read_text(encoding="utf-8")
    spec = json.loads(case.with_suffix(".json").read_text(encoding="utf-8"))
    if "error" in spec:
        with pytest.raises(UnusableAnswer) as caught:
            parse_storyboard(raw, spec["scene_count"])
        assert spec["error"] in str(caught.value)
    else:
        assert extraction(raw, spec["scene_count"]) == spec["storyboard"]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.stem for c in ACCEPTED])
def test_every_parsed_storyboard_has_scenes_numbered_from_one_with_known_characters(case: Path):
    raw = case.read_text(encoding="utf-8")
    spec = json.loads(case.with_suffix(".json").read_text(encoding="utf-8"))
    board = parse_storyboard(raw, spec["scene_count"])
    assert [s.index for s in board.scenes] == list(range(1, len(board.scenes) + 1))
    if spec["scene_count"]:
        assert len(board.scenes) == spec["scene_count"]
    names = {c.name for c in board.characters}
    for scene in board.scenes:
        assert scene.narration and scene.image_prompt
        assert set(scene.characters) <= names


def test_scene_characters_are_the_cast_members_each_scene_mentions():
    raw = json.dumps(
        {
            "title": "T",
            "characters": [
                {"name": "Ada", "appearance": "a keeper"},
                {"name": "Moby", "appearance": "a whale"},
            ],
            "scenes": [
                {"narration": "Ada rowed out.", "image_prompt": "a keeper rowing"},
                {"narration": "The sea was calm.", "image_prompt": "Moby swimming"},
                {"narration": "ada and MOBY met.", "image_prompt": "two friends"},
            ],
        }
    )
    board = parse_storyboard(raw)
    assert [s.characters for s in board.scenes] == [("Ada",), ("Moby",), ("Ada", "Moby")]


def test_explicit_scene_characters_keep_known_names_only():
    raw = json.dumps(
        {
            "title": "T",
            "characters": [{"name": "Ada", "appearance": "a keeper"}],
            "scenes": [
                {"narration": "n", "image_prompt": "p", "characters": ["ADA", "Nobody"]},
            ],
        }
    )
    assert parse_storyboard(raw).scenes[0].characters == ("Ada",)


def test_loads_lenient_reports_a_cut_off_value():
    found = loads_lenient('{"title": "The Fox", "scenes": [{"narration": "Rin r')
    assert found.truncated
    assert found.value == {"title": "The Fox", "scenes": [{}]}


def test_loads_lenient_ignores_brackets_in_prose():
    with pytest.raises(UnusableAnswer, match="no JSON object"):
        loads_lenient("See [PROMPT] and {this} here.")


def test_read_object_takes_labels_when_there_is_no_json():
    text = "Characters: Ada\nSetting: on a beach\nAction: Ada waves\nCamera: close-up"
    assert read_object(text) == {
        "characters": "Ada",
        "setting": "on a beach",
        "action": "Ada waves",
        "camera": "close-up",
    }


def test_read_object_reads_a_characters_section_as_a_list():
    text = "Title: The Fox\nLogline: A fox runs.\nCharacters:\n- Rin: a red fox\n- Luna: an owl"
    data = read_object(text)
    assert data["title"] == "The Fox"
    assert data["characters"] == [
        {"name": "Rin", "appearance": "a red fox"},
        {"name": "Luna", "appearance": "an owl"},
    ]


def test_read_object_refuses_cut_off_json():
    with pytest.raises(UnusableAnswer, match="cut off"):
        read_object('{"setting": "on a beach", "action": "Ada wa')


def test_labeled_fields_split_on_slashes_and_pipes():
    assert labeled_fields("Scene: one / Image prompt: two | Camera: wide shot") == {
        "scene": "one",
        "imageprompt": "two",
        "camera": "wide shot",
    }


def test_split_sentences_keeps_abbreviations_and_quotes_together():
    text = 'Dr. Owl said "Hello!" Then Mr. Fox left. It rained…  The end?'
    assert split_sentences(text) == [
        'Dr. Owl said "Hello!"',
        "Then Mr. Fox left.",
        "It rained…",
        "The end?",
    ]


def test_split_clauses_splits_the_longest_sentence_first_at_a_clause_break():
    pieces = split_clauses(
        ["Ada rowed out to the bay, and the whale sang back to her.", "It ended."], 3
    )
    assert pieces == ["Ada rowed out to the bay.", "The whale sang back to her.", "It ended."]


def test_group_sentences_gives_earlier_scenes_the_extra_sentences():
    assert group_sentences(["a.", "b.", "c.", "d.", "e."], 3) == ["a. b.", "c. d.", "e."]
    with pytest.raises(ValueError):
        group_sentences(["a."], 2)


def test_structured_scenes_reads_numbered_parts_of_a_story():
    assert structured_scenes("1. Ada sailed.\n2. Moby sang.") == ["Ada sailed.", "Moby sang."]
    assert structured_scenes("Ada sailed. Moby sang.") is None


def test_mentioned_matches_whole_names_in_any_case():
    assert mentioned("ADA met the whale; Adam waved.", ["Ada", "Adam", "Moby"]) == ["Ada", "Adam"]
    assert mentioned("Adaline left.", ["Ada"]) == []
