"""Settings of the diffusion service (environment prefix ``STORYREEL_DIFFUSION_``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import SettingsConfigDict

from storyreel.limits import MAX_SCENES, MIN_SCENES
from storyreel.settings import ServiceSettings

ConsistencyName = Literal["none", "seed_lock", "consistent_self_attention", "reference_images"]


class DiffusionSettings(ServiceSettings):
    """Model, device, request defaults, limits, cache, queue and metrics of the service."""

    model_config = SettingsConfigDict(env_prefix="STORYREEL_DIFFUSION_", extra="ignore")

    port: int = Field(default=50052, ge=0, le=65535)

    # --- the model -------------------------------------------------------------------------
    # A diffusers text-to-image checkpoint: a UNet one (SD 1.x, SD 2.x, SDXL, turbo variants
    # included) or a transformer one (SD3.x, FLUX.1 schnell/dev, PixArt-Σ; these take only
    # the none and seed_lock consistency modes): a local folder (as `make models` builds) or
    # a model hub id (needs network access or a filled hub cache). The pipeline class is
    # picked from the checkpoint; any other pipeline is refused at start.
    model: str = Field(default="models/tiny-sd", min_length=1)
    # Hub branch, tag or commit of `model`; empty means the hub default.
    model_revision: str = ""
    # "auto" picks cuda when a GPU is visible, else cpu; any torch device name forces one.
    device: str = "auto"
    # "auto" is float16 on cuda; on a CPU it is bfloat16 where bf16 math is native (AVX-512
    # BF16 or AMX: about twice as fast as float32) and float32 elsewhere (CPU float16
    # kernels are slow or missing, emulated bf16 is slower than float32).
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    # CPU threads torch may use; 0 means the cores this container may really use (its CPU
    # affinity, capped by the cgroup CPU quota), not torch's one thread per host core. On a
    # CPU shared with other busy processes, fewer threads can be many times faster.
    torch_threads: int = Field(default=0, ge=0)
    # A replacement VAE, a local folder or hub id holding either an AutoencoderKL (such as
    # madebyollin/sdxl-vae-fp16-fix, which does not overflow in float16) or an
    # AutoencoderTiny (TAESD: madebyollin/taesd for SD 1.x/2.x, taesdxl for SDXL, taesd3
    # for SD3, taef1 for FLUX), whose decoder is about ten times faster on a CPU at a
    # small cost in detail. Its latent channels must match the checkpoint's. Empty: the
    # checkpoint's own VAE.
    vae: str = ""
    # LoRA weights fused into the denoiser at start, a local folder or hub id: LCM-LoRA
    # (latent-consistency/lcm-lora-sdv1-5, ...-sdxl) turns any SD checkpoint into a 4-step
    # model (with scheduler "lcm" and guidance 1), or a style LoRA. `lora_weight_name` is
    # the file in it (empty: the diffusers default name); `lora_scale` its weight.
    lora: str = ""
    lora_weight_name: str = ""
    lora_scale: float = Field(default=1.0, ge=0, le=4)
    # Keep the UNet's and the VAE's activations in channels-last memory order (faster
    # convolutions with oneDNN and on tensor cores; the same pixels).
    channels_last: bool = True
    # torch.compile the denoiser and the VAE decoder. "auto" compiles on cuda only: on a
    # CPU compiling takes minutes and gained little here (bench/render.py). The first render
    # at each size compiles; the start-up warm-up then renders at the default size, so
    # health turns SERVING only after that compile.
    torch_compile: Literal["auto", "on", "off"] = "auto"
    # Only read local files or the hub cache, never the network.
    local_files_only: bool = False
    # Use the checkpoint's safety checker when it ships one. A flagged image is drawn again
    # with a new seed up to `safety_retries` times, then reported as flagged on its scene.
    safety_checker: bool = True
    safety_retries: int = Field(default=2, ge=0, le=10)
    # Scheduler used when a request names none: "default" keeps the checkpoint's own, or one
    # of ddim, pndm, euler, euler_a, heun, dpmpp_2m, dpmpp_2m_karras, unipc, lcm.
    scheduler: str = "default"

    # --- request defaults (used when a request leaves the field 0 or empty) ----------------
    # 0 is the model's native size (512 for SD 1.5, 768 for SD 2, 1024 for SDXL).
    default_width: int = Field(default=0, ge=0)
    default_height: int = Field(default=0, ge=0)
    default_steps: int = Field(default=25, ge=1)
    default_guidance: float = Field(default=7.5, gt=0)

    # --- request limits (a request outside them is rejected before any work) ---------------
    # Within the shared bound (storyreel.limits); a deployment may lower it.
    max_scenes: int = Field(default=MAX_SCENES, ge=MIN_SCENES, le=MAX_SCENES)
    min_side: int = Field(default=64, ge=8)
    max_side: int = Field(default=4096, ge=8)
    # Width and height must be multiples of this (the VAE's downsampling factor) ...
    side_multiple: int = Field(default=8, ge=1)
    # ... and of this for SDXL checkpoints, whose UNet works on 64-pixel multiples.
    sdxl_side_multiple: int = Field(default=64, ge=1)
    max_steps: int = Field(default=150, ge=1)
    max_guidance: float = Field(default=30.0, gt=0)
    # Characters; the text encoder reads only the first 77 tokens anyway.
    max_prompt_chars: int = Field(default=2000, ge=1)
    max_characters: int = Field(default=8, ge=0)
    max_characters_per_scene: int = Field(default=4, ge=1)
    max_character_name_chars: int = Field(default=64, ge=1)

    # --- batching, queue, cache ------------------------------------------------------------
    # Most scene images drawn by one pipeline call. Identity images of the consistent
    # self-attention mode come on top of these.
    max_batch_size: int = Field(default=4, ge=1, le=64)
    # Most requests that need the model at once (drawing or waiting for their turn). One
    # more is refused with RESOURCE_EXHAUSTED at once. Requests served wholly from the
    # cache do not count.
    max_queue: int = Field(default=8, ge=1)
    # Content-addressed image cache in the artifact store, under `cache_prefix/`.
    cache_enabled: bool = True
    cache_prefix: str = Field(default="cache", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    # Identifies the weights in cache keys. Empty: computed at start (a hub checkpoint's
    # commit; a local folder's file contents, hashed).
    model_fingerprint: str = ""
    # zlib level of the stored PNGs (0-9): 1 encodes several times faster than 6, files
    # are about a third larger.
    png_compress_level: int = Field(default=6, ge=0, le=9)

    # --- character consistency -------------------------------------------------------------
    # Mode used when a request leaves it unspecified.
    consistency: ConsistencyName = "seed_lock"
    # Prompt of a character's reference portrait (reference_images) and identity images
    # (consistent_self_attention); {name} and {appearance} are filled in.
    portrait_prompt: str = (
        "portrait of {name}, {appearance}, facing the camera, plain neutral background"
    )
    # Consistent self-attention: images of a scene also attend to the keys and values of
    # its characters' identity images in these attention layers (prefixes of the UNet's
    # self-attention processor names: "up_blocks", "up_blocks.1", "mid_block", ...).
    attention_layers: list[str] = Field(default_factory=lambda: ["up_blocks"], min_length=1)
    # Weight of each identity token against the image's own tokens (1 = equal); a request
    # may ask for another strength.
    attention_strength: float = Field(default=1.0, gt=0)
    # Identity images drawn per character in that mode.
    identity_images: int = Field(default=1, ge=1, le=4)
    # Reference images: an IP-Adapter (folder or hub id; empty disables the mode), the
    # subfolder and weight file inside it, the image encoder folder (relative to the
    # subfolder when it has no "/"), and the adapter scale a request gets by default.
    ip_adapter: str = ""
    ip_adapter_subfolder: str = "models"
    ip_adapter_weight_name: str = "ip-adapter_sd15.safetensors"
    ip_adapter_image_encoder_folder: str = "image_encoder"
    ip_adapter_scale: float = Field(default=0.6, gt=0)
    # A character's uploaded reference image (Character.reference_uri): the most bytes
    # and pixels read (the pixels from the header, before anything is decoded).
    max_reference_bytes: int = Field(default=20 * 1024 * 1024, ge=1)
    max_reference_pixels: int = Field(default=4096 * 4096, ge=1)
    # Upper bound of a request's consistency_strength, in either mode.
    max_consistency_strength: float = Field(default=2.0, gt=0)

    # --- start-up and metrics --------------------------------------------------------------
    # Render done at load time so health turns SERVING only after a render worked.
    warmup_side: int = Field(default=64, ge=8)
    warmup_steps: int = Field(default=1, ge=1)
    # Prometheus metrics on http://<metrics_host>:<metrics_port>/metrics; 0 disables them.
    # Off by default so that several local stacks never fight over one port; deployments
    # set it (9102 by convention) with metrics_host 0.0.0.0.
    metrics_port: int = Field(default=0, ge=0, le=65535)
    metrics_host: str = "127.0.0.1"

    @field_validator("portrait_prompt")
    @classmethod
    def _portrait_prompt_fields(cls, value: str) -> str:
        try:
            value.format(name="x", appearance="y")
        except (KeyError, IndexError, ValueError) as exc:
            raise ValueError(
                f"portrait_prompt may only use {{name}} and {{appearance}}: {exc}"
            ) from None
        return value

    @model_validator(mode="after")
    def _defaults_within_limits(self) -> DiffusionSettings:
        """Refuse a configuration whose defaults its own limits would reject."""
        sides = {
            "default_width": self.default_width,
            "default_height": self.default_height,
            "warmup_side": self.warmup_side,
        }
        for name, value in sides.items():
            if name != "warmup_side" and value == 0:
                continue  # the model's native size, checked once the model is loaded
            if not self.min_side <= value <= self.max_side or value % self.side_multiple:
                raise ValueError(
                    f"{name}={value} must be a multiple of {self.side_multiple} "
                    f"within {self.min_side}..{self.max_side}"
                )
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps={self.default_steps} exceeds max_steps")
        if self.default_guidance > self.max_guidance:
            raise ValueError(f"default_guidance={self.default_guidance} exceeds max_guidance")
        for name in ("attention_strength", "ip_adapter_scale"):
            if getattr(self, name) > self.max_consistency_strength:
                raise ValueError(f"{name} exceeds max_consistency_strength")
        return self
