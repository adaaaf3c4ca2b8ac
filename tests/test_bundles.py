"""Offline bundles built from a local HTTP server serving small stand-in files: a correct
build verifies; a changed byte, a missing file, an unlisted file, a bundle for the other
architecture and a wrong manifest entry each fail, naming the file.

The wheelhouse and the images are built through in-memory stand-ins for pip and the Docker
SDK: the bundle carries what they made, with sha256 entries `bundle verify` checks; a missing
SDK, an unreachable daemon or a failed build names the cause and leaves no file. The
Dockerfile, the pinned manifest and the cluster scripts are checked statically."""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import tarfile
import threading
import tomllib
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.core import bundles
from appliance.core.bundles import (
    BuildToolError,
    build_bundle,
    load_manifest,
    parse_manifest,
    runtime_tag,
    verify_bundle,
)
from appliance.errors import CorruptObject, InvalidInput

ROOT = Path(__file__).resolve().parents[1]

FILES = {
    "k3s-amd64": b"#!/bin/sh\necho k3s amd64\n",
    "k3s-arm64": b"#!/bin/sh\necho k3s arm64\n",
    "k3s-airgap-images-amd64.tar.zst": b"\x28\xb5\x2f\xfd" + b"images" * 100,
    "k3s-airgap-images-arm64.tar.zst": b"\x28\xb5\x2f\xfd" + b"arm64 images" * 50,
    "install-k3s.sh": b"#!/bin/sh\necho install\n",
    "minio-amd64": b"minio server amd64\n",
    "minio-arm64": b"minio server arm64\n",
    "mc-amd64": b"minio client amd64\n",
    "mc-arm64": b"minio client arm64\n",
    "appliance-0.1.0-py3-none-any.whl": b"PK\x03\x04 wheel",
}


