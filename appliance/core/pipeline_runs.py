"""Pipeline runs: a checked pipeline submitted as a DAG of steps the agent drives, with step
caching, retry from the failed step, and history.

Every state lives in SQLite, so a run survives the agent's restart or a reboot: the agent's
pass (`advance_pipelines`) reads each active run and moves it on. A step's job is written
in the same transaction as the step's move to `running` (the `record` of `submit_job`), so
a crash never leaves a step whose job nobody knows about, and a finished job is turned into
outputs exactly once (a conditional update). Runs of one pipeline go one at a time, oldest
first: a run submitted or triggered while another runs waits `queued` (two runs never
deploy at once).
"""

from __future__ import annotations

import json
import sqlite3
import time
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.pipeline_steps import (
    NOT_CACHED,
    StepContext,
    abandon_study,
    cache_key,
    differences,
    job_outputs,
    key_material,
    snapshot_files,
    start_step,
    still_holds,
)
from appliance.core.pipelines import (
    DATASET,
    DEPLOYMENT,
    KINDS,
    RUN,
    VERSION,
    Pipeline,
    check_values,
    load_pipeline,
    parse_pipeline,
    resolve,
)
from appliance.core.runs import new_id
from appliance.errors import ApplianceError, Conflict, InvalidInput, NotFound
from appliance.store.db import parse_utc, utcnow

ACTIVE = ("queued", "running")
DONE = ("succeeded", "cached", "skipped")
PIPELINE_CONTEXT = "PipelineRun"
MAX_INTERRUPTIONS = 3  # a step interrupted this often (not failed by itself) fails


# ---- submitting ---------------------------------------------------------------------------


def run_pipeline(
    app: Appliance,
    path: str | Path,
    overrides: Iterable[str] = (),
    no_cache: bool = False,
    trigger: str = "manual",
) -> dict[str, Any]:
    """Check a pipeline file whole, then queue a run of it for the agent."""
    return create_run(app, load_pipeline(path, list(overrides)), no_cache, trigger)


def create_run(
    app: Appliance, pipeline: Pipeline, no_cache: bool = False, trigger: str = "manual"
) -> dict[str, Any]:
    """Queue a run of a checked pipeline: the run and all its steps, in one transaction."""
    from appliance.core.agent import ensure_agent

    run_id = new_id()
    snapshot_files(app, run_id, pipeline)  # before the run exists: a run always has them
    with app.db.transaction() as conn:
        conn.execute(
            "INSERT INTO pipeline_runs (id, pipeline, definition_json, source, base_dir, "
            "params_json, state, trigger, no_cache, created_at) "
            "VALUES (?, ?, ?, ?, ?, ?, 'queued', ?, ?, ?)",
            (
                run_id,
                pipeline.name,
                json.dumps(pipeline.definition, sort_keys=True),
                pipeline.source,
                str(pipeline.base) if pipeline.base else None,
                json.dumps(pipeline.params, sort_keys=True),
                trigger,
                int(no_cache),
                utcnow(),
            ),
        )
        conn.executemany(
            "INSERT INTO pipeline_steps (run_id, step, kind, position, after_json, state) "
            "VALUES (?, ?, ?, ?, ?, 'pending')",
            [
                (
                    run_id,
                    name,
                    pipeline.steps[name].kind,
                    position,
                    json.dumps(sorted(pipeline.steps[name].after)),
                )
                for position, name in enumerate(pipeline.order)
            ],
        )
    ensure_agent(app)
    return get_run(app, run_id)


def _stored_pipeline(run: dict[str, Any]) -> Pipeline:
    """The run's own copy of its definition, checked again (never the file as it is now)."""
    base = Path(run["base_dir"]) if run["base_dir"] else None
    pipeline = parse_pipeline(json.loads(run["definition_json"]), run["source"], None)
    pipeline.params = json.loads(run["params_json"])
    pipeline.base = base
    return pipeline


# ---- the agent's pass -----------------------------------------------------------------------


def advance_pipelines(app: Appliance) -> bool:
    """Move every active run on as far as it can go now; True while any run is active."""
    runs = app.db.rows(
        "SELECT * FROM pipeline_runs WHERE state IN ('queued', 'running') ORDER BY rowid"
    )
    for run in runs:
        try:
            advance_run(app, run)
        except (sqlite3.Error, OSError):
            raise  # the store's trouble: the agent's pass retries
        except Exception as exc:  # the run's own fault, or a defect: stop this run, never
            if not isinstance(exc, ApplianceError):  # the agent (and every other job)
                traceback.print_exc()
            message = exc.message if isinstance(exc, ApplianceError) else repr(exc)
            _stop_run(app, run["id"], f"the run could not go on: {message}")
    return bool(runs)


