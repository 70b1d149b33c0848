"""The ``storyreel`` command line.

    storyreel generate "PROMPT" [--audio FILE] [--scenes N] [--seed S] [-o out.mp4]
    storyreel generate --storyboard board.yaml [...]
    storyreel generate --review "PROMPT" [...]   (stops at the storyboard, prints it)
    storyreel edit JOB                          (the storyboard in $EDITOR, sent back)
    storyreel approve JOB [-o out.mp4]          (a job in review goes on)
    storyreel serve [--base-port N]
    storyreel status|watch|cancel|download JOB
    storyreel regenerate JOB INDEX [--prompt P] [--seed S]
    storyreel list
    storyreel storyboard "PROMPT" [--scenes N] [--style S] [--json] [--local] [-o board.yaml]
    storyreel parse-storyboard [--scenes N] < raw.txt

Exit codes: 0 success, 1 the job failed or was cancelled, 2 the request was
refused (bad input, unknown job, missing key), 3 the gateway is unreachable.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from importlib.metadata import entry_points
from pathlib import Path

import grpc
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from storyreel import compose_options, options
from storyreel.errors import UpstreamFailed
from storyreel.limits import AUDIO_FORMATS_TEXT, MAX_SCENES, MIN_SCENES

console = Console(stderr=True, soft_wrap=True)

DEFAULT_GATEWAY = os.environ.get("STORYREEL_GATEWAY", "127.0.0.1:50050")
DEFAULT_DATA_DIR = Path(os.environ.get("STORYREEL_HOME", "data"))
UPLOAD_CHUNK_BYTES = 256 * 1024
#: How long `watch` keeps trying to reach a gateway that went away (it may be restarting).
RECONNECT_FOR_S = 60.0

EXIT_JOB_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE = 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


#: The local commands (compose, storyboard --local, parse-storyboard) run a service's code in
#: this process. The service package offers it through an entry point of this group, named
#: after the root project's extra that installs the package (``pip install 'storyreel[llm]'``),
#: so this core imports no service package (tests/core/test_layering.py).
LOCAL_CODE_GROUP = "storyreel.local"


def _local_code(extra: str, command: str):
    """The module that the ``storyreel.local`` entry point ``extra`` names, imported.

    Refused, naming the extra to install, when no installed package offers it or
    what it needs is missing.
    """
    install = f"pip install 'storyreel[{extra}]'"
    found = entry_points(group=LOCAL_CODE_GROUP, name=extra)
    if not found:
        raise CliError(
            f"`storyreel {command}` runs the {extra} service in this process, and it is not "
            f"installed: {install}",
            EXIT_REFUSED,
        )
    try:
        return next(iter(found)).load()
    except ImportError as exc:
        raise CliError(
            f"`storyreel {command}` cannot load the {extra} service ({exc}): {install}",
            EXIT_REFUSED,
        ) from None


def _rpc_error(error: grpc.RpcError, what: str) -> CliError:
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return CliError(f"{what}: gateway unreachable ({error.details()})", EXIT_UNREACHABLE)
    return CliError(f"{what}: {code.name}: {error.details()}", EXIT_REFUSED)


def _pb():
    from storyreel.gateway.v1 import gateway_pb2

    return gateway_pb2


class GatewayClient:
    """The public API with the caller's key attached to every call."""

    def __init__(self, address: str, api_key: str = "", tls_ca: Path | None = None) -> None:
        from storyreel.gateway.v1 import gateway_pb2_grpc

        if tls_ca is not None:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
            self.channel = grpc.secure_channel(address, credentials)
        else:
            self.channel = grpc.insecure_channel(address)
        self.stub = gateway_pb2_grpc.StoryReelServiceStub(self.channel)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else ()

    def call(self, method: str, request, what: str, timeout: float = 60):
        try:
            return getattr(self.stub, method)(request, timeout=timeout, metadata=self.metadata)
        except grpc.RpcError as error:
            raise _rpc_error(error, what) from None

    def close(self) -> None:
        self.channel.close()


def _client(args: argparse.Namespace, stack: ExitStack, address: str | None = None):
    client = GatewayClient(address or args.gateway, args.api_key, args.tls_ca)
    stack.callback(client.close)
    return client


def _upload_requests(path: Path, kind: str = "UploadAudioRequest") -> Iterator:
    """The messages of an UploadAudio (or, with ``kind``, UploadImage) call sending ``path``."""
    message = getattr(_pb(), kind)
    yield message(filename=path.name)
    with path.open("rb") as fh:
        while chunk := fh.read(UPLOAD_CHUNK_BYTES):
            yield message(chunk=chunk)


def _fetch(url: str, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url) as response, output.open("wb") as fh:
            shutil.copyfileobj(response, fh)
    else:
        shutil.copyfile(url, output)


def _name(enum, value: int, prefix: str) -> str:
    return enum.Name(value).removeprefix(prefix).lower()


