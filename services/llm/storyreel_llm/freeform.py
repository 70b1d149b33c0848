"""The free-form storyboard reader: a whole storyboard out of any answer a model wrote.

:func:`parse_storyboard` reads a storyboard from a model's raw answer, whatever
its shape: JSON in any layout of keys (``scenes``, ``shots``, ``panels``...;
``image_prompt``, ``visual``...), the labels, lists and delimited prompts that
:mod:`storyreel_llm.reader` reads, or, as a last resort, plain prose split into
sentences (the storyboard then says ``degraded``). When nothing usable is found,
:class:`~storyreel_llm.reader.UnusableAnswer` says why.

The LLM service does not use it (its writer asks for one step at a time, see
:mod:`storyreel_llm.reader`); ``storyreel parse-storyboard`` exposes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from pydantic import ValidationError

from storyreel.limits import MAX_SCENES
from storyreel_llm.reader import (
    RawBoard,
    RawScene,
    UnusableAnswer,
    block_scene,
    board_from_text,
    character_from_text,
    clean,
    field_key,
    loads_lenient,
    mentioned,
    prose,
    split_clauses,
    split_sentences,
    title_of,
    trim_chatter,
)
from storyreel_llm.storyboard import Character, Scene, Storyboard

__all__ = ["UNTITLED", "UnusableAnswer", "group_sentences", "parse_storyboard"]


#: Title used when an answer names none.
UNTITLED = "Untitled"


# --- JSON shapes -----------------------------------------------------------------------------


_TITLE_KEYS = ("title", "storytitle", "name", "heading")
_CAST_KEYS = ("characters", "cast", "people", "charactersheet")
_SCENE_KEYS = ("scenes", "shots", "panels", "frames", "storyboard", "pages", "beats", "parts")
_NARRATION_KEYS = (
    "narration",
    "narrator",
    "voiceover",
    "vo",
    "text",
    "caption",
    "story",
    "line",
    "description",
    "summary",
)
_PROMPT_KEYS = (
    "imageprompt",
    "prompt",
    "image",
    "visual",
    "visualprompt",
    "picture",
    "imagedescription",
    "illustration",
    "visualdescription",
    "art",
)
_SCENE_CHARACTER_KEYS = ("characters", "cast", "present", "charactersinscene")
_NAME_KEYS = ("name", "character")
_APPEARANCE_KEYS = ("appearance", "look", "looks", "description", "visual", "visualdescription")
_LOGLINE_KEYS = ("logline", "summary", "premise", "synopsis")


_REFUSAL = re.compile(
    r"^\W*(?:i'?m sorry|i am sorry|sorry,? (?:but )?i|i cannot|i can'?t|i can not|"
    r"i won'?t|as an ai|i'?m unable|i am unable)\b",
    re.IGNORECASE,
)


def _pick(data: dict[str, Any], keys: Sequence[str]) -> Any:
    by_key = {field_key(k): v for k, v in data.items()}
    for key in keys:
        if key in by_key and by_key[key] not in (None, "", [], {}):
            return by_key[key]
    return None


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return clean(value)
    if isinstance(value, list):
        return clean(" ".join(_as_text(v) for v in value))
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return ""


def _character_from(item: Any) -> tuple[str, str] | None:
    if isinstance(item, dict):
        name = _as_text(_pick(item, _NAME_KEYS))
        appearance = _as_text(_pick(item, _APPEARANCE_KEYS))
        return (name, appearance) if name else None
    if isinstance(item, str):
        return character_from_text(item)
    return None


def _scene_from(item: Any) -> RawScene:
    if isinstance(item, dict):
        scene = RawScene(
            narration=_as_text(_pick(item, _NARRATION_KEYS)),
            prompt=_as_text(_pick(item, _PROMPT_KEYS)),
        )
        present = _pick(item, _SCENE_CHARACTER_KEYS)
        if isinstance(present, list):
            scene.characters = [_as_text(p) for p in present if _as_text(p)]
        elif isinstance(present, str):
            scene.characters = [clean(p) for p in re.split(r",|\band\b", present) if clean(p)]
        return scene
    if isinstance(item, str):
        return block_scene(item)
    return RawScene()


def _board_from_data(data: Any) -> RawBoard | None:
    if isinstance(data, list):
        data = {"scenes": data}
    if not isinstance(data, dict):
        return None
    nested = _pick(data, _SCENE_KEYS)
    if isinstance(nested, dict) and _pick(nested, _SCENE_KEYS) is not None:
        inner = _board_from_data(nested)
        if inner is not None and not inner.title:
            inner.title = _as_text(_pick(data, _TITLE_KEYS))
        return inner
    scenes = nested if isinstance(nested, list) else None
    if scenes is None:
        return None
    board = RawBoard(
        title=_as_text(_pick(data, _TITLE_KEYS)),
        logline=_as_text(_pick(data, _LOGLINE_KEYS)),
    )
    cast = _pick(data, _CAST_KEYS)
    if isinstance(cast, dict):
        cast = [{"name": k, "appearance": v} for k, v in cast.items()]
    for item in cast if isinstance(cast, list) else []:
        character = _character_from(item)
        if character:
            board.characters.append(character)
    board.scenes = [_scene_from(item) for item in scenes]
    return board


# --- Storyboards ------------------------------------------------------------------------------


def group_sentences(sentences: Sequence[str], groups: int) -> list[str]:
    """``sentences`` in ``groups`` contiguous runs, as even as possible, earlier runs longer."""
    if groups <= 0 or len(sentences) < groups:
        raise ValueError(f"{len(sentences)} sentences cannot fill {groups} scenes")
    size, extra = divmod(len(sentences), groups)
    out, start = [], 0
    for index in range(groups):
        end = start + size + (1 if index < extra else 0)
        out.append(" ".join(sentences[start:end]))
        start = end
    return out


def parse_storyboard(
    text: str,
    scene_count: int | None = None,
    *,
    max_scenes: int = MAX_SCENES,
    style: str = "",
) -> Storyboard:
    """Read a storyboard out of a model's free-form answer.

    With ``scene_count`` the result has exactly that many scenes; otherwise as many
    as the answer gives (at most ``max_scenes``). Scenes without an image prompt use
    their narration, and scenes rebuilt from plain sentences, as ``degraded``.
    Raises :class:`UnusableAnswer` with the reason when nothing usable is found.
    """
    if not text or not text.strip():
        raise UnusableAnswer("the answer is empty")
    if _REFUSAL.match(text):
        first = split_sentences(text)[:1] or [text.strip()[:80]]
        raise UnusableAnswer(f"the model refused: {first[0][:120]!r}")
    board: RawBoard | None = None
    truncated = False
    try:
        found = loads_lenient(text)
        board = _board_from_data(found.value)
        truncated = found.truncated
    except UnusableAnswer:
        pass
    if board is not None and truncated:
        # The last scene of a cut-off answer is incomplete: keep only whole scenes.
        while board.scenes and not (board.scenes[-1].narration and board.scenes[-1].prompt):
            board.scenes.pop()
    if board is not None:
        board.scenes = [s for s in board.scenes if s.narration or s.prompt]
    if board is None or not board.scenes:
        board = board_from_text(text) or board
    found_count = len(board.scenes) if board else 0
    if board is None or not board.scenes or (scene_count and found_count != scene_count):
        board = _fallback_board(text, board, scene_count, max_scenes, found_count)
    if scene_count is None and len(board.scenes) > max_scenes:
        raise UnusableAnswer(f"the answer has {len(board.scenes)} scenes; at most {max_scenes}")
    return _finish(board, style)


def _fallback_board(
    text: str,
    board: RawBoard | None,
    scene_count: int | None,
    max_scenes: int,
    found_count: int,
) -> RawBoard:
    """The deterministic last resort: the answer's sentences, one run per scene."""
    if board is not None and board.scenes:
        source = " ".join(s.narration or s.prompt for s in board.scenes)
    else:
        source = prose(text)
    sentences = trim_chatter(split_sentences(source))
    wanted = scene_count or min(len(sentences), max_scenes)
    if len(sentences) < wanted:
        sentences = split_clauses(sentences, wanted)
    if not sentences:
        raise UnusableAnswer("the answer holds no storyboard and no sentences to build one from")
    if len(sentences) < wanted:
        found = (
            f"found {found_count} scene(s) where {scene_count} were asked, and "
            if (found_count)
            else ""
        )
        raise UnusableAnswer(
            f"{found}only {len(sentences)} sentence(s) to split into {wanted} scenes"
        )
    fallback = RawBoard(
        title=board.title if board and board.title else title_of(text),
        logline=board.logline if board else "",
        characters=board.characters if board else [],
        degraded=True,
    )
    fallback.scenes = [RawScene(narration=n) for n in group_sentences(sentences, wanted)]
    return fallback


