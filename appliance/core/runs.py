"""Experiments and runs: params, metrics (with step and timestamp), tags and outputs."""

from __future__ import annotations

import json
import sqlite3
import time
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.lineage import Node, record_execution
from appliance.core.names import validate_name
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.store.db import utcnow

MetricRow = tuple[str, float, int, float]  # key, value, step, timestamp


def new_id() -> str:
    return uuid.uuid4().hex[:12]


def create_run(
    conn: sqlite3.Connection,
    experiment: str,
    name: str,
    params: dict[str, Any],
    job_id: str | None,
    inputs: Iterable[Node] = (),
    execution_type: str = "Run",
    parent_run_id: str | None = None,
) -> str:
    """Insert a run (inside the caller's transaction) and its lineage execution; a tuning
    trial's run names its study's run as its parent."""
    validate_name("experiment", experiment)
    now = utcnow()
    conn.execute(
        "INSERT INTO experiments (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        (experiment, now),
    )
    experiment_id = conn.execute(
        "SELECT id FROM experiments WHERE name = ?", (experiment,)
    ).fetchone()[0]
    run_id = new_id()
    conn.execute(
        "INSERT INTO runs (id, experiment_id, name, status, job_id, created_at, parent_run_id) "
        "VALUES (?, ?, ?, 'queued', ?, ?, ?)",
        (run_id, experiment_id, name, job_id, now, parent_run_id),
    )
    conn.executemany(
        "INSERT INTO run_params (run_id, key, value) VALUES (?, ?, ?)",
        [(run_id, k, json.dumps(v)) for k, v in sorted(params.items())],
    )
    record_execution(
        conn,
        execution_type,
        f"run:{run_id}",
        inputs=inputs,
        state="NEW",
        context=("Experiment", experiment),
    )
    return run_id


def log_metrics(app: Appliance, run_id: str, rows: list[MetricRow]) -> None:
    """Append metric rows in one transaction."""
    if not rows:
        return
    with app.db.transaction() as conn:
        conn.executemany(
            "INSERT INTO run_metrics (run_id, key, value, step, timestamp) VALUES (?, ?, ?, ?, ?)",
            [(run_id, k, float(v), int(s), float(t)) for k, v, s, t in rows],
        )


def log_metric(app: Appliance, run_id: str, key: str, value: float, step: int = 0) -> None:
    log_metrics(app, run_id, [(key, value, step, time.time())])


def set_params(conn: sqlite3.Connection, run_id: str, params: dict[str, Any]) -> None:
    conn.executemany(
        "INSERT INTO run_params (run_id, key, value) VALUES (?, ?, ?) "
        "ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
        [(run_id, str(k), json.dumps(v)) for k, v in params.items()],
    )


def set_tags(conn: sqlite3.Connection, run_id: str, tags: dict[str, Any]) -> None:
    conn.executemany(
        "INSERT INTO run_tags (run_id, key, value) VALUES (?, ?, ?) "
        "ON CONFLICT (run_id, key) DO UPDATE SET value = excluded.value",
        [(run_id, str(k), str(v)) for k, v in tags.items()],
    )


def _resolve_id(app: Appliance, run_id: str) -> str:
    if not run_id or not all(c in "0123456789abcdef" for c in run_id):
        raise InvalidInput(f"run id {run_id!r}: expected hexadecimal characters")
    ids = [r["id"] for r in app.db.rows("SELECT id FROM runs WHERE id LIKE ?", (run_id + "%",))]
    if not ids:
        raise NotFound(f"run {run_id!r} not found")
    if len(ids) > 1:
        raise InvalidInput(f"run id {run_id!r} is ambiguous: matches {len(ids)} runs")
    return str(ids[0])


def latest_metrics(app: Appliance, run_id: str) -> dict[str, float]:
    rows = app.db.rows(
        "SELECT key, value FROM run_metrics WHERE id IN "
        "(SELECT max(id) FROM run_metrics WHERE run_id = ? GROUP BY key) ORDER BY key",
        (run_id,),
    )
    return {r["key"]: r["value"] for r in rows}