def _describe(job) -> str:
    pb = _pb()
    stages = {
        pb.STAGE_STORYBOARD: "writing storyboard",
        pb.STAGE_RENDER: "rendering scenes",
        pb.STAGE_COMPOSE: "composing video",
    }
    if job.state == pb.JOB_STATE_QUEUED:
        return "queued"
    if job.state == pb.JOB_STATE_RUNNING:
        return stages.get(job.stage, "running")
    return _name(pb.JobState, job.state, "JOB_STATE_")


def _watch(client: GatewayClient, job_id: str):
    """Follow the job with a progress bar; reconnects if the gateway restarts."""
    pb = _pb()
    job = None
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[eta]}"),
        TimeElapsedColumn(),
    )
    # REVIEW ends a watch too: the job waits for `storyreel approve`.
    finished = (pb.JOB_STATE_DONE, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED)
    finished += (pb.JOB_STATE_REVIEW,)
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("queued", total=100, eta="")
        lost_since = None
        timed: set[int] = set()  # stages whose time was printed
        while job is None or job.state not in finished:
            try:
                stream = client.stub.WatchJob(
                    pb.WatchJobRequest(job_id=job_id), metadata=client.metadata
                )
                for event in stream:
                    lost_since = None
                    job = event.job
                    description = _describe(job)
                    if event.kind == pb.EVENT_KIND_SCENE_RENDERED:
                        description = f"rendered scene {event.scene_index}/{job.scene_count}"
                    elif event.kind == pb.EVENT_KIND_RETRYING:
                        description = f"retrying: {event.message}"[:80]
                    eta = f"~{job.eta_s:.0f}s left" if job.eta_s > 0 else ""
                    progress.update(task, completed=job.progress, description=description, eta=eta)
                    for line in _stage_times(job, timed):
                        progress.console.print(line)
            except grpc.RpcError as error:
                if error.code() != grpc.StatusCode.UNAVAILABLE:
                    raise _rpc_error(error, f"cannot watch job {job_id}") from None
                lost_since = lost_since or time.monotonic()
                if time.monotonic() - lost_since > RECONNECT_FOR_S:
                    raise _rpc_error(error, f"lost track of job {job_id}") from None
                progress.update(task, description="gateway unreachable, reconnecting")
                time.sleep(1.0)
    return job


def _stage_times(job, timed: set[int]) -> list[str]:
    """A line for each stage that finished since the last call (``timed`` keeps count)."""
    pb = _pb()
    lines = []
    for record in job.stages:
        if record.state != pb.JOB_STATE_DONE or record.stage in timed:
            continue
        timed.add(record.stage)
        line = f"{_name(pb.Stage, record.stage, 'STAGE_')} took {record.duration_s:.1f} s"
        if record.stage == pb.STAGE_RENDER and job.scene_count:
            line += f" ({record.duration_s / job.scene_count:.1f} s per scene)"
        lines.append(line)
    return lines


def _final(job, job_id: str) -> None:
    """Raise CliError unless the job is DONE; a done job's warnings go to stderr."""
    pb = _pb()
    if job.state == pb.JOB_STATE_DONE:
        for warning in job.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        return
    if job.state == pb.JOB_STATE_FAILED:
        stage = _name(pb.Stage, job.error.stage, "STAGE_")
        raise CliError(
            f"job {job_id} failed at the {stage} stage: {job.error.code}: {job.error.message}",
            EXIT_JOB_FAILED,
        )
    raise CliError(f"job {job_id} ended {_describe(job)}", EXIT_JOB_FAILED)


def _read_artifact(client: GatewayClient, job_id: str, uri: str, output: Path) -> None:
    """Stream one of the job's artifacts from the gateway (ReadArtifact) into ``output``."""
    pb = _pb()
    output.parent.mkdir(parents=True, exist_ok=True)
    part = output.with_name(f".{output.name}.part")
    request = pb.ReadArtifactRequest(job_id=job_id, uri=uri)
    try:
        with part.open("wb") as fh:
            for message in client.stub.ReadArtifact(request, metadata=client.metadata):
                fh.write(message.chunk)
    except grpc.RpcError as error:
        part.unlink(missing_ok=True)
        raise _rpc_error(error, f"cannot download {uri}") from None
    part.replace(output)


def _download(job, output: Path, client: GatewayClient | None = None) -> Path:
    """Fetch the video to ``output``, and its captions beside it (``.srt``, ``.vtt``).

    A URL (S3 storage: presigned) is fetched directly. A path (file storage) is one
    on the gateway's machine: with ``client`` the bytes come through the gateway's
    ReadArtifact, so this works from anywhere.
    """
    wanted = [(job.video_uri, job.video_url, output)]
    for artifact, suffix in ((job.captions_srt, ".srt"), (job.captions_vtt, ".vtt")):
        if artifact.url:
            wanted.append((artifact.uri, artifact.url, output.with_suffix(suffix)))
    for uri, url, path in wanted:
        if client is not None and not url.startswith(("http://", "https://")):
            _read_artifact(client, job.job_id, uri, path)
        else:
            _fetch(url, path)
    return output.resolve()


