"""Pipeline triggers: a cron schedule, or a new version of a dataset, starts a run; the agent
fires them.

A trigger keeps what it last saw (the time it last fired, the dataset version it last ran
for), so downtime collapses into one firing: after a night switched off, a daily schedule
runs once when the agent returns, not once per missed day, and three versions that landed
meanwhile start one run, with the newest. When a trigger fires while a run of the same
pipeline is queued or running, its policy decides: `queue` (the default) queues one run
behind it (a firing while one already waits is folded into that one), `skip` records the
firing as skipped. Runs of one pipeline never overlap, so two deploys never race.
"""

from __future__ import annotations

import json
import sqlite3
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.cron import parse_cron
from appliance.core.pipeline_runs import create_run
from appliance.core.pipelines import load_pipeline
from appliance.core.runs import new_id
from appliance.errors import ApplianceError, InvalidInput, NotFound
from appliance.store.db import utcnow

POLICIES = ("queue", "skip")


def _check_policy(policy: str) -> None:
    if policy not in POLICIES:
        raise InvalidInput(f"--policy {policy!r}: expected one of {', '.join(POLICIES)}")


def schedule_pipeline(
    app: Appliance,
    path: str | Path,
    cron: str,
    overrides: list[str] | tuple[str, ...] = (),
    policy: str = "queue",
) -> dict[str, Any]:
    """Run a pipeline file on a cron schedule (local time), from the next matching minute."""
    _check_policy(policy)
    expression = parse_cron(cron)
    expression.next_after(datetime.now())  # one that never matches is refused now
    file = Path(path).resolve()
    pipeline = load_pipeline(file, list(overrides))
    return _create(
        app,
        pipeline.name,
        file,
        "schedule",
        policy,
        list(overrides),
        cron=cron,
    )


def on_new_version(
    app: Appliance,
    path: str | Path,
    dataset: str,
    param: str | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    policy: str = "queue",
) -> dict[str, Any]:
    """Run a pipeline file whenever dataset `dataset` gets a new version, with that version
    (`NAME@N`) as parameter `param` (default: the parameter whose default is the dataset's
    name). Versions that exist now do not fire it."""
    from appliance.core.names import validate_name

    _check_policy(policy)
    validate_name("--dataset", dataset)
    file = Path(path).resolve()
    pipeline = load_pipeline(file, list(overrides))
    if param is None:
        matches = [k for k, v in pipeline.params.items() if v == dataset]
        if len(matches) != 1:
            raise InvalidInput(
                f"--param-name: say which parameter gets the new version of {dataset!r} "
                f"(the pipeline's parameters: {', '.join(pipeline.params) or 'none'})"
            )
        param = matches[0]
    if param not in pipeline.params:
        raise InvalidInput(
            f"--param-name {param!r}: the pipeline has no such parameter "
            f"({', '.join(pipeline.params) or 'none'})"
        )
    load_pipeline(file, [*overrides, f"{param}={dataset}@1"])  # the value type-checks
    return _create(
        app,
        pipeline.name,
        file,
        "dataset",
        policy,
        list(overrides),
        dataset=dataset,
        param=param,
        last_version=_latest_version(app, dataset),
    )


def _create(
    app: Appliance,
    pipeline: str,
    source: Path,
    kind: str,
    policy: str,
    overrides: list[str],
    **fields: Any,
) -> dict[str, Any]:
    from appliance.core.agent import ensure_agent

    trigger_id = new_id()
    columns = {
        "id": trigger_id,
        "pipeline": pipeline,
        "source": str(source),
        "kind": kind,
        "policy": policy,
        "params_json": json.dumps(overrides),
        "last_fired_at": time.time(),
        "created_at": utcnow(),
        **fields,
    }
    names = ", ".join(columns)
    marks = ", ".join("?" for _ in columns)
    app.db.execute(
        f"INSERT INTO pipeline_triggers ({names}) VALUES ({marks})", tuple(columns.values())
    )
    ensure_agent(app)  # the agent fires triggers, and stays up while any exists
    return get_trigger(app, trigger_id)


def _latest_version(app: Appliance, dataset: str) -> int:
    return int(
        app.db.scalar(
            "SELECT coalesce(max(dv.version), 0) FROM dataset_versions dv "
            "JOIN datasets d ON d.id = dv.dataset_id WHERE d.name = ?",
            (dataset,),
        )
        or 0
    )


def _shape(row: dict[str, Any]) -> dict[str, Any]:
    when = (
        f"cron {row['cron']}"
        if row["kind"] == "schedule"
        else f"new version of {row['dataset']} -> {row['param']}"
    )
    next_at = None
    if row["kind"] == "schedule":
        try:
            start = datetime.fromtimestamp(max(row["last_fired_at"], time.time()))
            next_at = parse_cron(row["cron"]).next_after(start).isoformat(timespec="minutes")
        except ApplianceError:
            next_at = None
    return {
        "id": row["id"],
        "pipeline": row["pipeline"],
        "kind": row["kind"],
        "when": when,
        "policy": row["policy"],
        "params": json.loads(row["params_json"]),
        "next": next_at,
        "last_version": row["last_version"] if row["kind"] == "dataset" else None,
        "last_run": row["last_run_id"],
        "last_message": row["last_message"],
        "source": row["source"],
        "created_at": row["created_at"],
    }


def get_trigger(app: Appliance, trigger_id: str) -> dict[str, Any]:
    row = app.db.one("SELECT * FROM pipeline_triggers WHERE id = ?", (trigger_id,))
    if row is None:
        raise NotFound(f"pipeline trigger {trigger_id!r} not found")
    return _shape(row)