class _Quiet(SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def site(tmp_path: Path) -> Iterator[str]:
    """The stand-in files over HTTP on 127.0.0.1 (a release page, offline)."""
    served = tmp_path / "site"
    served.mkdir()
    for name, data in FILES.items():
        (served / name).write_bytes(data)
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(served)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _sha(name: str) -> str:
    return hashlib.sha256(FILES[name]).hexdigest()


def manifest_text(base: str, override: dict[str, str] | None = None) -> str:
    entries = [
        ("k3s", "v1.31.4+k3s1", "amd64", "k3s-amd64", "bin/k3s", "binary"),
        ("k3s", "v1.31.4+k3s1", "arm64", "k3s-arm64", "bin/k3s", "binary"),
        (
            "k3s-airgap-images",
            "v1.31.4+k3s1",
            "amd64",
            "k3s-airgap-images-amd64.tar.zst",
            "images/k3s-airgap-images-amd64.tar.zst",
            "images",
        ),
        (
            "k3s-airgap-images",
            "v1.31.4+k3s1",
            "arm64",
            "k3s-airgap-images-arm64.tar.zst",
            "images/k3s-airgap-images-arm64.tar.zst",
            "images",
        ),
        ("k3s-install", "v1.31.4+k3s1", "any", "install-k3s.sh", "bin/install-k3s.sh", "script"),
        ("minio", "RELEASE.2025-09-07T16-13-09Z", "amd64", "minio-amd64", "bin/minio", "binary"),
        ("minio", "RELEASE.2025-09-07T16-13-09Z", "arm64", "minio-arm64", "bin/minio", "binary"),
        ("mc", "RELEASE.2025-08-13T08-35-41Z", "amd64", "mc-amd64", "bin/mc", "binary"),
        ("mc", "RELEASE.2025-08-13T08-35-41Z", "arm64", "mc-arm64", "bin/mc", "binary"),
        (
            "appliance",
            "0.1.0",
            "any",
            "appliance-0.1.0-py3-none-any.whl",
            "wheels/appliance-0.1.0-py3-none-any.whl",
            "wheel",
        ),
    ]
    out = ['[bundle]\nname = "appliance"\nversion = "0.1.0"\n']
    for name, version, arch, file, path, kind in entries:
        sha = (override or {}).get(file, _sha(file))
        out.append(
            f'[[artifact]]\nname = "{name}"\nversion = "{version}"\narch = "{arch}"\n'
            f'url = "{base}/{file}"\nsha256 = "{sha}"\npath = "{path}"\nkind = "{kind}"\n'
        )
    return "\n".join(out)


def _rewrite(bundle: Path, out: Path, change: Any) -> None:
    """Copy a bundle member by member, letting `change(name, data)` alter or drop one."""
    with tarfile.open(bundle) as src, tarfile.open(out, "w") as dst:
        for member in src.getmembers():
            reader = src.extractfile(member)
            assert reader is not None
            data = change(member.name, reader.read())
            if data is None:
                continue
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            dst.addfile(info, io.BytesIO(data))


def test_a_built_bundle_verifies_and_any_change_is_named(
    site: str, tmp_path: Path, cli: Any, home: Path
) -> None:
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(manifest_text(site))
    out = tmp_path / "appliance-bundle.tar"
    result = cli(
        "bundle",
        "build",
        "--arch",
        "amd64",
        "--out",
        str(out),
        "--manifest",
        str(manifest),
        "--no-wheels",
        "--no-image",
        "--json",
        "--home",
        str(home),
    )
    assert result.code == 0, result.err
    partial_missing = ["nvidia-device-plugin", "appliance-runtime", "torch"]
    partial_missing.append("duckdb_extension_httpfs")
    assert result.json() == {
        "bundle": str(out),
        "arch": "amd64",
        "artifacts": 6,
        "wheels": 0,
        "images": [],
        "unpinned_images": [],
        "missing": partial_missing,  # left out on purpose: --no-image, --no-wheels
    }
    assert "[6/6] appliance" in result.err  # progress per artifact
    assert "warning: a partial bundle: it lacks nvidia-device-plugin, " in result.err
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
        k3s = tar.getmember("bin/k3s")
        assert tar.extractfile(k3s).read() == FILES["k3s-amd64"]  # type: ignore[union-attr]
        assert k3s.mode == 0o755
    assert names == [
        "bin/install-k3s.sh",
        "bin/k3s",
        "bin/mc",
        "bin/minio",
        "images/k3s-airgap-images-amd64.tar.zst",
        "manifest.toml",
        "wheels/appliance-0.1.0-py3-none-any.whl",
    ]
    # a partial bundle is not installable: refused unless it is accepted as partial
    refused = cli("bundle", "verify", str(out), "--arch", "amd64", "--home", str(home))
    assert refused.code == 2
    assert (
        "appliance-bundle.tar: not installable: it lacks nvidia-device-plugin (GPU nodes), "
        "appliance-runtime, torch (wheel), duckdb_extension_httpfs (wheel), which install.sh "
        "needs"
    ) in refused.err
    verified = cli(
        "bundle", "verify", str(out), "--arch", "amd64", "--partial", "--json", "--home", str(home)
    )
    assert verified.code == 0 and verified.json()["verified"] is True
    assert verified.json()["installable"] is False
    assert verified.json()["missing"] == partial_missing
    assert "warning: a partial bundle: it lacks nvidia-device-plugin, appliance-runtime" in (
        verified.err
    )

    # one changed byte
    changed = tmp_path / "changed.tar"
    _rewrite(out, changed, lambda n, d: d[:-1] + b"X" if n == "bin/k3s" else d)
    with pytest.raises(CorruptObject, match=r"changed.tar: bin/k3s \(k3s\) has sha256"):
        verify_bundle(changed)
    # a missing file
    missing = tmp_path / "missing.tar"
    _rewrite(out, missing, lambda n, d: None if n.startswith("images/") else d)
    with pytest.raises(CorruptObject, match=r"images/k3s-airgap-images-amd64.tar.zst .* missing"):
        verify_bundle(missing)
    # something the manifest does not list
    extra = tmp_path / "extra.tar"
    _rewrite(out, extra, lambda n, d: d)
    with tarfile.open(extra, "a") as tar:
        info = tarfile.TarInfo("bin/backdoor")
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(CorruptObject, match="bin/backdoor is not in the manifest"):
        verify_bundle(extra)
    # a second copy of a listed file (tar extracts the last one)
    twice = tmp_path / "twice.tar"
    _rewrite(out, twice, lambda n, d: d)
    with tarfile.open(twice, "a") as tar:
        info = tarfile.TarInfo("bin/k3s")
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    with pytest.raises(CorruptObject, match="twice.tar: bin/k3s is in it twice"):
        verify_bundle(twice)
    # the other architecture
    refused = cli("bundle", "verify", str(out), "--arch", "arm64", "--partial", "--home", str(home))
    assert refused.code == 2 and "a bundle for amd64, this machine is arm64" in refused.err
    # a file whose manifest entry is wrong: the build names it and leaves nothing
    manifest.write_text(manifest_text(site, {"install-k3s.sh": "0" * 64}))
    failed = tmp_path / "failed.tar"
    result = cli(
        "bundle",
        "build",
        "--arch",
        "arm64",
        "--out",
        str(failed),
        "--manifest",
        str(manifest),
        "--no-wheels",
        "--no-image",
        "--home",
        str(home),
    )
    assert result.code == 5 and "artifact 'k3s-install'" in result.err
    assert "the manifest pins 0000" in result.err
    assert not failed.exists() and not list(tmp_path.glob(".failed.tar.*"))


def test_manifest_and_bundle_mistakes_are_named(site: str, tmp_path: Path) -> None:
    good = manifest_text(site)
    cases = [
        (good.replace('arch = "arm64"', 'arch = "riscv"'), "artifact 'k3s': arch 'riscv'"),
        (good.replace('path = "bin/k3s"', 'path = "../../etc/passwd"', 1), "must stay inside"),
        (good.replace(_sha("k3s-amd64"), "xyz"), "artifact 'k3s': sha256 must be 64"),
        (good.replace('url = "http', 'url = "ftp', 1), "url must be https://"),
        (good.replace('kind = "wheel"', 'kind = "wheel"\ncolour = "red"'), "unknown key"),
        (good.replace('name = "appliance"\nversion', "version", 1), r"\[bundle\] needs name"),
        (
            good.replace('path = "bin/install-k3s.sh"', 'path = "bin/k3s"'),
            "path 'bin/k3s' is already used for amd64",
        ),
        ("[bundle\n", "not valid TOML"),
    ]
    for text, needle in cases:
        with pytest.raises(InvalidInput, match=needle):
            parse_manifest(text)
    with pytest.raises(InvalidInput, match="no such manifest"):
        load_manifest(tmp_path / "nope.toml")
    not_tar = tmp_path / "bundle.tar"
    not_tar.write_bytes(b"not a tar")
    with pytest.raises(InvalidInput, match="bundle.tar: not a bundle"):
        verify_bundle(not_tar)
    traversal = tmp_path / "evil.tar"
    with tarfile.open(traversal, "w") as tar:
        info = tarfile.TarInfo("../evil")
        info.size = 0
        tar.addfile(info, io.BytesIO(b""))
    with pytest.raises(CorruptObject, match=r"evil.tar: ../evil: not a plain file inside it"):
        verify_bundle(traversal)
    unreachable = parse_manifest(good.replace(site, "http://127.0.0.1:9"))
    with pytest.raises(InvalidInput, match="artifact 'k3s': cannot fetch http://127.0.0.1:9/"):
        build_bundle(unreachable, "amd64", tmp_path / "never.tar", partial=True)
    assert not (tmp_path / "never.tar").exists()


# ---- the wheelhouse and the images, through stand-ins for pip and the Docker SDK ------------

MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}


