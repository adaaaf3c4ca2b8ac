"""Feature definitions: entities, feature views and feature services, immutable and versioned,
and the training sets built from them with the point-in-time join.

`apply` reads YAML files, checks every definition against its source dataset (columns, types,
keys, the timestamp), and registers in one transaction: an object whose definition changed gets
its next version, an unchanged one is left alone. A feature service pins the versions of the
views it draws from, so a model trained on `driver_model@2` always means the same columns.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from appliance.core import duck
from appliance.core.context import Appliance
from appliance.core.names import validate_name
from appliance.errors import InvalidInput, NotFound
from appliance.store.db import utcnow

KINDS = ("entity", "view", "service")
# declared type -> the DuckDB column types that hold it
TYPES = {
    "float64": {"DOUBLE"},
    "float32": {"FLOAT"},
    "int64": {"BIGINT"},
    "int32": {"INTEGER"},
    "bool": {"BOOLEAN"},
    "string": {"VARCHAR"},
}
_TIMESTAMPS = ("TIMESTAMP", "TIMESTAMP WITH TIME ZONE", "DATE", "TIMESTAMP_NS", "TIMESTAMP_MS")
# join keys are whole numbers or text: what a request can carry exactly and a key can match
_INTEGERS = {
    "BIGINT",
    "INTEGER",
    "SMALLINT",
    "TINYINT",
    "UBIGINT",
    "UINTEGER",
    "USMALLINT",
    "UTINYINT",
}


def key_class(column_type: str) -> str | None:
    """'integer' or 'text' for a key column's DuckDB type; None for any other type."""
    kind = column_type.upper()
    return "integer" if kind in _INTEGERS else "text" if kind == "VARCHAR" else None


def output_names(service: dict[str, Any]) -> list[str]:
    """The column each of a service's features is known by: FEATURE, or VIEW__FEATURE when
    the service asks for full names (two views may share a feature name)."""
    full = service["full_feature_names"]
    return [f"{f['view']}__{f['feature']}" if full else f["feature"] for f in service["features"]]


@contextmanager
def data_errors(what: str) -> Iterator[None]:
    """Around SQL that evaluates a view's own SQL on data: a failure there (a cast the data
    breaks) is bad input about `what`, not an internal error."""
    import duckdb

    try:
        yield
    except duckdb.Error as exc:
        raise InvalidInput(f"{what}: {str(exc).splitlines()[0]}") from exc