def get_run(app: Appliance, run_id: str) -> dict[str, Any]:
    """A run with its params, latest metrics, tags and outputs; `run_id` may be a unique prefix."""
    full_id = _resolve_id(app, run_id)
    run = app.db.one(
        "SELECT r.id, e.name AS experiment, r.name, r.status, r.job_id, r.created_at, "
        "r.finished_at, r.parent_run_id FROM runs r "
        "JOIN experiments e ON e.id = r.experiment_id WHERE r.id = ?",
        (full_id,),
    )
    assert run is not None
    run["params"] = {
        r["key"]: json.loads(r["value"])
        for r in app.db.rows("SELECT key, value FROM run_params WHERE run_id = ?", (full_id,))
    }
    run["metrics"] = latest_metrics(app, full_id)
    run["tags"] = {
        r["key"]: r["value"]
        for r in app.db.rows("SELECT key, value FROM run_tags WHERE run_id = ?", (full_id,))
    }
    run["outputs"] = [
        {**{k: v for k, v in r.items() if k != "meta_json"}, "meta": json.loads(r["meta_json"])}
        for r in app.db.rows(
            "SELECT o.name, a.sha256, a.uri, a.size, o.meta_json FROM run_outputs o "
            "JOIN artifacts a ON a.id = o.artifact_id WHERE o.run_id = ? ORDER BY o.name",
            (full_id,),
        )
    ]
    return run


def metric_history(app: Appliance, run_id: str, key: str) -> list[dict[str, Any]]:
    full_id = _resolve_id(app, run_id)
    return app.db.rows(
        "SELECT step, value, timestamp FROM run_metrics WHERE run_id = ? AND key = ? ORDER BY id",
        (full_id, key),
    )


def curve_keys(app: Appliance, run_ids: list[str]) -> list[str]:
    """Metrics with more than one point in any of these runs: the ones worth drawing."""
    keys: set[str] = set()
    for run_id in run_ids:
        keys.update(
            r["key"]
            for r in app.db.rows(
                "SELECT key FROM run_metrics WHERE run_id = ? GROUP BY key HAVING count(*) > 1",
                (_resolve_id(app, run_id),),
            )
        )
    # Validation curves first: they are what early stopping watched.
    return sorted(keys, key=lambda k: (not k.startswith("valid"), k))


def list_runs(app: Appliance, experiment: str | None = None) -> list[dict[str, Any]]:
    sql = (
        "SELECT r.id, e.name AS experiment, r.name, r.status, r.job_id, r.created_at "
        "FROM runs r JOIN experiments e ON e.id = r.experiment_id "
    )
    params: tuple[Any, ...] = ()
    if experiment:
        sql += "WHERE e.name = ? "
        params = (experiment,)
    rows = app.db.rows(sql + "ORDER BY r.created_at DESC, r.rowid DESC", params)
    for row in rows:
        metrics = latest_metrics(app, row["id"])
        row["metrics"] = ", ".join(f"{k}={v:.4g}" for k, v in metrics.items())
    return rows


_LOWER_IS_BETTER = ("loss", "rmse", "mae", "mse", "error", "l1", "l2", "seconds")


def lower_is_better(metric: str) -> bool:
    """Whether a smaller value of this metric is the better one (loss, rmse, …)."""
    return any(part in metric.lower() for part in _LOWER_IS_BETTER)


def sort_runs(rows: list[dict[str, Any]], key: str) -> list[dict[str, Any]]:
    """Sort by `metric.NAME`, `param.NAME` or a column. A metric sorts best first (highest
    AUC, lowest loss); a leading '-' sorts descending and '+' ascending, explicitly.
    Runs without the value go last either way."""
    field = key.lstrip("+-")
    kind, _, name = field.partition(".")
    if kind not in ("metric", "param") or not name:
        if rows and field not in rows[0]:
            raise InvalidInput(f"--sort {key!r}: use metric.NAME, param.NAME or a column name")
        kind, name = "column", field
    if key[:1] in "+-" and key:
        descending = key.startswith("-")
    else:
        descending = kind == "metric" and not lower_is_better(name)

    def value(row: dict[str, Any]) -> Any:
        if kind == "metric":
            return row["_metrics"].get(name)
        if kind == "param":
            return row["_params"].get(name)
        return row.get(name)

    present = [r for r in rows if value(r) is not None]
    missing = [r for r in rows if value(r) is None]
    try:
        present.sort(key=value, reverse=descending)
    except TypeError:
        present.sort(key=lambda r: str(value(r)), reverse=descending)
    return present + missing


