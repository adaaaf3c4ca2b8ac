"""Offline bundles: one tar file that carries everything a site without internet installs.

A bundle manifest (TOML) pins every artifact: its name, version, architecture (`amd64`,
`arm64`, or `any`), the URL it is fetched from, its sha256 and its path inside the bundle.
`build_bundle` fetches the artifacts for one architecture on a connected machine, checks each
against its pinned sha256 while it streams, and packs them with the manifest (temp file, then
rename: a failed build leaves nothing). `verify_bundle` checks a bundle before anything is
installed from it: the manifest, the architecture, every file's size and sha256, and that
the tar holds nothing else. Every error names the artifact or the file.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import tomllib
import urllib.request
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from appliance.errors import CorruptObject, InvalidInput

ARCHES = ("amd64", "arm64")
MANIFEST = "manifest.toml"
ARTIFACT_KEYS = {"name", "version", "arch", "url", "sha256", "path", "kind"}
KINDS = ("binary", "images", "script", "wheel", "image", "manifest", "other")
CHUNK = 1 << 20


def _entry(data: Any, index: int, source: str) -> dict[str, str]:
    where = f"{source}: artifact[{index}]"
    if not isinstance(data, dict):
        raise InvalidInput(f"{where}: expected a table")
    name = data.get("name")
    where = f"{source}: artifact {name!r}" if isinstance(name, str) else where
    missing = sorted(ARTIFACT_KEYS - {"kind"} - set(data))
    if missing:
        raise InvalidInput(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(data) - ARTIFACT_KEYS)
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s) {unknown}")
    entry = {k: data[k] for k in ARTIFACT_KEYS if k in data}
    if not all(isinstance(v, str) and v for v in entry.values()):
        raise InvalidInput(f"{where}: every value must be non-empty text")
    if entry["arch"] not in (*ARCHES, "any"):
        raise InvalidInput(f"{where}: arch {entry['arch']!r} is not amd64, arm64 or any")
    digest = entry["sha256"]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidInput(f"{where}: sha256 must be 64 lowercase hex digits")
    path = PurePosixPath(entry["path"])
    if path.is_absolute() or ".." in path.parts or str(path) == MANIFEST:
        raise InvalidInput(f"{where}: path {entry['path']!r} must stay inside the bundle")
    if not entry["url"].startswith(("https://", "http://", "file://")):
        raise InvalidInput(f"{where}: url must be https://, http:// or file://")
    entry.setdefault("kind", "other")
    if entry["kind"] not in KINDS:
        raise InvalidInput(f"{where}: kind {entry['kind']!r} is not one of {', '.join(KINDS)}")
    return entry


def parse_manifest(text: str, source: str = MANIFEST) -> dict[str, Any]:
    """A manifest checked entry by entry: `[bundle]` (name, version, arch?) and
    `[[artifact]]` tables. Two artifacts may not claim one path for the same arch."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise InvalidInput(f"{source}: not valid TOML: {exc}") from exc
    bundle = data.get("bundle")
    if not isinstance(bundle, dict) or not all(
        isinstance(bundle.get(k), str) and bundle.get(k) for k in ("name", "version")
    ):
        raise InvalidInput(f"{source}: [bundle] needs name and version")
    if bundle.get("arch") not in (None, *ARCHES):
        raise InvalidInput(f"{source}: [bundle] arch {bundle.get('arch')!r} is not amd64 or arm64")
    items = data.get("artifact")
    if not isinstance(items, list) or not items:
        raise InvalidInput(f"{source}: no [[artifact]] entries")
    artifacts = [_entry(item, i, source) for i, item in enumerate(items)]
    seen: set[tuple[str, str]] = set()
    for entry in artifacts:
        arches = ARCHES if entry["arch"] == "any" else (entry["arch"],)
        for arch in arches:
            key = (arch, entry["path"])
            if key in seen:
                raise InvalidInput(
                    f"{source}: artifact {entry['name']!r}: path {entry['path']!r} is "
                    f"already used for {arch}"
                )
            seen.add(key)
    return {"bundle": dict(bundle), "artifacts": artifacts}


def load_manifest(path: str | Path) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise InvalidInput(f"{path}: no such manifest")
    return parse_manifest(file.read_text(encoding="utf-8"), file.name)


def _render(manifest: dict[str, Any]) -> str:
    """The manifest as TOML (only strings, so no TOML writer is needed)."""

    def line(key: str, value: str) -> str:
        # a JSON string is a TOML basic string (the same escapes, \uXXXX for control codes)
        return f"{key} = {json.dumps(value, ensure_ascii=False)}"

    out = ["[bundle]", *(line(k, v) for k, v in sorted(manifest["bundle"].items()))]
    for entry in manifest["artifacts"]:
        out += ["", "[[artifact]]", *(line(k, entry[k]) for k in sorted(entry))]
    return "\n".join(out) + "\n"


