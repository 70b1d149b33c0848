"""The storyboard: the story a video tells, one model for every Python part of storyreel.

A :class:`Storyboard` holds a title, :class:`Character` s with a fixed look and
:class:`Scene` s numbered from 1, exactly the fields of the contract's
``storyreel.types.v1.Storyboard``; :func:`storyboard_to_proto` and
:func:`storyboard_from_proto` are the only conversions between the two.

The model is a frozen record: it checks types, not the story's rules. The LLM
service, which writes storyboards, subclasses it with its rules (non-blank text,
scenes 1..N naming only known characters, see ``storyreel_llm.storyboard``);
the gateway keeps what the LLM service sent, as sent (``JobRecord.storyboard``,
stored as JSON: tuples are JSON arrays, so the shape is that of the message).
A change is a copy (:meth:`Storyboard.with_scene`).

Which name belongs to which layer:

====================  ===========================  =====================================
contract              service core                 gateway record
====================  ===========================  =====================================
types.v1.Storyboard   storyreel_llm.storyboard     ``storyreel.storyboard.Storyboard``
                      .Storyboard (a subclass)     (this module's, kept as sent)
types.v1.Character    ... .Character (a subclass)  ``storyreel.storyboard.Character``
types.v1.Scene        ... .Scene (a subclass)      ``storyreel.storyboard.Scene``
====================  ===========================  =====================================

The LLM service core uses the same three names for its validating subclasses;
the gateway's records use these classes themselves. Other scenes are other
concepts, each with one name per layer:

* a scene to draw: ``diffusion.v1.Scene`` (contract), ``storyreel_diffusion.planning.Scene``
  (diffusion core), ``storyreel_gateway.pipeline.SceneToRender`` (gateway's render stage);
* a scene to compose: ``composer.v1.Scene`` (contract), ``storyreel_composer.composer.Scene``
  (composer core); the gateway passes (image URI, narration) pairs;
* a drawn scene: ``diffusion.v1.SceneImage`` and ``gateway.v1.SceneImage`` (contracts),
  ``storyreel_diffusion.renderer.SceneImage`` (diffusion core),
  ``storyreel_gateway.jobs.SceneImage`` (gateway record); one field list for all four,
  :data:`SCENE_IMAGE_FIELDS`, copied between them by :func:`scene_image_fields`.

A character as a render request carries it (with a seed for its portraits) is
``diffusion.v1.Character`` in the contract and ``storyreel_diffusion.planning.CastMember``
in the diffusion core.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from pydantic import BaseModel, ConfigDict, SerializerFunctionWrapHandler, model_serializer

from storyreel import clip_vocab
from storyreel.limits import (
    MAX_APPEARANCE_CHARS,
    MAX_NAME_CHARS,
    MAX_NARRATION_CHARS,
    MAX_SCENES,
    MAX_TITLE_CHARS,
    MIN_SCENES,
)
from storyreel.types.v1 import types_pb2


class Character(BaseModel):
    """A character with a fixed look, repeated whole in every image prompt it appears in."""

    model_config = ConfigDict(frozen=True)

    # Short name the scenes refer to the character by.
    name: str
    appearance: str
    # An image of the character uploaded by the job's tenant (UploadImage), or "".
    # REFERENCE_IMAGES conditions its scenes on it instead of a drawn portrait.
    reference_uri: str = ""

    @model_serializer(mode="wrap")
    def _without_empty_reference(self, handler: SerializerFunctionWrapHandler) -> Any:
        """Dumped without ``reference_uri`` when it is empty: stored records and request
        fingerprints keep the shape they had before the field existed."""
        data = handler(self)
        if isinstance(data, dict) and not self.reference_uri:
            data.pop("reference_uri", None)
        return data


class Scene(BaseModel):
    """One scene of the storyboard: what the narrator says and what the picture shows."""

    model_config = ConfigDict(frozen=True)

    # 1-based position in the video.
    index: int
    narration: str
    image_prompt: str
    # Names of the characters present (from Storyboard.characters).
    characters: tuple[str, ...] = ()
    # The shot the image prompt was assembled from (empty for a fallback scene, or
    # when the parser read a ready-made prompt).
    setting: str = ""
    action: str = ""
    camera: str = ""


class Storyboard(BaseModel):
    """A title, a logline, the characters and the scenes, in the style they were written in."""

    model_config = ConfigDict(frozen=True)

    title: str
    logline: str = ""
    characters: tuple[Character, ...] = ()
    scenes: tuple[Scene, ...] = ()
    style: str = ""
    # True when part of the storyboard was rebuilt by the deterministic fallback
    # rather than taken from the model's answers (see types.proto).
    degraded: bool = False

    def to_dict(self) -> dict[str, Any]:
        """The storyboard as plain JSON data (what ``storyreel storyboard --json`` prints)."""
        return self.model_dump(mode="json")

    def with_scene(self, scene: Scene) -> Storyboard:
        """A copy whose scene of the same index is ``scene``."""
        return self.model_copy(
            update={"scenes": tuple(scene if s.index == scene.index else s for s in self.scenes)}
        )


def _fields(source: object, names: Iterable[str]) -> dict[str, Any]:
    return {name: getattr(source, name) for name in names}


def _scene_fields(scene: Scene | types_pb2.Scene) -> dict[str, Any]:
    """A scene's fields, the same in the model and the message, as keyword arguments."""
    fields = _fields(scene, Scene.model_fields)
    fields["characters"] = tuple(scene.characters)
    return fields


