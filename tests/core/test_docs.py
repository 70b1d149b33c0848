"""The docs tell the truth about settings.

Every settings table in the docs (a GitHub Markdown table with a ``setting`` or
``variable`` column) names real settings, states their real defaults, and each
service's README lists every setting of its class. Every ``STORYREEL_*`` variable
that a doc, a manifest, a Dockerfile or a contract mentions is a setting of the
class with that prefix, or one of the few variables read elsewhere (listed below).

How a table names settings, in the name column, each name in backticks:

* a variable, ``STORYREEL_GATEWAY_LEASE_S``; ``STORYREEL_<SERVICE>_HOST`` for what
  every service has (:class:`ServiceSettings`);
* the same prefix again, shortened: ``..._CLAIM_JITTER`` or ``_CLAIM_JITTER`` after
  a full name in the same cell;
* a field of the README's own service, as the field (``lease_s``) or its variable's
  tail (``LEASE_S``).

A row with several names gives one default for each (``1280, 720`` or ``8 / 64``)
or one for all. A default is read as the setting's type: a number (``4 MiB``,
``40 M``), ``true``/``false``, text (in backticks or not; ending in ``...``, a
prefix), a JSON list or object, and ``empty`` or ``unset`` for an empty or unset
one; what follows the value in parentheses or after a colon is comment. Only a
path or a mapping may be described in words instead (``the packaged DejaVu Sans
Bold``, ``five presets``); those are not compared.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydantic import SecretStr
from pydantic_settings import BaseSettings
from storyreel_composer.settings import ComposerSettings
from storyreel_diffusion.settings import DiffusionSettings
from storyreel_gateway.settings import GatewaySettings
from storyreel_llm.settings import LLMSettings

from storyreel.settings import InternalSettings, ServiceSettings, StorageSettings

REPO = Path(__file__).resolve().parents[2]

#: The class behind each variable prefix: STORYREEL_<PREFIX>_<FIELD>.
PREFIXES: dict[str, type[BaseSettings]] = {
    "GATEWAY": GatewaySettings,
    "LLM": LLMSettings,
    "DIFFUSION": DiffusionSettings,
    "COMPOSER": ComposerSettings,
    "STORAGE": StorageSettings,
    "INTERNAL": InternalSettings,
    "<SERVICE>": ServiceSettings,
}
SERVICES = (GatewaySettings, LLMSettings, DiffusionSettings, ComposerSettings)

#: The docs searched for settings tables and variables.
DOCS = sorted(
    {
        REPO / "README.md",
        *REPO.glob("docs/*.md"),
        *REPO.glob("services/*/README.md"),
        REPO / "gateway" / "README.md",
        REPO / "deploy" / "README.md",
    }
)

#: The README that lists every setting of each class. A service's README holds the
#: fields its own class declares; the root README those that every service shares.
HOMES: dict[str, tuple[type[BaseSettings], ...]] = {
    "services/llm/README.md": (LLMSettings,),
    "services/diffusion/README.md": (DiffusionSettings,),
    "services/composer/README.md": (ComposerSettings,),
    "gateway/README.md": (GatewaySettings,),
    "README.md": (ServiceSettings, StorageSettings, InternalSettings),
}

#: Fields that need no row in their README, each with the reason. Keep it short.
UNLISTED: dict[tuple[type[BaseSettings], str], str] = {}

#: STORYREEL_* variables that are not settings, and the file that reads each. The
#: file must still name it: an entry outlives its variable by no more than a test run.
NOT_SETTINGS: dict[str, str] = {
    "STORYREEL_API_KEY": "src/storyreel/cli.py",  # the CLI's API key
    "STORYREEL_GATEWAY": "src/storyreel/cli.py",  # the CLI's gateway address
    "STORYREEL_HOME": "src/storyreel/cli.py",  # the CLI's data folder
    "STORYREEL_LLM": "src/storyreel/cli.py",  # the CLI's LLM service address (--address)
    "STORYREEL_GATEWAY_BIND": "deploy/compose.yaml",  # where Compose publishes the port
    "STORYREEL_LLAMACPP_VENV": "tests/llm/llamacpp_server.py",  # the test server's venv
    "STORYREEL_CHROMIUM": "tests/web/test_studio.py",  # the browser tests' Chromium
}

#: Defaults that may be stated as "empty" or "unset".
EMPTY_WORDS = {"empty", "unset"}
UNITS = {"k": 1e3, "M": 1e6, "G": 1e9, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30}


def rel(path: Path) -> str:
    return path.relative_to(REPO).as_posix()


# --- reading the tables -------------------------------------------------------------------


def cells(line: str) -> list[str]:
    """The cells of a table row. As on GitHub, only ``\\|`` is a pipe inside a cell."""
    inner = line.strip().removeprefix("|").removesuffix("|")
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def tables(text: str) -> list[list[tuple[int, list[str]]]]:
    """Every table outside code fences: its rows as (line number, cells), header first."""
    found: list[list[tuple[int, list[str]]]] = []
    block: list[tuple[int, list[str]]] = []
    fenced = False
    for number, line in enumerate([*text.splitlines(), ""], start=1):
        if line.lstrip().startswith(("```", "~~~")):
            fenced = not fenced
        if not fenced and line.lstrip().startswith("|"):
            block.append((number, cells(line)))
            continue
        # A table is a header, a delimiter row (--- cells) and its body.
        if len(block) >= 2 and all(re.fullmatch(r":?-+:?", c) for c in block[1][1]):
            found.append([block[0], *block[2:]])
        block = []
    return found


@dataclass(frozen=True)
class Mention:
    """One setting named in a settings table."""

    where: str  # doc:line
    written: str  # as the table writes it
    cls: type[BaseSettings] | None  # None: a prefix no settings class has
    field: str
    default: str | None  # the default the table states, if it states one
    problem: str | None = None  # why what is written is no setting name at all


def resolve(written: str, previous_prefix: str | None, own: str | None) -> tuple[str, str]:
    """(prefix, field) of a name as a table writes it; ValueError if it is not a name."""
    if written.startswith("STORYREEL_"):
        rest = written.removeprefix("STORYREEL_")
        for prefix in PREFIXES:
            if rest.startswith(prefix + "_"):
                return prefix, rest[len(prefix) + 1 :].lower()
        prefix, _, field = rest.partition("_")
        return prefix, field.lower()
    if written.startswith(("..._", "_")):
        if previous_prefix is None:
            raise ValueError(f"{written!r} shortens no full name before it in the cell")
        return previous_prefix, written.lstrip("._").lower()
    if re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", written):
        if own is None:
            raise ValueError(f"{written!r}: this doc has no service of its own; write the variable")
        return own, written.lower()
    raise ValueError(f"{written!r} is not a setting name")


def split_defaults(cell: str, count: int) -> list[str | None]:
    """The default cell as one statement per name (see the module docstring)."""
    if cell in ("", "-", "—"):
        return [None] * count
    # Separators outside code spans and parentheses.
    parts, depth, code, start = [], 0, False, 0
    for i, char in enumerate(cell):
        code ^= char == "`"
        depth += (char == "(") - (char == ")") if not code else 0
        if not code and depth == 0 and cell.startswith((", ", " / "), i):
            parts.append(cell[start:i])
            start = i + 2 if cell[i] == "," else i + 3
    parts.append(cell[start:])
    parts = [p.strip() for p in parts]
    if count > 1 and len(parts) == count:
        return list(parts)
    return [cell] * count  # one statement for every name of the row


def mentions(doc: str, text: str) -> list[Mention]:
    """Every setting named in the settings tables of ``text``, the doc at ``doc``."""
    own_classes = HOMES.get(doc, ())
    own = next((p for p, c in PREFIXES.items() if own_classes == (c,)), None)
    found = []
    for table in tables(text):
        (_, header), *body = table
        header = [h.lower() for h in header]
        column = next((i for i, h in enumerate(header) if h in ("setting", "variable")), None)
        if column is None:
            continue
        default_column = header.index("default") if "default" in header else None
        for number, row in body:
            where = f"{doc}:{number}"
            names = re.findall(r"`([^`]+)`", row[column])
            if not names:
                found.append(Mention(where, row[column], None, "", None, "no `name` in the row"))
            defaults = (
                split_defaults(row[default_column], len(names))
                if default_column is not None
                else [None] * len(names)
            )
            prefix = None
            for written, default in zip(names, defaults, strict=True):
                try:
                    prefix, field = resolve(written, prefix, own)
                except ValueError as exc:
                    found.append(Mention(where, written, None, "", None, str(exc)))
                    continue
                found.append(Mention(where, written, PREFIXES.get(prefix), field, default))
    return found


# --- comparing defaults -------------------------------------------------------------------


def actual_default(cls: type[BaseSettings], field: str) -> object:
    value = cls.model_fields[field].get_default(call_default_factory=True)
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def value_of(statement: str) -> str:
    """The value a default cell states, without what it adds in words after it."""
    statement = statement.strip()
    if statement.startswith("`"):
        return statement.split("`")[1]
    return re.split(r" \(|: |; ", statement, maxsplit=1)[0].strip()


def number(text: str) -> float | None:
    match = re.fullmatch(r"([-+]?\d+(?:\.\d+)?)\s*([A-Za-z]+)?", text)
    if not match or (match[2] and match[2] not in UNITS):
        return None
    return float(match[1]) * UNITS.get(match[2] or "", 1)


def agrees(statement: str, actual: object) -> bool | None:
    """Whether the stated default is ``actual``; None where the table says it in words."""
    text = value_of(statement).replace("$PWD", str(Path.cwd()))
    if text.lower() in EMPTY_WORDS:
        return actual in (None, "", [], {})
    if isinstance(actual, bool):
        return text.lower() == str(actual).lower()
    if isinstance(actual, int | float):
        stated = number(text)
        return stated is not None and math.isclose(stated, actual)
    if isinstance(actual, str):
        if text.endswith("..."):
            return actual.startswith(text.removesuffix("..."))
        return text == actual
    if isinstance(actual, list | dict) and text[:1] in ("[", "{"):
        return json.loads(text) == json.loads(json.dumps(actual, default=str))
    if actual is None:
        return False  # nothing but "empty" or "unset" says None
    return None  # a path or a mapping described in words


# --- the tests ----------------------------------------------------------------------------


ALL_MENTIONS = [m for doc in DOCS for m in mentions(rel(doc), doc.read_text())]


def test_the_docs_have_settings_tables_to_check():
    tabled = {m.where.split(":")[0] for m in ALL_MENTIONS}
    assert set(HOMES) <= tabled, f"no settings table in {sorted(set(HOMES) - tabled)}"


@pytest.mark.parametrize("mention", ALL_MENTIONS, ids=lambda m: f"{m.where} {m.written}")
def test_a_tabled_name_is_a_setting(mention: Mention):
    assert mention.problem is None, f"{mention.where}: {mention.problem}"
    assert mention.cls is not None, f"{mention.where}: {mention.written}: no such settings class"
    assert mention.field in mention.cls.model_fields, (
        f"{mention.where}: {mention.written} is not a setting of {mention.cls.__name__}"
    )


@pytest.mark.parametrize(
    "mention",
    [m for m in ALL_MENTIONS if m.default is not None],
    ids=lambda m: f"{m.where} {m.written}",
)
def test_a_tabled_default_is_the_real_one(mention: Mention):
    if mention.cls is None or mention.field not in mention.cls.model_fields:
        pytest.skip("not a setting (test_a_tabled_name_is_a_setting says so)")
    actual = actual_default(mention.cls, mention.field)
    assert agrees(mention.default, actual) is not False, (
        f"{mention.where}: {mention.written} is said to default to {mention.default!r}; "
        f"{mention.cls.__name__}.{mention.field} defaults to {actual!r}"
    )


def must_list(cls: type[BaseSettings]) -> set[str]:
    """The fields of ``cls`` that its home README lists."""
    if cls is ServiceSettings:
        # Those a service redeclares (its port) are in that service's README.
        redeclared = set.intersection(*(set(own_fields(s)) for s in SERVICES))
        return set(cls.model_fields) - redeclared
    return set(own_fields(cls))


def own_fields(cls: type[BaseSettings]) -> list[str]:
    """The fields declared in the class itself, not only inherited."""
    if cls in SERVICES:
        return [f for f in cls.model_fields if f in vars(cls).get("__annotations__", {})]
    return list(cls.model_fields)


@pytest.mark.parametrize(
    ("doc", "cls"),
    [(doc, cls) for doc, classes in HOMES.items() for cls in classes],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_a_readme_lists_every_setting_of_its_class(doc: str, cls: type[BaseSettings]):
    unlisted = unlisted_in(doc, cls, ALL_MENTIONS)
    assert not unlisted, f"{doc} has no row for {cls.__name__}: {sorted(unlisted)}"


def unlisted_in(doc: str, cls: type[BaseSettings], found: list[Mention]) -> set[str]:
    """The fields of ``cls`` that ``doc`` must list and does not."""
    listed = {m.field for m in found if m.where.startswith(doc + ":") and m.cls is cls}
    return must_list(cls) - listed - {f for c, f in UNLISTED if c is cls}


def test_the_unlisted_are_settings():
    for cls, field in UNLISTED:
        assert field in cls.model_fields, f"UNLISTED names {cls.__name__}.{field}: no such setting"


# --- variables anywhere -------------------------------------------------------------------

#: A variable, or a family of them (STORYREEL_GATEWAY_TLS_*). A bare prefix
#: (STORYREEL_LLM_) and a placeholder (STORYREEL_<SERVICE>_HOST) are not variables.
VARIABLE = re.compile(r"STORYREEL_[A-Z0-9_]*[A-Z0-9](_\*)?(?![A-Za-z0-9_<])")


def variable_files() -> list[Path]:
    """Docs, manifests, Dockerfiles, the Makefile and the contracts."""
    return sorted(
        {
            *DOCS,
            *REPO.glob("deploy/**/*.yaml"),
            *REPO.glob("deploy/**/*.yml"),
            *REPO.glob("deploy/**/*Dockerfile"),
            *REPO.glob("protos/**/*.proto"),
            REPO / "Makefile",
        }
    )


def variables() -> list[tuple[str, str, bool]]:
    """(file:line, name, whether it is a family: NAME_*) of each STORYREEL_* variable."""
    found = []
    for path in variable_files():
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for match in VARIABLE.finditer(line):
                name = match[0].removesuffix("_*")
                found.append((f"{rel(path)}:{number}", name, bool(match[1])))
    return found


@pytest.mark.parametrize(
    ("where", "name", "family"), variables(), ids=lambda v: v if isinstance(v, str) else ""
)
def test_a_variable_in_the_docs_is_a_setting(where: str, name: str, family: bool):
    if name in NOT_SETTINGS:
        return
    prefix, field = resolve(name, None, None)
    cls = PREFIXES.get(prefix)
    assert cls is not None and (field or family), (
        f"{where}: {name} is no setting (no class reads STORYREEL_{prefix}_); if something "
        "else reads it, add it to NOT_SETTINGS"
    )
    if family:  # STORYREEL_GATEWAY_TLS_*: some setting must start so
        start = f"{field}_" if field else ""
        assert any(f.startswith(start) for f in cls.model_fields), f"{where}: no {name}_*"
    else:
        assert field in cls.model_fields, f"{where}: {name} is not a setting of {cls.__name__}"


@pytest.mark.parametrize(("name", "reader"), sorted(NOT_SETTINGS.items()))
def test_a_variable_that_is_no_setting_is_still_read(name: str, reader: str):
    assert name in (REPO / reader).read_text(), f"{reader} no longer reads {name}"


def test_the_checks_can_fail():
    """A stale name, a wrong default and a missing row are all found."""
    readme = (
        "| setting | default | meaning |\n"
        "| --- | --- | --- |\n"
        "| `STORYREEL_GATEWAY_STORY_ADDRESS` | `127.0.0.1:50051` | stale |\n"
        "| `lease_s`, `claim_poll_s` | 20, 1 | one default wrong |\n"
        "```\n| `inside_a_fence` | 1 | not a table |\n```\n"
    )
    stale, lease, claim = mentions("gateway/README.md", readme)
    assert (stale.cls, stale.field) == (GatewaySettings, "story_address")
    assert stale.field not in GatewaySettings.model_fields
    assert agrees(lease.default, actual_default(GatewaySettings, "lease_s")) is False
    assert agrees(claim.default, actual_default(GatewaySettings, "claim_poll_s")) is True
    assert "llm_address" in unlisted_in("gateway/README.md", GatewaySettings, [lease, claim])
    (bare,) = mentions("docs/x.md", "| variable |\n| --- |\n| `lease_s` |\n")
    assert bare.problem  # a doc of no service must write the variable
    # The forms of a default.
    assert agrees("4 MiB", 4 * 1024 * 1024) and agrees("40 M", 40_000_000)
    assert agrees("unset (ffmpeg chooses)", None) and agrees("auto", None) is False
    assert agrees("`portrait of {name}, ...`", "portrait of {name}, facing")
    assert agrees("the packaged DejaVu Sans Bold", Path("/x.ttf")) is None
    assert split_defaults("`a, b`, 2 (x, y)", 2) == ["`a, b`", "2 (x, y)"]
    assert split_defaults("8 / 64", 2) == ["8", "64"]
    assert cells(r"| `a\|b` | c |") == ["`a|b`", "c"]
    # Variables in running text.
    assert not VARIABLE.search("STORYREEL_<SERVICE>_HOST `STORYREEL_LLM_`")
    assert [m[0] for m in VARIABLE.finditer("STORYREEL_GATEWAY_TLS_* STORYREEL_LLM_PORT.")] == [
        "STORYREEL_GATEWAY_TLS_*",
        "STORYREEL_LLM_PORT",
    ]
