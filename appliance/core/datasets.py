"""Versioned datasets: import CSV/TSV/Parquet/JSON with DuckDB, store Parquet content-addressed.

Every import, recipe output and split is an immutable version (`name@3`, `name@latest`) with
its row count, schema, content hash, creator and lineage. A version is only listed once its
Parquet is committed to the object store and its row is committed in one transaction, so an
import killed halfway leaves nothing behind.
"""

from __future__ import annotations

import getpass
import glob
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core import duck
from appliance.core.checks import ValidationFailed, failure_message, load_checks_text, run_checks
from appliance.core.context import Appliance
from appliance.core.lineage import Node, record_execution
from appliance.core.names import validate_name
from appliance.errors import Conflict, InvalidInput, NotFound
from appliance.store.db import utcnow
from appliance.store.objects import StoredObject

EXTENSIONS = {
    ".csv": "csv",
    ".csv.gz": "csv",
    ".tsv": "tsv",
    ".tsv.gz": "tsv",
    ".txt": "csv",
    ".parquet": "parquet",
    ".pq": "parquet",
    ".json": "json",
    ".json.gz": "json",
    ".ndjson": "ndjson",
    ".jsonl": "ndjson",
    ".ndjson.gz": "ndjson",
    ".jsonl.gz": "ndjson",
}
FORMATS = ("csv", "tsv", "parquet", "json", "ndjson")
TIME_TYPES = (
    "DATE",
    "TIMESTAMP",
    "TIMESTAMP WITH TIME ZONE",
    "TIMESTAMP_NS",
    "TIMESTAMP_MS",
    "TIMESTAMP_S",
)
PARQUET_MEDIA = "application/vnd.apache.parquet"


@dataclass
class ImportOptions:
    """How to read a source. None means: detect it."""

    format: str | None = None
    delimiter: str | None = None
    header: bool | None = None
    quote: str = '"'
    escape: str | None = None
    encoding: str | None = None
    schema: dict[str, str] = field(default_factory=dict)
    timestamp_col: str | None = None
    rejects: bool = False  # keep going and store bad rows (the default is strict)
    checks_file: str | None = None
    allow_invalid: bool = False


def _extension(path: str) -> str:
    lower = path.lower()
    for ext in sorted(EXTENSIONS, key=len, reverse=True):
        if lower.endswith(ext):
            return ext
    return ""


def resolve_sources(source: str) -> tuple[list[str], bool]:
    """The files a SOURCE names: a file, a directory, a glob, or an s3:// URL."""
    if source.startswith("s3://"):
        return [source], True
    path = Path(source).expanduser()
    if path.is_dir():
        files = sorted(
            str(p)
            for p in path.iterdir()
            if p.is_file() and not p.name.startswith(".") and _extension(p.name)
        )
        if not files:
            raise InvalidInput(f"{path}: directory holds no .csv/.tsv/.parquet/.json files")
    elif path.exists():
        files = [str(path)]
    elif any(c in source for c in "*?["):
        files = sorted(p for p in glob.glob(os.path.expanduser(source)) if Path(p).is_file())
        if not files:
            raise InvalidInput(f"{source}: the pattern matches no file")
    else:
        raise InvalidInput(f"{source}: no such file")
    for file in files:
        if Path(file).stat().st_size == 0:
            raise InvalidInput(f"{file}: file is empty")
    return files, False


def detect_format(files: list[str], requested: str | None) -> str:
    if requested:
        if requested not in FORMATS:
            raise InvalidInput(f"--format {requested!r}: expected one of {', '.join(FORMATS)}")
        return requested
    found = {EXTENSIONS.get(_extension(f)) for f in files}
    if None in found:
        raise InvalidInput(f"{files[0]}: unknown file type; pass --format")
    if len(found) > 1:
        raise InvalidInput(f"sources mix formats {sorted(found)}; import them separately")  # type: ignore[type-var]
    return found.pop()  # type: ignore[return-value]


