"""The ``storyreel`` command line.

storyreel generate "PROMPT" [--audio FILE] [--scenes N] [--seed S] [-o out.mp4]
storyreel serve
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import threading
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import grpc
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from storyreel.errors import UpstreamFailed

console = Console(stderr=True, soft_wrap=True)

DEFAULT_GATEWAY = os.environ.get("STORYREEL_GATEWAY", "127.0.0.1:50050")
DEFAULT_DATA_DIR = Path(os.environ.get("STORYREEL_HOME", "data"))
UPLOAD_CHUNK_BYTES = 256 * 1024

#: Exit codes: 1 the job failed, 2 the request was refused, 3 the stack or gateway is unreachable.
EXIT_JOB_FAILED, EXIT_REFUSED, EXIT_UNREACHABLE = 1, 2, 3


class CliError(Exception):
    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _rpc_error(error: grpc.RpcError, what: str) -> CliError:
    code = error.code()
    if code == grpc.StatusCode.UNAVAILABLE:
        return CliError(f"{what}: gateway unreachable ({error.details()})", EXIT_UNREACHABLE)
    return CliError(f"{what}: {code.name}: {error.details()}", EXIT_REFUSED)


def _upload_requests(path: Path) -> Iterator:
    from storyreel.gateway.v1 import gateway_pb2

    yield gateway_pb2.UploadAudioRequest(filename=path.name)
    with path.open("rb") as fh:
        while chunk := fh.read(UPLOAD_CHUNK_BYTES):
            yield gateway_pb2.UploadAudioRequest(chunk=chunk)


def _fetch(url: str, output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    if url.startswith(("http://", "https://")):
        with urllib.request.urlopen(url) as response, output.open("wb") as fh:
            shutil.copyfileobj(response, fh)
    else:
        shutil.copyfile(url, output)


def _watch(stub, job_id: str):
    """Follow the job with a progress bar; returns the final Job message."""
    from storyreel.gateway.v1 import gateway_pb2

    stage_names = {
        gateway_pb2.STAGE_STORYBOARD: "writing storyboard",
        gateway_pb2.STAGE_RENDER: "rendering scenes",
        gateway_pb2.STAGE_COMPOSE: "composing video",
    }
    job = None
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("queued", total=100)
        for event in stub.WatchJob(gateway_pb2.WatchJobRequest(job_id=job_id)):
            job = event.job
            description = stage_names.get(job.stage, "queued")
            if event.kind == gateway_pb2.EVENT_KIND_SCENE_RENDERED:
                description = f"rendered scene {event.scene_index}/{job.scene_count}"
            if job.state == gateway_pb2.JOB_STATE_DONE:
                description = "done"
            elif job.state in (gateway_pb2.JOB_STATE_FAILED, gateway_pb2.JOB_STATE_CANCELLED):
                description = (
                    gateway_pb2.JobState.Name(job.state).removeprefix("JOB_STATE_").lower()
                )
            progress.update(task, completed=job.progress, description=description)
    return job


def cmd_generate(args: argparse.Namespace) -> int:
    from storyreel.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    if args.audio and not args.audio.is_file():
        raise CliError(f"audio file {args.audio} does not exist", EXIT_REFUSED)
    with ExitStack() as stack:
        address = args.gateway
        if args.serve:
            _, address = _start_stack(stack, args.data_dir)
        channel = stack.enter_context(grpc.insecure_channel(address))
        stub = gateway_pb2_grpc.StoryReelServiceStub(channel)
        audio_uri = ""
        try:
            if args.audio:
                audio_uri = stub.UploadAudio(_upload_requests(args.audio), timeout=300).audio_uri
            job_id = stub.CreateVideo(
                gateway_pb2.CreateVideoRequest(
                    prompt=args.prompt,
                    scene_count=args.scenes,
                    style=args.style,
                    seed=args.seed,
                    audio_uri=audio_uri,
                    width=args.width,
                    height=args.height,
                    fps=args.fps,
                ),
                timeout=60,
            ).job_id
        except grpc.RpcError as error:
            raise _rpc_error(error, "request refused") from None
        console.print(f"job [bold]{job_id}[/bold]")
        try:
            job = _watch(stub, job_id)
        except grpc.RpcError as error:
            raise _rpc_error(error, f"lost track of job {job_id}") from None
        if job is None or job.state != gateway_pb2.JOB_STATE_DONE:
            if job is not None and job.state == gateway_pb2.JOB_STATE_FAILED:
                stage = gateway_pb2.Stage.Name(job.error.stage).removeprefix("STAGE_").lower()
                raise CliError(
                    f"job {job_id} failed at the {stage} stage: {job.error.code}: "
                    f"{job.error.message}",
                    EXIT_JOB_FAILED,
                )
            raise CliError(f"job {job_id} did not finish", EXIT_JOB_FAILED)
        output = args.output
        _fetch(job.video_url, output)
        console.print(
            f"[green]video[/green] {job.storyboard.title!r}: {len(job.images)} scenes, "
            f"{job.duration_s:.1f} s"
        )
        print(output.resolve())
    return 0


def _start_stack(stack: ExitStack, data_dir: Path):
    """Start the local stack, stopped when ``stack`` closes; returns (LocalStack, address)."""
    from storyreel.stack import LocalStack

    local = stack.enter_context(LocalStack(data_dir))
    with console.status("starting storyreel services (loading models)..."):
        try:
            address = local.start(
                on_ready=lambda p: console.print(f"  {p.spec.name} ready on {p.address}")
            )
        except UpstreamFailed as exc:
            raise CliError(str(exc), EXIT_UNREACHABLE) from None
    return local, address


def cmd_serve(args: argparse.Namespace) -> int:
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    with ExitStack() as stack:
        local, address = _start_stack(stack, args.data_dir)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storyreel", description="One prompt in, a narrated video out."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="make a video from a prompt")
    gen.add_argument("prompt")
    gen.add_argument("--audio", type=Path, help="your own audio track (wav, mp3, ogg, flac, m4a)")
    gen.add_argument("--scenes", type=int, default=0, help="number of scenes (1-24)")
    gen.add_argument(
        "--seed", type=int, default=0, help="seed; the same seed gives the same images"
    )
    gen.add_argument("--style", default="", help="style preset or free text")
    gen.add_argument("--width", type=int, default=0)
    gen.add_argument("--height", type=int, default=0)
    gen.add_argument("--fps", type=int, default=0)
    gen.add_argument("-o", "--output", type=Path, default=Path("storyreel.mp4"))
    gen.add_argument("--gateway", default=DEFAULT_GATEWAY, help="gateway address (host:port)")
    gen.add_argument(
        "--serve", action="store_true", help="start the whole stack locally for this one video"
    )
    gen.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="run every service on localhost until interrupted")
    serve.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR)
    serve.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
