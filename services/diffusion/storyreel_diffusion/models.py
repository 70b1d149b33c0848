"""Loading the diffusion pipeline and what the service needs to know about it.

:func:`load_pipeline` resolves the checkpoint (a local folder or a hub id),
lets diffusers pick the pipeline class, moves it to the device, loads the
IP-Adapter when one is configured, installs the consistent self-attention
processors and builds the schedulers a request may choose. It returns a
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

from storyreel_diffusion.attention import IdentityLinks, install_consistent_self_attention
from storyreel_diffusion.planning import ModelFacts
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
    """``"auto"`` is float16 on cuda, float32 elsewhere."""
    if name == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[name]


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


def _needs_safety_checker_off(folder: Path, settings: DiffusionSettings) -> bool:
    """Whether the checkpoint ships a safety checker the settings turn off."""
    try:
        index = json.loads((folder / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    entry = index.get("safety_checker")
    return not settings.safety_checker and isinstance(entry, list) and entry[0] is not None


def load_pipeline(settings: DiffusionSettings) -> LoadedModel:
    """Load the configured checkpoint (and IP-Adapter) onto the configured device.

    Raises FileNotFoundError for a checkpoint or adapter that cannot be found, and
    ValueError for a checkpoint without a UNet or layer settings that match nothing.
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
    folder = _resolve_source(settings)
    options: dict[str, Any] = {"dtype": dtype, "local_files_only": True}
    if _needs_safety_checker_off(folder, settings):
        options.update(safety_checker=None, requires_safety_checker=False)
    try:
        pipe = AutoPipelineForText2Image.from_pretrained(folder, **options)
    except OSError as exc:
        raise FileNotFoundError(f"could not load model {settings.model!r}: {exc}") from exc
    if getattr(pipe, "unet", None) is None:
        raise ValueError(
            f"{type(pipe).__name__} has no UNet: the diffusion service serves the SD 1.x, "
            "SD 2.x and SDXL families"
        )
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)

    is_sdxl = "XL" in type(pipe).__name__
    multiple = max(settings.side_multiple, settings.sdxl_side_multiple if is_sdxl else 1)
    native = pipe.unet.config.sample_size * pipe.vae_scale_factor
    native = max(multiple, native // multiple * multiple)

    ip_fingerprint, idle = None, None
    if settings.ip_adapter:
        ip_fingerprint, idle = _load_ip_adapter(pipe, settings)
    links = IdentityLinks()
    layers = install_consistent_self_attention(pipe.unet, settings.attention_layers, links)
    names = ("default", *SCHEDULERS)
    if settings.scheduler not in names:
        raise ValueError(f"scheduler {settings.scheduler!r} is not one of {', '.join(names)}")
    safety = getattr(pipe, "safety_checker", None) is not None
    facts = ModelFacts(
        fingerprint=settings.model_fingerprint or _folder_fingerprint(folder),
        pipeline=type(pipe).__name__,
        side_multiple=multiple,
        native_width=native,
        native_height=native,
        device_type=device.type,
        dtype=str(dtype).removeprefix("torch."),
        schedulers=names,
        attention_layers=tuple(settings.attention_layers),
        ip_adapter=ip_fingerprint,
        safety_retries=settings.safety_retries if safety else None,
    )
    log.debug("self-attention layers shared: %s", layers)
    return LoadedModel(
        pipe=pipe,
        facts=facts,
        schedulers={"default": pipe.scheduler},
        identity_links=links,
        idle_ip_embeds=idle,
        extras={"layers": layers, "safety_checker": safety},
    )
