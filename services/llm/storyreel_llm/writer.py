"""The story core: turns a prompt into a :class:`Storyboard` in two steps.

1. **The story.** The model writes a short prose story (free text: small models
   write far better prose than JSON). Its sentences become the scenes'
   narration, split evenly over exactly ``scene_count`` scenes.
2. **The extraction.** Under a JSON schema, the model reads the story once for
   a title, a logline and the cast (each character with a fixed appearance),
   then once per scene for the shot: who is in the picture, the setting, the
   action and the camera.

The image prompt is then assembled in code (:mod:`storyreel_llm.clip`) from the
style, the fixed appearance of each character present, and the shot, and fitted
to CLIP's 77-token window: a character reads the same in every prompt because
the model is never trusted to repeat the description.

Every answer is validated by the pydantic drafts; an unusable one is sent back
with the validation errors (at most ``repair_attempts`` times per step). Answers
from servers that cannot constrain decoding go through the tolerant parser
first. If a step still fails, a deterministic fallback fills it in from the
story's sentences and the storyboard says ``degraded``.

No gRPC here: the servicer converts messages and calls :meth:`StoryboardWriter.write`.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from storyreel.errors import InvalidInput, UpstreamFailed
from storyreel_llm import parsing, prompts
from storyreel_llm.backends.base import Backend, ChatMessage
from storyreel_llm.clip import ClipTokenizer, assemble_image_prompt, clip_tokenizer
from storyreel_llm.settings import LLMSettings
from storyreel_llm.storyboard import (
    LOGLINE_PATTERN,
    TITLE_PATTERN,
    CastDraftBase,
    Character,
    DraftContext,
    Scene,
    ShotDraftBase,
    Storyboard,
    TextCaps,
    appearance_problems,
    cast_model,
    cast_schema,
    character_model,
    is_third_person,
    shot_model,
    shot_schema,
)

log = logging.getLogger(__name__)

#: 64-bit seeds, as the contract's uint64 carries.
_SEED_SPACE = 2**64
#: Seed offsets of the steps, so no two answers of one storyboard share a seed.
_CAST_SEED, _SHOT_SEED = 1_000, 2_000
_PRONOUNS = re.compile(r"\b(he|she|they|him|her|his|hers|them|their|it|its)\b", re.IGNORECASE)
_ARTICLES = re.compile(r"^(the|a|an|little|young|old|mr|mrs|ms|dr)\.?\s+", re.IGNORECASE)


@dataclass(frozen=True)
class StyleChoice:
    """The style a request asked for: its name in the storyboard and the image-prompt prefix."""

    name: str
    prompt_prefix: str


@dataclass(frozen=True)
class Shot:
    """The picture of one scene, as extracted (or rebuilt by the fallback)."""

    characters: tuple[str, ...]
    setting: str
    action: str
    camera: str
    fallback: bool = False


class StoryboardWriter:
    """Writes storyboards with ``backend``, checking and repairing the model's answers."""

    def __init__(
        self,
        backend: Backend,
        settings: LLMSettings,
        tokenizer: ClipTokenizer | None = None,
    ) -> None:
        self._backend = backend
        self._settings = settings
        self._caps = settings.text_caps()
        self._clip = tokenizer

    @property
    def clip(self) -> ClipTokenizer:
        """The CLIP tokenizer the image prompts are counted with (built on first use)."""
        if self._clip is None:
            self._clip = clip_tokenizer()
        return self._clip

    # --- Requests -------------------------------------------------------------------------

    def check_request(self, prompt: str, scene_count: int, style: str) -> None:
        """Raise :class:`InvalidInput` naming the field and its bound if the request is bad."""
        s = self._settings
        if not prompt or not prompt.strip():
            raise InvalidInput("prompt must not be empty")
        if len(prompt) > s.max_prompt_chars:
            raise InvalidInput(
                f"prompt must be at most {s.max_prompt_chars} characters (got {len(prompt)})"
            )
        if not prompts.neutralize(prompt):
            raise InvalidInput("prompt must contain text, not only chat-template markup")
        if not s.min_scenes <= scene_count <= s.max_scenes:
            raise InvalidInput(
                f"scene_count must be between {s.min_scenes} and {s.max_scenes} (got {scene_count})"
            )
        if len(style) > s.max_style_chars:
            raise InvalidInput(
                f"style must be at most {s.max_style_chars} characters (got {len(style)})"
            )

    def resolve_style(self, style: str) -> StyleChoice:
        """A named preset (any case), free text used verbatim, or the default preset if empty."""
        presets = self._settings.style_presets
        wanted = " ".join(style.split())
        if not wanted:
            wanted = self._settings.default_style
        preset = presets.get(wanted.casefold())
        if preset is not None:
            return StyleChoice(wanted.casefold(), preset)
        return StyleChoice(wanted, wanted)

    # --- The storyboard -------------------------------------------------------------------

    def write(self, prompt: str, scene_count: int, style: str = "", seed: int = 0) -> Storyboard:
        """A storyboard for ``prompt`` with exactly ``scene_count`` scenes.

        ``seed`` 0 picks a random seed; any other value makes sampling repeatable.
        Raises :class:`InvalidInput` for a bad request (before any model work) and
        :class:`UpstreamFailed` when the model server fails or writes no usable story.
        """
        self.check_request(prompt, scene_count, style)
        choice = self.resolve_style(style)
        if seed == 0:
            seed = secrets.randbelow(_SEED_SPACE - 1) + 1
        started = time.perf_counter()
        narrations = self.narrations(prompt, scene_count, seed)
        story = " ".join(narrations)
        cast, title, logline, cast_fallback = self._cast(prompt, story, seed)
        scenes: list[Scene] = []
        previous: tuple[Character, ...] = ()
        degraded = cast_fallback
        for index, narration in enumerate(narrations, start=1):
            shot = self._shot(story, cast, narration, index, scene_count, seed)
            degraded |= shot.fallback
            present = self._present(cast, shot, narration, previous)
            previous = present
            fitted = assemble_image_prompt(
                style=choice.prompt_prefix,
                appearances=[c.appearance for c in present],
                action=shot.action,
                setting=shot.setting,
                camera=shot.camera,
                max_tokens=self._settings.clip_max_tokens,
                tokenizer=self.clip,
            )
            scenes.append(
                Scene(
                    index=index,
                    narration=narration,
                    image_prompt=fitted.text,
                    characters=tuple(c.name for c in present),
                    setting=shot.setting,
                    action=shot.action,
                    camera=shot.camera,
                )
            )
        storyboard = Storyboard.model_validate(
            {
                "title": title,
                "logline": logline,
                "characters": cast,
                "scenes": scenes,
                "style": choice.name,
                "degraded": degraded,
            },
            context={"scene_count": scene_count},
        )
        log.info(
            "storyboard written",
            extra={
                "scenes": scene_count,
                "degraded": degraded,
                # Logged so a storyboard can be reproduced from its request.
                "seed": seed,
                "seconds": round(time.perf_counter() - started, 2),
            },
        )
        return storyboard

    # --- Step 1: the story ----------------------------------------------------------------

    def narrations(self, prompt: str, scene_count: int, seed: int) -> list[str]:
        """The prose story, as exactly ``scene_count`` narration lines."""
        s = self._settings
        messages = prompts.story_messages(prompt, scene_count)
        budget = s.story_max_tokens(scene_count)
        text, problem = "", ""
        attempts = 1 + s.repair_attempts
        for attempt in range(attempts):
            answer = self._backend.generate_text(
                messages, budget, (seed + attempt) % _SEED_SPACE
            ).strip()
            if prompts.repeats_instructions(answer):
                # Asked again as before: the next attempt samples with another seed.
                problem = "the story repeats the instructions"
                log.info("story rejected", extra={"attempt": attempt + 1, "problems": problem})
                continue
            text = f"{text} {answer}".strip() if text else answer
            lines = story_scenes(text, scene_count, s.max_narration_chars)
            if lines is not None:
                return lines
            have = len(parsing.story_sentences(text))
            problem = f"the story has {have} sentence(s) for {scene_count} scenes"
            log.info("story too short", extra={"attempt": attempt + 1, "problems": problem})
            messages = [
                *prompts.story_messages(prompt, scene_count),
                *prompts.continue_turns(text, scene_count + 1 - have),
            ]
        raise UpstreamFailed(
            f"the {self._backend.name} model wrote no usable story in {attempts} attempt(s): "
            f"{problem or 'the answer was empty'}"
        )

    # --- Step 2: title, logline, cast -----------------------------------------------------

    def _cast(
        self, prompt: str, story: str, seed: int
    ) -> tuple[tuple[Character, ...], str, str, bool]:
        """(cast, title, logline, fell back) for ``story``."""
        context = DraftContext(
            clip_tokens=self.clip.count,
            max_appearance_tokens=self._settings.max_appearance_clip_tokens,
            forbidden=prompts.INSTRUCTIONS,
        )
        draft, last = self._extract(
            "cast",
            prompts.cast_messages(story, self._caps.characters),
            cast_model(self._caps),
            cast_schema(self._caps),
            self._settings.cast_max_tokens,
            seed + _CAST_SEED,
            context,
            lambda data: tidy_cast(data, self._caps),
        )
        if draft is None:
            # Keep what the last answer got right; fill in the rest from the prompt and story.
            cast, title, logline = salvage_cast(last or {}, self._caps, context)
            if not title:
                title = fallback_title(prompt, self._caps.title)
            first = parsing.split_sentences(story)[:1]
            if not logline and first and len(first[0]) <= self._caps.logline:
                logline = first[0]
            return cast, title, logline, True
        assert isinstance(draft, CastDraftBase)
        cast = tuple(Character(name=c.name, appearance=c.appearance) for c in draft.characters)
        return cast, draft.title, draft.logline, False

    # --- Step 3: one shot per scene -------------------------------------------------------

    def _shot(
        self,
        story: str,
        cast: Sequence[Character],
        narration: str,
        index: int,
        scene_count: int,
        seed: int,
    ) -> Shot:
        names = tuple(c.name for c in cast)
        context = DraftContext(names=names, forbidden=prompts.INSTRUCTIONS)
        draft, _ = self._extract(
            f"shot {index}",
            prompts.shot_messages(story, cast, narration, index, scene_count),
            shot_model(self._caps),
            shot_schema(self._caps),
            self._settings.shot_max_tokens,
            seed + _SHOT_SEED + 16 * index,
            context,
            lambda data: tidy_shot(data, cast, self._caps),
        )
        if draft is None:
            # The fallback picture: the narration itself, with whoever it names.
            return Shot(
                characters=tuple(parsing.mentioned(narration, names)),
                setting="",
                action=narration.rstrip(" ."),
                camera="",
                fallback=True,
            )
        assert isinstance(draft, ShotDraftBase)
        by_key = {n.casefold(): n for n in names}
        return Shot(
            characters=tuple(dict.fromkeys(by_key[n.casefold()] for n in draft.characters)),
            setting=draft.setting,
            action=draft.action,
            camera=draft.camera,
        )

    def _present(
        self,
        cast: Sequence[Character],
        shot: Shot,
        narration: str,
        previous: tuple[Character, ...],
    ) -> tuple[Character, ...]:
        """Who the picture shows: the shot's characters, then those the narration or action name.

        A scene that names nobody but speaks of "she" or "they" keeps the previous
        scene's characters. At most ``max_characters_per_scene``, so every
        appearance fits the CLIP window whole.
        """
        by_name = {c.name: c for c in cast}
        names = list(shot.characters)
        names += parsing.mentioned(f"{narration} {shot.action}", list(by_name))
        present = [by_name[n] for n in dict.fromkeys(names) if n in by_name]
        if not present and previous and _PRONOUNS.search(narration):
            present = list(previous)
        return tuple(present[: self._settings.max_characters_per_scene])

    # --- Asking, validating, re-asking ----------------------------------------------------

    def _extract(
        self,
        step: str,
        messages: list[ChatMessage],
        model: type[BaseModel],
        schema: dict[str, Any],
        max_new_tokens: int,
        seed: int,
        context: DraftContext,
        tidy: Any,
    ) -> tuple[BaseModel | None, dict[str, Any] | None]:
        """Ask for ``schema`` until an answer validates.

        Returns (the draft, None), or (None, the last answer read as an object, if any)
        when every attempt failed.
        """
        attempts = 1 + self._settings.repair_attempts
        base = list(messages)
        problems = ""
        last: dict[str, Any] | None = None
        for attempt in range(attempts):
            started = time.perf_counter()
            answer = self._backend.generate_json(
                messages, schema, max_new_tokens, (seed + attempt) % _SEED_SPACE
            )
            try:
                data = tidy(read_answer(answer, constrained=self._backend.constrains_json))
                last = data
                return model.model_validate(data, context=context), None
            except (parsing.UnusableAnswer, ValidationError, ValueError) as exc:
                problems = describe_problems(exc)
                log.info(
                    "answer rejected",
                    extra={
                        "step": step,
                        "attempt": attempt + 1,
                        "problems": problems,
                        "seconds": round(time.perf_counter() - started, 2),
                    },
                )
                messages = [*base, *prompts.repair_turns(answer, problems)]
        log.warning(
            "step fell back", extra={"step": step, "attempts": attempts, "problems": problems}
        )
        return None, last


