"""The real stack for fault tests: every service its own process, storage on a real S3 server,
job state on a real PostgreSQL server (pgserver).

The LLM service runs its TGI backend against a TGI test double (TGI needs a GPU),
so storyboards are instant; render, compose and the gateway are the real services,
with the tiny offline diffusion model and small images and videos.
"""

from __future__ import annotations

import time

import pytest
from model_server_doubles import TGITestDouble
from support import MODELS, S3_ACCESS_KEY, S3_SECRET_KEY, new_postgres_database

from storyreel.settings import StorageSettings
from storyreel.stack import LocalStack
from storyreel.storage import open_store


@pytest.fixture(scope="module")
def tgi():
    """A TGI double that answers every request validly, at once."""
    double = TGITestDouble(schema_answers=True).start()
    yield double
    double.stop()


@pytest.fixture(scope="module")
def start_stack(tmp_path_factory, s3_server, tgi, postgres_server):
    """``start_stack(name, env)``: a started stack in a new bucket; ``env`` adds settings."""
    started: list[LocalStack] = []

    def start(name: str, env: dict[str, str]) -> LocalStack:
        storage = StorageSettings(
            url=f"s3://{name}-{int(time.time())}/storyreel",
            s3_endpoint=s3_server,
            s3_access_key=S3_ACCESS_KEY,
            s3_secret_key=S3_SECRET_KEY,
        )
        open_store(storage).ensure_bucket()
        database_url = new_postgres_database(postgres_server)
        local = LocalStack(
            tmp_path_factory.mktemp(name),
            fixed_ports=False,
            env={
                "STORYREEL_STORAGE_URL": storage.url,
                # Job state on PostgreSQL, as replicas in production share it.
                "STORYREEL_GATEWAY_DATABASE_URL": database_url,
                "STORYREEL_STORAGE_S3_ENDPOINT": s3_server,
                "STORYREEL_STORAGE_S3_ACCESS_KEY": S3_ACCESS_KEY,
                "STORYREEL_STORAGE_S3_SECRET_KEY": S3_SECRET_KEY,
                "STORYREEL_LLM_BACKEND": "tgi",
                "STORYREEL_LLM_TGI_URL": tgi.url,
                "STORYREEL_DIFFUSION_MODEL": str(MODELS / "tiny-sd"),
                "STORYREEL_GATEWAY_RENDER_WIDTH": "64",
                "STORYREEL_GATEWAY_RENDER_HEIGHT": "64",
                "STORYREEL_GATEWAY_RENDER_STEPS": "2",
                "STORYREEL_GATEWAY_VIDEO_WIDTH": "128",
                "STORYREEL_GATEWAY_VIDEO_HEIGHT": "96",
                "STORYREEL_GATEWAY_VIDEO_FPS": "8",
                "STORYREEL_GATEWAY_RETRY_INITIAL_S": "0.5",
                "STORYREEL_GATEWAY_RETRY_MAX_BACKOFF_S": "2",
                **env,
            },
        )
        started.append(local)
        local.start(timeout_s=300)
        local.store = open_store(storage)
        local.database_url = database_url
        return local

    yield start
    for local in started:
        local.stop()
