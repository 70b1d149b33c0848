"""Loading the diffusion pipeline and what the service needs to know about it.

:func:`load_pipeline` resolves the checkpoint (a local folder or a hub id),
lets diffusers pick the pipeline class, tells its denoiser's kind
(:func:`describe_architecture`: a UNet, or a transformer of SD3.x, FLUX.1 or
PixArt-Σ), moves it to the device, and on a UNet loads the IP-Adapter when one
is configured and installs the consistent self-attention processors; it builds
the schedulers a request may choose (only its own for a flow-matching model).
It returns a
:class:`LoadedModel`: the pipeline plus the
:class:`~storyreel_diffusion.planning.ModelFacts` that requests are checked
and cache keys computed against.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from storyreel.cpu import native_bf16, torch_threads
from storyreel_diffusion.attention import IdentityLinks, install_consistent_self_attention
from storyreel_diffusion.planning import UNET_MODES, ModelFacts, unet_only_message
from storyreel_diffusion.settings import DiffusionSettings

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: Scheduler names a request or the settings may use, with the diffusers class and the
#: config changes each needs. "default" is the checkpoint's own scheduler.
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {}),
    "dpmpp_2m_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}


#: Transformer (DiT/MMDiT) pipelines the service drives, with the call options each needs:
#: PixArt-Σ draws the requested size itself (no resolution binning, which would draw a
#: trained size and resize) and leaves prompts as given (its caption cleaning depends
#: on optional packages, so the same request could give other pixels elsewhere).
TRANSFORMER_PIPELINES: dict[str, dict[str, Any]] = {
    "StableDiffusion3Pipeline": {},
    "FluxPipeline": {},
    "PixArtSigmaPipeline": {"use_resolution_binning": False, "clean_caption": False},
}
#: Pipelines that pack 2x2 latent patches into one token themselves (the transformer's
#: own patch size is 1): their sides are multiples of twice the VAE's factor.
_PACKED_LATENTS = ("FluxPipeline",)
#: Pipelines that ignore a negative prompt unless asked for "true" CFG (a second pass):
#: FLUX.1 is guidance-distilled, so the service refuses negative prompts on it.
_NO_NEGATIVE_PROMPT = ("FluxPipeline",)


@dataclass(frozen=True)
class Architecture:
    """What the pipeline's denoiser fixes about sizes, schedulers and consistency modes."""

    #: "unet" or "transformer".
    denoiser: str
    side_multiple: int
    #: Native side (square): the denoiser's sample size times the VAE's factor.
    native: int
    flow_matching: bool
    negative_prompt: bool
    #: Extra keyword arguments of every pipeline call.
    call_options: dict[str, Any]
    #: The pipeline takes ``callback_on_step_end`` (else the older ``callback``).
    step_end_callback: bool


