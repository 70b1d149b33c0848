"""JSON schema to GBNF, for servers that take a ``grammar`` but no JSON schema.

llama.cpp's server and llama-cpp-python's take a GBNF grammar in a request's
``grammar`` field. This converter covers what the storyboard's step schemas use
(see :mod:`storyreel_llm.storyboard`): objects with fixed properties, strings
with a ``pattern`` or an ``enum``, arrays with ``minItems``/``maxItems``,
booleans, integers and null. Output is compact JSON (no whitespace between
tokens), keys in the order the schema lists them, every property present: a
small model then spends its token budget on the values.

A pattern becomes a grammar over its characters: character classes, literal
characters, groups, alternatives and bounded repetitions (``{m,n}``, ``?``).
Unbounded repetitions are refused: a grammar must stop the model by itself.
Every character outside ``[A-Za-z0-9 ]`` is written as a ``\\xHH`` escape, which
every GBNF parser reads.
"""

from __future__ import annotations

import json
import re
from typing import Any

try:  # Python 3.11+
    import re._constants as _c
    import re._parser as _sre
except ImportError:  # pragma: no cover - older Pythons
    import sre_constants as _c  # type: ignore[no-redef]
    import sre_parse as _sre  # type: ignore[no-redef]

#: Repetitions above this are unbounded as far as a grammar is concerned.
_UNBOUNDED = _c.MAXREPEAT
#: Characters a JSON string may hold unescaped, as code-point ranges (no quote, no backslash,
#: no control characters).
_JSON_CHAR = "[^\\x22\\x5C\\x00-\\x1F]"


class UnsupportedSchema(ValueError):
    """The schema (or one of its patterns) uses something this converter does not cover."""


def schema_to_gbnf(schema: dict[str, Any]) -> str:
    """A GBNF grammar whose ``root`` accepts exactly the compact JSON ``schema`` describes."""
    builder = _Grammar()
    root = builder.value(schema, "root")
    if root != "root":
        builder.rules["root"] = root
    lines = [f"root ::= {builder.rules.pop('root')}"]
    lines += [f"{name} ::= {body}" for name, body in builder.rules.items()]
    return "\n".join(lines) + "\n"


def _literal(text: str) -> str:
    """``text`` as a GBNF string literal."""
    out = []
    for ch in text:
        if ch.isascii() and (ch.isalnum() or ch == " "):
            out.append(ch)
        else:
            out.append(_escape(ord(ch)))
    return '"' + "".join(out) + '"'


def _escape(code: int) -> str:
    if code <= 0xFF:
        return f"\\x{code:02X}"
    if code <= 0xFFFF:
        return f"\\u{code:04X}"
    return f"\\U{code:08X}"


def _class_char(code: int) -> str:
    ch = chr(code)
    return ch if ch.isascii() and ch.isalnum() else _escape(code)


class _Grammar:
    def __init__(self) -> None:
        self.rules: dict[str, str] = {}
        self._count = 0

    def _rule(self, hint: str, body: str) -> str:
        self._count += 1
        name = f"{re.sub(r'[^a-z0-9]+', '-', hint.casefold()).strip('-') or 'r'}-{self._count}"
        self.rules[name] = body
        return name

    def value(self, schema: dict[str, Any], hint: str) -> str:
        """The name of a rule (or an inline expression) for ``schema``."""
        if "enum" in schema or "const" in schema:
            values = schema.get("enum", [schema.get("const")])
            alternatives = " | ".join(
                _literal(json.dumps(v, ensure_ascii=False, separators=(",", ":"))) for v in values
            )
            return self._rule(hint, alternatives)
        kind = schema.get("type")
        if kind == "object":
            return self._object(schema, hint)
        if kind == "array":
            return self._array(schema, hint)
        if kind == "string":
            return self._string(schema, hint)
        if kind == "boolean":
            return self._rule(hint, '"true" | "false"')
        if kind == "integer":
            return self._rule(hint, '"-"? [0-9]{1,15}')
        if kind == "null":
            return self._rule(hint, '"null"')
        raise UnsupportedSchema(f"{hint}: type {kind!r} is not supported")

    def _object(self, schema: dict[str, Any], hint: str) -> str:
        properties: dict[str, Any] = schema.get("properties", {})
        required = list(schema.get("required", []))
        if set(required) != set(properties):
            raise UnsupportedSchema(f"{hint}: every property must be required")
        parts = []
        for index, key in enumerate(required):
            value = self.value(properties[key], f"{hint}-{key}")
            comma = '"," ' if index else ""
            parts.append(f"{comma}{_literal(json.dumps(key) + ':')} {value}")
        return self._rule(hint, '"{" ' + " ".join(parts) + ' "}"')

    def _array(self, schema: dict[str, Any], hint: str) -> str:
        item = self.value(schema.get("items", {}), f"{hint}-item")
        low = int(schema.get("minItems", 0))
        high = schema.get("maxItems")
        if high is None:
            raise UnsupportedSchema(f"{hint}: an array needs maxItems")
        high = int(high)
        if high == 0:
            return self._rule(hint, '"[" "]"')
        more = f'("," {item}){{{max(low - 1, 0)},{high - 1}}}'
        body = f'"[" {item} {more} "]"' if low >= 1 else f'"[" ({item} {more})? "]"'
        return self._rule(hint, body)

    def _string(self, schema: dict[str, Any], hint: str) -> str:
        pattern = schema.get("pattern")
        if pattern is None:
            low = int(schema.get("minLength", 0))
            high = schema.get("maxLength")
            if high is None:
                raise UnsupportedSchema(f"{hint}: a string needs a pattern or maxLength")
            return self._rule(hint, f'"\\"" {_JSON_CHAR}{{{low},{int(high)}}} "\\""')
        body = _Pattern(hint).convert(pattern)
        return self._rule(hint, f'"\\"" {body} "\\""')


