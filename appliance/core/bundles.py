"""Offline bundles: one tar file that carries everything a site without internet installs.

A bundle manifest (TOML) pins every artifact: its name, version, architecture (`amd64`,
`arm64`, or `any`), the URL it is fetched from, its sha256 and its path inside the bundle.
`[[image]]` tables name container images (pinned by digest where one is known) that the
build pulls and saves as tarballs.

`build_bundle` runs on a connected machine. For one architecture it

- fetches the URL artifacts, checking each against its pinned sha256 while it streams;
- builds the wheelhouse (`wheels/`): the appliance's own wheel and every dependency for
  CPython 3.11 on Linux, through pip (one replaceable callable, `run_pip`);
- pulls each `[[image]]` for the target platform and saves it as a tarball;
- builds the appliance runtime image from `bundles/Dockerfile` with the wheelhouse as its
  only package source, and saves it as a tarball;

and records every file it made (wheels, image tarballs) with its sha256 in the bundle's own
manifest, written last, so `verify_bundle` checks them like the pinned ones. The bundle is
written to a temp file and renamed: a failed build leaves nothing.

The Docker steps go through the `docker` SDK, imported only when a step needs it (it is the
optional extra `appliance[bundle]`); the client is made by a replaceable callable.

`verify_bundle` checks a bundle before anything is installed from it: the manifest, the
architecture, every file's size and sha256, that every member name is in normal form and the
tar holds nothing else. Every error names the artifact or the file.

A bundle is complete when it holds every artifact install.sh needs by name (`INSTALL_NEEDS`,
`REQUIRED_WHEELS`). `build_bundle` refuses, before it downloads anything, a manifest that
would give an incomplete bundle, unless that part was left out on purpose (no images, no
wheelhouse) or `partial` is set; `verify_bundle` reports what a bundle lacks, and with
`complete` refuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
import urllib.request
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from appliance import __version__
from appliance.errors import ApplianceError, CorruptObject, InvalidInput
from appliance.store.objects import sha256_file

ARCHES = ("amd64", "arm64")
MANIFEST = "manifest.toml"
ARTIFACT_KEYS = {"name", "version", "arch", "url", "sha256", "path", "kind"}
IMAGE_KEYS = {"name", "version", "ref", "digest", "arch"}
KINDS = ("binary", "images", "script", "wheel", "image", "manifest", "other")
FETCHABLE = ("https://", "http://", "file://")
MADE = {"wheel": "pip:", "image": "docker:"}  # url schemes of files the build makes itself
CHUNK = 1 << 20

# The wheelhouse targets the runtime image and the VMs: CPython 3.11 on Debian 12 (glibc 2.36).
PYTHON = "3.11"
PY_TAG = "311"
GLIBC_MINOR = 36
MACHINES = {"amd64": "x86_64", "arm64": "aarch64"}
# CPU torch by default: a few hundred MB instead of several GB of CUDA libraries.
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
REQUIRED_WHEELS = ("appliance", "torch", "duckdb_extension_httpfs")
RUNTIME_IMAGE = "appliance-runtime"
SDK_HINT = "pip install 'appliance[bundle]'"
DEVICE_PLUGIN = "nvidia-device-plugin"
# What install.sh needs from a bundle, by artifact name (install.sh: `require_artifacts`): the
# fetched artifacts, then the images (the device plugin only on GPU nodes); REQUIRED_WHEELS too.
FETCHED_NEEDS = ("k3s", "k3s-install", "k3s-airgap-images", "minio", "mc")
IMAGE_NEEDS = (DEVICE_PLUGIN, RUNTIME_IMAGE)
INSTALL_NEEDS = (*FETCHED_NEEDS, *IMAGE_NEEDS)
PIN_HINT = 'bundles/README.md, "To pin on a connected machine"'

_WHEEL = re.compile(
    r"^(?P<name>[A-Za-z0-9_.]+)-(?P<version>[^-]+)(?:-\d[^-]*)?"
    r"-(?P<py>[^-]+)-(?P<abi>[^-]+)-(?P<plat>[^-]+)\.whl$"
)
_IMAGE_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")


class BuildToolError(ApplianceError):
    """A build tool is missing or failed: the docker SDK, the Docker daemon, pip."""


def runtime_tag(version: str = __version__) -> str:
    """The runtime image's tag: what the k3s executor runs and every node imports."""
    return f"{RUNTIME_IMAGE}:{version}"


