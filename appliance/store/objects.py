"""Content-addressed object store: `local` (a directory under the home) or `s3` (MinIO/any S3).

Objects are named by the sha256 of their bytes, written under a temporary name and committed
with a rename (local) or a server-side copy (s3), and verified every time they are read.
"""

from __future__ import annotations

import hashlib
import os
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
                    self.client.fget_object(self.bucket, key, str(tmp))
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

    def describe(self) -> str:
        return f"s3 {self.endpoint}/{self.bucket}"


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
