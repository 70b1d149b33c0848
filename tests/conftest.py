"""Fixtures shared by the whole suite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from storyreel.settings import StorageSettings
from storyreel.storage import FileStore, open_store

REPO = Path(__file__).resolve().parents[1]
MODELS = Path(os.environ.get("STORYREEL_MODELS_DIR", REPO / "models"))


@pytest.fixture
def models_dir() -> Path:
    """Offline models built by `make models`."""
    if not (MODELS / "tiny-sd").is_dir():
        pytest.fail(f"offline models missing under {MODELS}: run `make models` first")
    return MODELS


@pytest.fixture
def storage_settings(tmp_path: Path) -> StorageSettings:
    return StorageSettings(url=(tmp_path / "artifacts").as_uri())


@pytest.fixture
def file_store(storage_settings: StorageSettings) -> FileStore:
    store = open_store(storage_settings)
    assert isinstance(store, FileStore)
    return store
