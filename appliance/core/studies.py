"""Tuning studies as they run: stored trials, the driver that runs them, stop and resume.

A study (`core/tuning.py` checks its spec) is a row in `studies` with a parent run; each trial
is a row in `trials` holding the values it used and hyperopt's encoding of them, and (unless
the study runs its function in process) a job whose run is a child of the study's run. One
driver process per study (`runner tune STUDY`, under a lock) asks the suggester for as many
trials as there are free slots, submits them through the executor, reads their metrics from
the store as they arrive (the median stopping rule), settles them as their jobs end and stops
the study on its budget, its failures, a target, patience, its timeout or a stop request.
Everything it knows is in SQLite, so a driver that dies (a kill, a reboot) loses nothing:
`resume` starts a new one that replays the trials into the suggester, follows trials whose
jobs still run and runs again those that were cut off.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import json
import math
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.processes import identity, is_same, signal_ours
from appliance.core.runs import create_run, new_id, set_tags
from appliance.core.search_space import Suggester, flatten, grid_points, parse_space, space_names
from appliance.core.tuning import MIN_DATA_IN_LEAF, importance, median_stop, study_should_stop
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.store.db import parse_utc, utcnow

FINISHED = ("succeeded", "failed")  # a study that ended on its own; `stopped` resumes
TRIAL_DONE = ("succeeded", "failed", "early_stopped")  # `cancelled` trials run again on resume
POLL_S = 0.02  # how often the driver looks for ended trial jobs (one indexed query)
CHECK_S = 0.5  # how often it reads running trials' curves for the median rule
CANCELLED_OUTSIDE = "its job was cancelled; it runs again on resume"
MAX_LOST = 3  # a trial whose supervisor vanished this many times fails (it kills it)
WORSE_THAN_MEDIAN = "worse than the median of completed trials at the same step"
RUN_STATUS = {"succeeded": "finished", "failed": "failed", "stopped": "cancelled"}


# ---- reading studies ----------------------------------------------------------------------
def _row(app: Appliance, ref: str) -> dict[str, Any]:
    """A study by id, unique id prefix, or name (its latest study)."""
    row = app.db.one("SELECT * FROM studies WHERE id = ?", (ref,))
    if row is None:
        rows = app.db.rows("SELECT * FROM studies WHERE id LIKE ? || '%'", (ref,))
        if len(rows) > 1:
            raise InvalidInput(f"study {ref!r}: more than one study id starts with it")
        row = rows[0] if rows else None
    if row is None:
        row = app.db.one(
            "SELECT * FROM studies WHERE name = ? ORDER BY created_at DESC, rowid DESC LIMIT 1",
            (ref,),
        )
    if row is None:
        raise NotFound(f"study {ref!r} not found")
    return row


def _driver_alive(row: dict[str, Any]) -> bool:
    return is_same(row.get("driver_pid"), row.get("driver_identity"))


def _state(row: dict[str, Any]) -> str:
    """The stored state, or `interrupted` for a running study whose driver is gone."""
    if row["state"] in ("running", "stopping") and not _driver_alive(row):
        return "interrupted"
    return str(row["state"])


def _trial(row: dict[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in row.items() if k not in ("params_json", "vals_json")}
    out["params"] = json.loads(row["params_json"])
    return out


def _trials(app: Appliance, study_id: str) -> list[dict[str, Any]]:
    rows = app.db.rows("SELECT * FROM trials WHERE study_id = ? ORDER BY number", (study_id,))
    return [_trial(r) for r in rows]


def list_trials(app: Appliance, ref: str) -> list[dict[str, Any]]:
    return _trials(app, _row(app, ref)["id"])


def _best(trials: list[dict[str, Any]], maximize: bool) -> dict[str, Any] | None:
    """The best succeeded trial (an early-stopped one was cut short: it never competes)."""
    scored = [t for t in trials if t["state"] == "succeeded" and t["objective"] is not None]
    if not scored:
        return None
    pick = max if maximize else min
    return pick(scored, key=lambda t: t["objective"])


def _summary(row: dict[str, Any], trials: list[dict[str, Any]]) -> dict[str, Any]:
    """A study with its spec, derived state, trial counts and best trial."""
    spec = json.loads(row["spec_json"])
    counts = {s: 0 for s in ("running", "succeeded", "failed", "early_stopped", "cancelled")}
    for t in trials:
        counts[t["state"]] += 1
    best = _best(trials, spec["objective"]["direction"] == "maximize")
    return {
        "id": row["id"],
        "name": row["name"],
        "state": _state(row),
        "message": row["message"],
        "run_id": row["run_id"],
        "driver_pid": row["driver_pid"],
        "created_at": row["created_at"],
        "finished_at": row["finished_at"],
        "elapsed_s": row["elapsed_s"],
        "trials": len(trials),
        "max_trials": spec["max_trials"],
        "counts": counts,
        "objective": spec["objective"],
        "best_trial": None if best is None else best["number"],
        "best_value": None if best is None else best["objective"],
        "best_params": None if best is None else best["params"],
        "spec": spec,
    }


def get_study(app: Appliance, ref: str) -> dict[str, Any]:
    """A study by id, id prefix or name: spec, derived state, trial counts, best trial."""
    row = _row(app, ref)
    return _summary(row, _trials(app, row["id"]))


def list_studies(app: Appliance) -> list[dict[str, Any]]:
    """Every study, newest first, with progress and best value (a listing row each); two
    queries whatever the number of studies (the TUI reads this every second)."""
    by_study: dict[str, list[dict[str, Any]]] = {}
    for r in app.db.rows("SELECT * FROM trials ORDER BY study_id, number"):
        by_study.setdefault(r["study_id"], []).append(_trial(r))
    out = []
    for row in app.db.rows("SELECT * FROM studies ORDER BY created_at DESC, rowid DESC"):
        study = _summary(row, by_study.get(row["id"], []))
        out.append(
            {
                "id": study["id"],
                "name": study["name"],
                "state": study["state"],
                "trials": f"{study['trials']}/{study['max_trials']}",
                "metric": study["objective"]["metric"],
                "best": study["best_value"],
                "best_trial": study["best_trial"],
                "created_at": study["created_at"],
                "message": study["message"] or "",
            }
        )
    return out


def show_study(app: Appliance, ref: str) -> dict[str, Any]:
    """`tune show`: the study, every trial, the best one and each parameter's importance."""
    row = _row(app, ref)
    trials = _trials(app, row["id"])
    # Completed trials only: an early-stopped trial's value is where it was cut, not where
    # it would have ended, and would drag its parameters' scores.
    finished = [t for t in trials if t["state"] == "succeeded"]
    return {**_summary(row, trials), "trial_rows": trials, "importance": importance(finished)}


