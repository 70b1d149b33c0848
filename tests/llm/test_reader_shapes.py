"""The service's reader (``storyreel_llm.reader``) on the shapes chat models answer in.

The writer asks one step at a time: a story (prose), a cast, a shot (JSON or labels).
These are the answers as Llama-3, Mistral, Qwen2.5, Gemma-2, Phi-3, GPT-4o and Zephyr
write them, and what the reader must take out of each, or why it refuses.
"""

from __future__ import annotations

import pytest
from storyreel_llm.reader import (
    UnusableAnswer,
    block_scene,
    board_from_text,
    character_from_text,
    ends_a_sentence,
    labeled_fields,
    loads_lenient,
    read_object,
    split_sentences,
    story_sentences,
    structured_scenes,
    trim_chatter,
)

SHOT = {"setting": "a stormy lighthouse", "action": "a fox climbs the stairs", "camera": "wide"}

# --- One step's object ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        # GPT-4o: a fenced block after a sentence.
        'Here is the shot:\n```json\n{"setting": "a stormy lighthouse", '
        '"action": "a fox climbs the stairs", "camera": "wide"}\n```',
        # Llama-3: "Sure! Here's the JSON:" and a sign-off, no fence.
        'Sure! Here\'s the JSON:\n{"setting": "a stormy lighthouse", '
        '"action": "a fox climbs the stairs", "camera": "wide"}\nI hope this helps!',
        # Mistral: trailing commas and single quotes.
        "{'setting': 'a stormy lighthouse', 'action': 'a fox climbs the stairs', "
        "'camera': 'wide',}",
        # Phi-3: unquoted keys and a // comment.
        '{setting: "a stormy lighthouse", // where\n action: "a fox climbs the stairs", '
        'camera: "wide"}',
        # Qwen2.5: curly quotes.
        "{\u201csetting\u201d: \u201ca stormy lighthouse\u201d, \u201caction\u201d: "
        "\u201ca fox climbs the stairs\u201d, \u201ccamera\u201d: \u201cwide\u201d}",
        # Gemma-2: bold labels, one per line.
        "**Setting:** a stormy lighthouse\n**Action:** a fox climbs the stairs\n**Camera:** wide",
        # Zephyr: labels on one line, split by slashes and pipes.
        "Setting: a stormy lighthouse / Action: a fox climbs the stairs | Camera: wide",
        # A list of labels.
        "- Setting: a stormy lighthouse\n- Action: a fox climbs the stairs\n- Camera: wide",
    ],
    ids=[
        "gpt4o-fenced",
        "llama3-chatty",
        "mistral-commas",
        "phi3-bare-keys",
        "qwen-curly",
        "gemma2-bold",
        "zephyr-inline",
        "bullets",
    ],
)
def test_a_shot_is_read_from_every_shape(answer: str):
    data = read_object(answer)
    assert {k: data[k] for k in SHOT} == SHOT


def test_a_json_list_of_one_object_is_that_object():
    assert read_object('[{"camera": "wide"}]') == {"camera": "wide"}


def test_python_literals_are_read():
    assert loads_lenient("{'a': True, 'b': None, 'c': False}").value == {
        "a": True,
        "b": None,
        "c": False,
    }


@pytest.mark.parametrize(
    ("answer", "reason"),
    [
        ("", "the answer is empty"),
        ("   \n", "the answer is empty"),
        ('{"setting": "a stormy lighthouse", "action": "a fox cl', "cut off"),
        ("I'm ready to help. What would you like to know?", "neither JSON nor labelled fields"),
        ("I can't help with that.", "neither JSON nor labelled fields"),
    ],
    ids=["empty", "blank", "cut-off", "chatter", "refusal"],
)
def test_a_step_answer_without_fields_is_refused_with_the_reason(answer: str, reason: str):
    with pytest.raises(UnusableAnswer, match=reason):
        read_object(answer)


def test_a_cast_is_read_from_a_characters_section_in_any_list_style():
    answer = (
        "Title: The Lighthouse Fox\nLogline: A fox saves the ships.\nCharacters:\n"
        "* Rin: a small red fox\n* Old Tom (a keeper in a grey coat)\n"
    )
    data = read_object(answer)
    assert data["title"] == "The Lighthouse Fox"
    assert data["characters"] == [
        {"name": "Rin", "appearance": "a small red fox"},
        {"name": "Old Tom", "appearance": "a keeper in a grey coat"},
    ]


