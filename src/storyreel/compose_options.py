"""How a video looks and sounds: one :class:`ComposeOptions` for every Python part of storyreel.

The gateway builds it from a job's options and sends it in a ComposeRequest, the
composer service reads it back from the request, and the composer core, the
``storyreel compose`` command and the benchmarks pass it to
:meth:`storyreel_composer.composer.VideoComposer.compose`. In every field "" and
0 mean "the composer's default" (its settings), exactly as the UNSPECIFIED enum
values and zeros of ``composer.v1.ComposeRequest`` do; the names are those of
:mod:`storyreel.options` and of :data:`FITS`, :data:`TRANSITIONS` and
:data:`MOTIONS` below.

What is not here is the request's, not the look's: the audio URI, the frame
rate, an explicit width and height, and the job's revision travel as arguments
of the compose call beside the options (and as their own ComposeRequest fields).

Which name belongs to which layer:

===========================  ===========================  ============================
contract                     service core (composer)      gateway (compose stage)
===========================  ===========================  ============================
composer.v1.ComposeRequest   ``ComposeOptions``, read by  the same ``ComposeOptions``,
(its option fields)          :func:`options_from_request` sent by :func:`request_fields`
===========================  ===========================  ============================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from google.protobuf.descriptor import EnumDescriptor

from storyreel.composer.v1 import composer_pb2
from storyreel.options import ASPECTS, AUDIO_MODES, CAPTIONS, RESOLUTIONS, from_enum, to_enum


def _table(enum: EnumDescriptor, prefix: str) -> dict[str, int]:
    return {
        value.name.removeprefix(prefix).lower(): value.number
        for value in enum.values
        if value.number != 0
    }


#: "cover", "blur": how an image that does not have the frame's shape fills it.
FITS = _table(composer_pb2.Fit.DESCRIPTOR, "FIT_")
#: "crossfade", "cut": how one scene gives way to the next.
TRANSITIONS = _table(composer_pb2.Transition.DESCRIPTOR, "TRANSITION_")
#: "ken_burns", "none": movement of the picture within each scene.
MOTIONS = _table(composer_pb2.Motion.DESCRIPTOR, "MOTION_")


@dataclass(frozen=True)
class ComposeOptions:
    """How the video looks and sounds; "" and 0 select the composer's defaults.

    ``audio_mode`` is "narration" (synthesized), "soundtrack" (the user's
    audio is the whole sound track and sets the length) or "music" (the
    user's audio plays, ducked, under synthesized narration); unset, it is
    "soundtrack" with an audio URI and "narration" without. ``seed`` picks the
    Ken Burns moves; ``crossfade_s`` and ``speaking_rate`` are numbers within
    the composer's limits.
    """

    aspect: str = ""
    resolution: str = ""
    fit: str = ""
    transition: str = ""
    crossfade_s: float = 0.0
    motion: str = ""
    seed: int = 0
    captions: str = ""
    audio_mode: str = ""
    voice: str = ""
    speaking_rate: float = 0.0


def request_fields(options: ComposeOptions) -> dict[str, Any]:
    """The ComposeRequest fields of ``options`` (``ComposeRequest(**request_fields(o), ...)``)."""
    return {
        "aspect": to_enum(ASPECTS, options.aspect),
        "resolution": to_enum(RESOLUTIONS, options.resolution),
        "fit": to_enum(FITS, options.fit),
        "transition": to_enum(TRANSITIONS, options.transition),
        "crossfade_s": options.crossfade_s,
        "motion": to_enum(MOTIONS, options.motion),
        "seed": options.seed,
        "captions": to_enum(CAPTIONS, options.captions),
        "audio_mode": to_enum(AUDIO_MODES, options.audio_mode),
        "voice": options.voice,
        "speaking_rate": options.speaking_rate,
    }


def options_from_request(request: composer_pb2.ComposeRequest) -> ComposeOptions:
    """The options of a ComposeRequest; "" where it leaves one to the service default.

    An enum number this build does not know is InvalidInput (INVALID_ARGUMENT),
    as the contract says, never silently the default.
    """
    return ComposeOptions(
        aspect=from_enum(ASPECTS, request.aspect, "aspect"),
        resolution=from_enum(RESOLUTIONS, request.resolution, "resolution"),
        fit=from_enum(FITS, request.fit, "fit"),
        transition=from_enum(TRANSITIONS, request.transition, "transition"),
        crossfade_s=request.crossfade_s,
        motion=from_enum(MOTIONS, request.motion, "motion"),
        seed=request.seed,
        captions=from_enum(CAPTIONS, request.captions, "captions"),
        audio_mode=from_enum(AUDIO_MODES, request.audio_mode, "audio_mode"),
        voice=request.voice,
        speaking_rate=request.speaking_rate,
    )
