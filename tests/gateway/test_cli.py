"""`storyreel generate` as a user runs it: a real process talking to a real gateway."""

from __future__ import annotations

import asyncio
import re
import sys
from pathlib import Path

from support import wav_bytes

STORYREEL = [sys.executable, "-m", "storyreel.cli"]


async def _run(*args: str, timeout: float = 120) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        *STORYREEL, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode, stdout.decode(), stderr.decode()


async def test_generate_writes_the_video_and_prints_its_path(gateway, tmp_path: Path):
    output = tmp_path / "clip.mp4"
    code, stdout, stderr = await _run(
        "generate", "a fox", "--scenes", "2", "--gateway", gateway.address, "-o", str(output)
    )
    assert code == 0, stderr
    assert stdout.strip() == str(output.resolve())
    assert output.read_bytes() == b"mp4"  # what the compose double stored
    assert "done" in stderr
    # The time of each stage, as it ends: where a slow machine spends it.
    assert re.search(r"storyboard took \d+\.\d s", stderr), stderr
    assert re.search(r"render took \d+\.\d s \(\d+\.\d s per scene\)", stderr), stderr
    assert re.search(r"compose took \d+\.\d s", stderr), stderr


async def test_generate_uploads_the_audio_file(gateway, upstream, tmp_path: Path):
    audio = tmp_path / "voice.wav"
    audio.write_bytes(wav_bytes())
    code, _, stderr = await _run(
        "generate",
        "a fox",
        "--audio",
        str(audio),
        "--gateway",
        gateway.address,
        "-o",
        str(tmp_path / "out.mp4"),
    )
    assert code == 0, stderr
    assert upstream.compose_requests[-1].audio_uri.endswith("/audio.wav")


async def test_generate_passes_the_video_options_and_saves_the_captions_beside(
    gateway, upstream, tmp_path: Path
):
    from storyreel.types.v1 import types_pb2

    audio = tmp_path / "music.wav"
    audio.write_bytes(wav_bytes())
    output = tmp_path / "short.mp4"
    code, _, stderr = await _run(
        "generate", "a fox", "--audio", str(audio), "--music", "--aspect", "9:16",
        "--resolution", "1080p", "--captions", "sidecar", "--consistency", "none",
        "--voice", "joe", "--gateway", gateway.address, "-o", str(output),
    )  # fmt: skip
    assert code == 0, stderr
    compose = upstream.compose_requests[-1]
    assert (compose.aspect, compose.resolution) == (
        types_pb2.ASPECT_9_16,
        types_pb2.RESOLUTION_1080P,
    )
    assert (compose.captions, compose.audio_mode, compose.voice) == (
        types_pb2.CAPTIONS_SIDECAR,
        types_pb2.AUDIO_MODE_MUSIC,
        "joe",
    )
    assert upstream.render_messages[-1].consistency == types_pb2.CONSISTENCY_MODE_NONE
    # What the compose double stored as the captions, fetched next to the video.
    assert (tmp_path / "short.srt").read_bytes() == b"1"
    assert (tmp_path / "short.vtt").read_bytes() == b"W"


async def test_generate_music_without_audio_exits_2(tmp_path: Path):
    code, _, stderr = await _run("generate", "a fox", "--music", "--gateway", "127.0.0.1:9")
    assert code == 2
    assert "--audio" in stderr


async def test_generate_refused_request_exits_2_with_the_reason(gateway, tmp_path: Path):
    code, stdout, stderr = await _run(
        "generate", "a fox", "--scenes", "99", "--gateway", gateway.address
    )
    assert code == 2
    assert "INVALID_ARGUMENT" in stderr and "between 1 and 24" in stderr
    assert stdout == ""


async def test_generate_failed_job_exits_1_naming_the_stage(gateway, upstream, tmp_path: Path):
    import grpc

    upstream.render_error = grpc.StatusCode.FAILED_PRECONDITION
    code, _, stderr = await _run(
        "generate", "a fox", "--gateway", gateway.address, "-o", str(tmp_path / "x.mp4")
    )
    assert code == 1
    assert "failed at the render stage" in stderr and "FAILED_PRECONDITION" in stderr
    assert not (tmp_path / "x.mp4").exists()


async def test_generate_without_a_gateway_exits_3(tmp_path: Path):
    code, _, stderr = await _run("generate", "a fox", "--gateway", "127.0.0.1:1")
    assert code == 3
    assert "unreachable" in stderr


