"""Offline bundles built from a local HTTP server serving small stand-in files: a correct
build verifies; a changed byte, a missing file, an unlisted file, a bundle for the other
architecture and a wrong manifest entry each fail, naming the file."""

from __future__ import annotations

import hashlib
import io
import tarfile
import threading
from collections.abc import Iterator
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.core.bundles import build_bundle, load_manifest, parse_manifest, verify_bundle
from appliance.errors import CorruptObject, InvalidInput

FILES = {
    "k3s-amd64": b"#!/bin/sh\necho k3s amd64\n",
    "k3s-arm64": b"#!/bin/sh\necho k3s arm64\n",
    "k3s-airgap-images-amd64.tar.zst": b"\x28\xb5\x2f\xfd" + b"images" * 100,
    "install-k3s.sh": b"#!/bin/sh\necho install\n",
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
        ("k3s-install", "v1.31.4+k3s1", "any", "install-k3s.sh", "bin/install-k3s.sh", "script"),
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
        "--json",
        "--home",
        str(home),
    )
    assert result.code == 0, result.err
    assert result.json() == {"bundle": str(out), "arch": "amd64", "artifacts": 4}
    assert "[4/4] appliance" in result.err  # progress per artifact
    with tarfile.open(out) as tar:
        names = sorted(tar.getnames())
        k3s = tar.getmember("bin/k3s")
        assert tar.extractfile(k3s).read() == FILES["k3s-amd64"]  # type: ignore[union-attr]
        assert k3s.mode == 0o755
    assert names == [
        "bin/install-k3s.sh",
        "bin/k3s",
        "images/k3s-airgap-images-amd64.tar.zst",
        "manifest.toml",
        "wheels/appliance-0.1.0-py3-none-any.whl",
    ]
    verified = cli("bundle", "verify", str(out), "--arch", "amd64", "--json", "--home", str(home))
    assert verified.code == 0 and verified.json()["verified"] is True

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
    # the other architecture
    refused = cli("bundle", "verify", str(out), "--arch", "arm64", "--home", str(home))
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
        build_bundle(unreachable, "amd64", tmp_path / "never.tar")
    assert not (tmp_path / "never.tar").exists()
