"""Frame sizes of every aspect ratio at every resolution."""

from __future__ import annotations

import pytest
from storyreel_composer.formats import frame_size


@pytest.mark.parametrize(
    ("aspect", "resolution", "size"),
    [
        ("16:9", "480p", (854, 480)),
        ("16:9", "720p", (1280, 720)),
        ("16:9", "1080p", (1920, 1080)),
        ("9:16", "480p", (480, 854)),
        ("9:16", "720p", (720, 1280)),
        ("9:16", "1080p", (1080, 1920)),
        ("1:1", "480p", (480, 480)),
        ("1:1", "720p", (720, 720)),
        ("1:1", "1080p", (1080, 1080)),
    ],
)
def test_resolution_names_the_short_side_and_both_sides_are_even(aspect, resolution, size):
    assert frame_size(aspect, resolution) == size
    assert size[0] % 2 == size[1] % 2 == 0
