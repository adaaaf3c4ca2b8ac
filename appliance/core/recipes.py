"""Recipes: a SQL file whose inputs are datasets and whose last SELECT becomes a new version.

A recipe runs through the job executor (so it runs wherever jobs run), in a DuckDB sandbox
that can read only its input files and write only its output. Running the same recipe text on
the same input versions again is a cache hit: the existing output version is returned.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from appliance.core import duck
from appliance.core.context import Appliance
from appliance.core.datasets import (
    _checks_for,
    add_version,
    describe_parquet,
    get_dataset_version,
    validate_table,
)
from appliance.core.jobs import JobSpec, submit_job
from appliance.core.names import validate_name
from appliance.core.query import lock_down, referenced_datasets, statements
from appliance.errors import InvalidInput, NotFound
from appliance.store.db import utcnow
from appliance.store.objects import StoredObject

ALLOWED = {"SELECT", "CREATE", "INSERT", "UPDATE", "DELETE"}
Emit = Callable[[dict[str, Any]], None]


def _parse(sql: str, where: str) -> list[Any]:
    parsed = statements(sql, ALLOWED, where)
    if parsed[-1].type.name != "SELECT":
        raise InvalidInput(f"{where}: the last statement must be the SELECT that makes the output")
    return parsed


def _last_select(stmt: Any) -> str:
    """The last statement's text without its trailing ';' (and any comment after it)."""
    import duckdb

    text = stmt.query
    tokens = duckdb.tokenize(text)
    while tokens and text[tokens[-1][0]] == ";":
        text = text[: tokens.pop()[0]]
    return text


def _execute_all(con: Any, parsed: list[Any], where: str, finish: Callable[[Any], None]) -> None:
    """Run the recipe's statements; the last SELECT becomes a relation handed to `finish`."""
    import duckdb

    for i, stmt in enumerate(parsed, 1):
        try:
            if i < len(parsed):
                con.execute(stmt.query)
            else:
                finish(con.sql(_last_select(stmt)))
        except duckdb.Error as exc:
            message = str(exc).strip()
            if "Table with name" in message and "does not exist" in message:
                message += " (no dataset or table by that name)"
            raise InvalidInput(f"{where}: statement {i}: {message}") from exc


def _dry_run(sql: str, parsed: list[Any], inputs: dict[str, dict[str, Any]], where: str) -> None:
    """Run the recipe on empty tables of the inputs' schemas: catches every binding error
    (a missing dataset, a wrong column) before a job starts, at no data cost."""
    con = duck.connect()
    try:
        for n, (token, version) in enumerate(inputs.items()):
            cols = ", ".join(
                f"{duck.sql_identifier(c['name'])} {c['type']}" for c in version["schema"]
            )
            # A view, as in the real run, over an empty table of the input's schema.
            con.execute(f"CREATE TABLE __empty_{n} ({cols})")
            con.execute(f"CREATE VIEW {duck.sql_identifier(token)} AS SELECT * FROM __empty_{n}")
        lock_down(con, [])
        _execute_all(con, parsed, where, lambda rel: rel.limit(0).fetchall())
    finally:
        con.close()


def run_recipe(
    app: Appliance,
    path: str | Path,
    out: str,
    checks_file: str | None = None,
    allow_invalid: bool = False,
    timestamp_col: str | None = None,
    bindings: dict[str, str] | None = None,
    use_cache: bool = True,
    **submit: Any,
) -> dict[str, Any]:
    """Submit a recipe (or return its cached output). Returns {cached, version | job, key}.

    `bindings` name a dataset version for an identifier the SQL reads (a pipeline's
    `inputs: {raw: churn@4}` makes `FROM raw` read churn@4); `submit` passes on to
    `submit_job`."""
    validate_name("--out", out)
    file = Path(path)
    if not file.is_file():
        raise InvalidInput(f"{file}: no such recipe file")
    sql = file.read_text()
    where = str(file)
    parsed = _parse(sql, where)
    inputs = referenced_datasets(app, sql)
    for token, ref in (bindings or {}).items():
        inputs[token.lower()] = get_dataset_version(app, ref)
    _, checks_text = _checks_for(app, out, checks_file)
    if checks_text is None:
        stored = app.db.one(
            "SELECT c.checks_yaml FROM dataset_checks c JOIN datasets d ON d.id = c.dataset_id "
            "WHERE d.name = ?",
            (out,),
        )
        checks_text = stored["checks_yaml"] if stored else None
    recipe_sha = hashlib.sha256(sql.encode()).hexdigest()
    key = hashlib.sha256(
        json.dumps(
            {
                "recipe": recipe_sha,
                "inputs": {t: v["sha256"] for t, v in sorted(inputs.items())},
                "out": out,
                "checks": checks_text,
                "allow_invalid": allow_invalid,
                "timestamp_col": timestamp_col,
            },
            sort_keys=True,
        ).encode()
    ).hexdigest()
    hit = cached_output(app, key) if use_cache else None
    if hit is not None:
        return {"cached": True, "version": hit, "key": key}
    _dry_run(sql, parsed, inputs, where)
    recipe_ref = f"recipe:{file.stem}@{recipe_sha[:12]}"
    spec = JobSpec(
        kind="recipe",
        inputs={
            "datasets": {
                t: {"ref": v["ref"], "sha256": v["sha256"]} for t, v in sorted(inputs.items())
            }
        },
        params={
            "sql": sql,
            "recipe": recipe_ref,
            "output": out,
            "cache_key": key,
            "checks": checks_text,
            "allow_invalid": allow_invalid,
            "timestamp_col": timestamp_col,
        },
    )
    job = submit_job(
        app,
        spec,
        experiment="recipes",
        run_name=f"{file.stem} -> {out}",
        inputs=[("DatasetVersion", f"dataset:{v['ref']}") for v in inputs.values()]
        + [("Recipe", recipe_ref)],
        **submit,
    )
    return {"cached": False, "job": job, "key": key}


