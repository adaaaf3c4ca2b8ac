"""Versioned datasets: CSV in, Parquet (written by DuckDB) out, stored content-addressed."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.lineage import record_execution
from appliance.core.names import split_ref, validate_name
from appliance.errors import InvalidInput, NotFound
from appliance.store.db import utcnow


def _sql_string(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_identifier(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _csv_to_parquet(csv_path: Path, parquet_path: Path) -> tuple[int, list[dict[str, str]]]:
    import duckdb

    # DuckDB expands glob characters in paths; read through a plain-named link instead.
    plain = parquet_path.parent / "source.csv"
    plain.symlink_to(csv_path)
    con = duckdb.connect()
    try:
        # RFC 4180 quoting stated, not sniffed, so an unterminated quote is an error.
        source = f"read_csv({_sql_string(str(plain))}, quote='\"', escape='\"')"
        try:
            described = con.execute(f"DESCRIBE SELECT * FROM {source}").fetchall()
            schema = [{"name": str(r[0]), "type": str(r[1])} for r in described]
            any_value = " OR ".join(f"{_sql_identifier(c['name'])} IS NOT NULL" for c in schema)
            rows = int(con.execute(f"SELECT count(*) FROM {source}").fetchone()[0])  # type: ignore[index]
            filled = int(
                con.execute(f"SELECT count(*) FROM {source} WHERE {any_value}").fetchone()[0]  # type: ignore[index]
            )
        except duckdb.Error as exc:
            first_line = str(exc).strip().splitlines()[0].replace(str(plain), str(csv_path))
            raise InvalidInput(f"{csv_path}: cannot be read as CSV: {first_line}") from exc
        if rows == 0 or filled == 0:
            raise InvalidInput(f"{csv_path}: has no data rows")
        con.execute(
            f"COPY (SELECT * FROM {source}) TO {_sql_string(str(parquet_path))} "
            "(FORMAT parquet, COMPRESSION zstd)"
        )
    finally:
        con.close()
    return rows, schema


def import_csv(app: Appliance, csv_path: str | Path, name: str) -> dict[str, Any]:
    """Import a CSV as the next version of dataset `name`; identical content reuses the latest."""
    validate_name("dataset name", name)
    path = Path(csv_path).expanduser()
    if not path.exists():
        raise InvalidInput(f"{path}: no such file")
    if not path.is_file():
        raise InvalidInput(f"{path}: not a regular file")
    if path.stat().st_size == 0:
        raise InvalidInput(f"{path}: file is empty")
    tmp_root = app.settings.cache_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
        parquet = Path(tmp) / "data.parquet"
        rows, schema = _csv_to_parquet(path.resolve(), parquet)
        stored = app.objects.put_file(parquet)

    now = utcnow()
    with app.db.transaction() as conn:
        conn.execute(
            "INSERT INTO datasets (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (name, now),
        )
        dataset_id = conn.execute("SELECT id FROM datasets WHERE name = ?", (name,)).fetchone()[0]
        latest = conn.execute(
            "SELECT dv.version, a.sha256 FROM dataset_versions dv "
            "JOIN artifacts a ON a.id = dv.artifact_id WHERE dv.dataset_id = ? "
            "ORDER BY dv.version DESC LIMIT 1",
            (dataset_id,),
        ).fetchone()
        if latest is not None and latest[1] == stored.sha256:
            version, created = int(latest[0]), False
        else:
            conn.execute(
                "INSERT INTO artifacts (sha256, uri, size, media_type, created_at) "
                "VALUES (?, ?, ?, 'application/vnd.apache.parquet', ?) "
                "ON CONFLICT (sha256) DO NOTHING",
                (stored.sha256, stored.uri, stored.size, now),
            )
            artifact_id = conn.execute(
                "SELECT id FROM artifacts WHERE sha256 = ?", (stored.sha256,)
            ).fetchone()[0]
            version = (latest[0] if latest else 0) + 1
            created = True
            conn.execute(
                "INSERT INTO dataset_versions (dataset_id, version, artifact_id, source, "
                "row_count, schema_json, created_at) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    dataset_id,
                    version,
                    artifact_id,
                    str(path.resolve()),
                    rows,
                    json.dumps(schema),
                    now,
                ),
            )
            record_execution(
                conn,
                "Import",
                f"import:{name}@{version}",
                inputs=[("File", f"file:{path.resolve()}")],
                outputs=[("DatasetVersion", f"dataset:{name}@{version}")],
                context=("Dataset", name),
            )
    result = get_dataset_version(app, f"{name}@{version}")
    result["created"] = created
    return result


_VERSION_SELECT = (
    "SELECT d.name, dv.id, dv.version, dv.row_count, dv.schema_json, dv.source, dv.created_at, "
    "a.sha256, a.size, a.uri FROM dataset_versions dv "
    "JOIN datasets d ON d.id = dv.dataset_id JOIN artifacts a ON a.id = dv.artifact_id "
)


def _version_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["schema"] = json.loads(row.pop("schema_json"))
    row["ref"] = f"{row['name']}@{row['version']}"
    return row


def get_dataset_version(app: Appliance, ref: str) -> dict[str, Any]:
    """A dataset version by 'name@version', or the latest by 'name'."""
    name, version = split_ref("dataset", ref)
    if version is None:
        row = app.db.one(
            _VERSION_SELECT + "WHERE d.name = ? ORDER BY dv.version DESC LIMIT 1", (name,)
        )
    else:
        row = app.db.one(_VERSION_SELECT + "WHERE d.name = ? AND dv.version = ?", (name, version))
    if row is None:
        raise NotFound(f"dataset {ref!r} not found")
    return _version_row(row)


def list_datasets(app: Appliance) -> list[dict[str, Any]]:
    """Each dataset with its latest version."""
    rows = app.db.rows(
        _VERSION_SELECT + "WHERE dv.version = (SELECT max(version) FROM dataset_versions "
        "WHERE dataset_id = dv.dataset_id) ORDER BY d.name"
    )
    return [
        {
            "name": r["name"],
            "latest": r["version"],
            "rows": r["row_count"],
            "columns": len(json.loads(r["schema_json"])),
            "sha256": r["sha256"][:12],
            "created_at": r["created_at"],
        }
        for r in rows
    ]


def list_dataset_versions(app: Appliance, name: str) -> list[dict[str, Any]]:
    validate_name("dataset", name)
    rows = app.db.rows(_VERSION_SELECT + "WHERE d.name = ? ORDER BY dv.version", (name,))
    if not rows:
        raise NotFound(f"dataset {name!r} not found")
    return [_version_row(r) for r in rows]
