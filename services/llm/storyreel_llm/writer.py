"""The story core: turns a prompt into a :class:`Storyboard` in two steps.

1. **The story.** The model writes a short prose story (free text: small models
   write far better prose than JSON). Its sentences become the scenes'
   narration, split evenly over exactly ``scene_count`` scenes.
2. **The extraction.** Under a JSON schema, the model reads the story once for
   a title, a logline and the cast (each character with a fixed appearance),
   then once per scene for the shot: who is in the picture, the setting, the
   action and the camera.

The image prompt is then assembled in code (:mod:`storyreel.image_prompts`) from the
style, the fixed appearance of each character present, and the shot, and fitted
to CLIP's 77-token window: a character reads the same in every prompt because
the model is never trusted to repeat the description.

Every answer is validated by the pydantic drafts; an unusable one is sent back
with the validation errors (at most ``repair_attempts`` times per step). Answers
from servers that cannot constrain decoding go through the tolerant reader
(:mod:`storyreel_llm.reader`) first. If a step still fails, a deterministic
fallback fills it in from the story's sentences and the storyboard says ``degraded``.

No gRPC here: the servicer converts messages and calls :meth:`StoryboardWriter.write`.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from storyreel.clip_count import ClipTokenizer, clip_tokenizer
from storyreel.errors import InvalidInput, UpstreamFailed
from storyreel.image_prompts import assemble_image_prompt
from storyreel.prompts import check_prompt
from storyreel.seeds import MAX_UINT64_SEED, choose_seed
from storyreel_llm import prompts, reader
from storyreel_llm.backends.base import Backend, ChatMessage
from storyreel_llm.settings import LLMSettings
from storyreel_llm.storyboard import (
    CAMERAS,
    CastDraftBase,
    Character,
    DraftContext,
    Scene,
    ShotDraftBase,
    Storyboard,
    TextCaps,
    action_pattern,
    appearance_problems,
    cast_model,
    cast_schema,
    character_model,
    is_third_person,
    logline_pattern,
    setting_pattern,
    shot_model,
    shot_schema,
    title_pattern,
)

log = logging.getLogger(__name__)

#: 64-bit seeds, as the contract's uint64 carries.
_SEED_SPACE = MAX_UINT64_SEED + 1
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
        # Empty, or only chat-template markup: the rule the gateway applies too.
        check_prompt(prompt)
        if len(prompt) > s.max_prompt_chars:
            raise InvalidInput(
                f"prompt must be at most {s.max_prompt_chars} characters (got {len(prompt)})"
            )
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
            seed = choose_seed(MAX_UINT64_SEED)
        started = time.perf_counter()
        narrations, story_salvaged = self._story(prompt, scene_count, seed)
        story = " ".join(narrations)
        cast, title, logline, cast_fallback = self._cast(prompt, story, seed)
        scenes: list[Scene] = []
        previous: tuple[Character, ...] = ()
        degraded = story_salvaged or cast_fallback
        setting = ""
        for index, narration in enumerate(narrations, start=1):
            shot = self._shot(
                prompt, story, cast, narration, index, scene_count, seed, previous_setting=setting
            )
            setting = shot.setting or setting
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
        leaks = audit(storyboard, prompt)
        if leaks:
            # Every step checks its answers; this is the last line of defence.
            raise UpstreamFailed(
                f"the {self._backend.name} model's storyboard still holds text of our prompts "
                f"after {1 + self._settings.repair_attempts} attempt(s) per step: "
                + "; ".join(leaks)
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
        return self._story(prompt, scene_count, seed)[0]

    def _story(self, prompt: str, scene_count: int, seed: int) -> tuple[list[str], bool]:
        """(the narration lines, salvaged): the story, checked sentence by sentence.

        An answer with a sentence copied from our prompts (the instructions, the
        user turn, a continue turn) or about the task itself is rejected and asked
        again with another seed. If every attempt fails, the clean sentences written so
        far are used when they are enough (salvaged: the storyboard is degraded);
        otherwise :class:`UpstreamFailed` says why.
        """
        s = self._settings
        messages = prompts.story_messages(prompt, scene_count)
        budget = s.story_max_tokens(scene_count)
        text, problem = "", ""
        salvage: list[str] = []
        sent: list[str] = []  # our continue turns, which an answer must not copy either
        attempts = 1 + s.repair_attempts
        for attempt in range(attempts):
            answer = self._backend.generate_text(
                prompts.alternating(messages), budget, (seed + attempt) % _SEED_SPACE
            ).strip()
            if text:
                answer = _new_sentences(text, answer)
            sentences = reader.story_sentences(answer)
            copied = [
                piece
                for sentence in sentences
                if (piece := prompts.borrowed(sentence, prompt, sent, story_step=True)) is not None
            ]
            if copied or prompts.repeats_instructions(answer):
                # Asked again as before, with another seed: shown its own talk about the task,
                # a small model goes on talking about it (seen with SmolLM2 on llama.cpp).
                problem = (
                    f"the story repeats {copied[0]!r} from the instructions instead of "
                    "telling the story"
                    if copied
                    else "the story repeats the instructions"
                )
                clean = [
                    x
                    for x in sentences
                    if prompts.borrowed(x, prompt, sent, story_step=True) is None
                ]
                salvage.append(f"{text} {' '.join(clean)}".strip())
                log.info("story rejected", extra={"attempt": attempt + 1, "problems": problem})
                continue
            text = f"{text} {answer}".strip() if text else answer
            lines = story_scenes(text, scene_count, s.max_narration_chars)
            if lines is not None:
                return lines, False
            have = len(reader.story_sentences(text))
            problem = f"the story has {have} sentence(s) for {scene_count} scenes"
            log.info("story too short", extra={"attempt": attempt + 1, "problems": problem})
            turns = prompts.continue_turns(text, scene_count + 1 - have)
            sent.append(turns[-1]["content"])
            messages = [*prompts.story_messages(prompt, scene_count), *turns]
        for candidate in salvage:
            lines = story_scenes(candidate, scene_count, s.max_narration_chars)
            if lines is not None:
                log.warning("story salvaged", extra={"attempts": attempts, "problems": problem})
                return lines, True
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
            source=f"{prompt}\n{story}",
        )
        if not isinstance(draft, CastDraftBase):
            # Keep what the last answer got right; fill in the rest from the prompt and story.
            cast, title, logline = salvage_cast(last or {}, self._caps, context)
            if not title:
                title = fallback_title(prompt, self._caps.title)
            first = reader.split_sentences(story)[:1]
            if (
                not logline
                and first
                and len(first[0]) <= self._caps.logline
                and is_third_person(first[0])
            ):
                logline = first[0]
            return cast, title, logline, True
        cast = tuple(Character(name=c.name, appearance=c.appearance) for c in draft.characters)
        return cast, draft.title, draft.logline, False

    # --- Step 3: one shot per scene -------------------------------------------------------

    def _shot(
        self,
        prompt: str,
        story: str,
        cast: Sequence[Character],
        narration: str,
        index: int,
        scene_count: int,
        seed: int,
        previous_setting: str = "",
    ) -> Shot:
        names = tuple(c.name for c in cast)
        context = DraftContext(names=names, forbidden=prompts.INSTRUCTIONS, cast_known=True)
        looks = " ".join(f"{c.name} {c.appearance}" for c in cast)
        draft, last = self._extract(
            f"shot {index}",
            prompts.shot_messages(story, cast, narration, index, scene_count),
            shot_model(self._caps),
            shot_schema(self._caps),
            self._settings.shot_max_tokens,
            seed + _SHOT_SEED + 16 * index,
            context,
            lambda data: tidy_shot(data, cast, self._caps),
            source=f"{prompt}\n{story}\n{looks}",
        )
        if not isinstance(draft, ShotDraftBase):
            return fallback_shot(narration, cast, last or {}, self._caps, context, previous_setting)
        by_key = {n.casefold(): n for n in names}
        return Shot(
            characters=tuple(
                dict.fromkeys(
                    by_key[n.casefold()] for n in draft.characters if n.casefold() in by_key
                )
            ),
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
        names += reader.mentioned(f"{narration} {shot.action}", list(by_name))
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
        source: str = "",
    ) -> tuple[BaseModel | None, dict[str, Any] | None]:
        """Ask for ``schema`` until an answer validates.

        Every text of an answer is also checked against our prompts (the
        instructions, the worked example, the re-asks sent so far): text that
        ``source`` (the idea, the story) does not have itself is sent back.
        Returns (the draft, None), or (None, the last answer read as an object, if any)
        when every attempt failed.
        """
        attempts = 1 + self._settings.repair_attempts
        problems = ""
        last: dict[str, Any] | None = None
        sent: list[str] = []  # the re-asks of this step, which an answer must not copy either
        context.borrowed = lambda text: prompts.borrowed(text, source, sent)
        for attempt in range(attempts):
            started = time.perf_counter()
            answer = self._backend.generate_json(
                prompts.alternating(messages),
                schema,
                max_new_tokens,
                (seed + attempt) % _SEED_SPACE,
            )
            try:
                data = tidy(read_answer(answer, constrained=self._backend.constrains_json))
                last = data
                return model.model_validate(data, context=context), None
            except Exception as exc:
                # Whatever the model wrote, a bad answer is a re-ask, never a crash.
                if not isinstance(exc, reader.UnusableAnswer | ValidationError | ValueError):
                    log.warning("unreadable answer", exc_info=True, extra={"step": step})
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
                # The conversation keeps every failed attempt: each re-ask differs from the
                # last even on a server that ignores the seed under a grammar.
                turns = prompts.repair_turns(answer, problems)
                sent.append(turns[-1]["content"])
                messages = [*messages, *turns]
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
    parts = reader.structured_scenes(text)
    if parts is not None and len(parts) == scene_count:
        return [_shorten(part, max_chars) for part in parts]
    sentences = _distinct(reader.story_sentences(text))
    if len(sentences) > scene_count and not reader.ends_a_sentence(sentences[-1]):
        sentences = sentences[:-1]
    if len(sentences) < scene_count:
        sentences = reader.split_clauses(sentences, scene_count)
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


def _sentence_key(sentence: str) -> str:
    return " ".join(re.findall(r"\w+", sentence.casefold()))


def _distinct(sentences: list[str]) -> list[str]:
    """``sentences`` without a sentence said twice in a row, or a last one that only starts
    an earlier one again (a repeat cut off by the token budget): a small model looping
    would otherwise narrate one sentence in two scenes."""
    kept: list[str] = []
    keys: list[str] = []
    for number, sentence in enumerate(sentences, start=1):
        key = _sentence_key(sentence)
        if not key or (keys and keys[-1] == key):
            continue
        last = number == len(sentences)
        if last and any(k != key and k.startswith(key + " ") for k in keys):
            continue
        kept.append(sentence)
        keys.append(key)
    return kept


def _new_sentences(story: str, answer: str) -> str:
    """The sentences of a continuation ``answer`` that ``story`` does not have yet.

    Asked to continue, a small model often writes the story again first: its
    repeated sentences would become a scene's narration a second time.
    """
    have = {_sentence_key(s) for s in reader.story_sentences(story)}
    sentences = reader.story_sentences(answer)
    new = [s for s in sentences if _sentence_key(s) not in have]
    return answer if len(new) == len(sentences) else " ".join(new)


#: Quotes and speech: a sentence with them is dialogue, never a picture.
_SPEECH = re.compile(
    r"[\"“”«»„「」『』]|(?:^|\s)'|'(?:\s|$)|\b(?:said|says|asked|asks|replied|shouted|whispered|"
    r"cried|yelled|called out|told|exclaimed|answered)\b",
    re.IGNORECASE,
)


def picture_action(narration: str, cap: int) -> str:
    """What a scene's picture can show, read from its narration; "" when nothing can be.

    The first sentence that is not speech (no quotes, no "said"), cut at its first
    clause and at ``cap`` characters, made of plain words only: a sentence with
    letters outside ASCII is skipped whole rather than half-copied into a prompt
    for an English CLIP encoder.
    """
    for sentence in reader.split_sentences(narration):
        if _SPEECH.search(sentence):
            continue
        clause = re.split(r"[;:()\[\]—–]|,\s+(?:and|but|so|then|while|when)\b", sentence)[0]
        words = clause.strip().rstrip(".!?…").split()
        if not words or not all(re.fullmatch(r"[A-Za-z0-9,'-]{1,15}", w) for w in words):
            continue
        action = _tidy_text(" ".join(words), cap)
        if isinstance(action, str) and len(action) >= 6 and re.match(action_pattern(cap), action):
            return action
    return ""


def fallback_shot(
    narration: str,
    cast: Sequence[Character],
    last: dict[str, Any],
    caps: TextCaps,
    context: DraftContext,
    previous_setting: str = "",
) -> Shot:
    """The picture of a scene whose shot could not be extracted: never the narration pasted.

    Built from the parts of the last answer that are valid on their own (setting,
    action, camera), else a setting carried over from the previous scene and an
    action read from the narration (:func:`picture_action`); the characters are
    the cast members the narration names.
    """
    borrowed = context.borrowed or (lambda text: None)

    def valid(value: Any, pattern: str, cap: int, min_chars: int) -> str:
        if not isinstance(value, str):
            return ""
        value = " ".join(value.split())
        ok = min_chars <= len(value) <= cap and re.match(pattern, value) and not borrowed(value)
        return value if ok else ""

    setting = valid(last.get("setting"), setting_pattern(caps.setting), caps.setting, 4)
    action = valid(last.get("action"), action_pattern(caps.action), caps.action, 6)
    camera = last.get("camera")
    return Shot(
        characters=tuple(reader.mentioned(narration, [c.name for c in cast])),
        setting=setting or previous_setting,
        action=action or picture_action(narration, caps.action),
        camera=camera if camera in CAMERAS else CAMERAS[0],
        fallback=True,
    )


def audit(storyboard: Storyboard, prompt: str) -> list[str]:
    """Every text of ``storyboard`` that holds text of our prompts (the last check)."""
    story = " ".join(s.narration for s in storyboard.scenes)
    looks = " ".join(f"{c.name} {c.appearance}" for c in storyboard.characters)
    found = [
        f"narration {s.index} holds {piece!r}"
        for s in storyboard.scenes
        if (piece := prompts.borrowed(s.narration, prompt, story_step=True))
    ]
    checks = [
        ("title", storyboard.title, f"{prompt}\n{story}"),
        ("logline", storyboard.logline, f"{prompt}\n{story}"),
        *(
            (f"character {c.name}", f"{c.name} {c.appearance}", f"{prompt}\n{story}")
            for c in storyboard.characters
        ),
        *(
            (f"scene {s.index}", f"{s.setting}. {s.action}", f"{prompt}\n{story}\n{looks}")
            for s in storyboard.scenes
        ),
    ]
    for where, text, source in checks:
        piece = prompts.borrowed(text, source)
        if piece:
            found.append(f"{where} holds {piece!r}")
    return found


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
    except RecursionError:
        raise reader.UnusableAnswer("the answer nests too deeply to be read") from None
    except ValueError:
        if constrained and answer.lstrip().startswith("{"):
            # Under a grammar only the token budget cuts JSON short.
            raise reader.UnusableAnswer(
                "the answer is not complete JSON (it was cut off; be shorter)"
            ) from None
        data = reader.read_object(answer)
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    if not isinstance(data, dict):
        raise reader.UnusableAnswer("the answer is not a JSON object")
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
    article: the partial word and dangling small words are dropped. A grammar that
    kept only the pattern (llama.cpp's converter drops ``maxLength``) may run past
    the cap: the phrase is cut there the same way.
    """
    if not isinstance(value, str):
        return value
    words = value.split()
    if cap and len(" ".join(words)) >= cap and len(words) > 1:
        # The word at the cap is probably cut inside: keep the words before it.
        kept: list[str] = []
        for word in words:
            if len(" ".join([*kept, word])) >= cap:
                break
            kept.append(word)
        words = kept or words[:1]
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
    if isinstance(logline, str) and logline and not reader.ends_a_sentence(logline):
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


