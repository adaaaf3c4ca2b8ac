"""Deployments: a named endpoint serving one model, with numbered revisions and rollback.

Each deploy or rollback appends a revision; the deployment's `current_revision` is the one
pointer the server follows. Nothing is copied or rebuilt, so rollback is as fast as a reload.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.lineage import record_execution
from appliance.core.names import validate_name
from appliance.core.processes import alive, exclusive, signal_ours
from appliance.core.registry import get_model_version
from appliance.errors import ApplianceError, Conflict, InvalidInput, NotFound
from appliance.store.db import utcnow

READY_TIMEOUT = 60.0


def _token_path(app: Appliance, name: str) -> Path:
    return app.settings.secrets_dir / "deployments" / f"{name}.token"


def _write_token(app: Appliance, name: str) -> None:
    path = _token_path(app, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(app.settings.secrets_dir, 0o700)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32))
    os.replace(tmp, path)


def read_token(app: Appliance, name: str) -> str:
    """The deployment's admin token (mode 0600 under the home's secrets/)."""
    path = _token_path(app, name)
    if not path.exists():
        _write_token(app, name)
    return path.read_text().strip()


def get_deployment(app: Appliance, name: str) -> dict[str, Any]:
    validate_name("deployment", name)
    row = app.db.one(
        "SELECT d.id, d.name, m.name AS model, d.current_revision, d.status, d.host, d.port, "
        "d.pid, d.created_at, d.updated_at, mv.version AS model_version "
        "FROM deployments d JOIN registered_models m ON m.id = d.model_id "
        "JOIN deployment_revisions r ON r.deployment_id = d.id AND r.revision = d.current_revision "
        "JOIN model_versions mv ON mv.id = r.model_version_id WHERE d.name = ?",
        (name,),
    )
    if row is None:
        raise NotFound(f"deployment {name!r} not found")
    if row["status"] == "serving" and not alive(row["pid"]):
        row["status"] = "stopped"
    row["url"] = f"http://{row['host']}:{row['port']}" if row["status"] == "serving" else None
    return row


def list_deployments(app: Appliance) -> list[dict[str, Any]]:
    names = [r["name"] for r in app.db.rows("SELECT name FROM deployments ORDER BY name")]
    return [
        {k: d[k] for k in ("name", "model", "model_version", "current_revision", "status", "url")}
        for d in (get_deployment(app, n) for n in names)
    ]


def list_revisions(app: Appliance, name: str) -> list[dict[str, Any]]:
    dep = get_deployment(app, name)
    return app.db.rows(
        "SELECT r.revision, mv.version AS model_version, r.action, r.created_at "
        "FROM deployment_revisions r JOIN model_versions mv ON mv.id = r.model_version_id "
        "WHERE r.deployment_id = ? ORDER BY r.revision",
        (dep["id"],),
    )


def _append_revision(
    conn: sqlite3.Connection, deployment_id: int, name: str, mv: dict[str, Any], action: str
) -> int:
    """Add the next revision, point the deployment at it, and record the lineage."""
    now = utcnow()
    revision = conn.execute(
        "SELECT coalesce(max(revision), 0) + 1 FROM deployment_revisions WHERE deployment_id = ?",
        (deployment_id,),
    ).fetchone()[0]
    conn.execute(
        "INSERT INTO deployment_revisions (deployment_id, revision, model_version_id, action, "
        "created_at) VALUES (?, ?, ?, ?, ?)",
        (deployment_id, revision, mv["id"], action, now),
    )
    conn.execute(
        "UPDATE deployments SET current_revision = ?, updated_at = ? WHERE id = ?",
        (revision, now, deployment_id),
    )
    record_execution(
        conn,
        "Deploy",
        f"{action}:{name}#{revision}",
        inputs=[("ModelVersion", f"model:{mv['ref']}")],
        outputs=[("DeploymentRevision", f"deployment:{name}#{revision}")],
        context=("Deployment", name),
    )
    return int(revision)


def _add_revision(app: Appliance, name: str, mv: dict[str, Any], action: str) -> int:
    with app.db.transaction() as conn:
        dep = conn.execute(
            "SELECT d.id, m.name FROM deployments d "
            "JOIN registered_models m ON m.id = d.model_id WHERE d.name = ?",
            (name,),
        ).fetchone()
        if dep is None:
            raise NotFound(f"deployment {name!r} not found")
        if dep[1] != mv["model"]:
            raise InvalidInput(f"deployment {name!r} serves model {dep[1]!r}, not {mv['model']!r}")
        return _append_revision(conn, dep[0], name, mv, action)


def _deployable(app: Appliance, model_ref: str) -> dict[str, Any]:
    """The version to serve, refused before anything changes if it is archived or its model
    file is missing or does not match its sha256 (the current revision keeps serving)."""
    version = get_model_version(app, model_ref)
    if version.get("archived_at"):
        raise Conflict(f"model {version['ref']} is archived; it cannot be deployed")
    app.objects.get_file(version["sha256"])  # NotFound / CorruptObject name the object
    return version


def deploy_model(
    app: Appliance,
    model_ref: str,
    name: str | None = None,
    host: str | None = None,
    port: int | None = None,
) -> dict[str, Any]:
    """`appliance deploy REF --name NAME`: create the deployment (revision 1) on HOST:PORT
    (default 127.0.0.1, a free port), or add the next revision to it."""
    from appliance.core.registry import parse_ref

    name = name or parse_ref(model_ref)[0]
    if app.db.one("SELECT 1 FROM deployments WHERE name = ?", (name,)) is None:
        return create_deployment(app, name, model_ref, host=host or "127.0.0.1", port=port or 0)
    if host is not None or port is not None:
        raise Conflict(
            f"deployment {name!r} exists and keeps its address; to move it: "
            f"'deployments stop {name}' then 'deployments start {name} --port P'"
        )
    return deploy(app, name, model_ref)


def create_deployment(
    app: Appliance,
    name: str,
    model_ref: str,
    start: bool = True,
    host: str = "127.0.0.1",
    port: int = 0,
) -> dict[str, Any]:
    """Create deployment `name` serving `model_ref` as revision 1, and start its server."""
    validate_name("deployment", name)
    mv = _deployable(app, model_ref)
    now = utcnow()
    with app.db.transaction() as conn:
        if conn.execute("SELECT 1 FROM deployments WHERE name = ?", (name,)).fetchone():
            raise Conflict(f"deployment {name!r} already exists; use 'deployments deploy'")
        model_id = conn.execute(
            "SELECT model_id FROM model_versions WHERE id = ?", (mv["id"],)
        ).fetchone()[0]
        cur = conn.execute(
            "INSERT INTO deployments (name, model_id, current_revision, status, created_at, "
            "updated_at) VALUES (?, ?, 0, 'stopped', ?, ?)",
            (name, model_id, now, now),
        )
        _append_revision(conn, int(cur.lastrowid or 0), name, mv, "deploy")
    _write_token(app, name)
    if start:
        return start_deployment(app, name, host=host, port=port)
    return get_deployment(app, name)


def _notify(app: Appliance, dep: dict[str, Any]) -> dict[str, Any] | None:
    """Ask a running server to adopt the current revision now (it also polls)."""
    if dep["status"] != "serving":
        return None
    request = urllib.request.Request(
        f"{dep['url']}/admin/reload",
        data=b"{}",
        method="POST",
        headers={
            "Authorization": f"Bearer {read_token(app, dep['name'])}",
            "Content-Type": "application/json",
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())
    except (urllib.error.URLError, OSError) as exc:
        raise ApplianceError(
            f"deployment {dep['name']}: revision recorded, but the server did not confirm "
            f"the reload ({exc}); it will pick it up on its next poll"
        ) from exc


def deploy(app: Appliance, name: str, model_ref: str) -> dict[str, Any]:
    """Serve another version of the deployment's model as a new revision."""
    mv = _deployable(app, model_ref)
    _add_revision(app, name, mv, "deploy")
    dep = get_deployment(app, name)
    _notify(app, dep)
    return dep


