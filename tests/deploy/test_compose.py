"""deploy/compose.yaml: valid against the Compose Specification, and the stack it describes.

The schema is the compose-spec JSON schema that check-jsonschema ships
(``--builtin-schema vendor.compose-spec``); no Docker engine is needed.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import yaml
from support import REPO

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
    for name in ("llm", "diffusion", "composer"):
        assert env[f"STORYREEL_GATEWAY_{name.upper()}_ADDRESS"] == f"dns:///{name}:{SERVICES[name]}"


def test_only_the_gateway_is_published_beyond_the_host(compose):
    published = {name: service.get("ports", []) for name, service in compose["services"].items()}
    assert published["gateway"] == [
        "${STORYREEL_GATEWAY_BIND:-127.0.0.1}:50050:50050",
        "${STORYREEL_GATEWAY_BIND:-127.0.0.1}:50054:50054",  # the studio page and gRPC-Web
    ]
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


# --- authentication: API keys and the internal token ------------------------------------------

#: The storyreel services that share the internal token (the gateway presents it).
TOKEN_FILE = "STORYREEL_INTERNAL_TOKEN_FILE"
KEYS_FILE = "STORYREEL_GATEWAY_API_KEYS_FILE"


def secret_behind(compose: dict, service: str, variable: str) -> Path:
    """The host file of the Compose secret that ``variable`` of ``service`` names."""
    env = compose["services"][service]["environment"]
    path = env.get(variable)
    assert path, f"{service} has no {variable}"
    match = re.fullmatch(r"/run/secrets/([\w.-]+)", path)
    assert match, f"{service}: {variable}={path} is not a Compose secret"
    name = match.group(1)
    granted = [
        s if isinstance(s, str) else s["source"]
        for s in compose["services"][service].get("secrets", [])
    ]
    assert name in granted, f"{service} is not given the secret {name}"
    return (COMPOSE.parent / compose["secrets"][name]["file"]).resolve()


def git_ignores(path: Path) -> bool:
    result = subprocess.run(
        ["git", "check-ignore", "-q", str(path)], cwd=REPO, capture_output=True, check=False
    )
    return result.returncode == 0


def test_gateway_reads_its_api_keys_from_a_secret_file_that_git_ignores(compose):
    # The gateway listens on 0.0.0.0 in its container: it starts only with a key.
    env = compose["services"]["gateway"]["environment"]
    assert "STORYREEL_GATEWAY_API_KEYS" not in env, "keys are written into compose.yaml"
    assert env.get("STORYREEL_GATEWAY_HOST", "0.0.0.0") == "0.0.0.0"
    keys = secret_behind(compose, "gateway", KEYS_FILE)
    assert keys == REPO / "deploy" / "secrets" / "api-keys.json"
    assert git_ignores(keys), f"{keys} could be committed"


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_every_service_reads_the_internal_token_from_one_secret_file(compose, name):
    assert "STORYREEL_INTERNAL_TOKEN" not in compose["services"][name]["environment"]
    token = secret_behind(compose, name, TOKEN_FILE)
    assert token == REPO / "deploy" / "secrets" / "internal-token"
    assert git_ignores(token)


def test_make_up_wants_an_api_key_and_makes_the_internal_token(tmp_path):
    make = shutil.which("make")
    assert make, "make is not installed"
    secrets = tmp_path / "secrets"
    result = subprocess.run(
        [make, "-n", "up", f"SECRETS={secrets}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert f"deploy/keys.py internal-token --file {secrets}/internal-token" in result.stdout
    assert f"test -s {secrets}/api-keys.json" in result.stdout
    assert "make api-key TENANT=" in result.stdout
    # Without a keys file the stack does not start (the gateway would refuse to anyway).
    result = subprocess.run(
        [make, "up", f"SECRETS={secrets}", "COMPOSE=false"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode != 0
    assert "make api-key TENANT=" in result.stderr
    assert (secrets / "internal-token").stat().st_size >= 32


def run_keys(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "deploy" / "keys.py"), *args],
        capture_output=True,
        text=True,
        check=False,
    )


def test_make_api_key_prints_a_key_once_and_keeps_only_its_digest(tmp_path):
    keys_file = tmp_path / "secrets" / "api-keys.json"
    first = run_keys("api-key", "acme", "--file", str(keys_file))
    assert first.returncode == 0, first.stderr
    key = first.stdout.strip()
    assert len(key) >= 40
    assert key not in first.stderr
    second = run_keys("api-key", "acme", "--file", str(keys_file))
    other = run_keys("api-key", "globex", "--file", str(keys_file))
    assert second.returncode == other.returncode == 0
    stored = json.loads(keys_file.read_text())
    assert set(stored) == {"acme", "globex"}
    assert len(stored["acme"]) == 2
    assert key not in keys_file.read_text(), "the keys file holds a key"
    assert stored["acme"][0] == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    # Readable by the containers' user through Compose's bind mount; the folder is private.
    assert stat.S_IMODE(keys_file.stat().st_mode) == 0o644
    assert stat.S_IMODE(keys_file.parent.stat().st_mode) == 0o700
    # The gateway, listening beyond the loopback, accepts the file and the key.
    from storyreel_gateway.auth import ApiKeys
    from storyreel_gateway.settings import GatewaySettings

    settings = GatewaySettings(host="0.0.0.0", api_keys_file=keys_file)
    assert ApiKeys(settings.tenant_keys()).tenant_for(f"Bearer {key}") == "acme"


def test_make_api_key_refuses_a_bad_tenant_name(tmp_path):
    keys_file = tmp_path / "api-keys.json"
    for tenant in ("", "a b", "../x", "-x", "x" * 65):
        result = run_keys("api-key", tenant, "--file", str(keys_file))
        assert result.returncode != 0, tenant
        assert not result.stdout
    assert not keys_file.exists()


def test_internal_token_is_made_once(tmp_path):
    token_file = tmp_path / "secrets" / "internal-token"
    assert run_keys("internal-token", "--file", str(token_file)).returncode == 0
    token = token_file.read_text()
    assert re.fullmatch(r"[0-9a-f]{64}", token), "a token with a newline or too short"
    assert run_keys("internal-token", "--file", str(token_file)).returncode == 0
    assert token_file.read_text() == token, "a second run replaced the token"
    assert stat.S_IMODE(token_file.parent.stat().st_mode) == 0o700


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
