"""checkov, a third-party policy suite, on every rendered Kubernetes overlay.

Each overlay is rendered with ``kubectl kustomize`` (the ``rendered`` fixture) and checked
with checkov's Kubernetes checks (CIS-style: digests, pull policy, Secrets as files,
privileges, probes, resources, ...). No check may fail. A check that cannot pass is
skipped in the manifest itself, with a ``checkov.io/skipN: CKV_K8S_NN=reason``
annotation on the resource; every skip must carry a reason and be one of those listed
below, so that a new skip is a decision made in review.

checkov lives in a venv of its own (``make checkov``: ``.venv/checkov``, pinned by
``checkov-requirements.txt``), since its dependencies conflict with the project's.
It has no Docker Compose checks, so ``deploy/compose.yaml`` is checked by
test_compose.py alone.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REQUIREMENTS = Path(__file__).parent / "checkov-requirements.txt"
OVERLAYS = ("cpu-dev", "gpu")
#: storyreel's own images: built and pushed by the operator, so no digest is known here.
OWN_IMAGES = ("gateway", "llm", "diffusion", "composer")
#: What may be skipped, and where: check id -> overlay -> resources (Kind.namespace.name).
ALLOWED_SKIPS = {
    # Image should use digest: storyreel's own images (digest known only after a push),
    # and TGI (no verified digest of 3.3.6; pulled with imagePullPolicy Always instead).
    "CKV_K8S_43": {
        "cpu-dev": {f"Deployment.storyreel.{name}" for name in OWN_IMAGES},
        "gpu": {f"Deployment.storyreel.{name}" for name in (*OWN_IMAGES, "tgi")},
    },
    # Image pull policy Always: cpu-dev runs images loaded with `kind load`, no registry.
    "CKV_K8S_15": {"cpu-dev": {f"Deployment.storyreel.{name}" for name in OWN_IMAGES}},
    # High UID: PostgreSQL keeps the official image's uid 999, which owns its data.
    "CKV_K8S_40": {overlay: {"StatefulSet.storyreel.postgres"} for overlay in OVERLAYS},
    # Secrets as environment variables: only for settings with no file form, which is
    # TGI's HF_TOKEN alone (derived from the manifests in
    # test_every_secret_env_skip_names_a_workload_that_needs_it). storyreel's own
    # services read every secret from a file (*_FILE settings).
    "CKV_K8S_35": {"gpu": {"Deployment.storyreel.tgi"}},
}


def checkov_binary() -> str:
    """checkov from ``$CHECKOV``, the venv that ``make checkov`` makes, or the PATH."""
    candidates = [
        os.environ.get("CHECKOV", ""),
        str(Path(sys.prefix) / "checkov" / "bin" / "checkov"),
        shutil.which("checkov") or "",
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    pytest.fail("checkov is not installed: run `make checkov` (it makes .venv/checkov)")


def pinned_version() -> str:
    match = re.search(r"^checkov==(\S+)$", REQUIREMENTS.read_text(), re.MULTILINE)
    assert match, f"{REQUIREMENTS} does not pin checkov"
    return match.group(1)


def strip_skips(objects: list[dict]) -> list[dict]:
    """The same objects without any checkov skip annotation."""
    objects = copy.deepcopy(objects)
    for obj in objects:
        annotations = obj.get("metadata", {}).get("annotations", {})
        for key in [k for k in annotations if k.startswith("checkov.io/skip")]:
            del annotations[key]
    return objects


@pytest.fixture(scope="module")
def checkov(rendered, tmp_path_factory) -> dict[str, dict]:
    """checkov's report for each rendered overlay (and, as ``careless``, the gpu overlay
    with its skips taken out): file stem -> {"summary", "failed", "skipped"}."""
    folder = tmp_path_factory.mktemp("checkov")
    documents = {name: rendered[name] for name in OVERLAYS}
    documents["careless"] = strip_skips(rendered["gpu"])
    for name, objects in documents.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump_all(objects, sort_keys=False))
    result = subprocess.run(
        [
            checkov_binary(),
            "--directory",
            str(folder),
            "--framework",
            "kubernetes",
            # Offline: no Prisma Cloud guidelines (nor, below, a look for a newer checkov).
            "--skip-download",
            "--compact",
            "--output",
            "json",
        ],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "CKV_SKIP_PACKAGE_UPDATE_CHECK": "true"},
        timeout=300,
    )
    # 0: all passed, 1: some check failed; anything else is checkov itself failing.
    assert result.returncode in (0, 1), result.stderr[-4000:]
    report = json.loads(result.stdout)
    assert report["check_type"] == "kubernetes"
    summary = report["summary"]
    assert summary["checkov_version"] == pinned_version(), "make checkov: the venv is stale"
    assert summary["parsing_errors"] == 0, summary
    reports: dict[str, dict] = {
        name: {"failed": [], "skipped": [], "passed": 0} for name in documents
    }
    for outcome, key in (("failed_checks", "failed"), ("skipped_checks", "skipped")):
        for check in report["results"].get(outcome, []):
            reports[Path(check["file_path"]).stem][key].append(check)
    for check in report["results"].get("passed_checks", []):
        reports[Path(check["file_path"]).stem]["passed"] += 1
    return reports


def describe(checks: list[dict]) -> str:
    return "\n".join(f"{c['check_id']} {c['check_name']}: {c['resource']}" for c in checks)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_checkov_finds_no_failed_check(checkov, overlay):
    report = checkov[overlay]
    assert report["passed"] > 500, f"checkov checked almost nothing: {report['passed']} passed"
    assert not report["failed"], "checkov fails:\n" + describe(report["failed"])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_skip_is_allowed_and_gives_its_reason(checkov, overlay):
    for check in checkov[overlay]["skipped"]:
        where = f"{check['check_id']} on {check['resource']}"
        allowed = ALLOWED_SKIPS.get(check["check_id"], {}).get(overlay, set())
        assert check["resource"] in allowed, f"{where} is skipped; add it to ALLOWED_SKIPS?"
        reason = check["check_result"].get("suppress_comment") or ""
        assert reason != "No comment provided" and len(reason.split()) >= 8, (
            f"{where} is skipped without a reason: {reason!r}"
        )


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_env_skip_names_a_workload_that_needs_it(rendered, checkov, overlay):
    # CKV_K8S_35 may be skipped only where a Secret still reaches a container as an
    # environment variable (settings without a file form); elsewhere it must pass.
    needs = set()
    for obj in rendered[overlay]:
        if obj["kind"] not in ("Deployment", "StatefulSet", "Job"):
            continue
        spec = obj["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            if any("secretKeyRef" in e.get("valueFrom", {}) for e in container.get("env", [])):
                needs.add(f"{obj['kind']}.storyreel.{obj['metadata']['name']}")
    skipped = {c["resource"] for c in checkov[overlay]["skipped"] if c["check_id"] == "CKV_K8S_35"}
    assert skipped == needs


def test_checkov_fails_the_gpu_overlay_without_its_skips(checkov):
    # The skips are what stands between these findings and a failed `make test`: checkov
    # really runs the checks the manifests skip.
    failed = {(c["check_id"], c["resource"]) for c in checkov["careless"]["failed"]}
    assert ("CKV_K8S_43", "Deployment.storyreel.gateway") in failed
    assert ("CKV_K8S_35", "Deployment.storyreel.tgi") in failed
    assert ("CKV_K8S_40", "StatefulSet.storyreel.postgres") in failed
    # ... and nothing it skips is reported as passing.
    assert not checkov["careless"]["skipped"]