def _reader(fmt: str, paths: list[str], opts: ImportOptions) -> str:
    listed = "[" + ", ".join(duck.sql_string(p) for p in paths) + "]"
    if fmt in ("csv", "tsv"):
        args = [
            "store_rejects = true",
            "rejects_table = 'appliance_reject_errors'",
            "rejects_scan = 'appliance_reject_scans'",
            "allow_quoted_nulls = false",  # "" is an empty string, not a missing value
            f"quote = {duck.sql_string(opts.quote)}",
            f"escape = {duck.sql_string(opts.escape or opts.quote)}",
        ]
        delimiter = opts.delimiter or ("\t" if fmt == "tsv" else None)
        if delimiter:
            args.append(f"delim = {duck.sql_string(delimiter)}")
        if opts.header is not None:
            args.append(f"header = {'true' if opts.header else 'false'}")
        if opts.encoding:
            args.append(f"encoding = {duck.sql_string(opts.encoding)}")
        if opts.schema:
            types = ", ".join(
                f"{duck.sql_string(k)}: {duck.sql_string(v)}" for k, v in opts.schema.items()
            )
            args.append(f"types = {{{types}}}")
        return f"read_csv({listed}, {', '.join(args)})"
    if fmt == "parquet":
        return f"read_parquet({listed}, union_by_name = true)"
    layout = "newline_delimited" if fmt == "ndjson" else "auto"
    return f"read_json({listed}, format = '{layout}', union_by_name = true)"


def _check_header(path: str, link: str, opts: ImportOptions, con: Any) -> None:
    """DuckDB renames duplicate header names silently; refuse them instead."""
    import csv

    sniffed = con.execute(
        f"SELECT Delimiter, HasHeader FROM sniff_csv({duck.sql_string(link)}, "
        f"quote = {duck.sql_string(opts.quote)}"
        + (f", delim = {duck.sql_string(opts.delimiter)}" if opts.delimiter else "")
        + (f", encoding = {duck.sql_string(opts.encoding)}" if opts.encoding else "")
        + ")"
    ).fetchone()
    has_header = opts.header if opts.header is not None else bool(sniffed[1])
    if not has_header:
        return
    import gzip

    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rt", encoding=opts.encoding or "utf-8", errors="replace", newline="") as fh:
        first = next(csv.reader(fh, delimiter=sniffed[0] or ",", quotechar=opts.quote), [])
    seen: set[str] = set()
    for name in first:
        key = name.strip().lower()
        if key in seen:
            raise InvalidInput(f"{path}: line 1: duplicate column name {name.strip()!r}")
        seen.add(key)


def _duck_error(exc: Exception, links: dict[str, str]) -> str:
    text = str(exc).strip()
    for link, original in links.items():
        text = text.replace(link, original)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    keep = [ln for ln in lines[:4] if not ln.startswith(("Possible Solution", "Original Line"))]
    message = " | ".join(keep)
    if "not utf-8 encoded" in message:
        message += " (pass --encoding, e.g. --encoding latin-1)"
    return message


def _rejects(con: Any, links: dict[str, str]) -> list[dict[str, Any]]:
    try:
        rows = con.execute(
            "SELECT s.file_path, e.line, e.column_name, e.error_type, e.error_message, e.csv_line "
            "FROM appliance_reject_errors e JOIN appliance_reject_scans s "
            "ON s.scan_id = e.scan_id AND s.file_id = e.file_id ORDER BY s.file_path, e.line"
        ).fetchall()
    except Exception:  # no rejects tables: the reader does not support them
        return []
    seen: set[tuple[str, int]] = set()
    unique = []
    for r in rows:  # one row can break several rules; report it once
        if (r[0], r[1]) not in seen:
            seen.add((r[0], r[1]))
            unique.append(r)
    return [
        {
            "file": links.get(r[0], r[0]),
            "line": r[1],
            "column": r[2],
            "error": r[3],
            "message": r[4],
            "row": r[5],
        }
        for r in unique
    ]


