"""Deployments: a named endpoint serving one model, with numbered revisions and rollback.

Each deploy, rollback or alias move appends a revision; the deployment's `current_revision`
(and, during a canary, `canary_revision`) is what the server's workers follow, and every
change of routing bumps `generation`. Nothing is copied or rebuilt, so a rollback is a
reference swap in each worker; the command returns once every worker reports the new
generation.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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
from appliance.core.registry import current_actor, get_model_version, parse_ref
from appliance.errors import ApplianceError, Changed, Conflict, InvalidInput, NotFound
from appliance.store.db import utcnow

READY_TIMEOUT = 60.0
SERVED_TIMEOUT = 30.0  # how long deploy/rollback wait for every worker to swap
MAX_WORKERS = 64
MAX_CANARY_WINDOW = 3600.0
SQLITE_BUSY_LOCKED = (5, 6)  # SQLITE_BUSY, SQLITE_LOCKED: a wait on another writer, not a fault


def get_deployment(app: Appliance, name: str) -> dict[str, Any]:
    """A deployment: its address and state, the revision and version it serves, any canary."""
    validate_name("deployment", name)
    row = app.db.one(
        "SELECT d.id, d.name, m.name AS model, d.current_revision, d.status, d.host, d.port, "
        "d.pid, d.workers, d.follow_alias, d.generation, d.canary_revision, d.canary_percent, "
        "d.canary_rule, d.canary_window_s, d.feature_service, d.backend, d.created_at, "
        "d.updated_at, mv.version AS model_version, cv.version AS canary_version "
        "FROM deployments d JOIN registered_models m ON m.id = d.model_id "
        "JOIN deployment_revisions r ON r.deployment_id = d.id AND r.revision = d.current_revision "
        "JOIN model_versions mv ON mv.id = r.model_version_id "
        "LEFT JOIN deployment_revisions cr ON cr.deployment_id = d.id "
        "AND cr.revision = d.canary_revision "
        "LEFT JOIN model_versions cv ON cv.id = cr.model_version_id WHERE d.name = ?",
        (name,),
    )
    if row is None:
        raise NotFound(f"deployment {name!r} not found")
    if row["backend"] == "local" and row["status"] == "serving" and not alive(row["pid"]):
        row["status"] = "stopped"  # on k3s the cluster keeps it up: `status` tells how it is
    serving = row["status"] == "serving" and row["port"]
    row["url"] = f"http://{row['host']}:{row['port']}" if serving else None
    return row


def traffic(app: Appliance, name: str, seconds: float | None = None) -> dict[str, Any]:
    """Live traffic over the last seconds, from the workers' snapshots: all requests, and
    stable and canary apart."""
    get_deployment(app, name)  # validates the name before it becomes a path
    return _traffic(app, name, seconds)


def _traffic(app: Appliance, name: str, seconds: float | None) -> dict[str, Any]:
    from appliance.core.serving import state_dir
    from appliance.core.traffic import LIVE_WINDOW, log_counters, merge, read_snapshots, window

    snapshots = [s for s in read_snapshots(state_dir(app, name)) if alive(int(s.get("pid") or 0))]
    merged = merge(snapshots)
    span = seconds or LIVE_WINDOW
    return {
        "degraded": sorted({s["degraded"] for s in snapshots if s.get("degraded")}),
        "all": window(merged, span).as_dict(),
        "stable": window(merged, span, role="stable").as_dict(),
        "canary": window(merged, span, role="canary").as_dict(),
        "seconds": span,
        "log": log_counters(snapshots),  # since each running worker started
    }


def list_deployments(app: Appliance) -> list[dict[str, Any]]:
    """Every deployment with its revision, version, port, state and live traffic."""
    names = [r["name"] for r in app.db.rows("SELECT name FROM deployments ORDER BY name")]
    out = []
    for dep in (get_deployment(app, n) for n in names):
        local = dep["status"] == "serving" and dep["backend"] == "local"
        now = _traffic(app, dep["name"], None) if local else {}
        live = now.get("all", {})
        state = "degraded" if now.get("degraded") else dep["status"]
        canary = (
            f"{dep['canary_version']} @ {dep['canary_percent']:g}%"
            if dep["canary_revision"] is not None
            else None
        )
        out.append(
            {
                "name": dep["name"],
                "model": dep["model"],
                "revision": dep["current_revision"],
                "model_version": dep["model_version"],
                "canary": canary,
                "port": dep["port"],
                "workers": dep["workers"],
                "state": state,
                "degraded": now.get("degraded") or None,
                "url": dep["url"],
                "rps": live.get("rps"),
                "p99_ms": live.get("p99_ms"),
                "error_rate": live.get("error_rate"),
            }
        )
    return out


def list_revisions(app: Appliance, name: str) -> list[dict[str, Any]]:
    """Every revision: which model version, how it came (deploy, rollback, canary, follow),
    how a canary ended and why, who acted, when."""
    dep = get_deployment(app, name)
    return app.db.rows(
        "SELECT r.revision, mv.version AS model_version, r.action, r.outcome, r.reason, "
        "r.actor, r.created_at FROM deployment_revisions r "
        "JOIN model_versions mv ON mv.id = r.model_version_id "
        "WHERE r.deployment_id = ? ORDER BY r.revision",
        (dep["id"],),
    )


def _append_revision(
    app: Appliance,
    conn: sqlite3.Connection,
    deployment_id: int,
    name: str,
    mv: dict[str, Any],
    action: str,
    reason: str | None = None,
    manifest: str | None = None,
) -> int:
    """Add the next revision, point the deployment (or its canary) at it, and record the
    lineage; in the caller's transaction. On k3s the revision stores its manifest (`manifest`:
    an earlier revision's, applied again as it was) and is applied before the transaction
    commits: the cluster refusing it leaves nothing recorded."""
    service, backend = conn.execute(
        "SELECT feature_service, backend FROM deployments WHERE id = ?", (deployment_id,)
    ).fetchone()
    if service:
        _check_fits_service(conn, name, mv, service)
    if backend == "k3s" and action == "canary":
        raise InvalidInput(
            f"--canary: deployment {name!r} runs on k3s, where a revision is rolled out to "
            "every replica; canaries are served by the local backend"
        )
    now = utcnow()
    revision = conn.execute(
        "SELECT coalesce(max(revision), 0) + 1 FROM deployment_revisions WHERE deployment_id = ?",
        (deployment_id,),
    ).fetchone()[0]
    if backend == "k3s" and manifest is None:
        from appliance.core.k3s_serving import build_revision

        manifest = build_revision(app.settings, conn, deployment_id, name, revision, mv)
    conn.execute(
        "INSERT INTO deployment_revisions (deployment_id, revision, model_version_id, action, "
        "created_at, reason, actor, manifest_json) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (deployment_id, revision, mv["id"], action, now, reason, current_actor(), manifest),
    )
    column = "canary_revision" if action == "canary" else "current_revision"
    conn.execute(
        f"UPDATE deployments SET {column} = ?, generation = generation + 1, updated_at = ? "
        "WHERE id = ?",
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
    if backend == "k3s" and manifest is not None:
        from appliance.core.k3s_serving import apply_revision

        apply_revision(app.settings, conn, deployment_id, name, revision, manifest)
    return int(revision)


def _check_fits_service(
    conn: sqlite3.Connection, name: str, mv: dict[str, Any], service: str
) -> None:
    """A version is served from the feature service it was trained with (else the
    deployment's): that service must take the deployment's join keys (what callers send), and
    every input of the model must be one of its features or keys."""
    from appliance.core.features import service_inputs

    used = mv.get("feature_service") or service
    keys, features = service_inputs(conn, used)
    if used != service and sorted(keys) != sorted(service_inputs(conn, service)[0]):
        raise InvalidInput(
            f"model {mv['ref']} was trained with feature service {used}, keyed by {keys}; "
            f"deployment {name!r} takes the keys of {service}"
        )
    missing = [
        f["name"]
        for f in mv["signature"]["signature"]
        if f["name"] not in features and f["name"] not in keys
    ]
    if missing:
        raise InvalidInput(
            f"model {mv['ref']} takes {', '.join(map(repr, missing))}, which feature service "
            f"{used} (deployment {name!r}) neither looks up nor takes as a join key"
        )


def _locked_deployment(
    conn: sqlite3.Connection, name: str, mv: dict[str, Any] | None = None
) -> tuple[int, int | None, int]:
    """(id, canary revision, current revision) inside the caller's transaction; with `mv`,
    checks that the version belongs to the deployment's model."""
    row = conn.execute(
        "SELECT d.id, m.name, d.canary_revision, d.current_revision FROM deployments d "
        "JOIN registered_models m ON m.id = d.model_id WHERE d.name = ?",
        (name,),
    ).fetchone()
    if row is None:
        raise NotFound(f"deployment {name!r} not found")
    if mv is not None and row[1] != mv["model"]:
        raise InvalidInput(f"deployment {name!r} serves model {row[1]!r}, not {mv['model']!r}")
    return row[0], row[2], row[3]


def _still_deployable(conn: sqlite3.Connection, mv: dict[str, Any]) -> None:
    """Inside the writing transaction: the version was not archived since it was checked."""
    if conn.execute("SELECT archived_at FROM model_versions WHERE id = ?", (mv["id"],)).fetchone()[
        0
    ]:
        raise Conflict(f"model {mv['ref']} is archived; it cannot be deployed")


def _deployable(app: Appliance, model_ref: str) -> dict[str, Any]:
    """The version to serve, refused before anything changes if it is archived or its model
    file is missing or does not match its sha256 (the current revision keeps serving)."""
    version = get_model_version(app, model_ref)
    if version.get("archived_at"):
        raise Conflict(f"model {version['ref']} is archived; it cannot be deployed")
    app.objects.get_file(version["sha256"])  # NotFound / CorruptObject name the object
    return version


def wait_served(app: Appliance, name: str, timeout: float | None = None) -> dict[str, Any]:
    """Block until every live worker of a running deployment serves its latest generation
    (a stopped deployment serves it when it starts); on k3s, until its rollout is available."""
    from appliance.core.serving import state_dir, wake_workers
    from appliance.core.traffic import read_snapshots

    dep = get_deployment(app, name)
    if dep["status"] != "serving":
        return dep
    if dep["backend"] == "k3s":
        from appliance.core.k3s_serving import publish_logging, wait_rollout

        try:  # the pods it rolls out read their logging settings there (within seconds)
            publish_logging(app, name)
        except (ApplianceError, OSError) as exc:  # served all the same: the pods keep the
            # last ones until the agent's pass hands these on
            dep["logging_note"] = getattr(exc, "message", None) or str(exc)
        dep["rollout"] = wait_rollout(app.settings, name, dep["current_revision"], timeout)
        return dep
    timeout = SERVED_TIMEOUT if timeout is None else timeout
    directory = state_dir(app, name)
    deadline = time.monotonic() + timeout
    woken: set[int] = set()
    while True:
        snapshots = [s for s in read_snapshots(directory) if alive(int(s.get("pid") or 0))]
        behind = [s["pid"] for s in snapshots if int(s.get("generation", -1)) < dep["generation"]]
        wake_workers(app, name, [p for p in behind if p not in woken])
        woken.update(behind)
        if snapshots and not behind:
            return dep
        if time.monotonic() > deadline:
            raise ApplianceError(
                f"deployment {name}: revision {dep['current_revision']} recorded, but worker(s) "
                f"{', '.join(map(str, behind)) or '(none running)'} did not adopt it within "
                f"{timeout:.0f}s (log: {app.settings.logs_dir / 'deployments' / f'{name}.log'})"
            )
        time.sleep(0.005)


def deployment_status(
    app: Appliance, name: str, wait: bool = False, timeout: float | None = None
) -> dict[str, Any]:
    """Where the current revision stands. On k3s, its rollout as the cluster reports it:
    state (progressing, available, failed), replicas desired, updated, ready and available,
    and a message; locally, the server's state. With `wait`, once it is served (a failed
    rollout or the timeout raises)."""
    dep = wait_served(app, name, timeout) if wait else get_deployment(app, name)
    out = {
        "name": dep["name"],
        "backend": dep["backend"],
        "revision": dep["current_revision"],
        "model_version": dep["model_version"],
    }
    if dep["backend"] == "k3s" and dep["status"] == "serving":
        from appliance.core.k3s_serving import rollout_status

        note = {"logging_note": dep["logging_note"]} if dep.get("logging_note") else {}
        return {**out, **(dep.get("rollout") or rollout_status(app.settings, name)), **note}
    return {**out, "state": dep["status"], "message": None}


_KEEP = object()  # deploy(): leave the deployment's follow_alias as it is


def set_logging(
    app: Appliance, name: str, sample: float | None = None, requests: bool | None = None
) -> dict[str, Any]:
    """What a deployment's prediction log keeps: request metadata (on by default) and a
    share of its inputs and outputs (`sample`, 0 to 1; 0 by default). Workers follow within
    a few milliseconds, a k3s deployment's pods within seconds; nothing is restarted."""
    if sample is not None and (isinstance(sample, bool) or not 0 <= float(sample) <= 1):
        raise InvalidInput(f"--log-sample {sample!r}: expected a share between 0 and 1")
    dep = get_deployment(app, name)
    with app.db.transaction() as conn:
        if sample is not None:
            conn.execute(
                "UPDATE deployments SET log_sample = ? WHERE id = ?", (float(sample), dep["id"])
            )
        if requests is not None:
            conn.execute(
                "UPDATE deployments SET log_requests = ? WHERE id = ?", (int(requests), dep["id"])
            )
    if dep["backend"] == "k3s":  # its pods read them from the store, outside the write lock
        from appliance.core.k3s_serving import publish_logging

        publish_logging(app, name)
    row = app.db.one(
        "SELECT name, log_sample, log_requests FROM deployments WHERE id = ?", (dep["id"],)
    )
    assert row is not None
    return {
        "deployment": row["name"],
        "log_sample": row["log_sample"],
        "log_requests": bool(row["log_requests"]),
    }


def deploy_model(
    app: Appliance,
    model_ref: str,
    name: str | None = None,
    host: str | None = None,
    port: int | None = None,
    workers: int | None = None,
    follow_alias: bool = False,
    canary: float | None = None,
    auto_rollback: str | None = None,
    window: str | float | None = None,
    feature_service: str | None = None,
    resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """`appliance deploy REF --name NAME`: create the deployment (revision 1) on HOST:PORT
    (default 127.0.0.1, a free port) with N workers, or add the next revision to it; with
    `canary`, the new revision takes that percentage of the traffic until promoted. On k3s
    (`executor = "k3s"`) a new deployment is a Deployment of N replicas with `resources`
    (cpu, memory, gpu) per pod, and PORT its Service's node port. Every option is checked
    before anything is written."""
    model, selector = parse_ref(model_ref)
    ref_alias = selector if selector and not selector.isdigit() else None
    if follow_alias and ref_alias is None:
        raise InvalidInput(f"--follow-alias: {model_ref!r} names a version, not NAME@ALIAS")
    if canary is None and (auto_rollback is not None or window is not None):
        flag = "--auto-rollback" if auto_rollback is not None else "--window"
        raise InvalidInput(f"{flag}: only with --canary (it judges the canary)")
    if follow_alias and canary is not None:
        raise InvalidInput(
            "--follow-alias with --canary: the alias or the canary decides, not both"
        )
    name = name or model
    if app.db.one("SELECT 1 FROM deployments WHERE name = ?", (name,)) is None:
        if canary is not None:
            raise InvalidInput(
                f"--canary: deployment {name!r} does not exist yet; a canary needs a stable "
                "revision to split traffic with"
            )
        return create_deployment(
            app,
            name,
            model_ref,
            host=host or "127.0.0.1",
            port=port or 0,
            workers=1 if workers is None else workers,
            follow_alias=ref_alias if follow_alias else None,
            feature_service=feature_service,
            resources=resources,
        )
    if feature_service is not None:
        raise Conflict(
            f"--feature-service: deployment {name!r} exists and keeps the feature service it "
            "was created with (its callers' request shape); create another deployment"
        )
    if resources:
        raise Conflict(
            f"deployment {name!r} exists and keeps its pods' resources; create another "
            "deployment to change them"
        )
    if host is not None or port is not None or workers is not None:
        raise Conflict(
            f"deployment {name!r} exists and keeps its address and workers; to change them: "
            f"'deployments stop {name}' then 'deployments start {name} --port P --workers N'"
        )
    if canary is not None:
        return deploy_canary(app, name, model_ref, canary, auto_rollback, window)
    # --follow-alias starts following; deploying anything but the followed alias by hand
    # pins the deployment (the alias no longer decides). Written with the revision.
    followed = app.db.scalar("SELECT follow_alias FROM deployments WHERE name = ?", (name,))
    follow: Any = _KEEP
    if follow_alias:
        follow = ref_alias
    elif followed is not None and ref_alias != followed:
        follow = None
    return deploy(app, name, model_ref, follow=follow)


def create_deployment(
    app: Appliance,
    name: str,
    model_ref: str,
    start: bool = True,
    host: str = "127.0.0.1",
    port: int = 0,
    workers: int = 1,
    follow_alias: str | None = None,
    feature_service: str | None = None,
    resources: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Create deployment `name` serving `model_ref` as revision 1, and start its server.
    With a feature service (pinned to its version now), callers send entity keys only.
    With `executor = "k3s"` it is served on the cluster (`k3s_serving`): its manifest is
    applied in the transaction that records it, and this returns once it is rolled out."""
    from appliance.core.features import get_definition

    validate_name("deployment", name)
    _check_workers(workers)
    backend = "k3s" if app.settings.executor == "k3s" else "local"
    resources_json = None
    if backend == "k3s":
        from appliance.core.k3s_serving import check_backend, check_resources

        check_backend(app.settings, feature_service, port)
        resources_json = json.dumps(check_resources(resources))
    elif resources:
        raise InvalidInput(
            "--cpus/--memory/--gpus: the requests of a deployment's pods on k3s "
            "(executor = 'k3s'); a local server uses this machine as it is"
        )
    mv = _deployable(app, model_ref)
    service = None
    if feature_service is not None:
        trained = mv.get("feature_service") or ""
        if "@" not in feature_service and trained.partition("@")[0] == feature_service:
            service = trained  # NAME means the version the model was trained with
        else:
            service = get_definition(app, "service", feature_service)["ref"]
    now = utcnow()
    with app.db.transaction() as conn:
        if conn.execute("SELECT 1 FROM deployments WHERE name = ?", (name,)).fetchone():
            raise Conflict(f"deployment {name!r} already exists; use 'appliance deploy'")
        model_id = conn.execute(
            "SELECT model_id FROM model_versions WHERE id = ?", (mv["id"],)
        ).fetchone()[0]
        # on k3s 'serving' means applied to the cluster, which keeps it up, not the agent
        cur = conn.execute(
            "INSERT INTO deployments (name, model_id, current_revision, status, workers, "
            "follow_alias, feature_service, created_at, updated_at, backend, resources_json, "
            "host, port) VALUES (?, ?, 0, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                name,
                model_id,
                "serving" if start and backend == "k3s" else "stopped",
                workers,
                follow_alias,
                service,
                now,
                now,
                backend,
                resources_json,
                host if backend == "k3s" else None,
                (port or None) if backend == "k3s" else None,
            ),
        )
        _still_deployable(conn, mv)
        _append_revision(app, conn, int(cur.lastrowid or 0), name, mv, "deploy")
    if backend == "k3s":
        return wait_served(app, name)
    if start:
        return start_deployment(app, name, host=host, port=port)
    return get_deployment(app, name)


def _check_workers(workers: int) -> None:
    if not 1 <= workers <= MAX_WORKERS:
        raise InvalidInput(f"--workers {workers}: must be between 1 and {MAX_WORKERS}")


def deploy(
    app: Appliance,
    name: str,
    model_ref: str,
    action: str = "deploy",
    follow: Any = _KEEP,
) -> dict[str, Any]:
    """Serve another version of the deployment's model as a new revision (deploying the
    version already served adds nothing). `follow` sets the alias it follows, in the same
    transaction."""
    mv = _deployable(app, model_ref)
    with app.db.transaction() as conn:
        dep_id, canary, current = _locked_deployment(conn, name, mv)
        if canary is not None:
            raise Conflict(
                f"deployment {name!r} has canary revision {canary}: "
                f"'deployments promote {name}' or 'deployments abort {name}' first"
            )
        _still_deployable(conn, mv)
        if follow is not _KEEP:
            conn.execute("UPDATE deployments SET follow_alias = ? WHERE id = ?", (follow, dep_id))
        if _version_of(conn, dep_id, current) != mv["id"]:
            _append_revision(app, conn, dep_id, name, mv, action)
    return wait_served(app, name)


def _version_of(conn: sqlite3.Connection, deployment_id: int, revision: int) -> int:
    return conn.execute(
        "SELECT model_version_id FROM deployment_revisions WHERE deployment_id = ? "
        "AND revision = ?",
        (deployment_id, revision),
    ).fetchone()[0]


def deploy_canary(
    app: Appliance,
    name: str,
    model_ref: str,
    percent: float,
    rule: str | None = None,
    window: str | float | None = None,
) -> dict[str, Any]:
    """Send `percent` of the traffic to a new revision; with `rule`, the server rolls it back
    by itself when the rule holds over `window`."""
    from appliance.core.jobs import parse_duration
    from appliance.core.traffic import parse_rule

    if not 0 < percent < 100:
        raise InvalidInput(f"--canary {percent:g}: a percentage between 0 and 100 (exclusive)")
    terms = parse_rule(rule).terms if rule is not None else ()
    for metric, _, limit in terms:
        if not math.isfinite(limit):  # 400 digits: no float holds them, so never crossed
            # (refused here, not by parse_rule: a rule stored before must still be read)
            raise InvalidInput(f"--auto-rollback: {metric}'s threshold is not a finite number")
    seconds = parse_duration(window if window is not None else "60s", "--window")
    if not 1 <= seconds <= MAX_CANARY_WINDOW:
        raise InvalidInput(f"--window {window}: between 1s and {MAX_CANARY_WINDOW / 60:.0f}m")
    mv = _deployable(app, model_ref)
    with app.db.transaction() as conn:
        dep_id, canary, current = _locked_deployment(conn, name, mv)
        if canary is not None:
            raise Conflict(f"deployment {name!r} already has canary revision {canary}")
        if _version_of(conn, dep_id, current) == mv["id"]:
            raise Conflict(f"{mv['ref']} is already the stable version of {name!r}")
        _still_deployable(conn, mv)
        conn.execute(
            "UPDATE deployments SET canary_percent = ?, canary_rule = ?, canary_window_s = ? "
            "WHERE id = ?",
            (percent, rule, seconds, dep_id),
        )
        _append_revision(
            app,
            conn,
            dep_id,
            name,
            mv,
            "canary",
            reason=f"canary {percent:g}%"
            + (f", auto-rollback if {rule} over {seconds:g}s" if rule else ""),
        )
    return wait_served(app, name)


def _end_canary_in(
    conn: sqlite3.Connection,
    dep_id: int,
    canary: int,
    outcome: str,
    reason: str | None,
    actor: str | None,
) -> None:
    """Close the canary revision (promoted or aborted, why, who) inside a transaction."""
    conn.execute(
        "UPDATE deployment_revisions SET outcome = ?, reason = coalesce(?, reason), "
        "actor = ? WHERE deployment_id = ? AND revision = ?",
        (outcome, reason, actor or current_actor(), dep_id, canary),
    )
    # Promoting serves a version chosen by hand: an alias it followed no longer decides.
    promoted = (
        ", current_revision = canary_revision, follow_alias = NULL" if outcome == "promoted" else ""
    )
    conn.execute(
        f"UPDATE deployments SET canary_revision = NULL, canary_percent = NULL, "
        f"canary_rule = NULL, canary_window_s = NULL{promoted}, "
        "generation = generation + 1, updated_at = ? WHERE id = ?",
        (utcnow(), dep_id),
    )


def end_canary(
    app: Appliance,
    name: str,
    outcome: str,
    reason: str | None,
    actor: str | None,
    expected: int | None = None,
) -> int | None:
    """End the running canary; with `expected`, only if that revision is still the canary
    (the server's judge must not end a newer canary on an older one's figures)."""
    with app.db.transaction() as conn:
        dep_id, canary, _ = _locked_deployment(conn, name)
        if expected is not None and canary != expected:
            return None
        if canary is None:
            verb = {"promoted": "promote", "aborted": "abort"}[outcome]
            raise Conflict(f"deployment {name!r} has no canary to {verb}")
        _end_canary_in(conn, dep_id, canary, outcome, reason, actor)
    return int(canary)


def promote_canary(app: Appliance, name: str, reason: str | None = None) -> dict[str, Any]:
    """Make the canary revision the one that takes all the traffic."""
    end_canary(app, name, "promoted", reason, None)
    return wait_served(app, name)


def abort_canary(
    app: Appliance,
    name: str,
    reason: str | None = None,
    actor: str | None = None,
    wait: bool = True,
    expected: int | None = None,
) -> dict[str, Any]:
    """Send all the traffic back to the stable revision; the canary's revision keeps why."""
    end_canary(app, name, "aborted", reason or "aborted", actor, expected)
    return wait_served(app, name) if wait else get_deployment(app, name)


def _changed(name: str) -> Changed:
    return Changed(f"deployment {name!r} changed since it was judged")


def rollback(
    app: Appliance,
    name: str,
    to_revision: int | None = None,
    reason: str | None = None,
    expected: tuple[int, int | None] | None = None,
) -> dict[str, Any]:
    """Go back to the model version of an earlier live revision (default: the one before the
    current). A running canary is aborted with it, in one transaction: a rollback means
    'back to known good'. A target whose model file is gone or damaged changes nothing.
    `reason`: why, kept in the history (a monitor names itself and its rule). `expected`:
    the (revision, canary revision) the caller judged; another raises Changed."""
    if to_revision is not None and to_revision < 1:
        raise InvalidInput(f"--to-revision {to_revision}: revisions start at 1")
    dep = get_deployment(app, name)
    if expected is not None and (dep["current_revision"], dep["canary_revision"]) != expected:
        raise _changed(name)
    if dep["canary_revision"] is not None and to_revision is None:
        # With a canary running, known good is the stable revision: end the canary only.
        ended = end_canary(
            app, name, "aborted", reason or "rolled back", None, expected=dep["canary_revision"]
        )
        if ended is None and expected is not None:  # promoted or replaced meanwhile
            raise _changed(name)
        return wait_served(app, name)
    live = app.db.rows(
        "SELECT r.revision, mv.version FROM deployment_revisions r "
        "JOIN model_versions mv ON mv.id = r.model_version_id WHERE r.deployment_id = ? "
        "AND r.revision < ? AND (r.action != 'canary' OR r.outcome = 'promoted') "
        "ORDER BY r.revision DESC",
        (dep["id"], dep["current_revision"]),
    )
    if to_revision is None:
        earlier = [r for r in live if r["version"] != dep["model_version"]]
        if not earlier:
            raise Conflict(f"deployment {name!r} has no earlier revision to roll back to")
        target = earlier[0]  # the last live revision that served another version
    else:
        if to_revision >= dep["current_revision"]:
            raise InvalidInput(
                f"--to-revision {to_revision}: must be earlier than {dep['current_revision']}"
            )
        matches = [r for r in live if r["revision"] == to_revision]
        if not matches:
            raise NotFound(
                f"deployment {name!r} has no revision {to_revision} that served traffic "
                "(an aborted canary cannot be a rollback target)"
            )
        target = matches[0]
    mv = _deployable(app, f"{dep['model']}@{target['version']}")  # refused before any change
    with app.db.transaction() as conn:
        dep_id, canary, current = _locked_deployment(conn, name, mv)
        if expected is not None and (current, canary) != expected:
            raise _changed(name)
        if current != dep["current_revision"]:
            raise Conflict(f"deployment {name!r} changed meanwhile; run the rollback again")
        _still_deployable(conn, mv)
        if canary is not None:
            _end_canary_in(conn, dep_id, canary, "aborted", reason or "rolled back", None)
        # a rollback is a version chosen by hand: an alias it followed no longer decides
        conn.execute("UPDATE deployments SET follow_alias = NULL WHERE id = ?", (dep_id,))
        if _version_of(conn, dep_id, current) != mv["id"]:
            # on k3s: the target revision's manifest, exactly as it was applied then
            stored = conn.execute(
                "SELECT manifest_json FROM deployment_revisions WHERE deployment_id = ? "
                "AND revision = ?",
                (dep_id, target["revision"]),
            ).fetchone()[0]
            _append_revision(
                app, conn, dep_id, name, mv, "rollback", reason=reason, manifest=stored
            )
    return wait_served(app, name)


def follow_alias_moved(
    app: Appliance, conn: sqlite3.Connection, model: str, alias: str, mv: dict[str, Any]
) -> list[str]:
    """In the alias move's transaction: a revision for each deployment that follows
    `model@alias`. A canary running there is aborted: the alias decides what it serves.
    When a follower could not serve `mv` (its model file is missing or damaged), the move is
    refused and nothing changes."""
    rows = conn.execute(
        "SELECT d.id, d.name, d.canary_revision, r.model_version_id FROM deployments d "
        "JOIN registered_models m ON m.id = d.model_id "
        "JOIN deployment_revisions r ON r.deployment_id = d.id "
        "AND r.revision = d.current_revision WHERE m.name = ? AND d.follow_alias = ?",
        (model, alias),
    ).fetchall()
    if rows:
        try:
            app.objects.get_file(mv["sha256"])
        except ApplianceError as exc:
            names = ", ".join(r[1] for r in rows)
            raise Conflict(
                f"{model}@{alias} not moved: deployment(s) {names} follow it and "
                f"{mv['ref']} cannot be served: {exc.message}"
            ) from exc
    moved = []
    why = f"{model}@{alias} moved to {mv['ref']}"
    for dep_id, name, canary, current in rows:
        if canary is not None:
            _end_canary_in(conn, dep_id, canary, "aborted", why, None)
        if current != mv["id"]:
            _append_revision(app, conn, dep_id, name, mv, "follow", reason=why)
        if canary is not None or current != mv["id"]:
            moved.append(name)
    return moved


def start_deployment(
    app: Appliance,
    name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    workers: int | None = None,
) -> dict[str, Any]:
    """Start the deployment's server as a detached process and wait until every worker is
    ready; the agent (started here if needed) restarts it if it dies. On k3s: apply the
    current revision's stored manifest again (its replicas and node port as recorded) and
    wait for the rollout."""
    from appliance.core.agent import ensure_agent

    if get_deployment(app, name)["backend"] == "k3s":  # validates the name, too
        return _start_on_cluster(app, name, workers)
    if workers is not None:
        _check_workers(workers)
        if get_deployment(app, name)["status"] == "serving":
            raise Conflict(f"deployment {name!r} is running; stop it to change its workers")
        app.db.execute("UPDATE deployments SET workers = ? WHERE name = ?", (workers, name))
    with exclusive(app.settings.home / "locks" / f"deployment-{name}.lock"):
        dep = get_deployment(app, name)
        if dep["status"] != "serving":
            dep = _spawn_server(app, name, host, port)
    ensure_agent(app)
    return dep


def _start_on_cluster(app: Appliance, name: str, workers: int | None) -> dict[str, Any]:
    from appliance.core.k3s_serving import apply_revision

    if workers is not None:
        raise Conflict(
            f"--workers: deployment {name!r} runs on k3s, where each revision's manifest fixes "
            "its replicas; create another deployment with --workers"
        )
    with app.db.transaction() as conn:
        dep_id, _, current = _locked_deployment(conn, name)
        conn.execute(
            "UPDATE deployments SET status = 'serving', updated_at = ? WHERE id = ?",
            (utcnow(), dep_id),
        )
        manifest = conn.execute(
            "SELECT manifest_json FROM deployment_revisions WHERE deployment_id = ? "
            "AND revision = ?",
            (dep_id, current),
        ).fetchone()[0]
        apply_revision(app.settings, conn, dep_id, name, current, manifest, starting=True)
    return wait_served(app, name)


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
    try:
        return _wait_ready(app, name, proc, log_path)
    except BaseException:  # not ready, or the wait failed: stopped and reaped here, as no
        _discard(proc)  # caller learns of it (the agent reaps only what it started)
        raise


def _wait_ready(
    app: Appliance, name: str, proc: subprocess.Popen[bytes], log_path: Path
) -> dict[str, Any]:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
            raise ApplianceError(
                f"deployment {name}: server exited with code {proc.returncode}: "
                f"{tail[0] if tail else 'no output'} (log: {log_path})"
            )
        try:
            dep = get_deployment(app, name)
        except sqlite3.OperationalError as exc:  # busy or locked: not known ready yet
            if (getattr(exc, "sqlite_errorcode", None) or 0) & 0xFF not in SQLITE_BUSY_LOCKED:
                raise
            time.sleep(0.05)
            continue
        if dep["status"] == "serving" and dep["pid"] == proc.pid:
            try:
                with urllib.request.urlopen(f"{dep['url']}/v2/health/ready", timeout=5):
                    return dep
            except (urllib.error.URLError, OSError):
                pass
        time.sleep(0.05)
    raise ApplianceError(f"deployment {name}: server not ready after {READY_TIMEOUT:.0f}s")


def _discard(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server that did not get ready, and reap it (bounded: a process stuck in the
    kernel is left to its parent's exit)."""
    proc.terminate()
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5)


def crashed_deployments(app: Appliance) -> list[dict[str, Any]]:
    """Deployments meant to serve whose server is gone (a crash, a reboot)."""
    rows = app.db.rows(
        "SELECT name, host, port, pid FROM deployments WHERE status = 'serving' "
        "AND backend = 'local' ORDER BY name"
    )
    return [r for r in rows if not alive(r["pid"])]


def restart_deployment(app: Appliance, name: str, host: str, port: int) -> dict[str, Any] | None:
    """Start a crashed deployment's server again, on its address when that is free; None
    when there is nothing to start (stopped meanwhile, or already back). When the start
    fails, the deployment is kept wanted on its address, for the agent's next try."""
    with exclusive(app.settings.home / "locks" / f"deployment-{name}.lock"):
        dep = get_deployment(app, name)
        wanted = app.db.scalar("SELECT status FROM deployments WHERE name = ?", (name,))
        if wanted != "serving" or dep["status"] == "serving":
            return None
        try:
            try:
                return _spawn_server(app, name, host or "127.0.0.1", port or 0)
            except ApplianceError:
                return _spawn_server(app, name, host or "127.0.0.1", 0)  # the port was taken
        except BaseException:
            # A server stopped on its way up records itself stopped as it exits, and one on a
            # fallback port recorded that port: the deployment is still wanted, on its address
            # (a stop waits for this lock), so the agent tries again.
            try:
                app.db.execute(
                    "UPDATE deployments SET status = CASE status WHEN 'stopped' THEN 'serving' "
                    "ELSE status END, host = ?, port = ?, updated_at = ? WHERE name = ?",
                    (host, port, utcnow(), name),
                )
            except sqlite3.Error as exc:
                print(
                    f"{utcnow()} deployment {name}: could not keep it wanted on its address "
                    f"after the failed restart: {exc}",
                    file=sys.stderr,
                    flush=True,
                )
            raise


def stop_deployment(app: Appliance, name: str, timeout: float = 10.0) -> dict[str, Any]:
    """Stop the deployment's server; its revisions and history stay. On k3s: delete its
    Deployment and Service, then record it stopped."""
    if get_deployment(app, name)["backend"] == "k3s":  # validates the name, too
        from appliance.core.k3s_serving import delete

        delete(app.settings, name)
        app.db.execute(
            "UPDATE deployments SET status = 'stopped', updated_at = ? WHERE name = ?",
            (utcnow(), name),
        )
        return get_deployment(app, name)
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
