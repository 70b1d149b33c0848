"""Names of a job's video options and their protobuf enum values.

The gateway's records keep readable names ("16:9", "sidecar", ...). Two sets of
tables map them to enums, each serving both directions:

* ``API_*``: the public API's own enums (``storyreel.gateway.v1.Aspect`` and so
  on): the gateway's servicer and the CLI.
* the others: the compose and render services' enums, for the upstream clients.

The public enums keep the numbers of the internal ones they mirror (so clients
compiled against either decode the same values); ``tests/gateway/test_contract.py``
checks that both sets name the same options.
"""

from __future__ import annotations

from storyreel.compose.v1 import compose_pb2
from storyreel.errors import InvalidInput
from storyreel.gateway.v1 import gateway_pb2
from storyreel.render.v1 import render_pb2

# -- the public API (storyreel.gateway.v1) ---------------------------------------------------

API_ASPECTS = {
    "16:9": gateway_pb2.ASPECT_16_9,
    "9:16": gateway_pb2.ASPECT_9_16,
    "1:1": gateway_pb2.ASPECT_1_1,
}
API_RESOLUTIONS = {
    "480p": gateway_pb2.RESOLUTION_480P,
    "720p": gateway_pb2.RESOLUTION_720P,
    "1080p": gateway_pb2.RESOLUTION_1080P,
}
API_CAPTIONS = {
    "burned": gateway_pb2.CAPTIONS_BURNED,
    "sidecar": gateway_pb2.CAPTIONS_SIDECAR,
    "off": gateway_pb2.CAPTIONS_OFF,
}
API_AUDIO_MODES = {
    "narration": gateway_pb2.AUDIO_MODE_NARRATION,
    "soundtrack": gateway_pb2.AUDIO_MODE_SOUNDTRACK,
    "music": gateway_pb2.AUDIO_MODE_MUSIC,
}
API_CONSISTENCY = {
    "none": gateway_pb2.CONSISTENCY_MODE_NONE,
    "seed_lock": gateway_pb2.CONSISTENCY_MODE_SEED_LOCK,
    "consistent_self_attention": gateway_pb2.CONSISTENCY_MODE_CONSISTENT_SELF_ATTENTION,
    "reference_images": gateway_pb2.CONSISTENCY_MODE_REFERENCE_IMAGES,
}

# -- the internal services (storyreel.compose.v1, storyreel.render.v1) -----------------------

ASPECTS = {
    "16:9": compose_pb2.ASPECT_16_9,
    "9:16": compose_pb2.ASPECT_9_16,
    "1:1": compose_pb2.ASPECT_1_1,
}
RESOLUTIONS = {
    "480p": compose_pb2.RESOLUTION_480P,
    "720p": compose_pb2.RESOLUTION_720P,
    "1080p": compose_pb2.RESOLUTION_1080P,
}
CAPTIONS = {
    "burned": compose_pb2.CAPTIONS_BURNED,
    "sidecar": compose_pb2.CAPTIONS_SIDECAR,
    "off": compose_pb2.CAPTIONS_OFF,
}
AUDIO_MODES = {
    "narration": compose_pb2.AUDIO_MODE_NARRATION,
    "soundtrack": compose_pb2.AUDIO_MODE_SOUNDTRACK,
    "music": compose_pb2.AUDIO_MODE_MUSIC,
}
CONSISTENCY = {
    "none": render_pb2.CONSISTENCY_MODE_NONE,
    "seed_lock": render_pb2.CONSISTENCY_MODE_SEED_LOCK,
    "consistent_self_attention": render_pb2.CONSISTENCY_MODE_CONSISTENT_SELF_ATTENTION,
    "reference_images": render_pb2.CONSISTENCY_MODE_REFERENCE_IMAGES,
}
#: The render service's frame shapes, by the video aspect they match.
RENDER_ASPECTS = {
    "16:9": render_pb2.ASPECT_RATIO_LANDSCAPE_16_9,
    "9:16": render_pb2.ASPECT_RATIO_PORTRAIT_9_16,
    "1:1": render_pb2.ASPECT_RATIO_SQUARE,
}


def to_enum(table: dict[str, int], name: str) -> int:
    """The enum value of ``name``; "" is UNSPECIFIED (0)."""
    return table[name] if name else 0


def from_enum(table: dict[str, int], value: int, field: str) -> str:
    """The name of enum ``value`` (0: ""); InvalidInput for a value the table lacks."""
    if value == 0:
        return ""
    for name, number in table.items():
        if number == value:
            return name
    raise InvalidInput(f"{field} has no value {value}")