# ---- the manifest ------------------------------------------------------------------------------


def _normal(name: str) -> bool:
    """A relative POSIX path written as tar and install.sh look it up: no `./`, `//`, `/.`
    or trailing `/` (what `PurePosixPath` would silently rewrite), and no `..`."""
    path = PurePosixPath(name)
    return bool(path.parts) and str(path) == name and ".." not in path.parts


def _table(
    data: Any, table: str, index: int, source: str, keys: set[str], required: set[str]
) -> tuple[dict[str, str], str]:
    """One `[[artifact]]` or `[[image]]` table's text values, and how errors name it (by its
    name when it has one): every key known, the required ones there, none empty."""
    where = f"{source}: {table}[{index}]"
    if not isinstance(data, dict):
        raise InvalidInput(f"{where}: expected a table")
    name = data.get("name")
    where = f"{source}: {table} {name!r}" if isinstance(name, str) else where
    missing = sorted(required - set(data))
    if missing:
        raise InvalidInput(f"{where}: missing {', '.join(missing)}")
    unknown = sorted(set(data) - keys)
    if unknown:
        raise InvalidInput(f"{where}: unknown key(s) {unknown}")
    values = {k: data[k] for k in keys if k in data}
    if not all(isinstance(v, str) and v for v in values.values()):
        raise InvalidInput(f"{where}: every value must be non-empty text")
    arch = values.setdefault("arch", "any")
    if arch not in (*ARCHES, "any"):
        raise InvalidInput(f"{where}: arch {arch!r} is not amd64, arm64 or any")
    return values, where


def _entry(data: Any, index: int, source: str) -> dict[str, str]:
    entry, where = _table(data, "artifact", index, source, ARTIFACT_KEYS, ARTIFACT_KEYS - {"kind"})
    digest = entry["sha256"]
    if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise InvalidInput(f"{where}: sha256 must be 64 lowercase hex digits")
    path = PurePosixPath(entry["path"])
    if not path.parts or path.is_absolute() or ".." in path.parts or str(path) == MANIFEST:
        raise InvalidInput(f"{where}: path {entry['path']!r} must stay inside the bundle")
    if not _normal(entry["path"]):
        raise InvalidInput(
            f"{where}: path {entry['path']!r} is not in normal form (write {str(path)!r})"
        )
    entry.setdefault("kind", "other")
    if entry["kind"] not in KINDS:
        raise InvalidInput(f"{where}: kind {entry['kind']!r} is not one of {', '.join(KINDS)}")
    made = MADE.get(entry["kind"])
    if not entry["url"].startswith(FETCHABLE) and not (made and entry["url"].startswith(made)):
        raise InvalidInput(
            f"{where}: url must be https://, http:// or file:// "
            "(pip: and docker: only for the wheels and images a build made)"
        )
    return entry


def _image(data: Any, index: int, source: str) -> dict[str, str]:
    """One `[[image]]`: a container image the build pulls for the target arch and saves."""
    image, where = _table(data, "image", index, source, IMAGE_KEYS, {"name", "version", "ref"})
    if not _IMAGE_NAME.match(image["name"]):
        raise InvalidInput(f"{where}: name must be lowercase letters, digits and '-'")
    repo, _, tag = image["ref"].rpartition(":")
    if "@" in image["ref"] or not repo or "/" in tag:
        raise InvalidInput(
            f"{where}: ref {image['ref']!r} must be REPOSITORY:TAG (the digest goes in `digest`)"
        )
    if "digest" in image and not _DIGEST.match(image["digest"]):
        raise InvalidInput(f"{where}: digest must be sha256: and 64 lowercase hex digits")
    return image


