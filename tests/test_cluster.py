"""Cluster commands against recording fakes of `kubectl` and `k3s` first on PATH: the exact
commands run, what is read from real kubectl output shapes, and every failure named."""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from appliance.config import S3Settings, Settings
from appliance.core import cluster
from appliance.core.kube import ClusterUnavailable, Kube

# Shapes as `kubectl get nodes -o json` prints them on k3s (trimmed to what is read).
NODES = {
    "apiVersion": "v1",
    "kind": "List",
    "items": [
        {
            "metadata": {
                "name": "edge-server",
                "labels": {
                    "kubernetes.io/arch": "amd64",
                    "node-role.kubernetes.io/control-plane": "true",
                    "node-role.kubernetes.io/master": "true",
                },
            },
            "status": {
                "addresses": [
                    {"type": "InternalIP", "address": "10.0.0.5"},
                    {"type": "Hostname", "address": "edge-server"},
                ],
                "allocatable": {"cpu": "8", "memory": "32596084Ki", "nvidia.com/gpu": "2"},
                "capacity": {"cpu": "8", "memory": "32698484Ki", "nvidia.com/gpu": "2"},
                "conditions": [
                    {"type": "MemoryPressure", "status": "False"},
                    {"type": "Ready", "status": "True", "reason": "KubeletReady"},
                ],
                "nodeInfo": {"kubeletVersion": "v1.31.4+k3s1", "architecture": "amd64"},
            },
        },
        {
            "metadata": {"name": "edge-agent", "labels": {"kubernetes.io/arch": "arm64"}},
            "status": {
                "addresses": [{"type": "InternalIP", "address": "10.0.0.7"}],
                "allocatable": {"cpu": "3500m", "memory": "7Gi"},
                "capacity": {"cpu": "4", "memory": "8Gi"},
                "conditions": [
                    {"type": "Ready", "status": "Unknown", "reason": "NodeStatusUnknown"}
                ],
                "nodeInfo": {"kubeletVersion": "v1.31.4+k3s1", "architecture": "arm64"},
            },
        },
    ],
}
PODS = {
    "apiVersion": "v1",
    "kind": "List",
    "items": [
        {
            "spec": {
                "nodeName": "edge-server",
                "containers": [{"resources": {"limits": {"nvidia.com/gpu": "1", "cpu": "2"}}}],
            },
            "status": {"phase": "Running"},
        },
        {  # finished: holds nothing
            "spec": {
                "nodeName": "edge-server",
                "containers": [{"resources": {"limits": {"nvidia.com/gpu": "1"}}}],
            },
            "status": {"phase": "Succeeded"},
        },
        {"spec": {"nodeName": "edge-agent", "containers": [{}]}, "status": {"phase": "Running"}},
    ],
}
VERSION = {
    "clientVersion": {"gitVersion": "v1.31.4+k3s1"},
    "kustomizeVersion": "v5.4.2",
    "serverVersion": {"gitVersion": "v1.31.4+k3s1", "platform": "linux/amd64"},
}

FAKE = """#!{python}
import json, os, sys, time
args = sys.argv[1:]
with open(os.environ["FAKE_KUBE_LOG"], "a") as log:
    log.write(json.dumps([os.path.basename(sys.argv[0]), *args]) + "\\n")
if os.environ.get("FAKE_KUBE_SLEEP"):
    time.sleep(float(os.environ["FAKE_KUBE_SLEEP"]))
if os.environ.get("FAKE_KUBE_FAIL"):
    print("E1126 memcache.go:265] couldn't get current server API group list", file=sys.stderr)
    print(os.environ["FAKE_KUBE_FAIL"], file=sys.stderr)
    sys.exit(1)
answers = json.load(open(os.environ["FAKE_KUBE_ANSWERS"]))
if "version" in args:
    print(json.dumps(answers["version"]))
elif "nodes" in args:
    print(json.dumps(answers["nodes"]))
elif "pods" in args:
    print(os.environ.get("FAKE_KUBE_GARBAGE") or json.dumps(answers["pods"]))
else:
    print("unknown command", file=sys.stderr)
    sys.exit(1)
"""