# --- Helpers (pure, tested on their own) -----------------------------------------------------


def story_scenes(text: str, scene_count: int, max_chars: int) -> list[str] | None:
    """The narration of each of ``scene_count`` scenes from a prose story; None if too short.

    A story already written as ``scene_count`` numbered or labelled parts keeps
    its parts. Otherwise its sentences are split evenly over the scenes, clauses
    are split when there are too few, and a sentence cut off by the token budget
    is dropped when the rest suffices. Each line is kept under ``max_chars``.
    """
    parts = parsing.structured_scenes(text)
    if parts is not None and len(parts) == scene_count:
        return [_shorten(part, max_chars) for part in parts]
    sentences = parsing.story_sentences(text)
    if len(sentences) > scene_count and not parsing.ends_a_sentence(sentences[-1]):
        sentences = sentences[:-1]
    if len(sentences) < scene_count:
        sentences = parsing.split_clauses(sentences, scene_count)
    if len(sentences) < scene_count:
        return None
    return [_fit_sentences(group, max_chars) for group in _groups(sentences, scene_count)]


def _groups(sentences: list[str], scene_count: int) -> list[list[str]]:
    size, extra = divmod(len(sentences), scene_count)
    out, start = [], 0
    for index in range(scene_count):
        end = start + size + (1 if index < extra else 0)
        out.append(sentences[start:end])
        start = end
    return out