def _original_path_sql(column: str, links: dict[str, str]) -> str:
    """A SQL expression turning our temporary link names back into the user's paths."""
    cases = " ".join(
        f"WHEN {duck.sql_string(link)} THEN {duck.sql_string(original)}"
        for link, original in links.items()
    )
    return f"CASE {column} {cases} ELSE {column} END" if cases else column


def _rejects_message(rejects: list[dict[str, Any]]) -> str:
    lines = [f"{len(rejects)} bad row(s); nothing was imported (use --rejects to keep going)"]
    for r in rejects[:5]:
        hint = " (try --encoding)" if r["error"] == "INVALID ENCODING" else ""
        column = f" column {r['column']!r}" if r["column"] else ""
        message = r["message"] if len(r["message"]) <= 200 else r["message"][:200] + "…"
        lines.append(f"  {r['file']}: line {r['line']}{column}: {message}{hint}")
    return "\n".join(lines)


def _checks_for(app: Appliance, name: str, checks_file: str | None) -> tuple[list, str | None]:
    if checks_file:
        path = Path(checks_file)
        if not path.is_file():
            raise InvalidInput(f"--checks {checks_file}: no such file")
        text = path.read_text()
        return load_checks_text(text, str(path)), text
    row = app.db.one(
        "SELECT c.checks_yaml FROM dataset_checks c JOIN datasets d ON d.id = c.dataset_id "
        "WHERE d.name = ?",
        (name,),
    )
    if row is None:
        return [], None
    return load_checks_text(row["checks_yaml"], f"checks of dataset {name}"), None


