"""The cluster as the appliance sees it: nodes, their readiness and GPUs, the k3s version, the
object store's health, and how to join another node. Read through `core/kube.py` only.
"""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

from appliance.config import Settings
from appliance.core.kube import ClusterUnavailable, Kube
from appliance.errors import InvalidInput

GPU = "nvidia.com/gpu"
NODE_TOKEN = Path("/var/lib/rancher/k3s/server/node-token")
API_PORT = 6443


def _memory_bytes(text: str | None) -> int | None:
    """A node's memory quantity (`32596084Ki`) in bytes, read as a job's request is."""
    from appliance.core.jobs import parse_memory

    try:
        return parse_memory(text) if text else None
    except InvalidInput:  # a quantity this reader does not know: shown as unknown
        return None


def _cpu(text: str | None) -> float | None:
    if not text:
        return None
    return int(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _ready(node: dict[str, Any]) -> bool:
    conditions = node.get("status", {}).get("conditions") or []
    return any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)


def _roles(node: dict[str, Any]) -> list[str]:
    prefix = "node-role.kubernetes.io/"
    labels = node.get("metadata", {}).get("labels") or {}
    roles = sorted(k[len(prefix) :] for k in labels if k.startswith(prefix))
    return roles or ["agent"]  # k3s labels servers only; an unlabelled node is an agent


def _address(node: dict[str, Any]) -> str | None:
    for address in node.get("status", {}).get("addresses") or []:
        if address.get("type") == "InternalIP":
            return str(address.get("address"))
    return None


def list_nodes(kube: Kube | None = None) -> list[dict[str, Any]]:
    """Every node: roles, readiness, k3s version, address, architecture, allocatable cpu,
    memory and GPUs."""
    kube = kube or Kube.from_environment()
    out = []
    for node in kube.get("nodes").get("items", []):
        status = node.get("status", {})
        info = status.get("nodeInfo", {})
        allocatable = status.get("allocatable", {})
        out.append(
            {
                "name": node.get("metadata", {}).get("name"),
                "roles": ",".join(_roles(node)),
                "ready": _ready(node),
                "version": info.get("kubeletVersion"),
                "address": _address(node),
                "arch": info.get("architecture"),
                "cpu": _cpu(allocatable.get("cpu")),
                "memory_bytes": _memory_bytes(allocatable.get("memory")),
                "gpus": int(allocatable.get(GPU, 0) or 0),
            }
        )
    return out


def list_gpus(kube: Kube | None = None) -> list[dict[str, Any]]:
    """GPUs per node: what the device plugin advertises, and what running pods hold."""
    kube = kube or Kube.from_environment()
    nodes = kube.get("nodes").get("items", [])
    used: dict[str, int] = {}
    for pod in kube.get("pods", "--all-namespaces").get("items", []):
        if pod.get("status", {}).get("phase") not in ("Pending", "Running"):
            continue
        node = pod.get("spec", {}).get("nodeName")
        containers = pod.get("spec", {}).get("containers") or []
        held = sum(
            int(((c.get("resources") or {}).get("limits") or {}).get(GPU, 0)) for c in containers
        )
        if node and held:
            used[node] = used.get(node, 0) + held
    out = []
    for node in nodes:
        name = node.get("metadata", {}).get("name")
        status = node.get("status", {})
        allocatable = int(status.get("allocatable", {}).get(GPU, 0) or 0)
        out.append(
            {
                "node": name,
                "capacity": int(status.get("capacity", {}).get(GPU, 0) or 0),
                "allocatable": allocatable,
                "in_use": used.get(name, 0),
                "free": max(0, allocatable - used.get(name, 0)),
            }
        )
    return out


def object_store_health(settings: Settings, timeout: float = 2.0) -> str:
    """MinIO's readiness endpoint (`/minio/health/ready`) when the store is S3."""
    import urllib.error
    import urllib.request

    if settings.store != "s3":
        return "not used (local object store)"
    scheme = "https" if settings.s3.secure else "http"
    url = f"{scheme}://{settings.s3.endpoint}/minio/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:  # noqa: S310 (configured)
            return "ready" if response.status == 200 else f"not ready (HTTP {response.status})"
    except urllib.error.HTTPError as exc:
        return f"not ready (HTTP {exc.code})"
    except OSError as exc:
        return f"unreachable at {settings.s3.endpoint}: {getattr(exc, 'reason', exc)}"


def cluster_status(settings: Settings, kube: Kube | None = None) -> dict[str, Any]:
    """One line per fact: k3s version, nodes ready of total, GPUs allocatable and free, the
    object store's health."""
    kube = kube or Kube.for_settings(settings)
    version = kube.version().get("serverVersion", {}).get("gitVersion")
    nodes = list_nodes(kube)
    gpus = list_gpus(kube)
    return {
        "k3s_version": version,
        "nodes": len(nodes),
        "nodes_ready": sum(n["ready"] for n in nodes),
        "not_ready": ",".join(n["name"] for n in nodes if not n["ready"]),
        "gpus_allocatable": sum(g["allocatable"] for g in gpus),
        "gpus_free": sum(g["free"] for g in gpus),
        "object_store": object_store_health(settings),
    }


def join_command(
    kube: Kube | None = None,
    server_url: str | None = None,
    token_file: Path = NODE_TOKEN,
    show_token: bool = False,
    bundle: str | None = None,
) -> dict[str, Any]:
    """How an edge node joins this server: the server's URL (its first control-plane node's
    address, unless given), and the install command that reads the token from a file, so
    the secret never lands in a shell history; with `bundle` (the offline bundle's file on
    the new node) the command installs from it. Every part the user gave is shell-quoted.
    The token itself only with `show_token`."""
    if bundle is not None and not bundle.strip():
        raise InvalidInput("--bundle: give the bundle's file name on the new node")
    try:
        token = token_file.read_text().strip()
    except PermissionError as exc:
        raise ClusterUnavailable(
            f"{token_file}: the join token is readable by root only; run "
            "`sudo appliance cluster join-command`"
        ) from exc
    except FileNotFoundError as exc:
        raise ClusterUnavailable(
            f"{token_file}: no join token here; run this on the k3s server "
            "(`sudo ./install.sh --server` makes one)"
        ) from exc
    if not token:
        raise ClusterUnavailable(f"{token_file}: the join token is empty")
    if server_url is None:
        servers = [
            n for n in list_nodes(kube) if "control-plane" in n["roles"].split(",") and n["address"]
        ]
        if not servers:
            raise ClusterUnavailable("no control-plane node with an address; give --server-url")
        server_url = f"https://{servers[0]['address']}:{API_PORT}"
    argv = ["sudo", "./install.sh", "--agent", "--server", server_url]
    argv += ["--token-file", "./node-token"]
    joined = {
        "server": server_url,
        "token_file": str(token_file),
        "copy_token": f"copy {token_file} to the new node as ./node-token (mode 0600)",
    }
    if bundle is not None:
        argv += ["--bundle", bundle]
        joined["copy_bundle"] = f"copy the offline bundle to the new node as {bundle}"
    joined["command"] = " ".join(shlex.quote(part) for part in argv)
    return {**joined, **({"token": token} if show_token else {})}
