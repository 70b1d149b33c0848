"""Request planning on its own (no model): seeds, prompts, sizes, cache keys and input checks."""

from __future__ import annotations

import dataclasses

import pytest
from storyreel_diffusion.planning import (
    CastMember,
    ConsistencyMode,
    ModelFacts,
    Scene,
    derive_seed,
    image_key,
    plan_batches,
    plan_render,
    portrait_key,
)
from storyreel_diffusion.settings import DiffusionSettings

from storyreel.errors import FailedPrecondition, InvalidInput
from storyreel.seeds import scene_seed

SD15 = ModelFacts(
    fingerprint="sha256:weights",
    pipeline="StableDiffusionPipeline",
    side_multiple=8,
    native_width=512,
    native_height=512,
    device_type="cpu",
    dtype="float32",
    schedulers=("default", "ddim", "euler_a"),
    attention_layers=("up_blocks",),
    ip_adapter="sha256:adapter",
)
SDXL = dataclasses.replace(
    SD15, pipeline="StableDiffusionXLPipeline", side_multiple=64, native_width=1024,
    native_height=1024,
)  # fmt: skip
SETTINGS = DiffusionSettings(_env_file=None, metrics_port=0)
MIRA = CastMember("Mira", "a girl with red braids and a yellow raincoat")
OTTO = CastMember("Otto", "an old grey whale with a scarred fin", seed=1234)


def plan(scenes=None, facts=SD15, settings=SETTINGS, **options):
    scenes = scenes or [Scene(1, "a lighthouse", 5)]
    return plan_render(settings, facts, "job-1", scenes, **options)


def test_job_seed_derives_scene_seeds_by_the_shared_rule():
    planned = plan([Scene(3, "a", 0), Scene(4, "b", 99)], job_seed=7, consistency="none")
    assert [image.seed for image in planned.images] == [scene_seed(7, 3), 99]


def test_without_job_seed_scene_seeds_are_used_as_given():
    planned = plan([Scene(1, "a", 0), Scene(2, "b", 42)], consistency="none")
    assert [image.seed for image in planned.images] == [0, 42]


def test_seed_lock_draws_every_scene_of_a_character_from_its_lead_characters_seed():
    scenes = [
        Scene(1, "Mira on the cliff", 0, ("Mira",)),
        Scene(2, "Mira and Otto at sea", 0, ("Mira", "Otto")),
        Scene(3, "Otto dives", 0, ("Otto",)),
        Scene(4, "an empty beach", 0),
    ]
    planned = plan(scenes, characters=[MIRA, OTTO], job_seed=11, consistency="seed_lock")
    mira_seed = derive_seed(11, "character", "Mira")
    assert [image.seed for image in planned.images] == [
        mira_seed,
        mira_seed,
        1234,  # Otto's own seed
        derive_seed(11, 4),
    ]
    unlocked = plan(scenes, characters=[MIRA, OTTO], job_seed=11, consistency="none")
    assert len({image.seed for image in unlocked.images}) == 4


def test_a_scenes_own_seed_beats_the_seed_lock_and_seed_0_gets_the_lock():
    scenes = [
        Scene(1, "Mira on the cliff", 0, ("Mira",)),
        Scene(2, "Mira at sea", 99, ("Mira",)),
        Scene(3, "Otto dives", 0, ("Otto",)),
    ]
    planned = plan(scenes, characters=[MIRA, OTTO], job_seed=11, consistency="seed_lock")
    assert [image.seed for image in planned.images] == [
        derive_seed(11, "character", "Mira"),
        99,
        1234,
    ]
    # Its prompt still spells out the appearance: only the seed is the scene's own.
    assert MIRA.appearance in planned.images[1].prompt


def test_modes_other_than_none_add_each_missing_appearance_to_the_prompt():
    scenes = [
        Scene(1, "Mira on the cliff", 1, ("Mira",)),
        Scene(2, f"Otto, {OTTO.appearance}, sings", 2, ("Otto",)),
    ]
    for mode in ("seed_lock", "consistent_self_attention", "reference_images"):
        planned = plan(scenes, characters=[MIRA, OTTO], consistency=mode)
        assert planned.images[0].prompt == f"Mira on the cliff, Mira, {MIRA.appearance}"
        assert planned.images[1].prompt == scenes[1].prompt  # already there: not repeated
    planned = plan(scenes, characters=[MIRA, OTTO], consistency="none")
    assert [image.prompt for image in planned.images] == [s.prompt for s in scenes]


def test_unspecified_mode_takes_the_service_default():
    assert plan().mode is ConsistencyMode.SEED_LOCK
    settings = SETTINGS.model_copy(update={"consistency": "none"})
    assert plan(settings=settings).mode is ConsistencyMode.NONE