def test_labeled_fields_key_labels_as_lowercase_letters():
    assert labeled_fields("**Image Prompt:** a fox\nVoice-over = hello") == {
        "imageprompt": "a fox",
        "voiceover": "hello",
    }


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Rin: a small red fox", ("Rin", "a small red fox")),
        ("Rin (a small red fox)", ("Rin", "a small red fox")),
        ("Rin, a small red fox", ("Rin", "a small red fox")),
        ("**Rin** - a small red fox", ("Rin", "a small red fox")),
        ("Rin", ("Rin", "")),
    ],
)
def test_character_from_text_reads_every_common_shape(text, expected):
    assert character_from_text(text.replace("**", "")) == expected


# --- A story's sentences ------------------------------------------------------------------------


STORY = ["A small fox lived by a lighthouse.", "One night the lamp went dark.", "She lit it."]


@pytest.mark.parametrize(
    "answer",
    [
        " ".join(STORY),
        "Sure! Here's a short story for you:\n\n" + " ".join(STORY) + "\n\nI hope you enjoy it!",
        "## The Lighthouse Fox\n\n" + " ".join(STORY) + "\n\nLet me know if you want changes.",
        "Title: The Lighthouse Fox\n" + "\n".join(STORY),
        "1. " + STORY[0] + "\n2. " + STORY[1] + "\n3. " + STORY[2],
        "- " + STORY[0] + "\n- " + STORY[1] + "\n- " + STORY[2],
        "Scene 1: " + STORY[0] + "\nScene 2: " + STORY[1] + "\nScene 3: " + STORY[2],
        "**" + STORY[0] + "** " + STORY[1] + " *" + STORY[2] + "*",
    ],
    ids=[
        "plain",
        "llama3-chatty",
        "gemma2-heading",
        "phi3-title",
        "mistral-numbered",
        "qwen-bullets",
        "scene-labels",
        "markdown",
    ],
)
def test_story_sentences_are_the_story_without_chatter_or_markup(answer: str):
    assert story_sentences(answer) == STORY


def test_trim_chatter_keeps_the_story_only():
    assert trim_chatter(["Certainly!", "Here is your story:", *STORY, "Feel free to ask."]) == STORY


def test_split_sentences_handles_cjk_and_accented_starts():
    assert split_sentences("狐が走った。灯台が光った。") == ["狐が走った。", "灯台が光った。"]
    assert split_sentences("Il pleut. Élise court.") == ["Il pleut.", "Élise court."]


def test_ends_a_sentence_tells_a_cut_off_answer():
    assert ends_a_sentence('She said "hi."')
    assert not ends_a_sentence("She climbed the")


# --- Scenes written out in the answer -----------------------------------------------------------


@pytest.mark.parametrize(
    "answer",
    [
        "Scene 1: Rin woke.\nImage prompt: a fox\nScene 2: Rin ran.\nImage prompt: a fox running",
        "**Scene 1:** Rin woke.\n**Scene 2:** Rin ran.",
        "Shot 1 - Rin woke.\nShot 2 - Rin ran.",
        "1. Rin woke.\n2. Rin ran.",
        "1) Rin woke. | Visual: a fox\n2) Rin ran. | Visual: a fox running",
        "- Rin woke. <<a fox>>\n- Rin ran. <<a fox running>>",
        "Rin woke. [PROMPT]a fox[/PROMPT] Rin ran. [PROMPT]a fox running[/PROMPT]",
    ],
    ids=[
        "scene-labels",
        "bold-scenes",
        "shots",
        "numbered",
        "numbered-inline",
        "bullets-angle",
        "prompt-tags",
    ],
)
def test_structured_scenes_are_each_scene_narration(answer: str):
    assert structured_scenes(answer) == ["Rin woke.", "Rin ran."]


def test_structured_scenes_is_none_for_plain_prose():
    assert structured_scenes("Rin woke. Rin ran.") is None


def test_board_from_text_keeps_narration_and_prompt_apart():
    board = board_from_text(
        "Title: Fox\nScene 1: Rin woke.\nImage prompt: a fox\nScene 2: Rin ran.\n"
        "Image prompt: a fox running"
    )
    assert board is not None and board.title == "Fox"
    assert [(s.narration, s.prompt) for s in board.scenes] == [
        ("Rin woke.", "a fox"),
        ("Rin ran.", "a fox running"),
    ]


def test_block_scene_reads_delimited_and_labelled_prompts():
    assert block_scene("Rin woke. <prompt>a fox</prompt>").prompt == "a fox"
    scene = block_scene("Narration: Rin woke. / Visual: a fox")
    assert (scene.narration, scene.prompt) == ("Rin woke.", "a fox")