def describe_parquet(con: Any, table: str) -> tuple[int, list[dict[str, str]]]:
    schema = [
        {"name": str(r[0]), "type": str(r[1])}
        for r in con.execute(f"DESCRIBE SELECT * FROM {table}").fetchall()
    ]
    rows = int(con.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
    return rows, schema


def validate_table(
    con: Any,
    table: str,
    source: str,
    schema: list[dict[str, str]],
    rows: int,
    timestamp_col: str | None,
    checks: list,
    allow_invalid: bool,
) -> list[dict[str, Any]]:
    """Refuse empty data and bad timestamp columns; run the checks (raising on failure)."""
    if rows == 0:
        raise InvalidInput(f"{source}: has no data rows")
    any_value = " OR ".join(f"{duck.sql_identifier(c['name'])} IS NOT NULL" for c in schema)
    if not con.execute(f"SELECT count(*) FROM {table} WHERE {any_value}").fetchone()[0]:
        raise InvalidInput(f"{source}: has no data rows (every value is empty)")
    if timestamp_col:
        types = {c["name"]: c["type"] for c in schema}
        if timestamp_col not in types:
            raise InvalidInput(f"--timestamp-col {timestamp_col!r}: no such column in {source}")
        if types[timestamp_col] not in TIME_TYPES:
            raise InvalidInput(
                f"--timestamp-col {timestamp_col!r} is {types[timestamp_col]}, not a timestamp; "
                f"override it with --schema {timestamp_col}=TIMESTAMP"
            )
    results = run_checks(con, table, checks, [c["name"] for c in schema], timestamp_col)
    if any(r["failing"] for r in results) and not allow_invalid:
        raise ValidationFailed(failure_message(source, results))
    return results


def import_data(
    app: Appliance, name: str, source: str | Path, opts: ImportOptions | None = None
) -> dict[str, Any]:
    """Import SOURCE as the next version of dataset `name`; identical content reuses the latest."""
    import duckdb

    opts = opts or ImportOptions()
    validate_name("dataset name", name)
    files, remote = resolve_sources(str(source))
    fmt = detect_format(files, opts.format)
    if opts.rejects and fmt not in ("csv", "tsv"):
        raise InvalidInput("--rejects: only CSV and TSV sources can keep going past bad rows")
    checks, checks_text = _checks_for(app, name, opts.checks_file)
    tmp_root = app.settings.cache_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    sweep_stale(tmp_root)
    con = duck.connect(app.settings, s3=remote)
    try:
        with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
            links: dict[str, str] = {}
            paths = []
            for i, file in enumerate(files):
                if remote:
                    paths.append(file)
                    continue
                # DuckDB expands glob characters in paths: read through plain-named links.
                link = str(Path(tmp) / f"source-{i:05d}{_extension(file)}")
                os.symlink(Path(file).resolve(), link)
                links[link] = file
                paths.append(link)
            if fmt in ("csv", "tsv") and not remote:
                for link in paths:
                    try:
                        _check_header(links[link], link, opts, con)
                    except duckdb.Error as exc:
                        raise InvalidInput(f"{links[link]}: {_duck_error(exc, links)}") from exc
            data = Path(tmp) / "data.parquet"
            select = "*"
            if opts.schema and fmt not in ("csv", "tsv"):
                casts = ", ".join(
                    f"CAST({duck.sql_identifier(k)} AS {v}) AS {duck.sql_identifier(k)}"
                    for k, v in opts.schema.items()
                )
                select = f"* REPLACE ({casts})"
            try:
                con.execute(
                    f"COPY (SELECT {select} FROM {_reader(fmt, paths, opts)}) TO "
                    f"{duck.sql_string(str(data))} (FORMAT parquet, COMPRESSION zstd)"
                )
            except duckdb.Error as exc:
                where = files[0] if len(files) == 1 else str(source)
                raise InvalidInput(f"{where}: {_duck_error(exc, links)}") from exc
            rejects = _rejects(con, links)
            if rejects and not opts.rejects:
                raise InvalidInput(f"{source}: {_rejects_message(rejects)}")
            table = f"read_parquet({duck.sql_string(str(data))})"
            rows, schema = describe_parquet(con, table)
            validation = validate_table(
                con,
                table,
                str(source),
                schema,
                rows,
                opts.timestamp_col,
                checks,
                opts.allow_invalid,
            )
            stored = app.objects.put_file(data, move=True)
            rejects_stored = None
            if rejects:
                rejects_file = Path(tmp) / "rejects.parquet"
                con.execute(
                    "COPY (SELECT DISTINCT ON (s.file_path, e.line) "
                    + _original_path_sql("s.file_path", links)
                    + " AS file, e.line, "
                    "e.column_name, e.error_type, e.error_message, e.csv_line "
                    "FROM appliance_reject_errors e "
                    "JOIN appliance_reject_scans s ON s.scan_id = e.scan_id "
                    "AND s.file_id = e.file_id ORDER BY s.file_path, e.line) TO "
                    f"{duck.sql_string(str(rejects_file))} (FORMAT parquet)"
                )
                rejects_stored = app.objects.put_file(rejects_file)
    finally:
        con.close()
    version = add_version(
        app,
        name,
        stored,
        row_count=rows,
        schema=schema,
        source=", ".join(files) if len(files) <= 3 else f"{source} ({len(files)} files)",
        timestamp_col=opts.timestamp_col,
        rejects=(rejects_stored, len(rejects)),
        validation=validation,
        execution="Import",
        inputs=[("File", f"file:{f}") for f in files],
    )
    if checks_text is not None:
        set_checks_text(app, name, checks_text)
    return version


def sweep_stale(tmp_root: Path, older_than: float = 6 * 3600) -> None:
    """Remove temp directories left by imports that were killed (kill -9, power loss)."""
    import shutil
    import time

    cutoff = time.time() - older_than
    for entry in tmp_root.iterdir():
        try:
            if entry.is_dir() and entry.stat().st_mtime < cutoff:
                shutil.rmtree(entry, ignore_errors=True)
        except OSError:
            continue


def import_csv(app: Appliance, csv_path: str | Path, name: str) -> dict[str, Any]:
    """Import one CSV with detected options (the quickstart's path)."""
    return import_data(app, name, str(csv_path), ImportOptions(format="csv"))


def add_version(
    app: Appliance,
    name: str,
    stored: StoredObject,
    *,
    row_count: int,
    schema: list[dict[str, str]],
    source: str,
    execution: str,
    inputs: list[Node],
    timestamp_col: str | None = None,
    rejects: tuple[StoredObject | None, int] = (None, 0),
    validation: list[dict[str, Any]] | None = None,
    creator: str | None = None,
    execution_ref: str | None = None,
) -> dict[str, Any]:
    """Record `stored` as the next version of `name` (or reuse the latest if identical)."""
    validate_name("dataset name", name)
    now = utcnow()
    creator = creator or _whoami()
    with app.db.transaction() as conn:
        conn.execute(
            "INSERT INTO datasets (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (name, now),
        )
        dataset_id = conn.execute("SELECT id FROM datasets WHERE name = ?", (name,)).fetchone()[0]
        latest = conn.execute(
            "SELECT dv.version, a.sha256, dv.timestamp_col FROM dataset_versions dv "
            "JOIN artifacts a ON a.id = dv.artifact_id WHERE dv.dataset_id = ? "
            "ORDER BY dv.version DESC LIMIT 1",
            (dataset_id,),
        ).fetchone()
        if latest is not None and (latest[1], latest[2]) == (stored.sha256, timestamp_col):
            version, created = int(latest[0]), False
        else:
            artifact_id = _artifact(conn, stored, PARQUET_MEDIA, now)
            rejects_obj, rejects_count = rejects
            rejects_id = _artifact(conn, rejects_obj, PARQUET_MEDIA, now) if rejects_obj else None
            version = int(
                conn.execute(
                    "UPDATE datasets SET last_version = last_version + 1 WHERE id = ? "
                    "RETURNING last_version",
                    (dataset_id,),
                ).fetchone()[0]
            )
            created = True
            conn.execute(
                "INSERT INTO dataset_versions (dataset_id, version, artifact_id, source, "
                "row_count, schema_json, created_at, creator, timestamp_col, "
                "rejects_artifact_id, rejects_count, validation_json) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    dataset_id,
                    version,
                    artifact_id,
                    source,
                    row_count,
                    json.dumps(schema),
                    now,
                    creator,
                    timestamp_col,
                    rejects_id,
                    rejects_count,
                    json.dumps(validation or []),
                ),
            )
            record_execution(
                conn,
                execution,
                execution_ref or f"{execution.lower()}:{name}@{version}",
                inputs=inputs,
                outputs=[("DatasetVersion", f"dataset:{name}@{version}")],
                context=("Dataset", name),
            )
    result = get_dataset_version(app, f"{name}@{version}")
    result["created"] = created
    return result