def test_only_the_image_modes_condition_scenes_on_characters():
    scenes = [Scene(1, "Mira", 1, ("Mira",)), Scene(2, "sea", 2)]
    for mode, conditioned in (
        ("none", ()),
        ("seed_lock", ()),
        ("consistent_self_attention", ("Mira",)),
        ("reference_images", ("Mira",)),
    ):
        planned = plan(scenes, characters=[MIRA], consistency=mode)
        assert [i.conditioned_on for i in planned.images] == [conditioned, ()], mode
    references = plan(scenes, characters=[MIRA, OTTO], consistency="reference_images")
    assert list(references.portraits) == ["Mira"]  # only characters that appear
    assert references.portraits["Mira"].prompt.startswith("portrait of Mira, a girl")


def test_reference_portrait_keys_are_safe_object_keys():
    assert (
        portrait_key("job-1", 2, "Dr. Ödön O'Neil") == "jobs/job-1/characters/02-dr-d-n-o-neil.png"
    )
    assert portrait_key("job-1", 1, "李") == "jobs/job-1/characters/01-character.png"


def test_a_later_revision_keys_images_and_portraits_under_its_own_folder():
    assert image_key("job-1", 3) == image_key("job-1", 3, 0) == "jobs/job-1/images/scene-003.png"
    assert image_key("job-1", 3, 2) == "jobs/job-1/r2/images/scene-003.png"
    assert portrait_key("job-1", 1, "Mira", 2) == "jobs/job-1/r2/characters/01-mira.png"


def test_aspect_ratios_keep_the_default_area_on_the_models_pixel_multiple():
    sizes = {ratio: plan(aspect=ratio) for ratio in ("1:1", "16:9", "9:16")}
    assert {r: (p.width, p.height) for r, p in sizes.items()} == {
        "1:1": (512, 512),
        "16:9": (680, 384),
        "9:16": (384, 680),
    }
    xl = plan(facts=SDXL, aspect="16:9")
    assert (xl.width, xl.height) == (1344, 768)


def test_feed_portrait_and_cinema_shapes_are_drawn_in_their_shape():
    assert [(p.width, p.height) for p in (plan(aspect="4:5"), plan(aspect="21:9"))] == [
        (456, 576),
        (784, 336),
    ]
    xl = [plan(facts=SDXL, aspect=a) for a in ("4:5", "21:9")]
    assert [(p.width, p.height) for p in xl] == [(896, 1152), (1536, 640)]


def test_zero_size_is_the_models_native_size_unless_settings_give_one():
    assert (plan().width, plan(facts=SDXL).height) == (512, 1024)
    settings = SETTINGS.model_copy(update={"default_width": 640})
    assert plan(settings=settings).width == 640


def key_of(**changes) -> str:
    request = {
        "scenes": [Scene(1, "Mira on the cliff", 5, ("Mira",))],
        "characters": [MIRA],
        "width": 512,
        "height": 512,
        "steps": 20,
        "guidance": 7.0,
        "negative_prompt": "blur",
        "scheduler": "ddim",
        "consistency": "reference_images",
        "consistency_strength": 0.5,
    }
    facts = changes.pop("facts", SD15)
    job_id = changes.pop("job_id", "job-1")
    request |= changes
    return plan_render(SETTINGS, facts, job_id, request.pop("scenes"), **request).images[0].key


@pytest.mark.parametrize(
    "change",
    [
        {"scenes": [Scene(1, "Mira in the rain", 5, ("Mira",))]},
        {"scenes": [Scene(1, "Mira on the cliff", 6, ("Mira",))]},
        {"negative_prompt": "fog"},
        {"width": 520},
        {"height": 640},
        {"steps": 21},
        {"guidance": 7.5},
        {"scheduler": "euler_a"},
        {"consistency_strength": 0.6},
        {"consistency": "consistent_self_attention"},
        {"consistency": "none"},
        {"characters": [CastMember("Mira", "a girl with blue braids")]},
        {"characters": [CastMember("Mira", MIRA.appearance, seed=5)]},  # another portrait
        {"facts": dataclasses.replace(SD15, fingerprint="sha256:other-weights")},
        {"facts": dataclasses.replace(SD15, dtype="float16")},
        {"facts": dataclasses.replace(SD15, ip_adapter="sha256:other-adapter")},
    ],
    ids=repr,
)
def test_content_key_changes_with_everything_that_affects_the_pixels(change):
    assert key_of(**change) != key_of()


def test_content_key_ignores_the_job():
    assert key_of(job_id="another-job") == key_of()