def advance_run(app: Appliance, run: dict[str, Any]) -> None:
    """One run: start it when its pipeline is free, settle finished step jobs, start (or
    take from the cache) every step whose inputs are ready, and end it when nothing is left."""
    if run["state"] == "queued":
        if run["cancel_requested"]:
            _end_run(app, run["id"], "cancelled", "cancelled before it started")
            return
        busy = app.db.scalar(
            "SELECT id FROM pipeline_runs WHERE pipeline = ? AND state = 'running' AND id != ?",
            (run["pipeline"], run["id"]),
        )
        earlier = app.db.scalar(  # by rowid: two runs queued in one millisecond keep order
            "SELECT id FROM pipeline_runs WHERE pipeline = ? AND state = 'queued' "
            "AND rowid < (SELECT rowid FROM pipeline_runs WHERE id = ?)",
            (run["pipeline"], run["id"]),
        )
        if busy or earlier:
            return
        app.db.execute(
            "UPDATE pipeline_runs SET state = 'running', started_at = coalesce(started_at, ?) "
            "WHERE id = ? AND state = 'queued'",
            (utcnow(), run["id"]),
        )
    pipeline = _stored_pipeline(run)
    progressed = True
    while progressed:
        progressed = False
        run = app.db.one("SELECT * FROM pipeline_runs WHERE id = ?", (run["id"],)) or run
        steps = _steps(app, run["id"])
        for step in steps.values():
            if step["state"] == "running":
                progressed |= _settle(app, run, step)
        if run["cancel_requested"]:
            break
        steps = _steps(app, run["id"])
        outputs = {
            n: json.loads(s["outputs_json"] or "{}")
            for n, s in steps.items()
            if s["state"] in ("succeeded", "cached")
        }
        for name in pipeline.order:
            step = steps[name]
            if step["state"] != "pending":
                continue
            deps = [steps[d]["state"] for d in json.loads(step["after_json"])]
            if "skipped" in deps:
                progressed |= _mark(app, run["id"], name, "skipped", error="an input was skipped")
            elif all(d in ("succeeded", "cached") for d in deps):
                progressed |= _begin(app, run, pipeline, name, outputs)
    run = app.db.one("SELECT * FROM pipeline_runs WHERE id = ?", (run["id"],)) or run
    if run["cancel_requested"]:
        for step in _steps(app, run["id"]).values():
            if step["state"] == "running" and step["job_id"]:
                _cancel_job(app, step["job_id"])
    steps = _steps(app, run["id"])
    if any(s["state"] == "running" for s in steps.values()):
        return
    if run["cancel_requested"]:  # by request, or stopped because it could not go on
        stopped = bool(run["error"])
        _end_run(
            app,
            run["id"],
            "failed" if stopped else "cancelled",
            run["error"] or "cancelled by request",
        )
    elif any(s["state"] in ("failed", "cancelled") for s in steps.values()):
        failed = next(s for s in steps.values() if s["state"] in ("failed", "cancelled"))
        _end_run(app, run["id"], "failed", f"step {failed['step']}: {failed['error']}")
    elif all(s["state"] in DONE for s in steps.values()):
        _end_run(app, run["id"], "succeeded", None)


def _update(app: Appliance, sql: str, params: tuple[Any, ...]) -> int:
    """One conditional write; how many rows it changed (0: someone else moved it first)."""
    with app.db.transaction() as conn:
        return int(conn.execute(sql, params).rowcount)


def _steps(app: Appliance, run_id: str) -> dict[str, dict[str, Any]]:
    rows = app.db.rows("SELECT * FROM pipeline_steps WHERE run_id = ? ORDER BY position", (run_id,))
    return {r["step"]: r for r in rows}


def _mark(app: Appliance, run_id: str, step: str, state: str, **fields: Any) -> bool:
    """Move a pending step to a final state without a job (skipped, cached, failed)."""
    sets = ", ".join(f"{k} = ?" for k in fields)
    cur = _update(
        app,
        f"UPDATE pipeline_steps SET state = ?, finished_at = ?{', ' + sets if sets else ''} "
        "WHERE run_id = ? AND step = ? AND state = 'pending'",
        (state, utcnow(), *fields.values(), run_id, step),
    )
    return cur == 1


