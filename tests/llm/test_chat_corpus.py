"""The free-form reader on answers written the way chat models write them.

Each ``corpus/chat/<family>-<shape>.txt`` is an answer in the habits of one model family
(Llama-3-Instruct, Mistral-Instruct, Qwen2.5, Gemma-2, Phi-3, GPT-4o, Zephyr: "Sure!
Here's..." openers, bold labels, headings, tables, sign-offs); ``.json`` says what must
come out (title, each scene's narration and image prompt, degraded) or why it is refused.
Every scene comes from the answer's own prompts: none is cut out of prose.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from storyreel_llm.freeform import parse_storyboard
from storyreel_llm.reader import UnusableAnswer

CHAT = Path(__file__).parent / "corpus" / "chat"
CASES = sorted(CHAT.glob("*.txt"))


def spec_of(case: Path) -> dict:
    return json.loads(case.with_suffix(".json").read_text(encoding="utf-8"))


def test_the_chat_corpus_covers_five_families_and_refusals():
    families = {spec_of(case)["family"] for case in CASES}
    assert len(families) >= 5, families
    assert sum("error" in spec_of(case) for case in CASES) >= 3
    assert len(CASES) >= 20


@pytest.mark.parametrize("case", CASES, ids=[c.stem for c in CASES])
def test_chat_answer_is_read_as_expected_or_refused_for_the_right_reason(case: Path):
    raw = case.read_text(encoding="utf-8")
    spec = spec_of(case)
    if "error" in spec:
        with pytest.raises(UnusableAnswer) as caught:
            parse_storyboard(raw, spec["scene_count"])
        assert spec["error"] in str(caught.value)
        return
    board = parse_storyboard(raw, spec["scene_count"]).to_dict()
    got = {
        "title": board["title"],
        "scenes": [
            {key: s[key] for key in ("index", "narration", "image_prompt")} for s in board["scenes"]
        ],
        "degraded": board["degraded"],
    }
    assert got == spec["storyboard"]


CLASSIC = """Title: The Lost Kite

Script: Mia loved her red kite. One windy day it tore free and flew over the hills.
She followed it through the forest. At last she found it caught in an old oak tree.

Image Prompt 1: a girl flying a red kite on a green hill, bright morning
Image Prompt 2: a red kite flying away over rolling hills, windy sky
Image Prompt 3: a red kite tangled in the branches of an old oak tree

I hope this helps!
"""


def test_the_classic_chat_answer_gives_one_scene_per_image_prompt_with_the_script_split():
    board = parse_storyboard(CLASSIC)
    assert board.title == "The Lost Kite"
    assert not board.degraded
    assert [s.image_prompt for s in board.scenes] == [
        "a girl flying a red kite on a green hill, bright morning",
        "a red kite flying away over rolling hills, windy sky",
        "a red kite tangled in the branches of an old oak tree",
    ]
    assert [s.narration for s in board.scenes] == [
        "Mia loved her red kite. One windy day it tore free and flew over the hills.",
        "She followed it through the forest.",
        "At last she found it caught in an old oak tree.",
    ]
    assert all("hope" not in s.image_prompt + s.narration for s in board.scenes)


def test_chatter_without_a_prompt_is_refused_with_the_reason():
    with pytest.raises(UnusableAnswer, match="holds no image prompt"):
        parse_storyboard(
            "I'm ready to answer your question about the content I've scraped. "
            "What would you like to know?"
        )


def test_per_scene_narration_labels_win_over_the_script():
    raw = (
        "Script: One. Two. Three. Four.\n"
        "Narration 1: Mia ran.\nImage prompt 1: a girl running\n"
        "Narration 2: Mia flew.\nImage prompt 2: a girl flying\n"
    )
    board = parse_storyboard(raw)
    assert [(s.narration, s.image_prompt) for s in board.scenes] == [
        ("Mia ran.", "a girl running"),
        ("Mia flew.", "a girl flying"),
    ]


def test_a_prompt_never_swallows_the_next_label_or_the_sign_off():
    raw = (
        "Scene 1: Mia ran.\nImage prompt: a girl running\nacross a field\n"
        "Scene 2: Mia flew.\nImage prompt: a girl flying\n\nLet me know if you want more!"
    )
    board = parse_storyboard(raw)
    assert [s.image_prompt for s in board.scenes] == [
        "a girl running across a field",
        "a girl flying",
    ]


def test_prompts_without_any_narration_read_as_a_degraded_storyboard():
    board = parse_storyboard("Image Prompt 1: a girl running\nImage Prompt 2: a girl flying")
    assert board.degraded
    assert [s.narration for s in board.scenes] == ["a girl running", "a girl flying"]


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("Narration 1: A.\nNarration 2: B.\nImage prompt 1: a", "scene(s) 2 have no image prompt"),
        (
            "Scene 1: Mia ran.\nImage prompt: a girl\nScene 2: Mia flew.\nScene 3: She landed.",
            "scene(s) 2, 3 have no image prompt",
        ),
        (
            "| Scene | Image prompt |\n|---|---|\n| 1 | a girl |\n\nScene 2: Mia flew.\n"
            "Image prompt: a bird",
            "both a table and labelled scenes",
        ),
        ("Script: Mia ran.\nImage prompt 1: a\nImage prompt 2: b", "too few sentences"),
    ],
    ids=["counts-disagree", "scenes-without-prompts", "table-and-labels", "script-too-short"],
)
def test_an_ambiguous_answer_is_refused_rather_than_guessed(raw: str, reason: str):
    with pytest.raises(UnusableAnswer, match=re.escape(reason)):
        parse_storyboard(raw)