def list_triggers(app: Appliance) -> list[dict[str, Any]]:
    """Every schedule and dataset trigger, with when it fires next and what it last did."""
    return [_shape(r) for r in app.db.rows("SELECT * FROM pipeline_triggers ORDER BY created_at")]


def remove_trigger(app: Appliance, trigger_id: str) -> dict[str, Any]:
    """Stop a trigger from firing (runs it started are kept)."""
    trigger = get_trigger(app, trigger_id)
    app.db.execute("DELETE FROM pipeline_triggers WHERE id = ?", (trigger_id,))
    return trigger


def fire_triggers(app: Appliance, now: float | None = None) -> list[str]:
    """The agent's pass: fire every trigger that is due, at most once each; returns the
    runs started. A trigger whose pipeline file broke records why: a schedule fires again at
    its next time, a dataset trigger as soon as the file is fixed (for the version it saw)."""
    now = time.time() if now is None else now
    started = []
    for row in app.db.rows("SELECT * FROM pipeline_triggers ORDER BY created_at"):
        try:
            run_id = _fire_if_due(app, row, now)
        except (sqlite3.Error, OSError):
            raise  # the store's trouble: the agent's next pass tries again
        except Exception as exc:  # one broken trigger must not stop the others (or the agent)
            app.db.execute(
                "UPDATE pipeline_triggers SET last_message = ? WHERE id = ?",
                (f"{utcnow()} not started: {exc!r}", row["id"]),
            )
            continue
        if run_id:
            started.append(run_id)
    return started


def _fire_if_due(app: Appliance, row: dict[str, Any], now: float) -> str | None:
    """Fire one trigger if it is due; the run it started, if any."""
    overrides = list(json.loads(row["params_json"]))
    if row["kind"] == "schedule":
        due = parse_cron(row["cron"]).next_after(datetime.fromtimestamp(row["last_fired_at"]))
        if due.timestamp() > now:
            return None
        # every firing missed while down collapses into this one
        marks = {"last_fired_at": now}
        label = f"schedule:{row['id']}"
    else:
        latest = _latest_version(app, row["dataset"])
        if latest <= row["last_version"]:
            return None
        overrides.append(f"{row['param']}={row['dataset']}@{latest}")
        marks = {"last_version": latest, "last_fired_at": now}
        label = f"dataset:{row['id']}"
    if not _claim(app, row, marks):
        return None  # fired by someone else meanwhile: once is once
    run_id, message, broken = _fire(app, row, overrides, label)
    unclaim = ""
    if broken and row["kind"] == "dataset":
        # the file is broken now: that version starts a run once it is fixed
        unclaim = ", last_version = ?"
    app.db.execute(
        "UPDATE pipeline_triggers SET last_message = ?, "
        f"last_run_id = coalesce(?, last_run_id){unclaim} WHERE id = ?",
        (message, run_id, *([row["last_version"]] if unclaim else []), row["id"]),
    )
    return run_id


def _claim(app: Appliance, row: dict[str, Any], marks: dict[str, Any]) -> bool:
    """Take this firing: moves what the trigger saw on only if nobody moved it first."""
    sets = ", ".join(f"{k} = ?" for k in marks)
    with app.db.transaction() as conn:
        cur = conn.execute(
            f"UPDATE pipeline_triggers SET {sets} WHERE id = ? AND last_fired_at = ? "
            "AND last_version = ?",
            (*marks.values(), row["id"], row["last_fired_at"], row["last_version"]),
        )
        return cur.rowcount == 1


def _fire(
    app: Appliance, row: dict[str, Any], overrides: list[str], label: str
) -> tuple[str | None, str, bool]:
    """Start the run (or fold, or skip, by the policy): (run id, what happened, whether the
    pipeline file could not be used)."""
    active = app.db.rows(
        "SELECT id, state, trigger, started_at, attempt, params_json FROM pipeline_runs "
        "WHERE pipeline = ? AND state IN ('queued', 'running') ORDER BY rowid",
        (row["pipeline"],),
    )
    stamp = utcnow()
    if active and row["policy"] == "skip":
        return None, f"{stamp} skipped: run {active[0]['id']} is {active[0]['state']}", False
    # only a run that never started takes a later firing: a retried one keeps what it ran
    waiting = [
        r
        for r in active
        if r["state"] == "queued"
        and r["trigger"] == label
        and r["started_at"] is None
        and r["attempt"] == 1
    ]
    if waiting:
        if row["kind"] == "dataset":  # it takes the newest version instead; nothing else
            params = json.loads(waiting[0]["params_json"])
            params[row["param"]] = overrides[-1].partition("=")[2]
            app.db.execute(
                "UPDATE pipeline_runs SET params_json = ? WHERE id = ? AND state = 'queued' "
                "AND started_at IS NULL",
                (json.dumps(params, sort_keys=True), waiting[0]["id"]),
            )
        return None, f"{stamp} folded into run {waiting[0]['id']}, which waits already", False
    try:
        pipeline = load_pipeline(row["source"], overrides)
        run = create_run(app, pipeline, trigger=label)
    except ApplianceError as exc:
        return None, f"{stamp} not started: {exc.message}", True
    note = f" (queued behind {active[0]['id']})" if active else ""
    return run["id"], f"{stamp} started run {run['id']}{note}", False


def has_triggers(app: Appliance) -> bool:
    return bool(app.db.scalar("SELECT count(*) FROM pipeline_triggers"))