def _begin(
    app: Appliance,
    run: dict[str, Any],
    pipeline: Pipeline,
    name: str,
    outputs: dict[str, dict[str, Any]],
) -> bool:
    """Start one ready step: skip it (`when` false), reuse a cached result, or submit its
    job. A step that cannot start fails with its reason; nothing else of the run changes."""
    step = pipeline.steps[name]
    try:
        args = resolve(step.args, pipeline.params, outputs)
        check_values(step, args, f"steps.{name}")
        when = args.pop("when", True)
        if not isinstance(when, bool):
            raise InvalidInput(f"steps.{name}.when: expected true or false, got {when!r}")
        if not when:
            return _mark(app, run["id"], name, "skipped", error="when: false")
        use_cache = not run["no_cache"] and args.get("cache", True) and step.kind not in NOT_CACHED
        ctx = StepContext(
            app, run["id"], pipeline.name, name, step.kind, args, pipeline.base, use_cache
        )
        material = key_material(ctx)
        key = cache_key(material)
        if material.get("always"):
            use_cache = ctx.use_cache = False
        hit, why = _lookup(app, run, name, step.kind, key, material, use_cache)
        cache = {"key": key, "material": material, "hit": hit is not None, "why": why}
        if hit is not None:
            cache["from"] = hit["origin"]
            now = utcnow()
            cur = _update(
                app,
                "UPDATE pipeline_steps SET state = 'cached', cache_key = ?, cache_json = ?, "
                "cached_from = ?, outputs_json = ?, started_at = ?, finished_at = ?, "
                "error = NULL, job_id = NULL, job_run_id = NULL "
                "WHERE run_id = ? AND step = ? AND state = 'pending'",
                (
                    key,
                    json.dumps(cache, sort_keys=True),
                    hit["origin"],
                    hit["outputs_json"],
                    now,
                    now,
                    run["id"],
                    name,
                ),
            )
            if cur == 1:
                _attribute(app, run["id"], step.kind, json.loads(hit["outputs_json"]), None)
            return cur == 1

        def record(conn: sqlite3.Connection, job_id: str, job_run_id: str) -> None:
            cur = conn.execute(
                "UPDATE pipeline_steps SET state = 'running', job_id = ?, job_run_id = ?, "
                "attempt = attempt + 1, cache_key = ?, cache_json = ?, cached_from = NULL, "
                "started_at = ?, finished_at = NULL, error = NULL "
                "WHERE run_id = ? AND step = ? AND state = 'pending'",
                (
                    job_id,
                    job_run_id,
                    key,
                    json.dumps(cache, sort_keys=True),
                    utcnow(),
                    run["id"],
                    name,
                ),
            )
            if cur.rowcount != 1:
                raise Conflict(f"step {name} of run {run['id']} was started meanwhile")
            if conn.execute(
                "SELECT cancel_requested FROM pipeline_runs WHERE id = ?", (run["id"],)
            ).fetchone()[0]:
                raise _RunCancelled(f"run {run['id']} was cancelled")  # rolls the job back
            _associate(conn, run["id"], f"run:{job_run_id}")

        started = start_step(
            ctx,
            record,
            {"pipeline.run": run["id"], "pipeline.step": name, "pipeline": pipeline.name},
        )
        if "outputs" in started:  # known without a job (a recipe's own cache)
            cache.update(hit=True, why=f"reused from {started['note']}")
            return _mark(
                app,
                run["id"],
                name,
                "cached",
                cache_key=key,
                cache_json=json.dumps(cache, sort_keys=True),
                outputs_json=json.dumps(started["outputs"], sort_keys=True),
                started_at=utcnow(),
                job_id=None,
                job_run_id=None,
            )
        return True
    except _RunCancelled:
        return False  # the run was cancelled meanwhile: the step stays pending (retry)
    except ApplianceError as exc:
        message = (
            exc.message if exc.message.startswith("steps.") else f"steps.{name}: {exc.message}"
        )
        return _mark(app, run["id"], name, "failed", error=message)
    except (sqlite3.Error, OSError):
        raise  # the store's trouble, not the step's: the agent's next pass tries again
    except Exception as exc:  # a value no check foresaw: this step fails, saying so
        traceback.print_exc()
        return _mark(app, run["id"], name, "failed", error=f"steps.{name}: {exc!r}")