async def test_generate_with_missing_audio_file_exits_2(tmp_path: Path):
    code, _, stderr = await _run("generate", "a fox", "--audio", str(tmp_path / "none.wav"))
    assert code == 2
    assert "does not exist" in stderr


async def _job(gateway, **fields) -> str:
    from storyreel.gateway.v1 import gateway_pb2 as pb

    job_id = (await gateway.CreateVideo(pb.CreateVideoRequest(prompt="a fox", **fields))).job_id
    async for _ in gateway.WatchJob(pb.WatchJobRequest(job_id=job_id)):
        pass
    return job_id


async def test_status_list_and_download_of_a_finished_job(gateway, tmp_path: Path):
    job_id = await _job(gateway, scene_count=2)
    code, stdout, stderr = await _run("status", job_id, "--gateway", gateway.address)
    assert code == 0, stderr
    assert stdout.strip() == "done" and "Test title" in stderr

    code, stdout, _ = await _run("list", "--gateway", gateway.address)
    assert code == 0 and f"{job_id} done" in stdout

    target = tmp_path / "saved.mp4"
    code, stdout, _ = await _run(
        "download", job_id, "-o", str(target), "--gateway", gateway.address
    )
    assert code == 0 and stdout.strip() == str(target.resolve())
    assert target.read_bytes() == b"mp4"

    code, stdout, _ = await _run("watch", job_id, "--gateway", gateway.address)
    assert code == 0 and stdout.strip().endswith("video.mp4")


async def test_regenerate_redraws_a_scene_from_the_command_line(gateway, upstream):
    job_id = await _job(gateway, scene_count=2)
    code, _stdout, stderr = await _run(
        "regenerate", job_id, "2", "--seed", "77", "--gateway", gateway.address
    )
    assert code == 0, stderr
    assert upstream.render_requests[-1] == [2]
    assert len(upstream.compose_requests) == 2

    code, _, stderr = await _run("regenerate", job_id, "9", "--gateway", gateway.address)
    assert code == 2 and "index must be between 1 and 2" in stderr


async def test_cancel_from_the_command_line(gateway, upstream):
    from storyreel.gateway.v1 import gateway_pb2 as pb

    upstream.render_delay_s = 5.0
    job_id = (await gateway.CreateVideo(pb.CreateVideoRequest(prompt="x"))).job_id
    code, stdout, stderr = await _run("cancel", job_id, "--gateway", gateway.address)
    assert code == 0, stderr
    assert stdout.strip() == "cancelled"
    code, stdout, stderr = await _run("status", job_id, "--gateway", gateway.address)
    assert stdout.strip() == "cancelled"
    code, _, stderr = await _run("watch", job_id, "--gateway", gateway.address)
    assert code == 1 and "cancelled" in stderr


async def test_unknown_job_exits_2(gateway):
    for command in ("status", "watch", "cancel", "download"):
        code, _, stderr = await _run(command, "no-such-job", "--gateway", gateway.address)
        assert code == 2, command
        assert "NOT_FOUND" in stderr


async def test_api_key_is_sent_from_the_environment(start_gateway, monkeypatch):
    under_test = await start_gateway(api_keys={"acme": ["secret-key"]})
    code, _, stderr = await _run("list", "--gateway", under_test.address)
    assert code == 2 and "UNAUTHENTICATED" in stderr
    monkeypatch.setenv("STORYREEL_API_KEY", "secret-key")
    code, _, stderr = await _run("list", "--gateway", under_test.address)
    assert code == 0, stderr


async def test_generate_takes_every_aspect_of_the_contract(gateway, upstream, tmp_path: Path):
    from storyreel import options

    assert {"4:5", "21:9"} <= set(options.ASPECTS)
    for name in ("4:5", "21:9"):
        code, _, stderr = await _run(
            "generate", "a fox", "--scenes", "1", "--aspect", name, "--gateway", gateway.address,
            "-o", str(tmp_path / f"{name.replace(':', 'x')}.mp4"),
        )  # fmt: skip
        assert code == 0, stderr
        assert upstream.compose_requests[-1].aspect == options.ASPECTS[name]
        assert upstream.render_messages[-1].aspect == options.ASPECTS[name]


# -- review and edit the storyboard ---------------------------------------------------------

EDIT_SCRIPT = """\
import sys
from pathlib import Path

path = Path(sys.argv[1])
path.write_text(path.read_text().replace({old!r}, {new!r}))
"""