def parse_manifest(text: str, source: str = MANIFEST) -> dict[str, Any]:
    """A manifest checked entry by entry: `[bundle]` (name, version, arch?), `[[artifact]]`
    and `[[image]]` tables. Two artifacts may not claim one path for the same arch."""
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
    images_raw = data.get("image", [])
    if not isinstance(images_raw, list):
        raise InvalidInput(f"{source}: image must be an array of tables ([[image]])")
    images = [_image(item, i, source) for i, item in enumerate(images_raw)]
    seen: set[tuple[str, str]] = set()
    claims = [(a["name"], a["arch"], a["path"]) for a in artifacts]
    claims += [(i["name"], i["arch"], None) for i in images]
    for name, arch_of, path in claims:
        for arch in ARCHES if arch_of == "any" else (arch_of,):
            key = (arch, path or _image_path(name, arch))
            if key in seen:
                raise InvalidInput(
                    f"{source}: artifact {name!r}: path {key[1]!r} is already used for {arch}"
                )
            seen.add(key)
    return {"bundle": dict(bundle), "artifacts": artifacts, "images": images}


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


def _image_path(name: str, arch: str) -> str:
    return f"images/{name}-{arch}.tar"


# ---- completeness: what install.sh needs from a bundle ---------------------------------------


def missing_artifacts(entries: Iterable[dict[str, str]], arch: str | None) -> list[str]:
    """The names install.sh needs (INSTALL_NEEDS, and the REQUIRED_WHEELS as kind `wheel`)
    that `entries` lack for `arch` (None: any arch), in install order."""
    names: set[str] = set()
    wheels: set[str] = set()
    for entry in entries:
        if arch is None or entry["arch"] in (arch, "any"):
            names.add(entry["name"])
            if entry.get("kind") == "wheel":
                wheels.add(entry["name"])
    return [n for n in INSTALL_NEEDS if n not in names] + [
        n for n in REQUIRED_WHEELS if n not in wheels
    ]


def _describe(missing: list[str]) -> str:
    """`missing` as words, saying which one only GPU nodes need."""
    return ", ".join(
        f"{n} (GPU nodes)" if n == DEVICE_PLUGIN else f"{n} (wheel)" if n in REQUIRED_WHEELS else n
        for n in missing
    )


# ---- the build boundaries: network, pip, Docker ---------------------------------------------


def _fetch(url: str) -> BinaryIO:
    return urllib.request.urlopen(url, timeout=60)  # type: ignore[no-any-return]  # noqa: S310


def _run_pip(argv: list[str]) -> None:
    """Run one pip command; a failure names the command and ends with pip's last lines."""
    verb = next((a for a in argv[3:] if not a.startswith("-")), "pip")
    try:
        done = subprocess.run(argv, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise BuildToolError(f"wheelhouse: cannot run pip {verb}: {exc}") from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or "").strip().splitlines()[-6:]
        raise BuildToolError(
            f"wheelhouse: pip {verb} failed (exit {done.returncode}): " + " | ".join(tail)
        )


def docker_from_env() -> Any:
    """A Docker client from the environment (DOCKER_HOST, else the local socket)."""
    try:
        import docker
    except ImportError as exc:
        raise BuildToolError(
            f"building and saving images needs the docker SDK: {SDK_HINT} "
            "(or build without images: --no-image)"
        ) from exc
    try:
        return docker.from_env()
    except docker.errors.DockerException as exc:
        raise BuildToolError(
            f"cannot reach the Docker daemon ({exc}); start Docker or set DOCKER_HOST, "
            "or build without images: --no-image"
        ) from exc


def _docker_errors() -> tuple[type[BaseException], ...]:
    """What a Docker call raises: the SDK's errors, and OSError for a dropped connection."""
    try:
        from docker.errors import DockerException
    except ImportError:
        return (OSError,)
    return (DockerException, OSError)


# ---- the wheelhouse -----------------------------------------------------------------------------


def _platforms(arch: str) -> list[str]:
    """The pip --platform tags a Debian 12 (glibc 2.36) machine of `arch` installs."""
    machine = MACHINES[arch]
    tags = [f"manylinux_2_{minor}_{machine}" for minor in range(GLIBC_MINOR, 16, -1)]
    return [*tags, f"manylinux2014_{machine}"]


