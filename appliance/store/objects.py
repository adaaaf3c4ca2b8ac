"""Content-addressed object store: `local` (a directory under the home) or `s3` (MinIO/any S3).

Objects are named by the sha256 of their bytes, written under a temporary name and committed
with a rename (local) or a server-side copy (s3), and verified every time they are read.

Beside them, named boxes (`boxes/<box>/<name>`) carry what a process that never opens the
registry hands to one that does: a k3s serving pod posts its closed prediction-log files,
which the agent takes and ships, and reads its logging settings. A box's files are not
artifacts: they are taken once and removed.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from appliance.config import Settings
from appliance.errors import ApplianceError, CorruptObject, NotFound, StoreUnavailable

CHUNK = 1 << 20
_BOX = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]*(/[A-Za-z0-9_][A-Za-z0-9._-]*)*")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,199}")  # room for a temporary name


def box_key(box: str, name: str | None = None) -> str:
    """`boxes/<box>/<name>` (or the box's prefix), refusing any path that could leave it."""
    if not _BOX.fullmatch(box) or (name is not None and not _NAME.fullmatch(name)):
        raise ValueError(f"not a box or file name: {box!r}, {name!r}")
    return f"boxes/{box}/" + (name or "")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def object_key(sha256: str) -> str:
    """Where an object lives inside a store: sha256/ab/abcdef..."""
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise NotFound(f"not a sha256 digest: {sha256!r}")
    return f"sha256/{sha256[:2]}/{sha256}"


@dataclass(frozen=True)
class StoredObject:
    sha256: str
    size: int
    uri: str


class ObjectStore(Protocol):
    """What the core needs from an object store; both backends implement it."""

    def put_file(self, path: Path, move: bool = False) -> StoredObject:
        """Store a file's bytes; with `move`, the file may be consumed instead of copied."""
        ...

    def get_file(self, sha256: str) -> Path:
        """A local path to the verified bytes of the object."""
        ...

    def exists(self, sha256: str) -> bool: ...

    def describe(self) -> str: ...

    def post(self, box: str, name: str, path: Path) -> None:
        """Put a file in a box, replacing one of the same name."""
        ...

    def inbox(self, box: str) -> list[str]:
        """The names of the files in a box, sorted; anything else there (a name no box
        takes, a folder) is passed over."""
        ...

    def fetch(self, box: str, name: str, dest: Path) -> bool:
        """Copy a box's file to `dest` (written whole or not at all); False if it is not
        there."""
        ...

    def discard(self, box: str, name: str) -> None:
        """Remove a box's file (none: nothing to do)."""
        ...


def _copy_whole(source: Path, dest: Path) -> None:
    """Copy under a temporary name beside `dest`, then rename: `dest` is whole or absent."""
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
    try:
        with source.open("rb") as src, tmp.open("wb") as out:
            while chunk := src.read(CHUNK):
                out.write(chunk)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


class LocalObjectStore:
    """Objects as files under one directory; rename makes each write atomic."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, sha256: str) -> Path:
        return self.root / object_key(sha256)

    def put_file(self, path: Path, move: bool = False) -> StoredObject:
        try:
            return self._put_file(path, move)
        except OSError as exc:  # disk full, quota, file too large: nothing half-written stays
            raise StoreUnavailable(
                f"object store {self.root}: could not store {path.name} "
                f"({exc.strerror or exc}); nothing was stored"
            ) from exc

    def _put_file(self, path: Path, move: bool) -> StoredObject:
        if move and path.stat().st_dev == self.root.stat().st_dev:
            # The caller's temp file becomes the object: hash it, then one rename, no copy.
            sha = sha256_file(path)
            final = self._path(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            size = path.stat().st_size
            os.replace(path, final)
            return StoredObject(sha256=sha, size=size, uri=f"local://{object_key(sha)}")
        tmp_dir = self.root / "tmp"
        tmp_dir.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=tmp_dir, prefix="put-")
        tmp = Path(tmp_name)
        digest = hashlib.sha256()
        size = 0
        try:
            with os.fdopen(fd, "wb") as out, path.open("rb") as src:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    size += len(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            sha = digest.hexdigest()
            final = self._path(sha)
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return StoredObject(sha256=sha, size=size, uri=f"local://{object_key(sha)}")

    def get_file(self, sha256: str) -> Path:
        path = self._path(sha256)
        if not path.exists():
            raise NotFound(f"object {object_key(sha256)} is missing from {self.root}")
        actual = sha256_file(path)
        if actual != sha256:
            raise CorruptObject(
                f"object {object_key(sha256)} is corrupted: its bytes hash to {actual[:12]}…"
            )
        return path

    def exists(self, sha256: str) -> bool:
        return self._path(sha256).exists()

    def describe(self) -> str:
        return f"local {self.root}"

    def post(self, box: str, name: str, path: Path) -> None:
        final = self.root / box_key(box, name)
        final.parent.mkdir(parents=True, exist_ok=True)
        try:
            _copy_whole(path, final)
        except OSError as exc:
            raise StoreUnavailable(
                f"object store {self.root}: could not post {name}: {exc}"
            ) from exc

    def inbox(self, box: str) -> list[str]:
        directory = self.root / box_key(box)
        if not directory.is_dir():
            return []
        return sorted(
            p.name
            for p in directory.iterdir()
            if _NAME.fullmatch(p.name) and p.is_file()  # temporary names start with "."
        )

    def fetch(self, box: str, name: str, dest: Path) -> bool:
        try:
            _copy_whole(self.root / box_key(box, name), dest)
        except FileNotFoundError:
            return False
        return True

    def discard(self, box: str, name: str) -> None:
        (self.root / box_key(box, name)).unlink(missing_ok=True)


_MISSING = ("NoSuchKey", "NoSuchObject", "NotFound")
_COPY_LIMIT = 5 * 2**30  # S3 CopyObject's limit; larger objects are copied part by part


class S3ObjectStore:
    """Objects in an S3 bucket through the minio SDK; reads are cached locally and verified."""

    def __init__(
        self,
        endpoint: str,
        bucket: str,
        access_key: str,
        secret_key: str,
        secure: bool,
        cache_dir: Path,
        region: str = "us-east-1",
    ) -> None:
        import urllib3
        from minio import Minio

        self.bucket = bucket
        self.endpoint = endpoint
        self.cache_dir = cache_dir
        # Few, quick retries: an unreachable endpoint should fail in seconds with its name.
        http = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=5, read=120),
            retries=urllib3.Retry(total=2, backoff_factor=0.2, status_forcelist=(502, 503, 504)),
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        with self._talking():
            if not self.client.bucket_exists(bucket):
                self.client.make_bucket(bucket)

    @contextmanager
    def _talking(self) -> Iterator[None]:
        """Turn transport and server failures into one error that names the endpoint."""
        import urllib3
        from minio.error import MinioException

        try:
            yield
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            if isinstance(exc, ApplianceError):
                raise
            reason = getattr(exc, "code", None) or type(exc).__name__
            raise StoreUnavailable(
                f"object store s3://{self.endpoint}/{self.bucket}: {reason}: {exc}"[:300]
            ) from exc

    def exists(self, sha256: str) -> bool:
        from minio.error import S3Error

        with self._talking():
            try:
                self.client.stat_object(self.bucket, object_key(sha256))
            except S3Error as exc:
                if exc.code in _MISSING:
                    return False
                raise
        return True

    def put_file(self, path: Path, move: bool = False) -> StoredObject:
        from minio.commonconfig import ComposeSource, CopySource

        sha = sha256_file(path)
        size = path.stat().st_size
        key = object_key(sha)
        with self._talking():
            if not self.exists(sha):
                tmp_key = f"tmp/{uuid.uuid4().hex}"
                self.client.fput_object(self.bucket, tmp_key, str(path))
                try:
                    if size <= _COPY_LIMIT:
                        self.client.copy_object(self.bucket, key, CopySource(self.bucket, tmp_key))
                    else:
                        self.client.compose_object(
                            self.bucket, key, [ComposeSource(self.bucket, tmp_key)]
                        )
                finally:
                    self.client.remove_object(self.bucket, tmp_key)
        return StoredObject(sha256=sha, size=size, uri=f"s3://{self.bucket}/{key}")

    def get_file(self, sha256: str) -> Path:
        from minio.error import S3Error

        key = object_key(sha256)
        cached = self.cache_dir / key
        if cached.exists() and sha256_file(cached) == sha256:
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=cached.parent, prefix="get-")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            with self._talking():
                try:
                    self._download(key, tmp)
                except S3Error as exc:
                    if exc.code in _MISSING:
                        raise NotFound(f"object {key} is missing from s3://{self.bucket}") from exc
                    raise
            actual = sha256_file(tmp)
            if actual != sha256:
                raise CorruptObject(
                    f"object s3://{self.bucket}/{key} is corrupted: "
                    f"its bytes hash to {actual[:12]}…"
                )
            os.replace(tmp, cached)
        finally:
            tmp.unlink(missing_ok=True)
        return cached

    def _download(self, key: str, tmp: Path) -> None:
        """The object's bytes into `tmp`, which the caller removes on failure. Not
        `fget_object`: it downloads beside `tmp` into a name of its own, which a broken
        transfer leaves behind (in the spool, or the cache), and asks for the object twice.
        A body shorter than its Content-Length is an error here, whatever the HTTP library
        does: a box's file has no checksum to catch it, and is discarded once taken."""
        import urllib3

        response = self.client.get_object(self.bucket, key)
        try:
            written = 0
            with tmp.open("wb") as out:
                for chunk in response.stream(CHUNK):
                    written += out.write(chunk)
            length = response.headers.get("content-length")
            encoded = response.headers.get("content-encoding", "identity") != "identity"
            if length is not None and not encoded and written != int(length):
                raise urllib3.exceptions.ProtocolError(
                    f"{key}: the transfer ended after {written} of {length} bytes"
                )
        finally:
            response.close()
            response.release_conn()

    def describe(self) -> str:
        return f"s3 {self.endpoint}/{self.bucket}"

    def post(self, box: str, name: str, path: Path) -> None:
        with self._talking():  # one PUT: the object appears whole or not at all
            self.client.fput_object(self.bucket, box_key(box, name), str(path))

    def inbox(self, box: str) -> list[str]:
        prefix = box_key(box)
        with self._talking():
            names = [
                o.object_name[len(prefix) :]
                for o in self.client.list_objects(self.bucket, prefix=prefix)
                if o.object_name and not o.is_dir
            ]
        return sorted(n for n in names if _NAME.fullmatch(n))

    def fetch(self, box: str, name: str, dest: Path) -> bool:
        from minio.error import S3Error

        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}")
        try:
            with self._talking():
                try:
                    self._download(box_key(box, name), tmp)
                except S3Error as exc:
                    if exc.code in _MISSING:
                        return False
                    raise
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return True

    def discard(self, box: str, name: str) -> None:
        with self._talking():
            self.client.remove_object(self.bucket, box_key(box, name))


def open_object_store(settings: Settings) -> ObjectStore:
    """The object store the settings select."""
    if settings.store == "s3":
        s3 = settings.s3
        return S3ObjectStore(
            endpoint=s3.endpoint,
            bucket=s3.bucket,
            access_key=s3.access_key,
            secret_key=s3.secret_key,
            secure=s3.secure,
            region=s3.region,
            cache_dir=settings.cache_dir / "objects",
        )
    return LocalObjectStore(settings.objects_dir)