def cached_output(app: Appliance, key: str) -> dict[str, Any] | None:
    """The version a recipe run with this cache key produced, if it still exists."""
    row = app.db.one(
        "SELECT d.name, dv.version FROM recipe_cache c "
        "JOIN dataset_versions dv ON dv.id = c.dataset_version_id "
        "JOIN datasets d ON d.id = dv.dataset_id WHERE c.key = ?",
        (key,),
    )
    if row is None:
        return None
    try:
        return get_dataset_version(app, f"{row['name']}@{row['version']}")
    except NotFound:
        return None


def record_output(app: Appliance, run_id: str, event: dict[str, Any]) -> None:
    """Called by the job supervisor when a recipe job reports its output Parquet."""
    meta = event["meta"]["dataset_version"]
    stored = StoredObject(sha256=event["sha256"], size=int(event["size"]), uri=event["uri"])
    version = add_version(
        app,
        meta["name"],
        stored,
        row_count=int(meta["row_count"]),
        schema=meta["schema"],
        source=meta["recipe"],
        timestamp_col=meta.get("timestamp_col"),
        validation=meta.get("validation"),
        execution="Recipe",
        execution_ref=f"run:{run_id}",
        inputs=[("DatasetVersion", f"dataset:{r}") for r in meta["inputs"]]
        + [("Recipe", meta["recipe"])],
    )
    app.db.execute(
        "INSERT INTO recipe_cache (key, dataset_version_id, created_at) VALUES (?, ?, ?) "
        "ON CONFLICT (key) DO UPDATE SET dataset_version_id = excluded.dataset_version_id",
        (meta["cache_key"], version["id"], utcnow()),
    )


def recipe_job(spec: JobSpec, emit: Emit) -> None:
    """The body of a recipe job: runs in the job process, never touches the metadata store."""
    from appliance.config import load_settings
    from appliance.core.checks import load_checks_text
    from appliance.store.objects import open_object_store

    params = spec.params
    settings = load_settings(os.environ.get("APPLIANCE_HOME"))
    store = open_object_store(settings)
    parsed = _parse(params["sql"], params["recipe"])
    total = len(parsed) + 2
    emit({"type": "progress", "done": 0, "total": total, "message": "loading inputs"})
    con = duck.connect(settings)
    with tempfile.TemporaryDirectory(dir=settings.cache_dir) as tmp:
        files = []
        for token, item in spec.inputs["datasets"].items():
            path = str(store.get_file(item["sha256"]))
            files.append(path)
            con.execute(
                f"CREATE VIEW {duck.sql_identifier(token)} AS "
                f"SELECT * FROM read_parquet({duck.sql_string(path)})"
            )
        lock_down(con, files, Path(tmp))
        output = Path(tmp) / "data.parquet"
        emit({"type": "progress", "done": 1, "total": total, "message": "running"})
        _execute_all(
            con,
            parsed,
            params["recipe"],
            lambda rel: rel.write_parquet(str(output), compression="zstd"),
        )
        table = f"read_parquet({duck.sql_string(str(output))})"
        rows, schema = describe_parquet(con, table)
        checks = load_checks_text(params["checks"], "checks") if params.get("checks") else []
        validation = validate_table(
            con,
            table,
            params["recipe"],
            schema,
            rows,
            params.get("timestamp_col"),
            checks,
            bool(params.get("allow_invalid")),
        )
        stored = store.put_file(output, move=True)
    con.close()
    emit(
        {
            "type": "artifact",
            "name": "dataset",
            "sha256": stored.sha256,
            "size": stored.size,
            "uri": stored.uri,
            "media_type": "application/vnd.apache.parquet",
            "meta": {
                "dataset_version": {
                    "name": params["output"],
                    "row_count": rows,
                    "schema": schema,
                    "recipe": params["recipe"],
                    "inputs": [item["ref"] for item in spec.inputs["datasets"].values()],
                    "timestamp_col": params.get("timestamp_col"),
                    "validation": validation,
                    "cache_key": params["cache_key"],
                }
            },
        }
    )
    emit({"type": "progress", "done": total, "total": total, "message": "done"})
