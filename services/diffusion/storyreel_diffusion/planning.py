"""Request checks, seeds, prompts and cache keys: everything decided before drawing.

No torch and no gRPC here. :func:`plan_render` turns a request into a
:class:`RenderPlan`: every field checked against the limits in
:class:`~storyreel_diffusion.settings.DiffusionSettings` and the loaded
model's :class:`ModelFacts`, every default filled in, each image's final
prompt and seed chosen, and each image's content key computed, so that a
rejected request has done no work and stored nothing.

Which name belongs to which layer:

=======================  ==============================  ==================================
contract                 diffusion core (here)           gateway
=======================  ==============================  ==================================
diffusion.v1.Scene       :class:`Scene`                  storyreel_gateway.pipeline
                                                         .SceneToRender
diffusion.v1.Character   :class:`CastMember`             storyreel.storyboard.Character
                         (:class:`CharacterPlan` once    (the storyboard's, without a seed)
                         its seed and portrait are set)
diffusion.v1.SceneImage  storyreel_diffusion.renderer    storyreel_gateway.jobs.SceneImage
                         .SceneImage
=======================  ==============================  ==================================
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from storyreel.errors import FailedPrecondition, InvalidInput
from storyreel.frames import SHAPES, image_size
from storyreel.ids import check_job_id, check_revision, job_key
from storyreel.limits import MIN_SCENES
from storyreel.seeds import MAX_UINT64_SEED, derive_seed, scene_seed
from storyreel_diffusion.settings import DiffusionSettings

#: Bumped when the way pixels follow from a key's fields changes, so old cache entries miss.
CACHE_FORMAT = 1


class ConsistencyMode(StrEnum):
    """How the images of one request keep their characters looking the same."""

    #: Prompts and seeds as given; characters are ignored.
    NONE = "none"
    #: A scene with characters and no seed of its own (seed 0) starts from its first
    #: character's seed, and every character's appearance is in the prompt.
    SEED_LOCK = "seed_lock"
    #: As seed lock for prompts; the scene's self-attention also attends to the keys and
    #: values of its characters' identity images, drawn in the same batch.
    CONSISTENT_SELF_ATTENTION = "consistent_self_attention"
    #: A reference portrait per character, then every scene conditioned on the portraits of
    #: its characters through an IP-Adapter.
    REFERENCE_IMAGES = "reference_images"


#: Consistency modes that act inside a UNet (its self-attention layers, its IP-Adapter).
UNET_MODES = (ConsistencyMode.CONSISTENT_SELF_ATTENTION, ConsistencyMode.REFERENCE_IMAGES)


def unet_only_message(mode: ConsistencyMode | str, pipeline: str, denoiser: str) -> str:
    """Why ``mode`` (one of :data:`UNET_MODES`) cannot run on ``pipeline``."""
    mode = ConsistencyMode(mode)
    what = {
        ConsistencyMode.CONSISTENT_SELF_ATTENTION: "shares the UNet's self-attention layers",
        ConsistencyMode.REFERENCE_IMAGES: "conditions the UNet through an IP-Adapter",
    }[mode]
    return (
        f"consistency {mode.value} needs a UNet pipeline (SD 1.x, SD 2.x, SDXL): it {what}, "
        f"and {pipeline} has a {denoiser} denoiser; use seed_lock or none"
    )


@dataclass(frozen=True)
class CastMember:
    """A character as a render request names it: a fixed look, and the seed of its portraits.

    ``diffusion.v1.Character`` of the contract; ``seed`` 0 derives one from the name.
    The story's character (no seed) is :class:`storyreel.storyboard.Character`.
    ``reference_uri`` (REFERENCE_IMAGES only) is an uploaded image of the character
    that conditions its scenes instead of a drawn portrait.
    """

    name: str
    appearance: str
    seed: int = 0
    reference_uri: str = ""


@dataclass(frozen=True)
class Scene:
    """One image to draw: ``index`` is the scene's 1-based position.

    ``seed`` 0: the scene has no seed of its own; with a job seed its seed is derived
    from it (:func:`storyreel.seeds.scene_seed`), and seed lock draws it from its first
    character's seed. Any other value is the scene's own and is used as given, seed
    lock or not. ``characters`` names the request's characters present in the scene.
    """

    index: int
    prompt: str
    seed: int = 0
    characters: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModelFacts:
    """What the loaded model fixes about every request (known once it is loaded)."""

    #: Identifies the weights in cache keys.
    fingerprint: str
    #: Pipeline class name, e.g. StableDiffusionXLPipeline.
    pipeline: str
    #: Width and height must be multiples of this.
    side_multiple: int
    #: The model's native image size, used when neither request nor settings give one.
    native_width: int
    native_height: int
    device_type: str
    dtype: str
    #: Scheduler names a request may ask for ("default" is the checkpoint's own).
    schedulers: tuple[str, ...]
    #: Prefixes of the self-attention layers the consistent self-attention acts on.
    attention_layers: tuple[str, ...] = ()
    #: Fingerprint of the loaded IP-Adapter; None when none is loaded.
    ip_adapter: str | None = None
    #: Retries a flagged image gets; None when no safety checker is loaded.
    safety_retries: int | None = None
    #: The denoiser's kind: "unet" (SD 1.x, SD 2.x, SDXL) or "transformer" (SD3, FLUX.1,
    #: PixArt-Σ). Consistent self-attention and reference images need a UNet.
    denoiser: str = "unet"
    #: The checkpoint's scheduler is a flow-matching one (SD3, FLUX.1): the DDPM-style
    #: schedulers do not apply, only "default" does.
    flow_matching: bool = False
    #: Whether the pipeline uses a negative prompt (FLUX.1 is guidance-distilled: no).
    negative_prompt: bool = True
    #: The denoiser and VAE decoder run compiled (torch.compile).
    compiled: bool = False


@dataclass(frozen=True)
class CharacterPlan:
    """A character as the render uses it."""

    name: str
    appearance: str
    #: 1-based position in the request's character list.
    slot: int
    #: Seed of its identity images and reference portrait, and of seed-locked scenes.
    seed: int
    #: Prompt of its reference portrait and identity images.
    portrait_prompt: str
    #: Content key of its reference portrait.
    portrait_key: str
    #: Its uploaded reference image and that image's content hash ("" when none: a
    #: portrait is drawn instead).
    reference_uri: str = ""
    reference_hash: str = ""

    def identity_seeds(self, count: int) -> tuple[int, ...]:
        """Seeds of its ``count`` identity images: its own seed, then derived ones."""
        return (self.seed, *(derive_seed(self.seed, "identity", n) for n in range(1, count)))


@dataclass(frozen=True)
class ImagePlan:
    """One image with everything that decides its pixels."""

    #: Scene index (0 for a reference portrait).
    index: int
    prompt: str
    seed: int
    #: Characters whose identity images or reference portraits condition this image.
    conditioned_on: tuple[str, ...]
    #: Content key: a hash of everything that affects the pixels.
    key: str


@dataclass(frozen=True)
class RenderPlan:
    """A checked request with every default filled in and every image planned."""

    job_id: str
    width: int
    height: int
    steps: int
    guidance: float
    negative_prompt: str
    scheduler: str
    mode: ConsistencyMode
    #: Identity-token weight (consistent self-attention) or IP-Adapter scale (reference images).
    strength: float
    #: Characters by name, in request order.
    characters: dict[str, CharacterPlan]
    images: tuple[ImagePlan, ...]
    #: Identity images per character (consistent self-attention).
    identity_images: int = 1
    #: Reference portraits the scenes need, by character name (reference images only).
    portraits: dict[str, ImagePlan] = field(default_factory=dict)
    #: Run of the job: every object the render stores goes under this revision's folder
    #: (see :func:`storyreel.ids.job_key`). Not part of any content key: the pixels do
    #: not depend on it, so the cache hits across revisions.
    revision: int = 0


def image_key(job_id: str, index: int, revision: int = 0) -> str:
    """Object key of scene ``index``'s image: ``jobs/<job_id>/[r<N>/]images/scene-NNN.png``."""
    return job_key(job_id, "images", f"scene-{index:03d}.png", revision=revision)


