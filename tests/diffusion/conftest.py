"""Fixtures of the diffusion service tests: tiny models and loaded renderers, built once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from storyreel_diffusion.renderer import SceneRenderer
from storyreel_diffusion.service import DiffusionService
from storyreel_diffusion.settings import DiffusionSettings
from storyreel_diffusion.tiny import IP_ADAPTER_WEIGHTS, build_tiny_ip_adapter, build_tiny_pipeline
from support import loaded_renderer

from storyreel.channels import open_channel
from storyreel.diffusion.v1 import diffusion_pb2_grpc
from storyreel.serving import start_and_load
from storyreel.settings import StorageSettings
from storyreel.storage import ArtifactStore, open_store


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Stable Diffusion checkpoint, built afresh by the code `make models` runs."""
    return build_tiny_pipeline(tmp_path_factory.mktemp("models") / "tiny-sd")


@pytest.fixture(scope="session")
def tiny_ip_adapter(tiny_sd: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny IP-Adapter (weights and CLIP image encoder) matching ``tiny_sd``."""
    return build_tiny_ip_adapter(tiny_sd, tmp_path_factory.mktemp("adapters") / "tiny-ip")


@pytest.fixture(scope="session")
def diffusion_settings(tiny_sd: Path) -> DiffusionSettings:
    """Service settings with small defaults, so tests render 64-128 px images in 2 steps.

    No cache and batches of one: tests that compare two renders see two real
    renders, byte for byte. Tests of the cache and of batching turn them on.
    """
    return DiffusionSettings(
        model=str(tiny_sd),
        device="cpu",
        port=0,
        local_files_only=True,
        default_width=64,
        default_height=80,
        default_steps=2,
        max_scenes=4,
        max_batch_size=1,
        cache_enabled=False,
        metrics_port=0,
    )


@pytest.fixture(scope="session")
def ip_adapter_settings(diffusion_settings: DiffusionSettings, tiny_ip_adapter: Path) -> dict:
    """Setting overrides that load the tiny IP-Adapter."""
    return {
        "ip_adapter": str(tiny_ip_adapter),
        "ip_adapter_subfolder": "",
        "ip_adapter_weight_name": IP_ADAPTER_WEIGHTS,
    }


@pytest.fixture(scope="session")
def shared_store(tmp_path_factory: pytest.TempPathFactory) -> ArtifactStore:
    """A file store shared by the session's loaded renderers and servers."""
    url = tmp_path_factory.mktemp("artifacts").as_uri()
    return open_store(StorageSettings(url=url))


@pytest.fixture(scope="session")
async def renderer(diffusion_settings: DiffusionSettings, shared_store: ArtifactStore):
    """A loaded renderer without cache, drawing one image per pipeline call."""
    async with loaded_renderer(diffusion_settings, shared_store) as renderer:
        yield renderer


@pytest.fixture(scope="session")
async def cached_renderer(diffusion_settings: DiffusionSettings, shared_store: ArtifactStore):
    """A loaded renderer with the content-addressed cache and batches of up to 3 images."""
    settings = diffusion_settings.model_copy(update={"cache_enabled": True, "max_batch_size": 3})
    async with loaded_renderer(settings, shared_store) as renderer:
        yield renderer


@pytest.fixture(scope="module")
async def start_server(diffusion_settings: DiffusionSettings, shared_store: ArtifactStore):
    """``await start_server(**overrides)``: a loaded render server on a real port, with
    ``diffusion_settings`` but for ``overrides`` and the shared store; all stop after the
    module."""
    started = []

    async def start(**overrides: Any):
        settings = diffusion_settings.model_copy(update=overrides)
        running = await start_and_load(settings, DiffusionService(settings, shared_store))
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop(0)


@pytest.fixture
async def stub(server):
    """A stub of the module's ``server`` fixture (a running render server)."""
    async with open_channel(f"127.0.0.1:{server.port}") as channel:
        yield diffusion_pb2_grpc.DiffusionServiceStub(channel)


class RecordingPipeline:
    """Test double around a real loaded pipeline: passes every call through to it.

    Records each call's prompts, and raises ``fail_with`` instead of calling
    through while it is set (to stand in for a GPU running out of memory, which
    cannot happen on demand here). Every other attribute is the real pipeline's.
    """

    _own = ("inner", "calls", "fail_with", "fail_above")

    def __init__(self, inner: Any) -> None:
        object.__setattr__(self, "inner", inner)
        object.__setattr__(self, "calls", [])
        object.__setattr__(self, "fail_with", None)
        #: Raise ``fail_with`` only for calls of more prompts than this (None: every call).
        object.__setattr__(self, "fail_above", None)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self._own:
            object.__setattr__(self, name, value)
        else:
            setattr(self.inner, name, value)

    def __call__(self, **kwargs: Any) -> Any:
        self.calls.append(list(kwargs["prompt"]))
        too_many = self.fail_above is None or len(kwargs["prompt"]) > self.fail_above
        if self.fail_with is not None and too_many:
            raise self.fail_with
        return self.inner(**kwargs)

    @property
    def batch_sizes(self) -> list[int]:
        return [len(prompts) for prompts in self.calls]


@pytest.fixture
def record_calls():
    """``record_calls(renderer)`` puts a RecordingPipeline around the renderer's pipeline.

    The real pipeline is put back after the test.
    """
    swapped: list[tuple[SceneRenderer, Any]] = []

    def wrap(renderer: SceneRenderer) -> RecordingPipeline:
        recorder = RecordingPipeline(renderer.pipeline)
        swapped.append((renderer, renderer.swap_pipeline(recorder)))
        return recorder

    yield wrap
    for renderer, real in reversed(swapped):
        if renderer.loaded:
            renderer.swap_pipeline(real)
