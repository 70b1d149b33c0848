"""Build a tiny random-weight Stable Diffusion checkpoint for offline use.

No text-to-image weights can be downloaded where storyreel is built and
tested, so ``make models`` builds one: the Stable Diffusion 1.5 architecture
(UNet, VAE, CLIP text encoder with the real CLIP tokenizer, DDIM scheduler)
shrunk to about 10 MB with seeded random weights. The render service loads it
through the same ``from_pretrained`` path as a real checkpoint; its images are
deterministic noise, not pictures.

    python -m storyreel_diffusion.tiny OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from storyreel.clip_vocab import (
    END_TOKEN,
    MAX_TOKENS,
    START_TOKEN,
    VOCAB_SIZE,
    write_clip_tokenizer_files,
)

log = logging.getLogger(__name__)

#: The file that lists a saved pipeline's components.
MODEL_INDEX = "model_index.json"


def is_complete_pipeline(path: Path) -> bool:
    """Whether ``path`` holds a saved pipeline with every component it lists."""
    index_file = path / MODEL_INDEX
    if not index_file.is_file():
        return False
    try:
        index = json.loads(index_file.read_text())
    except (OSError, ValueError):
        return False
    for name, value in index.items():
        if name.startswith("_") or not isinstance(value, list) or value[0] is None:
            continue
        folder = path / name
        if not folder.is_dir() or not any(folder.iterdir()):
            return False
    return True


def _components(seed: int, work_dir: Path) -> dict:
    """The pipeline's parts, each initialised from ``seed`` so every build is identical."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    hidden = 32
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        # Latent size of a 512 px image: the pipeline's default output size.
        sample_size=64,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=hidden,
    )
    torch.manual_seed(seed)
    # Four blocks, so the VAE downsamples by 8 like a real one; with fewer the
    # latents are large and a 512 px image takes minutes on a CPU.
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        sample_size=512,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=hidden,
            intermediate_size=37,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            projection_dim=hidden,
            layer_norm_eps=1e-5,
            bos_token_id=VOCAB_SIZE - 2,
            eos_token_id=VOCAB_SIZE - 1,
            pad_token_id=VOCAB_SIZE - 1,
        )
    )
    write_clip_tokenizer_files(work_dir)
    tokenizer = CLIPTokenizer.from_pretrained(
        work_dir,
        model_max_length=MAX_TOKENS,
        bos_token=START_TOKEN,
        eos_token=END_TOKEN,
        pad_token=END_TOKEN,
        unk_token=END_TOKEN,
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def build_tiny_pipeline(out_dir: Path | str, seed: int = 0) -> Path:
    """Save a tiny Stable Diffusion pipeline to ``out_dir`` and return its path.

    Does nothing when ``out_dir`` already holds a complete pipeline. The
    pipeline is built in a sibling folder and renamed into place, so an
    interrupted build never leaves a half-written ``out_dir``.
    """
    out = Path(out_dir).resolve()
    if is_complete_pipeline(out):
        log.info("tiny pipeline already built at %s", out)
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a complete pipeline; remove it first")

    from diffusers import StableDiffusionPipeline

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        pipe = StableDiffusionPipeline(
            **_components(seed, staging / "tokenizer-source"),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(staging / "pipeline", safe_serialization=True)
        # The weight writers create owner-only files; a service running as
        # another user (a container's non-root user) must still read them.
        for path in (staging / "pipeline").rglob("*"):
            if path.is_file():
                path.chmod(0o644)
        try:
            if out.exists():
                out.rmdir()  # empty, checked above
            os.replace(staging / "pipeline", out)
        except OSError:
            # Another build finished first: its pipeline is as good as this one.
            if not is_complete_pipeline(out):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("tiny pipeline built at %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m storyreel_diffusion.tiny OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m storyreel_diffusion.tiny",
        description="Build a tiny random-weight Stable Diffusion pipeline (offline).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to save the pipeline in")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_tiny_pipeline(args.out_dir, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