class FakePip:
    """Stands in for the pip subprocess: records each command line and writes the wheels a
    real `pip wheel` / `pip download` would, for the platform the command asks for."""

    def __init__(self, extra: tuple[str, ...] = (), drop: str | None = None) -> None:
        self.calls: list[list[str]] = []
        self.extra = extra
        self.drop = drop

    def __call__(self, argv: list[str]) -> None:
        self.calls.append(argv)
        verb = argv[4]
        if verb == "wheel":
            dest = Path(argv[argv.index("--wheel-dir") + 1])
            dest.mkdir(parents=True, exist_ok=True)
            (dest / "appliance-0.1.0-py3-none-any.whl").write_bytes(b"PK appliance")
            return
        assert verb == "download"
        dest = Path(argv[argv.index("--dest") + 1])
        platform = argv[argv.index("--platform") + 1]
        machine = "aarch64" if platform.endswith("aarch64") else "x86_64"
        wheels = [
            f"torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_{machine}.whl",
            f"duckdb_extension_httpfs-1.5.5-py3-none-manylinux_2_17_{machine}.whl",
            f"numpy-2.4.6-cp311-cp311-manylinux_2_27_{machine}.manylinux_2_28_{machine}.whl",
            "click-8.4.0-py3-none-any.whl",
            *self.extra,
        ]
        for name in wheels:
            if self.drop is None or not name.startswith(self.drop):
                (dest / name).write_bytes(f"PK {name}".encode())


class FakeImage:
    def __init__(self, tags: list[str], arch: str, data: bytes, digest: str = "") -> None:
        self.tags = tags
        self.data = data
        self.saved: list[Any] = []
        self.attrs = {
            "Architecture": arch,
            "RepoDigests": [f"{tags[0].rpartition(':')[0]}@{digest}"] if digest else [],
        }

    def save(self, chunk_size: int = 2 << 20, named: Any = False) -> Iterator[bytes]:
        assert named is True or named in self.tags, named
        self.saved.append(named)
        for i in range(0, len(self.data), 7):  # several chunks, as the SDK streams them
            yield self.data[i : i + 7]

    def tag(self, repository: str, tag: str | None = None) -> bool:
        self.tags.append(f"{repository}:{tag}")
        return True


class FakeImages:
    def __init__(self, build_error: Exception | None = None) -> None:
        self.build_error = build_error
        self.builds: list[dict[str, Any]] = []
        self.pulls: list[tuple[str, dict[str, Any]]] = []
        self.store: dict[str, FakeImage] = {}

    def build(self, **kwargs: Any) -> tuple[FakeImage, Iterator[dict[str, str]]]:
        context = Path(kwargs["path"])
        kwargs["context_files"] = sorted(
            str(p.relative_to(context)) for p in context.rglob("*") if p.is_file()
        )
        kwargs["dockerfile_text"] = (context / kwargs["dockerfile"]).read_text()
        self.builds.append(kwargs)
        if self.build_error is not None:
            raise self.build_error
        arch = kwargs["platform"].split("/")[1]
        image = FakeImage([kwargs["tag"]], arch, f"runtime image {arch}".encode() * 9)
        self.store[kwargs["tag"]] = image
        return image, iter([])

    def pull(self, repository: str, tag: str | None = None, **kwargs: Any) -> FakeImage:
        self.pulls.append((repository if tag is None else f"{repository}:{tag}", kwargs))
        arch = kwargs["platform"].split("/")[1]
        ref = f"{repository}:{tag}"
        image = FakeImage([ref], arch, f"device plugin {arch}".encode() * 5, "sha256:" + "ab" * 32)
        self.store[ref] = image
        return image

    def get(self, name: str) -> FakeImage:
        return self.store[name]


class FakeDocker:
    def __init__(self, build_error: Exception | None = None) -> None:
        self.images = FakeImages(build_error)


def image_manifest(base: str) -> str:
    """The stand-in manifest without its wheel (the wheelhouse brings that) plus an image."""
    return manifest_text(base).rsplit("[[artifact]]", 1)[0] + (
        '\n[[image]]\nname = "nvidia-device-plugin"\nversion = "v0.20.0"\n'
        'ref = "nvcr.io/nvidia/k8s-device-plugin:v0.20.0"\n'
    )


def _members(bundle: Path) -> dict[str, bytes]:
    with tarfile.open(bundle) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> tuple[FakePip, FakeDocker]:
    """The CLI's pip and Docker boundaries replaced by the stand-ins."""
    pip, docker = FakePip(), FakeDocker()
    monkeypatch.setattr(bundles, "_run_pip", pip)
    monkeypatch.setattr(bundles, "docker_from_env", lambda: docker)
    return pip, docker