def runs_table(
    app: Appliance, experiment: str | None = None, sort: str | None = None
) -> list[dict]:
    """`list_runs` with each run's params and final metrics attached, optionally sorted."""
    rows = list_runs(app, experiment)
    for row in rows:
        row["_metrics"] = latest_metrics(app, row["id"])
        row["_params"] = {
            r["key"]: json.loads(r["value"])
            for r in app.db.rows("SELECT key, value FROM run_params WHERE run_id = ?", (row["id"],))
        }
    if sort:
        rows = sort_runs(rows, sort)
    for row in rows:
        row.pop("_params")
        row["metric_values"] = row.pop("_metrics")
    return rows


def compare_runs(app: Appliance, run_ids: list[str]) -> dict[str, Any]:
    """Params side by side (with which differ) and final and best metrics of each run."""
    runs = []
    for run_id in run_ids:
        run = get_run(app, run_id)
        if run["id"] not in [r["id"] for r in runs]:  # the same run named twice counts once
            runs.append(run)
    if len(runs) < 2:
        raise InvalidInput("runs compare: give at least two different run ids")
    ids = [r["id"] for r in runs]
    param_keys = sorted({k for r in runs for k in r["params"]})
    params = []
    for key in param_keys:
        values = [r["params"].get(key) for r in runs]
        same = all(
            json.dumps(v, sort_keys=True) == json.dumps(values[0], sort_keys=True) for v in values
        )
        params.append({"param": key, "values": values, "differs": not same})
    metric_keys = sorted({k for r in runs for k in r["metrics"]})
    metrics = []
    for key in metric_keys:
        best_fn = "min" if lower_is_better(key) else "max"
        best = [
            app.db.scalar(
                f"SELECT {best_fn}(value) FROM run_metrics WHERE run_id = ? AND key = ?",
                (run_id, key),
            )
            for run_id in ids
        ]
        final = [r["metrics"].get(key) for r in runs]
        candidates = [v for v in final if v is not None]
        winner = None
        if candidates:
            target = min(candidates) if best_fn == "min" else max(candidates)
            winner = ids[final.index(target)]
        metrics.append(
            {"metric": key, "final": final, "best": best, "better": best_fn, "leader": winner}
        )
    return {"runs": ids, "names": [r["name"] for r in runs], "params": params, "metrics": metrics}


def delete_run(app: Appliance, run_id: str) -> dict[str, Any]:
    """Delete a finished run and its records; refused while a model version comes from it."""
    run = get_run(app, run_id)
    if run["status"] in ("queued", "running"):
        raise Conflict(f"run {run['id']} is {run['status']}; cancel its job first")
    used = app.db.rows(
        "SELECT m.name, mv.version FROM model_versions mv "
        "JOIN registered_models m ON m.id = mv.model_id WHERE mv.run_id = ?",
        (run["id"],),
    )
    if used:
        refs = ", ".join(f"{u['name']}@{u['version']}" for u in used)
        raise Conflict(f"run {run['id']} produced registered model version(s) {refs}")
    study = app.db.one(
        "SELECT s.id, s.name FROM studies s WHERE s.run_id = ? UNION ALL "
        "SELECT s.id, s.name FROM trials t JOIN studies s ON s.id = t.study_id WHERE t.run_id = ?",
        (run["id"], run["id"]),
    )
    if study is not None:  # a study's history is its trials: keep them whole
        raise Conflict(f"run {run['id']} belongs to tuning study {study['name']} ({study['id']})")
    log_path = app.db.scalar("SELECT log_path FROM jobs WHERE id = ?", (run["job_id"],))
    with app.db.transaction() as conn:
        for table in ("run_metrics", "run_params", "run_tags", "run_outputs"):
            conn.execute(f"DELETE FROM {table} WHERE run_id = ?", (run["id"],))
        conn.execute("DELETE FROM runs WHERE id = ?", (run["id"],))
        conn.execute("DELETE FROM jobs WHERE id = ?", (run["job_id"],))
        execution = conn.execute(
            "SELECT id FROM lineage_executions WHERE ref = ?", (f"run:{run['id']}",)
        ).fetchone()
        if execution is not None:
            for table in ("lineage_events", "lineage_associations"):
                conn.execute(f"DELETE FROM {table} WHERE execution_id = ?", (execution[0],))
            conn.execute("DELETE FROM lineage_executions WHERE id = ?", (execution[0],))
    if log_path:
        Path(log_path).unlink(missing_ok=True)
    return {"deleted": run["id"], "job": run["job_id"]}
