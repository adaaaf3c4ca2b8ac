"""The metadata store: schema, pragmas, transactions, and many concurrent writers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.core.context import Appliance
from appliance.core.runs import create_run
from appliance.store.db import open_database
from appliance.store.migrations import schema_version

TABLES = {
    "datasets",
    "dataset_versions",
    "jobs",
    "experiments",
    "runs",
    "run_params",
    "run_metrics",
    "run_tags",
    "artifacts",
    "registered_models",
    "model_versions",
    "model_aliases",
    "studies",
    "trials",
    "alias_history",
    "deployments",
    "deployment_revisions",
    "lineage_artifacts",
    "lineage_executions",
    "lineage_events",
    "lineage_contexts",
    "lineage_attributions",
    "lineage_associations",
}


def test_schema_pragmas_and_idempotent_migrations(home: Path) -> None:
    home.mkdir()
    db = open_database(home / "metadata.db")
    names = {r["name"] for r in db.rows("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert TABLES <= names
    assert db.scalar("PRAGMA journal_mode") == "wal"
    assert db.scalar("PRAGMA foreign_keys") == 1
    assert db.scalar("PRAGMA busy_timeout") >= 5000
    applied = schema_version(db.conn)
    db.close()
    again = open_database(home / "metadata.db")
    assert schema_version(again.conn) == applied
    assert applied == [
        "m001_initial",
        "m002_data_stage",
        "m003_version_counter",
        "m004_job_queue",
        "m005_process_identity",
        "m006_cancel_request",
        "m007_registry_history",
        "m008_deployment_traffic",
        "m009_feature_definitions",
        "m010_feature_materializations",
        "m011_feature_usage",
        "m012_tuning",
        "m013_k3s_serving",
        "m014_pipelines",
        "m015_monitoring",
        "m016_alert_claims",
        "m017_drift_results_by_end",
    ]
    again.close()


def test_failed_transaction_leaves_nothing(app: Appliance) -> None:
    with pytest.raises(RuntimeError), app.db.transaction() as conn:
        conn.execute("INSERT INTO experiments (name, created_at) VALUES ('x', 'now')")
        raise RuntimeError("boom")
    assert app.db.scalar("SELECT count(*) FROM experiments") == 0


def test_foreign_keys_are_enforced(app: Appliance) -> None:
    import sqlite3

    with pytest.raises(sqlite3.IntegrityError):
        app.db.execute(
            "INSERT INTO run_metrics (run_id, key, value, step, timestamp) "
            "VALUES ('nope', 'k', 1, 0, 0)"
        )


WRITER = """
import sys, time
from appliance.core.context import Appliance
from appliance.core.runs import log_metric
home, run_id, worker, start = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4])
app = Appliance.open(home)
while time.time() < start:
    time.sleep(0.001)
first = time.time()
for step in range(500):
    log_metric(app, run_id, f"w{worker}", float(step), step)
print(first, time.time())
"""


def test_eight_processes_write_500_metrics_each_without_loss(app: Appliance) -> None:
    with app.db.transaction() as conn:
        run_id = create_run(conn, "concurrency", "writers", {}, None)
    start = time.time() + 3.0  # every writer begins its loop at the same instant
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(app.settings.home), run_id, str(w), str(start)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(8)
    ]
    spans = []
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err
        assert "locked" not in err
        spans.append([float(t) for t in out.split()])
    # The writers really contended: every one started before any of them finished.
    assert max(s[0] for s in spans) < min(s[1] for s in spans)
    counts = app.db.rows(
        "SELECT key, count(*) AS n, count(DISTINCT step) AS steps FROM run_metrics "
        "WHERE run_id = ? GROUP BY key ORDER BY key",
        (run_id,),
    )
    assert [(r["key"], r["n"], r["steps"]) for r in counts] == [
        (f"w{w}", 500, 500) for w in range(8)
    ]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork is POSIX")
def test_a_process_forked_while_another_thread_opens_a_store_can_open_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The agent forks job supervisors while its ship and watch threads open handles: a
    lock held by an opening thread must not be inherited held by the child."""
    import threading

    from appliance.core import context

    real = context.open_database
    opening = threading.Event()

    def slow_open(path: Path) -> Any:
        opening.set()
        time.sleep(1.0)
        return real(path)

    monkeypatch.setattr(context, "open_database", slow_open)
    other = Appliance.open(tmp_path / "a")
    thread = threading.Thread(target=lambda: other.db)
    thread.start()
    assert opening.wait(5)
    pid = os.fork()
    if pid == 0:  # the child: its own handle, then out (no test machinery after a fork)
        try:
            mine = Appliance.open(tmp_path / "b")
            mine.db.scalar("SELECT 1")
            os._exit(0)
        finally:
            os._exit(1)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung opening its own store")
    thread.join()
    other.close()
    assert os.waitstatus_to_exitcode(status) == 0
