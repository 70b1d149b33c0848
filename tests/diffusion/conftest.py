"""Fixtures of the render service tests: one tiny model and one loaded renderer per session."""

from __future__ import annotations

from pathlib import Path

import pytest
from storyreel_diffusion.renderer import SceneRenderer
from storyreel_diffusion.settings import DiffusionSettings
from storyreel_diffusion.tiny import build_tiny_pipeline

from storyreel.settings import StorageSettings
from storyreel.storage import ArtifactStore, open_store


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion checkpoint, built afresh by the code `make models` runs."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def diffusion_settings(tiny_sd: Path) -> DiffusionSettings:
    """Service settings with small defaults, so tests render 64-128 px images in 2 steps."""
    return DiffusionSettings(
        model=str(tiny_sd),
        device="cpu",
        port=0,
        local_files_only=True,
        default_width=64,
        default_height=80,
        default_steps=2,
        max_scenes=4,
    )


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    """A file store shared by the session's loaded renderer and server."""
    url = tmp_path_factory.mktemp("artifacts").as_uri()
    return open_store(StorageSettings(url=url))


@pytest.fixture(scope="session")
async def renderer(diffusion_settings: DiffusionSettings, shared_store: ArtifactStore):
    """A loaded renderer (loading includes the warm-up render)."""
    renderer = SceneRenderer(diffusion_settings, shared_store)
    await renderer.load()
    yield renderer
    await renderer.close()