def _fetch(url: str) -> BinaryIO:
    return urllib.request.urlopen(url, timeout=60)  # type: ignore[no-any-return]  # noqa: S310


def build_bundle(
    manifest: dict[str, Any],
    arch: str,
    out: str | Path,
    fetch: Callable[[str], BinaryIO] = _fetch,
    progress: Callable[[str, int, int], None] | None = None,
) -> dict[str, Any]:
    """Fetch the artifacts for `arch`, check each sha256 as it streams, and write the bundle
    (temp file, then rename). A mismatch names the artifact and its URL; nothing is left."""
    if arch not in ARCHES:
        raise InvalidInput(f"--arch {arch!r}: expected amd64 or arm64")
    chosen = [a for a in manifest["artifacts"] if a["arch"] in (arch, "any")]
    if not chosen:
        raise InvalidInput(f"the manifest has no artifact for {arch}")
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        with tarfile.open(tmp, "w") as tar:
            packed = {**manifest, "bundle": {**manifest["bundle"], "arch": arch}}
            packed["artifacts"] = chosen
            text = _render(packed).encode()
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode = len(text), 0o644
            tar.addfile(info, io.BytesIO(text))
            for i, entry in enumerate(chosen):
                if progress is not None:
                    progress(entry["name"], i, len(chosen))
                _add_artifact(tar, entry, fetch)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return {"bundle": str(target), "arch": arch, "artifacts": len(chosen)}


def _add_artifact(tar: tarfile.TarFile, entry: dict[str, str], fetch: Callable[..., Any]) -> None:
    digest = hashlib.sha256()
    with tempfile.TemporaryFile() as spool:
        try:
            with fetch(entry["url"]) as response:
                while chunk := response.read(CHUNK):
                    digest.update(chunk)
                    spool.write(chunk)
        except OSError as exc:
            raise InvalidInput(
                f"artifact {entry['name']!r}: cannot fetch {entry['url']}: "
                f"{getattr(exc, 'reason', exc)}"
            ) from exc
        if digest.hexdigest() != entry["sha256"]:
            raise CorruptObject(
                f"artifact {entry['name']!r}: {entry['url']} has sha256 {digest.hexdigest()}, "
                f"the manifest pins {entry['sha256']}"
            )
        info = tarfile.TarInfo(entry["path"])
        info.size = spool.tell()
        info.mode = 0o755 if entry["kind"] in ("binary", "script") else 0o644
        spool.seek(0)
        tar.addfile(info, spool)


def verify_bundle(path: str | Path, arch: str | None = None) -> dict[str, Any]:
    """Check a bundle before use: its manifest, its architecture (when given), each file's
    sha256, and nothing unlisted or outside the bundle. Errors name the file."""
    file = Path(path)
    if not file.is_file():
        raise InvalidInput(f"{path}: no such bundle")
    try:
        tar = tarfile.open(file, "r")
    except tarfile.TarError as exc:
        raise InvalidInput(f"{file.name}: not a bundle (not a tar file): {exc}") from exc
    with tar:
        members = {}
        for member in tar.getmembers():
            name = PurePosixPath(member.name)
            if name.is_absolute() or ".." in name.parts or not (member.isfile()):
                raise CorruptObject(f"{file.name}: {member.name}: not a plain file inside it")
            members[str(name)] = member
        if MANIFEST not in members:
            raise CorruptObject(f"{file.name}: no {MANIFEST}")
        extracted = tar.extractfile(members[MANIFEST])
        assert extracted is not None
        manifest = parse_manifest(extracted.read().decode("utf-8"), f"{file.name}:{MANIFEST}")
        built_for = manifest["bundle"].get("arch")
        if arch is not None and built_for != arch:
            raise InvalidInput(f"{file.name}: a bundle for {built_for}, this machine is {arch}")
        listed = {MANIFEST}
        for entry in manifest["artifacts"]:
            listed.add(entry["path"])
            member = members.get(entry["path"])
            if member is None:
                raise CorruptObject(f"{file.name}: {entry['path']} ({entry['name']}) is missing")
            digest = hashlib.sha256()
            reader = tar.extractfile(member)
            assert reader is not None
            while chunk := reader.read(CHUNK):
                digest.update(chunk)
            if digest.hexdigest() != entry["sha256"]:
                raise CorruptObject(
                    f"{file.name}: {entry['path']} ({entry['name']}) has sha256 "
                    f"{digest.hexdigest()}, the manifest pins {entry['sha256']}"
                )
        extra = sorted(set(members) - listed)
        if extra:
            raise CorruptObject(f"{file.name}: {extra[0]} is not in the manifest")
    return {
        "bundle": str(file),
        "name": manifest["bundle"]["name"],
        "version": manifest["bundle"]["version"],
        "arch": built_for,
        "artifacts": len(manifest["artifacts"]),
        "verified": True,
    }
