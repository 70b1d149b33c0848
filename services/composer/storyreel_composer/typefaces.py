"""Typefaces for captions: which installed font draws each character.

A caption is drawn by libass (ffmpeg's ``ass`` filter), which shapes each run
of text with HarfBuzz and lays out bidirectional text with FriBidi. What
libass does not decide well is *which* font draws a character the caption
font lacks: its fallback asks fontconfig, whose answer depends on the
machine. So the composer decides, in a fixed order, and tells libass by name
(``{\\fn...}`` override tags):

1. the caption font (``caption_font_path``, DejaVu Sans Bold by default:
   Latin, Greek, Cyrillic, Arabic, Hebrew and more);
2. ``caption_fallback_fonts``, in the order given;
3. every other font file under ``caption_font_dirs`` (``/usr/share/fonts`` and
   ``/usr/local/share/fonts`` by default, where Debian's ``fonts-noto-cjk``,
   ``fonts-symbola`` and ``fonts-noto-core`` put theirs), bold faces first,
   then sans-serif ones, then by file name; a file is read only when an
   earlier one lacks a character.

A character no font has is left out of the burned captions (it would be an
empty box) and reported (:meth:`FontChain.missing`); the SubRip and WebVTT
files keep it, as players draw those with the viewer's own fonts.

Only fonts libass can draw are used: outline fonts (TrueType or CFF), not
colour bitmap fonts such as Noto Color Emoji (libass draws no colour glyphs;
Symbola gives emoji in outline), and not variable fonts (libass draws only
their default instance).

CJK collections (Noto Sans CJK) hold one face per region that share their
characters but differ in glyph forms: text with kana takes the Japanese face,
text with Hangul the Korean one, other Han text the Simplified Chinese one.
"""

from __future__ import annotations

import logging
import threading
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cache, cached_property
from pathlib import Path

from fontTools.ttLib import TTCollection, TTFont
from PIL import ImageFont

log = logging.getLogger(__name__)

FONT_SUFFIXES = (".ttf", ".otf", ".ttc", ".otc")

# Characters drawn with the run they follow, whatever font has them: combining
# marks, joiners and variation selectors (they belong to the cluster before
# them), and format characters (bidi controls, soft hyphen), which have no ink.
_CLUSTER_CATEGORIES = frozenset({"Mn", "Mc", "Me", "Cf"})
_EMOJI_MODIFIERS = range(0x1F3FB, 0x1F400)

# CJK collection faces by the region suffix of their family name.
_REGION_SUFFIXES = ("SC", "TC", "HK", "JP", "KR")


@dataclass(frozen=True)
class Face:
    """One face of a font file: what libass calls it and what it draws."""

    path: Path
    index: int
    family: str
    style: str
    #: Units per em over the height libass gives a line (its size unit).
    em_per_size: float

    @cached_property
    def coverage(self) -> frozenset[int]:
        return _coverage(self.path, self.index)

    def font(self, em: float) -> ImageFont.FreeTypeFont:
        return _pil_font(self.path, self.index, max(1, round(em)))

    @property
    def region(self) -> str:
        suffix = self.family.rsplit(" ", 1)[-1]
        return suffix if suffix in _REGION_SUFFIXES else ""


@dataclass(frozen=True)
class Run:
    """Consecutive characters drawn by one face."""

    face: Face
    text: str


@cache
def _pil_font(path: Path, index: int, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(path), size, index=index)


@cache
def _coverage(path: Path, index: int) -> frozenset[int]:
    """The characters a face has (none if its character map cannot be read)."""
    try:
        with TTFont(path, fontNumber=index, lazy=True) as font:
            cmap = font.getBestCmap() or {}
    except Exception as error:  # a damaged font on the machine must not stop a video
        log.warning("caption font %s: character map unreadable: %s", path.name, error)
        return frozenset()
    return frozenset(cmap)


def _faces_of(path: Path) -> list[Face]:
    """The drawable faces of a font file (none if it cannot be read or drawn)."""
    try:
        if path.suffix.lower() in (".ttc", ".otc"):
            with TTCollection(path, lazy=True) as collection:
                count = len(collection.fonts)
        else:
            count = 1
        faces = []
        for index in range(count):
            with TTFont(path, fontNumber=index, lazy=True) as font:
                if "fvar" in font or not {"glyf", "CFF ", "CFF2"} & set(font.keys()):
                    continue
                units = font["head"].unitsPerEm
                os2 = font.get("OS/2")
                height = (os2.usWinAscent + os2.usWinDescent) if os2 else 0
                if height <= 0:
                    hhea = font["hhea"]
                    height = hhea.ascent - hhea.descent
                family, style = _pil_font(path, index, 16).getname()
            if family and height > 0:
                faces.append(Face(path, index, family, style or "", units / height))
        return faces
    except Exception as error:  # a damaged font on the machine must not stop a video
        log.warning("caption font %s cannot be used: %s", path.name, error)
        return []


