"""Frame shapes and sizes (storyreel.frames) and the option names read from types.v1."""

from __future__ import annotations

import pytest

from storyreel import options
from storyreel.frames import SHAPES, SHORT_SIDES, image_size, nearest_aspect, video_size
from storyreel.types.v1 import types_pb2


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
    assert video_size(aspect, resolution) == size
    assert size[0] % 2 == size[1] % 2 == 0


def test_every_aspect_and_resolution_of_the_contract_has_a_name_and_a_size():
    aspects = [v.name for v in types_pb2.Aspect.DESCRIPTOR.values if v.number]
    assert sorted(options.ASPECTS.values()) == [types_pb2.Aspect.Value(n) for n in aspects]
    assert options.ASPECTS["16:9"] == types_pb2.ASPECT_16_9
    assert options.RESOLUTIONS["720p"] == types_pb2.RESOLUTION_720P
    assert options.CONSISTENCY["seed_lock"] == types_pb2.CONSISTENCY_MODE_SEED_LOCK
    assert options.CAPTIONS["sidecar"] == types_pb2.CAPTIONS_SIDECAR
    for name in options.ASPECTS:
        for resolution in options.RESOLUTIONS:
            width, height = video_size(name, resolution)
            across, down = SHAPES[name]
            assert min(width, height) == SHORT_SIDES[resolution]
            assert width % 2 == height % 2 == 0
            # The shape within rounding to even pixels.
            assert abs(width / height - across / down) < 2.5 / min(width, height)


@pytest.mark.parametrize("name", list(SHAPES))
def test_an_image_keeps_its_shape_near_the_default_area(name):
    width, height = image_size(name, 512, 512, 8, 256, 1024)
    across, down = SHAPES[name]
    assert width % 8 == height % 8 == 0
    assert abs(width * height - 512 * 512) / (512 * 512) < 0.1
    assert abs(width / height - across / down) < 0.05
    assert nearest_aspect(width, height) == name


def test_option_names_and_enum_numbers_map_both_ways_and_unknown_numbers_are_refused():
    from storyreel.errors import InvalidInput

    assert options.to_enum(options.ASPECTS, "") == 0
    assert options.from_enum(options.ASPECTS, 0, "aspect") == ""
    for name, number in options.ASPECTS.items():
        assert (
            options.from_enum(options.ASPECTS, options.to_enum(options.ASPECTS, name), "a") == name
        )
        assert number
    with pytest.raises(InvalidInput, match="aspect has no value 99"):
        options.from_enum(options.ASPECTS, 99, "aspect")
