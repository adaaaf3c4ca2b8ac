"""Column profiles of a dataset version, computed once in DuckDB and cached in the store.

Per column: type, count, nulls, approximate distinct, min/max, mean/std and quartiles
(numeric), top values with counts, a histogram (numeric), and, given a label column, the
correlation (numeric) or mutual information (categorical) with it.
"""

from __future__ import annotations

import json
import math
from typing import Any

from appliance.core import duck
from appliance.core.context import Appliance
from appliance.core.datasets import get_dataset_version, table_sql
from appliance.errors import InvalidInput
from appliance.store.db import utcnow

TOP_K = 5
BINS = 20
_NUMERIC = (
    "TINYINT",
    "SMALLINT",
    "INTEGER",
    "BIGINT",
    "HUGEINT",
    "UTINYINT",
    "USMALLINT",
    "UINTEGER",
    "UBIGINT",
    "FLOAT",
    "DOUBLE",
    "REAL",
)


def is_numeric(duck_type: str) -> bool:
    upper = duck_type.upper()
    return upper in _NUMERIC or upper.startswith("DECIMAL")


def _num(value: Any) -> Any:
    if value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return number if math.isfinite(number) else None


def profile(app: Appliance, ref: str, label: str | None = None) -> dict[str, Any]:
    """The profile of a version (cached per version and label)."""
    version = get_dataset_version(app, ref)
    key = label or ""
    cached = app.db.one(
        "SELECT profile_json FROM dataset_profiles WHERE dataset_version_id = ? AND label = ?",
        (version["id"], key),
    )
    if cached:
        return {**json.loads(cached["profile_json"]), "cached": True}
    types = {c["name"]: c["type"] for c in version["schema"]}
    if label is not None and label not in types:
        raise InvalidInput(f"--label {label!r}: no such column in {version['ref']}")
    con = duck.connect(app.settings)
    try:
        con.execute(f"CREATE VIEW t AS SELECT * FROM {table_sql(app, version)}")
        result = _compute(con, version, types, label)
    finally:
        con.close()
    app.db.execute(
        "INSERT INTO dataset_profiles (dataset_version_id, label, profile_json, created_at) "
        "VALUES (?, ?, ?, ?) ON CONFLICT DO NOTHING",
        (version["id"], key, json.dumps(result), utcnow()),
    )
    return {**result, "cached": False}


def _compute(con: Any, version: dict[str, Any], types: dict[str, str], label: str | None) -> dict:
    summary = {
        row[0]: row
        for row in con.execute(
            "SELECT column_name, column_type, min, max, approx_unique, avg, std, q25, q50, q75, "
            "count, null_percentage FROM (SUMMARIZE t)"
        ).fetchall()
    }
    total = version["row_count"]
    columns = []
    for name, duck_type in types.items():
        s = summary[name]
        ident = duck.sql_identifier(name)
        nulls = int(round(float(s[11] or 0) * total / 100))
        column: dict[str, Any] = {
            "name": name,
            "type": duck_type,
            "count": total - nulls,
            "nulls": nulls,
            "null_pct": round(float(s[11] or 0), 2),
            "distinct_approx": int(s[4] or 0),
            "min": _num(s[2]) if is_numeric(duck_type) else (None if s[2] is None else str(s[2])),
            "max": _num(s[3]) if is_numeric(duck_type) else (None if s[3] is None else str(s[3])),
        }
        column["top"] = [
            {"value": None if v is None else str(v), "count": int(c)}
            for v, c in con.execute(
                f"SELECT {ident}, count(*) AS c FROM t WHERE {ident} IS NOT NULL "
                f"GROUP BY ALL ORDER BY c DESC, 1 LIMIT {TOP_K}"
            ).fetchall()
        ]
        if is_numeric(duck_type):
            column.update(
                mean=_num(s[5]), std=_num(s[6]), q25=_num(s[7]), q50=_num(s[8]), q75=_num(s[9])
            )
            column["histogram"] = _histogram(con, ident, column["min"], column["max"])
        if label is not None and name != label:
            column["vs_label"] = _association(con, ident, duck_type, label, types[label])
        columns.append(column)
    return {"ref": version["ref"], "rows": total, "label": label, "columns": columns}


def _histogram(con: Any, ident: str, low: Any, high: Any) -> dict[str, Any]:
    if not isinstance(low, float) or not isinstance(high, float):
        return {"edges": [], "counts": []}
    if low == high:
        count = con.execute(f"SELECT count({ident}) FROM t").fetchone()[0]
        return {"edges": [low, high], "counts": [int(count)]}
    width = (high - low) / BINS
    rows = con.execute(
        f"SELECT least(CAST(floor(({ident} - {low!r}) / {width!r}) AS INTEGER), {BINS - 1}) AS b, "
        f"count(*) FROM t WHERE {ident} IS NOT NULL GROUP BY b"
    ).fetchall()
    counts = [0] * BINS
    for bucket, count in rows:
        counts[int(bucket)] += int(count)
    return {"edges": [low + i * width for i in range(BINS + 1)], "counts": counts}


def _association(con: Any, ident: str, duck_type: str, label: str, label_type: str) -> dict:
    lab = duck.sql_identifier(label)
    if is_numeric(duck_type) and is_numeric(label_type):
        value = con.execute(f"SELECT corr({ident}, {lab}) FROM t").fetchone()[0]
        return {"correlation": _num(value)}
    # Mutual information (nats) between the column (binned if numeric) and the label.
    feature = (
        f"ntile(10) OVER (ORDER BY {ident})"
        if is_numeric(duck_type)
        else f"CAST({ident} AS VARCHAR)"
    )
    target = (
        f"ntile(10) OVER (ORDER BY {lab})" if is_numeric(label_type) else f"CAST({lab} AS VARCHAR)"
    )
    value = con.execute(
        f"WITH j AS (SELECT {feature} AS x, {target} AS y FROM t "
        f"WHERE {ident} IS NOT NULL AND {lab} IS NOT NULL), "
        "n AS (SELECT count(*) AS n FROM j), "
        "xy AS (SELECT x, y, count(*) AS c FROM j GROUP BY ALL), "
        "px AS (SELECT x, count(*) AS c FROM j GROUP BY ALL), "
        "py AS (SELECT y, count(*) AS c FROM j GROUP BY ALL) "
        "SELECT sum(xy.c / n.n * ln((xy.c * n.n) / (px.c * py.c))) "
        "FROM xy JOIN px USING (x) JOIN py USING (y), n"
    ).fetchone()[0]
    return {"mutual_information": _num(value)}