def _video_options(args: argparse.Namespace) -> dict:
    """CreateVideoRequest fields from the generate command's options."""

    if args.music and not args.audio:
        raise CliError("--music plays your --audio under the narration; give --audio", EXIT_REFUSED)
    return {
        "aspect": options.to_enum(options.ASPECTS, args.aspect or ""),
        "resolution": options.to_enum(options.RESOLUTIONS, args.resolution or ""),
        "consistency": options.to_enum(options.CONSISTENCY, args.consistency or ""),
        "captions": options.to_enum(options.CAPTIONS, args.captions or ""),
        "audio_mode": options.to_enum(options.AUDIO_MODES, "music" if args.music else ""),
        "voice": args.voice,
    }


def _own_storyboard(args: argparse.Namespace):
    """The storyboard of ``--storyboard FILE`` as the contract's message, checked here as
    the gateway will check it (None without the option)."""
    if args.storyboard is None:
        if not args.prompt:
            raise CliError("give a PROMPT, or --storyboard FILE", EXIT_REFUSED)
        return None
    if args.prompt:
        raise CliError("give a PROMPT or --storyboard FILE, not both", EXIT_REFUSED)
    from storyreel.storyboard import storyboard_to_proto
    from storyreel.storyboard_files import StoryboardFileError, load_storyboard

    try:
        return storyboard_to_proto(load_storyboard(args.storyboard))
    except StoryboardFileError as exc:
        raise CliError(str(exc), EXIT_REFUSED) from None


def cmd_generate(args: argparse.Namespace) -> int:
    pb = _pb()
    if args.audio and not args.audio.is_file():
        raise CliError(f"audio file {args.audio} does not exist", EXIT_REFUSED)
    storyboard = _own_storyboard(args)
    chosen = _video_options(args)
    with ExitStack() as stack:
        address = _start_stack(stack, args.data_dir)[1] if args.serve else None
        client = _client(args, stack, address)
        audio_uri = ""
        if args.audio:
            audio_uri = client.call(
                "UploadAudio", _upload_requests(args.audio), "upload refused", timeout=300
            ).audio_uri
        job_id = client.call(
            "CreateVideo",
            pb.CreateVideoRequest(
                prompt=args.prompt,
                scene_count=args.scenes,
                style=args.style,
                seed=args.seed,
                audio_uri=audio_uri,
                width=args.width,
                height=args.height,
                fps=args.fps,
                idempotency_key=args.idempotency_key,
                storyboard=storyboard,
                review=args.review,
                **chosen,
            ),
            "request refused",
        ).job_id
        console.print(f"job [bold]{job_id}[/bold]")
        job = _watch(client, job_id)
        if args.review and job.state == pb.JOB_STATE_REVIEW:
            print(job_id)
            _print_storyboard(_storyboard_json(job.storyboard))
            console.print(
                f"storyboard version {job.storyboard_version} waits for review: "
                f"`storyreel edit {job_id}` to change it, `storyreel approve {job_id}` to "
                "render it"
            )
            return 0
        _final(job, job_id)
        output = _download(job, args.output, client)
        console.print(
            f"[green]video[/green] {job.storyboard.title!r}: {len(job.images)} scenes, "
            f"{job.duration_s:.1f} s"
        )
        print(output)
    return 0


def _one_call(args: argparse.Namespace, method: str, request, refused: str):
    """The job from one gateway call (GetJob, CancelJob) on a connection of its own."""
    with ExitStack() as stack:
        return _client(args, stack).call(method, request, refused).job


def cmd_status(args: argparse.Namespace) -> int:
    pb = _pb()
    job = _one_call(args, "GetJob", pb.GetJobRequest(job_id=args.job), f"job {args.job}")
    table = Table(title=f"job {job.job_id}", show_header=False)
    table.add_row("state", _describe(job))
    table.add_row("progress", f"{job.progress:.0f}%")
    table.add_row("prompt", job.prompt)
    if job.storyboard.title:
        table.add_row("title", job.storyboard.title)
    for stage in job.stages:
        name = _name(pb.Stage, stage.stage, "STAGE_")
        state = _name(pb.JobState, stage.state, "JOB_STATE_")
        table.add_row(f"stage {name}", f"{state} {stage.duration_s:.1f} s")
    if job.state == pb.JOB_STATE_FAILED:
        table.add_row("error", f"{job.error.code}: {job.error.message}")
    for warning in job.warnings:
        table.add_row("warning", warning)
    if job.video_url:
        table.add_row("video", job.video_url)
    for label, artifact in (
        ("captions", job.captions_srt),
        ("captions (vtt)", job.captions_vtt),
        ("poster", job.poster),
        ("contact sheet", job.contact_sheet),
    ):
        if artifact.url:
            table.add_row(label, artifact.url)
    console.print(table)
    print(_name(pb.JobState, job.state, "JOB_STATE_"))
    return 0 if job.state != pb.JOB_STATE_FAILED else EXIT_JOB_FAILED