#: The fields of a drawn scene, the same in every layer that holds one (see above).
SCENE_IMAGE_FIELDS = (
    "index",
    "uri",
    "seed",
    "cached",
    "content_key",
    "safety_flagged",
    "safety_retries",
    "reference_uris",
)


def scene_image_fields(image: Any) -> dict[str, Any]:
    """A drawn scene's :data:`SCENE_IMAGE_FIELDS`, read from any layer's image (core or
    gateway record, diffusion or gateway message), as keyword arguments for another's."""
    fields = _fields(image, SCENE_IMAGE_FIELDS)
    fields["reference_uris"] = list(image.reference_uris)
    return fields


def storyboard_to_proto(board: Storyboard) -> types_pb2.Storyboard:
    """The storyboard as the contract's message (what the LLM service and the API send)."""
    return types_pb2.Storyboard(
        title=board.title,
        logline=board.logline,
        characters=[
            types_pb2.Character(name=c.name, appearance=c.appearance, reference_uri=c.reference_uri)
            for c in board.characters
        ],
        scenes=[types_pb2.Scene(**_scene_fields(s)) for s in board.scenes],
        style=board.style,
        degraded=board.degraded,
    )


def storyboard_from_proto(message: types_pb2.Storyboard) -> Storyboard:
    """The contract's message as the model, every field kept (nothing is checked)."""
    return Storyboard(
        title=message.title,
        logline=message.logline,
        characters=tuple(
            Character(name=c.name, appearance=c.appearance, reference_uri=c.reference_uri)
            for c in message.characters
        ),
        scenes=tuple(Scene(**_scene_fields(s)) for s in message.scenes),
        style=message.style,
        degraded=message.degraded,
    )


class StoryboardProblem(ValueError):
    """A storyboard breaks a rule: ``field`` says where (``scenes[2].image_prompt``)."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _line(field: str, text: str, max_chars: int | None = None) -> None:
    if not text.strip():
        raise StoryboardProblem(field, "must not be empty")
    if "\n" in text or "\r" in text:
        raise StoryboardProblem(field, "must be a single line")
    if max_chars is not None and len(text.strip()) > max_chars:
        raise StoryboardProblem(
            field, f"is {len(text.strip())} characters; the limit is {max_chars}"
        )


def check_storyboard(
    board: Storyboard,
    max_scenes: int = MAX_SCENES,
    count_tokens: Callable[[str], int] | None = None,
) -> None:
    """Raise :class:`StoryboardProblem` unless ``board`` meets the rules generated
    storyboards meet (a user's storyboard, checked by the gateway and the CLI).

    A non-blank title; :data:`~storyreel.limits.MIN_SCENES` to ``max_scenes`` scenes
    indexed 1..N in order; narration and image prompt non-blank single lines, the
    narration within the LLM service's cap; characters unique by name (ignoring case),
    each with a non-blank appearance; scenes naming only those characters; and, with
    ``count_tokens`` (:func:`storyreel.clip_count.clip_counter`), every image prompt
    within CLIP's window. Image prompts are kept as given, never shortened.
    """
    _line("title", board.title, MAX_TITLE_CHARS)
    names: dict[str, str] = {}
    for i, character in enumerate(board.characters):
        where = f"characters[{i}]"
        _line(f"{where}.name", character.name, MAX_NAME_CHARS)
        key = character.name.strip().casefold()
        if key in names:
            raise StoryboardProblem(
                f"{where}.name", f"{character.name!r} is already the name of another character"
            )
        names[key] = character.name
        _line(f"{where}.appearance", character.appearance, MAX_APPEARANCE_CHARS)
    count = len(board.scenes)
    if not MIN_SCENES <= count <= max_scenes:
        raise StoryboardProblem(
            "scenes", f"has {count} scenes; a storyboard has {MIN_SCENES} to {max_scenes}"
        )
    for i, scene in enumerate(board.scenes):
        where = f"scenes[{i}]"
        if scene.index != i + 1:
            raise StoryboardProblem(
                f"{where}.index", f"is {scene.index}; scenes are numbered 1..N in order ({i + 1})"
            )
        _line(f"{where}.narration", scene.narration, MAX_NARRATION_CHARS)
        _line(f"{where}.image_prompt", scene.image_prompt)
        for j, name in enumerate(scene.characters):
            if name.strip().casefold() not in names:
                known = ", ".join(names.values()) or "none"
                raise StoryboardProblem(
                    f"{where}.characters[{j}]",
                    f"{name!r} is not one of the storyboard's characters ({known})",
                )
        if count_tokens is not None:
            tokens = count_tokens(scene.image_prompt)
            if tokens > clip_vocab.MAX_TOKENS:
                raise StoryboardProblem(
                    f"{where}.image_prompt",
                    f"is {tokens} CLIP tokens; the image model reads at most "
                    f"{clip_vocab.MAX_TOKENS} (shorten it)",
                )