def _artifact(conn: Any, stored: StoredObject, media: str, now: str) -> int:
    conn.execute(
        "INSERT INTO artifacts (sha256, uri, size, media_type, created_at) "
        "VALUES (?, ?, ?, ?, ?) ON CONFLICT (sha256) DO NOTHING",
        (stored.sha256, stored.uri, stored.size, media, now),
    )
    return int(
        conn.execute("SELECT id FROM artifacts WHERE sha256 = ?", (stored.sha256,)).fetchone()[0]
    )


def _whoami() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return f"uid:{os.getuid()}"


def set_checks_text(app: Appliance, name: str, text: str) -> None:
    """Store the checks every future version of `name` must pass."""
    load_checks_text(text, f"checks of dataset {name}")  # refuse bad YAML before storing
    now = utcnow()
    with app.db.transaction() as conn:
        conn.execute(
            "INSERT INTO datasets (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (name, now),
        )
        conn.execute(
            "INSERT INTO dataset_checks (dataset_id, checks_yaml, updated_at) "
            "SELECT id, ?, ? FROM datasets WHERE name = ? "
            "ON CONFLICT (dataset_id) DO UPDATE SET checks_yaml = excluded.checks_yaml, "
            "updated_at = excluded.updated_at",
            (text, now, name),
        )