class _RunCancelled(Conflict):
    """A cancel that arrived while a step was being submitted: nothing is submitted."""


def _lookup(
    app: Appliance,
    run: dict[str, Any],
    name: str,
    kind: str,
    key: str,
    material: dict[str, Any],
    use_cache: bool,
) -> tuple[dict[str, Any] | None, str]:
    """An earlier successful step with this key whose result still holds, and why it hit or
    missed, in words a person can act on."""
    if not use_cache:
        reason = "off for this run (--no-cache)" if run["no_cache"] else "off for this step"
        if kind in NOT_CACHED:
            reason = f"a {kind} step always runs"
        elif material.get("always") and not run["no_cache"]:
            reason = material["always"]
        return None, reason
    candidates = app.db.rows(
        "SELECT run_id, step, outputs_json, cached_from FROM pipeline_steps "
        "WHERE cache_key = ? AND state IN ('succeeded', 'cached') AND run_id != ? "
        "ORDER BY finished_at DESC LIMIT 5",
        (key, run["id"]),
    )
    stale = None
    for row in candidates:
        outputs = json.loads(row["outputs_json"] or "{}")
        reason = still_holds(app, kind, outputs)
        if reason is None:
            origin = row["cached_from"] or f"{row['run_id']}/{row['step']}"
            return {**row, "origin": origin}, f"same key as {origin}"
        stale = stale or reason
    if stale:
        return None, f"the earlier result no longer holds: {stale}"
    previous = app.db.one(
        "SELECT s.run_id, s.cache_json FROM pipeline_steps s JOIN pipeline_runs r "
        "ON r.id = s.run_id WHERE r.pipeline = ? AND s.step = ? AND s.run_id != ? "
        "AND s.state IN ('succeeded', 'cached') ORDER BY s.finished_at DESC LIMIT 1",
        (run["pipeline"], name, run["id"]),
    )
    if previous is None or not previous["cache_json"]:
        return None, "no earlier successful run of this step"
    changed = differences(json.loads(previous["cache_json"]).get("material", {}), material)
    if not changed:
        return None, f"no reusable result (run {previous['run_id']})"
    return None, f"changed since run {previous['run_id']}: " + "; ".join(changed[:4])


def _settle(app: Appliance, run: dict[str, Any], step: dict[str, Any]) -> bool:
    """A running step whose job ended: its outputs (succeeded) or its failure, once."""
    from appliance.core.jobs import FINAL_STATES, SUPERVISOR_GONE, get_job, reconcile_job

    try:
        job = get_job(app, step["job_id"])
    except NotFound:
        return _finish_step(app, run["id"], step, "failed", error="its job disappeared")
    if job["state"] == "running":
        job = reconcile_job(app, job)  # its supervisor may be gone (a reboot)
    if job["state"] not in FINAL_STATES:
        return False
    if job["state"] == "failed" and job["error"] == SUPERVISOR_GONE and not run["cancel_requested"]:
        # interrupted, not failed (a reboot, an OOM kill of its supervisor): the step runs
        # again by itself, a few times at most; its body is idempotent
        if step["interruptions"] < MAX_INTERRUPTIONS:
            return (
                _update(
                    app,
                    "UPDATE pipeline_steps SET state = 'pending', error = ?, "
                    "interruptions = interruptions + 1 "
                    "WHERE run_id = ? AND step = ? AND state = 'running' AND job_id = ?",
                    (
                        f"attempt {step['attempt']} interrupted: {SUPERVISOR_GONE}",
                        run["id"],
                        step["step"],
                        step["job_id"],
                    ),
                )
                == 1
            )
    if job["state"] != "succeeded" and step["kind"] == "tune":
        abandon_study(app, run["id"], step["step"])
    if job["state"] != "succeeded":
        state = "cancelled" if job["state"] == "cancelled" else "failed"
        return _finish_step(
            app, run["id"], step, state, error=f"job {job['id']} {job['state']}: {job['error']}"
        )
    detail = json.loads(step["cache_json"] or "{}")
    try:
        outputs = job_outputs(app, step["kind"], step["job_run_id"], detail)
    except ApplianceError as exc:
        return _finish_step(app, run["id"], step, "failed", error=exc.message)
    done = _finish_step(app, run["id"], step, "succeeded", outputs=outputs)
    if done:
        _attribute(app, run["id"], step["kind"], outputs, step["job_run_id"])
    return done


