"""The free-form storyboard reader: a whole storyboard out of any answer a model wrote.

:func:`parse_storyboard` reads a storyboard from a model's raw answer, whatever
its shape: JSON in any layout of keys (``scenes``, ``shots``, ``panels``...;
``image_prompt``, ``visual``...); what chat models write (:func:`board_from_labels`):
"Image Prompt N:", "Prompt N -" and "Visual:" labels, "Scene N" (shot, panel...) blocks
with narration and prompt fields, numbered or bulleted lists, markdown tables with a
prompt column, **bold** labels, a "Script:" paragraph split across the prompts; and the
delimited prompts that :mod:`storyreel_llm.reader` reads. Openers ("Sure! Here's...")
and sign-offs ("I hope this helps!") are dropped. Scenes are never cut out of prose:
an answer without an image prompt (chatter, a refusal, a story alone), or whose prompts
and scenes cannot be matched, is refused with :class:`~storyreel_llm.reader.UnusableAnswer`
saying why.

The LLM service does not use it (its writer asks for one step at a time, see
:mod:`storyreel_llm.reader`, and keeps its own sentence fallback); ``storyreel
parse-storyboard`` exposes it.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from storyreel.limits import MAX_SCENES
from storyreel_llm.reader import (
    _CHATTER,
    _DELIMITED,
    RawBoard,
    RawScene,
    UnusableAnswer,
    block_scene,
    board_from_text,
    character_from_text,
    clean,
    ends_a_sentence,
    field_key,
    loads_lenient,
    mentioned,
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


# --- Labelled text: what chat models write -----------------------------------------------------

_NARRATION_WORDS = (
    r"narration|narrator|voice[ \-]?over|vo|caption|text|dialogue|story\s+text|script\s+line"
)
_PROMPT_WORDS = (
    r"image\s+prompt|visual\s+prompt|image\s+description|visual\s+description|"
    r"scene\s+description|illustration\s+prompt|art\s+prompt|ai\s+image\s+prompt|"
    r"prompt|visuals?|image|picture|illustration|art|on[ \-]screen"
)
_SCRIPT_WORDS = (
    r"(?:full\s+|video\s+|narration\s+|voice[ \-]?over\s+)?script|story|narrative|"
    r"full\s+narration|full\s+story"
)
_BLOCK_WORDS = r"scene|shot|panel|frame|page|part|slide|beat|clip"
#: A label at the start of a line, after list markers, heading marks and bold.
_LABEL = re.compile(
    r"^[\s>#]*(?:(?:[-*•+]|\d+[.)])\s+)?[\s*_]*"
    rf"(?P<label>title|story\s+title|video\s+title|{_BLOCK_WORDS}|(?:{_PROMPT_WORDS})s?|"
    rf"{_NARRATION_WORDS}|{_SCRIPT_WORDS}|characters|cast)"
    r"(?:\s*#?\s*(?P<number>\d+))?\b[\s*_]*"
    r"(?:(?P<sep>[:.)\-–—=])|$)[\s*_]*(?P<value>.*?)[\s*_]*$",
    re.IGNORECASE,
)
_LIST_START = re.compile(r"^\s*(?:(?P<number>\d+)[.)]|[-*•+])\s+(?P<rest>.*)$")
_INLINE_PROMPT = re.compile(
    rf"[\[(]\s*(?:{_PROMPT_WORDS})\s*:\s*(?P<value>[^\])]+?)\s*[\])]", re.IGNORECASE
)
_RULE = re.compile(r"^\s*(?:[-*_=]\s*){3,}$")
_SIGN_OFF = re.compile(
    r"^\W*(?:i hope|hope (?:this|you|that)|let me know|feel free|enjoy|happy (?:creating|reading)|"
    r"would you like|do you want|if you(?:'d| would) like|if you need|this (?:script|storyboard|"
    r"story) (?:should|will|can)|i can also|i'?d be happy|good luck|have fun|note:|"
    r"i'?m (?:ready|here|happy)|what would you like|how can i)",
    re.IGNORECASE,
)


def _kind(label: str) -> str:
    key = field_key(label)
    if key in ("title", "storytitle", "videotitle"):
        return "title"
    if key in ("characters", "cast"):
        return "cast"
    if re.fullmatch(_BLOCK_WORDS, key):
        return "block"
    if re.fullmatch(field_key_pattern(_PROMPT_WORDS), key):
        return "prompt"
    if re.fullmatch(field_key_pattern(_NARRATION_WORDS), key):
        return "narration"
    return "script"


def field_key_pattern(words: str) -> str:
    """An alternation of labels as :func:`field_key` writes them, plurals included."""
    plain = re.sub(r"\\s[+*?]?|\[[^\]]*\][?*+]?|s\?(?=\||$)", "", words)
    return "(?:" + "|".join(field_key(w) + "s?" for w in plain.split("|")) + ")"


_FIELDS = ("prompt", "narration")


@dataclass
class _Block:
    number: int | None
    narration: list[str] = field(default_factory=list)
    prompt: list[str] = field(default_factory=list)


class _TextReader:
    """One pass over the lines of a labelled answer."""

    def __init__(self) -> None:
        self.title = ""
        self.characters: list[tuple[str, str]] = []
        self.blocks: list[_Block] = []
        self.by_number: dict[int, _Block] = {}
        self.script: list[str] = []
        self.loose: list[str] = []
        self.current: _Block | None = None  # the block a "Scene N" header opened
        self.target: list[str] | None = None  # the field that plain lines continue
        self.section: str | None = None  # "prompt"/"narration"/"cast": a list follows
        self.section_count = 0
        self.started = False

    def block(self, number: int | None) -> _Block:
        if number is not None and number in self.by_number:
            return self.by_number[number]
        block = _Block(number)
        self.blocks.append(block)
        if number is not None:
            self.by_number[number] = block
        return block

    def put(self, kind: str, value: str, number: int | None) -> None:
        """A narration or prompt field with ``value`` (may be empty: a line follows)."""
        if number is not None:
            block = self.block(number)
        elif self.current is not None:
            block = self.current
        else:
            # Unnumbered fields outside a "Scene N" block: a field seen twice starts the next.
            block = self.blocks[-1] if self.blocks and self.blocks[-1].number is None else None
            if block is None or getattr(block, kind):
                block = self.block(None)
        parts = getattr(block, kind)
        if value:
            parts.append(value)
        self.target = parts

    def line(self, raw: str) -> None:
        if not raw.strip():
            if self.target is not None and self.target is not self.script and self.target:
                self.target = None
            return
        if _RULE.match(raw):
            self.target = None
            return
        text = clean(raw)
        if _SIGN_OFF.match(text) or (not self.started and (_CHATTER.match(text))):
            self.target = None
            self.section = None
            return
        if not self.started and text.endswith(":") and not _LABEL.match(raw):
            return  # "Here is the storyboard:"
        self.started = True
        label = _LABEL.match(raw)
        if (
            label
            and label.group("sep") is None
            and label.group("number") is None
            and not re.match(r"^[\s#]*[*_#]", raw)
            and not raw.rstrip().endswith(("*", "_"))
        ):
            label = None  # a bare word on a line is a label only as a heading ("**Visuals**")
        item = _LIST_START.match(raw)
        inner = _LABEL.match(item.group("rest")) if item else None
        if (
            item
            and item.group("number")
            and self.section is None
            and (self.current is None or self.current.number is None)
            and (
                inner is None
                or (inner.group("number") is None and _kind(inner.group("label")) in _FIELDS)
            )
        ):
            # "1. Ada sails. | Image prompt: ..." or "1) Narration: ...": one item, one scene.
            self.current = self.block(None)
            self.target = None
            self.segments(item.group("rest"))
            return
        if label:
            self.labelled(label, raw)
            return
        if item and self.section in ("prompt", "narration"):
            self.section_count += 1
            number = int(item.group("number") or self.section_count)
            self.put(self.section, clean(item.group("rest")), number)
            return
        if item and self.section == "cast":
            character = character_from_text(clean(item.group("rest")))
            if character:
                self.characters.append(character)
            return
        if self.target is not None:
            self.segments(raw, default=self.target)
        elif self.current is not None:
            self.segments(raw)
        else:
            self.loose.append(text)

    def segments(self, raw: str, default: list[str] | None = None) -> None:
        """Inline fields of a line ("... | Image prompt: ..." or "[Visual: ...]")."""
        raw = _INLINE_PROMPT.sub(lambda m: f" | Image prompt: {m.group('value')} | ", raw)
        for part in re.split(r"\s+(?:/|\||—|–)\s+(?=[\s*_]*[A-Za-z ]{2,25}[\s*_]*:)|\s\|\s", raw):
            if not clean(part):
                continue
            label = _LABEL.match(part)
            if (
                label
                and label.group("sep")
                and _kind(label.group("label"))
                in (
                    "prompt",
                    "narration",
                )
            ):
                self.put(_kind(label.group("label")), clean(label.group("value")), None)
                continue
            if default is not None:
                default.append(clean(part))
            elif self.current is not None:
                self.current.narration.append(clean(part))
                self.target = self.current.narration

    def labelled(self, label: re.Match[str], raw: str) -> None:
        kind = _kind(label.group("label"))
        number = int(label.group("number")) if label.group("number") else None
        value = clean(label.group("value"))
        self.section = None
        if kind == "title":
            self.title = self.title or value
            self.target = None
        elif kind == "cast":
            self.section = "cast"
            self.target = None
            for part in re.split(r";|,\s+(?=[A-Z][a-z]+\s*[(:\-–—])", value) if value else []:
                character = character_from_text(clean(part))
                if character:
                    self.characters.append(character)
        elif kind == "block":
            if number is None:
                self.loose.append(clean(raw))
                return
            self.current = self.block(number)
            self.target = None
            if value and (ends_a_sentence(value) or ":" in value or len(value.split()) > 8):
                self.segments(value)
        elif kind == "script" and number is None:
            self.current = None
            self.target = self.script
            if value:
                self.script.append(value)
        else:
            kind = "narration" if kind == "script" else kind
            plural = field_key(label.group("label")).endswith("s") and number is None
            if not value and (plural or self.current is None) and number is None:
                # "Image Prompts:" or "Narration:" over a list: each item is one scene's.
                self.section = kind
                self.section_count = 0
                if not plural:
                    self.put(kind, "", None)
                    self.section = kind
                return
            if number is not None and self.current is not None and self.current.number != number:
                self.current = None
            self.put(kind, value, number)


def _split_script(script: str, parts: int) -> list[str] | None:
    sentences = trim_chatter(split_sentences(script))
    if len(sentences) < parts:
        sentences = split_clauses(sentences, parts)
    if len(sentences) < parts:
        return None
    return group_sentences(sentences, parts)


def _tables(lines: list[str]) -> tuple[list[str], list[list[dict[str, str]]]]:
    """``lines`` without their markdown tables, and each table's rows by header."""
    rest: list[str] = []
    tables: list[list[dict[str, str]]] = []
    run: list[str] = []
    for line in [*lines, ""]:
        if line.strip().startswith("|") and line.strip().count("|") >= 2:
            run.append(line.strip().strip("|"))
            continue
        if len(run) >= 3 and re.fullmatch(r"[\s|:\-]+", run[1]):
            header = [field_key(clean(c)) for c in run[0].split("|")]
            rows = []
            for row in run[2:]:
                cells = [clean(c) for c in row.split("|")]
                rows.append(dict(zip(header, cells, strict=False)))
            tables.append(rows)
        else:
            rest += ["| " + r + " |" for r in run]
        run = []
        rest.append(line)
    return rest[:-1], tables


