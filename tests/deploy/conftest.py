"""Fixtures for the deployment checks."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from support import OVERLAYS_DIR


@pytest.fixture(scope="session")
def kustomize() -> Callable[[Path], list[dict]]:
    """Render a kustomization directory offline with ``kubectl kustomize``: its objects."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not on PATH: the deployment checks render overlays with it")

    def render(path: Path) -> list[dict]:
        result = subprocess.run(
            [kubectl, "kustomize", str(path)], capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            pytest.fail(f"kubectl kustomize {path} failed:\n{result.stderr}")
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return render


@pytest.fixture(scope="session")
def rendered(kustomize) -> dict[str, list[dict]]:
    """Every Kubernetes overlay rendered offline with ``kubectl kustomize``: name -> objects."""
    return {path.name: kustomize(path) for path in sorted(OVERLAYS_DIR.iterdir())}