def best_curve(trials: list[dict[str, Any]], maximize: bool) -> list[tuple[int, float]]:
    """(trial number, best objective so far) after each finished trial, for plots."""
    best: float | None = None
    out = []
    for t in sorted(trials, key=lambda t: t["number"]):
        value = t.get("objective")
        if t["state"] != "succeeded" or value is None:
            continue
        if best is None or (value > best if maximize else value < best):
            best = value
        out.append((t["number"], best))
    return out


# ---- creating, starting, stopping, resuming -----------------------------------------------
def create_study(app: Appliance, spec: dict[str, Any], start: bool = True) -> dict[str, Any]:
    """Record a checked study and its parent run, then start its driver in the background."""
    study_id = new_id()
    stored = {k: v for k, v in spec.items() if k != "warnings"}
    with app.db.transaction() as conn:
        run_id = create_run(
            conn,
            spec["experiment"],
            spec["name"],
            {
                "algorithm": spec["algorithm"],
                "max_trials": spec["max_trials"],
                "parallel_trials": spec["parallel_trials"],
                "objective": f"{spec['objective']['direction']} {spec['objective']['metric']}",
                "space": spec["space"],
                **{f"fixed.{k}": v for k, v in spec["train"]["params"].items()},
            },
            None,
            execution_type="Tune",
        )
        conn.execute("UPDATE runs SET status = 'running' WHERE id = ?", (run_id,))
        set_tags(conn, run_id, {"study": study_id})
        conn.execute(
            "INSERT INTO studies (id, name, spec_json, state, run_id, created_at) "
            "VALUES (?, ?, ?, 'running', ?, ?)",
            (study_id, spec["name"], json.dumps(stored, sort_keys=True), run_id, utcnow()),
        )
    if start:
        start_driver(app, study_id)
    return {**get_study(app, study_id), "warnings": spec.get("warnings", [])}


def start_driver(app: Appliance, study_id: str) -> int:
    """Start the study's driver as a detached process (it outlives this command)."""
    log = app.settings.logs_dir / "studies" / f"{study_id}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "APPLIANCE_HOME": str(app.settings.home)}
    env.pop("CUDA_VISIBLE_DEVICES", None)  # trials get theirs from the agent
    with log.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "appliance.runner", "tune", study_id],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=out,
            env=env,
            start_new_session=True,
        )
    app.db.execute(
        "UPDATE studies SET driver_pid = ?, driver_identity = ? WHERE id = ?",
        (proc.pid, identity(proc.pid), study_id),
    )
    return proc.pid


def stop_study(app: Appliance, ref: str, timeout: float = 10.0) -> dict[str, Any]:
    """Ask the driver to stop: running trials are cancelled (kept, run again on resume) and
    the study ends `stopped`. A study whose driver is gone is wound down from here."""
    row = _row(app, ref)
    state = _state(row)
    if state in FINISHED or state == "stopped":
        raise Conflict(f"study {row['name']} ({row['id']}) is already {state}")
    app.db.execute(
        "UPDATE studies SET stop_requested = 1, state = 'stopping' WHERE id = ? "
        "AND state IN ('running', 'stopping')",
        (row["id"],),
    )
    if state == "interrupted" or row.get("driver_pid") == os.getpid():
        # no driver, or the driver is this process (a cancelled pipeline step): at once
        _wind_down(app, row["id"], "stopped", "stopped by request", "request")
        return get_study(app, row["id"])
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        current = _row(app, row["id"])
        if current["state"] == "stopped" or not _driver_alive(current):
            break
        time.sleep(0.05)
    current = _row(app, row["id"])
    if current["state"] != "stopped":  # a driver that does not answer
        if current.get("driver_pid") != os.getpid():  # (never this process: a resume's claim)
            signal_ours(current.get("driver_pid"), signal.SIGTERM)
        _wind_down(app, row["id"], "stopped", "stopped by request", "request")
    return get_study(app, row["id"])


