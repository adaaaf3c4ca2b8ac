"""Both object-store backends: content addressing, atomic writes, verification on read.

The s3 backend talks over real HTTP to moto's S3 server bound to 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import io
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import urllib3

from appliance.config import load_settings
from appliance.errors import CorruptObject, NotFound, StoreUnavailable
from appliance.store.objects import (
    CHUNK,
    LocalObjectStore,
    S3ObjectStore,
    object_key,
    open_object_store,
)

from .conftest import free_port


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop()


def _s3(endpoint: str, tmp_path: Path, bucket: str = "artifacts") -> S3ObjectStore:
    return S3ObjectStore(
        endpoint=endpoint,
        bucket=bucket,
        access_key="test",
        secret_key="testtest",
        secure=False,
        cache_dir=tmp_path / "cache",
    )


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    if request.param == "local":
        return LocalObjectStore(tmp_path / "objects")
    return _s3(request.getfixturevalue("s3_endpoint"), tmp_path)


def _corrupt(store: object, sha: str) -> None:
    if isinstance(store, LocalObjectStore):
        (store.root / object_key(sha)).write_bytes(b"tampered")
    else:
        import io

        assert isinstance(store, S3ObjectStore)
        store.client.put_object(store.bucket, object_key(sha), io.BytesIO(b"tampered"), 8)
        for cached in store.cache_dir.rglob("*"):
            if cached.is_file():
                cached.unlink()


def test_put_get_roundtrip_is_content_addressed(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "payload.bin"
    payload = b"appliance" * 10_000
    src.write_bytes(payload)
    stored = store.put_file(src)
    assert stored.sha256 == hashlib.sha256(payload).hexdigest()
    assert stored.size == len(payload)
    assert store.exists(stored.sha256)
    assert store.get_file(stored.sha256).read_bytes() == payload
    assert store.put_file(src) == stored  # idempotent: same bytes, same object


def test_corrupted_object_is_refused_by_name(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "payload.bin"
    src.write_bytes(b"precious bytes")
    sha = store.put_file(src).sha256
    _corrupt(store, sha)
    with pytest.raises(CorruptObject, match=sha):
        store.get_file(sha)


def test_missing_object_is_not_found(store) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(NotFound):
        store.get_file("0" * 64)
    assert not store.exists("0" * 64)


def test_a_box_carries_named_files_taken_once(store, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """What a k3s pod posts (its closed log files) and the agent takes, by name."""
    first, second = tmp_path / "a.frames", tmp_path / "b.jsonl"
    first.write_bytes(b"one")
    second.write_bytes(b"two")
    assert store.inbox("spool/dep") == []
    store.post("spool/dep", "b.jsonl", second)
    store.post("spool/dep", "a.frames", first)
    store.post("spool/other", "a.frames", second)  # boxes do not mix
    assert store.inbox("spool/dep") == ["a.frames", "b.jsonl"]
    target = tmp_path / "out"
    target.mkdir()
    assert store.fetch("spool/dep", "a.frames", target / "a.frames")
    assert (target / "a.frames").read_bytes() == b"one"
    store.discard("spool/dep", "a.frames")
    store.discard("spool/dep", "a.frames")  # gone already: nothing to do
    assert store.inbox("spool/dep") == ["b.jsonl"]
    assert not store.fetch("spool/dep", "a.frames", target / "again")
    assert not (target / "again").exists()
    assert [p.name for p in target.iterdir()] == ["a.frames"]  # no temporary file left
    second.write_bytes(b"replaced")
    store.post("spool/dep", "b.jsonl", second)
    assert store.fetch("spool/dep", "b.jsonl", target / "b.jsonl")
    assert (target / "b.jsonl").read_bytes() == b"replaced"
    for box, name in (
        ("../x", "a"),
        ("spool/dep", "../../a"),
        ("spool/dep", "a/b"),
        ("", "a"),
        ("spool/dep", "a\n"),
    ):
        with pytest.raises(ValueError, match="not a box or file name"):
            store.post(box, name, first)
    # what else lands under a box (written by hand, a folder) is passed over, never taken
    long = "a" * 230  # no room left for a temporary name beside it
    if isinstance(store, LocalObjectStore):
        (store.root / "boxes/spool/dep/bad name").write_bytes(b"x")
        (store.root / "boxes/spool/dep" / long).write_bytes(b"x")
        (store.root / "boxes/spool/dep/folder").mkdir()
    else:
        for key in ("boxes/spool/dep/bad name", f"boxes/spool/dep/{long}", "boxes/spool/dep/f/x"):
            store.client.put_object(store.bucket, key, io.BytesIO(b"x"), 1)
    assert store.inbox("spool/dep") == ["b.jsonl"]


def test_local_store_leaves_no_temp_files(tmp_path: Path) -> None:
    store = LocalObjectStore(tmp_path / "objects")
    src = tmp_path / "x"
    src.write_bytes(b"x")
    store.put_file(src)
    assert list((tmp_path / "objects" / "tmp").iterdir()) == []


def test_s3_leaves_no_temp_objects(s3_endpoint: str, tmp_path: Path) -> None:
    store = _s3(s3_endpoint, tmp_path, bucket="tidy")
    src = tmp_path / "x"
    src.write_bytes(b"hello")
    store.put_file(src)
    keys = [o.object_name for o in store.client.list_objects("tidy", recursive=True)]
    assert keys == [object_key(hashlib.sha256(b"hello").hexdigest())]


def test_s3_a_download_cut_short_leaves_nothing_behind(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A transfer that breaks half-way (the store restarted, the link dropped) is an error,
    and leaves no partial file in the cache or the spool to be mistaken or kept for ever; so
    is one that ends early without a word (as urllib3 before 2.0 let a short body end)."""
    store = _s3(s3_endpoint, tmp_path, bucket="cut")
    src = tmp_path / "big.frames"
    src.write_bytes(os.urandom(3 * CHUNK))  # three chunks of the download
    stored = store.put_file(src)
    store.post("spool/dep", "big.frames", src)
    spool = tmp_path / "spool"
    spool.mkdir()
    real = urllib3.response.HTTPResponse.stream

    def cut(self: Any, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        yield next(real(self, *args, **kwargs))
        raise urllib3.exceptions.ProtocolError("Connection broken: IncompleteRead")

    def short(self: Any, *args: Any, **kwargs: Any) -> Iterator[bytes]:
        chunks = real(self, *args, **kwargs)
        yield next(chunks)
        chunks.close()

    for broken, said in ((cut, "IncompleteRead"), (short, f"after {CHUNK} of {3 * CHUNK} bytes")):
        monkeypatch.setattr(urllib3.response.HTTPResponse, "stream", broken)
        with pytest.raises(StoreUnavailable, match=said):
            store.get_file(stored.sha256)
        with pytest.raises(StoreUnavailable, match=said):
            store.fetch("spool/dep", "big.frames", spool / "big.frames")
        assert [p for p in store.cache_dir.rglob("*") if p.is_file()] == []
        assert list(spool.iterdir()) == []
    monkeypatch.setattr(urllib3.response.HTTPResponse, "stream", real)
    assert store.get_file(stored.sha256).read_bytes() == src.read_bytes()  # whole, once back
    assert store.fetch("spool/dep", "big.frames", spool / "big.frames")
    assert (spool / "big.frames").read_bytes() == src.read_bytes()


def test_s3_selected_by_environment_creates_bucket(
    s3_endpoint: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPLIANCE_STORE", "s3")
    monkeypatch.setenv("APPLIANCE_S3_ENDPOINT", s3_endpoint)
    monkeypatch.setenv("APPLIANCE_S3_BUCKET", "from-env")
    monkeypatch.setenv("APPLIANCE_S3_ACCESS_KEY", "test")
    monkeypatch.setenv("APPLIANCE_S3_SECRET_KEY", "testtest")
    monkeypatch.setenv("APPLIANCE_S3_SECURE", "false")
    store = open_object_store(load_settings(tmp_path))
    assert isinstance(store, S3ObjectStore)
    assert store.client.bucket_exists("from-env")
