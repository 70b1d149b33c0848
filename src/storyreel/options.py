"""The video options every contract shares, by name: one table per enum of ``types.v1``.

Records, settings, the CLI and the services' cores keep readable names ("16:9",
"720p", "sidecar", "seed_lock"); the contracts carry the enums of
``storyreel/types/v1/types.proto``. Each table here is read from that enum's
descriptor, so a value added to the proto is a valid name everywhere at once:

* ``ASPECT_16_9`` is "16:9", ``RESOLUTION_720P`` is "720p";
* the others are the value's name after the enum's prefix, in lower case
  (``CAPTIONS_SIDECAR`` is "sidecar", ``CONSISTENCY_MODE_SEED_LOCK`` is "seed_lock").

The zero (UNSPECIFIED) value is "" in every table: "the default".
"""

from __future__ import annotations

from typing import Annotated

from google.protobuf.descriptor import EnumDescriptor
from pydantic import AfterValidator

from storyreel.errors import InvalidInput
from storyreel.types.v1 import types_pb2


def _table(enum: EnumDescriptor, prefix: str, name) -> dict[str, int]:
    return {
        name(value.name.removeprefix(prefix)): value.number
        for value in enum.values
        if value.number != 0
    }


#: "16:9" -> ASPECT_16_9, ...: width:height of the frame.
ASPECTS = _table(types_pb2.Aspect.DESCRIPTOR, "ASPECT_", lambda n: n.replace("_", ":"))
#: "720p" -> RESOLUTION_720P, ...: the frame's short side.
RESOLUTIONS = _table(types_pb2.Resolution.DESCRIPTOR, "RESOLUTION_", str.lower)
#: "burned", "sidecar", "off".
CAPTIONS = _table(types_pb2.Captions.DESCRIPTOR, "CAPTIONS_", str.lower)
#: "narration", "soundtrack", "music".
AUDIO_MODES = _table(types_pb2.AudioMode.DESCRIPTOR, "AUDIO_MODE_", str.lower)
#: "none", "seed_lock", "consistent_self_attention", "reference_images".
CONSISTENCY = _table(types_pb2.ConsistencyMode.DESCRIPTOR, "CONSISTENCY_MODE_", str.lower)


def to_enum(table: dict[str, int], name: str | None) -> int:
    """The enum value of ``name``; "" (or None) is UNSPECIFIED (0)."""
    return table[name] if name else 0


def from_enum(table: dict[str, int], value: int, field: str) -> str:
    """The name of enum ``value`` (0: ""); InvalidInput for a value the table lacks.

    A number this build does not know (a newer client's) is refused, never mapped
    to the default: the message lists the names that are known.
    """
    if value == 0:
        return ""
    for name, number in table.items():
        if number == value:
            return name
    raise InvalidInput(f"{field} has no value {value}; known values: {', '.join(table)}")


def _named(table: dict[str, int], field: str) -> object:
    """A pydantic ``str`` that is "" (the default) or one of ``table``'s names."""

    def check(value: str) -> str:
        if value and value not in table:
            raise ValueError(f"{field} must be one of {', '.join(table)}; got {value!r}")
        return value

    return Annotated[str, AfterValidator(check)]


#: Field types of settings and records that hold one of these names (or "").
AspectName = _named(ASPECTS, "aspect")
ResolutionName = _named(RESOLUTIONS, "resolution")
CaptionsName = _named(CAPTIONS, "captions")
AudioModeName = _named(AUDIO_MODES, "audio_mode")
ConsistencyName = _named(CONSISTENCY, "consistency")
