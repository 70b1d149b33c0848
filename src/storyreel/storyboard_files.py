"""Storyboards in files: what ``storyreel storyboard -o`` writes and ``generate --storyboard``
reads, as JSON (``.json``) or YAML (any other name).

:func:`load_storyboard` reads a file into the shared :class:`~storyreel.storyboard.Storyboard`
and checks it as the gateway will (:func:`~storyreel.storyboard.check_storyboard`), so a
mistake is reported before anything is sent, with the file's line:
``board.yaml:14: scenes[2].narration: must not be empty``. Fields are named by their
place in the file: ``scenes[2]`` is the third item of ``scenes`` (counted from 0).
Unknown keys are refused, so a misspelt field is not silently dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import ConfigDict, ValidationError

from storyreel.clip_count import clip_counter
from storyreel.limits import MAX_SCENES
from storyreel.storyboard import (
    Character,
    Scene,
    Storyboard,
    StoryboardProblem,
    check_storyboard,
)


class StoryboardFileError(ValueError):
    """A storyboard file that cannot be used; the message starts ``FILE:LINE:``."""


class _FileCharacter(Character):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _FileScene(Scene):
    model_config = ConfigDict(frozen=True, extra="forbid")


class _FileStoryboard(Storyboard):
    model_config = ConfigDict(frozen=True, extra="forbid")

    characters: tuple[_FileCharacter, ...] = ()
    scenes: tuple[_FileScene, ...] = ()


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def dump_storyboard(board: Storyboard | dict[str, Any], path: Path) -> None:
    """Write ``board`` to ``path``: JSON for a ``.json`` name, YAML otherwise."""
    data = board.to_dict() if isinstance(board, Storyboard) else board
    if _is_json(path):
        text = json.dumps(data, indent=2, ensure_ascii=False) + "\n"
    else:
        # Long prompts stay on one line each, easy to edit.
        text = yaml.safe_dump(data, sort_keys=False, allow_unicode=True, width=1_000_000)
    path.write_text(text, encoding="utf-8")


def _field_name(loc: tuple[Any, ...]) -> str:
    name = ""
    for part in loc:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def _parse_field(field: str) -> tuple[Any, ...]:
    """``scenes[2].narration`` -> ("scenes", 2, "narration")."""
    loc: list[Any] = []
    for part in field.replace("[", ".[").split("."):
        if not part:
            continue
        loc.append(int(part[1:-1]) if part.startswith("[") else part)
    return tuple(loc)


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """The 1-based line of the node at ``loc`` (or of the deepest one present)."""
    if root is None:
        return 1
    node = root
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            child = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
        elif (
            isinstance(node, yaml.SequenceNode)
            and isinstance(part, int)
            and 0 <= part < len(node.value)
        ):
            child = node.value[part]
        if child is None:
            break
        node = child
    return node.start_mark.line + 1


def _compose(text: str) -> yaml.Node | None:
    try:
        return yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return None  # JSON that YAML cannot read: lines of schema errors are then unknown


def load_storyboard(
    path: Path | str, max_scenes: int = MAX_SCENES, renumber: bool = False
) -> Storyboard:
    """Read and check the storyboard in ``path``; :class:`StoryboardFileError` says
    where and what is wrong (``FILE:LINE: FIELD: PROBLEM``).

    ``renumber`` (an edited storyboard, ``storyreel edit``): scenes count 1..N by
    their position, whatever their ``index`` says, when checked; the storyboard
    returned keeps the indices as written (the gateway reads them as which earlier
    scene each one was)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise StoryboardFileError(f"{path}: cannot be read: {exc}") from None
    if _is_json(path):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StoryboardFileError(f"{path}:{exc.lineno}: not JSON: {exc.msg}") from None
        root = _compose(text)
    else:
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
            data = yaml.safe_load(text)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark else 1
            raise StoryboardFileError(f"{path}:{line}: not YAML: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise StoryboardFileError(f"{path}:1: not YAML: {exc}") from None
    if not isinstance(data, dict):
        raise StoryboardFileError(
            f"{path}:{_line_of(root, ())}: a storyboard is a mapping with title, characters "
            "and scenes"
        )
    try:
        parsed = _FileStoryboard.model_validate(data)
    except ValidationError as exc:
        # A misspelt key explains the missing one it was meant to be: report it first.
        error = sorted(exc.errors(), key=lambda e: e["type"] != "extra_forbidden")[0]
        loc = tuple(error["loc"])
        raise StoryboardFileError(
            f"{path}:{_line_of(root, loc)}: {_field_name(loc) or 'storyboard'}: {error['msg']}"
        ) from None
    board = Storyboard.model_validate(parsed.model_dump())
    checked = board
    if renumber:
        scenes = tuple(
            scene.model_copy(update={"index": position})
            for position, scene in enumerate(board.scenes, start=1)
        )
        checked = board.model_copy(update={"scenes": scenes})
    try:
        check_storyboard(checked, max_scenes, clip_counter())
    except StoryboardProblem as exc:
        line = _line_of(root, _parse_field(exc.field))
        raise StoryboardFileError(f"{path}:{line}: {exc}") from None
    return board