@pytest.fixture
def fake_kube(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """`kubectl` and `k3s` fakes in an otherwise empty PATH; returns where the calls go."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.jsonl"
    answers = tmp_path / "answers.json"
    answers.write_text(json.dumps({"nodes": NODES, "pods": PODS, "version": VERSION}))
    for name in ("kubectl", "k3s"):
        path = bin_dir / name
        path.write_text(FAKE.format(python=sys.executable))
        path.chmod(0o755)
    kubeconfig = tmp_path / "k3s.yaml"
    kubeconfig.write_text("apiVersion: v1\nkind: Config\n")
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("FAKE_KUBE_LOG", str(log))
    monkeypatch.setenv("FAKE_KUBE_ANSWERS", str(answers))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))

    def calls() -> list[list[str]]:
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    yield {"bin": bin_dir, "calls": calls, "kubeconfig": str(kubeconfig)}


def test_nodes_gpus_and_status_from_kubectl_output(fake_kube: dict[str, Any]) -> None:
    nodes = cluster.list_nodes()
    config = fake_kube["kubeconfig"]
    assert fake_kube["calls"]() == [
        ["kubectl", "--kubeconfig", config, "get", "nodes", "-o", "json"]
    ]
    assert nodes == [
        {
            "name": "edge-server",
            "roles": "control-plane,master",
            "ready": True,
            "version": "v1.31.4+k3s1",
            "address": "10.0.0.5",
            "arch": "amd64",
            "cpu": 8.0,
            "memory_bytes": 32596084 * 1024,
            "gpus": 2,
        },
        {
            "name": "edge-agent",
            "roles": "agent",
            "ready": False,
            "version": "v1.31.4+k3s1",
            "address": "10.0.0.7",
            "arch": "arm64",
            "cpu": 3.5,
            "memory_bytes": 7 * 2**30,
            "gpus": 0,
        },
    ]
    gpus = cluster.list_gpus()
    assert gpus == [
        {"node": "edge-server", "capacity": 2, "allocatable": 2, "in_use": 1, "free": 1},
        {"node": "edge-agent", "capacity": 0, "allocatable": 0, "in_use": 0, "free": 0},
    ]
    assert fake_kube["calls"]()[-1] == [
        "kubectl",
        "--kubeconfig",
        config,
        "get",
        "pods",
        "--all-namespaces",
        "-o",
        "json",
    ]
    status = cluster.cluster_status(Settings(home=Path("unused")))
    assert status == {
        "k3s_version": "v1.31.4+k3s1",
        "nodes": 2,
        "nodes_ready": 1,
        "not_ready": "edge-agent",
        "gpus_allocatable": 2,
        "gpus_free": 1,
        "object_store": "not used (local object store)",
    }
    assert ["kubectl", "--kubeconfig", config, "version", "-o", "json"] in fake_kube["calls"]()


def test_the_cli_prints_the_cluster(fake_kube: dict[str, Any], cli: Any, home: Path) -> None:
    result = cli("cluster", "nodes", "--home", str(home))
    assert result.code == 0 and "edge-agent" in result.out and "control-plane,master" in result.out
    result = cli("cluster", "gpus", "--json", "--home", str(home))
    assert [g["free"] for g in result.json()] == [1, 0]
    result = cli("cluster", "status", "--json", "--home", str(home))
    assert result.json()["nodes_ready"] == 1


def test_k3s_kubectl_when_only_k3s_is_installed(
    fake_kube: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    (fake_kube["bin"] / "kubectl").unlink()
    monkeypatch.delenv("KUBECONFIG")
    cluster.list_nodes(Kube(None))
    assert fake_kube["calls"]() == [["k3s", "kubectl", "get", "nodes", "-o", "json"]]


def test_failures_name_the_command_and_quote_its_stderr(
    fake_kube: dict[str, Any], monkeypatch: pytest.MonkeyPatch, cli: Any, home: Path
) -> None:
    config = fake_kube["kubeconfig"]
    monkeypatch.setenv("FAKE_KUBE_FAIL", "The connection to the server 127.0.0.1:6443 was refused")
    with pytest.raises(ClusterUnavailable) as failed:
        cluster.list_nodes()
    assert failed.value.message == (
        f"`kubectl --kubeconfig {config} get nodes -o json` failed (exit 1): E1126 memcache.go:265]"
        " couldn't get current server API group list | The connection to the server "
        "127.0.0.1:6443 was refused"
    )
    result = cli("cluster", "nodes", "--home", str(home))
    assert result.code == 7 and "was refused" in result.err
    monkeypatch.delenv("FAKE_KUBE_FAIL")
    monkeypatch.setenv("FAKE_KUBE_GARBAGE", "<html>proxy error</html>")
    with pytest.raises(ClusterUnavailable, match="printed something that is not JSON"):
        cluster.list_gpus()
    monkeypatch.setenv("FAKE_KUBE_SLEEP", "5")
    with pytest.raises(ClusterUnavailable, match=r"did not answer within 0.5 s; is k3s running"):
        cluster.list_nodes(Kube(config, timeout=0.5))


def test_without_k3s_the_commands_say_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cli: Any, home: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # neither kubectl nor k3s
    result = cli("cluster", "status", "--home", str(home))
    assert result.code == 7
    assert "k3s is not installed on this machine" in result.err
    assert "sudo ./install.sh --server" in result.err


class _Health(BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(self.status if self.path == "/minio/health/ready" else 404)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


def test_object_store_health_reads_minio_readiness() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        endpoint = f"127.0.0.1:{server.server_address[1]}"
        settings = Settings(home=Path("unused"), store="s3", s3=S3Settings(endpoint=endpoint))
        assert cluster.object_store_health(settings) == "ready"
        _Health.status = 503
        assert cluster.object_store_health(settings) == "not ready (HTTP 503)"
    finally:
        _Health.status = 200
        server.shutdown()
        server.server_close()
    gone = Settings(home=Path("unused"), store="s3", s3=S3Settings(endpoint=endpoint))
    assert cluster.object_store_health(gone).startswith(f"unreachable at {endpoint}")


def test_the_join_command_reads_the_token_from_a_file(
    fake_kube: dict[str, Any], tmp_path: Path, cli: Any, home: Path
) -> None:
    token = tmp_path / "node-token"
    token.write_text("K10abc::server:s3cret\n")
    result = cli(
        "cluster", "join-command", "--token-file", str(token), "--json", "--home", str(home)
    )
    joined = result.json()
    assert joined["server"] == "https://10.0.0.5:6443"  # the control-plane node's address
    assert joined["command"] == (
        "sudo ./install.sh --agent --server https://10.0.0.5:6443 --token-file ./node-token"
    )
    assert "token" not in joined and "s3cret" not in result.out  # a secret: only on request
    shown = cli(
        "cluster",
        "join-command",
        "--token-file",
        str(token),
        "--show-token",
        "--server-url",
        "https://edge.local:6443",
        "--json",
        "--home",
        str(home),
    ).json()
    assert (
        shown["token"] == "K10abc::server:s3cret" and shown["server"] == "https://edge.local:6443"
    )
    missing = cli(
        "cluster", "join-command", "--token-file", str(tmp_path / "none"), "--home", str(home)
    )
    assert missing.code == 7 and "no join token here; run this on the k3s server" in missing.err


def test_the_join_command_for_an_offline_site_names_the_bundle_quoted(
    fake_kube: dict[str, Any], tmp_path: Path, cli: Any, home: Path
) -> None:
    import shlex

    token = tmp_path / "node-token"
    token.write_text("K10abc::server:s3cret\n")
    plain = cli(
        "cluster",
        "join-command",
        "--token-file",
        str(token),
        "--bundle",
        "appliance-bundle-amd64.tar",
        "--json",
        "--home",
        str(home),
    ).json()
    assert plain["command"] == (
        "sudo ./install.sh --agent --server https://10.0.0.5:6443 --token-file ./node-token "
        "--bundle appliance-bundle-amd64.tar"
    )
    assert plain["copy_bundle"] == (
        "copy the offline bundle to the new node as appliance-bundle-amd64.tar"
    )
    # every part the user gave reaches install.sh as one word, whatever it holds
    bundle, url = "my bundle $(id) 'x'.tar", "https://edge.local:6443/#a b;c"
    quoted = cli(
        "cluster",
        "join-command",
        "--token-file",
        str(token),
        "--server-url",
        url,
        "--bundle",
        bundle,
        "--home",
        str(home),
    )
    assert quoted.code == 0, quoted.err
    joined = cluster.join_command(server_url=url, token_file=token, bundle=bundle)
    assert joined["command"] in quoted.out  # the CLI prints the same line
    assert shlex.split(joined["command"]) == [
        "sudo",
        "./install.sh",
        "--agent",
        "--server",
        url,
        "--token-file",
        "./node-token",
        "--bundle",
        bundle,
    ]
    assert "s3cret" not in quoted.out
    empty = cli(
        "cluster", "join-command", "--token-file", str(token), "--bundle", " ", "--home", str(home)
    )
    assert empty.code == 2 and "--bundle: give the bundle's file name" in empty.err


def test_the_cluster_screen_shows_status_nodes_and_gpus(
    fake_kube: dict[str, Any], app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from textual.widgets import DataTable, Static

    from appliance.tui.app import ApplianceApp
    from appliance.tui.cluster import ClusterScreen
    from tests.pilot import until

    async def scenario() -> None:
        tui = ApplianceApp(app)
        async with tui.run_test(size=(180, 40)) as pilot:
            await pilot.press("c")
            assert isinstance(tui.screen, ClusterScreen)
            screen = tui.screen
            nodes = screen.query_one("#nodes", DataTable)
            await until(pilot, lambda: nodes.row_count == 2, "two nodes")
            status = str(screen.query_one("#cluster-status", Static).render())
            assert "k3s v1.31.4+k3s1 · nodes 1/2 ready" in status and "GPUs 1 free of 2" in status
            rows = [[str(c) for c in nodes.get_row(k)] for k in nodes.rows]
            assert rows[1][:3] == ["edge-agent", "agent", "NotReady"]
            gpus = screen.query_one("#gpus", DataTable)
            assert [str(c) for c in gpus.get_row(next(iter(gpus.rows)))] == [
                "edge-server",
                "2",
                "2",
                "1",
                "1",
            ]
            # k3s gone: the screen says how to install it instead of failing
            monkeypatch.setenv("PATH", "/nonexistent")
            await pilot.press("r")
            line = screen.query_one("#cluster-status", Static)
            await until(pilot, lambda: "not installed" in str(line.render()), "the hint")
            assert nodes.row_count == 0

    asyncio.run(scenario())