def rollback(app: Appliance, name: str, to_revision: int | None = None) -> dict[str, Any]:
    """Go back to the model version of an earlier revision (default: the one before current)."""
    if to_revision is not None and to_revision < 1:
        raise InvalidInput(f"--to-revision {to_revision}: revisions start at 1")
    dep = get_deployment(app, name)
    target = to_revision if to_revision is not None else dep["current_revision"] - 1
    if target < 1:
        raise Conflict(f"deployment {name!r} has no earlier revision to roll back to")
    if target >= dep["current_revision"]:
        raise InvalidInput(
            f"--to-revision {target}: must be earlier than {dep['current_revision']}"
        )
    row = app.db.one(
        "SELECT mv.version FROM deployment_revisions r "
        "JOIN model_versions mv ON mv.id = r.model_version_id "
        "WHERE r.deployment_id = ? AND r.revision = ?",
        (dep["id"], target),
    )
    if row is None:
        raise NotFound(f"deployment {name!r} has no revision {target}")
    mv = get_model_version(app, f"{dep['model']}@{row['version']}")
    _add_revision(app, name, mv, "rollback")
    dep = get_deployment(app, name)
    _notify(app, dep)
    return dep


def start_deployment(
    app: Appliance, name: str, host: str = "127.0.0.1", port: int = 0
) -> dict[str, Any]:
    """Start the deployment's server as a detached process and wait until it is ready; the
    agent (started here if needed) restarts it if it dies."""
    from appliance.core.agent import ensure_agent

    get_deployment(app, name)  # validates the name before it becomes a lock file name
    with exclusive(app.settings.home / "locks" / f"deployment-{name}.lock"):
        dep = get_deployment(app, name)
        if dep["status"] != "serving":
            dep = _spawn_server(app, name, host, port)
    ensure_agent(app)
    return dep


