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