def resume_study(
    app: Appliance,
    ref: str,
    max_trials: int | None = None,
    max_failed_trials: int | None = None,
    start: bool = True,
    timeout: float | None = None,
) -> dict[str, Any]:
    """Start a new driver for a stopped or interrupted study; a finished one only when given
    a larger budget (`max_trials` counts every trial, old and new; `timeout` the study's
    whole running time, resumes included)."""
    row = _row(app, ref)
    state = _state(row)
    spec = json.loads(row["spec_json"])
    label = f"study {row['name']} ({row['id']})"
    if state in ("running", "stopping"):
        raise Conflict(f"{label} is {state} (driver pid {row['driver_pid']}); nothing to resume")
    trials = app.db.scalar("SELECT count(*) FROM trials WHERE study_id = ?", (row["id"],))
    for key, value in (("max_trials", max_trials), ("max_failed_trials", max_failed_trials)):
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInput(f"--{key.replace('_', '-')}: expected a whole number >= 0")
        if key == "max_trials" and value < trials:
            raise InvalidInput(f"--max-trials {value}: the study already has {trials} trials")
    if timeout is not None and timeout <= (row["elapsed_s"] or 0):
        raise InvalidInput(
            f"--timeout {timeout:g}: the study has already run {row['elapsed_s']:.0f} s"
        )
    if state in FINISHED:
        _check_extends(app, row, spec, max_trials, max_failed_trials, timeout)
    if spec["algorithm"] == "grid" and max_trials is not None:
        max_trials = min(max_trials, len(grid_points(parse_space(spec["space"]))))
    spec["max_trials"] = max_trials if max_trials is not None else spec["max_trials"]
    if max_failed_trials is not None:
        spec["max_failed_trials"] = max_failed_trials
    if timeout is not None:
        spec["timeout_s"] = timeout
    with app.db.transaction() as conn:
        # Only from the state read above, and as this process until the driver it starts
        # takes over: of two racing resumes, one claims the study, the other sees it running.
        me = os.getpid()
        claimed = conn.execute(
            "UPDATE studies SET state = 'running', stop_requested = 0, message = NULL, "
            "ended_by = NULL, finished_at = NULL, spec_json = ?, driver_pid = ?, "
            "driver_identity = ? WHERE id = ? AND state = ? AND driver_pid IS ? "
            "AND driver_identity IS ?",
            (
                json.dumps(spec, sort_keys=True),
                me,
                identity(me),
                row["id"],
                row["state"],
                row["driver_pid"],
                row["driver_identity"],
            ),
        ).rowcount
        if not claimed:
            raise Conflict(f"{label} changed while resuming it; look again (tune show)")
        conn.execute(
            "UPDATE runs SET status = 'running', finished_at = NULL WHERE id = ?",
            (row["run_id"],),
        )
    if start:
        start_driver(app, row["id"])
    return get_study(app, row["id"])


def _check_extends(
    app: Appliance,
    row: dict[str, Any],
    spec: dict[str, Any],
    max_trials: int | None,
    max_failed_trials: int | None,
    timeout: float | None,
) -> None:
    """A finished study resumes only when what ended it is lifted: a larger budget for the
    limit it reached, or trials cancelled from outside to run again. A stop rule met, an
    exhausted grid or a missing objective cannot be lifted: start a new study."""
    label = f"study {row['name']} ({row['id']})"
    outside = app.db.scalar(
        "SELECT count(*) FROM trials WHERE study_id = ? AND state = 'cancelled' AND error = ?",
        (row["id"], CANCELLED_OUTSIDE),
    )
    ended_by = row["ended_by"]
    failed = app.db.scalar(
        "SELECT count(*) FROM trials WHERE study_id = ? AND state = 'failed'", (row["id"],)
    )
    lifted = {
        "max_trials": max_trials is not None and max_trials > spec["max_trials"],
        "failures": max_failed_trials is not None and max_failed_trials >= failed,
        "timeout": timeout is not None,
        "driver": True,  # the driver's own failure (a file fixed since): try again
    }
    if lifted.get(ended_by) or (outside and ended_by in ("max_trials", "grid")):
        return
    finished = f"{label} already finished ({row['state']}: {row['message']})"
    hint = {
        "max_trials": f"resume it with --max-trials above {spec['max_trials']}",
        "failures": f"resume it with --max-failed-trials {failed} or more ({failed} failed)",
        "timeout": "resume it with a longer --timeout",
    }.get(ended_by or "", "it cannot be extended; start a new study")
    raise Conflict(f"{finished}; {hint}")


def register_best(app: Appliance, ref: str, model: str) -> dict[str, Any]:
    """Register the model of the study's best trial as the next version of `model`."""
    from appliance.core.registry import register_model

    study = get_study(app, ref)
    if study["best_trial"] is None:
        raise Conflict(f"study {study['name']} ({study['id']}) has no succeeded trial yet")
    run_id = app.db.scalar(
        "SELECT run_id FROM trials WHERE study_id = ? AND number = ?",
        (study["id"], study["best_trial"]),
    )
    return {**register_model(app, model, run_id), "trial": study["best_trial"]}


def _finish_trials(conn: sqlite3.Connection, study_id: str) -> list[str]:
    """Mark the study's running trials cancelled; returns their jobs (to be cancelled)."""
    jobs = [
        r[0]
        for r in conn.execute(
            "SELECT job_id FROM trials WHERE study_id = ? AND state = 'running' "
            "AND job_id IS NOT NULL",
            (study_id,),
        )
    ]
    conn.execute(
        "UPDATE trials SET state = 'cancelled', finished_at = ?, error = 'cancelled when the "
        "study ended' WHERE study_id = ? AND state = 'running'",
        (utcnow(), study_id),
    )
    return jobs


def cancel_trial_jobs(app: Appliance, study_id: str) -> int:
    """Cancel every trial job of a study that is still queued or running, whatever its
    trial row says (a driver killed between marking and cancelling leaves such jobs)."""
    from appliance.core.jobs import request_cancel

    rows = app.db.rows(
        "SELECT j.id FROM trials t JOIN jobs j ON j.id = t.job_id WHERE t.study_id = ? "
        "AND j.state IN ('queued', 'running')",
        (study_id,),
    )
    for row in rows:
        with contextlib.suppress(Conflict, NotFound):
            request_cancel(app, row["id"])
    return len(rows)


