"""The storyboard: the domain result, and the two drafts a model is asked to fill in.

:class:`Storyboard` is what the service returns: the shared model
(:mod:`storyreel.storyboard`, which the gateway keeps in its job records) with
the rules a written storyboard keeps, sent with the shared
:func:`storyreel.storyboard.storyboard_to_proto`. Which name belongs to which layer:

====================  ====================  ===================================
contract              service core (here)   shared model, gateway record
====================  ====================  ===================================
types.v1.Storyboard   ``Storyboard``        ``storyreel.storyboard.Storyboard``
types.v1.Character    ``Character``         ``storyreel.storyboard.Character``
types.v1.Scene        ``Scene``             ``storyreel.storyboard.Scene``
====================  ====================  ===================================

Each class here subclasses the shared one of the same name and adds only rules
(non-blank text, unique names, scenes 1..N naming known characters).

A storyboard is written in two steps (see :mod:`storyreel_llm.writer`): a prose
story, from which the model extracts a :func:`cast_model` draft (title, logline,
characters with a fixed look), then one :func:`shot_model` draft per scene (who
is in the picture, where, doing what, which camera). The same pydantic classes
give the JSON schemas that constrain decoding and validate the answers, so the
two cannot drift apart.

The schemas depend only on the length caps, never on the request, so each is
compiled once per process (:func:`cast_schema`, :func:`shot_schema`). What
depends on the request (the cast's names, CLIP token counts) is checked by
validators that read the validation context (:class:`DraftContext`).
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from storyreel import storyboard as shared

#: Camera framings a shot may ask for; the first is the default of a fallback shot.
CAMERAS: tuple[str, ...] = (
    "wide shot",
    "medium shot",
    "close-up",
    "low angle shot",
    "high angle shot",
    "over-the-shoulder shot",
)

# Patterns of generated text. Words are capped at 20 characters and separated by
# single spaces: without that a small model under a grammar runs words together
# ("lionelwantedtosave...") or drifts into quotes, braces and escapes.
#
# Every repetition has an explicit upper bound, derived from the field's length
# cap: some grammar converters (llama.cpp's, llama-cpp-python's) keep a string's
# ``pattern`` and drop its ``maxLength`` when both are given, so the pattern alone
# must stop the model. A word averages about five characters with its space, so
# ``cap // 5`` words end near the cap; ``maxLength`` still holds for the engines
# that honour it, and validation cuts a longer answer at a word boundary.
_WORD = r"[A-Za-z0-9,.!?:;'-]{1,20}"
_LOWER_WORD = r"[a-z0-9,'-]{1,20}"
#: Characters per word (with its space) the word bounds assume.
_CHARS_PER_WORD = 5


def _more_words(cap: int) -> int:
    """How many words may follow the first in a phrase of at most ``cap`` characters."""
    return max(cap // _CHARS_PER_WORD - 1, 1)


def title_pattern(cap: int) -> str:
    """A title: starts with a capital or digit; at most ``cap // 5`` words."""
    return rf"^[A-Z0-9][A-Za-z0-9,.!?:;'-]{{0,19}}( {_WORD}){{0,{_more_words(cap)}}}$"


def logline_pattern(cap: int) -> str:
    """A logline: one sentence starting with a capital; at most ``cap // 5`` words."""
    return rf"^[A-Z][A-Za-z0-9,.!?:;'-]{{0,19}}( {_WORD}){{0,{_more_words(cap)}}}$"


def appearance_pattern(cap: int) -> str:
    """An appearance: a lower-case noun phrase starting with "a" or "an"."""
    return rf"^(a|an)( {_LOWER_WORD}){{1,{_more_words(cap)}}}$"


def setting_pattern(cap: int) -> str:
    """A setting: a lower-case phrase of two words or more ("on a rocky beach at dawn")."""
    return rf"^{_LOWER_WORD}( {_LOWER_WORD}){{1,{_more_words(cap)}}}$"


def action_pattern(cap: int) -> str:
    """An action: a phrase of short words ("Ada rows a boat through the waves")."""
    return rf"^[A-Za-z][a-z'-]{{0,14}}( [A-Za-z0-9,'-]{{1,15}}){{0,{_more_words(cap)}}}$"


#: Patterns at the default caps (title 60, logline 120, appearance 80, setting 60, action 80).
TITLE_PATTERN = title_pattern(60)
LOGLINE_PATTERN = logline_pattern(120)
APPEARANCE_PATTERN = appearance_pattern(80)
SETTING_PATTERN = setting_pattern(60)
ACTION_PATTERN = action_pattern(80)
#: A name: one to three capitalised words ("Ada", "Captain Rook").
NAME_PATTERN = r"^[A-Z][A-Za-z'-]{0,15}( [A-Z][A-Za-z'-]{0,15}){0,2}$"
#: Narration: one line, no control characters or backslashes.
ONE_LINE_PATTERN = r"^[^\x00-\x1f\x7f\\]*$"

#: First- and second-person words: a logline or a look written as "I" or "you" is
#: the model talking about itself, not the story.
_PERSONAL = re.compile(r"\b(i|i'm|me|my|we|us|our|you|your)\b", re.IGNORECASE)


