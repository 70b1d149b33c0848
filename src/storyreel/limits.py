"""Bounds every service shares, written once.

A video has :data:`MIN_SCENES` to :data:`MAX_SCENES` scenes: the LLM service writes
that many, the diffusion service draws that many in one request, the composer
composes that many, and the gateway and the CLI accept that many. A deployment
may lower its own maximum in a service's settings (``max_scenes``), never raise
it; the contracts' comments (protos/) state these numbers, and a test holds them
to this module.
"""

from __future__ import annotations

#: Fewest scenes a storyboard, a render request or a video has.
MIN_SCENES = 1
#: Most scenes a storyboard, a render request or a video has.
MAX_SCENES = 24

# Length caps (characters) of a storyboard's text: the defaults and maxima of the LLM service's
# settings (max_title_chars, max_name_chars, max_appearance_chars, max_narration_chars),
# which a user's storyboard meets too (storyreel.storyboard.check_storyboard).
#: Most characters of a storyboard's title.
MAX_TITLE_CHARS = 60
#: Most characters of a character's name.
MAX_NAME_CHARS = 24
#: Most characters of a character's appearance.
MAX_APPEARANCE_CHARS = 80
#: Most characters of a scene's narration.
MAX_NARRATION_CHARS = 220

# The formats of a user's soundtrack, the same everywhere: the gateway recognises an upload
# as one of them by its content (storyreel_gateway.audio), the composer reads the user's audio
# only as one of them (storyreel_composer.user_audio), and every help text, README and contract
# comment that lists them says AUDIO_FORMATS_TEXT (tests/core/test_limits.py holds them to it).
#: Soundtrack formats, by the extension an upload of each is stored with: wav, mp3, ogg
#: (Vorbis, Opus), flac, m4a (MP4 audio: AAC), aac (raw ADTS) and webm (WebM/Matroska: Opus,
#: Vorbis).
AUDIO_FORMATS: tuple[str, ...] = ("wav", "mp3", "ogg", "flac", "m4a", "aac", "webm")
#: The same formats, as help texts and messages list them.
AUDIO_FORMATS_TEXT = "wav, mp3, ogg, flac, m4a, aac or webm"