def _digest(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def read_definitions(directory: str | Path) -> dict[str, list[dict[str, Any]]]:
    """Every `*.yaml`/`*.yml` file in `directory` (or one file): entities, feature_views and
    feature_services, with errors that name the file and the object."""
    from appliance.core.jobs import load_yaml_mapping

    root = Path(directory)
    files = [root] if root.is_file() else sorted([*root.glob("*.yaml"), *root.glob("*.yml")])
    if not files:
        raise InvalidInput(f"{directory}: no feature definition files (*.yaml)")
    found: dict[str, list[dict[str, Any]]] = {
        "entities": [],
        "feature_views": [],
        "feature_services": [],
    }
    for file in files:
        data = load_yaml_mapping(file, "feature definitions")
        unknown = set(data) - set(found)
        if unknown:
            raise InvalidInput(f"{file.name}: unknown section(s) {sorted(unknown)}")
        for section, items in data.items():
            if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
                raise InvalidInput(f"{file.name}: {section} must be a list of mappings")
            found[section] += [{**i, "__file": file.name} for i in items]
    return found


def _field(
    obj: dict[str, Any], key: str, where: str, kind: type = str, required: bool = True
) -> Any:
    value = obj.get(key)
    if value is None:
        if required:
            raise InvalidInput(f"{where}: {key} is required")
        return None
    if not isinstance(value, kind):
        raise InvalidInput(f"{where}: {key} must be a {kind.__name__}")
    return value


def _entity_spec(obj: dict[str, Any]) -> dict[str, Any]:
    where = f"{obj['__file']}: entity {obj.get('name')!r}"
    name = _field(obj, "name", where)
    validate_name("entity", name)
    keys = _field(obj, "join_keys", where, list)
    if not keys or not all(isinstance(k, str) and k for k in keys) or len(set(keys)) != len(keys):
        raise InvalidInput(f"{where}: join_keys must be distinct column names")
    return {"name": name, "join_keys": keys}


def _view_spec(
    app: Appliance, obj: dict[str, Any], entities: dict[str, dict[str, Any]]
) -> dict[str, Any]:
    from appliance.core.datasets import get_dataset_version
    from appliance.core.jobs import parse_duration

    where = f"{obj['__file']}: feature view {obj.get('name')!r}"
    name = _field(obj, "name", where)
    validate_name("feature view", name)
    names = _field(obj, "entities", where, list)
    if not names:
        raise InvalidInput(f"{where}: entities must name at least one entity")
    keys: list[str] = []
    for entity in names:
        if entity not in entities:
            raise InvalidInput(f"{where}: unknown entity {entity!r}")
        keys += [k for k in entities[entity]["join_keys"] if k not in keys]
    source = _field(obj, "source", where)
    version = get_dataset_version(app, source)  # NotFound names the dataset
    _check_source(version, where)
    sql = _field(obj, "sql", where, required=False)
    if sql is None:
        columns = {c["name"]: c["type"].upper() for c in version["schema"]}
    else:
        columns = _sql_columns(app, version, sql.strip().rstrip(";"), where)
        sql = sql.strip().rstrip(";")
    origin = version["ref"] if sql is None else f"the output of its sql over {version['ref']}"
    timestamp = _field(obj, "timestamp", where)
    created = _field(obj, "created_timestamp", where, required=False)
    ttl = obj.get("ttl")
    ttl_seconds = None if ttl in (None, 0, "0") else parse_duration(ttl, f"{where}: ttl")
    features = []
    for item in _field(obj, "features", where, list):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise InvalidInput(f"{where}: each feature needs a name")
        fname, ftype = item["name"], item.get("type")
        if ftype not in TYPES:
            raise InvalidInput(
                f"{where}: feature {fname!r}: type {ftype!r} is not one of {sorted(TYPES)}"
            )
        if fname in keys or fname in (timestamp, created) or fname.startswith("__"):
            raise InvalidInput(
                f"{where}: feature {fname!r} is a join key, a timestamp or a reserved name"
            )
        features.append(
            {"name": fname, "type": ftype, "description": str(item.get("description") or "")}
        )
    if not features:
        raise InvalidInput(f"{where}: features must not be empty")
    if len({f["name"] for f in features}) != len(features):
        twice = sorted(
            {f["name"] for f in features if [g["name"] for g in features].count(f["name"]) > 1}
        )
        raise InvalidInput(f"{where}: feature(s) {twice} listed more than once")
    check = {
        "join_keys": keys,
        "key_types": None,
        "sql": sql,
        "timestamp": timestamp,
        "created_timestamp": created,
        "features": features,
    }
    check_columns(check, columns, where, origin)
    return {
        "name": name,
        "entities": names,
        "join_keys": keys,
        "key_types": {k: columns[k] for k in keys},
        "source": source,
        "sql": sql,
        "timestamp": timestamp,
        "created_timestamp": created,
        "ttl_seconds": ttl_seconds,
        "features": features,
    }


RESERVED = ("__order", "file_row_number")  # how a view's rows carry their file order


def _check_source(version: dict[str, Any], where: str) -> None:
    taken = [c["name"] for c in version["schema"] if c["name"].lower() in RESERVED]
    if taken:
        raise InvalidInput(
            f"{where}: column {taken[0]!r} of {version['ref']} has a name the feature store "
            "uses for the file order; rename it (a recipe can)"
        )


def check_columns(spec: dict[str, Any], columns: dict[str, str], where: str, origin: str) -> None:
    """The view's keys, times and features against the columns its rows have (at apply, and
    again at every use: a source re-imported since may have dropped or retyped one)."""
    for column, role in [
        (spec["timestamp"], "timestamp"),
        (spec["created_timestamp"], "created_timestamp"),
    ]:
        if column is None:
            continue
        if column not in columns:
            raise InvalidInput(f"{where}: {role} column {column!r} is not in {origin}")
        if not columns[column].upper().startswith(_TIMESTAMPS):
            raise InvalidInput(
                f"{where}: {role} column {column!r} is {columns[column]}, not a timestamp"
            )
    for key in spec["join_keys"]:
        if key not in columns:
            raise InvalidInput(f"{where}: join key {key!r} is not in {origin}")
        kind = key_class(columns[key])
        if kind is None:
            raise InvalidInput(
                f"{where}: join key {key!r} is {columns[key]} in {origin}; keys must be whole "
                "numbers or text"
            )
        declared = (spec.get("key_types") or {}).get(key)
        if declared is not None and key_class(declared) != kind:
            raise InvalidInput(
                f"{where}: join key {key!r} was {declared} when applied but is "
                f"{columns[key]} in {origin}"
            )
    for feature in spec["features"]:
        name, declared = feature["name"], feature["type"]
        if name not in columns:
            raise InvalidInput(f"{where}: feature {name!r} is not a column of {origin}")
        if columns[name].upper() not in TYPES[declared]:
            raise InvalidInput(
                f"{where}: feature {name!r} is declared {declared} but {origin} holds "
                f"{columns[name]}" + (" (CAST it in the sql)" if spec.get("sql") else "")
            )


def rows_sql(path: str, sql: str | None) -> str:
    """SQL for a view's rows from its source file: the file itself, or the view's `sql` run
    over it (named `source`). A plain source keeps the file's row order as `__order`."""
    plain = (
        f"SELECT * RENAME (file_row_number AS __order) "
        f"FROM read_parquet({duck.sql_string(path)}, file_row_number = true)"
    )
    if not sql:
        return plain
    # `source` carries the file order as __order: SQL that keeps it keeps rule 3's tie-break
    return f"WITH source AS ({plain}) SELECT * FROM ({sql})"


def _sql_columns(app: Appliance, source: dict[str, Any], sql: str, where: str) -> dict[str, str]:
    from appliance.core.query import lock_down, statements

    if len(statements(sql, {"SELECT"}, f"{where}: sql")) != 1:
        raise InvalidInput(f"{where}: sql must be one SELECT statement (FROM source)")
    path = str(app.objects.get_file(source["sha256"]))
    con = duck.connect(app.settings)
    try:
        lock_down(con, [path])  # the SQL reads its source and nothing else
        with data_errors(f"{where}: sql"):
            described = con.execute(f"DESCRIBE ({rows_sql(path, sql)})").fetchall()
    finally:
        con.close()
    return {str(r[0]): str(r[1]).upper() for r in described}


def source_version(app: Appliance, spec: dict[str, Any]) -> dict[str, Any]:
    """The dataset version a view version reads now (its pinned one, or the latest)."""
    from appliance.core.datasets import get_dataset_version

    try:
        return get_dataset_version(app, spec["source"])
    except NotFound as exc:
        raise NotFound(f"feature view {spec['ref']}: its source is gone ({exc.message})") from None


def view_relation(
    app: Appliance, con: Any, spec: dict[str, Any], alias: str
) -> tuple[dict[str, Any], str]:
    """Define `alias` on `con` as the view's rows plus `__order`, unique per row and the
    tie-break after the event and created times (the source's file order; a SQL view's rows
    follow the `__order` its SQL kept, then their own values). Returns the source dataset
    version and its file; the caller locks the connection down to its files before running
    anything. The rows are checked against the definition first."""

    where = f"feature view {spec['ref']}"
    data = source_version(app, spec)
    _check_source(data, where)
    path = str(app.objects.get_file(data["sha256"]))
    body = rows_sql(path, spec.get("sql"))
    columns = {str(r[0]): str(r[1]) for r in con.execute(f"DESCRIBE ({body})").fetchall()}
    origin = data["ref"] if not spec.get("sql") else f"the output of its sql over {data['ref']}"
    check_columns(
        spec, columns, where, origin + " (re-apply the definitions against the data as it is now)"
    )
    if spec.get("sql"):
        kept = "__order" in columns
        order = ", ".join(
            ["__order"] * kept + [duck.sql_identifier(n) for n in columns if n != "__order"]
        )
        body = (
            f"SELECT * {'EXCLUDE (__order)' if kept else ''}, "
            f"row_number() OVER (ORDER BY {order}) AS __order FROM ({body})"
        )
    con.execute(f"CREATE OR REPLACE TEMP VIEW {duck.sql_identifier(alias)} AS {body}")
    return data, path


def view_profile(app: Appliance, ref: str) -> dict[str, Any]:
    """The profile of a view version's output (keys, times, features) over its current source
    version, computed once per source version and kept."""
    from appliance.core.profiles import profile_table

    spec = get_definition(app, "view", ref)
    data = source_version(app, spec)
    key = (spec["name"], spec["version"], data["id"])
    cached = app.db.one(
        "SELECT profile_json FROM feature_view_profiles WHERE view = ? AND version = ? "
        "AND dataset_version_id = ?",
        key,
    )
    if cached:
        return {**json.loads(cached["profile_json"]), "cached": True}
    columns = [*spec["join_keys"], spec["timestamp"]]
    columns += [spec["created_timestamp"]] if spec["created_timestamp"] else []
    columns += [f["name"] for f in spec["features"]]
    from appliance.core.query import lock_down

    con = duck.connect(app.settings)
    try:
        lock_down(con, [view_relation(app, con, spec, "__rows")[1]])
        con.execute(
            "CREATE TEMP VIEW t AS SELECT "
            + ", ".join(duck.sql_identifier(c) for c in columns)
            + " FROM __rows"
        )
        types = {str(r[0]): str(r[1]) for r in con.execute("DESCRIBE t").fetchall()}
        with data_errors(f"feature view {spec['ref']}"):
            rows = int(con.execute("SELECT count(*) FROM t").fetchone()[0])
            result = profile_table(con, f"{spec['ref']} over {data['ref']}", rows, types)
    finally:
        con.close()
    app.db.execute(
        "INSERT INTO feature_view_profiles (view, version, dataset_version_id, profile_json, "
        "created_at) VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (*key, json.dumps(result), utcnow()),
    )
    return {**result, "cached": False}


def freshness(app: Appliance, now: float | None = None) -> list[dict[str, Any]]:
    """Per view version: its materialization state and how stale the online values are
    against the ttl (stale: the newest value is older than the ttl, so lookups miss)."""
    import time

    now = time.time() if now is None else now
    rows = app.db.rows(
        "SELECT d.name, d.version, d.spec_json, m.last_end, m.rows_written, m.newest_event, "
        "m.ran_at FROM feature_definitions d LEFT JOIN feature_materializations m "
        "ON m.view = d.name AND m.version = d.version WHERE d.kind = 'view' "
        "ORDER BY d.name, d.version DESC"
    )
    out = []
    for row in rows:
        ttl = json.loads(row["spec_json"])["ttl_seconds"]
        newest = row["newest_event"]
        age = None if newest is None else max(0.0, now - float(newest))
        if row["ran_at"] is None:
            status = "not materialized"
        elif age is None:
            status = "empty"
        elif ttl and age > ttl:
            status = "stale"
        else:
            status = "fresh"
        out.append(
            {
                "view": row["name"],
                "version": row["version"],
                "ref": f"{row['name']}@{row['version']}",
                "ttl_seconds": ttl,
                "materialized_at": row["ran_at"],
                "rows_written": row["rows_written"],
                "newest_event": None
                if newest is None
                else datetime.fromtimestamp(float(newest), UTC).isoformat(),
                "age_seconds": age,
                "status": status,
            }
        )
    return out


_SERVICE_OF = (
    "SELECT i.ref FROM lineage_artifacts o "
    "JOIN lineage_events eo ON eo.artifact_id = o.id AND eo.type = 'OUTPUT' "
    "JOIN lineage_executions x ON x.id = eo.execution_id AND x.type = 'TrainingSet' "
    "JOIN lineage_events ei ON ei.execution_id = x.id AND ei.type = 'INPUT' "
    "JOIN lineage_artifacts i ON i.id = ei.artifact_id AND i.type = 'FeatureService' "
    "WHERE o.ref = ? ORDER BY x.id DESC LIMIT 1"
)


def training_set_service(app: Appliance, dataset_ref: str) -> str | None:
    """The feature service (NAME@V) a dataset version was last built with as a training set,
    from its lineage; None for data that did not come from the feature store."""
    found = app.db.scalar(_SERVICE_OF, (f"dataset:{dataset_ref}",))
    return None if found is None else str(found).removeprefix("feature-service:")


def service_inputs(conn: Any, ref: str) -> tuple[list[str], list[str]]:
    """(join keys, feature names) of service version NAME@V: what a caller of a deployment
    with this service sends, and what the server looks up for it."""
    name, _, version = ref.partition("@")
    row = conn.execute(
        "SELECT spec_json FROM feature_definitions WHERE kind = 'service' AND name = ? "
        "AND version = ?",
        (name, int(version or 0)),
    ).fetchone()
    if row is None:
        raise NotFound(f"feature service {ref!r} not found")
    svc = json.loads(row[0])
    keys: list[str] = []
    for item in svc["features"]:
        view = conn.execute(
            "SELECT spec_json FROM feature_definitions WHERE kind = 'view' AND name = ? "
            "AND version = ?",
            (item["view"], item["view_version"]),
        ).fetchone()
        keys += [k for k in json.loads(view[0])["join_keys"] if k not in keys]
    return keys, output_names(svc)


def _service_spec(
    obj: dict[str, Any], views: dict[str, tuple[int, dict[str, Any]]]
) -> dict[str, Any]:
    where = f"{obj['__file']}: feature service {obj.get('name')!r}"
    name = _field(obj, "name", where)
    validate_name("feature service", name)
    full = bool(obj.get("full_feature_names", False))
    refs = _field(obj, "features", where, list)
    if not refs:
        raise InvalidInput(f"{where}: features must list at least one VIEW:FEATURE")
    twice = sorted({r for r in refs if isinstance(r, str) and refs.count(r) > 1})
    if twice:
        raise InvalidInput(f"{where}: {twice} listed more than once")
    chosen: list[dict[str, Any]] = []
    key_types: dict[str, tuple[str, str]] = {}
    for ref in refs:
        if not isinstance(ref, str) or ":" not in ref:
            raise InvalidInput(f"{where}: feature {ref!r} must be written VIEW:FEATURE")
        view, _, feature = ref.partition(":")
        if view not in views:
            raise InvalidInput(f"{where}: unknown feature view {view!r}")
        version, spec = views[view]
        if feature not in {f["name"] for f in spec["features"]}:
            raise InvalidInput(f"{where}: view {view!r} has no feature {feature!r}")
        for key, kind in (spec.get("key_types") or {}).items():
            seen = key_types.setdefault(key, (key_class(kind) or kind, view))
            if seen[0] != (key_class(kind) or kind):
                raise InvalidInput(
                    f"{where}: join key {key!r} is {seen[0]} in view {seen[1]!r} but "
                    f"{key_class(kind)} in view {view!r}; one request cannot carry both"
                )
        chosen.append({"view": view, "view_version": version, "feature": feature})
    output = output_names({"features": chosen, "full_feature_names": full})
    if len(set(output)) != len(output):
        clash = sorted({n for n in output if output.count(n) > 1})
        raise InvalidInput(
            f"{where}: feature name(s) {clash} come from more than one view; "
            "set full_feature_names: true to name them VIEW__FEATURE"
        )
    return {"name": name, "features": chosen, "full_feature_names": full}


def _latest(conn: Any, kind: str, name: str) -> tuple[int, str] | None:
    row = conn.execute(
        "SELECT version, sha256 FROM feature_definitions WHERE kind = ? AND name = ? "
        "ORDER BY version DESC LIMIT 1",
        (kind, name),
    ).fetchone()
    return None if row is None else (int(row[0]), str(row[1]))


def _register(conn: Any, kind: str, spec: dict[str, Any], now: str) -> tuple[int, bool]:
    digest = _digest(spec)
    latest = _latest(conn, kind, spec["name"])
    if latest is not None and latest[1] == digest:
        return latest[0], False
    version = 1 if latest is None else latest[0] + 1
    conn.execute(
        "INSERT INTO feature_definitions (kind, name, version, spec_json, sha256, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        (kind, spec["name"], version, json.dumps(spec), digest, now),
    )
    return version, True


def apply(app: Appliance, directory: str | Path) -> list[dict[str, Any]]:
    """Validate every definition, then register them all in one transaction; returns each
    object with its version and whether this apply created it."""
    found = read_definitions(directory)
    entities = {}
    for obj in found["entities"]:
        spec = _entity_spec(obj)
        if spec["name"] in entities:
            raise InvalidInput(f"{obj['__file']}: entity {spec['name']!r} is defined twice")
        entities[spec["name"]] = spec
    known = {e["name"]: e for e in list_definitions(app, "entity")}
    view_specs = []
    for obj in found["feature_views"]:
        view_specs.append(_view_spec(app, obj, {**known, **entities}))
    view_names = [v["name"] for v in view_specs]
    if len(set(view_names)) != len(view_names):
        twice = sorted({n for n in view_names if view_names.count(n) > 1})
        raise InvalidInput(f"feature view(s) {twice} defined more than once")
    out = []
    now = utcnow()
    with app.db.transaction() as conn:
        for spec in entities.values():
            version, created = _register(conn, "entity", spec, now)
            out.append(
                {"kind": "entity", "name": spec["name"], "version": version, "created": created}
            )
        views: dict[str, tuple[int, dict[str, Any]]] = {}
        for row in conn.execute(
            "SELECT name, max(version) FROM feature_definitions WHERE kind = 'view' GROUP BY name"
        ).fetchall():
            spec_json = conn.execute(
                "SELECT spec_json FROM feature_definitions WHERE kind = 'view' AND name = ? "
                "AND version = ?",
                (row[0], row[1]),
            ).fetchone()[0]
            views[row[0]] = (int(row[1]), json.loads(spec_json))
        for spec in view_specs:
            version, created = _register(conn, "view", spec, now)
            views[spec["name"]] = (version, spec)
            out.append(
                {"kind": "view", "name": spec["name"], "version": version, "created": created}
            )
        service_names = [obj.get("name") for obj in found["feature_services"]]
        for obj in found["feature_services"]:
            if service_names.count(obj.get("name")) > 1:
                raise InvalidInput(f"feature service {obj.get('name')!r} is defined twice")
            spec = _service_spec(obj, views)
            version, created = _register(conn, "service", spec, now)
            out.append(
                {"kind": "service", "name": spec["name"], "version": version, "created": created}
            )
    for item in out:  # after the commit: a profile is derived data, kept per source version
        if item["kind"] == "view" and item["created"]:
            try:
                view_profile(app, f"{item['name']}@{item['version']}")
            except Exception as exc:  # the definitions stand; the profile is retried on use
                item["profile_error"] = str(exc).splitlines()[0][:200]
    return out


def get_definition(app: Appliance, kind: str, ref: str) -> dict[str, Any]:
    """`name` (the latest version) or `name@N`, with its spec."""
    name, _, version = ref.partition("@")
    sql = (
        "SELECT name, version, spec_json, created_at FROM feature_definitions "
        "WHERE kind = ? AND name = ? "
    )
    if version:
        if not version.isdigit():
            raise InvalidInput(f"{kind} {ref!r}: the version after '@' must be a number")
        row = app.db.one(sql + "AND version = ?", (kind, name, int(version)))
    else:
        row = app.db.one(sql + "ORDER BY version DESC LIMIT 1", (kind, name))
    if row is None:
        raise NotFound(f"feature {kind} {ref!r} not found; run 'appliance features apply DIR'")
    spec = json.loads(row.pop("spec_json"))
    return {
        **spec,
        "version": row["version"],
        "ref": f"{name}@{row['version']}",
        "created_at": row["created_at"],
    }


def list_definitions(
    app: Appliance, kind: str | None = None, all_versions: bool = False
) -> list[dict[str, Any]]:
    """The latest version of every definition (of one kind), or every version."""
    latest = (
        "d.version = (SELECT max(version) FROM feature_definitions l "
        "WHERE l.kind = d.kind AND l.name = d.name)"
    )
    rows = app.db.rows(
        "SELECT d.kind, d.name, d.version, d.spec_json, d.created_at FROM feature_definitions d "
        f"WHERE {'TRUE' if all_versions else latest} "
        + ("AND d.kind = ? " if kind else "")
        + "ORDER BY d.kind, d.name, d.version DESC",
        (kind,) if kind else (),
    )
    return [
        {
            "kind": r["kind"],
            **json.loads(r["spec_json"]),
            "version": r["version"],
            "ref": f"{r['name']}@{r['version']}",
            "created_at": r["created_at"],
        }
        for r in rows
    ]


def training_set(
    app: Appliance,
    service: str,
    entities: str,
    out: str,
    timestamp_col: str = "event_ts",
    as_of_known_time: bool = True,
) -> dict[str, Any]:
    """The point-in-time join of a feature service onto an entity dataset, written as the next
    version of dataset `out` with lineage to the entity dataset, the service and view
    versions, and the source dataset versions it read."""
    from appliance.core.datasets import add_version, describe_parquet, get_dataset_version
    from appliance.core.pointintime import FeatureSource, point_in_time_sql
    from appliance.core.query import lock_down

    validate_name("dataset", out)
    svc = get_definition(app, "service", service)
    entity_version = get_dataset_version(app, entities)
    entity_types = {c["name"]: c["type"] for c in entity_version["schema"]}
    con = duck.connect(app.settings)
    inputs = [
        ("DatasetVersion", f"dataset:{entity_version['ref']}"),
        ("FeatureService", f"feature-service:{svc['ref']}"),
    ]
    tmp_root = app.settings.cache_dir / "tmp"
    tmp_root.mkdir(parents=True, exist_ok=True)
    try:
        entity_file = str(app.objects.get_file(entity_version["sha256"]))
        files = [entity_file]
        con.execute("SET TimeZone = 'UTC'")
        con.execute(
            f"CREATE VIEW __entities AS SELECT * FROM read_parquet({duck.sql_string(entity_file)})"
        )
        by_view: dict[tuple[str, int], list[tuple[str, str]]] = {}
        for item, name in zip(svc["features"], output_names(svc), strict=True):
            by_view.setdefault((item["view"], item["view_version"]), []).append(
                (item["feature"], name)
            )
        sources = []
        for i, ((view, view_version), pairs) in enumerate(by_view.items()):
            feats, named = [f for f, _ in pairs], [n for _, n in pairs]
            spec = get_definition(app, "view", f"{view}@{view_version}")
            for key, kind in (spec.get("key_types") or {}).items():
                have = entity_types.get(key)
                if have is not None and key_class(have) != key_class(kind):
                    raise InvalidInput(
                        f"entity dataset {entity_version['ref']}: join key {key!r} is {have}, "
                        f"but feature view {spec['ref']} keys it as {kind}"
                    )
            data, source_file = view_relation(app, con, spec, f"__rows{i}")
            files.append(source_file)
            inputs += [
                ("FeatureView", f"feature-view:{spec['ref']}"),
                ("DatasetVersion", f"dataset:{data['ref']}"),
            ]
            renamed = ", ".join(
                f"{duck.sql_identifier(f)} AS {duck.sql_identifier(n)}"
                for f, n in zip(feats, named, strict=True)
            )
            keys = ", ".join(duck.sql_identifier(k) for k in spec["join_keys"])
            extra = [spec["timestamp"]] + (
                [spec["created_timestamp"]] if spec["created_timestamp"] else []
            )
            con.execute(
                f"CREATE VIEW __view{i} AS SELECT {keys}, "
                + ", ".join(duck.sql_identifier(c) for c in extra)
                + f", {renamed}, __order FROM __rows{i}"
            )
            sources.append(
                FeatureSource(
                    relation=f"__view{i}",
                    keys=tuple(spec["join_keys"]),
                    timestamp=spec["timestamp"],
                    features=tuple(named),
                    created=spec["created_timestamp"],
                    ingest_order="__order",
                    row_id="__order",
                    ttl_seconds=spec["ttl_seconds"],
                    name=f"feature view {view}@{view_version}",
                )
            )
        with tempfile.TemporaryDirectory(dir=tmp_root) as tmp:
            # a view's SQL reads its own source and nothing else; the output goes to tmp
            lock_down(con, files, write_dir=Path(tmp))
            sql = point_in_time_sql(con, "__entities", timestamp_col, sources, as_of_known_time)
            path = Path(tmp) / "training.parquet"
            with data_errors(f"training set of {svc['ref']}"):
                con.execute(
                    # snappy: a training set is written often and read soon; zstd's smaller file
                    # costs a sixth of the whole join's time here
                    f"COPY ({sql}) TO {duck.sql_string(str(path))} "
                    "(FORMAT parquet, COMPRESSION snappy)",
                )
            rows, schema = describe_parquet(con, f"read_parquet({duck.sql_string(str(path))})")
            stored = app.objects.put_file(path, move=True)
    finally:
        con.close()
    mode = "as of known time" if as_of_known_time else "by event time"
    execution_ref = f"training-set:{svc['ref']}:{entity_version['ref']}:{mode}"
    result = add_version(
        app,
        out,
        stored,
        row_count=rows,
        schema=schema,
        source=f"training set: {svc['ref']} onto {entity_version['ref']} ({mode})",
        timestamp_col=timestamp_col,
        execution="TrainingSet",
        execution_ref=execution_ref,
        inputs=inputs,
    )
    if not result["created"]:
        # the same bytes as the latest version: lineage still says this service built it,
        # so a model trained on it records the service version actually used
        from appliance.core.lineage import record_execution

        with app.db.transaction() as conn:
            record_execution(
                conn,
                "TrainingSet",
                f"{execution_ref}:rebuilt:{utcnow()}",  # the newest build names the service
                inputs=inputs,
                outputs=[("DatasetVersion", f"dataset:{result['ref']}")],
                context=("Dataset", out),
            )
    return result