def _spawn_server(app: Appliance, name: str, host: str, port: int) -> dict[str, Any]:
    log_path = app.settings.logs_dir / "deployments" / f"{name}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "APPLIANCE_HOME": str(app.settings.home)}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "appliance.runner",
                "serve",
                name,
                "--host",
                host,
                "--port",
                str(port),
            ],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise ApplianceError(
                f"deployment {name}: server exited with code {proc.returncode}: "
                f"{tail[0] if tail else 'no output'} (log: {log_path})"
            )
        dep = get_deployment(app, name)
        if dep["status"] == "serving" and dep["pid"] == proc.pid:
            try:
                with urllib.request.urlopen(f"{dep['url']}/v2/health/ready", timeout=5):
                    return dep
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.05)
    proc.terminate()
    raise ApplianceError(f"deployment {name}: server not ready after {READY_TIMEOUT:.0f}s")


def crashed_deployments(app: Appliance) -> list[dict[str, Any]]:
    """Deployments meant to serve whose server is gone (a crash, a reboot)."""
    rows = app.db.rows(
        "SELECT name, host, port, pid FROM deployments WHERE status = 'serving' ORDER BY name"
    )
    return [r for r in rows if not alive(r["pid"])]


def restart_deployment(app: Appliance, name: str, host: str, port: int) -> dict[str, Any]:
    """Start a crashed deployment's server again, on its address when that is free."""
    with exclusive(app.settings.home / "locks" / f"deployment-{name}.lock"):
        dep = get_deployment(app, name)
        wanted = app.db.scalar("SELECT status FROM deployments WHERE name = ?", (name,))
        if wanted != "serving" or dep["status"] == "serving":  # stopped, or already back
            return dep
        try:
            return _spawn_server(app, name, host or "127.0.0.1", port or 0)
        except ApplianceError:
            return _spawn_server(app, name, host or "127.0.0.1", 0)  # the port was taken


def stop_deployment(app: Appliance, name: str, timeout: float = 10.0) -> dict[str, Any]:
    """Stop the deployment's server; its revisions and history stay."""
    get_deployment(app, name)  # validates the name before it becomes a lock file name
    # Stopped first, under the lock a restart takes: the agent must not take the server's
    # exit for a crash and bring it back.
    with exclusive(app.settings.home / "locks" / f"deployment-{name}.lock"):
        dep = get_deployment(app, name)
        app.db.execute(
            "UPDATE deployments SET status = 'stopped', updated_at = ? WHERE name = ?",
            (utcnow(), name),
        )
    pid = dep["pid"]
    if dep["status"] == "serving" and signal_ours(pid, signal.SIGTERM):
        deadline = time.monotonic() + timeout
        while alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        signal_ours(pid, signal.SIGKILL)
    app.db.execute(
        "UPDATE deployments SET status = 'stopped', pid = NULL, updated_at = ? WHERE name = ?",
        (utcnow(), name),
    )
    return get_deployment(app, name)