def portrait_key(job_id: str, slot: int, name: str, revision: int = 0) -> str:
    """Object key of a character's reference portrait.

    ``jobs/<id>/[r<N>/]characters/NN-<slug>.png``.
    """
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:40].strip("-") or "character"
    return job_key(job_id, "characters", f"{slot:02d}-{slug}.png", revision=revision)


def cache_key(prefix: str, content_key: str) -> str:
    """Object key of a cached image: ``<prefix>/<content key>.png``."""
    return f"{prefix}/{content_key}.png"


def with_appearances(prompt: str, characters: Sequence[CharacterPlan | CastMember]) -> str:
    """``prompt`` plus each character's name and appearance that it does not already hold."""
    parts = [prompt]
    for character in characters:
        if character.appearance.strip().lower() not in prompt.lower():
            parts.append(f"{character.name}, {character.appearance.strip()}")
    return ", ".join(parts)


def _content_key(facts: ModelFacts, fields: dict) -> str:
    payload = {
        "format": CACHE_FORMAT,
        "model": facts.fingerprint,
        "pipeline": facts.pipeline,
        "device": facts.device_type,
        "dtype": facts.dtype,
        "safety_retries": facts.safety_retries,
        # Compiled kernels fuse and round differently (more than a batch size does in
        # bfloat16); named only when set, so eager keys stay as they were.
        **({"compiled": True} if facts.compiled else {}),
        **fields,
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _check_text(where: str, label: str, text: str, max_chars: int) -> None:
    """InvalidInput unless ``text`` (``label`` of ``where``) is not blank and at most
    ``max_chars`` long."""
    if not text.strip():
        raise InvalidInput(f"{where}: {label} must not be empty")
    if len(text) > max_chars:
        raise InvalidInput(
            f"{where}: {label} is {len(text)} characters, the maximum is {max_chars}"
        )


def _check_scenes(settings: DiffusionSettings, scenes: Sequence[Scene], names) -> None:
    if not MIN_SCENES <= len(scenes) <= settings.max_scenes:
        raise InvalidInput(
            f"scenes must hold {MIN_SCENES} to {settings.max_scenes} scenes, got {len(scenes)}"
        )
    seen: set[int] = set()
    for position, scene in enumerate(scenes):
        where = f"scenes[{position}] (index {scene.index})"
        if scene.index < 1:
            raise InvalidInput(f"{where}: index must be 1 or more")
        if scene.index in seen:
            raise InvalidInput(f"{where}: index {scene.index} appears more than once")
        seen.add(scene.index)
        _check_text(where, "prompt", scene.prompt, settings.max_prompt_chars)
        if not 0 <= scene.seed <= MAX_UINT64_SEED:
            raise InvalidInput(f"{where}: seed must be between 0 and 2**64-1, got {scene.seed}")
        if len(scene.characters) > settings.max_characters_per_scene:
            raise InvalidInput(
                f"{where}: characters lists {len(scene.characters)} names, "
                f"the maximum is {settings.max_characters_per_scene}"
            )
        if len(set(scene.characters)) != len(scene.characters):
            raise InvalidInput(f"{where}: characters names a character more than once")
        for name in scene.characters:
            if name not in names:
                raise InvalidInput(
                    f"{where}: character {name!r} is not in the request's characters"
                )


def _check_characters(settings: DiffusionSettings, characters: Sequence[CastMember]) -> None:
    if len(characters) > settings.max_characters:
        raise InvalidInput(
            f"characters must hold at most {settings.max_characters}, got {len(characters)}"
        )
    seen: set[str] = set()
    for position, character in enumerate(characters):
        where = f"characters[{position}]"
        _check_text(where, "name", character.name, settings.max_character_name_chars)
        if character.name in seen:
            raise InvalidInput(f"{where}: name {character.name!r} appears more than once")
        seen.add(character.name)
        _check_text(
            f"{where} ({character.name})",
            "appearance",
            character.appearance,
            settings.max_prompt_chars,
        )
        if not 0 <= character.seed <= MAX_UINT64_SEED:
            raise InvalidInput(f"{where} ({character.name}): seed must be between 0 and 2**64-1")


def _size(
    settings: DiffusionSettings,
    facts: ModelFacts,
    width: int,
    height: int,
    aspect: str,
) -> tuple[int, int]:
    multiple = facts.side_multiple
    defaults = {
        "width": settings.default_width or facts.native_width,
        "height": settings.default_height or facts.native_height,
    }
    if aspect:
        if width or height:
            raise InvalidInput(
                f"aspect {aspect} and width/height exclude each other: "
                "leave width and height 0 to use an aspect ratio"
            )
        width, height = image_size(
            aspect,
            defaults["width"],
            defaults["height"],
            multiple,
            math.ceil(settings.min_side / multiple) * multiple,
            settings.max_side // multiple * multiple,
        )
    sides = {}
    for name, value in (("width", width), ("height", height)):
        side = sides[name] = value or defaults[name]
        if not settings.min_side <= side <= settings.max_side or side % multiple:
            raise InvalidInput(
                f"{name} must be a multiple of {multiple} between "
                f"{settings.min_side} and {settings.max_side} pixels "
                f"(0 selects the default {defaults[name]}), got {side}"
            )
    return sides["width"], sides["height"]


def plan_render(
    settings: DiffusionSettings,
    facts: ModelFacts,
    job_id: str,
    scenes: Sequence[Scene],
    *,
    width: int = 0,
    height: int = 0,
    aspect: str = "",
    steps: int = 0,
    guidance: float = 0.0,
    negative_prompt: str = "",
    scheduler: str = "",
    characters: Sequence[CastMember] = (),
    consistency: ConsistencyMode | str | None = None,
    consistency_strength: float = 0.0,
    job_seed: int | None = None,
    revision: int = 0,
    reference_hashes: Mapping[str, str] | None = None,
) -> RenderPlan:
    """Check a request against the limits and plan every image (0 or "" selects a default).

    ``revision`` is the run of the job the images are stored under (0 to 2**31-1).
    ``reference_hashes`` maps each character's ``reference_uri`` to the SHA-256 of the
    image's bytes (read by the renderer, which checks the URI with
    :func:`check_reference_uri`): it is part of the content key of every scene the
    image conditions.

    Raises InvalidInput naming the field and its bounds, or FailedPrecondition when
    the request needs something this service was not started with (an IP-Adapter) or
    its model cannot do (a UNet-only consistency mode or a negative prompt on a
    transformer pipeline that has no use for it).
    Does no work and touches no storage, so a rejected request leaves nothing behind.
    """
    check_job_id(job_id)
    check_revision(revision)
    _check_characters(settings, characters)
    _check_scenes(settings, scenes, {character.name for character in characters})
    if len(negative_prompt) > settings.max_prompt_chars:
        raise InvalidInput(
            f"negative_prompt is {len(negative_prompt)} characters, "
            f"the maximum is {settings.max_prompt_chars}"
        )
    if job_seed is not None and not 0 <= job_seed <= MAX_UINT64_SEED:
        raise InvalidInput(f"job_seed must be between 0 and 2**64-1, got {job_seed}")

    try:
        mode = ConsistencyMode(consistency or settings.consistency)
    except ValueError:
        choices = ", ".join(mode.value for mode in ConsistencyMode)
        raise InvalidInput(f"consistency must be one of {choices}; got {consistency!r}") from None
    if aspect and aspect not in SHAPES:
        raise InvalidInput(f"aspect must be one of {', '.join(SHAPES)}; got {aspect!r}")
    width, height = _size(settings, facts, width, height, aspect)
    steps = steps or settings.default_steps
    if not 1 <= steps <= settings.max_steps:
        raise InvalidInput(
            f"steps must be between 1 and {settings.max_steps} "
            f"(0 selects the default {settings.default_steps}), got {steps}"
        )
    guidance = guidance or settings.default_guidance
    if not (math.isfinite(guidance) and 0 < guidance <= settings.max_guidance):
        raise InvalidInput(
            f"guidance must be above 0 and at most {settings.max_guidance} "
            f"(0 selects the default {settings.default_guidance}), got {guidance}"
        )
    scheduler = scheduler or settings.scheduler
    if scheduler not in facts.schedulers:
        why = (
            f" ({facts.pipeline} is a flow-matching model: the DDPM-style schedulers do not "
            "apply to it)"
            if facts.flow_matching
            else ""
        )
        raise InvalidInput(
            f"scheduler must be one of {', '.join(facts.schedulers)}{why}; got {scheduler!r}"
        )
    if negative_prompt and not facts.negative_prompt:
        raise FailedPrecondition(
            f"negative_prompt is not used by {facts.pipeline}: the model is guidance-distilled "
            "and draws no unconditional pass to steer away from; leave negative_prompt empty"
        )
    if facts.denoiser != "unet" and mode in UNET_MODES:
        raise FailedPrecondition(unet_only_message(mode, facts.pipeline, facts.denoiser))

    strength = 0.0
    if mode is ConsistencyMode.CONSISTENT_SELF_ATTENTION:
        strength = consistency_strength or settings.attention_strength
    elif mode is ConsistencyMode.REFERENCE_IMAGES:
        if facts.ip_adapter is None:
            raise FailedPrecondition(
                "consistency reference_images needs an IP-Adapter, and this diffusion service "
                "has none (set STORYREEL_DIFFUSION_IP_ADAPTER)"
            )
        strength = consistency_strength or settings.ip_adapter_scale
    hashes = reference_hashes or {}
    for position, character in enumerate(characters):
        if not character.reference_uri:
            continue
        where = f"characters[{position}] ({character.name})"
        if mode is not ConsistencyMode.REFERENCE_IMAGES:
            raise InvalidInput(
                f"{where}: reference_uri needs consistency reference_images (got {mode.value})"
            )
        if character.reference_uri not in hashes:
            raise InvalidInput(f"{where}: reference_uri {character.reference_uri} was not read")
    if consistency_strength and not (
        math.isfinite(consistency_strength)
        and 0 < consistency_strength <= settings.max_consistency_strength
    ):
        raise InvalidInput(
            f"consistency_strength must be above 0 and at most "
            f"{settings.max_consistency_strength} (0 selects the mode's default), "
            f"got {consistency_strength}"
        )

    common = {
        "negative_prompt": negative_prompt,
        "width": width,
        "height": height,
        "steps": steps,
        "guidance": float(guidance),
        "scheduler": scheduler,
    }
    root = job_seed or 0
    cast: dict[str, CharacterPlan] = {}
    for slot, character in enumerate(characters, start=1):
        seed = character.seed or derive_seed(root, "character", character.name)
        prompt = settings.portrait_prompt.format(
            name=character.name, appearance=character.appearance.strip()
        )
        cast[character.name] = CharacterPlan(
            name=character.name,
            appearance=character.appearance,
            slot=slot,
            seed=seed,
            portrait_prompt=prompt,
            portrait_key=_content_key(facts, {**common, "prompt": prompt, "seed": seed}),
            reference_uri=character.reference_uri,
            reference_hash=hashes.get(character.reference_uri, ""),
        )

    images = []
    for scene in scenes:
        present = [cast[name] for name in scene.characters]
        # A scene's own seed (non-zero) wins over the job seed and the seed lock.
        seed = scene.seed
        if seed == 0 and job_seed is not None:
            seed = scene_seed(job_seed, scene.index)
        prompt = scene.prompt
        conditioned_on: tuple[str, ...] = ()
        conditioning = None
        if mode is not ConsistencyMode.NONE and present:
            prompt = with_appearances(prompt, present)
        if mode is ConsistencyMode.SEED_LOCK and present and scene.seed == 0:
            seed = present[0].seed
        elif mode is ConsistencyMode.CONSISTENT_SELF_ATTENTION and present:
            conditioned_on = scene.characters
            conditioning = {
                "mode": mode.value,
                "strength": strength,
                "layers": list(facts.attention_layers),
                "identities": [
                    {
                        "prompt": c.portrait_prompt,
                        "seeds": list(c.identity_seeds(settings.identity_images)),
                    }
                    for c in present
                ],
            }
        elif mode is ConsistencyMode.REFERENCE_IMAGES and present:
            conditioned_on = scene.characters
            conditioning = {
                "mode": mode.value,
                "adapter": facts.ip_adapter,
                "scale": strength,
                "references": [
                    f"upload:sha256:{c.reference_hash}" if c.reference_uri else c.portrait_key
                    for c in present
                ],
            }
        fields = {**common, "prompt": prompt, "seed": seed, "conditioning": conditioning}
        images.append(
            ImagePlan(
                index=scene.index,
                prompt=prompt,
                seed=seed,
                conditioned_on=conditioned_on,
                key=_content_key(facts, fields),
            )
        )

    portraits: dict[str, ImagePlan] = {}
    if mode is ConsistencyMode.REFERENCE_IMAGES:
        for image in images:
            for name in image.conditioned_on:
                character = cast[name]
                if character.reference_uri:
                    continue  # conditioned on its uploaded image: no portrait is drawn
                portraits.setdefault(
                    name,
                    ImagePlan(
                        index=0,
                        prompt=character.portrait_prompt,
                        seed=character.seed,
                        conditioned_on=(),
                        key=character.portrait_key,
                    ),
                )
    return RenderPlan(
        job_id=job_id,
        width=width,
        height=height,
        steps=steps,
        guidance=float(guidance),
        negative_prompt=negative_prompt,
        scheduler=scheduler,
        mode=mode,
        strength=float(strength),
        characters=cast,
        images=tuple(images),
        identity_images=settings.identity_images,
        portraits=portraits,
        revision=revision,
    )


#: The only folder of the store a reference image is read from.
REFERENCE_PREFIX = "uploads/"


def check_reference_uri(where: str, uri: str, key: str) -> None:
    """InvalidInput unless ``uri`` (object key ``key``) is an upload.

    A reference image is read only from the store's ``uploads/`` folder: never another
    job's artifacts, the cache, or anything outside the store (the store's ``key_of``
    refuses URIs of other stores and keys with ``..``).
    """
    if not key.startswith(REFERENCE_PREFIX):
        raise InvalidInput(
            f"{where}: reference_uri {uri} is not an uploaded image (only {REFERENCE_PREFIX} "
            "objects of this service's artifact store are read)"
        )


def plan_batches(plan: RenderPlan, positions: Sequence[int], max_batch: int) -> list[list[int]]:
    """Split the images at ``positions`` (in order) into batches of at most ``max_batch``.

    Consecutive images stay together, so images stream back in request order. With
    reference images, one batch shares one set of reference portraits (the pipeline
    conditions a whole call on the same images), so a new batch starts where the set
    of characters changes.
    """
    batches: list[list[int]] = []
    for position in positions:
        image = plan.images[position]
        if batches:
            last = batches[-1]
            same_refs = (
                plan.mode is not ConsistencyMode.REFERENCE_IMAGES
                or plan.images[last[-1]].conditioned_on == image.conditioned_on
            )
            if len(last) < max_batch and same_refs:
                last.append(position)
                continue
        batches.append([position])
    return batches