def describe_architecture(pipe: Any, settings: DiffusionSettings) -> Architecture:
    """The :class:`Architecture` of a loaded pipeline; ValueError for one the service
    cannot drive (neither a UNet pipeline nor one of :data:`TRANSFORMER_PIPELINES`)."""
    import inspect

    name = type(pipe).__name__
    unet = getattr(pipe, "unet", None)
    transformer = getattr(pipe, "transformer", None)
    factor = pipe.vae_scale_factor
    if unet is not None:
        is_sdxl = "XL" in name
        multiple = max(settings.side_multiple, settings.sdxl_side_multiple if is_sdxl else 1)
        sample, kind, options = unet.config.sample_size, "unet", {}
    elif transformer is not None and name in TRANSFORMER_PIPELINES:
        patch = 2 if name in _PACKED_LATENTS else transformer.config.get("patch_size", 1)
        multiple = max(settings.side_multiple, factor * patch)
        # FLUX's transformer has no sample size; its pipeline has a fixed default.
        sample = transformer.config.get("sample_size") or pipe.default_sample_size
        kind, options = "transformer", dict(TRANSFORMER_PIPELINES[name])
    else:
        raise ValueError(
            f"{name} is not a pipeline the diffusion service can drive: it serves UNet "
            "pipelines (SD 1.x, SD 2.x, SDXL) and the transformer pipelines "
            f"{', '.join(TRANSFORMER_PIPELINES)} (SD3.x, FLUX.1, PixArt-Σ)"
        )
    native = sample * factor
    return Architecture(
        denoiser=kind,
        side_multiple=multiple,
        native=max(multiple, native // multiple * multiple),
        flow_matching="FlowMatch" in type(pipe.scheduler).__name__,
        negative_prompt=name not in _NO_NEGATIVE_PROMPT,
        call_options=options,
        step_end_callback="callback_on_step_end" in inspect.signature(pipe.__call__).parameters,
    )


def names_local_folder(model: str) -> bool:
    """Whether ``model`` means a folder here rather than a model hub id.

    A hub id (``org/name``) also looks like a relative path, so a relative
    name counts as local only when its first folder exists here
    (``models/tiny-sd`` beside a ``models`` folder).
    """
    path = Path(model).expanduser()
    return (
        path.is_absolute() or model.startswith(".") or path.exists() or Path(path.parts[0]).is_dir()
    )


def resolve_device(name: str) -> torch.device:
    """``"auto"`` is cuda when a GPU is visible, else cpu; anything else is taken as given."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``"auto"`` is float16 on cuda, bfloat16 on a CPU with native bf16, else float32."""
    if name == "auto":
        if device.type == "cuda":
            return torch.float16
        return torch.bfloat16 if device.type == "cpu" and native_bf16() else torch.float32
    return _DTYPES[name]


def should_compile(name: str, device: torch.device) -> bool:
    """``torch_compile``: "auto" compiles on cuda only."""
    return name == "on" or (name == "auto" and device.type == "cuda")


def fingerprint_files(paths: list[Path], root: Path) -> str:
    """SHA-256 over the names (relative to ``root``) and contents of ``paths``."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        with path.open("rb") as fh:
            digest.update(hashlib.file_digest(fh, "sha256").digest())
    return digest.hexdigest()


def _folder_fingerprint(folder: Path) -> str:
    """A hub snapshot's commit, or the hash of a local folder's files."""
    if folder.parent.name == "snapshots":
        # <cache>/models--org--name/snapshots/<commit>: the commit names the weights.
        return f"{folder.parent.parent.name}@{folder.name}"
    files = [p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")]
    return "sha256:" + fingerprint_files(files, folder)


@dataclass
class LoadedModel:
    """A loaded pipeline and what requests are checked against."""

    pipe: Any
    facts: ModelFacts
    #: Schedulers built so far from the checkpoint's config, by name ("default": its own).
    schedulers: dict[str, Any]
    #: Set around a pipeline call to make scenes share their characters' identity images.
    identity_links: IdentityLinks
    #: Zero image embeddings (one per IP-Adapter) that keep the adapter idle; None without one.
    idle_ip_embeds: list[torch.Tensor] | None = None
    #: Pixel multiple and safety checker use, for the record.
    extras: dict[str, Any] = field(default_factory=dict)
    #: Keyword arguments every pipeline call gets (see :data:`TRANSFORMER_PIPELINES`).
    call_options: dict[str, Any] = field(default_factory=dict)
    #: The pipeline reports steps through ``callback_on_step_end`` (else ``callback``).
    step_end_callback: bool = True

    def scheduler(self, name: str) -> Any:
        """The scheduler called ``name``, built from the checkpoint's config on first use.

        Only the render thread calls this (one pipeline call at a time), so
        schedulers, which keep state during a call, are never shared by two calls.
        """
        if name not in self.schedulers:
            import diffusers

            class_name, changes = SCHEDULERS[name]
            config = self.schedulers["default"].config
            self.schedulers[name] = getattr(diffusers, class_name).from_config(config, **changes)
        return self.schedulers[name]


def _resolve_source(settings: DiffusionSettings) -> Path:
    model = settings.model
    if names_local_folder(model):
        folder = Path(model).expanduser().resolve()
        if not folder.is_dir():
            # Fail at once: asking the hub for a folder's name only retries, then times out.
            raise FileNotFoundError(
                f"model folder {model!r} does not exist (for the offline tiny model "
                "run `make models`)"
            )
        return folder
    from diffusers import DiffusionPipeline

    try:
        return Path(
            DiffusionPipeline.download(
                model,
                revision=settings.model_revision or None,
                local_files_only=settings.local_files_only,
            )
        )
    except OSError as exc:
        raise FileNotFoundError(f"could not fetch model {model!r}: {exc}") from exc


def _load_ip_adapter(pipe: Any, settings: DiffusionSettings) -> tuple[str, list[torch.Tensor]]:
    """Load the configured IP-Adapter; returns its fingerprint and idle (zero) embeddings."""
    from diffusers.models.embeddings import ImageProjection
    from PIL import Image

    source = settings.ip_adapter
    subfolder = settings.ip_adapter_subfolder
    weight = settings.ip_adapter_weight_name
    encoder = settings.ip_adapter_image_encoder_folder
    if names_local_folder(source):
        folder = Path(source).expanduser().resolve()
        weight_file = folder / subfolder / weight
        if not weight_file.is_file():
            raise FileNotFoundError(f"IP-Adapter weights {weight_file} do not exist")
        encoder_dir = folder / (Path(subfolder, encoder) if "/" not in encoder else Path(encoder))
        files = [weight_file, *(p for p in encoder_dir.rglob("*") if p.is_file())]
        fingerprint = "sha256:" + fingerprint_files(files, folder)
        source = str(folder)
    else:
        fingerprint = f"{source}:{subfolder}/{weight}"
    try:
        pipe.load_ip_adapter(
            source,
            subfolder=subfolder,
            weight_name=weight,
            image_encoder_folder=encoder,
            local_files_only=settings.local_files_only,
        )
    except OSError as exc:
        raise FileNotFoundError(
            f"could not load IP-Adapter {settings.ip_adapter!r}: {exc}"
        ) from exc
    idle = []
    blank = Image.new("RGB", (64, 64))
    with torch.inference_mode():
        for layer in pipe.unet.encoder_hid_proj.image_projection_layers:
            hidden = not isinstance(layer, ImageProjection)
            embeds, _ = pipe.encode_image(blank, pipe.device, 1, hidden)
            idle.append(torch.zeros_like(embeds)[None, :])
    return fingerprint, idle


#: VAE classes a replacement VAE (``settings.vae``) may be.
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")


def _load_vae(settings: DiffusionSettings, checkpoint: Path, dtype: torch.dtype) -> tuple[Any, str]:
    """The replacement VAE named by ``settings.vae`` and its fingerprint.

    Refuses (ValueError) a folder holding another class, or latents of another width
    than the checkpoint's own VAE: the denoiser would get the wrong channels.
    """
    import diffusers

    source = settings.vae
    if names_local_folder(source):
        folder = Path(source).expanduser().resolve()
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"VAE folder {source!r} has no config.json")
    else:
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, local_files_only=settings.local_files_only))
        except Exception as exc:  # the hub client raises many kinds; all mean "not here"
            raise FileNotFoundError(f"could not fetch VAE {source!r}: {exc}") from exc
    config = json.loads((folder / "config.json").read_text())
    class_name = config.get("_class_name")
    if class_name not in VAE_CLASSES:
        raise ValueError(
            f"VAE {source!r} is a {class_name or 'model of no known class'}; "
            f"it must be one of {', '.join(VAE_CLASSES)}"
        )
    try:
        own = json.loads((checkpoint / "vae" / "config.json").read_text())["latent_channels"]
    except (OSError, ValueError, KeyError):
        own = None
    if own is not None and config.get("latent_channels", 4) != own:
        raise ValueError(
            f"VAE {source!r} has {config.get('latent_channels', 4)} latent channels; "
            f"the checkpoint's VAE has {own}"
        )
    vae = getattr(diffusers, class_name).from_pretrained(folder, dtype=dtype)
    return vae, f"{class_name}:{_folder_fingerprint(folder)}"


def _fuse_lora(pipe: Any, settings: DiffusionSettings) -> str:
    """Load ``settings.lora`` into the pipeline, fuse it into the weights at
    ``lora_scale`` and drop the adapter layers (no per-step cost); returns its
    fingerprint. FileNotFoundError when it cannot be found, ValueError when the
    pipeline takes no LoRA or the weights fit none of its layers."""
    if not hasattr(pipe, "load_lora_weights"):
        raise ValueError(f"{type(pipe).__name__} does not take LoRA weights: unset lora")
    source = settings.lora
    options: dict[str, Any] = {"local_files_only": settings.local_files_only}
    if settings.lora_weight_name:
        options["weight_name"] = settings.lora_weight_name
    if names_local_folder(source):
        folder = Path(source).expanduser().resolve()
        if not folder.is_dir():
            raise FileNotFoundError(f"LoRA folder {source!r} does not exist")
        weights = [p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin")]
        if settings.lora_weight_name:
            weights = [folder / settings.lora_weight_name]
        fingerprint = "sha256:" + fingerprint_files([w for w in weights if w.is_file()], folder)
        source = str(folder)
    else:
        fingerprint = f"{source}:{settings.lora_weight_name or 'default'}"
    try:
        pipe.load_lora_weights(source, adapter_name="storyreel", **options)
    except OSError as exc:
        raise FileNotFoundError(f"could not load LoRA {settings.lora!r}: {exc}") from exc
    except (ValueError, KeyError, RuntimeError) as exc:
        raise ValueError(
            f"LoRA {settings.lora!r} does not fit {type(pipe).__name__}: {exc}"
        ) from exc
    if not pipe.get_list_adapters():
        raise ValueError(f"LoRA {settings.lora!r} matched no layer of {type(pipe).__name__}")
    pipe.fuse_lora(lora_scale=settings.lora_scale, adapter_names=["storyreel"])
    pipe.unload_lora_weights()  # the fused weights stay; the adapter layers go
    return f"{fingerprint}@{settings.lora_scale:g}"


def _check_architecture_settings(
    arch: Architecture, pipeline: str, settings: DiffusionSettings
) -> None:
    """ValueError for settings a transformer pipeline cannot honour: a UNet-only default
    consistency mode, or an IP-Adapter (loaded into a UNet's cross-attention)."""
    if arch.denoiser == "unet":
        return
    if settings.consistency in UNET_MODES:
        raise ValueError(
            "default consistency (STORYREEL_DIFFUSION_CONSISTENCY): "
            + unet_only_message(settings.consistency, pipeline, arch.denoiser)
        )
    if settings.ip_adapter:
        raise ValueError(
            f"ip_adapter needs a UNet pipeline (SD 1.x, SD 2.x, SDXL); {pipeline} has a "
            f"{arch.denoiser} denoiser: unset STORYREEL_DIFFUSION_IP_ADAPTER"
        )


def _needs_safety_checker_off(folder: Path, settings: DiffusionSettings) -> bool:
    """Whether the checkpoint ships a safety checker the settings turn off."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    entry = index.get("safety_checker")
    return not settings.safety_checker and isinstance(entry, list) and entry[0] is not None


def _tune(pipe: Any, settings: DiffusionSettings, device: torch.device) -> None:
    """Memory order and compilation of the convolutional parts and the denoiser.

    Channels-last changes how activations are laid out, not what is computed.
    Compiling is lazy: the first call at each size compiles (the start-up warm-up
    makes that the default size).
    """
    convolutional = [getattr(pipe, "unet", None), getattr(pipe, "vae", None)]
    if settings.channels_last:
        for module in convolutional:
            if module is not None:
                module.to(memory_format=torch.channels_last)
    if should_compile(settings.torch_compile, device):
        denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
        denoiser.compile()
        if getattr(pipe, "vae", None) is not None:
            pipe.vae.decoder.compile()


def load_pipeline(settings: DiffusionSettings) -> LoadedModel:
    """Load the configured checkpoint (and IP-Adapter) onto the configured device.

    Raises FileNotFoundError for a checkpoint or adapter that cannot be found, and
    ValueError for a pipeline the service cannot drive (see :func:`describe_architecture`),
    settings its denoiser cannot honour, or layer settings that match nothing.
    """
    from diffusers import AutoPipelineForText2Image
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    # Progress bars would interleave with the service's JSON log lines.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()

    device = resolve_device(settings.device)
    dtype = resolve_dtype(settings.dtype, device)
    if device.type == "cuda":
        # Same request, same device, same bytes: no autotuned kernel choice between runs.
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    if device.type == "cpu":
        # One thread per usable core: the container's quota, not the host's core count.
        torch.set_num_threads(torch_threads(settings.torch_threads))
    folder = _resolve_source(settings)
    options: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if _needs_safety_checker_off(folder, settings):
        options.update(safety_checker=None, requires_safety_checker=False)
    vae_fingerprint = None
    if settings.vae:
        options["vae"], vae_fingerprint = _load_vae(settings, folder, dtype)
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(folder, **options)
    except OSError as exc:
        raise FileNotFoundError(f"could not load model {settings.model!r}: {exc}") from exc
    arch = describe_architecture(pipe, settings)
    _check_architecture_settings(arch, type(pipe).__name__, settings)
    lora_fingerprint = _fuse_lora(pipe, settings) if settings.lora else None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    multiple, native = arch.side_multiple, arch.native
    ip_fingerprint, idle = None, None
    if settings.ip_adapter:
        ip_fingerprint, idle = _load_ip_adapter(pipe, settings)
    links = IdentityLinks()
    layers: list[str] = []
    if arch.denoiser == "unet":
        layers = install_consistent_self_attention(pipe.unet, settings.attention_layers, links)
    # Flow-matching checkpoints (SD3, FLUX.1) run only their own scheduler.
    names = ("default",) if arch.flow_matching else ("default", *SCHEDULERS)
    if settings.scheduler not in names:
        why = f" ({type(pipe).__name__} is a flow-matching model: it runs only its own scheduler)"
        raise ValueError(
            f"scheduler {settings.scheduler!r} is not one of {', '.join(names)}"
            + (why if arch.flow_matching else "")
        )
    _tune(pipe, settings, device)
    safety = getattr(pipe, "safety_checker", None) is not None
    facts = ModelFacts(
        fingerprint=(settings.model_fingerprint or _folder_fingerprint(folder))
        + (f"+vae={vae_fingerprint}" if vae_fingerprint else "")
        + (f"+lora={lora_fingerprint}" if lora_fingerprint else ""),
        pipeline=type(pipe).__name__,
        side_multiple=multiple,
        native_width=native,
        native_height=native,
        device_type=device.type,
        dtype=str(dtype).removeprefix("torch."),
        schedulers=names,
        attention_layers=tuple(settings.attention_layers) if arch.denoiser == "unet" else (),
        ip_adapter=ip_fingerprint,
        safety_retries=settings.safety_retries if safety else None,
        denoiser=arch.denoiser,
        flow_matching=arch.flow_matching,
        negative_prompt=arch.negative_prompt,
        compiled=should_compile(settings.torch_compile, device),
    )
    log.debug("self-attention layers shared: %s", layers)
    return LoadedModel(
        pipe=pipe,
        facts=facts,
        schedulers={"default": pipe.scheduler},
        identity_links=links,
        idle_ip_embeds=idle,
        extras={"layers": layers, "safety_checker": safety},
        call_options=arch.call_options,
        step_end_callback=arch.step_end_callback,
    )