def pip_wheel_command(project: Path, dest: Path, python: str = sys.executable) -> list[str]:
    """Build the appliance's own wheel (no dependencies) from the project tree."""
    return [
        python,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "wheel",
        "--no-deps",
        "--wheel-dir",
        str(dest),
        str(project),
    ]


def pip_download_command(
    wheel: Path,
    dest: Path,
    arch: str,
    constraints: Path,
    torch_index: str | None = TORCH_CPU_INDEX,
    python: str = sys.executable,
) -> list[str]:
    """Download the wheel's dependencies, pinned by the constraints file, as binary wheels for
    CPython 3.11 on Linux `arch` (whatever machine runs the build)."""
    argv = [
        python,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "download",
        "--only-binary=:all:",
        "--python-version",
        PYTHON,
        "--implementation",
        "cp",
        "--abi",
        "cp" + PY_TAG,
        "--abi",
        "abi3",
        "--abi",
        "none",
    ]
    for tag in _platforms(arch):
        argv += ["--platform", tag]
    argv += ["--constraint", str(constraints), "--dest", str(dest)]
    if torch_index:
        argv += ["--extra-index-url", torch_index]
    return [*argv, str(wheel)]


def _python_fits(py: str, abi: str) -> bool:
    tags = py.split(".")
    if any(t in ("py3", "py" + PY_TAG, "cp" + PY_TAG) for t in tags):
        return True
    minor = int(PY_TAG[1:])
    return "abi3" in abi.split(".") and any(
        t.startswith("cp3") and t[3:].isdigit() and int(t[3:]) <= minor for t in tags
    )


def _platform_fits(plat: str, arch: str) -> bool:
    machine = MACHINES[arch]
    return any(
        p == "any" or (p.startswith(("manylinux", "linux_")) and p.endswith("_" + machine))
        for p in plat.split(".")
    )


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _wheel_entries(dest: Path, arch: str) -> list[dict[str, str]]:
    """Each file pip left in `dest` as a manifest entry; anything that would not install on
    CPython 3.11 / Linux `arch` is refused, naming the file."""
    entries = []
    for file in sorted(dest.iterdir()):
        match = _WHEEL.match(file.name)
        if not match or not file.is_file():
            raise InvalidInput(f"wheelhouse: {file.name} is not a wheel")
        if not _python_fits(match["py"], match["abi"]):
            raise InvalidInput(f"wheelhouse: {file.name} is not for CPython {PYTHON}")
        if not _platform_fits(match["plat"], arch):
            raise InvalidInput(f"wheelhouse: {file.name} does not run on Linux {arch}")
        pure = match["plat"] == "any"
        entries.append(
            {
                "name": _normalize(match["name"]),
                "version": match["version"],
                "arch": "any" if pure else arch,
                "url": f"pip:{_normalize(match['name'])}=={match['version']}",
                "sha256": sha256_file(file),
                "path": f"wheels/{file.name}",
                "kind": "wheel",
            }
        )
    missing = sorted(set(REQUIRED_WHEELS) - {e["name"] for e in entries})
    if missing:
        raise InvalidInput(f"wheelhouse: no wheel for {', '.join(missing)}")
    return entries


def build_wheelhouse(
    project: Path,
    dest: Path,
    arch: str,
    constraints: Path,
    torch_index: str | None = TORCH_CPU_INDEX,
    run_pip: Callable[[list[str]], None] | None = None,
) -> list[dict[str, str]]:
    """The appliance's wheel and its dependencies for `arch` in `dest`, as manifest entries."""
    run = run_pip or _run_pip
    dest.mkdir(parents=True, exist_ok=True)
    run(pip_wheel_command(project, dest))
    own = sorted(dest.glob("appliance-*.whl"))
    if len(own) != 1:
        raise BuildToolError(
            f"wheelhouse: building {project} gave {len(own)} appliance wheels, expected 1"
        )
    run(pip_download_command(own[0], dest, arch, constraints, torch_index))
    return _wheel_entries(dest, arch)


# ---- images ---------------------------------------------------------------------------------