def _finish_step(
    app: Appliance,
    run_id: str,
    step: dict[str, Any],
    state: str,
    outputs: dict[str, Any] | None = None,
    error: str | None = None,
) -> bool:
    cur = _update(
        app,
        "UPDATE pipeline_steps SET state = ?, outputs_json = ?, error = ?, finished_at = ? "
        "WHERE run_id = ? AND step = ? AND state = 'running' AND job_id = ?",
        (
            state,
            json.dumps(outputs, sort_keys=True) if outputs is not None else None,
            error,
            utcnow(),
            run_id,
            step["step"],
            step["job_id"],
        ),
    )
    return cur == 1


def _stop_run(app: Appliance, run_id: str, error: str) -> None:
    """End a run that cannot go on: its running steps' jobs are cancelled first, and it
    ends `failed` (with `error`) once they have, never while a step of it still runs."""
    _update(
        app,
        "UPDATE pipeline_runs SET cancel_requested = 1, error = coalesce(error, ?) "
        "WHERE id = ? AND state IN ('queued', 'running')",
        (error, run_id),
    )
    from appliance.core.jobs import ACTIVE_STATES

    running = []
    for step in _steps(app, run_id).values():
        if step["state"] != "running":
            continue
        state = app.db.scalar("SELECT state FROM jobs WHERE id = ?", (step["job_id"],))
        if state in ACTIVE_STATES:
            _cancel_job(app, step["job_id"])
            running.append(step)
            if step["kind"] == "tune":
                abandon_study(app, run_id, step["step"])
        else:  # its job ended, but the run cannot take its outputs any more
            _finish_step(app, run_id, step, "cancelled", error="stopped with its run")
    if not running:
        _end_run(app, run_id, "failed", error)


def _end_run(app: Appliance, run_id: str, state: str, error: str | None) -> None:
    app.db.execute(
        "UPDATE pipeline_runs SET state = ?, error = ?, finished_at = ? "
        "WHERE id = ? AND state IN ('queued', 'running')",
        (state, error, utcnow(), run_id),
    )


def _cancel_job(app: Appliance, job_id: str) -> None:
    from appliance.core.jobs import request_cancel

    try:
        request_cancel(app, job_id)
    except ApplianceError:
        pass  # it ended meanwhile


# ---- lineage ----------------------------------------------------------------------------------


def _associate(conn: sqlite3.Connection, run_id: str, execution_ref: str) -> None:
    from appliance.core.lineage import associate

    associate(conn, (PIPELINE_CONTEXT, run_id), executions=[execution_ref])


def _attribute(
    app: Appliance, run_id: str, kind: str, outputs: dict[str, Any], job_run_id: str | None
) -> None:
    """What a step produced (or reused) points back to the pipeline run."""
    from appliance.core.lineage import associate

    refs = []
    for name, value in outputs.items():
        typed = KINDS[kind].outputs.get(name)
        if value is None:
            continue
        if typed == DATASET:
            refs.append(f"dataset:{value}")
        elif typed == VERSION:
            refs.append(f"model:{value}")
        elif typed == DEPLOYMENT and outputs.get("revision"):
            refs.append(f"deployment:{value}#{outputs['revision']}")
    executions = [f"run:{v}" for n, v in outputs.items() if KINDS[kind].outputs.get(n) == RUN]
    with app.db.transaction() as conn:
        associate(conn, (PIPELINE_CONTEXT, run_id), artifacts=refs, executions=executions)


# ---- asking about runs ------------------------------------------------------------------------


def _resolve_id(app: Appliance, ref: str) -> str:
    if not ref or not all(c in "0123456789abcdef" for c in ref):
        raise InvalidInput(f"pipeline run {ref!r}: expected its id (hexadecimal)")
    ids = [
        r["id"] for r in app.db.rows("SELECT id FROM pipeline_runs WHERE id LIKE ?", (ref + "%",))
    ]
    if not ids:
        raise NotFound(f"pipeline run {ref!r} not found")
    if len(ids) > 1:
        raise InvalidInput(f"pipeline run {ref!r} is ambiguous: matches {len(ids)} runs")
    return ids[0]


def _duration(start: str | None, end: str | None) -> float | None:
    if not start:
        return None
    finish = parse_utc(end) if end else time.time()
    return round(max(0.0, finish - parse_utc(start)), 3)