def _finish(board: RawBoard, style: str) -> Storyboard:
    characters: list[Character] = []
    seen: set[str] = set()
    for name, appearance in board.characters:
        if name.casefold() in seen or not name:
            continue
        seen.add(name.casefold())
        characters.append(Character(name=name, appearance=appearance or name))
    by_key = {c.name.casefold(): c.name for c in characters}
    degraded = board.degraded
    scenes = []
    for index, raw in enumerate(board.scenes, start=1):
        narration, prompt = raw.narration, raw.prompt
        if not prompt or not narration:
            degraded = True
        narration = narration or prompt
        prompt = prompt or narration
        if raw.characters is not None:
            present = [by_key[n.casefold()] for n in raw.characters if n.casefold() in by_key]
        else:
            present = mentioned(f"{narration} {prompt}", [c.name for c in characters])
        scenes.append(
            Scene(
                index=index,
                narration=narration,
                image_prompt=prompt,
                characters=tuple(dict.fromkeys(present)),
            )
        )
    try:
        return Storyboard(
            title=board.title or UNTITLED,
            logline=board.logline,
            characters=tuple(characters),
            scenes=tuple(scenes),
            style=style,
            degraded=degraded,
        )
    except ValidationError as exc:  # pragma: no cover - the steps above keep it valid
        raise UnusableAnswer(f"the parsed storyboard is not valid: {exc}") from exc