class _Pattern:
    """A regular expression (Python's syntax) as a GBNF expression over its characters."""

    def __init__(self, hint: str) -> None:
        self.hint = hint

    def convert(self, pattern: str) -> str:
        try:
            parsed = _sre.parse(pattern)
        except re.error as exc:
            raise UnsupportedSchema(f"{self.hint}: pattern does not compile: {exc}") from exc
        return self._sequence(list(parsed)) or '""'

    def _sequence(self, items: list[tuple[Any, Any]]) -> str:
        return " ".join(filter(None, (self._item(op, av) for op, av in items)))

    def _item(self, op: Any, av: Any) -> str:
        if op is _c.AT:
            return ""  # ^ and $: a JSON string value is anchored by its quotes
        if op is _c.LITERAL:
            self._check(av)
            return _literal(chr(av))
        if op is _c.IN:
            return self._class(av)
        if op is _c.SUBPATTERN:
            inner = self._sequence(list(av[-1]))
            return f"({inner})"
        if op is _c.BRANCH:
            alternatives = [self._sequence(list(branch)) for branch in av[1]]
            body = "(" + " | ".join(a for a in alternatives if a) + ")"
            # An empty alternative ("a|an" parses as "a" then "(|n)") makes the rest optional.
            return f"{body}?" if not all(alternatives) else body
        if op in (_c.MAX_REPEAT, _c.MIN_REPEAT, getattr(_c, "POSSESSIVE_REPEAT", None)):
            low, high, sub = av
            if high == _UNBOUNDED:
                raise UnsupportedSchema(
                    f"{self.hint}: unbounded repetition in a pattern; give it an upper bound"
                )
            inner = self._sequence(list(sub))
            if len(list(sub)) > 1 or " " in inner:
                inner = f"({inner})"
            if (low, high) == (0, 1):
                return f"{inner}?"
            if low == high:
                return f"{inner}{{{low}}}"
            return f"{inner}{{{low},{high}}}"
        raise UnsupportedSchema(f"{self.hint}: {op} in a pattern is not supported")

    def _check(self, code: int) -> None:
        if code in (0x22, 0x5C) or code < 0x20:
            raise UnsupportedSchema(
                f"{self.hint}: a pattern that admits quotes, backslashes or control characters "
                "needs JSON escapes, which this converter does not write"
            )

    def _class(self, items: list[tuple[Any, Any]]) -> str:
        parts: list[str] = []
        negate = False
        for op, av in items:
            if op is _c.NEGATE:
                negate = True
            elif op is _c.LITERAL:
                if not negate:
                    self._check(av)
                parts.append(_class_char(av))
            elif op is _c.RANGE:
                low, high = av
                if not negate and (low <= 0x5C <= high or low <= 0x22 <= high or low < 0x20):
                    self._check(0x5C if low <= 0x5C <= high else 0x22)
                parts.append(f"{_class_char(low)}-{_class_char(high)}")
            elif op is _c.CATEGORY and av is _c.CATEGORY_DIGIT:
                parts.append("0-9")
            else:
                raise UnsupportedSchema(f"{self.hint}: {op} {av} in a character class")
        if negate:
            # A JSON string never holds a bare quote, backslash or control character.
            parts += ["\\x22", "\\x5C", "\\x00-\\x1F"]
            return "[^" + "".join(parts) + "]"
        return "[" + "".join(parts) + "]"