def get_run(app: Appliance, ref: str) -> dict[str, Any]:
    """A run's summary: state, parameters, and how many steps are in each state."""
    run_id = _resolve_id(app, ref)
    row = app.db.one("SELECT * FROM pipeline_runs WHERE id = ?", (run_id,))
    assert row is not None
    counts = {
        r["state"]: r["n"]
        for r in app.db.rows(
            "SELECT state, count(*) AS n FROM pipeline_steps WHERE run_id = ? GROUP BY state",
            (run_id,),
        )
    }
    return {
        "id": row["id"],
        "pipeline": row["pipeline"],
        "state": row["state"],
        "trigger": row["trigger"],
        "params": json.loads(row["params_json"]),
        "steps": sum(counts.values()),
        "done": sum(counts.get(s, 0) for s in DONE),
        "cached": counts.get("cached", 0),
        "counts": counts,
        "no_cache": bool(row["no_cache"]),
        "attempt": row["attempt"],
        "error": row["error"],
        "source": row["source"],
        "created_at": row["created_at"],
        "started_at": row["started_at"],
        "finished_at": row["finished_at"],
        "duration_s": _duration(row["started_at"], row["finished_at"]),
    }


def list_runs(app: Appliance, pipeline: str | None = None, limit: int = 100) -> list[dict]:
    """Runs, newest first, with their state and how many steps ran or came from the cache."""
    where, args = ("WHERE pipeline = ?", (pipeline,)) if pipeline else ("", ())
    rows = app.db.rows(
        f"SELECT id FROM pipeline_runs {where} ORDER BY created_at DESC, rowid DESC LIMIT ?",
        (*args, limit),
    )
    return [
        {
            k: v
            for k, v in get_run(app, r["id"]).items()
            if k not in ("counts", "source", "started_at")
        }
        for r in rows
    ]


def show_run(app: Appliance, ref: str) -> dict[str, Any]:
    """A run and its DAG: each step's state, what it waits for, duration, cache hit (and
    why it hit or missed), outputs, job and error."""
    run = get_run(app, ref)
    steps = []
    for s in _steps(app, run["id"]).values():
        cache = json.loads(s["cache_json"] or "{}")
        steps.append(
            {
                "step": s["step"],
                "kind": s["kind"],
                "state": s["state"],
                "after": json.loads(s["after_json"]),
                "attempt": s["attempt"],
                "interruptions": s["interruptions"],
                "duration_s": _duration(s["started_at"], s["finished_at"])
                if s["state"] != "pending"
                else None,
                "cache": "hit" if s["state"] == "cached" else ("miss" if cache else ""),
                "cache_key": (s["cache_key"] or "")[:12],
                "why": cache.get("why", ""),
                "cached_from": s["cached_from"],
                "outputs": json.loads(s["outputs_json"] or "{}"),
                "job_id": s["job_id"],
                "run_id": s["job_run_id"],
                "error": s["error"],
            }
        )
    return {**run, "steps_detail": steps}