def _check_platform(image: Any, arch: str, what: str) -> None:
    built = (getattr(image, "attrs", None) or {}).get("Architecture")
    if built and built != arch:
        raise BuildToolError(
            f"{what}: the image is linux/{built}, the bundle is for linux/{arch} "
            "(building for another architecture needs QEMU binfmt emulation on this machine)"
        )


def _build_log_tail(exc: BaseException) -> str:
    lines: list[str] = []
    for chunk in getattr(exc, "build_log", None) or ():
        if isinstance(chunk, dict) and chunk.get("stream", "").strip():
            lines.append(chunk["stream"].strip())
    return " | ".join(lines[-4:])


def build_runtime_image(client: Any, context: Path, arch: str, tag: str | None = None) -> Any:
    """Build the runtime image from `context` (its Dockerfile and wheels/) for linux/`arch`."""
    tag = tag or runtime_tag()
    try:
        client.images.build(
            path=str(context),
            dockerfile="Dockerfile",
            tag=tag,
            platform=f"linux/{arch}",
            buildargs={"APPLIANCE_VERSION": __version__},
            pull=True,
            rm=True,
            forcerm=True,
        )
        image = client.images.get(tag)
    except _docker_errors() as exc:
        tail = _build_log_tail(exc)
        raise BuildToolError(
            f"image {tag}: the build failed: {exc}" + (f" (last steps: {tail})" if tail else "")
        ) from exc
    _check_platform(image, arch, f"image {tag}")
    return image


def pull_image(client: Any, spec: dict[str, str], arch: str) -> tuple[Any, str]:
    """Pull one `[[image]]` for linux/`arch` (by digest when pinned) and tag it with its ref,
    so the saved tarball carries the name the cluster's manifests use. Returns the image and
    the reference it was pulled as, with the digest (what the bundle records)."""
    repo, _, tag = spec["ref"].rpartition(":")
    platform = f"linux/{arch}"
    try:
        if "digest" in spec:
            image = client.images.pull(f"{repo}@{spec['digest']}", platform=platform)
            image.tag(repo, tag=tag)
            image = client.images.get(spec["ref"])
            resolved = spec["digest"]
        else:
            image = client.images.pull(repo, tag=tag, platform=platform)
            digests = (getattr(image, "attrs", None) or {}).get("RepoDigests") or []
            resolved = digests[0].rpartition("@")[2] if digests else ""
    except _docker_errors() as exc:
        raise BuildToolError(f"image {spec['name']}: cannot pull {spec['ref']}: {exc}") from exc
    _check_platform(image, arch, f"image {spec['name']}")
    return image, f"{spec['ref']}@{resolved}" if resolved else spec["ref"]


# ---- packing --------------------------------------------------------------------------------


def _add_spool(tar: tarfile.TarFile, path: str, spool: BinaryIO, kind: str) -> None:
    info = tarfile.TarInfo(path)
    info.size = spool.tell()
    info.mode = 0o755 if kind in ("binary", "script") else 0o644
    spool.seek(0)
    tar.addfile(info, spool)


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
        _add_spool(tar, entry["path"], spool, entry["kind"])


def _add_image(
    tar: tarfile.TarFile, image: Any, named: str, entry: dict[str, str]
) -> dict[str, str]:
    """Stream `docker save` of one image into the bundle, hashing it on the way."""
    digest = hashlib.sha256()
    with tempfile.TemporaryFile() as spool:
        try:
            for chunk in image.save(named=named):
                digest.update(chunk)
                spool.write(chunk)
        except _docker_errors() as exc:
            raise BuildToolError(f"image {entry['name']}: cannot save {named}: {exc}") from exc
        _add_spool(tar, entry["path"], spool, "image")
    return {**entry, "sha256": digest.hexdigest(), "kind": "image"}


def _add_file(tar: tarfile.TarFile, file: Path, entry: dict[str, str]) -> None:
    info = tarfile.TarInfo(entry["path"])
    info.size = file.stat().st_size
    info.mode = 0o644
    with file.open("rb") as fh:
        tar.addfile(info, fh)