def _fit_sentences(sentences: list[str], max_chars: int) -> str:
    """As many whole sentences as fit ``max_chars`` (at least one, shortened if need be)."""
    kept = [sentences[0]]
    for sentence in sentences[1:]:
        if len(" ".join([*kept, sentence])) > max_chars:
            break
        kept.append(sentence)
    return _shorten(" ".join(kept), max_chars)


def _shorten(text: str, max_chars: int) -> str:
    """``text`` cut at a word boundary to at most ``max_chars``, ending with a full stop."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    cut = text[: max_chars - 1].rsplit(" ", 1)[0].rstrip(" ,;:-")
    return cut + "."


def fallback_title(prompt: str, max_chars: int) -> str:
    """A title from the caller's prompt: its first words, capitalised."""
    words = prompts.neutralize(prompt).split()
    title = ""
    for word in words:
        candidate = f"{title} {word}".strip()
        if len(candidate) > max_chars:
            break
        title = candidate
    title = title.strip(" .,;:!?\"'") or "Untitled"
    return title[0].upper() + title[1:]


def read_answer(answer: str, *, constrained: bool) -> dict[str, Any]:
    """The answer as a JSON object: strict for a grammar-constrained answer, else tolerant."""
    try:
        data = json.loads(answer)
    except ValueError:
        if constrained and answer.lstrip().startswith("{"):
            # Under a grammar only the token budget cuts JSON short.
            raise parsing.UnusableAnswer(
                "the answer is not complete JSON (it was cut off; be shorter)"
            ) from None
        data = parsing.read_object(answer)
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        raise parsing.UnusableAnswer("the answer is not a JSON object")
    return data