def _build(cli: Any, home: Path, manifest: Path, out: Path, *extra: str) -> Any:
    return cli(
        "bundle",
        "build",
        "--arch",
        extra[0] if extra else "amd64",
        "--out",
        str(out),
        "--manifest",
        str(manifest),
        "--project",
        str(ROOT),
        "--dockerfile",
        str(ROOT / "bundles" / "Dockerfile"),
        *extra[1:],
        "--json",
        "--home",
        str(home),
    )


def test_the_bundle_carries_the_wheelhouse_and_the_images_and_verifies(
    site: str, tmp_path: Path, cli: Any, home: Path, fakes: tuple[FakePip, FakeDocker]
) -> None:
    pip, docker = fakes
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(image_manifest(site))
    out = tmp_path / "appliance-bundle-amd64.tar"
    result = _build(cli, home, manifest, out)
    assert result.code == 0, result.err
    summary = result.json()
    assert summary["wheels"] == 5 and summary["artifacts"] == 5 + 5 + 2
    assert summary["images"] == [
        "nvcr.io/nvidia/k8s-device-plugin:v0.20.0@sha256:" + "ab" * 32,
        "appliance-runtime:0.1.0",
    ]
    assert summary["unpinned_images"] == ["nvidia-device-plugin"]
    assert "image nvidia-device-plugin is pinned by tag only" in result.err
    for step in ("[6/8] wheelhouse (amd64", "[7/8] image nvcr.io", "[8/8] image appliance-runtime"):
        assert step in result.err

    # pip: the project's own wheel, then its dependencies as binary wheels for the target
    wheel, download = pip.calls
    assert wheel[4:7] == ["wheel", "--no-deps", "--wheel-dir"] and wheel[-1] == str(ROOT)
    assert download[4] == "download" and "--only-binary=:all:" in download
    assert download[download.index("--python-version") + 1] == "3.11"
    assert download[download.index("--constraint") + 1] == str(ROOT / "constraints.txt")
    platforms = [download[i + 1] for i, a in enumerate(download) if a == "--platform"]
    assert "manylinux_2_28_x86_64" in platforms and "manylinux2014_x86_64" in platforms
    assert not [p for p in platforms if "aarch64" in p]
    assert download[download.index("--extra-index-url") + 1] == bundles.TORCH_CPU_INDEX
    assert download[-1].endswith("appliance-0.1.0-py3-none-any.whl")

    # Docker: the device plugin pulled for the target platform, the runtime image built from a
    # context holding only the Dockerfile and the wheelhouse
    assert docker.images.pulls == [
        ("nvcr.io/nvidia/k8s-device-plugin:v0.20.0", {"platform": "linux/amd64"})
    ]
    (build,) = docker.images.builds
    assert build["tag"] == runtime_tag() == "appliance-runtime:0.1.0"
    assert build["platform"] == "linux/amd64" and build["dockerfile"] == "Dockerfile"
    assert build["buildargs"] == {"APPLIANCE_VERSION": "0.1.0"}
    assert build["dockerfile_text"] == (ROOT / "bundles" / "Dockerfile").read_text()
    assert build["context_files"][0] == "Dockerfile"
    assert {f.removeprefix("wheels/") for f in build["context_files"][1:]} == {
        "appliance-0.1.0-py3-none-any.whl",
        "click-8.4.0-py3-none-any.whl",
        "duckdb_extension_httpfs-1.5.5-py3-none-manylinux_2_17_x86_64.whl",
        "numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl",
        "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
    }
    runtime = docker.images.store["appliance-runtime:0.1.0"]
    assert runtime.saved == ["appliance-runtime:0.1.0"]  # saved under its tag: k3s imports it

    # the bundle: every file it made is listed with the sha256 of its bytes, and verifies
    members = _members(out)
    assert members["images/appliance-runtime-amd64.tar"] == runtime.data
    plugin = docker.images.store["nvcr.io/nvidia/k8s-device-plugin:v0.20.0"]
    assert members["images/nvidia-device-plugin-amd64.tar"] == plugin.data
    assert members["wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"] == (
        b"PK torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    )
    entries = {e["path"]: e for e in tomllib.loads(members["manifest.toml"].decode())["artifact"]}
    assert set(entries) | {"manifest.toml"} == set(members)
    for path, entry in entries.items():
        assert entry["sha256"] == hashlib.sha256(members[path]).hexdigest(), path
    assert entries["images/appliance-runtime-amd64.tar"] == {
        "name": "appliance-runtime",
        "version": "0.1.0",
        "arch": "amd64",
        "url": "docker:appliance-runtime:0.1.0",
        "sha256": hashlib.sha256(runtime.data).hexdigest(),
        "path": "images/appliance-runtime-amd64.tar",
        "kind": "image",
    }
    httpfs = entries["wheels/duckdb_extension_httpfs-1.5.5-py3-none-manylinux_2_17_x86_64.whl"]
    assert httpfs["kind"] == "wheel" and httpfs["arch"] == "amd64"
    assert httpfs["url"] == "pip:duckdb_extension_httpfs==1.5.5"
    assert entries["wheels/click-8.4.0-py3-none-any.whl"]["arch"] == "any"
    verified = cli("bundle", "verify", str(out), "--arch", "amd64", "--json", "--home", str(home))
    assert verified.code == 0, verified.err
    assert verified.json()["installable"] is True and verified.json()["missing"] == []
    assert "partial" not in verified.err
    assert verified.json()["kinds"] == {
        "binary": 3,
        "images": 1,
        "script": 1,
        "wheel": 5,
        "image": 2,
    }

    # a changed byte in a saved image or a wheel is named
    for path in ("images/appliance-runtime-amd64.tar", "wheels/click-8.4.0-py3-none-any.whl"):
        changed = tmp_path / "changed.tar"
        _rewrite(out, changed, lambda n, d, p=path: d + b"X" if n == p else d)
        with pytest.raises(CorruptObject, match=re.escape(f"changed.tar: {path} (")):
            verify_bundle(changed)


def test_an_arm64_bundle_builds_and_pulls_for_linux_arm64(
    site: str, tmp_path: Path, cli: Any, home: Path, fakes: tuple[FakePip, FakeDocker]
) -> None:
    pip, docker = fakes
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(image_manifest(site))
    out = tmp_path / "appliance-bundle-arm64.tar"
    result = _build(cli, home, manifest, out, "arm64")
    assert result.code == 0, result.err
    assert docker.images.builds[0]["platform"] == "linux/arm64"
    assert docker.images.pulls[0][1] == {"platform": "linux/arm64"}
    platforms = {pip.calls[1][i + 1] for i, a in enumerate(pip.calls[1]) if a == "--platform"}
    assert platforms and all(p.endswith("_aarch64") for p in platforms)
    names = set(_members(out))
    assert {"images/appliance-runtime-arm64.tar", "images/nvidia-device-plugin-arm64.tar"} < names
    assert "bin/k3s" in names and "images/k3s-airgap-images-amd64.tar.zst" not in names
    assert verify_bundle(out, "arm64")["arch"] == "arm64"


def test_a_pinned_digest_is_pulled_by_digest_and_saved_under_its_tag(tmp_path: Path) -> None:
    docker = FakeDocker()
    digest = "sha256:" + "cd" * 32
    pulled: list[str] = []
    image = FakeImage([], "amd64", b"plugin by digest")
    docker.images.pull = lambda repository, tag=None, **kw: (pulled.append(repository), image)[1]  # type: ignore[method-assign]
    docker.images.get = lambda name: image  # type: ignore[method-assign]
    spec = {"name": "nvidia-device-plugin", "version": "v0.20.0", "digest": digest}
    spec["ref"] = "nvcr.io/nvidia/k8s-device-plugin:v0.20.0"
    got, reference = bundles.pull_image(docker, spec, "amd64")
    assert pulled == [f"nvcr.io/nvidia/k8s-device-plugin@{digest}"]
    assert got.tags == ["nvcr.io/nvidia/k8s-device-plugin:v0.20.0"]
    assert reference == f"nvcr.io/nvidia/k8s-device-plugin:v0.20.0@{digest}"
    # an image of the wrong architecture (no emulation on the build machine) is refused
    image.attrs["Architecture"] = "arm64"
    with pytest.raises(BuildToolError, match="linux/arm64, the bundle is for linux/amd64"):
        bundles.pull_image(docker, spec, "amd64")


def _no_leftovers(tmp_path: Path, out: Path) -> None:
    assert not out.exists()
    assert not list(tmp_path.glob(f".{out.name}.*"))


def test_without_the_docker_sdk_the_build_says_how_to_install_it(
    site: str, tmp_path: Path, cli: Any, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pip = FakePip()
    monkeypatch.setattr(bundles, "_run_pip", pip)
    monkeypatch.setitem(sys.modules, "docker", None)  # `import docker` raises ImportError
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(image_manifest(site))
    out = tmp_path / "bundle.tar"
    result = _build(cli, home, manifest, out)
    assert result.code == 1
    assert "needs the docker SDK: pip install 'appliance[bundle]'" in result.err
    assert "--no-image" in result.err
    assert pip.calls == []  # it fails before downloading anything
    _no_leftovers(tmp_path, out)
    # without Docker steps the same build needs no SDK
    result = _build(cli, home, manifest, out, "amd64", "--no-image")
    assert result.code == 0, result.err
    assert result.json()["images"] == [] and result.json()["wheels"] == 5


def test_an_unreachable_daemon_or_a_failed_build_is_named_and_leaves_nothing(
    site: str, tmp_path: Path, cli: Any, home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import docker

    def unreachable(**kwargs: Any) -> Any:
        raise docker.errors.DockerException(
            "Error while fetching server API version: ('Connection aborted.', "
            "FileNotFoundError(2, 'No such file or directory'))"
        )

    monkeypatch.setattr(docker, "from_env", unreachable)
    monkeypatch.setattr(bundles, "_run_pip", FakePip())
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(image_manifest(site))
    out = tmp_path / "bundle.tar"
    result = _build(cli, home, manifest, out)
    assert result.code == 1
    assert "cannot reach the Docker daemon (Error while fetching server API version" in result.err
    _no_leftovers(tmp_path, out)

    failing = FakeDocker(
        docker.errors.BuildError(
            "The command '/bin/sh -c python -m venv /opt/appliance' returned a non-zero code: 1",
            iter([{"stream": "Step 4/14 : RUN python -m venv /opt/appliance"}]),
        )
    )
    monkeypatch.setattr(bundles, "docker_from_env", lambda: failing)
    result = _build(cli, home, manifest, out)
    assert result.code == 1
    assert "image appliance-runtime:0.1.0: the build failed: The command" in result.err
    assert "last steps: Step 4/14" in result.err
    _no_leftovers(tmp_path, out)


def test_a_wheelhouse_that_would_not_install_is_refused_naming_the_wheel(
    site: str, tmp_path: Path
) -> None:
    manifest = parse_manifest(image_manifest(site))
    out = tmp_path / "bundle.tar"
    cases = [
        (FakePip(extra=("orjson-3.13.0-cp312-cp312-manylinux_2_17_x86_64.whl",)), "cp312"),
        (FakePip(extra=("uvloop-0.23.0-cp311-cp311-macosx_11_0_arm64.whl",)), "macosx"),
        (FakePip(extra=("pyyaml-6.0.4.tar.gz",)), "pyyaml-6.0.4.tar.gz is not a wheel"),
        (FakePip(drop="duckdb_extension_httpfs"), "no wheel for duckdb_extension_httpfs"),
    ]
    for pip, needle in cases:
        with pytest.raises(InvalidInput, match=needle):
            build_bundle(manifest, "amd64", out, project=ROOT, run_pip=pip, images=False)
        _no_leftovers(tmp_path, out)
    # a wheel the manifest already carries cannot come from the wheelhouse too
    with pytest.raises(InvalidInput, match="wheels/appliance-0.1.0-py3-none-any.whl is already"):
        build_bundle(
            parse_manifest(manifest_text(site)),
            "amd64",
            out,
            project=ROOT,
            run_pip=FakePip(),
            images=False,
        )
    _no_leftovers(tmp_path, out)
    with pytest.raises(InvalidInput, match="installs only from the wheelhouse"):
        build_bundle(
            manifest, "amd64", out, dockerfile=ROOT / "bundles" / "Dockerfile", images=False
        )
    with pytest.raises(InvalidInput, match="no pyproject.toml"):
        build_bundle(manifest, "amd64", out, project=tmp_path, images=False)

    # the real pip boundary: a failing command is named with pip's last lines
    def fails(argv: list[str]) -> None:
        bundles._run_pip([sys.executable, "-m", "pip", "--disable-pip-version-check", "nope"])

    with pytest.raises(BuildToolError, match=r"wheelhouse: pip nope failed \(exit \d+\): .*nope"):
        build_bundle(manifest, "amd64", out, project=ROOT, run_pip=fails, images=False)
    _no_leftovers(tmp_path, out)


def test_images_in_the_manifest_are_checked(site: str) -> None:
    good = image_manifest(site)
    cases = [
        (good.replace(':v0.20.0"', '@sha256:00"'), "must be REPOSITORY:TAG"),
        (good + 'digest = "sha256:123"\n', "digest must be sha256:"),
        (good.replace('name = "nvidia-device-plugin"', 'name = "Plugin"'), "lowercase"),
        (good + 'colour = "green"\n', r"image 'nvidia-device-plugin': unknown key"),
        (
            good.replace(
                'path = "bin/install-k3s.sh"', 'path = "images/nvidia-device-plugin-amd64.tar"'
            ),
            "already used for amd64",
        ),
        (good.replace('url = "http', 'url = "docker:', 1), "url must be https://"),
    ]
    for text, needle in cases:
        with pytest.raises(InvalidInput, match=needle):
            parse_manifest(text)
    # docker:/pip: urls describe what a build made; a source manifest cannot fetch them
    wheel_url = f'url = "{site}/appliance-0.1.0-py3-none-any.whl"'
    made = parse_manifest(manifest_text(site).replace(wheel_url, 'url = "pip:appliance==0.1.0"'))
    with pytest.raises(InvalidInput, match="is made by a build, not fetched"):
        build_bundle(made, "amd64", Path("never.tar"))


# ---- a bundle install.sh can use: complete, normal member names, readable -------------------


def _without(text: str, *names: str) -> str:
    """A manifest's text with every `[[artifact]]` of these names dropped."""
    kept = [
        part
        for part in text.split("[[artifact]]")
        if not any(f'\nname = "{name}"\n' in part for name in names)
    ]
    return "[[artifact]]".join(kept)


def test_a_build_that_would_lack_what_install_sh_needs_is_refused_before_any_download(
    site: str, tmp_path: Path, cli: Any, home: Path, fakes: tuple[FakePip, FakeDocker]
) -> None:
    pip, docker = fakes
    out = tmp_path / "bundle.tar"
    # the repository's manifest without its MinIO and mc pins: no bundle is built from it
    pinned = tmp_path / "unpinned.toml"
    tables = re.split(r"\n(?=\[\[)", (ROOT / "bundles" / "manifest.toml").read_text())
    drop = ('name = "minio"', 'name = "mc"')
    pinned.write_text("\n".join(t for t in tables if not any(d in t for d in drop)))
    for flags in ((), ("--no-image",), ("--no-wheels", "--no-image")):
        result = _build(cli, home, pinned, out, "amd64", *flags)
        assert result.code == 2, result.err
        assert "the bundle for amd64 would lack minio, mc, and install.sh refuses" in result.err
        assert (
            'pin minio, mc for amd64 in the manifest first (bundles/README.md, "To pin on a '
            'connected machine")' in result.err
        )
        assert "[1/" not in result.err  # no step ran
        assert pip.calls == [] and docker.images.pulls == [] and docker.images.builds == []
        _no_leftovers(tmp_path, out)
    fetched: list[str] = []

    def fetch(url: str) -> Any:
        fetched.append(url)
        raise AssertionError("nothing is fetched")

    def no_docker() -> Any:
        raise AssertionError("Docker is not reached")

    with pytest.raises(InvalidInput, match="would lack minio, mc, and") as refused:
        build_bundle(
            load_manifest(pinned),
            "arm64",
            out,
            fetch,
            project=ROOT,
            run_pip=pip,
            dockerfile=ROOT / "bundles" / "Dockerfile",
            docker_client=no_docker,
        )
    assert "To pin on a connected machine" in refused.value.message
    assert fetched == [] and pip.calls == []
    _no_leftovers(tmp_path, out)

    # a stand-in manifest: what --no-image / --no-wheels leave out may be missing, nothing else
    manifest = tmp_path / "manifest.toml"
    manifest.write_text(_without(image_manifest(site), "mc"))
    result = _build(cli, home, manifest, out, "amd64", "--no-image")
    assert result.code == 2 and "would lack mc, and" in result.err, result.err
    no_plugin = manifest_text(site).rsplit("[[artifact]]", 1)[0]  # no [[image]], no wheel
    manifest.write_text(no_plugin)
    result = _build(cli, home, manifest, out)
    assert result.code == 2
    assert "would lack nvidia-device-plugin (GPU nodes), and install.sh refuses" in result.err
    assert "add an [[image]] named nvidia-device-plugin" in result.err
    assert "or leave the images out on purpose (--no-image)" in result.err
    assert pip.calls == [] and docker.images.builds == []
    _no_leftovers(tmp_path, out)
    result = _build(cli, home, manifest, out, "amd64", "--no-image")
    assert result.code == 0, result.err
    assert result.json()["missing"] == ["nvidia-device-plugin", "appliance-runtime"]
    assert "warning: a partial bundle: it lacks nvidia-device-plugin, appliance-runtime" in (
        result.err
    )
    out.unlink()
    manifest.write_text(_without(no_plugin, "k3s-airgap-images"))
    result = _build(cli, home, manifest, out, "amd64", "--no-wheels", "--no-image")
    assert result.code == 2 and "would lack k3s-airgap-images, and" in result.err
    # through the API, a deliberately partial bundle (a stand-in, a test) is still possible
    made = build_bundle(
        parse_manifest(_without(manifest.read_text(), "k3s")), "amd64", out, partial=True
    )
    assert made["missing"][:2] == ["k3s", "k3s-airgap-images"]
    assert verify_bundle(out)["installable"] is False
    with pytest.raises(
        InvalidInput, match=r"bundle.tar: not installable: it lacks k3s, k3s-airgap"
    ):
        verify_bundle(out, complete=True)


def _pack(path: Path, members: list[tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_member_names_not_in_normal_form_are_refused_naming_them(
    site: str, tmp_path: Path, cli: Any, home: Path
) -> None:
    good = tmp_path / "good.tar"
    build_bundle(parse_manifest(manifest_text(site)), "amd64", good, images=False)
    assert verify_bundle(good, "amd64")["verified"] is True
    # what `tar -cf b.tar -C dir ./...` makes: install.sh would look up `manifest.toml`
    with tarfile.open(good) as src:
        members = [(m.name, src.extractfile(m).read()) for m in src]  # type: ignore[union-attr]
    dotted = _pack(tmp_path / "dotted.tar", [("./" + n, d) for n, d in members])
    result = cli("bundle", "verify", str(dotted), "--partial", "--home", str(home))
    assert result.code == 5
    assert (
        "dotted.tar: ./bin/k3s: a member name not in normal form (install.sh looks it up "
        "as bin/k3s)" in result.err
    )
    for name, normal in [
        ("bin//k3s", "bin/k3s"),
        ("bin/./k3s", "bin/k3s"),
        ("bin/k3s/", "bin/k3s"),
        ("./manifest.toml", "manifest.toml"),
    ]:
        bad = _pack(tmp_path / "bad.tar", [(name if n == normal else n, d) for n, d in members])
        with pytest.raises(CorruptObject, match=re.escape(f"bad.tar: {name}: a member name not")):
            verify_bundle(bad)
    # the manifest cannot ask for such a path either
    text = manifest_text(site)
    for path in ("./bin/k3s", "bin//k3s", "bin/k3s/", "bin/./k3s"):
        with pytest.raises(InvalidInput, match="not in normal form \\(write 'bin/k3s'\\)"):
            parse_manifest(text.replace('path = "bin/k3s"', f'path = "{path}"', 1))
    with pytest.raises(InvalidInput, match="must stay inside the bundle"):
        parse_manifest(text.replace('path = "bin/k3s"', 'path = "."', 1))


def test_a_truncated_bundle_or_an_undecodable_manifest_is_named(
    site: str, tmp_path: Path, cli: Any, home: Path
) -> None:
    good = tmp_path / "good.tar"
    build_bundle(parse_manifest(manifest_text(site)), "amd64", good, images=False)
    data = good.read_bytes()
    with tarfile.open(good) as tar:
        last = tar.getmembers()[-1]  # the manifest: the build writes it last
        first = tar.getmembers()[0]
    assert last.name == "manifest.toml"
    cases = [
        ("inside.tar", data[: last.offset_data + 5], "inside manifest.toml"),
        ("early.tar", data[: first.offset_data + 3], f"inside {first.name}"),
    ]
    for name, cut, where in cases:
        (tmp_path / name).write_bytes(cut)
        result = cli("bundle", "verify", str(tmp_path / name), "--home", str(home))
        assert result.code == 5, result.err
        assert f"error: {name}: truncated or damaged {where}: " in result.err
        assert "unexpected ReadError" not in result.err
        with pytest.raises(CorruptObject, match=f"{name}: truncated or damaged {where}"):
            verify_bundle(tmp_path / name)
    undecodable = _pack(tmp_path / "latin.tar", [("manifest.toml", b'[bundle]\nname = "\xe9"\n')])
    result = cli("bundle", "verify", str(undecodable), "--home", str(home))
    assert result.code == 2
    assert "error: latin.tar:manifest.toml: not UTF-8 text (invalid continuation byte" in (
        result.err
    )
    # a compressed tar that ends early is named the same way
    import gzip

    packed = gzip.compress(data)
    (tmp_path / "b.tar.gz").write_bytes(packed[: len(packed) // 2])
    with pytest.raises(CorruptObject, match="b.tar.gz: truncated or damaged inside "):
        verify_bundle(tmp_path / "b.tar.gz")


def test_the_core_does_not_import_the_docker_sdk() -> None:
    script = "import sys, appliance.core.bundles\nprint('docker' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.stdout.strip() == "False", done.stderr


# ---- the Dockerfile, the pinned manifest, the cluster scripts (statically) ---------------------


def _dockerfile() -> list[str]:
    """The Dockerfile's instructions, continuation lines joined, comments dropped."""
    text = (ROOT / "bundles" / "Dockerfile").read_text()
    text = re.sub(r"\\\n\s*", " ", text)
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_the_runtime_image_installs_only_from_the_wheelhouse_and_runs_the_job_body() -> None:
    from appliance.config import K3sSettings
    from appliance.core.jobs import JobSpec
    from appliance.core.k3s_jobs import RUNTIME_IMAGE, job_manifest

    lines = _dockerfile()
    assert "ARG PYTHON_IMAGE=python:3.11-slim-bookworm" in lines
    froms = [line for line in lines if line.startswith("FROM ")]
    assert froms and all(line.split()[1] == "${PYTHON_IMAGE}" for line in froms)
    installs = [line for line in lines if "pip install" in line]
    assert len(installs) == 1
    assert "--no-index --find-links /wheels" in installs[0]
    assert "COPY wheels/ /wheels/" in lines
    # the final stage: the venv from the install stage, a non-root user, the job body
    final = lines[max(i for i, line in enumerate(lines) if line.startswith("FROM ")) :]
    assert not any(line.startswith("COPY wheels") for line in final)
    user = [line for line in final if line.startswith("USER ")]
    assert user == ["USER 10001:10001"] and "useradd --system --uid 10001" in "\n".join(final)
    assert "WORKDIR /var/lib/appliance" in final
    env = next(line for line in final if line.startswith("ENV "))
    assert "APPLIANCE_HOME=/var/lib/appliance" in env and "PYTHONUNBUFFERED=1" in env
    cmd = [line for line in final if line.startswith("CMD ")]
    assert len(cmd) == 1
    spec = JobSpec(kind="train-lightgbm", params={"label": "churned"})
    pod = job_manifest("abc123", spec, _settings())["spec"]["template"]["spec"]
    assert json.loads(cmd[0][4:]) == pod["containers"][0]["command"]
    assert pod["containers"][0]["image"] == RUNTIME_IMAGE == runtime_tag()
    assert K3sSettings().image == runtime_tag()


def _settings() -> Any:
    from appliance.config import Settings

    return Settings(home=Path("unused"))


def test_the_pinned_manifest_cites_a_source_for_every_checksum() -> None:
    path = ROOT / "bundles" / "manifest.toml"
    manifest = load_manifest(path)
    assert manifest["bundle"] == {"name": "appliance", "version": "0.1.0"}
    text = path.read_text()
    blocks = text.split("[[artifact]]")[1:]
    comments = text.split("[[artifact]]")[:-1]
    assert len(blocks) == len(manifest["artifacts"]) >= 1
    for comment, entry in zip(comments, manifest["artifacts"], strict=True):
        # the comment just above the entry names the repository and file the value comes from
        above = comment.strip().splitlines()[-3:]
        assert any(line.startswith("# source: ") for line in above), entry
        assert entry["url"].startswith("https://") and entry["version"] in entry["url"].replace(
            "%2B", "+"
        )
    # one k3s release for the binary and its images (the install script is release-independent)
    k3s = {a["version"] for a in manifest["artifacts"] if a["name"] in ("k3s", "k3s-airgap-images")}
    assert len(k3s) == 1
    assert {a["name"] for a in manifest["artifacts"]} >= {"k3s", "k3s-airgap-images", "k3s-install"}
    (plugin,) = manifest["images"]
    assert plugin["ref"].endswith(":" + plugin["version"])


def test_the_smoke_script_checks_what_it_should() -> None:
    # shellcheck runs over every provisioning script in tests/test_install.py
    script = ROOT / "provisioning" / "smoke.sh"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n") and "set -euo pipefail" in text
    for needle in ("cluster status", "quickstart", "get job", "-n appliance", "models"):
        assert needle in text, needle


def test_the_vagrantfile_provisions_a_server_and_an_agent_from_the_bundle() -> None:
    text = (ROOT / "Vagrantfile").read_text()
    for needle in (
        'define "server"',
        'define "agent"',
        'provider "libvirt"',
        'provider "virtualbox"',
        'type: "rsync"',
        "./install.sh --server --bundle",
        "--advertise-address",
        "./install.sh --agent --server",
        "--token-file",
        "/var/lib/rancher/k3s/server/node-token",
        "provisioning/smoke.sh",
    ):
        assert needle in text, needle
    ruby = shutil.which("ruby")
    if ruby is not None:
        done = subprocess.run([ruby, "-c", str(ROOT / "Vagrantfile")], capture_output=True)
        assert done.returncode == 0, done.stderr