#: Words an appearance may start with in place of "a"/"an" ("the princess", "his dog").
_DETERMINERS = re.compile(r"^(?:the|this|that|his|her|their|its|our|my|your|one)\s+")


def _tidy_appearance(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    value = " ".join(value.split()).strip(" .;:").lower()
    # "the princess" is "a princess", never "a the princess".
    value = _DETERMINERS.sub("", value) if _DETERMINERS.match(value) else value
    if value and not re.match(r"^(a|an) ", value):
        article = "an" if value[0] in "aeiou" else "a"
        value = f"{article} {value}"
    return value


#: Words a model puts in a shot's characters that name nobody in particular.
_NOBODY = frozenset(
    [
        *("i", "me", "he", "she", "it", "we", "they", "you", "him", "her", "us", "them"),
        *("everyone", "everybody", "nobody", "none", "no one", "someone", "somebody"),
    ]
)


def tidy_shot(data: dict[str, Any], cast: Sequence[Character], caps: TextCaps) -> dict[str, Any]:
    """Loose keys and whitespace fixed; names matched to the cast's spelling.

    "the whale", "WHALE" or "Ada's" name the cast's "Whale" and "Ada"; a name
    matching nobody is left for validation (and so for a re-ask), unless the cast
    is empty: then nobody can be named, and the names are dropped.
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
    if isinstance(names, list) and not cast:
        data["characters"] = []
    elif isinstance(names, list):
        matched: list[Any] = []
        for name in names:
            if isinstance(name, str) and name.strip().casefold() in _NOBODY:
                continue  # "I", "she", "everyone": no one to draw from the cast
            match = match_name(name, cast) if isinstance(name, str) else None
            if (match or name) not in matched:
                matched.append(match or name)
        data["characters"] = matched
    return data


def salvage_cast(
    data: dict[str, Any], caps: TextCaps, context: DraftContext
) -> tuple[tuple[Character, ...], str, str]:
    """(characters, title, logline) of a rejected cast answer that are valid on their own.

    A part copied from our prompts (``context.borrowed``) is never kept.
    """
    borrowed = context.borrowed or (lambda text: None)
    title = data.get("title")
    title = title if isinstance(title, str) and re.match(title_pattern(caps.title), title) else ""
    title = title if len(title) <= caps.title and not borrowed(title) else ""
    logline = data.get("logline")
    valid_logline = (
        isinstance(logline, str)
        and 12 <= len(logline) <= caps.logline
        and re.match(logline_pattern(caps.logline), logline) is not None
        and is_third_person(logline)
        and not prompts.repeats_instructions(logline)
        and not borrowed(logline)
    )
    characters: list[Character] = []
    seen: set[str] = set()
    model = character_model(caps)
    items = data.get("characters")
    for item in items if isinstance(items, list) else []:
        try:
            character = model.model_validate(item)
        except ValidationError:
            continue
        name, appearance = character.name, character.appearance  # type: ignore[attr-defined]
        if name.casefold() in seen or appearance_problems(name, appearance, context):
            continue
        if prompts.repeats_instructions(appearance) or borrowed(appearance) or borrowed(name):
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
    if isinstance(exc, reader.UnusableAnswer):
        return str(exc)
    if isinstance(exc, ValueError) and not isinstance(exc, ValidationError):
        return str(exc) or "the answer could not be used"
    if not isinstance(exc, ValidationError):
        return "the answer could not be read; answer with the JSON object only"
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
