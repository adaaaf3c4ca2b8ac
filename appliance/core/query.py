"""Read-only SQL over datasets: every dataset name resolves to a view of its latest version
(`"name@3"` to a given one), and the connection can read only those files.

Recipes use the same resolution and sandbox, with a write allowance for their output alone.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from appliance.core import duck
from appliance.core.context import Appliance
from appliance.core.datasets import get_dataset_version, table_sql
from appliance.errors import InvalidInput, NotFound

MAX_ROWS = 10_000


def _identifiers(sql: str) -> list[str]:
    """Identifiers as DuckDB's tokenizer sees them: not inside strings or comments."""
    import duckdb

    try:
        tokens = duckdb.tokenize(sql)
    except duckdb.Error:
        return []
    found = []
    for i, (start, kind) in enumerate(tokens):
        if kind.name != "identifier":
            continue
        end = tokens[i + 1][0] if i + 1 < len(tokens) else len(sql)
        text = sql[start:end].strip()
        if text.startswith('"'):
            text = text[1 : text.rfind('"')].replace('""', '"')
        else:
            text = re.split(r"[\s.,;()]", text, maxsplit=1)[0]
        found.append(text)
    return found


def referenced_datasets(app: Appliance, sql: str) -> dict[str, dict[str, Any]]:
    """{identifier (lower case, as DuckDB compares them): version} for each dataset read."""
    names = {r["name"].lower(): r["name"] for r in app.db.rows("SELECT name FROM datasets")}
    found: dict[str, dict[str, Any]] = {}
    for token in _identifiers(sql):
        key = token.lower()
        base = key.partition("@")[0]
        if base not in names or key in found:
            continue
        try:
            found[key] = get_dataset_version(app, names[base] + token[len(base) :])
        except (NotFound, InvalidInput):
            continue
    return found


def statements(sql: str, allowed: set[str], where: str) -> list[Any]:
    """Parse SQL into statements, refusing kinds outside `allowed`; names the offender."""
    import duckdb

    try:
        parsed = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise InvalidInput(f"{where}: {str(exc).strip()}") from exc
    if not parsed:
        raise InvalidInput(f"{where}: no SQL statement")
    for i, stmt in enumerate(parsed, 1):
        kind = stmt.type.name
        if kind not in allowed:
            raise InvalidInput(
                f"{where}: statement {i} ({kind}: {stmt.query.strip()[:60]}) is not allowed; "
                f"only {', '.join(sorted(allowed))} may run here"
            )
    return parsed


def lock_down(con: Any, read_paths: list[str], write_dir: Path | None = None) -> None:
    """Allow reading only `read_paths` (and writing only under `write_dir`), for good."""
    paths = "[" + ", ".join(duck.sql_string(p) for p in read_paths) + "]"
    con.execute(f"SET allowed_paths = {paths}")
    if write_dir is not None:
        con.execute(f"SET allowed_directories = [{duck.sql_string(str(write_dir) + '/')}]")
    con.execute("SET enable_external_access = false")
    con.execute("SET lock_configuration = true")


def run_sql(app: Appliance, sql: str, limit: int = MAX_ROWS) -> dict[str, Any]:
    """Run read-only SQL; returns columns, rows (at most `limit`) and the datasets it read."""
    import duckdb

    parsed = statements(sql, {"SELECT", "EXPLAIN"}, "SQL")
    datasets = referenced_datasets(app, sql)
    con = duck.connect(app.settings)
    try:
        files = []
        for token, version in datasets.items():
            source = table_sql(app, version)
            files.append(str(app.objects.get_file(version["sha256"])))
            con.execute(f"CREATE VIEW {duck.sql_identifier(token)} AS SELECT * FROM {source}")
        lock_down(con, files)
        try:
            for stmt in parsed[:-1]:
                con.execute(stmt.query)
            cur = con.execute(parsed[-1].query)
            columns = [d[0] for d in cur.description]
            rows = cur.fetchmany(limit + 1)
        except duckdb.Error as exc:
            raise InvalidInput(f"SQL: {str(exc).strip()}") from exc
    finally:
        con.close()
    return {
        "columns": columns,
        "rows": [[_jsonable(v) for v in r] for r in rows[:limit]],
        "truncated": len(rows) > limit,
        "datasets": sorted(v["ref"] for v in datasets.values()),
    }


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def diff(app: Appliance, ref_a: str, ref_b: str) -> dict[str, Any]:
    """How version B differs from A: schema changes, rows added/removed, column stat deltas."""
    a, b = get_dataset_version(app, ref_a), get_dataset_version(app, ref_b)
    types_a = {c["name"]: c["type"] for c in a["schema"]}
    types_b = {c["name"]: c["type"] for c in b["schema"]}
    common = [c for c in types_a if c in types_b]
    schema = {
        "added": [c for c in types_b if c not in types_a],
        "removed": [c for c in types_a if c not in types_b],
        "type_changed": [
            {"column": c, "from": types_a[c], "to": types_b[c]}
            for c in common
            if types_a[c] != types_b[c]
        ],
    }
    con = duck.connect(app.settings)
    try:
        con.execute(f"CREATE VIEW a AS SELECT * FROM {table_sql(app, a)}")
        con.execute(f"CREATE VIEW b AS SELECT * FROM {table_sql(app, b)}")
        cols = ", ".join(
            f"CAST({duck.sql_identifier(c)} AS VARCHAR)"
            if types_a[c] != types_b[c]
            else duck.sql_identifier(c)
            for c in common
        )
        if common:
            added = con.execute(
                f"SELECT count(*) FROM (SELECT {cols} FROM b EXCEPT ALL SELECT {cols} FROM a)"
            ).fetchone()[0]
            removed = con.execute(
                f"SELECT count(*) FROM (SELECT {cols} FROM a EXCEPT ALL SELECT {cols} FROM b)"
            ).fetchone()[0]
        else:  # nothing in common: every row of B is new, every row of A is gone
            added, removed = b["row_count"], a["row_count"]
        stats = []
        for column in common:
            ident = duck.sql_identifier(column)
            numeric = types_a[column] == types_b[column] and duck.is_numeric(types_a[column])
            agg = f"count(*) FILTER ({ident} IS NULL)" + (
                f", avg({ident}), min({ident}), max({ident})" if numeric else ""
            )
            va = con.execute(f"SELECT {agg} FROM a").fetchone()
            vb = con.execute(f"SELECT {agg} FROM b").fetchone()
            entry: dict[str, Any] = {"column": column, "nulls": [va[0], vb[0]]}
            if numeric:
                entry.update(mean=[va[1], vb[1]], min=[va[2], vb[2]], max=[va[3], vb[3]])
                if va[1] is not None and vb[1] is not None:
                    entry["mean_delta"] = float(vb[1]) - float(va[1])
            stats.append(entry)
    finally:
        con.close()
    return {
        "from": a["ref"],
        "to": b["ref"],
        "rows": [a["row_count"], b["row_count"]],
        "rows_added": int(added),
        "rows_removed": int(removed),
        "schema": schema,
        "columns": stats,
    }