def cmd_watch(args: argparse.Namespace) -> int:
    with ExitStack() as stack:
        job = _watch(_client(args, stack), args.job)
    _final(job, args.job)
    print(job.video_url)
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    pb = _pb()
    with ExitStack() as stack:
        response = _client(args, stack).call(
            "ListJobs",
            pb.ListJobsRequest(page_size=args.limit, page_token=args.page_token),
            "list refused",
        )
    table = Table("job", "state", "progress", "created", "prompt")
    for job in response.jobs:
        created = job.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        table.add_row(job.job_id, _describe(job), f"{job.progress:.0f}%", created, job.prompt[:50])
    console.print(table)
    for job in response.jobs:
        print(job.job_id, _name(pb.JobState, job.state, "JOB_STATE_"))
    if response.next_page_token:
        console.print(f"more: --page-token {response.next_page_token}")
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    pb = _pb()
    job = _one_call(
        args, "CancelJob", pb.CancelJobRequest(job_id=args.job), f"cannot cancel {args.job}"
    )
    print(_name(pb.JobState, job.state, "JOB_STATE_"))
    return 0


def cmd_regenerate(args: argparse.Namespace) -> int:
    pb = _pb()
    request = pb.RegenerateSceneRequest(job_id=args.job, index=args.index)
    if args.prompt is not None:
        request.prompt = args.prompt
    if args.seed is not None:
        request.seed = args.seed
    with ExitStack() as stack:
        client = _client(args, stack)
        client.call("RegenerateScene", request, f"cannot regenerate scene {args.index}")
        return _follow(client, args)


def cmd_edit(args: argparse.Namespace) -> int:
    """The job's storyboard as YAML in $EDITOR, sent back with UpdateStoryboard."""
    import shlex
    import subprocess
    import tempfile

    from storyreel.storyboard import storyboard_from_proto, storyboard_to_proto
    from storyreel.storyboard_files import StoryboardFileError, dump_storyboard, load_storyboard

    pb = _pb()
    with ExitStack() as stack:
        client = _client(args, stack)
        job = client.call("GetJob", pb.GetJobRequest(job_id=args.job), f"job {args.job}").job
        if not job.HasField("storyboard"):
            raise CliError(f"job {args.job} has no storyboard yet", EXIT_REFUSED)
        original = storyboard_from_proto(job.storyboard)
        version = job.storyboard_version
        if args.file is not None:
            # A file an earlier `edit` kept: the version it was made from is in its header.
            path = args.file
            if not path.is_file():
                raise CliError(f"{path} does not exist", EXIT_REFUSED)
            made_from = re.search(r"^# version: (\d+)", path.read_text(encoding="utf-8"), re.M)
            if made_from:
                version = int(made_from.group(1))
        else:
            handle, name = tempfile.mkstemp(prefix=f"storyreel-{args.job[:32]}-", suffix=".yaml")
            os.close(handle)
            path = Path(name)
            dump_storyboard(original, path)
            header = _EDIT_HEADER.format(job=args.job, version=version)
            path.write_text(header + path.read_text(encoding="utf-8"), encoding="utf-8")
        editor = shlex.split(os.environ.get("EDITOR") or "vi")
        try:
            status = subprocess.call([*editor, str(path)])
        except OSError as exc:
            raise CliError(f"cannot run the editor {editor[0]!r}: {exc}", EXIT_REFUSED) from None
        if status != 0:
            raise CliError(
                f"the editor exited with {status}; nothing was sent (your file: {path})",
                EXIT_REFUSED,
            )
        try:
            edited = load_storyboard(path, renumber=True)
        except StoryboardFileError as exc:
            raise CliError(
                f"{exc}\nnothing was sent; your edit is kept in {path} "
                f"(fix it with `storyreel edit {args.job} --file {path}`)",
                EXIT_REFUSED,
            ) from None
        if edited == original:
            path.unlink(missing_ok=True)
            console.print("no change; nothing sent")
            print(_name(pb.JobState, job.state, "JOB_STATE_"))
            return 0
        request = pb.UpdateStoryboardRequest(
            job_id=args.job,
            storyboard=storyboard_to_proto(edited),
            version=version,
        )
        # Refused (a stale version, a bad field): the file stays, named in the message.
        updated = client.call(
            "UpdateStoryboard", request, f"storyboard refused (your edit: {path})"
        ).job
        path.unlink(missing_ok=True)
    console.print(f"storyboard version {updated.storyboard_version} stored")
    if updated.state == pb.JOB_STATE_QUEUED:
        console.print(f"a new run makes the video again: `storyreel watch {args.job}`")
    print(_name(pb.JobState, updated.state, "JOB_STATE_"))
    return 0


_EDIT_HEADER = """\
# The storyboard of job {job}
# version: {version}
# Edit the storyboard, save and quit; an unchanged file sends nothing.
# Scenes may be added, removed and reordered: they are numbered by position
# (a new scene needs some index; the index only says which scene it was).
# A scene whose image_prompt, characters or their appearances change is drawn
# again; a narration change keeps its image.
"""


def _follow(client: GatewayClient, args: argparse.Namespace) -> int:
    """After a call that starts a run: print the job id (--no-wait), or wait for the video
    and print where it is (or save it with -o)."""
    if args.no_wait:
        print(args.job)
        return 0
    job = _watch(client, args.job)
    _final(job, args.job)
    if args.output:
        print(_download(job, args.output, client))
    else:
        print(job.video_url)
    return 0