_VERSION_SELECT = (
    "SELECT d.name, dv.id, dv.version, dv.row_count, dv.schema_json, dv.source, dv.created_at, "
    "dv.creator, dv.timestamp_col, dv.rejects_count, dv.validation_json, "
    "a.sha256, a.size, a.uri, ra.sha256 AS rejects_sha256 FROM dataset_versions dv "
    "JOIN datasets d ON d.id = dv.dataset_id JOIN artifacts a ON a.id = dv.artifact_id "
    "LEFT JOIN artifacts ra ON ra.id = dv.rejects_artifact_id "
)


def _version_row(row: dict[str, Any]) -> dict[str, Any]:
    row = dict(row)
    row["schema"] = json.loads(row.pop("schema_json"))
    row["validation"] = json.loads(row.pop("validation_json") or "[]")
    row["ref"] = f"{row['name']}@{row['version']}"
    return row


def split_version_ref(ref: str) -> tuple[str, int | None]:
    """'name@3' -> ('name', 3); 'name' or 'name@latest' -> ('name', None)."""
    name, _, version = ref.partition("@")
    validate_name("dataset", name)
    if version in ("", "latest"):
        return name, None
    if not version.isdigit() or int(version) < 1 or len(version) > 9:
        raise InvalidInput(f"dataset {ref!r}: the version after '@' must be a number or 'latest'")
    return name, int(version)


def get_dataset_version(app: Appliance, ref: str) -> dict[str, Any]:
    """A dataset version by 'name@version', or the latest by 'name' / 'name@latest'."""
    name, version = split_version_ref(ref)
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


def table_sql(app: Appliance, version: dict[str, Any]) -> str:
    """`read_parquet('…')` over the verified file of a version."""
    return f"read_parquet({duck.sql_string(str(app.objects.get_file(version['sha256'])))})"


