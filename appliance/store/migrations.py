"""Versioned schema migrations (sqlite-utils Migrations); each runs in its own transaction.

Never edit an applied migration: add a new one below it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from typing import Any

SET_NAME = "appliance"
TABLE = "_sqlite_migrations"


def m001_initial(db: Any) -> None:
    _run_script(
        db,
        """
        CREATE TABLE artifacts (
            id INTEGER PRIMARY KEY,
            sha256 TEXT NOT NULL UNIQUE,
            uri TEXT NOT NULL,
            size INTEGER NOT NULL,
            media_type TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE TABLE datasets (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL
        );
        CREATE TABLE dataset_versions (
            id INTEGER PRIMARY KEY,
            dataset_id INTEGER NOT NULL REFERENCES datasets(id),
            version INTEGER NOT NULL,
            artifact_id INTEGER NOT NULL REFERENCES artifacts(id),
            source TEXT NOT NULL,
            row_count INTEGER NOT NULL,
            schema_json TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (dataset_id, version)
        );
        CREATE TABLE experiments (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL
        );
        CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            kind TEXT NOT NULL,
            spec_json TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN
                ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'lost')),
            executor TEXT NOT NULL,
            pid INTEGER,
            exit_code INTEGER,
            error TEXT,
            log_path TEXT NOT NULL,
            progress_current REAL,
            progress_total REAL,
            progress_message TEXT,
            submitted_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT
        );
        CREATE TABLE runs (
            id TEXT PRIMARY KEY,
            experiment_id INTEGER NOT NULL REFERENCES experiments(id),
            name TEXT NOT NULL,
            status TEXT NOT NULL,
            job_id TEXT REFERENCES jobs(id),
            created_at TEXT NOT NULL,
            finished_at TEXT
        );
        CREATE TABLE run_params (
            run_id TEXT NOT NULL REFERENCES runs(id),
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (run_id, key)
        );
        CREATE TABLE run_metrics (
            id INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL REFERENCES runs(id),
            key TEXT NOT NULL,
            value REAL NOT NULL,
            step INTEGER NOT NULL DEFAULT 0,
            timestamp REAL NOT NULL
        );
        CREATE INDEX run_metrics_run_key ON run_metrics (run_id, key, step);
        CREATE TABLE run_tags (
            run_id TEXT NOT NULL REFERENCES runs(id),
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (run_id, key)
        );
        CREATE TABLE run_outputs (
            run_id TEXT NOT NULL REFERENCES runs(id),
            name TEXT NOT NULL,
            artifact_id INTEGER NOT NULL REFERENCES artifacts(id),
            meta_json TEXT NOT NULL,
            PRIMARY KEY (run_id, name)
        );
        CREATE TABLE registered_models (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            created_at TEXT NOT NULL
        );
        CREATE TABLE model_versions (
            id INTEGER PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES registered_models(id),
            version INTEGER NOT NULL,
            artifact_id INTEGER NOT NULL REFERENCES artifacts(id),
            run_id TEXT REFERENCES runs(id),
            dataset_version_id INTEGER REFERENCES dataset_versions(id),
            flavor TEXT NOT NULL,
            signature_json TEXT NOT NULL,
            metrics_json TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (model_id, version)
        );
        CREATE TABLE model_aliases (
            model_id INTEGER NOT NULL REFERENCES registered_models(id),
            alias TEXT NOT NULL,
            version_id INTEGER NOT NULL REFERENCES model_versions(id),
            updated_at TEXT NOT NULL,
            PRIMARY KEY (model_id, alias)
        );
        CREATE TABLE alias_history (
            id INTEGER PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES registered_models(id),
            alias TEXT NOT NULL,
            version_id INTEGER REFERENCES model_versions(id),
            changed_at TEXT NOT NULL
        );
        CREATE TABLE deployments (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            model_id INTEGER NOT NULL REFERENCES registered_models(id),
            current_revision INTEGER NOT NULL,
            status TEXT NOT NULL,
            host TEXT,
            port INTEGER,
            pid INTEGER,
            created_at TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE deployment_revisions (
            id INTEGER PRIMARY KEY,
            deployment_id INTEGER NOT NULL REFERENCES deployments(id),
            revision INTEGER NOT NULL,
            model_version_id INTEGER NOT NULL REFERENCES model_versions(id),
            action TEXT NOT NULL CHECK (action IN ('deploy', 'rollback')),
            created_at TEXT NOT NULL,
            UNIQUE (deployment_id, revision)
        );
        -- Lineage in the shape of ML Metadata: artifacts and executions joined by events.
        CREATE TABLE lineage_artifacts (
            id INTEGER PRIMARY KEY,
            type TEXT NOT NULL,
            ref TEXT NOT NULL UNIQUE,
            uri TEXT,
            created_at TEXT NOT NULL
        );
        CREATE TABLE lineage_executions (
            id INTEGER PRIMARY KEY,
            type TEXT NOT NULL,
            ref TEXT NOT NULL UNIQUE,
            state TEXT NOT NULL,
            created_at TEXT NOT NULL
        );
        CREATE TABLE lineage_events (
            id INTEGER PRIMARY KEY,
            artifact_id INTEGER NOT NULL REFERENCES lineage_artifacts(id),
            execution_id INTEGER NOT NULL REFERENCES lineage_executions(id),
            type TEXT NOT NULL CHECK (type IN ('INPUT', 'OUTPUT')),
            created_at TEXT NOT NULL,
            UNIQUE (artifact_id, execution_id, type)
        );
        CREATE TABLE lineage_contexts (
            id INTEGER PRIMARY KEY,
            type TEXT NOT NULL,
            name TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (type, name)
        );
        CREATE TABLE lineage_attributions (
            context_id INTEGER NOT NULL REFERENCES lineage_contexts(id),
            artifact_id INTEGER NOT NULL REFERENCES lineage_artifacts(id),
            PRIMARY KEY (context_id, artifact_id)
        );
        CREATE TABLE lineage_associations (
            context_id INTEGER NOT NULL REFERENCES lineage_contexts(id),
            execution_id INTEGER NOT NULL REFERENCES lineage_executions(id),
            PRIMARY KEY (context_id, execution_id)
        );
        """,
    )


def m002_data_stage(db: Any) -> None:
    _run_script(
        db,
        """
        ALTER TABLE dataset_versions ADD COLUMN creator TEXT;
        ALTER TABLE dataset_versions ADD COLUMN timestamp_col TEXT;
        ALTER TABLE dataset_versions
            ADD COLUMN rejects_artifact_id INTEGER REFERENCES artifacts(id);
        ALTER TABLE dataset_versions ADD COLUMN rejects_count INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE dataset_versions ADD COLUMN validation_json TEXT;
        CREATE TABLE dataset_checks (
            dataset_id INTEGER PRIMARY KEY REFERENCES datasets(id),
            checks_yaml TEXT NOT NULL,
            updated_at TEXT NOT NULL
        );
        CREATE TABLE dataset_profiles (
            dataset_version_id INTEGER NOT NULL REFERENCES dataset_versions(id) ON DELETE CASCADE,
            label TEXT NOT NULL,
            profile_json TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (dataset_version_id, label)
        );
        CREATE TABLE recipe_cache (
            key TEXT PRIMARY KEY,
            dataset_version_id INTEGER NOT NULL REFERENCES dataset_versions(id) ON DELETE CASCADE,
            created_at TEXT NOT NULL
        )
        """,
    )


def m003_version_counter(db: Any) -> None:
    # Version numbers are never reused, even after `data rm`: a ref always means one content.
    _run_script(
        db,
        """
        ALTER TABLE datasets ADD COLUMN last_version INTEGER NOT NULL DEFAULT 0;
        UPDATE datasets SET last_version =
            (SELECT coalesce(max(version), 0) FROM dataset_versions WHERE dataset_id = datasets.id)
        """,
    )


def m004_job_queue(db: Any) -> None:
    # The agent's queue: requested resources, timeout, retries and the attempt count per job,
    # the job process's own pid (its process group is what cancel and timeout kill), and the
    # final state 'timed_out'. 'lost' is no longer produced: a job whose process vanished is
    # reconciled to 'failed' (or queued again while retries remain).
    _widen_check(db, "jobs", "'cancelled', 'lost')", "'cancelled', 'lost', 'timed_out')")
    _run_script(
        db,
        """
        ALTER TABLE jobs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE jobs ADD COLUMN retries INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN timeout_s REAL;
        ALTER TABLE jobs ADD COLUMN child_pid INTEGER;
        ALTER TABLE jobs ADD COLUMN cpu REAL NOT NULL DEFAULT 1;
        ALTER TABLE jobs ADD COLUMN memory_bytes INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE jobs ADD COLUMN gpu INTEGER NOT NULL DEFAULT 0;
        UPDATE jobs SET state = 'failed',
            error = coalesce(error, 'the job process disappeared') WHERE state = 'lost';
        UPDATE runs SET status = 'failed' WHERE status = 'lost';
        CREATE INDEX jobs_state ON jobs (state, submitted_at)
        """,
    )


def m005_process_identity(db: Any) -> None:
    # A pid alone can be reused (after a reboot, or a long uptime): the process's start time
    # and the boot id identify the supervisor and the job process before anything is signalled.
    # gpu_ids: the GPUs the agent gave a running job (its CUDA_VISIBLE_DEVICES).
    _run_script(
        db,
        """
        ALTER TABLE jobs ADD COLUMN pid_identity TEXT;
        ALTER TABLE jobs ADD COLUMN child_identity TEXT;
        ALTER TABLE jobs ADD COLUMN gpu_ids TEXT
        """,
    )


def m006_cancel_request(db: Any) -> None:
    # A cancel is recorded before anything is signalled: a retry, a claim or a supervisor
    # that registers a moment later sees it and stops, instead of racing the signal.
    _run_script(db, "ALTER TABLE jobs ADD COLUMN cancel_requested INTEGER NOT NULL DEFAULT 0")


def m007_registry_history(db: Any) -> None:
    # Alias moves record from -> to, who and why (and a promotion's report); versions can be
    # archived, carry free tags and a model card written when they are registered.
    _run_script(
        db,
        """
        ALTER TABLE alias_history ADD COLUMN from_version_id INTEGER REFERENCES model_versions(id);
        ALTER TABLE alias_history ADD COLUMN actor TEXT;
        ALTER TABLE alias_history ADD COLUMN reason TEXT;
        ALTER TABLE alias_history ADD COLUMN report_json TEXT;
        ALTER TABLE model_versions ADD COLUMN archived_at TEXT;
        ALTER TABLE model_versions ADD COLUMN archive_reason TEXT;
        ALTER TABLE model_versions ADD COLUMN card_md TEXT;
        CREATE TABLE model_version_tags (
            version_id INTEGER NOT NULL REFERENCES model_versions(id),
            key TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (version_id, key)
        )
        """,
    )


def m008_deployment_traffic(db: Any) -> None:
    # Deployments gain worker processes, an alias to follow, a canary (a revision that gets a
    # share of the traffic, with a rule that rolls it back) and a generation that every change
    # of routing bumps, so a worker notices one with a one-row read. A revision records how a
    # canary ended (promoted, aborted), why, and who acted.
    _widen_check(
        db,
        "deployment_revisions",
        "IN ('deploy', 'rollback')",
        "IN ('deploy', 'rollback', 'canary', 'follow')",
    )
    _run_script(
        db,
        """
        ALTER TABLE deployments ADD COLUMN workers INTEGER NOT NULL DEFAULT 1;
        ALTER TABLE deployments ADD COLUMN follow_alias TEXT;
        ALTER TABLE deployments ADD COLUMN generation INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE deployments ADD COLUMN canary_revision INTEGER;
        ALTER TABLE deployments ADD COLUMN canary_percent REAL;
        ALTER TABLE deployments ADD COLUMN canary_rule TEXT;
        ALTER TABLE deployments ADD COLUMN canary_window_s REAL;
        ALTER TABLE deployment_revisions ADD COLUMN outcome TEXT;
        ALTER TABLE deployment_revisions ADD COLUMN reason TEXT;
        ALTER TABLE deployment_revisions ADD COLUMN actor TEXT
        """,
    )


def m009_feature_definitions(db: Any) -> None:
    # Entities, feature views and feature services: one row per immutable version, the spec as
    # JSON and its sha256 (an apply that changes nothing adds nothing).
    _run_script(
        db,
        """
        CREATE TABLE feature_definitions (
            id INTEGER PRIMARY KEY,
            kind TEXT NOT NULL CHECK (kind IN ('entity', 'view', 'service')),
            name TEXT NOT NULL,
            version INTEGER NOT NULL,
            spec_json TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (kind, name, version)
        )
        """,
    )


def m010_feature_materializations(db: Any) -> None:
    # Per feature view version: the end of the last materialization (incremental runs start a
    # lookback window before it), rows written, the newest event time seen, when it ran.
    _run_script(
        db,
        """
        CREATE TABLE feature_materializations (
            view TEXT NOT NULL,
            version INTEGER NOT NULL,
            last_end REAL NOT NULL,
            rows_written INTEGER NOT NULL,
            newest_event REAL,
            ran_at TEXT NOT NULL,
            PRIMARY KEY (view, version)
        )
        """,
    )


def m011_feature_usage(db: Any) -> None:
    # A model version records the feature service (pinned NAME@V) its training set was built
    # with; a deployment can name one, so callers send entity keys and the server looks up the
    # features. A feature view version keeps the profile of its output per source version.
    _run_script(
        db,
        """
        ALTER TABLE model_versions ADD COLUMN feature_service TEXT;
        ALTER TABLE deployments ADD COLUMN feature_service TEXT;
        CREATE TABLE feature_view_profiles (
            view TEXT NOT NULL,
            version INTEGER NOT NULL,
            dataset_version_id INTEGER NOT NULL
                REFERENCES dataset_versions(id) ON DELETE CASCADE,
            profile_json TEXT NOT NULL,
            created_at TEXT NOT NULL,
            PRIMARY KEY (view, version, dataset_version_id)
        )
        """,
    )


def m012_tuning(db: Any) -> None:
    # A study is a stored tuning run: its spec, state and driver process; each trial keeps the
    # values it used and hyperopt's own encoding of them (`vals`), so a resumed study rebuilds
    # the suggester's history exactly. A trial's run is a child of the study's run.
    _run_script(
        db,
        """
        ALTER TABLE runs ADD COLUMN parent_run_id TEXT REFERENCES runs(id);
        CREATE INDEX runs_parent ON runs (parent_run_id) WHERE parent_run_id IS NOT NULL;
        CREATE TABLE studies (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            spec_json TEXT NOT NULL,
            state TEXT NOT NULL
                CHECK (state IN ('running', 'stopping', 'stopped', 'succeeded', 'failed')),
            message TEXT,
            ended_by TEXT,
            run_id TEXT NOT NULL REFERENCES runs(id),
            driver_pid INTEGER,
            driver_identity TEXT,
            stop_requested INTEGER NOT NULL DEFAULT 0,
            elapsed_s REAL NOT NULL DEFAULT 0,
            created_at TEXT NOT NULL,
            finished_at TEXT
        );
        CREATE INDEX studies_name ON studies (name, created_at);
        CREATE TABLE trials (
            study_id TEXT NOT NULL REFERENCES studies(id) ON DELETE CASCADE,
            number INTEGER NOT NULL,
            params_json TEXT NOT NULL,
            vals_json TEXT NOT NULL,
            state TEXT NOT NULL CHECK (
                state IN ('running', 'succeeded', 'failed', 'early_stopped', 'cancelled')
            ),
            job_id TEXT REFERENCES jobs(id),
            run_id TEXT REFERENCES runs(id),
            objective REAL,
            error TEXT,
            attempt INTEGER NOT NULL DEFAULT 1,
            lost INTEGER NOT NULL DEFAULT 0,
            started_at TEXT NOT NULL,
            finished_at TEXT,
            duration_s REAL,
            PRIMARY KEY (study_id, number)
        )
        """,
    )


def m013_k3s_serving(db: Any) -> None:
    # A deployment records where it is served: 'local' (a server process on this machine) or
    # 'k3s' (a Deployment and a Service on the cluster), and on k3s the pods' resources. Each
    # k3s revision keeps the exact manifest it applied, so a rollback applies it again.
    _run_script(
        db,
        """
        ALTER TABLE deployments ADD COLUMN backend TEXT NOT NULL DEFAULT 'local';
        ALTER TABLE deployments ADD COLUMN resources_json TEXT;
        ALTER TABLE deployment_revisions ADD COLUMN manifest_json TEXT
        """,
    )


def m014_pipelines(db: Any) -> None:
    # A pipeline run keeps its definition as submitted (a later edit of the file changes
    # later runs only) and one row per step: its state, the job that ran it, the cache key
    # with what the key was made of, and its outputs. Triggers keep what they last saw, so
    # downtime collapses into one firing.
    _run_script(
        db,
        """
        CREATE TABLE pipeline_runs (
            id TEXT PRIMARY KEY,
            pipeline TEXT NOT NULL,
            definition_json TEXT NOT NULL,
            source TEXT NOT NULL,
            base_dir TEXT,
            params_json TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN
                ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            trigger TEXT NOT NULL DEFAULT 'manual',
            no_cache INTEGER NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            attempt INTEGER NOT NULL DEFAULT 1,
            error TEXT,
            created_at TEXT NOT NULL,
            started_at TEXT,
            finished_at TEXT
        );
        CREATE INDEX pipeline_runs_by_pipeline ON pipeline_runs (pipeline, created_at);
        CREATE INDEX pipeline_runs_active ON pipeline_runs (state);
        CREATE TABLE pipeline_steps (
            run_id TEXT NOT NULL REFERENCES pipeline_runs (id),
            step TEXT NOT NULL,
            kind TEXT NOT NULL,
            position INTEGER NOT NULL,
            after_json TEXT NOT NULL,
            state TEXT NOT NULL CHECK (state IN ('pending', 'running', 'succeeded', 'cached',
                'failed', 'skipped', 'cancelled')),
            attempt INTEGER NOT NULL DEFAULT 0,
            interruptions INTEGER NOT NULL DEFAULT 0,
            job_id TEXT,
            job_run_id TEXT,
            cache_key TEXT,
            cache_json TEXT,
            cached_from TEXT,
            outputs_json TEXT,
            error TEXT,
            started_at TEXT,
            finished_at TEXT,
            PRIMARY KEY (run_id, step)
        );
        CREATE INDEX pipeline_steps_by_key ON pipeline_steps (cache_key);
        CREATE INDEX pipeline_steps_by_job ON pipeline_steps (job_id);
        CREATE TABLE pipeline_triggers (
            id TEXT PRIMARY KEY,
            pipeline TEXT NOT NULL,
            source TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('schedule', 'dataset')),
            cron TEXT,
            dataset TEXT,
            param TEXT,
            params_json TEXT NOT NULL DEFAULT '[]',
            policy TEXT NOT NULL CHECK (policy IN ('queue', 'skip')),
            last_fired_at REAL NOT NULL,
            last_version INTEGER NOT NULL DEFAULT 0,
            last_run_id TEXT,
            last_message TEXT,
            created_at TEXT NOT NULL
        )
        """,
    )


def m015_monitoring(db: Any) -> None:
    # Prediction logs live as Parquet in the object store (one row here per file, by
    # deployment, kind and hour); feedback labels, drift results per window, monitors and
    # their alerts live here. A deployment logs request metadata by default and a sampled
    # share of its inputs and outputs (`log_sample`).
    _run_script(
        db,
        """
        ALTER TABLE deployments ADD COLUMN log_sample REAL NOT NULL DEFAULT 0;
        ALTER TABLE deployments ADD COLUMN log_requests INTEGER NOT NULL DEFAULT 1;
        CREATE TABLE prediction_logs (
            id INTEGER PRIMARY KEY,
            deployment TEXT NOT NULL,
            kind TEXT NOT NULL CHECK (kind IN ('requests', 'inputs')),
            hour TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            rows INTEGER NOT NULL,
            first_ts REAL NOT NULL,
            last_ts REAL NOT NULL,
            spool_name TEXT NOT NULL,
            created_at TEXT NOT NULL,
            UNIQUE (deployment, spool_name)
        );
        CREATE INDEX prediction_logs_by_time ON prediction_logs (deployment, kind, last_ts);
        CREATE TABLE monitor_feedback (
            deployment TEXT NOT NULL,
            request_id TEXT NOT NULL,
            row INTEGER NOT NULL,
            label TEXT NOT NULL,
            received_at REAL NOT NULL,
            PRIMARY KEY (deployment, request_id, row)
        );
        CREATE TABLE drift_results (
            id INTEGER PRIMARY KEY,
            deployment TEXT NOT NULL,
            version INTEGER NOT NULL,
            reference TEXT NOT NULL,
            window_start REAL NOT NULL,
            window_end REAL NOT NULL,
            rows INTEGER NOT NULL,
            results_json TEXT NOT NULL,
            computed_at TEXT NOT NULL
        );
        CREATE INDEX drift_results_by_deployment ON drift_results (deployment, window_end);
        CREATE TABLE monitors (
            id TEXT PRIMARY KEY,
            name TEXT NOT NULL UNIQUE,
            deployment TEXT NOT NULL,
            rule TEXT NOT NULL,
            every_s REAL NOT NULL,
            action_json TEXT NOT NULL,
            state TEXT NOT NULL DEFAULT 'pending'
                CHECK (state IN ('pending', 'ok', 'firing', 'no_data')),
            last_value REAL,
            last_error TEXT,
            last_checked_at REAL,
            created_at TEXT NOT NULL
        );
        CREATE TABLE monitor_alerts (
            id INTEGER PRIMARY KEY,
            monitor_id TEXT NOT NULL,
            monitor TEXT NOT NULL,
            deployment TEXT NOT NULL,
            rule TEXT NOT NULL,
            value REAL,
            fired_at TEXT NOT NULL,
            resolved_at TEXT,
            action TEXT,
            action_result TEXT
        );
        CREATE INDEX monitor_alerts_by_deployment ON monitor_alerts (deployment, fired_at)
        """,
    )


def m016_alert_claims(db: Any) -> None:
    # A monitor's action is claimed by one checker (`claimed_at`) and remembers the revision
    # the deployment served when its alert fired (`from_revision`): an action tried again
    # never rolls back a deployment that has moved since. Alerts open before this have no
    # such revision (-1: never acted on again), and an action they left unfinished is
    # taken over at once.
    _run_script(
        db,
        """
        ALTER TABLE monitor_alerts ADD COLUMN claimed_at REAL;
        ALTER TABLE monitor_alerts ADD COLUMN from_revision INTEGER;
        UPDATE monitor_alerts SET from_revision = -1,
            claimed_at = CASE WHEN action_result IS NULL THEN 0 END
            WHERE resolved_at IS NULL
        """,
    )


def m017_drift_results_by_end(db: Any) -> None:
    # Expired drift results are removed across every deployment as any result is stored (a
    # deployment nothing checks any more must not keep its results for ever): by window end.
    _run_script(db, "CREATE INDEX drift_results_by_end ON drift_results (window_end)")


def _widen_check(db: Any, table: str, old: str, new: str) -> None:
    """Rewrite a CHECK in `table`'s schema to allow more values: SQLite's documented
    writable_schema procedure for a change that leaves every stored row valid (rebuilding the
    table would trip foreign keys inside the migration's transaction)."""
    conn = db.conn
    (schema_version,) = conn.execute("PRAGMA schema_version").fetchone()
    conn.execute("PRAGMA writable_schema = ON")
    changed = conn.execute(
        "UPDATE sqlite_master SET sql = replace(sql, ?, ?) "
        "WHERE type = 'table' AND name = ? AND instr(sql, ?) > 0",
        (old, new, table, old),
    ).rowcount
    conn.execute(f"PRAGMA schema_version = {int(schema_version) + 1}")
    conn.execute("PRAGMA writable_schema = OFF")
    if changed != 1:
        raise sqlite3.DatabaseError(f"migration: the check {old!r} in table {table} was not found")


def _run_script(db: Any, script: str) -> None:
    # executescript() would COMMIT the migration's transaction first; run statements one by one.
    for statement in script.split(";\n"):
        if statement.strip():
            db.conn.execute(statement)


STEPS: list[Callable[[Any], None]] = [
    m001_initial,
    m002_data_stage,
    m003_version_counter,
    m004_job_queue,
    m005_process_identity,
    m006_cancel_request,
    m007_registry_history,
    m008_deployment_traffic,
    m009_feature_definitions,
    m010_feature_materializations,
    m011_feature_usage,
    m012_tuning,
    m013_k3s_serving,
    m014_pipelines,
    m015_monitoring,
    m016_alert_claims,
    m017_drift_results_by_end,
]


def applied_names(conn: sqlite3.Connection) -> list[str]:
    """Names of the applied migrations, oldest first (a plain query: no sqlite-utils import)."""
    exists = conn.execute(
        "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)
    ).fetchone()
    if not exists:
        return []
    rows = conn.execute(
        f"SELECT name FROM {TABLE} WHERE migration_set = ? ORDER BY rowid", (SET_NAME,)
    ).fetchall()
    return [r[0] for r in rows]


def migrate(conn: sqlite3.Connection) -> list[str]:
    """Apply pending migrations; returns the names applied.

    sqlite-utils (which pulls in pandas when installed) is imported only when something is
    pending, so opening an up-to-date store stays fast for every CLI call and job process.
    """
    done = set(applied_names(conn))
    pending = [step.__name__ for step in STEPS if step.__name__ not in done]
    if not pending:
        return []
    import sqlite_utils
    from sqlite_utils.migrations import Migrations

    migrations = Migrations(SET_NAME)
    for step in STEPS:
        migrations(name=step.__name__)(step)
    migrations.apply(sqlite_utils.Database(conn, execute_plugins=False))
    return pending


def schema_version(conn: sqlite3.Connection) -> list[str]:
    """Names of the applied migrations, oldest first."""
    return applied_names(conn)