def _editor(tmp_path: Path, name: str, old: str, new: str) -> str:
    script = tmp_path / f"{name}.py"
    script.write_text(EDIT_SCRIPT.format(old=old, new=new))
    return f"{sys.executable} {script}"


async def test_generate_review_then_edit_and_approve(gateway, upstream, tmp_path, monkeypatch):
    from storyreel.gateway.v1 import gateway_pb2 as pb

    monkeypatch.setenv("TMPDIR", str(tmp_path))  # where `edit` writes the storyboard
    code, stdout, stderr = await _run(
        "generate", "a fox", "--scenes", "1", "--review", "--gateway", gateway.address
    )
    assert code == 0, stderr
    job_id = stdout.splitlines()[0]
    assert "narration:    line 1" in stdout and "storyreel approve" in stderr
    assert upstream.render_calls == 0

    # A broken edit: the error names the file and line, nothing is sent, the file stays.
    monkeypatch.setenv("EDITOR", _editor(tmp_path, "bad", "narration: line 1", "narration: ''"))
    code, _, stderr = await _run("edit", job_id, "--gateway", gateway.address)
    assert code == 2
    flat = stderr.replace("\n", "")
    assert "scenes[0].narration: must not be empty" in flat and "your edit is kept in" in flat
    kept = flat.split("your edit is kept in ")[1].split(" (fix it with")[0].strip()
    assert Path(kept).is_file()
    job = (await gateway.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert job.storyboard_version == 1 and job.state == pb.JOB_STATE_REVIEW

    # Fixed in the kept file (the version it was made from is in its header).
    monkeypatch.setenv(
        "EDITOR", _editor(tmp_path, "good", "narration: ''", "narration: A fox, edited.")
    )
    code, stdout, stderr = await _run("edit", job_id, "--file", kept, "--gateway", gateway.address)
    assert code == 0, stderr
    assert stdout.strip() == "review"
    job = (await gateway.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert job.storyboard_version == 2
    assert job.storyboard.scenes[0].narration == "A fox, edited."

    output = tmp_path / "reviewed.mp4"
    code, stdout, stderr = await _run(
        "approve", job_id, "--gateway", gateway.address, "-o", str(output)
    )
    assert code == 0, stderr
    assert output.read_bytes() == b"mp4"
    assert upstream.compose_requests[-1].scenes[0].narration == "A fox, edited."


async def test_upload_image_prints_the_uri_of_a_reference_picture_and_refuses_text(
    gateway, tmp_path: Path
):
    from PIL import Image

    picture = tmp_path / "mira.png"
    Image.new("RGB", (48, 32), (200, 40, 40)).save(picture)
    code, stdout, stderr = await _run("upload-image", str(picture), "--gateway", gateway.address)
    assert code == 0, stderr
    assert "/uploads/" in stdout and stdout.strip().endswith(".png")
    assert "48x32" in stderr
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    code, stdout, stderr = await _run("upload-image", str(text), "--gateway", gateway.address)
    assert code == 2 and stdout == ""
    assert "upload refused" in stderr


async def test_what_to_know_of_a_video_is_printed_after_it_and_in_its_status(
    gateway, upstream, tmp_path: Path
):
    said = "captions: no installed font has U+1FAE8; left out of the burned captions"
    upstream.compose_warnings = [said]
    code, _, stderr = await _run(
        "generate", "a fox", "--gateway", gateway.address, "-o", str(tmp_path / "w.mp4")
    )
    assert code == 0, stderr
    assert f"warning: {said}" in stderr
    job_id = await _job(gateway)
    from storyreel.gateway.v1 import gateway_pb2 as pb

    job = (await gateway.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert list(job.warnings) == [said]
    code, _, stderr = await _run("status", job_id, "--gateway", gateway.address)
    # A row of its own (the table wraps long text).
    assert code == 0 and re.search(r"warning\s.*captions: no installed font has U\+1FAE8", stderr)
    # A new run starts without the last video's warnings; its own replace them.
    upstream.compose_warnings = ["scene 1 image is only 16x12 pixels"]
    await gateway.RegenerateScene(pb.RegenerateSceneRequest(job_id=job_id, index=1, seed=7))
    job = (await gateway.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert list(job.warnings) in ([], ["scene 1 image is only 16x12 pixels"])
    async for _ in gateway.WatchJob(pb.WatchJobRequest(job_id=job_id)):
        pass
    job = (await gateway.GetJob(pb.GetJobRequest(job_id=job_id))).job
    assert list(job.warnings) == ["scene 1 image is only 16x12 pixels"]