def cmd_upload_image(args: argparse.Namespace) -> int:
    """Upload a character's reference picture; print its URI (for a storyboard's reference_uri)."""
    if not args.image.is_file():
        raise CliError(f"{args.image} does not exist", EXIT_REFUSED)
    with ExitStack() as stack:
        client = _client(args, stack)
        stored = client.call(
            "UploadImage",
            _upload_requests(args.image, "UploadImageRequest"),
            "upload refused",
            timeout=300,
        )
    console.print(f"{stored.format} {stored.width}x{stored.height}, {stored.size_bytes} bytes")
    print(stored.image_uri)
    return 0


def cmd_approve(args: argparse.Namespace) -> int:
    """Let a job in review go on; waits for the video unless --no-wait."""
    pb = _pb()
    with ExitStack() as stack:
        client = _client(args, stack)
        version = args.version
        if version is None:
            job = client.call("GetJob", pb.GetJobRequest(job_id=args.job), f"job {args.job}").job
            version = job.storyboard_version
        request = pb.ApproveStoryboardRequest(job_id=args.job, version=version)
        client.call("ApproveStoryboard", request, f"cannot approve {args.job}")
        return _follow(client, args)


def cmd_download(args: argparse.Namespace) -> int:
    pb = _pb()
    with ExitStack() as stack:
        client = _client(args, stack)
        job = client.call("GetJob", pb.GetJobRequest(job_id=args.job), f"job {args.job}").job
        _final(job, args.job)
        print(_download(job, args.output or Path(f"{args.job}.mp4"), client))
    return 0


def _start_stack(stack: ExitStack, data_dir: Path, base_port: int | None = None):
    """Start the local stack, stopped when ``stack`` closes; returns (LocalStack, address).

    Each service listens on its STORYREEL_<SERVICE>_PORT, or with ``base_port`` N on
    N (gateway), N+1 (llm), N+2 (diffusion) and N+3 (composer); the studio page (the
    gateway's web port) on N+4.
    """
    from storyreel.stack import LocalStack

    try:
        local = stack.enter_context(LocalStack(data_dir, base_port=base_port))
        with console.status("starting storyreel services (loading models)..."):
            address = local.start(
                on_ready=lambda p: console.print(f"  {p.spec.name} ready on {p.address}")
            )
        if web_url := getattr(local, "web_url", None):
            console.print(f"  studio (the web page) on [bold]{web_url}[/bold]")
    except ValueError as exc:  # a port setting that is no port
        raise CliError(str(exc), EXIT_REFUSED) from None
    except UpstreamFailed as exc:
        raise CliError(str(exc), EXIT_UNREACHABLE) from None
    return local, address


def cmd_serve(args: argparse.Namespace) -> int:
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with ExitStack() as stack:
        local, address = _start_stack(stack, args.data_dir, args.base_port)
        console.print(
            f"[green]storyreel is serving[/green] on {address} (logs in {args.data_dir}/logs)"
        )
        while not stopping.wait(0.5):
            for running in local.processes.values():
                if running.process.poll() is not None:
                    raise CliError(
                        f"{running.spec.name} exited with code {running.process.returncode}:\n"
                        f"{running.log_tail()}",
                        EXIT_UNREACHABLE,
                    )
        console.print("stopping...")
    return 0


def cmd_compose(args: argparse.Namespace) -> int:
    """Compose a video from local images and audio, without the other services."""
    from storyreel.errors import StoryreelError

    # The composer (piper, PIL, ffmpeg) runs in this process: storyreel_composer.local, the
    # `composer` extra, is needed by this command only.
    compose_files = _local_code("composer", "compose").compose_files

    chosen = compose_options.ComposeOptions(
        aspect=args.aspect or "",
        resolution=args.resolution or "",
        fit=args.fit or "",
        transition=args.transition or "",
        crossfade_s=args.crossfade,
        motion=args.motion or "",
        seed=args.seed,
        captions=args.captions or "",
        audio_mode="music" if args.music else "",
        voice=args.voice,
        speaking_rate=args.rate,
    )
    try:
        with console.status("composing video..."):
            made = compose_files(
                args.images,
                args.output,
                audio=args.audio,
                narration=args.narration,
                options=chosen,
                fps=args.fps,
            )
    except StoryreelError as exc:
        raise CliError(exc.message, EXIT_REFUSED) from None
    except RuntimeError as exc:
        raise CliError(str(exc), EXIT_JOB_FAILED) from None
    result = made.result
    console.print(
        f"[green]video[/green] {len(result.scene_starts_s)} scenes, {result.duration_s:.2f} s, "
        f"{result.width}x{result.height} at {result.fps} fps"
    )
    for warning in result.warnings:
        console.print(f"[yellow]warning[/yellow] {escape(warning)}", highlight=False)
    for extra in (made.captions_srt, made.captions_vtt, made.poster, made.contact_sheet):
        if extra is not None:
            console.print(f"  {extra}")
    print(made.video.resolve())
    return 0


DEFAULT_LLM_ADDRESS = os.environ.get("STORYREEL_LLM", "127.0.0.1:50051")


