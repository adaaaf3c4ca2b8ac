"""`appliance deploy`, revision history, refusing a damaged model, and the body-size limit."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

import pytest


def test_deploy_creates_then_adds_revisions_and_history_shows_them(cli, registry_home: str) -> None:  # type: ignore[no-untyped-def]
    home = ["--home", registry_home]
    cli("models", "alias", "set", "churn", "champion", "2", *home)
    created = cli("deploy", "churn@champion", "--name", "scoring", "--json", *home)
    assert created.code == 0, created.err
    assert created.json()["current_revision"] == 1 and created.json()["model_version"] == 2
    nxt = cli("deploy", "churn/1", "--name", "scoring", "--json", *home)
    assert nxt.json()["current_revision"] == 2 and nxt.json()["model_version"] == 1
    history = cli("deployments", "history", "scoring", "--json", *home).json()
    assert [(h["revision"], h["model_version"], h["action"]) for h in history] == [
        (1, 2, "deploy"),
        (2, 1, "deploy"),
    ]
    listed = cli("deployments", "list", "--json", *home).json()
    row = next(d for d in listed if d["name"] == "scoring")
    assert row["url"].startswith("http://127.0.0.1:") and row["revision"] == 2
    moved = cli("deploy", "churn/2", "--name", "scoring", "--port", "1", *home)
    assert moved.code == 4 and "keeps its address" in moved.err
    assert cli("deployments", "stop", "scoring", *home).code == 0

    from tests.conftest import free_port

    port = free_port()
    pinned = cli("deploy", "churn/2", "--name", "pinned", "--port", str(port), "--json", *home)
    assert pinned.code == 0, pinned.err
    assert pinned.json()["url"] == f"http://127.0.0.1:{port}"
    assert cli("deployments", "stop", "pinned", *home).code == 0


def test_a_damaged_model_file_is_refused_and_nothing_changes(cli, registry_home: str) -> None:  # type: ignore[no-untyped-def]
    home = ["--home", registry_home]
    version = cli("models", "show", "churn/2", "--json", *home).json()
    sha = version["sha256"]
    path = Path(registry_home) / "objects" / "sha256" / sha[:2] / sha
    original = path.read_bytes()
    before = cli("deployments", "show", "churn", "--json", *home).json()["current_revision"]
    try:
        path.write_bytes(original[:-10] + b"0123456789")
        damaged = cli("deploy", "churn/2", "--name", "churn", *home)
        assert damaged.code == 5 and "corrupted" in damaged.err and sha[:12] in damaged.err
        path.unlink()
        missing = cli("deploy", "churn/2", "--name", "churn", *home)
        assert missing.code == 3 and "missing" in missing.err
    finally:
        path.write_bytes(original)
    after = cli("deployments", "show", "churn", "--json", *home).json()["current_revision"]
    assert after == before


def test_the_request_body_limit_is_configurable(
    cli, registry_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("APPLIANCE_SERVE_MAX_BODY", "1Ki")
    home = ["--home", registry_home]
    started = cli("deployments", "start", "churn", "--json", *home)
    assert started.code == 0, started.err
    try:
        url = started.json()["url"] + "/v2/models/churn/infer"
        body = json.dumps({"inputs": [{"name": "x", "data": [0] * 2000}]}).encode()
        request = urllib.request.Request(
            url, data=body, headers={"Content-Type": "application/json", "X-Request-Id": "big-1"}
        )
        with pytest.raises(urllib.error.HTTPError) as caught:
            urllib.request.urlopen(request, timeout=10)
        assert caught.value.code == 413
        assert caught.value.headers["x-request-id"] == "big-1"  # as its row in the log
        assert "1024-byte limit" in json.loads(caught.value.read())["error"]
        # chunked: no Content-Length to refuse up front, so the limit applies while reading.
        # Two chunks of 600 bytes pass it; no more is sent, as the server answers and closes
        # then (bytes sent after that would reset the connection before the answer is read).
        import socket
        from urllib.parse import urlsplit

        parts = urlsplit(url)
        head = (
            f"POST {parts.path} HTTP/1.1\r\nHost: {parts.netloc}\r\nX-Request-Id: big-2\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        chunks = b"".join(b"258\r\n" + body[i : i + 600] + b"\r\n" for i in (0, 600))
        with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
            sock.sendall(head.encode() + chunks)
            answer = b""
            while more := sock.recv(65536):
                answer += more
        assert answer.startswith(b"HTTP/1.1 413 ") and b"1024-byte limit" in answer
        assert b"\r\nx-request-id: big-2\r\n" in answer.lower()
    finally:
        cli("deployments", "stop", "churn", *home)


def test_the_agent_restarts_a_crashed_server_and_respects_stop(cli, registry_home: str) -> None:  # type: ignore[no-untyped-def]
    import os
    import signal
    import time

    from appliance.core.context import Appliance
    from appliance.core.deployments import get_deployment

    home = ["--home", registry_home]
    started = cli("deployments", "start", "churn", "--json", *home).json()
    app = Appliance.open(registry_home)

    def serving_with_new_pid(old: int) -> bool:
        dep = get_deployment(app, "churn")
        return dep["status"] == "serving" and dep["pid"] not in (None, old)

    def until(predicate, timeout: float = 30) -> None:  # type: ignore[no-untyped-def]
        deadline = time.monotonic() + timeout
        while not predicate():
            assert time.monotonic() < deadline, "not reached in time"
            time.sleep(0.1)

    try:
        os.kill(started["pid"], signal.SIGKILL)  # a crash
        until(lambda: serving_with_new_pid(started["pid"]))
        again = get_deployment(app, "churn")
        assert again["port"] == started["port"]  # same address for its clients
        with urllib.request.urlopen(f"{again['url']}/v2/health/ready", timeout=10) as response:
            assert response.status == 200

        # A reboot: nothing runs; the next agent brings the server back.
        assert cli("agent", "stop", *home).code == 0
        os.kill(again["pid"], signal.SIGKILL)
        until(lambda: get_deployment(app, "churn")["status"] == "stopped")
        assert cli("agent", "start", *home).code == 0
        until(lambda: serving_with_new_pid(again["pid"]))

        assert cli("deployments", "stop", "churn", *home).code == 0
        time.sleep(2.5)  # past the agent's next passes
        assert get_deployment(app, "churn")["status"] == "stopped"  # stop means stop
    finally:
        cli("deployments", "stop", "churn", *home)
        app.close()


def test_a_restart_whose_wait_fails_reaps_its_server_and_the_agent_tries_again(
    registry_home: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server the agent restarts whose readiness wait fails (not ready in time, a database
    error) is stopped and reaped there: no caller learns its pid, and the agent reaps
    only what it knows it started. The deployment stays wanted on its own address, so the
    agent tries again, though the servers recorded themselves stopped on their way out and
    the fallback server had recorded its free port. A database busy for a while is only
    "not ready yet"; any other database error is said at once, its server reaped too."""
    import sqlite3
    import subprocess
    import time

    from appliance.core import agent, deployments
    from appliance.core.context import Appliance
    from appliance.errors import ApplianceError

    app = Appliance.open(registry_home)
    agent.stop_agent(app)  # this test restarts the server as the agent would, alone
    monkeypatch.setattr(agent, "ensure_agent", lambda app: None)
    gone = subprocess.Popen(["true"])  # a pid that no longer runs: a crash
    gone.wait()
    address = app.db.rows("SELECT host, port FROM deployments WHERE name = 'churn'")[0]

    def crash() -> None:
        app.db.execute(
            "UPDATE deployments SET status = 'serving', pid = ? WHERE name = 'churn'", (gone.pid,)
        )
        assert [d["name"] for d in deployments.crashed_deployments(app)] == ["churn"]

    def restart() -> dict | None:  # type: ignore[type-arg]
        return deployments.restart_deployment(app, "churn", address["host"], address["port"])

    crash()
    servers = []
    real_wait = deployments._wait_ready

    def ready_too_late(app, name, proc, log_path):  # type: ignore[no-untyped-def]
        servers.append(proc)
        real_wait(app, name, proc, log_path)  # it serves, but after the deadline
        raise ApplianceError(f"deployment {name}: server not ready after 60s")

    monkeypatch.setattr(deployments, "_wait_ready", ready_too_late)
    with pytest.raises(ApplianceError):
        restart()
    assert len(servers) == 2  # on its address, then on a free port
    for server in servers:  # both were serving: stopped, and waited for
        assert server.returncode is not None and not Path(f"/proc/{server.pid}").exists()
    assert [d["name"] for d in deployments.crashed_deployments(app)] == ["churn"]
    assert app.db.rows("SELECT host, port FROM deployments WHERE name = 'churn'") == [address]

    def recorded(app, name, proc, log_path):  # type: ignore[no-untyped-def]
        servers.append(proc)
        return real_wait(app, name, proc, log_path)

    monkeypatch.setattr(deployments, "_wait_ready", recorded)
    real_get = deployments.get_deployment
    calls: list[str] = []

    def fails_once(code: int):  # type: ignore[no-untyped-def]
        def get(app, name):  # type: ignore[no-untyped-def]
            calls.append(name)
            if len(calls) == 2:  # restart's own look, then the wait's first
                error = sqlite3.OperationalError(
                    "database is locked" if code & 0xFF == 5 else "I/O"
                )
                error.sqlite_errorcode = code  # type: ignore[attr-defined]
                raise error
            return real_get(app, name)

        return get

    monkeypatch.setattr(deployments, "get_deployment", fails_once(517))  # SQLITE_BUSY_SNAPSHOT
    try:
        served = restart()
        assert served is not None and served["status"] == "serving"
        assert served["port"] == address["port"] and len(calls) > 2, calls
        monkeypatch.setattr(deployments, "get_deployment", real_get)
        assert restart() is None  # already back: nothing to start, and the agent says nothing
    finally:
        monkeypatch.setattr(deployments, "get_deployment", real_get)
        deployments.stop_deployment(app, "churn")
    assert restart() is None  # stopped meanwhile
    crash()
    calls.clear()
    monkeypatch.setattr(deployments, "get_deployment", fails_once(10))  # SQLITE_IOERR
    started = time.monotonic()
    try:
        with pytest.raises(sqlite3.OperationalError):
            restart()
        assert time.monotonic() - started < 30  # said, not waited out (60 s)
        assert len(servers) == 4  # two not ready, one served, this one
        assert servers[-1].returncode is not None  # its server stopped, and waited for
        assert not Path(f"/proc/{servers[-1].pid}").exists()
        assert [d["name"] for d in deployments.crashed_deployments(app)] == ["churn"]
    finally:
        monkeypatch.setattr(deployments, "get_deployment", real_get)
        deployments.stop_deployment(app, "churn")
        app.close()
