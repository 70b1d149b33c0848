"""One ComposeOptions: every option field of a ComposeRequest, there and back."""

from __future__ import annotations

import pytest

from storyreel.compose_options import (
    FITS,
    MOTIONS,
    TRANSITIONS,
    ComposeOptions,
    options_from_request,
    request_fields,
)
from storyreel.composer.v1 import composer_pb2
from storyreel.errors import InvalidInput

#: The request's own fields: arguments of the compose call, not options.
REQUEST_LEVEL = {"job_id", "scenes", "audio_uri", "fps", "width", "height", "revision"}


def test_every_compose_request_field_is_an_option_or_a_request_argument():
    names = {f.name for f in composer_pb2.ComposeRequest.DESCRIPTOR.fields}
    assert set(request_fields(ComposeOptions())) == names - REQUEST_LEVEL


def test_unset_options_are_the_zero_values_of_the_request():
    assert composer_pb2.ComposeRequest(**request_fields(ComposeOptions())) == (
        composer_pb2.ComposeRequest()
    )
    assert options_from_request(composer_pb2.ComposeRequest()) == ComposeOptions()


def test_every_option_survives_the_request():
    chosen = ComposeOptions(
        aspect="9:16",
        resolution="1080p",
        fit="blur",
        transition="cut",
        crossfade_s=0.25,
        motion="none",
        seed=7,
        captions="sidecar",
        audio_mode="music",
        voice="joe",
        speaking_rate=1.25,
    )
    request = composer_pb2.ComposeRequest(**request_fields(chosen))
    assert options_from_request(request) == chosen


def test_the_composers_own_enums_are_named_after_the_contract():
    assert set(FITS) == {"cover", "blur"}
    assert set(TRANSITIONS) == {"crossfade", "cut"}
    assert set(MOTIONS) == {"ken_burns", "none"}
    with pytest.raises(InvalidInput, match="fit has no value 9"):
        options_from_request(composer_pb2.ComposeRequest(fit=9))
