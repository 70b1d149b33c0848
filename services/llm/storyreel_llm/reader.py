"""A tolerant reader of model answers, for servers that cannot constrain decoding.

Models without a grammar answer in a different shape every time. This module
reads what they meant instead of failing on how they wrote it, and is what the
storyboard writer (:mod:`storyreel_llm.writer`) uses on its step answers:

* JSON, also fenced in ```json blocks, with prose before and after, trailing
  commas, single quotes, Python literals, unquoted keys, or cut off mid-way
  (:func:`loads_lenient`); ``Label: value`` lines (:func:`labeled_fields`); both
  for one step's object (:func:`read_object`);
* the sentences of a prose story (:func:`story_sentences`, :func:`split_sentences`,
  :func:`split_clauses`) and the names they mention (:func:`mentioned`);
* "Scene 1: ... / Image prompt: ..." labels, numbered and bulleted lists, and
  image prompts wrapped in ``<<...>>``, ``[PROMPT]...[/PROMPT]`` or
  ``<prompt>...</prompt>`` (:func:`board_from_text`, :func:`structured_scenes`).

When nothing usable is found, :class:`UnusableAnswer` says why. The free-form
storyboard reader behind ``storyreel parse-storyboard`` (:mod:`storyreel_llm.freeform`)
builds on the same pieces.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


class UnusableAnswer(ValueError):
    """Nothing usable was found in an answer; the message says why."""


# --- Lenient JSON ----------------------------------------------------------------------------


@dataclass
class _Token:
    kind: str  # "{", "}", "[", "]", ":", ",", "str", "num", "lit", "word"
    value: Any = None
    complete: bool = True  # False for a string cut off by the end of the text


_NUMBER = re.compile(r"-?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")
_LITERALS = {
    "true": True,
    "false": False,
    "null": None,
    "True": True,
    "False": False,
    "None": None,
}
_QUOTES = {'"': '"', "'": "'", "\u201c": "\u201d", "\u2018": "\u2019"}
#: An unquoted word: letters of any script (the model may write in Spanish or Japanese).
_BARE_WORD = re.compile(r"[^\W\d][\w\-]*")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "/": "/"}


def _tokens(text: str) -> list[_Token]:
    """JSON-ish tokens of ``text``; stops at the first character that cannot start one."""
    out: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch.isspace():
            i += 1
        elif ch in "{}[]:,":
            out.append(_Token(ch))
            i += 1
        elif ch in _QUOTES:
            close = _QUOTES[ch]
            i += 1
            chars: list[str] = []
            complete = False
            while i < n:
                c = text[i]
                if c == "\\" and i + 1 < n:
                    nxt = text[i + 1]
                    if nxt == "u" and re.fullmatch(r"[0-9a-fA-F]{4}", text[i + 2 : i + 6]):
                        chars.append(chr(int(text[i + 2 : i + 6], 16)))
                        i += 6
                        continue
                    chars.append(_ESCAPES.get(nxt, nxt))
                    i += 2
                    continue
                if c == close:
                    complete = True
                    i += 1
                    break
                chars.append(c)
                i += 1
            out.append(_Token("str", "".join(chars), complete))
        elif ch == "/" and text.startswith("//", i):
            end = text.find("\n", i)
            i = n if end < 0 else end + 1
        elif (ch.isdigit() or ch in "-.") and (match := _NUMBER.match(text, i)):
            literal = match.group(0)
            try:
                out.append(_Token("num", json.loads(literal)))
            except ValueError:
                try:
                    out.append(_Token("num", float(literal)))
                except ValueError:  # digits of another script, a lone "-"
                    out.append(_Token("word", literal))
            i = match.end()
        elif match := _BARE_WORD.match(text, i):
            word = match.group(0)
            out.append(
                _Token("lit", _LITERALS[word]) if word in _LITERALS else _Token("word", word)
            )
            i = match.end()
        else:
            break
    return out


class _Truncated(Exception):
    """The tokens ran out inside a value."""


class _Parser:
    """Recursive descent over :func:`_tokens`, forgiving commas and a cut-off end."""

    def __init__(self, tokens: list[_Token]) -> None:
        self.tokens = tokens
        self.pos = 0
        self.truncated = False

    @property
    def looks_like_json(self) -> bool:
        """True when what was read has a ``key:`` pair or a quoted string.

        "[PROMPT]" or "{broken}" in prose are brackets, not JSON.
        """
        read = self.tokens[: self.pos]
        return any(t.kind == ":" for t in read) or any(t.kind == "str" for t in read)

    def peek(self) -> _Token | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self) -> _Token:
        token = self.peek()
        if token is None:
            raise _Truncated
        self.pos += 1
        return token

    def value(self) -> Any:
        token = self.take()
        if token.kind == "{":
            return self.obj()
        if token.kind == "[":
            return self.arr()
        if token.kind == "str":
            if not token.complete:
                raise _Truncated
            return token.value
        if token.kind in ("num", "lit"):
            return token.value
        if token.kind == "word":
            # An unquoted word as a value: keep following words on the same footing.
            words = [token.value]
            while (nxt := self.peek()) is not None and nxt.kind == "word":
                words.append(self.take().value)
            return " ".join(words)
        raise ValueError(f"unexpected {token.kind!r}")

    def obj(self) -> dict[str, Any]:
        result: dict[str, Any] = {}
        while True:
            token = self.peek()
            if token is None:
                self.truncated = True
                return result
            if token.kind == "}":
                self.pos += 1
                return result
            if token.kind == ",":
                self.pos += 1
                continue
            if token.kind not in ("str", "word"):
                raise ValueError(f"expected a key, found {token.kind!r}")
            self.pos += 1
            if not token.complete:
                self.truncated = True
                return result
            colon = self.peek()
            if colon is None:
                self.truncated = True
                return result
            if colon.kind != ":":
                raise ValueError("expected ':' after a key")
            self.pos += 1
            try:
                result[str(token.value)] = self.value()
            except _Truncated:
                # The last pair was cut off: keep the pairs before it.
                self.truncated = True
                return result

    def arr(self) -> list[Any]:
        result: list[Any] = []
        while True:
            token = self.peek()
            if token is None:
                self.truncated = True
                return result
            if token.kind == "]":
                self.pos += 1
                return result
            if token.kind == ",":
                self.pos += 1
                continue
            try:
                item = self.value()
            except _Truncated:
                self.truncated = True
                return result
            if self.truncated:
                # The item itself was cut off inside: keep what it had, then stop.
                result.append(item)
                return result
            result.append(item)


@dataclass(frozen=True)
class LenientJSON:
    """A JSON value read leniently; ``truncated`` when the text ended inside it."""

    value: Any
    truncated: bool = False
    repaired: bool = False


_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n?(.*?)(?:```|\Z)", re.DOTALL)


#: At most this many places are tried as the start of a JSON value: each try reads the
#: rest of the text, so a degenerate answer ("[[[[...") would otherwise cost its length squared.
_MAX_CANDIDATES = 64


def _json_candidates(text: str) -> Iterable[str]:
    """Places in ``text`` a JSON value may start: fenced blocks, then each { or [."""
    tried = 0
    for match in _FENCE.finditer(text):
        body = match.group(2).strip()
        if body[:1] in "{[":
            tried += 1
            yield body
    for match in re.finditer(r"[{\[]", text):
        if tried >= _MAX_CANDIDATES:
            return
        tried += 1
        yield text[match.start() :]


def loads_lenient(text: str) -> LenientJSON:
    """The first JSON object or array in ``text``, repaired where it can be.

    Raises :class:`UnusableAnswer` when ``text`` holds no JSON value at all.
    """
    stripped = text.strip()
    try:
        value = json.loads(stripped)
        if isinstance(value, dict | list):
            return LenientJSON(value)
    except (ValueError, RecursionError):
        pass
    for candidate in _json_candidates(stripped):
        try:
            value = json.loads(candidate)
            return LenientJSON(value, repaired=candidate != stripped)
        except (ValueError, RecursionError):
            pass
        parser = _Parser(_tokens(candidate))
        try:
            value = parser.value()
        except (ValueError, _Truncated, RecursionError):
            continue
        if isinstance(value, dict | list) and value and parser.looks_like_json:
            # The first value that reads is the answer; later braces are inside it.
            return LenientJSON(value, truncated=parser.truncated, repaired=True)
    raise UnusableAnswer("the answer holds no JSON object")


# --- Labels, lists and delimiters ------------------------------------------------------------


def field_key(name: str) -> str:
    """A label or JSON key as lower-case letters only ("Image prompt" -> "imageprompt")."""
    return re.sub(r"[^a-z]", "", name.casefold())


#: "Image prompt:", "Narration -", "**Visual**:" ... at the start of a line or segment.
_FIELD_LABEL = re.compile(
    r"^[\s>*_#-]*(?P<label>image[ _-]?prompt|visual[ _-]?prompt|prompt|visual|image|picture|"
    r"illustration|art|narration|narrator|voice[ _-]?over|vo|text|caption|description)"
    r"[\s*_]*(?:[:=\-–—]|\)|\])[\s*_]*(?P<value>.*)$",
    re.IGNORECASE,
)
_SCENE_LABEL = re.compile(
    r"^[\s>*_#-]*(?:scene|shot|panel|frame|page|part)\s*#?\s*(?P<number>\d+)\b[\s*_]*"
    r"(?:[:.)\-–—]+)?[\s*_]*(?P<rest>.*)$",
    re.IGNORECASE,
)
_LIST_ITEM = re.compile(r"^\s*(?:(?P<number>\d+)[.)]|[-*•+])\s+(?P<rest>.+)$")
_TITLE_LINE = re.compile(
    r"^[\s>*_#-]*title[\s*_]*[:\-–—][\s*_]*(?P<title>.+?)[\s*_]*$", re.IGNORECASE
)
_HEADING = re.compile(r"^\s*#{1,3}\s+(?P<title>.+?)\s*#*\s*$")
_CAST_HEADING = re.compile(
    r"^[\s>*_#-]*(?:characters|cast|character sheet)[\s*_]*:?[\s*_]*(?P<rest>.*)$",
    re.IGNORECASE,
)
#: Image prompts wrapped in delimiters: <<...>>, [PROMPT]...[/PROMPT], <prompt>...</prompt>.
_DELIMITED = re.compile(
    r"<<\s*(?P<a>.+?)\s*>>|\[(?:image[ _]?)?prompt\]\s*(?P<b>.+?)\s*\[/(?:image[ _]?)?prompt\]"
    r"|<(?:image[ _]?)?prompt>\s*(?P<c>.+?)\s*</(?:image[ _]?)?prompt>",
    re.IGNORECASE | re.DOTALL,
)
_PROMPT_LABELS = {"imageprompt", "visualprompt", "prompt", "visual", "image", "picture"}
_PROMPT_LABELS |= {"illustration", "art"}


def labeled_fields(text: str) -> dict[str, str]:
    """``Label: value`` pairs in ``text`` (lines, or segments split by `` / `` or `` | ``).

    Keys are lower-case letters only ("Image prompt" -> "imageprompt"). Used for
    step answers written as labels instead of JSON.
    """
    fields: dict[str, str] = {}
    for segment in _segments(text):
        match = re.match(
            r"^[\s>*_#-]*(?P<label>[A-Za-z][A-Za-z _-]{0,30}?)[\s*_]*[:=][\s*_]*(?P<value>.+)$",
            segment,
        )
        if match:
            fields.setdefault(field_key(match.group("label")), clean(match.group("value")))
    return fields


def _segments(text: str) -> list[str]:
    parts: list[str] = []
    for line in text.splitlines():
        parts += [p for p in re.split(r"\s+(?:/|\|)\s+", line) if p.strip()]
    return parts


def clean(text: str) -> str:
    """Markdown emphasis, wrapping quotes and surrounding punctuation removed."""
    text = re.sub(r"[*_`]{1,3}", "", text)
    text = " ".join(text.split())
    text = text.strip(" -–—:;,")
    if len(text) >= 2 and text[0] in "\"'“‘" and text[-1] in "\"'”’":
        text = text[1:-1].strip()
    return text


# --- Sentences ---------------------------------------------------------------------------------

_ABBREVIATIONS = ("Mr", "Mrs", "Ms", "Dr", "St", "Mt", "Jr", "Sr", "Prof", "e.g", "i.e", "vs")
# A sentence ends at . ! ? … before a capital (Latin, accented, or an opening «¿¡), or at
# the CJK full stops, which need no space after them.
_SENTENCE_END = re.compile(
    r"(?<=[.!?…])[\"'”’»)\]]*\s+(?=[\"'“‘«¿¡(\[]?[A-Z0-9À-ÖØ-Þ])|(?<=[。！？])[」』”’)]*\s*"
)
_CLAUSE_BREAK = re.compile(r"(?:;|,\s+(?:and|but|so|then|while|until|when)\b|\s+and then\b)")


def split_sentences(text: str) -> list[str]:
    """Sentences of ``text``, in order (abbreviations like "Mr." do not end one)."""
    text = " ".join(text.split())
    if not text:
        return []
    sentences: list[str] = []
    start = 0
    for match in _SENTENCE_END.finditer(text):
        piece = text[start : match.start()].rstrip()
        last_word = piece.rsplit(" ", 1)[-1].rstrip(".")
        if last_word in _ABBREVIATIONS or re.fullmatch(r"[A-Z]", last_word):
            continue
        sentences.append(text[start : match.end()].strip())
        start = match.end()
    sentences.append(text[start:].strip())
    # A sentence has letters, of any script.
    return [s for s in sentences if re.search(r"[^\W\d_]", s)]


def ends_a_sentence(text: str) -> bool:
    """True when ``text`` ends with sentence punctuation (it was not cut off mid-way)."""
    return bool(re.search(r"[.!?…。！？][\"'”’»」』)\]]*\s*$", text))


def split_clauses(sentences: Sequence[str], wanted: int, min_words: int = 3) -> list[str]:
    """Split the longest sentences at clause breaks until there are ``wanted`` pieces."""
    pieces = list(sentences)
    while len(pieces) < wanted:
        order = sorted(range(len(pieces)), key=lambda i: -len(pieces[i]))
        for i in order:
            halves = _split_once(pieces[i], min_words)
            if halves:
                pieces[i : i + 1] = halves
                break
        else:
            break
    return pieces


def _split_once(sentence: str, min_words: int) -> list[str] | None:
    best = None
    middle = len(sentence) / 2
    for match in _CLAUSE_BREAK.finditer(sentence):
        left = sentence[: match.start()].strip(" ,;")
        right = sentence[match.end() :].strip(" ,;")
        if len(left.split()) >= min_words and len(right.split()) >= min_words:
            distance = abs(match.start() - middle)
            if best is None or distance < best[0]:
                best = (distance, left, right)
    if best is None:
        return None
    _, left, right = best
    if not ends_a_sentence(left):
        left += "."
    return [left, right[0].upper() + right[1:]]


#: What a chat model says around its answer ("Sure! Here is your story:", "I hope you like it!").
_CHATTER = re.compile(
    r"^\W*(?:sure|certainly|of course|okay|ok|absolutely|great|here is|here's|here are|"
    r"below is|i hope|i've written|i have written|let me know|feel free|enjoy|hope you|"
    r"happy reading|would you like|do you want|if you'd like|if you would like)\b",
    re.IGNORECASE,
)


def trim_chatter(sentences: Sequence[str]) -> list[str]:
    """``sentences`` without the model's remarks before and after the story itself."""
    kept = list(sentences)
    while kept and (_CHATTER.match(kept[0]) or kept[0].rstrip().endswith(":")):
        kept.pop(0)
    while kept and _CHATTER.match(kept[-1]):
        kept.pop()
    return kept


def story_sentences(text: str) -> list[str]:
    """The sentences of a prose answer, without list markers, labels, markdown or chatter."""
    lines = []
    for line in text.splitlines():
        line = _LIST_ITEM.sub(r"\g<rest>", line)
        scene = _SCENE_LABEL.match(line)
        if scene:
            line = scene.group("rest")
        if _TITLE_LINE.match(line) or _HEADING.match(line):
            continue
        if not lines and line.rstrip().endswith(":"):
            continue  # "Here is a short story:"
        lines.append(clean(line))
    return trim_chatter(split_sentences(" ".join(lines)))


# --- Text shapes: scene labels, lists and delimited prompts ---------------------------------


@dataclass
class RawScene:
    """A scene as read, before it is checked: either text may be empty."""

    narration: str = ""
    prompt: str = ""
    characters: list[str] | None = None


@dataclass
class RawBoard:
    """A storyboard as read, before it is checked (characters as (name, appearance))."""

    title: str = ""
    logline: str = ""
    characters: list[tuple[str, str]] = field(default_factory=list)
    scenes: list[RawScene] = field(default_factory=list)
    degraded: bool = False


def character_from_text(text: str) -> tuple[str, str] | None:
    """(name, appearance) from "Name: looks", "Name (looks)" or "Name, looks"; else (text, "")."""
    match = re.match(
        r"^\s*(?P<name>[A-Z][\w' -]{0,40}?)\s*(?:[:\-–—]\s+|\((?P<paren>[^)]+)\)|,\s+)"
        r"(?P<rest>.*)$",
        text,
    )
    if match:
        appearance = match.group("paren") or match.group("rest")
        return clean(match.group("name")), clean(appearance)
    return (clean(text), "") if clean(text) else None


def block_scene(text: str) -> RawScene:
    """One scene's text: delimited or labeled prompt, labeled or plain narration."""
    scene = RawScene()
    delimited = [next(g for g in m.groups() if g) for m in _DELIMITED.finditer(text)]
    if delimited:
        scene.prompt = clean(" ".join(delimited))
        text = _DELIMITED.sub(" ", text)
    narration: list[str] = []
    for segment in _segments(text):
        match = _FIELD_LABEL.match(segment)
        if match:
            label, value = field_key(match.group("label")), clean(match.group("value"))
            if label in _PROMPT_LABELS:
                scene.prompt = scene.prompt or value
            else:
                narration.append(value)
        elif clean(segment):
            narration.append(clean(segment))
    scene.narration = clean(" ".join(narration))
    return scene


def board_from_text(text: str) -> RawBoard | None:
    lines = text.splitlines()
    board = RawBoard()
    blocks: list[list[str]] = []
    in_cast = False
    mode = None  # "scene" or "list"
    for line in lines:
        if not line.strip():
            in_cast = False if mode is None and board.characters else in_cast
            continue
        title = _TITLE_LINE.match(line)
        if title and not board.title:
            board.title = clean(title.group("title"))
            continue
        heading = _HEADING.match(line)
        if (
            heading
            and not board.title
            and not _SCENE_LABEL.match(heading.group("title"))
            and not _CAST_HEADING.match(heading.group("title"))
        ):
            board.title = clean(heading.group("title"))
            continue
        cast = _CAST_HEADING.match(line)
        if cast and not _SCENE_LABEL.match(line):
            in_cast = True
            rest = cast.group("rest")
            if rest:
                for part in re.split(r";|,\s+(?=[A-Z][a-z]+\s*[(:\-–—])", rest):
                    character = character_from_text(clean(part))
                    if character:
                        board.characters.append(character)
            continue
        scene = _SCENE_LABEL.match(line)
        item = _LIST_ITEM.match(line)
        if scene:
            in_cast = False
            mode = "scene"
            blocks.append([scene.group("rest")])
            continue
        if in_cast and item:
            character = character_from_text(clean(item.group("rest")))
            if character:
                board.characters.append(character)
            continue
        if item and mode != "scene" and not _is_prompt_label(item.group("rest")):
            mode = "list"
            blocks.append([item.group("rest")])
            continue
        if in_cast:
            in_cast = False
        if blocks:
            blocks[-1].append(line)
        elif _DELIMITED.search(line):
            blocks.append([line])
            mode = mode or "delimited"
    if mode == "delimited" or (not blocks and _DELIMITED.search(text)):
        blocks = [[piece] for piece in _split_at_delimiters(text)]
    board.scenes = [block_scene("\n".join(block)) for block in blocks]
    board.scenes = [s for s in board.scenes if s.narration or s.prompt]
    return board if board.scenes else None


def _is_prompt_label(text: str) -> bool:
    match = _FIELD_LABEL.match(text)
    return bool(match) and field_key(match.group("label")) in _PROMPT_LABELS


def title_of(text: str) -> str:
    """A "Title: ..." line or a markdown heading, if the text has one."""
    for line in text.splitlines():
        match = _TITLE_LINE.match(line) or _HEADING.match(line)
        if match and not _SCENE_LABEL.match(match.group("title")):
            return clean(match.group("title"))
    return ""


def _split_at_delimiters(text: str) -> list[str]:
    """Text with one delimited prompt per scene: each prompt closes its scene."""
    pieces, start = [], 0
    for match in _DELIMITED.finditer(text):
        pieces.append(text[start : match.end()])
        start = match.end()
    tail = clean(text[start:])
    if tail and pieces:
        pieces[-1] += " " + tail
    return [p for p in pieces if clean(_DELIMITED.sub(" ", p)) or _DELIMITED.search(p)]


def prose(text: str) -> str:
    """The prose of an answer: no code fences, JSON punctuation, labels or markdown."""
    text = _FENCE.sub(lambda m: m.group(2), text)
    text = _DELIMITED.sub(lambda m: next(g for g in m.groups() if g) + ".", text)
    kept: list[str] = []
    for line in text.splitlines():
        if _TITLE_LINE.match(line) or _HEADING.match(line) or _CAST_HEADING.match(line):
            continue
        if not any(kept) and line.rstrip().endswith(":"):
            continue  # "Sure! Here is your story:"
        field_match = _FIELD_LABEL.match(line)
        if field_match and field_key(field_match.group("label")) in _PROMPT_LABELS:
            continue
        if field_match:
            line = field_match.group("value")
        line = re.sub(r'^\s*[{}\[\],]+\s*|\s*[{}\[\],]+\s*$|"\w+"\s*:\s*', " ", line)
        kept.append(clean(line.replace('"', " ")))
    return " ".join(kept)


# --- Step answers ----------------------------------------------------------------------------


def mentioned(text: str, names: Sequence[str]) -> list[str]:
    """The ``names`` that ``text`` mentions as whole words (any case), in cast order."""
    return [
        name
        for name in names
        if re.search(rf"(?<![\w-]){re.escape(name)}(?![\w-])", text, re.IGNORECASE)
    ]


def structured_scenes(text: str) -> list[str] | None:
    """The parts of a prose answer written as "Scene 1: ..." labels or a numbered list.

    Each part's narration (or, lacking one, its prompt); None when the answer has
    no such structure.
    """
    board = board_from_text(text)
    if board is None:
        return None
    parts = [s.narration or s.prompt for s in board.scenes]
    return parts if all(parts) else None


def read_object(text: str) -> dict[str, Any]:
    """A step answer as a flat object: JSON read leniently, else ``Label: value`` lines.

    A "Characters:" section of ``- Name: appearance`` lines becomes a list of
    ``{"name", "appearance"}``. Raises :class:`UnusableAnswer` when neither is found.
    """
    if not text or not text.strip():
        raise UnusableAnswer("the answer is empty")
    try:
        found = loads_lenient(text)
        value = found.value
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if isinstance(value, dict) and value:
            if found.truncated:
                raise UnusableAnswer("the answer is not complete JSON (it was cut off; be shorter)")
            return value
    except UnusableAnswer as exc:
        if "cut off" in str(exc):
            raise
    fields: dict[str, Any] = dict(labeled_fields(text))
    characters: list[dict[str, str]] = []
    in_cast = False
    for line in text.splitlines():
        cast = _CAST_HEADING.match(line)
        if cast and not cast.group("rest").strip():
            in_cast = True
            continue
        item = _LIST_ITEM.match(line)
        if in_cast and item:
            character = character_from_text(clean(item.group("rest")))
            if character:
                characters.append({"name": character[0], "appearance": character[1]})
            continue
        in_cast = False
    if characters:
        fields["characters"] = characters
    if not fields:
        raise UnusableAnswer("the answer holds neither JSON nor labelled fields")
    return fields
