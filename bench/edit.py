"""Benchmark of a one-scene edit: one narration changed on a finished job, against the job.

    .venv/bin/python bench/edit.py                  # a 6-scene job, 3 rounds
    .venv/bin/python bench/edit.py --repeat 5       # more rounds: steadier medians
    .venv/bin/python bench/edit.py --steps 20       # heavier images (the tiny model, 20 steps)

The whole stack runs as real processes on this machine (``storyreel.stack.LocalStack``:
SmolLM2 writes the storyboard, the tiny offline Stable Diffusion draws, piper narrates,
ffmpeg encodes), with file:// storage in a temporary folder. Each round:

* **full**: CreateVideo of a ``--scenes``-scene job (a new seed each round, so nothing
  comes from a cache), timed until GetJob says DONE;
* **edit**: UpdateStoryboard of that finished job with scene 1's narration changed,
  timed until the run it starts is DONE. Only that scene's speech is synthesised again
  (the composer's narration cache serves the others), no image is drawn again, and the
  video is composed again.

The stack is started, and one untimed warm-up job run, before the first round. The
last line is ``edit/full ratio: X``, the median edit time over the median full-job
time; both run on the same stack in the same conditions (timings on a shared machine
are noisy: compare ratios, and use --repeat).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPT = "A lighthouse keeper befriends a lost whale"
FINISHED = ("JOB_STATE_DONE", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")


def _wait(stub, pb, job_id: str, generation: int, timeout_s: float = 1800):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        job = stub.GetJob(pb.GetJobRequest(job_id=job_id)).job
        if job.generation >= generation and pb.JobState.Name(job.state) in FINISHED:
            if job.state != pb.JOB_STATE_DONE:
                raise SystemExit(f"job {job_id} ended {pb.JobState.Name(job.state)}: {job.error}")
            return job
        time.sleep(0.1)
    raise SystemExit(f"job {job_id} did not finish within {timeout_s:g} s")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scenes", type=int, default=6)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="denoising steps of the tiny model")
    parser.add_argument("--size", type=int, default=128, help="image side in pixels")
    args = parser.parse_args()

    import grpc

    from storyreel.gateway.v1 import gateway_pb2 as pb
    from storyreel.gateway.v1 import gateway_pb2_grpc
    from storyreel.stack import LocalStack

    work = Path(tempfile.mkdtemp(prefix="storyreel-bench-edit-"))
    env = {
        "STORYREEL_STORAGE_URL": (work / "artifacts").as_uri(),
        "STORYREEL_DIFFUSION_MODEL": str(REPO / "models" / "tiny-sd"),
        "STORYREEL_LLM_MODEL": str(REPO / "models" / "smollm2-135m-instruct"),
        "STORYREEL_GATEWAY_RENDER_STEPS": str(args.steps),
        "STORYREEL_GATEWAY_RENDER_WIDTH": str(args.size),
        "STORYREEL_GATEWAY_RENDER_HEIGHT": str(args.size),
    }
    stack = LocalStack(work, fixed_ports=False, env=env)
    stack.start(timeout_s=600)
    try:
        with grpc.insecure_channel(stack.gateway_address) as channel:
            stub = gateway_pb2_grpc.StoryReelServiceStub(channel)

            def full(seed: int):
                request = pb.CreateVideoRequest(
                    prompt=PROMPT, scene_count=args.scenes, seed=seed, width=320, height=240
                )
                started = time.perf_counter()
                job_id = stub.CreateVideo(request).job_id
                job = _wait(stub, pb, job_id, 0)
                return job, time.perf_counter() - started

            def edit(job, round_: int):
                board = type(job.storyboard)()
                board.CopyFrom(job.storyboard)
                board.scenes[0].narration = f"At first the keeper was alone, round {round_}."
                request = pb.UpdateStoryboardRequest(
                    job_id=job.job_id, storyboard=board, version=job.storyboard_version
                )
                started = time.perf_counter()
                stub.UpdateStoryboard(request)
                edited = _wait(stub, pb, job.job_id, job.generation + 1)
                return edited, time.perf_counter() - started

            job, _ = full(1)  # warm-up: models loaded, first requests served
            edit(job, 0)
            fulls, edits = [], []
            for round_ in range(1, args.repeat + 1):
                job, full_s = full(100 + round_)
                edited, edit_s = edit(job, round_)
                fulls.append(full_s)
                edits.append(edit_s)
                earlier = {image.uri for image in job.images}
                drawn = sum(1 for i in edited.images if not i.cached and i.uri not in earlier)
                print(
                    f"round {round_}: full {full_s:.2f} s, edit {edit_s:.2f} s "
                    f"(narration synthesised {edited.narration_synthesized}, "
                    f"cached {edited.narration_cached}; images drawn again {drawn})"
                )
    finally:
        stack.stop()
    full_s, edit_s = statistics.median(fulls), statistics.median(edits)
    print(f"job: {args.scenes} scenes; median full {full_s:.2f} s, median edit {edit_s:.2f} s")
    print(f"edit/full ratio: {edit_s / full_s:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