def preview(app: Appliance, ref: str, limit: int = 20, offset: int = 0) -> dict[str, Any]:
    """A page of rows of a version."""
    if limit < 1 or offset < 0:
        raise InvalidInput("--limit must be positive and --offset not negative")
    version = get_dataset_version(app, ref)
    con = duck.connect(app.settings)
    try:
        cur = con.execute(
            f"SELECT * FROM {table_sql(app, version)} LIMIT {int(limit)} OFFSET {int(offset)}"
        )
        columns = [d[0] for d in cur.description]
        rows = [list(map(_jsonable, r)) for r in cur.fetchall()]
    finally:
        con.close()
    return {
        "ref": version["ref"],
        "columns": columns,
        "rows": rows,
        "offset": offset,
        "total": version["row_count"],
    }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def export(app: Appliance, ref: str, path: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write a version to PATH as Parquet or CSV (by extension), atomically."""
    version = get_dataset_version(app, ref)
    target = Path(path).expanduser()
    kind = _extension(target.name)
    if EXTENSIONS.get(kind) not in ("parquet", "csv") or kind.endswith(".gz"):
        raise InvalidInput(f"{target}: export writes .parquet or .csv")
    if target.exists() and not overwrite:
        raise Conflict(f"{target}: exists; pass --force to overwrite")
    if not target.parent.is_dir():
        raise InvalidInput(f"{target.parent}: no such directory")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    fmt = (
        "(FORMAT parquet, COMPRESSION zstd)"
        if kind in (".parquet", ".pq")
        else "(FORMAT csv, HEADER)"
    )
    con = duck.connect(app.settings)
    try:
        con.execute(
            f"COPY (SELECT * FROM {table_sql(app, version)}) TO {duck.sql_string(str(tmp))} {fmt}"
        )
        os.replace(tmp, target)
    finally:
        con.close()
        tmp.unlink(missing_ok=True)
    return {"ref": version["ref"], "path": str(target), "rows": version["row_count"]}


def dependents(app: Appliance, ref: str) -> list[str]:
    """What uses a version: models trained on it, feature views pinned to it, and datasets
    derived from it."""
    from appliance.core.lineage import lineage

    version = get_dataset_version(app, ref)
    found = [
        f"model:{r['name']}@{r['version']}"
        for r in app.db.rows(
            "SELECT m.name, mv.version FROM model_versions mv "
            "JOIN registered_models m ON m.id = mv.model_id WHERE mv.dataset_version_id = ?",
            (version["id"],),
        )
    ]
    from appliance.core.features import list_definitions

    latest = get_dataset_version(app, version["name"])["version"] == version["version"]
    found += [  # views that read it: pinned to it, or following the dataset's latest version
        f"feature-view:{v['ref']}"
        for v in list_definitions(app, "view", all_versions=True)
        if v["source"] == version["ref"] or (latest and v["source"] == version["name"])
    ]
    try:
        graph = lineage(app, f"dataset:{version['ref']}")
    except NotFound:
        return found
    for node in graph["downstream"]:
        if node["type"] in ("DatasetVersion", "ModelVersion") or node["ref"].startswith("run:"):
            if node["ref"] not in found and app_has(app, node["ref"]):
                found.append(node["ref"])
    return found


def app_has(app: Appliance, ref: str) -> bool:
    """Whether a lineage node still names something that exists."""
    kind, _, rest = ref.partition(":")
    if kind == "dataset":
        name, _, version = rest.partition("@")
        return bool(
            app.db.scalar(
                "SELECT 1 FROM dataset_versions dv JOIN datasets d ON d.id = dv.dataset_id "
                "WHERE d.name = ? AND dv.version = ?",
                (name, int(version)),
            )
        )
    if kind == "model":
        name, _, version = rest.partition("@")
        return bool(
            app.db.scalar(
                "SELECT 1 FROM model_versions mv JOIN registered_models m ON m.id = mv.model_id "
                "WHERE m.name = ? AND mv.version = ?",
                (name, int(version)),
            )
        )
    if kind == "run":
        return bool(app.db.scalar("SELECT 1 FROM runs WHERE id = ?", (rest,)))
    return True


def remove_version(app: Appliance, ref: str, force: bool = False) -> dict[str, Any]:
    """Delete a version; refused while something depends on it unless `force`."""
    if "@" not in ref or ref.endswith("@latest"):
        raise InvalidInput(f"data rm {ref!r}: name the version explicitly (NAME@VERSION)")
    version = get_dataset_version(app, ref)
    users = dependents(app, ref)
    if users and not force:
        raise Conflict(f"{version['ref']} is used by {', '.join(users[:5])}; pass --force")
    with app.db.transaction() as conn:
        conn.execute(
            "UPDATE model_versions SET dataset_version_id = NULL WHERE dataset_version_id = ?",
            (version["id"],),
        )
        conn.execute("DELETE FROM dataset_versions WHERE id = ?", (version["id"],))
    return {"removed": version["ref"], "was_used_by": users}


def get_checks_text(app: Appliance, name: str) -> str | None:
    validate_name("dataset", name)
    row = app.db.one(
        "SELECT c.checks_yaml FROM dataset_checks c JOIN datasets d ON d.id = c.dataset_id "
        "WHERE d.name = ?",
        (name,),
    )
    return row["checks_yaml"] if row else None


def rejected_rows(app: Appliance, ref: str) -> list[dict[str, Any]]:
    """The rows an import with --rejects skipped, with their line numbers and reasons."""
    version = get_dataset_version(app, ref)
    if not version["rejects_sha256"]:
        return []
    path = app.objects.get_file(version["rejects_sha256"])
    con = duck.connect(app.settings)
    try:
        cur = con.execute(f"SELECT * FROM read_parquet({duck.sql_string(str(path))})")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, map(_jsonable, r), strict=True)) for r in cur.fetchall()]
    finally:
        con.close()


def list_all_versions(app: Appliance) -> list[dict[str, Any]]:
    """Every version of every dataset, newest dataset versions first within each name."""
    return [
        {
            "ref": f"{r['name']}@{r['version']}",
            "rows": r["row_count"],
            "columns": len(json.loads(r["schema_json"])),
            "creator": r["creator"],
            "source": r["source"],
            "created_at": r["created_at"],
        }
        for r in app.db.rows(_VERSION_SELECT + "ORDER BY d.name, dv.version DESC")
    ]
