"""The storyboard: the domain result, and the draft a model is asked to write.

:class:`Storyboard` is what the service returns. :func:`draft_model` builds the
shape a model writes (no indexes, no style: the writer adds those) for an exact
scene count and set of length caps; the same pydantic class gives the JSON
schema that constrains decoding and validates the answer, so the two cannot
drift apart.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model, model_validator

#: Generated text is one line: no control characters and no backslash escapes.
#: Without this a small model under a grammar drifts into "\u001d" and "\n\n".
ONE_LINE_PATTERN = r"^[^\x00-\x1f\x7f\\]*$"


def _text(max_chars: int | None = None, pattern: str | None = None) -> Any:
    """A non-blank string of at most ``max_chars`` characters (surrounding space dropped)."""
    return Annotated[
        str,
        StringConstraints(
            strip_whitespace=True, min_length=1, max_length=max_chars, pattern=pattern
        ),
    ]


class Character(BaseModel):
    """A character with a fixed look, repeated in the image prompts it appears in."""

    model_config = ConfigDict(frozen=True)

    name: _text()
    appearance: _text()


class Scene(BaseModel):
    """One scene: what the narrator says and what the picture shows."""

    model_config = ConfigDict(frozen=True)

    index: int = Field(ge=1)  # 1-based position in the video
    narration: _text()
    image_prompt: _text()
    characters: tuple[str, ...] = ()


class Storyboard(BaseModel):
    """A title, characters, and scenes numbered 1..N that name only known characters."""

    model_config = ConfigDict(frozen=True)

    title: _text()
    characters: tuple[Character, ...] = Field(min_length=1)
    scenes: tuple[Scene, ...] = Field(min_length=1)
    style: str
    # True when the answer was rebuilt by a deterministic fallback (see story.proto).
    degraded: bool = False

    @model_validator(mode="after")
    def _consistent(self) -> Storyboard:
        names = [c.name for c in self.characters]
        if len(set(names)) != len(names):
            raise ValueError(f"character names must be unique, got {names}")
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
    """Length caps of generated text (characters) and the most characters a story may have."""

    title: int
    name: int
    appearance: int
    narration: int
    image_prompt: int
    characters: int


class StoryDraft(BaseModel):
    """Base of the per-request draft classes built by :func:`draft_model`."""

    # Forbidding extra keys also puts additionalProperties=false in the schema,
    # so constrained decoding cannot wander into keys nobody reads.
    model_config = ConfigDict(extra="forbid")

    title: str
    characters: list[Any]
    scenes: list[Any]

    @model_validator(mode="after")
    def _names_known(self) -> StoryDraft:
        # Small models vary case ("the fox" vs "The Fox"): compare case-folded,
        # and let the writer map each mention to the declared spelling.
        names = [c.name.casefold() for c in self.characters]
        if len(set(names)) != len(names):
            raise ValueError(
                "each character must have a different name, got "
                + ", ".join(c.name for c in self.characters)
            )
        for number, scene in enumerate(self.scenes, start=1):
            unknown = [n for n in scene.characters if n.casefold() not in names]
            if unknown:
                raise ValueError(
                    f"scene {number} names {unknown}, which are not in characters "
                    f"({', '.join(c.name for c in self.characters)})"
                )
        return self


@functools.lru_cache(maxsize=64)
def draft_model(scene_count: int, caps: TextCaps) -> type[StoryDraft]:
    """The draft class for exactly ``scene_count`` scenes within ``caps`` (cached)."""
    forbid = ConfigDict(extra="forbid")
    character = create_model(
        "DraftCharacter",
        __config__=forbid,
        name=(_text(caps.name, ONE_LINE_PATTERN), ...),
        appearance=(_text(caps.appearance, ONE_LINE_PATTERN), ...),
    )
    scene = create_model(
        "DraftScene",
        __config__=forbid,
        narration=(_text(caps.narration, ONE_LINE_PATTERN), ...),
        image_prompt=(_text(caps.image_prompt, ONE_LINE_PATTERN), ...),
        characters=(
            Annotated[list[_text(caps.name, ONE_LINE_PATTERN)], Field(max_length=caps.characters)],
            ...,
        ),
    )
    return create_model(
        f"StoryDraft{scene_count}",
        __base__=StoryDraft,
        title=(_text(caps.title, ONE_LINE_PATTERN), ...),
        characters=(
            Annotated[list[character], Field(min_length=1, max_length=caps.characters)],
            ...,
        ),
        scenes=(
            Annotated[list[scene], Field(min_length=scene_count, max_length=scene_count)],
            ...,
        ),
    )


@functools.lru_cache(maxsize=64)
def _draft_schema(scene_count: int, caps: TextCaps) -> dict[str, Any]:
    return _inline_refs(draft_model(scene_count, caps).model_json_schema())


def draft_schema(scene_count: int, caps: TextCaps) -> dict[str, Any]:
    """JSON schema of the draft, with ``$ref``s inlined so every grammar engine takes it.

    Returns a fresh copy: callers (backends) may add engine-specific keys.
    """
    return copy.deepcopy(_draft_schema(scene_count, caps))


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
