"""Benchmark of character consistency: CLIP similarity of a character across scenes, per mode.

    # a real checkpoint, an IP-Adapter and a CLIP image model (folders or hub ids in the cache)
    .venv/bin/python bench/consistency.py \\
        --model stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --ip-adapter h94/IP-Adapter --ip-adapter-subfolder models \\
        --ip-adapter-weight ip-adapter_sd15.safetensors \\
        --clip openai/clip-vit-large-patch14 --device cuda

    # offline smoke run on tiny random models (the numbers mean nothing)
    .venv/bin/python bench/consistency.py --tiny

It renders one short story (two characters with fixed looks, eight scenes,
each character alone in four of them) through the render core in each
consistency mode: none, seed_lock, consistent_self_attention and, when an
IP-Adapter is given, reference_images. Every scene prompt already holds its
character's appearance, as the LLM service writes them, so the modes differ
only in how they draw. For each mode it embeds every scene image with a CLIP
image encoder and prints the mean cosine similarity between scenes of the
same character (``same``, higher is more consistent), between scenes of
different characters (``other``, which shows how much of ``same`` is a shared
style rather than an identity), and ``same`` minus that of mode none.
``--jobs N`` averages over N job seeds.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import shutil
import sys
import tempfile
from pathlib import Path

CHARACTERS = {
    "Mira": "a young woman with long red braids, freckles and a yellow raincoat",
    "Tomas": "an old lighthouse keeper with a white beard, a blue knitted cap and round glasses",
}
SCENES = [
    ("Mira", "walking along a stormy beach at dusk"),
    ("Tomas", "climbing the spiral stairs of a lighthouse"),
    ("Mira", "reading a map by candlelight in a wooden cabin"),
    ("Tomas", "polishing the great lamp at night"),
    ("Mira", "rowing a small boat across a calm bay at sunrise"),
    ("Tomas", "drinking tea by a window with rain outside"),
    ("Mira", "standing on a cliff looking at a whale"),
    ("Tomas", "waving from the lighthouse balcony"),
]


def story():
    from storyreel_diffusion.planning import CastMember, Scene

    characters = [CastMember(name, look) for name, look in CHARACTERS.items()]
    scenes = [
        Scene(i, f"{name}, {CHARACTERS[name]}, {action}, cinematic illustration", 0, (name,))
        for i, (name, action) in enumerate(SCENES, start=1)
    ]
    return characters, scenes


def similarities(embeddings, owners) -> tuple[float, float]:
    """Mean cosine similarity of same-character pairs and of other pairs."""
    same, other = [], []
    for (a, owner_a), (b, owner_b) in itertools.combinations(
        zip(embeddings, owners, strict=True), 2
    ):
        value = float((a * b).sum())
        (same if owner_a == owner_b else other).append(value)
    return sum(same) / len(same), sum(other) / len(other)


async def run(args, work: Path) -> int:
    import io

    import torch
    from diffusers.utils import logging as diffusers_logging
    from PIL import Image
    from storyreel_diffusion.renderer import SceneRenderer
    from storyreel_diffusion.settings import DiffusionSettings
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from storyreel.settings import StorageSettings
    from storyreel.storage import open_store

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    if args.tiny:
        from storyreel_diffusion.tiny import (
            IP_ADAPTER_WEIGHTS,
            build_tiny_ip_adapter,
            build_tiny_pipeline,
        )

        args.model = str(build_tiny_pipeline(work / "tiny-sd"))
        args.ip_adapter = str(build_tiny_ip_adapter(args.model, work / "tiny-ip"))
        args.ip_adapter_subfolder, args.ip_adapter_weight = "", IP_ADAPTER_WEIGHTS
        args.clip = str(Path(args.ip_adapter) / "image_encoder")  # a tiny CLIP vision model
        args.size, args.steps = args.size or 64, args.steps or 2
    args.size, args.steps = args.size or 512, args.steps or 25

    settings = DiffusionSettings(
        model=args.model,
        device=args.device,
        local_files_only=args.offline,
        cache_enabled=False,
        metrics_port=0,
        max_scenes=len(SCENES),
        max_batch_size=args.batch,
        ip_adapter=args.ip_adapter or "",
        ip_adapter_subfolder=args.ip_adapter_subfolder,
        ip_adapter_weight_name=args.ip_adapter_weight,
        ip_adapter_image_encoder_folder=args.ip_adapter_image_encoder,
    )
    store = open_store(StorageSettings(url=(work / "artifacts").as_uri()))
    renderer = SceneRenderer(settings, store)
    print(f"loading {args.model} ...", flush=True)
    await renderer.load()
    device = renderer.device
    processor = (
        CLIPImageProcessor(size=32, crop_size=32)  # the tiny encoder's input size
        if args.tiny
        else CLIPImageProcessor.from_pretrained(args.clip, local_files_only=args.offline)
    )
    clip = CLIPVisionModelWithProjection.from_pretrained(
        args.clip, local_files_only=args.offline or args.tiny
    ).to(device)

    def embed(pngs: list[bytes]) -> torch.Tensor:
        images = [Image.open(io.BytesIO(png)).convert("RGB") for png in pngs]
        with torch.inference_mode():
            pixels = processor(images=images, return_tensors="pt").pixel_values.to(device)
            vectors = clip(pixel_values=pixels.to(clip.dtype)).image_embeds.float()
        return torch.nn.functional.normalize(vectors, dim=-1).cpu()

    modes = ["none", "seed_lock", "consistent_self_attention"]
    if args.ip_adapter:
        modes.append("reference_images")
    characters, scenes = story()
    owners = [scene.characters[0] for scene in scenes]
    print(
        f"{len(scenes)} scenes, {len(characters)} characters, {args.size}x{args.size}, "
        f"{args.steps} steps, {args.jobs} job seed(s), CLIP {args.clip}",
        flush=True,
    )
    results: dict[str, tuple[float, float]] = {}
    try:
        for mode in modes:
            same_total = other_total = 0.0
            for job in range(args.jobs):
                images = [
                    image
                    async for image in renderer.render(
                        f"consistency-{mode.replace('_', '-')}-{job}",
                        scenes,
                        characters=characters,
                        consistency=mode,
                        width=args.size,
                        height=args.size,
                        steps=args.steps,
                        job_seed=1000 + job,
                    )
                ]
                uris = [image.uri for image in images]
                pngs = await asyncio.gather(*(asyncio.to_thread(store.get_bytes, u) for u in uris))
                same, other = similarities(embed(pngs), owners)
                same_total, other_total = same_total + same, other_total + other
            results[mode] = (same_total / args.jobs, other_total / args.jobs)
            same, other = results[mode]
            delta = same - results["none"][0]
            print(f"{mode:27s} same {same:.4f}  other {other:.4f}  same-vs-none {delta:+.4f}")
    finally:
        await renderer.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="offline smoke run on tiny models")
    parser.add_argument("--model", help="text-to-image checkpoint (folder or hub id)")
    parser.add_argument("--ip-adapter", help="IP-Adapter folder or hub id (enables references)")
    parser.add_argument("--ip-adapter-subfolder", default="models")
    parser.add_argument("--ip-adapter-weight", default="ip-adapter_sd15.safetensors")
    parser.add_argument("--ip-adapter-image-encoder", default="image_encoder")
    parser.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP image model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--size", type=int, help="square image side (default 512)")
    parser.add_argument("--steps", type=int, help="denoising steps (default 25)")
    parser.add_argument("--batch", type=int, default=4, help="render batch size")
    parser.add_argument("--jobs", type=int, default=1, help="job seeds to average over")
    parser.add_argument("--offline", action="store_true", help="never contact the model hub")
    args = parser.parse_args(argv)
    if not args.tiny and not args.model:
        parser.error("--model is required (or --tiny for an offline smoke run)")
    work = Path(tempfile.mkdtemp(prefix="storyreel-bench-consistency-"))
    try:
        return asyncio.run(run(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