def _font_files(directories: Iterable[Path]) -> list[Path]:
    """Font files under ``directories``: bold ones first, sans-serif ones first
    (as captions are), then by name."""
    found = {
        path.resolve()
        for directory in directories
        if directory.is_dir()
        for path in directory.rglob("*")
        if path.suffix.lower() in FONT_SUFFIXES and path.is_file()
    }
    return sorted(
        found,
        key=lambda path: (
            "bold" not in path.name.lower(),
            "sans" not in path.name.lower() or "mono" in path.name.lower(),
            path.name,
        ),
    )


class FontChain:
    """The caption font and its fallbacks, in order; see the module's docstring."""

    def __init__(self, primary: Path, fallbacks: Sequence[Path], directories: Sequence[Path]):
        faces = _faces_of(Path(primary))
        if not faces:
            raise ValueError(f"caption font {primary} is not a font libass can draw")
        self.primary = faces[0]
        self._files = [Path(path) for path in fallbacks]
        seen = {Path(primary).resolve(), *(path.resolve() for path in self._files)}
        self._files += [path for path in _font_files(directories) if path not in seen]
        self._faces: list[Face] = [self.primary]
        self._read = 0
        self._lock = threading.Lock()

    def _more_faces(self) -> bool:
        """Read the next fallback file; False when none is left."""
        while self._read < len(self._files):
            path = self._files[self._read]
            self._read += 1
            faces = _faces_of(path)
            if faces:
                self._faces += faces
                return True
        return False

    @cache  # noqa: B019 - a chain lives as long as the process (font_chain)
    def face_for(self, char: str, region: str = "") -> Face | None:
        """The first face that has ``char`` (of ``region``'s CJK face where that matters)."""
        code = ord(char)
        with self._lock:
            index = 0
            while True:
                for face in self._faces[index:]:
                    if code in face.coverage:
                        return self._regional(face, region)
                index = len(self._faces)
                if not self._more_faces():
                    return None

    def _regional(self, face: Face, region: str) -> Face:
        if not face.region or not region or face.region == region:
            return face
        for other in self._faces:
            if other.path == face.path and other.region == region:
                return other
        return face

    def runs(self, text: str) -> list[Run]:
        """``text`` in runs of one face each; characters no face has are left out."""
        region = text_region(text)
        runs: list[Run] = []
        for char in text:
            code = ord(char)
            current = runs[-1].face if runs else None
            if current and (
                unicodedata.category(char) in _CLUSTER_CATEGORIES
                or code in _EMOJI_MODIFIERS
                or (_is_space_or_punctuation(char) and code in current.coverage)
            ):
                face: Face | None = current
            elif unicodedata.category(char) in _CLUSTER_CATEGORIES:
                continue  # nothing to attach to: no ink of its own
            else:
                face = self.face_for(char, region)
            if face is None:
                continue
            if current == face:
                runs[-1] = Run(face, runs[-1].text + char)
            else:
                runs.append(Run(face, char))
        return runs

    def missing(self, text: str) -> list[str]:
        """The characters of ``text`` that no face has, in order of first use."""
        seen: dict[str, None] = {}
        for char in text:
            if (
                char not in seen
                and not char.isspace()
                and unicodedata.category(char) not in _CLUSTER_CATEGORIES
                and ord(char) not in _EMOJI_MODIFIERS
                and self.face_for(char) is None
            ):
                seen[char] = None
        return list(seen)

    def width(self, text: str, size: float) -> float:
        """Width in pixels of ``text`` drawn at libass font size ``size``."""
        return sum(
            run.face.font(size * run.face.em_per_size).getlength(run.text)
            for run in self.runs(text)
        )


def _is_space_or_punctuation(char: str) -> bool:
    return unicodedata.category(char)[0] in "ZP"


def is_kana(char: str) -> bool:
    code = ord(char)
    return 0x3040 <= code <= 0x30FF or 0x31F0 <= code <= 0x31FF


def is_hangul(char: str) -> bool:
    code = ord(char)
    return 0xAC00 <= code <= 0xD7AF or 0x1100 <= code <= 0x11FF or 0x3130 <= code <= 0x318F


def text_region(text: str) -> str:
    """The CJK region ``text`` reads as: JP with kana, KR with Hangul, else SC."""
    for char in text:
        if is_kana(char):
            return "JP"
        if is_hangul(char):
            return "KR"
    return "SC"


@cache
def font_chain(
    primary: Path, fallbacks: tuple[Path, ...], directories: tuple[Path, ...]
) -> FontChain:
    """The chain for these settings, built once per process."""
    return FontChain(primary, fallbacks, directories)