def _base_port(text: str) -> int:
    """argparse type: the first of five consecutive ports (1 to 65531)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= value <= 65531:
        raise argparse.ArgumentTypeError(
            f"base port must be from 1 to 65531 (it and the next four are used), got {value}"
        )
    return value


def _scene_count(text: str) -> int:
    """argparse type: a scene count within the shared bounds (:mod:`storyreel.limits`)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not MIN_SCENES <= value <= MAX_SCENES:
        raise argparse.ArgumentTypeError(
            f"scene count must be between {MIN_SCENES} and {MAX_SCENES} (got {value})"
        )
    return value


def _storyboard_json(board) -> dict:
    """A story.v1 Storyboard message as the JSON `storyreel storyboard --json` prints."""
    return {
        "title": board.title,
        "logline": board.logline,
        "characters": [{"name": c.name, "appearance": c.appearance} for c in board.characters],
        "scenes": [
            {
                "index": s.index,
                "narration": s.narration,
                "image_prompt": s.image_prompt,
                "characters": list(s.characters),
                "setting": s.setting,
                "action": s.action,
                "camera": s.camera,
            }
            for s in board.scenes
        ],
        "style": board.style,
        "degraded": board.degraded,
    }


def _print_storyboard(board: dict) -> None:
    """The storyboard as readable text on stdout."""
    print(board["title"])
    if board.get("logline"):
        print(board["logline"])
    if board["characters"]:
        print("\nCharacters:")
        for character in board["characters"]:
            print(f"  {character['name']}: {character['appearance']}")
    for scene in board["scenes"]:
        present = ", ".join(scene.get("characters") or [])
        print(f"\nScene {scene['index']}" + (f" ({present})" if present else ""))
        print(f"  narration:    {scene['narration']}")
        print(f"  image prompt: {scene['image_prompt']}")
    if board.get("degraded"):
        print("\n(degraded: part of this storyboard was rebuilt from the story's sentences)")


def _storyboard_remote(args: argparse.Namespace) -> dict:
    from storyreel.channels import internal_channel_credentials, internal_metadata
    from storyreel.llm.v1 import llm_pb2, llm_pb2_grpc
    from storyreel.settings import InternalSettings

    request = llm_pb2.WriteStoryboardRequest(
        prompt=args.prompt, scene_count=args.scenes, style=args.style, seed=args.seed
    )
    # The LLM service is internal: it wants the deployment's token (and, with mutual
    # TLS, a client certificate), from the same STORYREEL_INTERNAL_* settings.
    try:
        internal = InternalSettings()
    except ValueError as exc:
        raise CliError(f"internal settings: {exc}", EXIT_REFUSED) from None
    credentials = internal_channel_credentials(internal)
    channel = (
        grpc.secure_channel(args.address, credentials)
        if credentials is not None
        else grpc.insecure_channel(args.address)
    )
    with channel:
        try:
            response = llm_pb2_grpc.LlmServiceStub(channel).WriteStoryboard(
                request, timeout=args.timeout, metadata=internal_metadata(internal)
            )
        except grpc.RpcError as error:
            code, details = error.code(), error.details()
            if code == grpc.StatusCode.INVALID_ARGUMENT:
                raise CliError(f"request refused: {details}", EXIT_REFUSED) from None
            if code == grpc.StatusCode.UNAUTHENTICATED:
                raise CliError(
                    f"the LLM service refused the call: {details}; set "
                    "STORYREEL_INTERNAL_TOKEN (or ..._TOKEN_FILE) to its internal token",
                    EXIT_REFUSED,
                ) from None
            if code == grpc.StatusCode.UNAVAILABLE and "connect" in (details or "").lower():
                raise CliError(
                    f"LLM service at {args.address} unreachable ({details})", EXIT_UNREACHABLE
                ) from None
            raise CliError(f"no storyboard: {code.name}: {details}", EXIT_JOB_FAILED) from None
    return _storyboard_json(response.storyboard)


def _storyboard_local(args: argparse.Namespace) -> dict:
    from storyreel.errors import InvalidInput, StoryreelError

    # The LLM service's writer (and the model it loads) runs in this process:
    # storyreel_llm.local, the `llm` extra, is needed by --local only.
    backend, writer = _local_code("llm", "storyboard --local").local_writer()
    try:
        writer.check_request(args.prompt, args.scenes, args.style)
        with console.status(f"loading the {backend.name} model..."):
            backend.load()
        with console.status("writing the storyboard..."):
            board = writer.write(args.prompt, args.scenes, args.style, args.seed)
    except InvalidInput as exc:
        raise CliError(f"request refused: {exc.message}", EXIT_REFUSED) from None
    except StoryreelError as exc:
        raise CliError(f"no storyboard: {exc.message}", EXIT_JOB_FAILED) from None
    finally:
        backend.close()
    return board.to_dict()