def wait_run(
    app: Appliance,
    ref: str,
    timeout: float | None = None,
    on_change: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Block until the run ends, calling `on_change` whenever a step moves."""
    from appliance.core.agent import ensure_agent

    deadline = None if timeout is None else time.monotonic() + timeout
    seen: Any = None
    checked = time.monotonic()
    while True:
        run = get_run(app, ref)
        key = (run["state"], tuple(sorted(run["counts"].items())))
        if key != seen and on_change is not None:
            on_change(run)
        seen = key
        if run["state"] not in ACTIVE:
            return run
        if deadline is not None and time.monotonic() > deadline:
            return run
        if time.monotonic() - checked > 5:  # an agent that went away meanwhile comes back
            ensure_agent(app)
            checked = time.monotonic()
        time.sleep(0.05)


def retry_run(app: Appliance, ref: str) -> dict[str, Any]:
    """Run a failed or cancelled run again from where it stopped: its failed, cancelled and
    never-started steps run; what succeeded (or came from the cache) is kept."""
    from appliance.core.agent import ensure_agent

    run = get_run(app, ref)
    if run["state"] not in ("failed", "cancelled"):
        raise Conflict(
            f"pipeline run {run['id']} is {run['state']}; only a failed or "
            "cancelled run can be retried"
        )
    with app.db.transaction() as conn:
        conn.execute(
            "UPDATE pipeline_steps SET state = 'pending', error = NULL, finished_at = NULL "
            "WHERE run_id = ? AND state IN ('failed', 'cancelled')",
            (run["id"],),
        )
        conn.execute(
            "UPDATE pipeline_runs SET state = 'queued', cancel_requested = 0, error = NULL, "
            "started_at = NULL, finished_at = NULL, attempt = attempt + 1 WHERE id = ?",
            (run["id"],),
        )
    ensure_agent(app)
    return get_run(app, run["id"])


def cancel_run(app: Appliance, ref: str) -> dict[str, Any]:
    """Stop a run: its running step jobs are cancelled and nothing more starts; what it
    produced is kept, and `retry` continues it later."""
    from appliance.core.agent import ensure_agent

    run = get_run(app, ref)
    if run["state"] not in ACTIVE:
        raise Conflict(f"pipeline run {run['id']} already {run['state']}; nothing to cancel")
    app.db.execute(
        "UPDATE pipeline_runs SET cancel_requested = 1 WHERE id = ? AND state IN "
        "('queued', 'running')",
        (run["id"],),
    )
    for step in _steps(app, run["id"]).values():
        if step["state"] == "running" and step["job_id"]:
            _cancel_job(app, step["job_id"])
    ensure_agent(app)
    return get_run(app, run["id"])


def compare_runs(app: Appliance, ref_a: str, ref_b: str) -> dict[str, Any]:
    """Two runs side by side: parameters, each step's state and outputs, and the final
    metrics of the runs their steps produced (a training run, a study's best trial)."""
    from appliance.core.runs import latest_metrics

    a, b = show_run(app, ref_a), show_run(app, ref_b)
    if a["id"] == b["id"]:
        raise InvalidInput(f"pipeline run {a['id']} given twice: compare two different runs")
    params = [
        {
            "param": k,
            "a": a["params"].get(k),
            "b": b["params"].get(k),
            "differs": a["params"].get(k) != b["params"].get(k),
        }
        for k in sorted(set(a["params"]) | set(b["params"]))
    ]
    steps_a = {s["step"]: s for s in a["steps_detail"]}
    steps_b = {s["step"]: s for s in b["steps_detail"]}
    steps, metrics = [], []
    for name in [*steps_a, *[n for n in steps_b if n not in steps_a]]:
        sa, sb = steps_a.get(name, {}), steps_b.get(name, {})
        oa, ob = sa.get("outputs", {}), sb.get("outputs", {})
        steps.append(
            {
                "step": name,
                "a": sa.get("state"),
                "b": sb.get("state"),
                "a_outputs": oa,
                "b_outputs": ob,
                "differs": oa != ob,
            }
        )
        kind = sa.get("kind") or sb.get("kind")
        for output, typed in KINDS[kind].outputs.items() if kind else ():
            if typed != RUN:
                continue
            ma = latest_metrics(app, oa[output]) if oa.get(output) else {}
            mb = latest_metrics(app, ob[output]) if ob.get(output) else {}
            for key in sorted(set(ma) | set(mb)):
                metrics.append({"metric": f"{name}.{key}", "a": ma.get(key), "b": mb.get(key)})
    return {"a": a["id"], "b": b["id"], "params": params, "steps": steps, "metrics": metrics}


def pipelines_seen(app: Appliance) -> list[dict[str, Any]]:
    """Every pipeline that ran or has a trigger: its last run and its triggers (the TUI's
    list of definitions)."""
    rows = app.db.rows(
        "SELECT pipeline, source, count(*) AS runs, max(created_at) AS last_run_at "
        "FROM pipeline_runs GROUP BY pipeline"
    )
    seen = {r["pipeline"]: {**r, "triggers": 0} for r in rows}
    for t in app.db.rows(
        "SELECT pipeline, source, count(*) AS n FROM pipeline_triggers GROUP BY pipeline"
    ):
        entry = seen.setdefault(
            t["pipeline"],
            {
                "pipeline": t["pipeline"],
                "source": t["source"],
                "runs": 0,
                "last_run_at": None,
                "triggers": 0,
            },
        )
        entry["triggers"] = t["n"]
    for entry in seen.values():
        last = app.db.scalar(
            "SELECT state FROM pipeline_runs WHERE pipeline = ? ORDER BY created_at DESC LIMIT 1",
            (entry["pipeline"],),
        )
        entry["last_state"] = last
    return sorted(seen.values(), key=lambda e: e["pipeline"])