def _wind_down(app: Appliance, study_id: str, state: str, message: str, ended_by: str) -> bool:
    """End a running study: running trials cancelled (kept), the state, why it ended
    (`ended_by`: what a resume must change) and the parent run set. False when the study
    had already ended (a stop racing the driver's own end changes nothing)."""
    from appliance.core.jobs import request_cancel

    with app.db.transaction() as conn:
        ended = conn.execute(
            "UPDATE studies SET state = ?, message = ?, ended_by = ?, finished_at = ?, "
            "stop_requested = 0 WHERE id = ? AND state IN ('running', 'stopping')",
            (state, message, ended_by, utcnow(), study_id),
        ).rowcount
        if not ended:
            return False
        jobs = _finish_trials(conn, study_id)
        conn.execute(
            "UPDATE runs SET status = ?, finished_at = ? WHERE id = "
            "(SELECT run_id FROM studies WHERE id = ?)",
            (RUN_STATUS[state], utcnow(), study_id),
        )
    for job_id in jobs:
        with contextlib.suppress(Conflict, NotFound):
            request_cancel(app, job_id)
    return True


# ---- trial functions ----------------------------------------------------------------------
def load_function(script: str, name: str) -> Callable[[dict[str, Any]], Any]:
    """A function from the user's file, imported once per process."""
    path = Path(script)
    module_name = "appliance_trial_" + hashlib.sha256(str(path).encode()).hexdigest()[:12]
    module = sys.modules.get(module_name)
    if module is None:
        loader_spec = importlib.util.spec_from_file_location(module_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise InvalidInput(f"train.script: {path.name} cannot be imported")
        module = importlib.util.module_from_spec(loader_spec)
        sys.path.insert(0, str(path.parent))  # its own helpers import as they would when run
        loader_spec.loader.exec_module(module)
        sys.modules[module_name] = module
    fn = getattr(module, name, None)
    if not callable(fn):
        raise InvalidInput(f"train.function: {path.name} defines no function {name!r}")
    return fn  # type: ignore[no-any-return]


def call_objective(
    fn: Callable[[dict[str, Any]], Any],
    params: dict[str, Any],
    metric: str,
    report: Callable[[str, float, int], None],
) -> None:
    """Call a trial function: it returns a number (the objective) or a mapping of metrics,
    or yields one of those per step (so the median rule can stop it between steps)."""

    def record(value: Any, step: int) -> None:
        if isinstance(value, dict):
            items = list(value.items())
        else:
            items = [(metric, value)]
        for key, number in items:
            if isinstance(number, bool) or not isinstance(number, int | float):
                if hasattr(number, "item"):  # a numpy scalar
                    number = number.item()
                else:
                    raise TypeError(
                        f"the objective function returned {key}={number!r}; expected a number "
                        "or a mapping of metric name to number"
                    )
            report(str(key), float(number), step)

    result = fn(dict(params))
    if inspect.isgenerator(result):
        for step, value in enumerate(result, start=1):
            record(value, step)
    else:
        record(result, 0)


def function_trial_job(spec: Any, emit: Callable[[dict[str, Any]], None]) -> None:
    """The body of a `tune-function` job: call the study's function with the trial's params
    and print what it returns as metric lines."""
    target = spec.inputs["function"]
    fn = load_function(target["script"], target["name"])

    def report(key: str, value: float, step: int) -> None:
        if not math.isfinite(value):
            if key == target["metric"]:
                raise ValueError(f"objective.metric {key!r} was {value} at step {step}")
            return  # another metric: nothing to record
        now = time.time()
        emit({"type": "metric", "name": key, "value": value, "step": step, "timestamp": now})

    call_objective(fn, spec.params, target["metric"], report)


# ---- the driver ---------------------------------------------------------------------------
class _ObjectiveMissing(Exception):
    pass


class _EarlyStop(Exception):
    pass


class Driver:
    """Runs one study until it ends or is stopped; everything it decides is stored first."""

    def __init__(self, app: Appliance, study_id: str) -> None:
        self.app = app
        self.id = study_id
        row = _row(app, study_id)
        self.row = row
        self.spec = json.loads(row["spec_json"])
        self.metric = self.spec["objective"]["metric"]
        self.maximize = self.spec["objective"]["direction"] == "maximize"
        self.space = parse_space(self.spec["space"])
        self.suggester = Suggester(self.space, self.spec["algorithm"], self.spec["seed"])
        self.curves: dict[int, dict[int, float]] = {}  # succeeded trials' objective curves
        self.rerun: list[int] = []  # trials cut off before they finished: run again first
        self.stopping: dict[int, dict[str, Any]] = {}  # early-stopped, their jobs not yet ended
        self.started = time.monotonic()
        self.elapsed_before = float(row["elapsed_s"] or 0.0)
        self.function: Callable[[dict[str, Any]], Any] | None = None

    # -- history
    def _loss(self, value: float | None) -> float | None:
        if value is None:
            return None
        return -value if self.maximize else value

    def replay(self) -> None:
        """Put every stored trial back into the suggester, in number order."""
        rows = self.app.db.rows(
            "SELECT number, vals_json, state, objective, job_id FROM trials "
            "WHERE study_id = ? ORDER BY number",
            (self.id,),
        )
        for r in rows:
            state = r["state"]
            vals = json.loads(r["vals_json"])
            if state in ("succeeded", "early_stopped"):
                self.suggester.replay(r["number"], vals, self._loss(r["objective"]), "ok")
            elif state == "failed":
                self.suggester.replay(r["number"], vals, None, "failed")
            else:
                self.suggester.replay(r["number"], vals, None, "pending")
                if state == "cancelled" or r["job_id"] is None:
                    self.rerun.append(r["number"])
            if state == "succeeded":
                self.curves[r["number"]] = self._curve(r["number"])

    def _curve(self, number: int) -> dict[int, float]:
        rows = self.app.db.rows(
            "SELECT m.step, m.value FROM run_metrics m JOIN trials t ON t.run_id = m.run_id "
            "WHERE t.study_id = ? AND t.number = ? AND m.key = ? ORDER BY m.id",
            (self.id, number, self.metric),
        )
        return {r["step"]: r["value"] for r in rows}

    def trials(self) -> list[dict[str, Any]]:
        return self.app.db.rows(
            "SELECT number, state, objective, error, job_id, run_id FROM trials "
            "WHERE study_id = ? ORDER BY number",
            (self.id,),
        )

    # -- submitting
    def _run_spec(self, params: dict[str, Any]) -> dict[str, Any]:
        """The values a trial's trainer gets: the fixed ones, then the trial's own."""
        train = self.spec["train"]
        values = {**train["params"], **flatten(params)}
        if train.get("trainer") == "lightgbm" and space_names(self.space) & MIN_DATA_IN_LEAF:
            values.setdefault("feature_pre_filter", False)
        return values

    def _record(self, number: int, params: dict[str, Any], vals: Any, attempt: int) -> Any:
        """Insert (or, for a re-run, renew) the trial row in the job's own transaction, so a
        crash leaves either both or neither."""

        def record(conn: sqlite3.Connection, job_id: str | None, run_id: str | None) -> None:
            conn.execute(
                "INSERT INTO trials (study_id, number, params_json, vals_json, state, job_id, "
                "run_id, attempt, started_at) VALUES (?, ?, ?, ?, 'running', ?, ?, ?, ?) "
                "ON CONFLICT (study_id, number) DO UPDATE SET state = 'running', "
                "job_id = excluded.job_id, run_id = excluded.run_id, attempt = excluded.attempt, "
                "started_at = excluded.started_at, finished_at = NULL, duration_s = NULL, "
                "error = NULL, objective = NULL",
                (
                    self.id,
                    number,
                    json.dumps(params),
                    json.dumps(vals),
                    job_id,
                    run_id,
                    attempt,
                    utcnow(),
                ),
            )

        return record

    def submit(self, number: int, params: dict[str, Any], vals: Any, attempt: int = 1) -> None:
        """Start a trial's job; values the trainer refuses (a float where it takes an
        integer, a rate out of range) fail the trial, not the study."""
        try:
            self._submit(number, params, vals, attempt)
        except InvalidInput as exc:
            with self.app.db.transaction() as conn:
                self._record(number, params, vals, attempt)(conn, None, None)
                conn.execute(
                    "UPDATE trials SET state = 'failed', error = ?, finished_at = ? "
                    "WHERE study_id = ? AND number = ?",
                    (f"refused: {exc.message}", utcnow(), self.id, number),
                )
            self.suggester.tell(number, None, "failed")

    def _submit(self, number: int, params: dict[str, Any], vals: Any, attempt: int) -> None:
        from appliance.core.jobs import JobSpec, submit_job
        from appliance.core.training import submit_training

        train = self.spec["train"]
        values = self._run_spec(params)
        options = {
            "parent_run_id": self.row["run_id"],
            "tags": {"study": self.id, "trial": str(number), "attempt": str(attempt)},
            "record": self._record(number, params, vals, attempt),
        }
        name = f"{self.spec['name']}-trial-{number}"
        resources = train["resources"]
        if "trainer" in train:
            submit_training(
                self.app,
                train["train"],
                train["label"],
                params=values,
                features=train["features"],
                experiment=self.spec["experiment"],
                name=name,
                cpus=int(resources.get("cpu", 1)),
                trainer=train["trainer"],
                valid=train["valid"],
                test=train.get("test"),  # scored, never tuned on: a gate can compare it
                objective=train["objective"],
                timeout=train["timeout"],
                memory=resources.get("memory", "2Gi"),
                gpu=resources.get("gpu"),
                **options,
            )
            return
        script = Path(train["script"])
        if train["function"]:
            spec = JobSpec(
                kind="tune-function",
                inputs={
                    "function": {
                        "script": str(script),
                        "name": train["function"],
                        "metric": self.metric,
                    }
                },
                params=values,
                resources=resources,
                workdir=str(script.parent),
                timeout=train["timeout"],
                experiment=self.spec["experiment"],
            )
        else:
            spec = JobSpec(
                kind="command",
                command=[sys.executable, str(script)],
                params=values,
                resources=resources,
                workdir=str(script.parent),
                timeout=train["timeout"],
                experiment=self.spec["experiment"],
            )
        submit_job(self.app, spec, run_name=name, **options)

    # -- settling
    def _objective(self, run_id: str) -> float | None:
        fn = "max" if self.maximize else "min"
        if self.spec["objective"]["value"] == "best":
            sql = f"SELECT {fn}(value) FROM run_metrics WHERE run_id = ? AND key = ?"
        else:
            sql = (
                "SELECT value FROM run_metrics WHERE run_id = ? AND key = ? "
                "ORDER BY id DESC LIMIT 1"
            )
        value = self.app.db.scalar(sql, (run_id, self.metric))
        return None if value is None else float(value)

    def _reported_before(self) -> bool:
        """Whether any trial has reported the objective (then one that did not, say with a
        NaN the protocol dropped, failed on its own)."""
        return bool(self.curves) or bool(
            self.app.db.scalar(
                "SELECT count(*) FROM trials WHERE study_id = ? AND objective IS NOT NULL",
                (self.id,),
            )
        )

    def _non_finite(self, run_id: str) -> str | None:
        """Why the objective is missing when the trial did report it, as NaN or infinity."""
        from appliance.core.jobs import NON_FINITE_TAG

        seen = self.app.db.scalar(
            "SELECT value FROM run_tags WHERE run_id = ? AND key = ?",
            (run_id, NON_FINITE_TAG + self.metric),
        )
        return None if seen is None else f"objective.metric {self.metric!r} was {seen}"

    def _reported(self, run_id: str) -> list[str]:
        return [
            r["key"]
            for r in self.app.db.rows(
                "SELECT DISTINCT key FROM run_metrics WHERE run_id = ? ORDER BY key", (run_id,)
            )
        ]

    def _set_trial(
        self,
        number: int,
        state: str,
        objective: float | None,
        error: str | None,
        duration: float | None,
    ) -> bool:
        """Settle a running trial (once: False when it was settled already)."""
        with self.app.db.transaction() as conn:
            changed = conn.execute(
                "UPDATE trials SET state = ?, objective = ?, error = ?, finished_at = ?, "
                "duration_s = ? WHERE study_id = ? AND number = ? AND state = 'running'",
                (state, objective, error, utcnow(), duration, self.id, number),
            ).rowcount
            if changed and state in ("succeeded", "early_stopped"):
                self._log_best(conn)
        return bool(changed)

    def _log_best(self, conn: sqlite3.Connection) -> None:
        """The parent run's best-so-far curve: one point per finished trial."""
        fn = "max" if self.maximize else "min"
        best, done = conn.execute(
            f"SELECT {fn}(CASE WHEN state = 'succeeded' THEN objective END), count(*) "
            "FROM trials WHERE study_id = ? AND state IN ('succeeded', 'early_stopped')",
            (self.id,),
        ).fetchone()
        if best is not None:
            conn.execute(
                "INSERT INTO run_metrics (run_id, key, value, step, timestamp) "
                "VALUES (?, ?, ?, ?, ?)",
                (self.row["run_id"], f"best_{self.metric}", best, done, time.time()),
            )

    def settle(self, trial: dict[str, Any], job: dict[str, Any]) -> None:
        """A trial whose job ended: succeeded (with its objective), failed, cut off by a lost
        supervisor (run again now, same values), or cancelled from outside (`jobs cancel`:
        kept as cancelled, run again only on resume)."""
        from appliance.core.jobs import SUPERVISOR_GONE

        number = trial["number"]
        duration = _seconds_between(job.get("started_at"), job.get("finished_at"))
        if job["state"] == "succeeded":
            value = self._objective(trial["run_id"])
            went_bad = self._non_finite(trial["run_id"])
            if went_bad:  # a NaN the protocol could not store: diverged, as in process
                if self._set_trial(number, "failed", None, went_bad, duration):
                    self.suggester.tell(number, None, "failed")
                return
            if value is None:
                reported = ", ".join(self._reported(trial["run_id"])) or "nothing"
                message = (
                    f"objective.metric {self.metric!r}: trial {number} never reported it "
                    f"(it reported {reported})"
                )
                self._set_trial(number, "failed", None, message, duration)
                self.suggester.tell(number, None, "failed")
                if not self._reported_before():
                    raise _ObjectiveMissing(message)  # the study's mistake, not the trial's
                return
            if self._set_trial(number, "succeeded", value, None, duration):
                self.suggester.tell(number, self._loss(value))
                self.curves[number] = self._curve(number)
            return
        if job["state"] == "cancelled" or job.get("error") == SUPERVISOR_GONE:
            if job["state"] == "cancelled":
                error = CANCELLED_OUTSIDE
            elif trial["lost"] + 1 >= MAX_LOST:  # it is the trial that kills its supervisor
                error = f"{SUPERVISOR_GONE}, {trial['lost'] + 1} times"
                if self._set_trial(number, "failed", None, error, duration):
                    self.suggester.tell(number, None, "failed")
                return
            else:
                self.rerun.append(number)  # not the trial's fault: again now, same values
                error = SUPERVISOR_GONE
            with self.app.db.transaction() as conn:
                conn.execute(
                    "UPDATE trials SET state = 'cancelled', error = ?, finished_at = ?, "
                    "duration_s = ?, lost = lost + ? WHERE study_id = ? AND number = ? "
                    "AND state = 'running'",
                    (error, utcnow(), duration, int(job["state"] != "cancelled"), self.id, number),
                )
            return
        error = job.get("error") or f"exit code {job.get('exit_code')}"
        if job["state"] == "timed_out":
            error = f"timed out: {error}"
        if self._set_trial(number, "failed", None, error, duration):
            self.suggester.tell(number, None, "failed")

    def check_early_stop(self) -> None:
        """The median rule over running trials' curves read from the store."""
        from appliance.core.jobs import request_cancel

        rule = self.spec.get("early_stopping")
        if not rule:
            return
        completed = list(self.curves.values())
        if len(completed) < rule["min_trials_required"]:
            return
        for trial in self.trials():
            if trial["state"] != "running" or trial["run_id"] is None:
                continue
            curve = {
                r["step"]: r["value"]
                for r in self.app.db.rows(
                    "SELECT step, value FROM run_metrics WHERE run_id = ? AND key = ? ORDER BY id",
                    (trial["run_id"], self.metric),
                )
            }
            if not curve:
                continue
            step = max(curve)
            if not median_stop(curve, completed, step, rule, self.maximize):
                continue
            best = max(curve.values()) if self.maximize else min(curve.values())
            reason = f"early stopped at step {step}: {WORSE_THAN_MEDIAN}"
            started = self.app.db.scalar(
                "SELECT started_at FROM jobs WHERE id = ?", (trial["job_id"],)
            )
            duration = _seconds_between(started, utcnow())
            if self._set_trial(trial["number"], "early_stopped", best, reason, duration):
                self.suggester.tell(trial["number"], self._loss(best), "early_stopped")
                with self.app.db.transaction() as conn:
                    set_tags(conn, trial["run_id"], {"early_stopped": f"step {step}"})
                with contextlib.suppress(Conflict, NotFound):
                    request_cancel(self.app, trial["job_id"])
                self.stopping[trial["number"]] = trial

    def settle_stopped(self) -> None:
        """An early-stopped trial's job reports until the cancel lands: once it has ended,
        its objective is its run's best value, so the trial and its run agree."""
        from appliance.core.jobs import FINAL_STATES

        for number, trial in list(self.stopping.items()):
            job = self.app.db.one(
                "SELECT state, started_at, finished_at FROM jobs WHERE id = ?", (trial["job_id"],)
            )
            if job is not None and job["state"] not in FINAL_STATES:
                continue
            del self.stopping[number]
            values = list(self._curve(number).values())
            if not values or job is None:
                continue
            best = max(values) if self.maximize else min(values)
            duration = _seconds_between(job["started_at"], job["finished_at"])
            self.app.db.execute(
                "UPDATE trials SET objective = ?, duration_s = coalesce(?, duration_s) "
                "WHERE study_id = ? AND number = ? AND state = 'early_stopped'",
                (best, duration, self.id, number),
            )
            self.suggester.tell(number, self._loss(best), "early_stopped")

    # -- the loop
    def elapsed(self) -> float:
        return self.elapsed_before + time.monotonic() - self.started

    def _save_elapsed(self) -> None:
        self.app.db.execute(
            "UPDATE studies SET elapsed_s = ? WHERE id = ?", (self.elapsed(), self.id)
        )

    def verdict(self, trials: list[dict[str, Any]], asked_all: bool) -> tuple[str, str, str] | None:
        """Whether the study ends now, and how: (state, message, ended_by) or None."""
        spec = self.spec
        failed = [t for t in trials if t["state"] == "failed"]
        if len(failed) > spec["max_failed_trials"]:
            last = failed[-1]
            return (
                "failed",
                f"{len(failed)} trials failed, more than max_failed_trials "
                f"({spec['max_failed_trials']}); last, trial {last['number']}: {last['error']}",
                "failures",
            )
        done = [t for t in trials if t["state"] in TRIAL_DONE]
        values = [
            t["objective"] if t["state"] == "succeeded" else None
            for t in sorted(done, key=lambda t: t["number"])
        ]
        reason = study_should_stop(values, spec.get("stop") or {}, self.maximize)
        if reason:
            return "succeeded", f"stopped early: {reason}", "stop_rule"
        if spec.get("timeout_s") is not None and self.elapsed() >= spec["timeout_s"]:
            return "succeeded", f"timeout of {spec['timeout_s']:g} s reached", "timeout"
        running = [t for t in trials if t["state"] == "running"]
        if asked_all and not running and not self.rerun and not self.stopping:
            grid = self.suggester.grid
            why = "grid" if grid is not None and self.suggester.asked >= len(grid) else "max_trials"
            if not any(t["state"] in ("succeeded", "early_stopped") for t in done):
                return "failed", f"no trial succeeded ({len(failed)} failed)", why
            cancelled = len(trials) - len(done)
            extra = f", {cancelled} cancelled (resume runs them again)" if cancelled else ""
            return "succeeded", f"{len(done)} trials finished{extra}", why
        return None

    def _stop_requested(self) -> bool:
        return bool(
            self.app.db.scalar("SELECT stop_requested FROM studies WHERE id = ?", (self.id,))
        )

    def run(self) -> str:
        """Drive the study to its end; returns the final state."""
        self.replay()
        try:
            if self.spec["train"].get("in_process"):
                return self._run_in_process()
            return self._run_jobs()
        except _ObjectiveMissing as exc:
            _wind_down(self.app, self.id, "failed", str(exc), "objective")
            return "failed"
        finally:
            self._save_elapsed()

    def _next(self) -> tuple[int, dict[str, Any], Any, int] | None:
        """The next trial to start: a cut-off one again, else a new suggestion."""
        if self.rerun:
            number = self.rerun.pop(0)
            row = self.app.db.one(
                "SELECT params_json, vals_json, attempt FROM trials WHERE study_id = ? "
                "AND number = ?",
                (self.id, number),
            )
            assert row is not None
            return (
                number,
                json.loads(row["params_json"]),
                json.loads(row["vals_json"]),
                row["attempt"] + 1,
            )
        total = self.app.db.scalar("SELECT count(*) FROM trials WHERE study_id = ?", (self.id,))
        if total >= self.spec["max_trials"]:
            return None
        asked = self.suggester.ask()
        if asked is None:
            return None
        return asked["trial"], asked["params"], asked["vals"], 1

    def _exhausted(self) -> bool:
        total = self.app.db.scalar("SELECT count(*) FROM trials WHERE study_id = ?", (self.id,))
        grid = self.suggester.grid
        return total >= self.spec["max_trials"] or (
            grid is not None and self.suggester.asked >= len(grid)
        )

    def _run_jobs(self) -> str:
        from appliance.core.agent import ensure_agent
        from appliance.core.jobs import FINAL_STATES, get_job

        parallel = self.spec["parallel_trials"]
        last_check = last_slow = 0.0
        while True:
            if self._stop_requested():
                _wind_down(self.app, self.id, "stopped", "stopped by request", "request")
                return "stopped"
            now = time.monotonic()
            slow = now - last_slow >= CHECK_S
            running = self.app.db.rows(
                "SELECT t.number, t.run_id, t.job_id, t.attempt, t.lost, j.state, j.error, "
                "j.exit_code, "
                "j.started_at, j.finished_at FROM trials t LEFT JOIN jobs j ON j.id = t.job_id "
                "WHERE t.study_id = ? AND t.state = 'running'",
                (self.id,),
            )
            for trial in running:
                job = trial
                if slow and job["state"] == "running":
                    job = {**trial, **get_job(self.app, trial["job_id"])}  # a vanished supervisor
                if job["state"] in FINAL_STATES:
                    self.settle(trial, job)
            if slow:
                last_slow = now
                if any(t["state"] == "queued" for t in running):
                    ensure_agent(self.app)  # a killed agent must not leave trials waiting
                self._save_elapsed()
            if self.spec.get("early_stopping") and now - last_check >= CHECK_S:
                last_check = now
                self.check_early_stop()
            if self.stopping:
                self.settle_stopped()
            trials = self.trials()
            ending = self.verdict(trials, self._exhausted())
            if ending is not None:
                _wind_down(self.app, self.id, *ending)
                return ending[0]
            active = sum(t["state"] == "running" for t in trials)
            while active < parallel:
                upcoming = self._next()
                if upcoming is None:
                    break
                self.submit(*upcoming)
                active += 1
            time.sleep(POLL_S)

    def _run_in_process(self) -> str:
        """Trials as calls in this process: for cheap objectives, where a process per trial
        would cost more than the trial. Same records as job trials, without the job."""
        train = self.spec["train"]
        self.function = load_function(train["script"], train["function"])
        saved = time.monotonic()
        while True:
            if self._stop_requested():
                _wind_down(self.app, self.id, "stopped", "stopped by request", "request")
                return "stopped"
            ending = self.verdict(self.trials(), self._exhausted())
            if ending is not None:
                _wind_down(self.app, self.id, *ending)
                return ending[0]
            upcoming = self._next()
            if upcoming is None:  # the budget or the grid is used up: verdict ends it next
                continue
            self._call(*upcoming)
            if time.monotonic() - saved >= CHECK_S:  # a killed driver loses at most this
                self._save_elapsed()
                saved = time.monotonic()

    def _call(self, number: int, params: dict[str, Any], vals: Any, attempt: int) -> None:
        assert self.function is not None
        values = self._run_spec(params)
        rows: list[tuple[str, float, int, float]] = []
        curve: dict[int, float] = {}
        rule = self.spec.get("early_stopping")
        completed = list(self.curves.values())

        def report(key: str, value: float, step: int) -> None:
            if not math.isfinite(value):
                if key == self.metric:
                    raise ValueError(f"objective.metric {key!r} was {value} at step {step}")
                return  # another metric: nothing to record (the store keeps numbers)
            rows.append((key, value, step, time.time()))
            if key == self.metric:
                curve[step] = value
                if rule and step and median_stop(curve, completed, step, rule, self.maximize):
                    raise _EarlyStop(step)

        started = time.perf_counter()
        state, error = "succeeded", None
        try:
            call_objective(self.function, values, self.metric, report)
        except _EarlyStop as stop:
            state = "early_stopped"
            error = f"early stopped at step {stop.args[0]}: {WORSE_THAN_MEDIAN}"
        except (Exception, SystemExit) as exc:  # the user's code: its error is the trial's
            state, error = "failed", f"{type(exc).__name__}: {exc}"
        duration = time.perf_counter() - started
        objective = None
        missing = False
        if state != "failed":
            if curve:
                pick = max if self.maximize else min
                final = curve[max(curve)]
                objective = (
                    pick(curve.values())
                    if state == "early_stopped" or self.spec["objective"]["value"] == "best"
                    else final
                )
            else:
                missing = True
                state, error = (
                    "failed",
                    (
                        f"objective.metric {self.metric!r}: trial {number} never reported it "
                        f"(it reported {', '.join(sorted({r[0] for r in rows})) or 'nothing'})"
                    ),
                )
        with self.app.db.transaction() as conn:
            run_id = create_run(
                conn,
                self.spec["experiment"],
                f"{self.spec['name']}-trial-{number}",
                values,
                None,
                execution_type="Trial",
                parent_run_id=self.row["run_id"],
            )
            conn.execute(
                "UPDATE runs SET status = ?, finished_at = ? WHERE id = ?",
                ("finished" if state != "failed" else "failed", utcnow(), run_id),
            )
            set_tags(
                conn, run_id, {"study": self.id, "trial": str(number), "attempt": str(attempt)}
            )
            conn.executemany(
                "INSERT INTO run_metrics (run_id, key, value, step, timestamp) "
                "VALUES (?, ?, ?, ?, ?)",
                [(run_id, *row) for row in rows],
            )
            self._record(number, params, vals, attempt)(conn, None, run_id)
            conn.execute(
                "UPDATE trials SET state = ?, objective = ?, error = ?, finished_at = ?, "
                "duration_s = ? WHERE study_id = ? AND number = ?",
                (state, objective, error, utcnow(), duration, self.id, number),
            )
            if state in ("succeeded", "early_stopped"):
                self._log_best(conn)
        if missing and not self._reported_before():
            self.suggester.tell(number, None, "failed")
            raise _ObjectiveMissing(error)  # the study's mistake, not the trial's
        self.suggester.tell(number, self._loss(objective), state if state != "succeeded" else "ok")
        if state == "succeeded":
            self.curves[number] = curve


def _seconds_between(start: str | None, end: str | None) -> float | None:
    if not start or not end:
        return None
    return round(max(0.0, parse_utc(end) - parse_utc(start)), 3)


def drive_study(app: Appliance, study_id: str) -> str:
    """The driver process's body: one driver per study (a lock), until the study ends."""
    import fcntl

    lock = app.settings.home / "run" / "studies" / f"{study_id}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with lock.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"study {study_id}: another driver holds it", file=sys.stderr)
            return "running"
        me = os.getpid()
        app.db.execute(
            "UPDATE studies SET driver_pid = ?, driver_identity = ? WHERE id = ?",
            (me, identity(me), study_id),
        )
        row = _row(app, study_id)
        if row["state"] not in ("running", "stopping"):
            return str(row["state"])
        try:
            return Driver(app, study_id).run()
        except Exception as exc:  # the driver's own failure must not leave it 'running'
            _wind_down(app, study_id, "failed", f"the study driver failed: {exc}", "driver")
            raise


def wait_study(
    app: Appliance,
    ref: str,
    timeout: float | None = None,
    on_change: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """Block until the study ends (or stops being driven), calling `on_change` on progress."""
    deadline = None if timeout is None else time.monotonic() + timeout
    seen: tuple[Any, ...] = ()
    while True:
        study = get_study(app, ref)
        key = (study["trials"], tuple(study["counts"].values()), study["state"])
        if key != seen and on_change is not None:
            on_change(study)
        seen = key
        if study["state"] not in ("running", "stopping"):
            return study
        if deadline is not None and time.monotonic() > deadline:
            return study
        time.sleep(0.2)