def cmd_storyboard(args: argparse.Namespace) -> int:
    """Write a storyboard with the LLM service (or, with --local, in this process)."""
    board = _storyboard_local(args) if args.local else _storyboard_remote(args)
    if args.output is not None:
        from storyreel.storyboard_files import dump_storyboard

        try:
            dump_storyboard(board, args.output)
        except OSError as exc:
            raise CliError(f"cannot write {args.output}: {exc}", EXIT_REFUSED) from None
        console.print(f"storyboard written to {args.output}")
    if args.json:
        import json

        print(json.dumps(board, indent=2, ensure_ascii=False))
    else:
        _print_storyboard(board)
    return 0


def cmd_parse_storyboard(args: argparse.Namespace) -> int:
    """Read a model's raw answer on stdin; print the storyboard it holds as JSON."""
    import json

    # The free-form reader lives in the LLM service's package: storyreel_llm.local, the `llm`
    # extra.
    llm = _local_code("llm", "parse-storyboard")
    text = sys.stdin.read()
    try:
        board = llm.parse_storyboard(text, args.scenes)
    except llm.UnusableAnswer as exc:
        raise CliError(f"no usable storyboard: {exc}", EXIT_JOB_FAILED) from None
    print(json.dumps(board.to_dict(), indent=2, ensure_ascii=False))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storyreel", description="One prompt in, a narrated video out."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    def client_command(name: str, help: str, func) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help)
        command.add_argument(
            "--gateway", default=DEFAULT_GATEWAY, help="gateway address (host:port)"
        )
        command.add_argument(
            "--api-key",
            default=os.environ.get("STORYREEL_API_KEY", ""),
            help="API key (default: $STORYREEL_API_KEY)",
        )
        command.add_argument("--tls-ca", type=Path, help="CA certificate of a TLS gateway")
        command.set_defaults(func=func)
        return command

    gen = client_command("generate", "make a video from a prompt", cmd_generate)
    gen.add_argument("prompt", nargs="?", default="")
    gen.add_argument(
        "--storyboard",
        type=Path,
        help="your own storyboard (JSON or YAML, as `storyreel storyboard -o` writes) "
        "instead of a prompt",
    )
    gen.add_argument("--audio", type=Path, help=f"your own audio track ({AUDIO_FORMATS_TEXT})")
    gen.add_argument(
        "--scenes",
        type=int,
        default=0,
        help=f"number of scenes ({MIN_SCENES}-{MAX_SCENES}; 0: the gateway's default)",
    )
    gen.add_argument("--seed", type=int, default=0, help="the same seed gives the same images")
    gen.add_argument("--style", default="", help="style preset or free text")
    gen.add_argument("--width", type=int, default=0)
    gen.add_argument("--height", type=int, default=0)
    gen.add_argument("--fps", type=int, default=0)
    gen.add_argument("--aspect", choices=list(options.ASPECTS), help="instead of width/height")
    gen.add_argument("--resolution", choices=list(options.RESOLUTIONS), help="with --aspect")
    gen.add_argument(
        "--consistency",
        choices=list(options.CONSISTENCY),
        help="how characters keep their look (default: the diffusion service's)",
    )
    gen.add_argument("--captions", choices=list(options.CAPTIONS))
    gen.add_argument(
        "--music", action="store_true", help="narrate, with --audio played under it as music"
    )
    gen.add_argument(
        "--voice", default="", help="narration voice name (default: one of the story's language)"
    )
    gen.add_argument("--idempotency-key", default="", help="retry-safe key for this request")
    gen.add_argument(
        "--review",
        action="store_true",
        help="stop once the storyboard is written and print it (then `storyreel edit`, "
        "`storyreel approve`)",
    )
    gen.add_argument("-o", "--output", type=Path, default=Path("storyreel.mp4"))
    gen.add_argument(
        "--serve", action="store_true", help="start the whole stack locally for this one video"
    )
    gen.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)

    for name, help, func in (
        ("status", "show a job", cmd_status),
        ("watch", "follow a job until it ends", cmd_watch),
        ("cancel", "cancel a job", cmd_cancel),
    ):
        client_command(name, help, func).add_argument("job")
    download = client_command("download", "save a finished job's video", cmd_download)
    download.add_argument("job")
    download.add_argument("-o", "--output", type=Path)

    listing = client_command("list", "list your jobs, newest first", cmd_list)
    listing.add_argument("--limit", type=int, default=20)
    listing.add_argument("--page-token", default="")

    regen = client_command("regenerate", "draw one scene again and recompose", cmd_regenerate)
    regen.add_argument("job")
    regen.add_argument("index", type=int, help="scene number (1-based)")
    regen.add_argument("--prompt", help="new image prompt for the scene")
    regen.add_argument(
        "--seed", type=int, help="new seed for the scene (0: back to the job's derived one)"
    )
    regen.add_argument("-o", "--output", type=Path, help="also save the new video here")
    regen.add_argument("--no-wait", action="store_true", help="return at once")

    edit = client_command(
        "edit",
        "change a job's storyboard in $EDITOR (in review, or finished: makes the video again)",
        cmd_edit,
    )
    edit.add_argument("job")
    edit.add_argument(
        "--file", type=Path, help="edit and send this file (one an earlier `edit` kept) instead"
    )
    upload_image = client_command(
        "upload-image",
        "upload a character's reference picture (PNG, JPEG, WebP); prints its URI",
        cmd_upload_image,
    )
    upload_image.add_argument("image", type=Path)
    approve = client_command("approve", "let a job in review render its storyboard", cmd_approve)
    approve.add_argument("job")
    approve.add_argument(
        "--version", type=int, help="the storyboard version reviewed (default: the current one)"
    )
    approve.add_argument("-o", "--output", type=Path, help="also save the video here")
    approve.add_argument("--no-wait", action="store_true", help="return at once")

    serve = sub.add_parser("serve", help="run every service on localhost until interrupted")
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    serve.add_argument(
        "--base-port",
        type=_base_port,
        default=None,
        metavar="N",
        help="listen on N (gateway), N+1 (llm), N+2 (diffusion), N+3 (composer) and N+4 "
        "(the studio web page); default: each STORYREEL_<SERVICE>_PORT, else 50050-50054",
    )
    serve.set_defaults(func=cmd_serve)

    comp = sub.add_parser(
        "compose",
        help="make a video from your own images and audio (no other service needed)",
        description="Images (in name order) plus your audio and/or narration become an MP4 "
        "with Ken Burns motion, crossfades and captions. The narration file has one line per "
        "image. Beside the video go its captions (.srt, .vtt), a poster and a contact sheet.",
    )
    comp.add_argument("--images", type=Path, required=True, help="folder of scene images")
    comp.add_argument(
        "--audio", type=Path, help=f"your audio ({AUDIO_FORMATS_TEXT}): the sound track"
    )
    comp.add_argument(
        "--narration", type=Path, help="text file, one line per image: captions and narration"
    )
    comp.add_argument(
        "--music",
        action="store_true",
        help="speak the narration and play --audio under it as music (ducked, faded out)",
    )
    comp.add_argument("--aspect", choices=list(options.ASPECTS))
    comp.add_argument("--resolution", choices=list(options.RESOLUTIONS))
    comp.add_argument("--fps", type=int, default=0)
    comp.add_argument("--fit", choices=list(compose_options.FITS))
    comp.add_argument("--transition", choices=list(compose_options.TRANSITIONS))
    comp.add_argument("--crossfade", type=float, default=0.0, help="crossfade length in seconds")
    comp.add_argument("--motion", choices=list(compose_options.MOTIONS))
    comp.add_argument("--seed", type=int, default=0, help="seed of the Ken Burns moves")
    comp.add_argument("--captions", choices=list(options.CAPTIONS))
    comp.add_argument(
        "--voice", default="", help="narration voice name (default: one of the story's language)"
    )
    comp.add_argument("--rate", type=float, default=0.0, help="speaking rate (1 = normal)")
    comp.add_argument("-o", "--output", type=Path, default=Path("storyreel.mp4"))
    comp.set_defaults(func=cmd_compose)

    board = sub.add_parser(
        "storyboard",
        help="write a storyboard (title, characters, scenes) without making a video",
        description="Asks the LLM service (STORYREEL_LLM, default 127.0.0.1:50051) "
        "for a storyboard and prints it, presenting the internal token of "
        "STORYREEL_INTERNAL_TOKEN (or ..._TOKEN_FILE) when the service wants one. With --local "
        "the story writer runs in this process instead, configured by the same "
        "STORYREEL_LLM_* settings as the service.",
    )
    board.add_argument("prompt")
    board.add_argument(
        "--scenes",
        type=_scene_count,
        default=3,
        help=f"number of scenes ({MIN_SCENES}-{MAX_SCENES})",
    )
    board.add_argument("--style", default="", help="style preset or free text")
    board.add_argument("--seed", type=int, default=0, help="the same seed gives the same story")
    board.add_argument("--json", action="store_true", help="print the storyboard as JSON")
    board.add_argument(
        "-o",
        "--output",
        type=Path,
        help="also write it to this file (JSON for .json, YAML otherwise), "
        "for `storyreel generate --storyboard`",
    )
    board.add_argument(
        "--address", default=DEFAULT_LLM_ADDRESS, help="LLM service address (host:port)"
    )
    board.add_argument(
        "--local", action="store_true", help="run the story writer in this process (no service)"
    )
    board.add_argument("--timeout", type=float, default=600.0, help="seconds to wait")
    board.set_defaults(func=cmd_storyboard)

    parse = sub.add_parser(
        "parse-storyboard",
        help="read a storyboard out of a model's raw answer on stdin",
        description="Reads an LLM's raw answer (JSON, fenced or cut off, labels, lists, "
        "delimited prompts, or plain prose) on stdin and prints the storyboard as JSON. "
        "Exits 1, saying why, when nothing usable is found.",
    )
    parse.add_argument(
        "--scenes", type=_scene_count, default=None, help="require exactly this many scenes"
    )
    parse.set_defaults(func=cmd_parse_storyboard)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # SIGTERM unwinds like Ctrl-C, so a stack started with --serve is stopped, not orphaned.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return args.func(args)
    except CliError as exc:
        console.print(f"[red]error:[/red] {exc}")
        return exc.code
    except KeyboardInterrupt:
        console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