def _incomplete(missing: list[str], arch: str) -> str:
    """Why a build is refused as incomplete, and what to do about each part."""
    fixes = []
    unpinned = [n for n in missing if n in FETCHED_NEEDS]
    if unpinned:
        fixes.append(f"pin {', '.join(unpinned)} for {arch} in the manifest first ({PIN_HINT})")
    if DEVICE_PLUGIN in missing:
        fixes.append(f"add an [[image]] named {DEVICE_PLUGIN} to the manifest")
    if RUNTIME_IMAGE in missing:
        fixes.append("give the runtime image's Dockerfile")
    if set(missing) & set(IMAGE_NEEDS):
        fixes.append("or leave the images out on purpose (--no-image)")
    return (
        f"the bundle for {arch} would lack {_describe(missing)}, and install.sh refuses a "
        f"bundle without them: {'; '.join(fixes)}"
    )


class _Paths:
    """Every path the bundle holds, so two steps can never write one path twice."""

    def __init__(self) -> None:
        self.used: set[str] = {MANIFEST}

    def claim(self, entries: Iterable[dict[str, str]]) -> None:
        for entry in entries:
            if entry["path"] in self.used:
                raise InvalidInput(
                    f"artifact {entry['name']!r}: {entry['path']} is already in the bundle"
                )
            self.used.add(entry["path"])