def _normalized(data: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``data`` with its keys matched to ``keys`` loosely ("Image Prompt" -> "image_prompt")."""
    wanted = {re.sub(r"[^a-z]", "", k): k for k in keys}
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = wanted.get(re.sub(r"[^a-z]", "", str(key).casefold()))
        out[name or key] = value
    return out


#: Words a phrase cut off at its length cap may end on ("...looking at you from a").
_DANGLING = frozenset(
    [
        "a",
        "an",
        "the",
        "and",
        "or",
        "but",
        "of",
        "with",
        "from",
        "to",
        "in",
        "on",
        "at",
        "by",
        "for",
        "as",
        "his",
        "her",
        "its",
        "their",
        "our",
        "my",
        "your",
        "who",
        "which",
        "that",
        "while",
        "when",
        "is",
        "was",
        "are",
        "were",
        "be",
    ]
)


def _tidy_text(value: Any, cap: int | None = None, lower: bool = False) -> Any:
    """Whitespace collapsed, edge punctuation dropped; a phrase cut off at ``cap`` mended.

    A grammar ends a string at its length cap, often inside a word or after an
    article: the partial word and dangling small words are dropped.
    """
    if not isinstance(value, str):
        return value
    words = value.split()
    if cap and len(value) >= cap and len(words) > 1:
        words.pop()  # probably cut inside
    while len(words) > 1 and words[-1].strip(",;:").casefold() in _DANGLING:
        words.pop()
    value = " ".join(words).strip(" .;:,")
    if lower and value[:1].isupper() and not value[1:2].isupper():
        value = value[0].lower() + value[1:]
    return value


def tidy_cast(data: dict[str, Any], caps: TextCaps) -> dict[str, Any]:
    """Undo slips that lose nothing when fixed, before validation.

    Keys are matched loosely; whitespace is collapsed; a word cut off at a length
    cap is dropped; an appearance is made a lower-case phrase starting with
    "a"/"an"; a character listed twice under one name (any case) keeps its first
    entry. Anything else is left for validation.
    """
    data = _normalized(data, ("title", "logline", "characters"))
    data["title"] = _tidy_text(data.get("title"), caps.title)
    logline = _tidy_text(data.get("logline"), caps.logline)
    if isinstance(logline, str) and logline and not parsing.ends_a_sentence(logline):
        logline += "."
    data["logline"] = logline
    characters = data.get("characters")
    if isinstance(characters, list):
        kept, seen = [], set()
        for character in characters:
            if isinstance(character, dict):
                character = _normalized(character, ("name", "appearance"))
                character["name"] = _tidy_text(character.get("name"))
                character["appearance"] = _tidy_appearance(
                    _tidy_text(character.get("appearance"), caps.appearance)
                )
                name = character.get("name")
                key = name.casefold() if isinstance(name, str) else None
                if key is not None and key in seen:
                    continue
                if key is not None:
                    seen.add(key)
            kept.append(character)
        data["characters"] = kept
    return data


def _tidy_appearance(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    value = " ".join(value.split()).strip(" .;:").lower()
    if value and not re.match(r"^(a|an) ", value):
        article = "an" if value[0] in "aeiou" else "a"
        value = f"{article} {value}"
    return value


def tidy_shot(data: dict[str, Any], cast: Sequence[Character], caps: TextCaps) -> dict[str, Any]:
    """Loose keys and whitespace fixed; names matched to the cast's spelling.

    "the whale", "WHALE" or "Ada's" name the cast's "Whale" and "Ada"; a name
    matching nobody is left for validation (and so for a re-ask).
    """
    data = _normalized(data, ("characters", "setting", "action", "camera"))
    data["setting"] = _tidy_text(data.get("setting"), caps.setting, lower=True)
    data["action"] = _tidy_text(data.get("action"), caps.action)
    camera = data.get("camera")
    if isinstance(camera, str):
        data["camera"] = " ".join(camera.lower().replace("close up", "close-up").split())
    names = data.get("characters")
    if isinstance(names, str):
        names = [n for n in re.split(r",|\band\b", names) if n.strip()]
    if isinstance(names, list):
        matched = []
        for name in names:
            match = match_name(name, cast) if isinstance(name, str) else None
            matched.append(match or name)
        data["characters"] = list(dict.fromkeys(matched))
    return data


def salvage_cast(
    data: dict[str, Any], caps: TextCaps, context: DraftContext
) -> tuple[tuple[Character, ...], str, str]:
    """(characters, title, logline) of a rejected cast answer that are valid on their own."""
    title = data.get("title")
    title = title if isinstance(title, str) and re.match(TITLE_PATTERN, title) else ""
    title = title if len(title) <= caps.title else ""
    logline = data.get("logline")
    valid_logline = (
        isinstance(logline, str)
        and 12 <= len(logline) <= caps.logline
        and re.match(LOGLINE_PATTERN, logline) is not None
        and is_third_person(logline)
        and not prompts.repeats_instructions(logline)
    )
    characters: list[Character] = []
    seen: set[str] = set()
    model = character_model(caps)
    for item in data.get("characters") or []:
        try:
            character = model.model_validate(item)
        except ValidationError:
            continue
        name, appearance = character.name, character.appearance  # type: ignore[attr-defined]
        if name.casefold() in seen or appearance_problems(name, appearance, context):
            continue
        if prompts.repeats_instructions(appearance):
            continue
        seen.add(name.casefold())
        characters.append(Character(name=name, appearance=appearance))
        if len(characters) == caps.characters:
            break
    return tuple(characters), title, logline if valid_logline else ""


def match_name(mention: str, cast: Sequence[Character]) -> str | None:
    """The cast member ``mention`` refers to, or None."""
    text = _ARTICLES.sub("", mention.strip()).removesuffix("'s").strip().casefold()
    if not text:
        return None
    for character in cast:
        if character.name.casefold() == text:
            return character.name
    for character in cast:
        words = character.name.casefold().split()
        if text in words or (len(text.split()) > 1 and text.split()[0] in words):
            return character.name
    for character in cast:
        # "the whale" for a character whose look is "a huge blue whale".
        if re.search(rf"\b{re.escape(text)}\b", character.appearance.casefold()):
            return character.name
    return None


def describe_problems(exc: Exception) -> str:
    """The validation errors as short lines a model (and a log reader) can act on."""
    if isinstance(exc, parsing.UnusableAnswer):
        return str(exc)
    if not isinstance(exc, ValidationError):
        return str(exc) or type(exc).__name__
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        where = _location(error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        lines.append(f"{where}: {message}" if where else message)
    return "; ".join(dict.fromkeys(lines))


def _location(loc: tuple[int | str, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            # Models count from 1, like the narration does.
            parts.append(f"[{item + 1}]")
        else:
            parts.append(("." if parts else "") + item)
    return "".join(parts)