def _table_board(rows: list[dict[str, str]]) -> list[RawScene] | None:
    if not rows:
        return None
    keys = list(rows[0])
    prompt_pattern = field_key_pattern(_PROMPT_WORDS)
    prompt_key = next((k for k in keys if re.fullmatch(prompt_pattern, k)), None)
    prompt_key = prompt_key or next(
        (k for k in keys if re.search("prompt|visual|image|picture", k)), None
    )
    if prompt_key is None:
        return None
    narration_pattern = field_key_pattern(_NARRATION_WORDS + "|script|story|narrative")
    narration_key = next(
        (k for k in keys if k != prompt_key and re.fullmatch(narration_pattern, k)), None
    )
    narration_key = narration_key or next(
        (k for k in keys if k != prompt_key and re.search("narrat|voice|script|text|story", k)),
        None,
    )
    return [
        RawScene(
            narration=row.get(narration_key, "") if narration_key else "",
            prompt=row.get(prompt_key, ""),
        )
        for row in rows
        if row.get(prompt_key) or (narration_key and row.get(narration_key))
    ]


def board_from_labels(text: str) -> RawBoard | None:
    """A storyboard from a chat model's labelled answer; None when it holds no image prompt.

    Reads "Image Prompt N:" / "Prompt N -" / "Visual:" labels, "Scene N" (shot, panel...)
    blocks with narration and prompt fields, lists under an "Image Prompts:" heading,
    numbered items with their fields, markdown tables with a prompt column, bold labels;
    a "Script:" paragraph is split across the prompts when no scene has its own narration.
    Raises :class:`UnusableAnswer` when the prompts and narrations cannot be matched.
    """
    lines, tables = _tables(text.splitlines())
    reader = _TextReader()
    for line in lines:
        reader.line(line)
    scenes: list[RawScene] = []
    for rows in tables:
        scenes += _table_board(rows) or []
    if reader.blocks and scenes:
        raise UnusableAnswer("the answer holds both a table and labelled scenes")
    blocks = (
        sorted(
            (b for b in reader.blocks if b.narration or b.prompt),
            key=lambda b: (b.number is None, b.number or 0),
        )
        if all(b.number is not None for b in reader.blocks)
        else reader.blocks
    )
    blocks = [b for b in blocks if b.narration or b.prompt]
    scenes = scenes or [
        RawScene(narration=clean(" ".join(b.narration)), prompt=clean(" ".join(b.prompt)))
        for b in blocks
    ]
    if not any(s.prompt for s in scenes):
        return None
    board = RawBoard(title=reader.title, characters=reader.characters)
    missing = [i for i, s in enumerate(scenes, start=1) if not s.prompt]
    if missing:
        raise UnusableAnswer(
            f"{len(scenes) - len(missing)} image prompt(s) for {len(scenes)} scenes: "
            f"scene(s) {', '.join(map(str, missing))} have no image prompt"
        )
    if not any(s.narration for s in scenes):
        script = " ".join(reader.script) or " ".join(reader.loose)
        if script:
            parts = _split_script(script, len(scenes))
            if parts is None:
                raise UnusableAnswer(
                    f"the script has too few sentences for its {len(scenes)} image prompts"
                )
            for scene, part in zip(scenes, parts, strict=True):
                scene.narration = part
    elif not all(s.narration for s in scenes):
        missing = [i for i, s in enumerate(scenes, start=1) if not s.narration]
        raise UnusableAnswer(
            f"{len(scenes)} image prompts but scene(s) {', '.join(map(str, missing))} "
            "have no narration"
        )
    board.scenes = scenes
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

    Every scene comes from the answer's own scenes or image prompts; none is invented by
    cutting prose into sentences. With ``scene_count`` the answer must hold exactly that
    many scenes. Raises :class:`UnusableAnswer` with the reason when the answer holds no
    image prompt (chatter, a refusal, a story alone), or when its prompts and scenes
    cannot be matched.
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
        if board.scenes and not any(s.prompt for s in board.scenes):
            raise UnusableAnswer("the answer's scenes hold no image prompt")
    if board is None or not board.scenes:
        board = _text_board(text)
    if scene_count and len(board.scenes) != scene_count:
        raise UnusableAnswer(
            f"the answer has {len(board.scenes)} complete scene(s) where {scene_count} were asked"
        )
    if len(board.scenes) > max_scenes:
        raise UnusableAnswer(f"the answer has {len(board.scenes)} scenes; at most {max_scenes}")
    return _finish(board, style)


def _text_board(text: str) -> RawBoard:
    """The storyboard of an answer that is not JSON: labels, lists, tables, delimiters."""
    board: RawBoard | None = None
    if _DELIMITED.search(text):
        board = board_from_text(text)
        if board is not None and not all(s.prompt for s in board.scenes):
            board = None
    board = board or board_from_labels(text)
    if board is None:
        raise UnusableAnswer(
            'the answer holds no image prompt (no "Image prompt:", "Visual:", '
            '"Scene N" with a prompt, prompt column or <<prompt>>): nothing to draw'
        )
    board.title = board.title or title_of(text)
    return board


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