def is_third_person(text: str) -> bool:
    """False when ``text`` speaks as "I", "we" or to "you" (the model about itself)."""
    return not _PERSONAL.search(text)


def _text(max_chars: int | None = None, pattern: str | None = None, min_chars: int = 1) -> Any:
    """A non-blank string of at most ``max_chars`` characters (surrounding space dropped)."""
    return Annotated[
        str,
        StringConstraints(
            strip_whitespace=True, min_length=min_chars, max_length=max_chars, pattern=pattern
        ),
    ]


class Character(shared.Character):
    """The shared :class:`storyreel.storyboard.Character`, with a non-blank name and look."""

    name: _text()
    appearance: _text()


class Scene(shared.Scene):
    """The shared :class:`storyreel.storyboard.Scene`: index 1 or more, non-blank text."""

    index: int = Field(ge=1)  # 1-based position in the video
    narration: _text()
    image_prompt: _text()


class Storyboard(shared.Storyboard):
    """The shared :class:`storyreel.storyboard.Storyboard` with the rules of a written one.

    A title, characters with unique names, and scenes numbered 1..N that name
    only known characters. Validate with ``context={"scene_count": N}`` to
    require exactly N scenes.
    """

    title: _text()
    characters: tuple[Character, ...] = ()
    scenes: tuple[Scene, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Storyboard:
        names = [c.name for c in self.characters]
        if len({n.casefold() for n in names}) != len(names):
            raise ValueError(f"character names must be unique, got {names}")
        wanted = (info.context or {}).get("scene_count")
        if wanted is not None and len(self.scenes) != wanted:
            raise ValueError(f"exactly {wanted} scenes are needed, got {len(self.scenes)}")
        indexes = [s.index for s in self.scenes]
        if indexes != list(range(1, len(self.scenes) + 1)):
            raise ValueError(f"scene indexes must be 1..{len(self.scenes)} in order, got {indexes}")
        for scene in self.scenes:
            unknown = [n for n in scene.characters if n not in names]
            if unknown:
                raise ValueError(f"scene {scene.index} names unknown characters {unknown}")
        return self


@dataclass(frozen=True)
class TextCaps:
    """Length caps of generated text (characters) and of the cast."""

    title: int
    logline: int
    name: int
    appearance: int
    narration: int
    setting: int
    action: int
    characters: int
    characters_per_scene: int


@dataclass
class DraftContext:
    """What validating a draft needs beyond its schema.

    ``names`` is the cast a shot may refer to (``cast_known`` False: no cast has
    been checked, so any name goes); ``clip_tokens`` counts CLIP tokens and
    ``max_appearance_tokens`` bounds an appearance; ``forbidden`` lists texts no
    answer may repeat (the instructions the model was given); ``borrowed`` returns
    the piece of a text that was taken from our prompts rather than the story
    (see :func:`storyreel_llm.prompts.borrowed`), or None.
    """

    names: tuple[str, ...] = ()
    clip_tokens: Callable[[str], int] | None = None
    max_appearance_tokens: int | None = None
    forbidden: tuple[str, ...] = field(default_factory=tuple)
    borrowed: Callable[[str], str | None] | None = None
    cast_known: bool = False


def _context(info: ValidationInfo) -> DraftContext:
    context = info.context
    if isinstance(context, DraftContext):
        return context
    return DraftContext()


class CastDraftBase(BaseModel):
    """Base of the cast draft: title, logline and characters, read from the story."""

    # Forbidding extra keys also puts additionalProperties=false in the schema,
    # so constrained decoding cannot wander into keys nobody reads.
    model_config = ConfigDict(extra="forbid")

    title: str
    logline: str
    characters: list[Any]

    @field_validator("logline")
    @classmethod
    def _third_person(cls, value: str) -> str:
        if not is_third_person(value):
            raise ValueError("must be about the story, in the third person (no I, we or you)")
        return value

    @model_validator(mode="after")
    def _cast_checks(self, info: ValidationInfo) -> CastDraftBase:
        context = _context(info)
        names = [c.name.casefold() for c in self.characters]
        if len(set(names)) != len(names):
            raise ValueError(
                "each character must have a different name, got "
                + ", ".join(c.name for c in self.characters)
            )
        problems = []
        for character in self.characters:
            problems += appearance_problems(character.name, character.appearance, context)
        problems += _leaks(
            context,
            [
                ("title", self.title),
                ("logline", self.logline),
                *((f"name {c.name}", c.name) for c in self.characters),
                *((f"appearance of {c.name}", c.appearance) for c in self.characters),
            ],
        )
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ShotDraftBase(BaseModel):
    """Base of a shot draft: who is in one scene's picture, where, doing what, how framed."""

    model_config = ConfigDict(extra="forbid")

    characters: list[str]
    setting: str
    action: str
    camera: str

    @model_validator(mode="after")
    def _shot_checks(self, info: ValidationInfo) -> ShotDraftBase:
        context = _context(info)
        problems = []
        if context.names or context.cast_known:
            known = {n.casefold() for n in context.names}
            unknown = [n for n in self.characters if n.casefold() not in known]
            if unknown and not context.names:
                problems.append(
                    f"characters {unknown} are not in the cast; the cast is empty, "
                    "so leave characters empty"
                )
            elif unknown:
                problems.append(
                    f"characters {unknown} are not in the cast; use only "
                    + ", ".join(context.names)
                )
        problems += _leaks(context, [("setting", self.setting), ("action", self.action)])
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _leaks(context: DraftContext, texts: list[tuple[str, str]]) -> list[str]:
    """Problems of ``(field, text)`` pairs that repeat our instructions or examples."""
    from storyreel_llm.prompts import repeats_instructions

    if context.forbidden and any(
        repeats_instructions(text, context.forbidden) for _, text in texts
    ):
        return ["the answer repeats the instructions instead of describing the story"]
    problems = []
    if context.borrowed is not None:
        for where, text in texts:
            piece = context.borrowed(text)
            if piece:
                problems.append(
                    f"the {where} copies {piece!r} from the instructions or the example, "
                    "not from this story; describe this story only"
                )
    return problems


@functools.lru_cache(maxsize=16)
def character_model(caps: TextCaps) -> type[BaseModel]:
    """One character of the cast draft: a name and an appearance within ``caps``."""
    return create_model(
        "CastCharacter",
        __config__=ConfigDict(extra="forbid"),
        name=(_text(caps.name, NAME_PATTERN), Field(examples=["Ada"])),
        appearance=(
            _text(caps.appearance, appearance_pattern(caps.appearance), min_chars=8),
            Field(examples=["a young woman with red hair and a yellow raincoat"]),
        ),
    )


def appearance_problems(name: str, appearance: str, context: DraftContext) -> list[str]:
    """What is wrong with an appearance beyond its schema: its length in CLIP tokens."""
    problems = []
    if context.clip_tokens is not None and context.max_appearance_tokens:
        tokens = context.clip_tokens(appearance)
        if tokens > context.max_appearance_tokens:
            problems.append(
                f"the appearance of {name} is {tokens} CLIP tokens long; "
                f"make it at most {context.max_appearance_tokens}"
            )
    return problems


@functools.lru_cache(maxsize=16)
def cast_model(caps: TextCaps) -> type[CastDraftBase]:
    """The cast draft class for ``caps`` (cached: one class, one schema per process)."""
    character = character_model(caps)
    return create_model(
        "CastDraft",
        __base__=CastDraftBase,
        title=(
            _text(caps.title, title_pattern(caps.title)),
            Field(examples=["The Keeper and the Whale"]),
        ),
        logline=(
            _text(caps.logline, logline_pattern(caps.logline), min_chars=12),
            Field(examples=["A lighthouse keeper helps a lost whale find its way home."]),
        ),
        characters=(
            Annotated[list[character], Field(min_length=1, max_length=caps.characters)],
            ...,
        ),
    )


@functools.lru_cache(maxsize=16)
def shot_model(caps: TextCaps) -> type[ShotDraftBase]:
    """The shot draft class for ``caps`` (cached: one class, one schema per process)."""
    return create_model(
        "ShotDraft",
        __base__=ShotDraftBase,
        characters=(
            Annotated[
                list[_text(caps.name, NAME_PATTERN)],
                Field(max_length=caps.characters_per_scene, examples=[["Ada"]]),
            ],
            ...,
        ),
        setting=(
            _text(caps.setting, setting_pattern(caps.setting), min_chars=4),
            Field(examples=["on a rocky beach at dawn"]),
        ),
        action=(
            _text(caps.action, action_pattern(caps.action), min_chars=6),
            Field(examples=["Ada rows a small boat through the waves"]),
        ),
        camera=(Literal[CAMERAS], Field(examples=[CAMERAS[0]])),  # type: ignore[valid-type]
    )


@functools.lru_cache(maxsize=16)
def _cast_schema(caps: TextCaps) -> dict[str, Any]:
    return _inline_refs(cast_model(caps).model_json_schema())


@functools.lru_cache(maxsize=16)
def _shot_schema(caps: TextCaps) -> dict[str, Any]:
    return _inline_refs(shot_model(caps).model_json_schema())


def cast_schema(caps: TextCaps) -> dict[str, Any]:
    """JSON schema of the cast draft, ``$ref``s inlined so every grammar engine takes it.

    Returns a fresh copy: callers (backends) may add engine-specific keys.
    """
    return copy.deepcopy(_cast_schema(caps))


def shot_schema(caps: TextCaps) -> dict[str, Any]:
    """JSON schema of one shot draft (a fresh copy, ``$ref``s inlined)."""
    return copy.deepcopy(_shot_schema(caps))


def _inline_refs(schema: dict[str, Any]) -> dict[str, Any]:
    defs = schema.get("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            if "$ref" in node:
                name = node["$ref"].rsplit("/", 1)[-1]
                return resolve(defs[name])
            return {k: resolve(v) for k, v in node.items() if k != "$defs"}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    return resolve(schema)
