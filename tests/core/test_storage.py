"""ArtifactStore contract, run against the file backend and a real S3 server."""

from __future__ import annotations

import urllib.request
from pathlib import Path

import pytest
from pydantic import SecretStr

from storyreel.errors import InvalidInput, NotFound, UpstreamFailed
from storyreel.settings import StorageSettings
from storyreel.storage import FileStore, S3Store, open_store


@pytest.fixture(params=["file", "s3"])
def store(request, storage_settings):
    if request.param == "file":
        return open_store(storage_settings)
    return open_store(request.getfixturevalue("s3_settings"))


def test_put_then_get_returns_the_same_bytes(store):
    uri = store.put_bytes("jobs/a1/images/scene-001.png", b"\x89PNG-data")
    assert uri == store.uri_for("jobs/a1/images/scene-001.png")
    assert store.get_bytes(uri) == b"\x89PNG-data"
    assert store.exists(uri)


def test_put_file_and_download_round_trip(store, tmp_path: Path):
    source = tmp_path / "big.bin"
    payload = bytes(range(256)) * 40_000  # 10 MB: multipart on S3
    source.write_bytes(payload)
    uri = store.put_file("jobs/a1/video/video.mp4", source)
    target = store.download(uri, tmp_path / "copy.bin")
    assert target.read_bytes() == payload


def test_list_returns_only_the_prefix(store):
    store.put_bytes("jobs/x/manifest.json", b"{}")
    store.put_bytes("jobs/x/images/scene-001.png", b"1")
    store.put_bytes("jobs/y/manifest.json", b"{}")
    listed = sorted(store.list("jobs/x/"))
    assert listed == sorted(
        [store.uri_for("jobs/x/manifest.json"), store.uri_for("jobs/x/images/scene-001.png")]
    )


def test_list_of_a_folder_is_in_key_order_and_pages_with_start_after(store):
    keys = ["index/t/002-b", "index/t/001-a", "index/t/003-c", "index/t-x/000", "index/u/000"]
    for key in keys:
        store.put_bytes(key, b"")
    listed = list(store.list("index/t/"))
    assert listed == [store.uri_for(k) for k in ("index/t/001-a", "index/t/002-b", "index/t/003-c")]
    assert len(list(store.list("index/"))) == len(keys)
    after = list(store.list("index/t/", start_after="index/t/001-a"))
    assert after == [store.uri_for("index/t/002-b"), store.uri_for("index/t/003-c")]
    assert list(store.list("index/t/", start_after="index/t/003-c")) == []
    assert list(store.list("nothing/here/")) == []


def test_missing_artifact_is_not_found(store):
    with pytest.raises(NotFound):
        store.get_bytes(store.uri_for("jobs/none/nothing.png"))
    assert not store.exists(store.uri_for("jobs/none/nothing.png"))


def test_delete_removes_and_tolerates_missing(store):
    uri = store.put_bytes("jobs/d/file.txt", b"x")
    store.delete(uri)
    assert not store.exists(uri)
    store.delete(uri)


@pytest.mark.parametrize("key", ["../etc/passwd", "/abs/path", "jobs/../../x", "jobs//x", ""])
def test_unsafe_keys_are_rejected_and_nothing_written(store, key):
    with pytest.raises(InvalidInput):
        store.put_bytes(key, b"x")
    assert list(store.list()) == []


def test_uris_outside_the_store_are_rejected(store):
    for uri in ["file:///etc/passwd", "s3://other-bucket/jobs/x.png", "http://example/x"]:
        with pytest.raises(InvalidInput, match="not in the artifact store"):
            store.get_bytes(uri)


def test_public_url_serves_the_object(store):
    uri = store.put_bytes("jobs/p/video/video.mp4", b"movie")
    url = store.public_url(uri)
    if isinstance(store, S3Store):
        assert url.startswith("http://") and "X-Amz-Signature" in url
        with urllib.request.urlopen(url, timeout=10) as response:
            assert response.read() == b"movie"
    else:
        assert isinstance(store, FileStore)
        assert Path(url).read_bytes() == b"movie"


def test_file_store_write_is_atomic_on_failure(file_store, tmp_path: Path):
    missing = tmp_path / "does-not-exist.bin"
    with pytest.raises(FileNotFoundError):
        file_store.put_file("jobs/a/video/video.mp4", missing)
    assert list(file_store.list()) == []
    assert not any(p.name.endswith(".part") for p in file_store.root.rglob("*"))


def test_s3_wrong_secret_is_rejected(s3_settings: StorageSettings):
    bad = s3_settings.model_copy(update={"s3_secret_key": SecretStr("wrong-secret")})
    store = open_store(bad)
    with pytest.raises(UpstreamFailed, match=r"SignatureDoesNotMatch|AccessDenied"):
        store.put_bytes("jobs/a/x.txt", b"x")
    good = open_store(s3_settings)
    assert list(good.list()) == []


def test_s3_unreachable_endpoint_names_the_problem():
    settings = StorageSettings(
        url="s3://bucket", s3_endpoint="127.0.0.1:1", s3_access_key="k", s3_secret_key="s"
    )
    with pytest.raises(UpstreamFailed, match="unreachable"):
        open_store(settings).check_ready()


@pytest.mark.parametrize("url", ["ftp://x/y", "s3://", "file://host/dir"])
def test_unsupported_storage_urls_are_refused(url):
    with pytest.raises(InvalidInput):
        open_store(StorageSettings(url=url))


def test_presigned_urls_name_the_public_endpoint(s3_settings: StorageSettings):
    public = s3_settings.model_copy(update={"s3_public_endpoint": "localhost:8333"})
    store = open_store(public)
    uri = store.put_bytes("jobs/p/video/video.mp4", b"movie")
    url = store.public_url(uri)
    assert url.startswith("http://localhost:8333/")
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.read() == b"movie"


@pytest.mark.parametrize(
    "key",
    [
        "jobs/x/video.mp4\n",
        "jobs/x\n/video.mp4",
        "jobs/" + "n" * 5000,
        "jobs/x/" + "a/" * 600 + "b",
    ],
    ids=["trailing newline", "newline inside", "5000-character name", "longer than 1024"],
)
def test_keys_no_file_system_or_store_would_take_are_invalid_input(store, key):
    with pytest.raises(InvalidInput, match="invalid object key") as caught:
        store.put_bytes(key, b"x")
    assert len(caught.value.message) < 300
    # The same key reached through a URI (a caller's audio_uri, say) is refused the same way.
    with pytest.raises(InvalidInput) as caught:
        store.exists(store.root_uri + key)
    assert len(caught.value.message) < 300
    assert list(store.list()) == []


def test_a_uri_of_a_mebibyte_is_refused_unread_with_a_short_message(store):
    for uri in (store.root_uri + "jobs/x/" + "a" * (1024 * 1024), "z" * (1024 * 1024)):
        with pytest.raises(InvalidInput) as caught:
            store.exists(uri)
        assert len(caught.value.message) < 300
