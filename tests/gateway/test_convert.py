"""Every field survives the conversions between messages and job records.

The checks walk the message descriptors, so a field added to a contract (a
new storyboard field, a new fact about a rendered image) and dropped by the
gateway fails here, not in a user's hands.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from google.protobuf import json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message
from storyreel_gateway.convert import (
    image_from_proto,
    job_to_proto,
    spec_from_request,
    video_from_proto,
)
from storyreel_gateway.jobs import (
    ArtifactKind,
    ArtifactVersion,
    JobError,
    JobRecord,
    JobSpec,
    JobState,
    SceneImage,
    Stage,
    StageRecord,
    now,
)

from storyreel.composer.v1 import composer_pb2
from storyreel.diffusion.v1 import diffusion_pb2
from storyreel.errors import InvalidInput
from storyreel.gateway.v1 import gateway_pb2
from storyreel.storyboard import Storyboard, storyboard_from_proto
from storyreel.types.v1 import types_pb2


def _fill(message: Message, seed: int = 1) -> Message:
    """Set every field of ``message`` (recursively) to a non-default value."""
    for field in message.DESCRIPTOR.fields:
        value = _value(field, seed)
        if field.is_repeated:
            container = getattr(message, field.name)
            if field.type == FieldDescriptor.TYPE_MESSAGE:
                _fill(container.add(), seed + 1)
            else:
                container.append(value)
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            _fill(getattr(message, field.name), seed + 1)
        else:
            setattr(message, field.name, value)
    return message


def _value(field: FieldDescriptor, seed: int):
    kind = field.type
    if kind == FieldDescriptor.TYPE_STRING:
        return f"{field.name}-{seed}"
    if kind == FieldDescriptor.TYPE_BYTES:
        return b"x"
    if kind == FieldDescriptor.TYPE_BOOL:
        return True
    if kind in (FieldDescriptor.TYPE_FLOAT, FieldDescriptor.TYPE_DOUBLE):
        return 1.5 + seed
    if kind == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values[-1].number
    return 2 + seed


def _unset(message: Message, path: str = "") -> list[str]:
    """Paths of every field left at its default (recursively, through last elements)."""
    missing = []
    for field in message.DESCRIPTOR.fields:
        name = f"{path}{field.name}"
        if field.is_repeated:
            items = getattr(message, field.name)
            if not items:
                missing.append(name)
            elif field.type == FieldDescriptor.TYPE_MESSAGE:
                missing += _unset(items[-1], f"{name}[-1].")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if not message.HasField(field.name):
                missing.append(name)
            else:
                missing += _unset(getattr(message, field.name), f"{name}.")
        elif getattr(message, field.name) == field.default_value:
            missing.append(name)
    return missing


def test_every_storyboard_field_the_story_service_returns_is_kept():
    sent = _fill(types_pb2.Storyboard())
    kept = storyboard_from_proto(sent)
    record = _done_record()
    record.storyboard = kept
    shown = job_to_proto(record, lambda uri: f"https://x/{uri}").storyboard
    # The API shows the shared Storyboard (gateway.proto imports nothing internal) ...
    assert shown.DESCRIPTOR.full_name == "storyreel.types.v1.Storyboard"
    assert _unset(shown) == []
    # ... with every field the LLM service sent, under the same numbers.
    assert types_pb2.Storyboard.FromString(shown.SerializeToString()) == sent
    assert json_format.MessageToDict(shown) == json_format.MessageToDict(sent)


def test_every_fact_about_a_rendered_image_is_kept():
    sent = _fill(diffusion_pb2.SceneImage())
    image = image_from_proto(sent)
    record = _done_record()
    record.images = [image]
    shown = job_to_proto(record).images[0]
    # The API's SceneImage carries every field the diffusion service reports.
    assert {f.name for f in diffusion_pb2.SceneImage.DESCRIPTOR.fields} == {
        f.name for f in gateway_pb2.SceneImage.DESCRIPTOR.fields
    }
    for field in diffusion_pb2.SceneImage.DESCRIPTOR.fields:
        assert getattr(shown, field.name) == getattr(sent, field.name), field.name


def test_every_field_of_the_composers_reply_is_kept():
    sent = _fill(composer_pb2.ComposeResponse())
    video = video_from_proto(sent)
    record = _done_record()
    record.set_video(video)
    shown = job_to_proto(record, lambda uri: f"https://x/{uri}")
    assert shown.video_uri == sent.video_uri
    assert (shown.width, shown.height, shown.fps) == (sent.width, sent.height, sent.fps)
    assert list(shown.scene_starts_s) == list(sent.scene_starts_s)
    assert shown.duration_s == sent.duration_s
    for name in ("captions_srt", "captions_vtt", "poster", "contact_sheet"):
        assert getattr(shown, name).uri == getattr(sent, f"{name}_uri"), name
    for name in ("narration_synthesized", "narration_cached"):
        assert getattr(shown, name) == getattr(sent, name), name
    # Every reply field appears somewhere in the job.
    used = {"video_uri", "duration_s", "scene_starts_s", "width", "height", "fps"} | {
        f"{name}_uri" for name in ("captions_srt", "captions_vtt", "poster", "contact_sheet")
    }
    used |= {"narration_synthesized", "narration_cached"}
    # The warnings are told in the compose stage's STAGE_FINISHED event (test_gateway).
    assert record.compose_warnings == list(sent.warnings)
    used |= {"warnings"}
    assert {f.name for f in composer_pb2.ComposeResponse.DESCRIPTOR.fields} == used


def test_every_value_of_every_public_option_enum_reaches_the_job_and_comes_back():
    for field in ("aspect", "resolution", "consistency", "captions", "audio_mode"):
        enum = gateway_pb2.CreateVideoRequest.DESCRIPTOR.fields_by_name[field].enum_type
        assert enum.file.name == "storyreel/types/v1/types.proto", field
        for value in enum.values:
            request = gateway_pb2.CreateVideoRequest(prompt="p", **{field: value.number})
            job = job_to_proto(JobRecord(job_id="j", spec=spec_from_request(request)))
            assert getattr(job, field) == value.number, (field, value.name)


def test_an_enum_value_the_gateway_does_not_know_is_refused():
    request = gateway_pb2.CreateVideoRequest(prompt="p", aspect=42)
    with pytest.raises(InvalidInput, match="aspect has no value 42"):
        spec_from_request(request)


def test_every_create_video_option_reaches_the_job_and_comes_back():
    request = _fill(gateway_pb2.CreateVideoRequest())
    request.aspect, request.resolution = 0, 0  # set width/height instead (one or the other)
    spec = spec_from_request(request)
    record = JobRecord(
        job_id="j", spec=spec, idempotency_key=request.idempotency_key, request_hash="h"
    )
    job = job_to_proto(record)
    for field in gateway_pb2.CreateVideoRequest.DESCRIPTOR.fields:
        if field.name in ("aspect", "resolution"):
            continue
        assert getattr(job, field.name) == getattr(request, field.name), field.name


def test_a_finished_job_shows_every_field_of_the_api():
    job = job_to_proto(_done_record(), lambda uri: f"https://x/{uri}")
    assert _unset(job) == []


def _done_record() -> JobRecord:
    started = now()
    spec = JobSpec(
        prompt="a fox",
        scene_count=1,
        style="ink",
        seed=7,
        audio_uri="file:///a.wav",
        width=0,
        height=0,
        fps=24,
        aspect="9:16",
        resolution="720p",
        consistency="reference_images",
        captions="sidecar",
        audio_mode="music",
        voice="joe",
        review=True,
    )
    record = JobRecord(
        job_id="j1",
        spec=spec,
        tenant="t",
        idempotency_key="k",
        request_hash="h",
        state=JobState.DONE,
        stage=Stage.COMPOSE,
        progress=100.0,
        stages=[
            StageRecord(
                stage=Stage.RENDER,
                state=JobState.DONE,
                started_at=started,
                finished_at=started + timedelta(seconds=2),
                duration_s=2.0,
            )
        ],
        error=JobError(stage=Stage.RENDER, code="UNAVAILABLE", message="earlier try"),
        storyboard=storyboard_from_proto(_fill(types_pb2.Storyboard())),
        images=[image_from_proto(_fill(diffusion_pb2.SceneImage()))],
        eta_s=3.0,
        generation=1,
        storyboard_version=2,
    )
    record.set_video(video_from_proto(_fill(composer_pb2.ComposeResponse())))
    record.versions.insert(
        0, ArtifactVersion(kind=ArtifactKind.IMAGE, uri="file:///old.png", generation=0)
    )
    record.versions[-1].scene_index = 1
    return record


def test_the_version_history_keeps_every_run():
    record = _done_record()
    record.generation = 0
    record.versions = []
    index = record.storyboard.scenes[0].index
    record.add_image(SceneImage(index=index, uri="file:///jobs/j1/images/scene-001.png", seed=1))
    record.reset_scene(index, "new prompt", 9)
    assert index not in {i.index for i in record.images}
    assert record.video_uri == "" and record.generation == 1
    assert record.storyboard.scenes[0].image_prompt == "new prompt"
    record.add_image(SceneImage(index=index, uri="file:///jobs/j1/r1/images/scene-001.png", seed=9))
    images = [(v.generation, v.uri) for v in record.versions if v.kind is ArtifactKind.IMAGE]
    assert images == [
        (0, "file:///jobs/j1/images/scene-001.png"),
        (1, "file:///jobs/j1/r1/images/scene-001.png"),
    ]
    assert [i.uri for i in record.images if i.index == index] == [
        "file:///jobs/j1/r1/images/scene-001.png"
    ]


def test_every_fact_the_composer_probed_in_an_upload_is_returned():
    from storyreel_gateway.convert import upload_to_proto
    from storyreel_gateway.uploads import ProbedAudio, StoredUpload

    stored = StoredUpload(
        uri="file:///uploads/x/audio.mp3",
        size_bytes=10,
        audio=ProbedAudio(duration_s=1.5, codec="mp3", sample_rate=44100, channels=2, format="mp3"),
    )
    assert _unset(upload_to_proto(stored)) == []


def test_a_storyboard_stored_by_an_earlier_gateway_still_loads_and_keeps_its_shape():
    """Records keep the storyboard as JSON; the shared model reads the old records' shape."""
    stored = {
        "title": "The Keeper",
        "characters": [{"name": "Ada", "appearance": "a keeper in a red coat"}],
        "scenes": [
            {
                "index": 1,
                "narration": "Ada climbs the tower.",
                "image_prompt": "ink, a keeper in a red coat climbs a tower",
                "characters": ["Ada"],
                "setting": "in a lighthouse",
                "action": "Ada climbs",
                "camera": "wide shot",
            }
        ],
        "style": "ink",
        "degraded": False,
        "logline": "A keeper keeps a light.",
    }
    data = json.loads(_done_record().model_dump_json())
    data["storyboard"] = stored
    record = JobRecord.model_validate_json(json.dumps(data))
    assert isinstance(record.storyboard, Storyboard)
    assert record.storyboard.scenes[0].characters == ("Ada",)
    assert json.loads(record.model_dump_json())["storyboard"] == stored
    # Without the shot (a record from before the shot fields), the scene still loads.
    for scene in stored["scenes"]:
        for key in ("setting", "action", "camera"):
            del scene[key]
    data["storyboard"] = stored
    assert JobRecord.model_validate_json(json.dumps(data)).storyboard.scenes[0].camera == ""