def test_content_keys_ignore_the_revision_which_the_plan_carries():
    first = plan([Scene(1, "Mira", 5, ("Mira",))], characters=[MIRA])
    later = plan(
        [Scene(1, "Mira", 5, ("Mira",))],
        characters=[MIRA],
        consistency="reference_images",
        revision=7,
    )
    assert (first.revision, later.revision) == (0, 7)
    assert key_of(revision=7) == key_of()
    assert later.portraits["Mira"].key == first.characters["Mira"].portrait_key


def test_seed_lock_and_none_share_a_key_when_they_draw_the_same_pixels():
    scene = [Scene(1, "Mira on the cliff", 0, ("Mira",))]
    same_seed = CastMember("Mira", MIRA.appearance, seed=5)
    locked = plan(scene, characters=[same_seed], consistency="seed_lock")
    plain = plan([Scene(1, locked.images[0].prompt, 5)], characters=[], consistency="none")
    assert locked.images[0].key == plain.images[0].key


def test_reference_batches_split_where_the_characters_change():
    scenes = [
        Scene(1, "a", 1, ("Mira",)),
        Scene(2, "b", 2, ("Mira",)),
        Scene(3, "c", 3, ("Otto",)),
        Scene(4, "d", 4, ("Otto",)),
    ]
    settings = SETTINGS.model_copy(update={"max_scenes": 8})
    reference = plan(scenes, characters=[MIRA, OTTO], consistency="reference_images")
    assert plan_batches(reference, [0, 1, 2, 3], 8) == [[0, 1], [2, 3]]
    attention = plan(
        scenes, settings=settings, characters=[MIRA, OTTO], consistency="consistent_self_attention"
    )
    assert plan_batches(attention, [0, 1, 2, 3], 3) == [[0, 1, 2], [3]]
    assert plan_batches(attention, [1, 3], 3) == [[1, 3]]


INVALID = {
    "unknown character": (
        dict(scenes=[Scene(1, "a", 1, ("Nobody",))], characters=[MIRA]),
        "scenes[0] (index 1): character 'Nobody' is not in the request's characters",
    ),
    "character twice in a scene": (
        dict(scenes=[Scene(1, "a", 1, ("Mira", "Mira"))], characters=[MIRA]),
        "names a character more than once",
    ),
    "too many characters in a scene": (
        dict(
            scenes=[Scene(1, "a", 1, tuple("ABCDE"))],
            characters=[CastMember(n, "x") for n in "ABCDE"],
        ),
        "characters lists 5 names, the maximum is 4",
    ),
    "duplicate character names": (dict(characters=[MIRA, MIRA]), "appears more than once"),
    "empty character name": (dict(characters=[CastMember(" ", "x")]), "name must not be empty"),
    "long character name": (dict(characters=[CastMember("x" * 65, "y")]), "the maximum is 64"),
    "empty appearance": (
        dict(characters=[CastMember("Mira", "")]),
        "characters[0] (Mira): appearance must not be empty",
    ),
    "too many characters": (
        dict(characters=[CastMember(f"c{i}", "x") for i in range(9)]),
        "characters must hold at most 8, got 9",
    ),
    "aspect with a width": (dict(aspect="16:9", width=512), "exclude each other"),
    "unknown aspect": (dict(aspect="4:3"), "aspect must be one of 16:9, 9:16, 1:1, 4:5, 21:9"),
    "unknown consistency": (dict(consistency="magic"), "consistency must be one of none"),
    "strength above the maximum": (
        dict(consistency="consistent_self_attention", consistency_strength=2.5),
        "consistency_strength must be above 0 and at most 2.0",
    ),
    "strength not a number": (
        dict(consistency="reference_images", consistency_strength=float("nan")),
        "consistency_strength must be",
    ),
    "unknown scheduler": (dict(scheduler="magic"), "scheduler must be one of default, ddim"),
    "job seed above 64 bits": (dict(job_seed=2**64), "job_seed must be between 0 and 2**64-1"),
    "revision of 2**31": (
        dict(revision=2**31),
        "revision must be a whole number from 0 to 2**31-1",
    ),
    "negative revision": (dict(revision=-1), "revision must be a whole number from 0 to 2**31-1"),
    "SDXL width not a multiple of 64": (
        dict(facts=SDXL, width=1000),
        "width must be a multiple of 64",
    ),
}


@pytest.mark.parametrize("case", INVALID.values(), ids=INVALID.keys())
def test_invalid_request_names_the_field_and_its_bound(case):
    options, message = case
    with pytest.raises(InvalidInput) as raised:
        plan(**options)
    assert message in raised.value.message


def test_reference_images_without_an_ip_adapter_is_a_failed_precondition():
    no_adapter = dataclasses.replace(SD15, ip_adapter=None)
    with pytest.raises(FailedPrecondition, match="STORYREEL_DIFFUSION_IP_ADAPTER"):
        plan(facts=no_adapter, consistency="reference_images")
