"""Edited storyboards follow the rule generated ones follow: prompts assembled from the shot."""

from __future__ import annotations

import pytest

from storyreel.clip_count import clip_tokenizer
from storyreel.image_prompts import PromptTooLong, assemble_image_prompt, reassemble_prompts
from storyreel.storyboard import Character, Scene, Storyboard

MIRA = Character(name="Mira", appearance="a girl with red braids and a yellow raincoat")


def board(appearance: str = MIRA.appearance, **scene) -> Storyboard:
    shot = {"setting": "on a rocky beach", "action": "waves to a whale", "camera": "wide shot"}
    shot |= scene
    first = assemble_image_prompt(
        style="watercolor",
        appearances=[MIRA.appearance],
        action="waves to a whale",
        setting="on a rocky beach",
        camera="wide shot",
    ).text
    return Storyboard(
        title="Mira",
        style="watercolor",
        characters=(Character(name="Mira", appearance=appearance),),
        scenes=(
            Scene(
                index=1, narration="Mira waits.", image_prompt=first, characters=("Mira",), **shot
            ),
            Scene(index=2, narration="The sea is calm.", image_prompt="a calm grey sea"),
        ),
    )


def test_a_changed_shot_or_look_assembles_the_prompt_again_with_the_appearance_whole():
    before = board()
    moved = board(setting="in a fishing harbour")
    after = reassemble_prompts(
        before,
        moved.model_copy(
            update={
                "scenes": (
                    moved.scenes[0].model_copy(
                        update={"image_prompt": before.scenes[0].image_prompt}
                    ),
                    moved.scenes[1],
                )
            }
        ),
    )
    assert "in a fishing harbour" in after.scenes[0].image_prompt
    assert "rocky beach" not in after.scenes[0].image_prompt
    assert after.scenes[1] == before.scenes[1]
    # A new look for the character reaches the prompts it is in, whole.
    look = "a girl with short black hair and a green coat"
    relooked = reassemble_prompts(
        before, board(appearance=look).model_copy(update={"scenes": before.scenes})
    )
    assert look in relooked.scenes[0].image_prompt
    assert MIRA.appearance not in relooked.scenes[0].image_prompt
    assert clip_tokenizer().count(relooked.scenes[0].image_prompt) <= 77


def test_a_prompt_the_editor_wrote_and_an_unchanged_scene_stay_as_they_are():
    before = board()
    written = before.model_copy(
        update={
            "scenes": (
                before.scenes[0].model_copy(
                    update={"image_prompt": "my own prompt", "setting": "in a fishing harbour"}
                ),
                before.scenes[1],
            )
        }
    )
    assert reassemble_prompts(before, written) == written
    assert reassemble_prompts(before, before) == before
    assert reassemble_prompts(None, before) == before


def test_appearances_too_long_for_the_window_are_refused_with_the_scene():
    before = board()
    huge = " ".join(["an enormous embroidered cloak"] * 20)
    after = board(appearance=huge).model_copy(update={"scenes": before.scenes})
    with pytest.raises(PromptTooLong, match=r"scenes\[0\]"):
        reassemble_prompts(before, after)
