"""deploy/compose.yaml: valid against the Compose Specification, and the stack it describes.

The schema is the compose-spec JSON schema that check-jsonschema ships
(``--builtin-schema vendor.compose-spec``); no Docker engine is needed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
COMPOSE = REPO / "deploy" / "compose.yaml"
SERVICES = {"gateway": 50050, "llm": 50051, "diffusion": 50052, "composer": 50053}
DATABASE_URL = "STORYREEL_GATEWAY_DATABASE_URL"


def interpolate(value: str) -> str:
    """What Compose makes of ``${VAR:-default}`` (and ``${VAR}``) with nothing set."""
    return re.sub(r"\$\{\w+(?::?-([^}]*))?\}", lambda m: m.group(1) or "", value)


def check_jsonschema(path: Path) -> subprocess.CompletedProcess:
    tool = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which(
        "check-jsonschema"
    )
    if tool is None:
        pytest.fail("check-jsonschema is not installed (it is in the dev extra)")
    return subprocess.run(
        [tool, "--builtin-schema", "vendor.compose-spec", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_file_matches_the_compose_specification():
    result = check_jsonschema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_misspelled_key(tmp_path):
    broken = tmp_path / "compose.yaml"
    broken.write_text(COMPOSE.read_text().replace("depends_on:", "depend_on:", 1))
    result = check_jsonschema(broken)
    assert result.returncode != 0
    assert "depend_on" in result.stdout


def test_compose_runs_postgres_minio_its_bucket_job_tgi_and_every_service(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "minio-init", *SERVICES, "tgi"}
    bucket_job = " ".join(services["minio-init"]["command"])
    assert "mc mb --ignore-existing store/storyreel" in bucket_job
    assert services["minio-init"]["depends_on"]["minio"]["condition"] == "service_healthy"
    for name in ("diffusion", "composer", "gateway"):
        assert services[name]["environment"]["STORYREEL_STORAGE_URL"] == "s3://storyreel"
        condition = services[name]["depends_on"]["minio-init"]["condition"]
        assert condition == "service_completed_successfully", name


def test_compose_serves_zephyr_from_tgi_to_the_llm_service(compose):
    tgi = compose["services"]["tgi"]
    command = tgi["command"]
    assert command[command.index("--model-id") + 1] == "HuggingFaceH4/zephyr-7b-beta"
    port = command[command.index("--port") + 1]
    llm = compose["services"]["llm"]["environment"]
    assert llm["STORYREEL_LLM_BACKEND"] == "tgi"
    assert llm["STORYREEL_LLM_TGI_URL"] == f"http://tgi:{port}"


@pytest.mark.parametrize("name", ["tgi", "diffusion"])
def test_gpu_services_reserve_an_nvidia_gpu(compose, name):
    devices = compose["services"][name]["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_compose_builds_each_service_from_its_dockerfile(compose, name):
    service = compose["services"][name]
    context = (COMPOSE.parent / service["build"]["context"]).resolve()
    assert context == REPO
    assert (context / service["build"]["dockerfile"]).is_file()
    # The same image names the Kubernetes manifests deploy.
    assert service["image"] == f"storyreel/{name}:0.1.0"
    base = (REPO / "deploy" / "k8s" / "base" / f"{name}.yaml").read_text()
    assert f"image: storyreel/{name}:0.1.0" in base


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_storyreel_containers_are_read_only_and_unprivileged(compose, name):
    service = compose["services"][name]
    assert service["read_only"] is True
    assert service["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in service["security_opt"]


def test_gateway_reaches_each_upstream_on_its_port(compose):
    env = compose["services"]["gateway"]["environment"]
    for setting, name in (("STORY", "llm"), ("RENDER", "diffusion"), ("COMPOSE", "composer")):
        assert env[f"STORYREEL_GATEWAY_{setting}_ADDRESS"] == f"dns:///{name}:{SERVICES[name]}"


def test_only_the_gateway_is_published_beyond_the_host(compose):
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert published["gateway"] == ["${STORYREEL_GATEWAY_BIND:-127.0.0.1}:50050:50050"]
    for port in published.pop("minio"):
        assert port.startswith("127.0.0.1:"), f"MinIO port {port} is reachable from other hosts"
    published.pop("gateway")
    assert not any(published.values()), published


def test_make_up_and_down_start_and_stop_the_compose_stack():
    make = shutil.which("make")
    assert make, "make is not installed"
    for target, verb in (("up", r"up -d --build"), ("down", r"down\b")):
        result = subprocess.run(
            [make, "-n", target], cwd=REPO, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stderr
        assert re.search(rf"docker compose -f deploy/compose.yaml {verb}", result.stdout), (
            result.stdout
        )


def test_compose_runs_postgres_16_on_a_volume_with_a_pg_isready_healthcheck(compose):
    postgres = compose["services"]["postgres"]
    assert postgres["image"] == "postgres:16"
    # Its data outlives the container: a named volume on the data directory.
    data_dir = postgres["environment"].get("PGDATA", "/var/lib/postgresql/data")
    volumes = [v.split(":") for v in postgres.get("volumes", [])]
    (source,) = [v[0] for v in volumes if (data_dir + "/").startswith(v[1] + "/")]
    assert source in compose["volumes"], f"{data_dir} is on {source}, not a named volume"
    # The gateway waits for a healthy PostgreSQL, which pg_isready says.
    test = postgres["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))
    # The password comes from the environment, with a development default like MinIO's.
    password = postgres["environment"]["POSTGRES_PASSWORD"]
    assert re.fullmatch(r"\$\{POSTGRES_PASSWORD:-[^}]+\}", password), password
    # Only containers on the Compose network reach it; it runs unprivileged.
    assert not postgres.get("ports"), "PostgreSQL is published on the host"
    assert postgres["user"].split(":")[0] not in ("0", "root")
    assert postgres["read_only"] is True
    assert postgres["cap_drop"] == ["ALL"]


def test_gateway_keeps_its_jobs_in_postgres_once_it_is_healthy(compose):
    gateway = compose["services"]["gateway"]
    postgres = compose["services"]["postgres"]
    raw = gateway["environment"].get(DATABASE_URL)
    assert raw, f"the gateway has no {DATABASE_URL}: it would keep jobs in a SQLite file"
    url = urlsplit(interpolate(raw))
    assert url.scheme == "postgresql+asyncpg", url.scheme
    assert url.hostname == "postgres"
    assert url.port == 5432
    env = {name: interpolate(value) for name, value in postgres["environment"].items()}
    assert url.username == env["POSTGRES_USER"]
    assert url.path == "/" + env["POSTGRES_DB"]
    assert unquote(url.password or "") == env["POSTGRES_PASSWORD"]
    # ... and the same variable sets both, so overriding it keeps them in step.
    assert "${POSTGRES_PASSWORD:-" in raw
    assert gateway["depends_on"]["postgres"]["condition"] == "service_healthy"