def build_bundle(
    manifest: dict[str, Any],
    arch: str,
    out: str | Path,
    fetch: Callable[[str], BinaryIO] = _fetch,
    progress: Callable[[str, int, int], None] | None = None,
    *,
    project: str | Path | None = None,
    constraints: str | Path | None = None,
    torch_index: str | None = TORCH_CPU_INDEX,
    run_pip: Callable[[list[str]], None] | None = None,
    dockerfile: str | Path | None = None,
    images: bool = True,
    docker_client: Callable[[], Any] | None = None,
    partial: bool = False,
) -> dict[str, Any]:
    """Fetch the artifacts for `arch` (each sha256 checked as it streams), build the wheelhouse
    from `project` (when given), pull the `[[image]]`s (unless `images` is false), build the
    runtime image from `dockerfile` (when given), and write the bundle: a temp file, then a
    rename. A failure names the artifact or the step; nothing is left behind.

    The bundle must hold everything install.sh needs (`missing_artifacts`), checked before
    anything is fetched: only the images may be missing when `images` is false, only the
    wheels when there is no `project`; `partial` accepts anything missing. The result's
    `missing` names what the bundle lacks."""
    if arch not in ARCHES:
        raise InvalidInput(f"--arch {arch!r}: expected amd64 or arm64")
    chosen = [a for a in manifest["artifacts"] if a["arch"] in (arch, "any")]
    pulls = [i for i in manifest.get("images", []) if i["arch"] in (arch, "any")] if images else []
    if not chosen:
        raise InvalidInput(f"the manifest has no artifact for {arch}")
    for entry in chosen:
        if not entry["url"].startswith(FETCHABLE):
            raise InvalidInput(
                f"artifact {entry['name']!r}: {entry['url']} is made by a build, not fetched "
                "(container images go under [[image]])"
            )
    wheel_project = Path(project) if project is not None else None
    pins = None
    if wheel_project is not None:
        if not (wheel_project / "pyproject.toml").is_file():
            raise InvalidInput(f"{wheel_project}: no pyproject.toml (the appliance source tree)")
        pins = Path(constraints) if constraints is not None else wheel_project / "constraints.txt"
        if not pins.is_file():
            raise InvalidInput(f"{pins}: no such constraints file")
    image_file = Path(dockerfile) if dockerfile is not None else None
    if image_file is not None:
        if wheel_project is None:
            raise InvalidInput(
                "the runtime image installs only from the wheelhouse: build the wheelhouse "
                "too, or leave the image out (--no-image)"
            )
        if not image_file.is_file():
            raise InvalidInput(f"{image_file}: no such Dockerfile")
    # What the bundle will hold, by name: refuse an incomplete one before anything is fetched.
    making = [*chosen, *({**i, "kind": "image"} for i in pulls)]
    if image_file is not None:
        making.append({"name": RUNTIME_IMAGE, "arch": arch, "kind": "image"})
    if wheel_project is not None:  # the wheelhouse build itself refuses one without these
        making += [{"name": n, "arch": "any", "kind": "wheel"} for n in REQUIRED_WHEELS]
    missing = missing_artifacts(making, arch)
    left_out = set(IMAGE_NEEDS if not images else ()) | set(
        REQUIRED_WHEELS if wheel_project is None else ()
    )
    refused = [n for n in missing if n not in left_out]
    if refused and not partial:
        raise InvalidInput(_incomplete(refused, arch))
    # Docker first: a missing SDK or daemon fails before anything is downloaded.
    client = (docker_client or docker_from_env)() if (pulls or image_file) else None

    steps = len(chosen) + (wheel_project is not None) + len(pulls) + (image_file is not None)
    step = iter(range(steps))

    def report(name: str) -> None:
        if progress is not None:
            progress(name, next(step), steps)

    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.build-", dir=target.parent))
    entries: list[dict[str, str]] = []
    unpinned: list[str] = []
    paths = _Paths()
    try:
        with tarfile.open(tmp, "w") as tar:
            paths.claim(chosen)
            for entry in chosen:
                report(entry["name"])
                _add_artifact(tar, entry, fetch)
                entries.append(entry)
            if wheel_project is not None and pins is not None:
                report(f"wheelhouse ({arch}, CPython {PYTHON})")
                wheels = build_wheelhouse(
                    wheel_project, staging / "wheels", arch, pins, torch_index, run_pip
                )
                paths.claim(wheels)
                for entry in wheels:
                    _add_file(tar, staging / entry["path"], entry)
                entries += wheels
            for spec in pulls:
                report(f"image {spec['ref']}")
                image, pulled = pull_image(client, spec, arch)
                if "digest" not in spec:
                    unpinned.append(spec["name"])
                entry = {
                    "name": spec["name"],
                    "version": spec["version"],
                    "arch": arch,
                    "url": f"docker:{pulled}",
                    "path": _image_path(spec["name"], arch),
                }
                paths.claim([entry])
                entries.append(_add_image(tar, image, spec["ref"], entry))
            if image_file is not None:
                tag = runtime_tag()
                report(f"image {tag}")
                shutil.copyfile(image_file, staging / "Dockerfile")
                image = build_runtime_image(client, staging, arch, tag)
                entry = {
                    "name": RUNTIME_IMAGE,
                    "version": __version__,
                    "arch": arch,
                    "url": f"docker:{tag}",
                    "path": _image_path(RUNTIME_IMAGE, arch),
                }
                paths.claim([entry])
                entries.append(_add_image(tar, image, tag, entry))
            # last: the manifest lists what the steps above made, with their sha256
            packed = {"bundle": {**manifest["bundle"], "arch": arch}, "artifacts": entries}
            text = _render(packed).encode()
            parse_manifest(text.decode(), MANIFEST)  # the bundle's own manifest must verify
            info = tarfile.TarInfo(MANIFEST)
            info.size, info.mode = len(text), 0o644
            tar.addfile(info, io.BytesIO(text))
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(staging, ignore_errors=True)
    return {
        "bundle": str(target),
        "arch": arch,
        "artifacts": len(entries),
        "wheels": sum(e["kind"] == "wheel" and e["url"].startswith("pip:") for e in entries),
        "images": [e["url"].removeprefix("docker:") for e in entries if e["kind"] == "image"],
        "unpinned_images": unpinned,
        "missing": missing_artifacts(entries, arch),
    }


# ---- verify ---------------------------------------------------------------------------------


def verify_bundle(
    path: str | Path, arch: str | None = None, *, complete: bool = False
) -> dict[str, Any]:
    """Check a bundle before use: its manifest, its architecture (when given), each file's
    sha256, every member name in normal form, and nothing unlisted or outside the bundle.
    Errors name the file (and the member). The result's `missing` names what install.sh needs
    and the bundle lacks (`installable` is false then); with `complete` that is an error
    (`bundle verify` without --partial). install.sh itself asks only for what its node needs:
    an agent needs no MinIO, a node without a GPU no device plugin."""
    file = Path(path)
    if not file.is_file():
        raise InvalidInput(f"{path}: no such bundle")
    try:
        tar = tarfile.open(file, "r")
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise InvalidInput(f"{file.name}: not a bundle (not a tar file): {exc}") from exc
    except OSError as exc:
        raise InvalidInput(f"{file.name}: cannot read it: {exc}") from exc
    reading: list[str] = []  # the member being read, to name it if the file ends inside it
    try:
        with tar:
            manifest = _verify_members(tar, file.name, arch, reading)
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        inside = f" inside {reading[-1]}" if reading else ""
        raise CorruptObject(
            f"{file.name}: truncated or damaged{inside}: {str(exc) or type(exc).__name__}"
        ) from exc
    built_for = manifest["bundle"].get("arch")
    missing = missing_artifacts(manifest["artifacts"], built_for)
    if complete and missing:
        raise InvalidInput(
            f"{file.name}: not installable: it lacks {_describe(missing)}, which install.sh "
            "needs (to accept a bundle left partial on purpose: bundle verify --partial)"
        )
    kinds: dict[str, int] = {}
    for entry in manifest["artifacts"]:
        kinds[entry["kind"]] = kinds.get(entry["kind"], 0) + 1
    return {
        "bundle": str(file),
        "name": manifest["bundle"]["name"],
        "version": manifest["bundle"]["version"],
        "arch": built_for,
        "artifacts": len(manifest["artifacts"]),
        "kinds": kinds,
        "verified": True,
        "installable": not missing,
        "missing": missing,
    }


def _verify_members(
    tar: tarfile.TarFile, bundle: str, arch: str | None, reading: list[str]
) -> dict[str, Any]:
    """The bundle's manifest, once every member checks out (verify_bundle's body); `reading`
    gets the name of each member as it is read."""
    members: dict[str, tarfile.TarInfo] = {}
    try:
        listing = tar.getmembers()
    except (tarfile.TarError, EOFError):
        if tar.members:  # the scan ran past the end of the data of the last member it found
            reading.append(tar.members[-1].name)
        raise
    for member in listing:
        name = PurePosixPath(member.name)
        if name.is_absolute() or ".." in name.parts or not member.isfile():
            raise CorruptObject(f"{bundle}: {member.name}: not a plain file inside it")
        if not _normal(member.name):
            raise CorruptObject(
                f"{bundle}: {member.name}: a member name not in normal form (install.sh looks "
                f"it up as {name}): repack the bundle without './', '//' or a trailing '/'"
            )
        if member.name in members:
            raise CorruptObject(f"{bundle}: {member.name} is in it twice")
        members[member.name] = member
    if MANIFEST not in members:
        raise CorruptObject(f"{bundle}: no {MANIFEST}")
    reading.append(MANIFEST)
    extracted = tar.extractfile(members[MANIFEST])
    assert extracted is not None
    source = f"{bundle}:{MANIFEST}"
    try:
        text = extracted.read().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{source}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    manifest = parse_manifest(text, source)
    built_for = manifest["bundle"].get("arch")
    if arch is not None and built_for != arch:
        raise InvalidInput(f"{bundle}: a bundle for {built_for}, this machine is {arch}")
    listed = {MANIFEST}
    for entry in manifest["artifacts"]:
        listed.add(entry["path"])
        member = members.get(entry["path"])
        if member is None:
            raise CorruptObject(f"{bundle}: {entry['path']} ({entry['name']}) is missing")
        reading.append(entry["path"])
        digest = hashlib.sha256()
        reader = tar.extractfile(member)
        assert reader is not None
        while chunk := reader.read(CHUNK):
            digest.update(chunk)
        if digest.hexdigest() != entry["sha256"]:
            raise CorruptObject(
                f"{bundle}: {entry['path']} ({entry['name']}) has sha256 "
                f"{digest.hexdigest()}, the manifest pins {entry['sha256']}"
            )
    extra = sorted(set(members) - listed)
    if extra:
        raise CorruptObject(f"{bundle}: {extra[0]} is not in the manifest")
    return manifest
