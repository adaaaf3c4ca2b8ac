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
from appliance.core.duck import is_numeric
from appliance.errors import InvalidInput
from appliance.store.db import utcnow

TOP_K = 5
BINS = 20
QUANTILE_SAMPLE = 65_536  # quartiles from a reservoir sample: exact enough, 4x faster
UNIQUE_SHARE = 0.5  # columns with more distinct values than this share of rows get no top-k


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


def profile_table(con: Any, ref: str, rows: int, types: dict[str, str]) -> dict[str, Any]:
    """The profile of relation `t` on `con` (what a feature view version keeps of its output),
    in the same shape as a dataset version's."""
    return _compute(con, {"ref": ref, "row_count": rows}, types, None)


def _compute(con: Any, version: dict[str, Any], types: dict[str, str], label: str | None) -> dict:
    # One scan for every column's statistics at once, then one cheap grouped query per numeric
    # column (histogram) and per repeating column (top values). Columns whose values are
    # nearly all distinct (ids, free text) have no meaningful top values and skip that query.
    total = version["row_count"]
    names = list(types)
    exprs = []
    for name in names:
        c = duck.sql_identifier(name)
        exprs += [f"count({c})", f"approx_count_distinct({c})"]
        if is_numeric(types[name]):
            x = _finite(c)  # NaN and infinities would poison every statistic (or raise)
            exprs += [
                f"min({x})",
                f"max({x})",
                f"avg({x})",
                f"stddev_samp({x})",
                f"reservoir_quantile({x}, [0.25, 0.5, 0.75], {QUANTILE_SAMPLE})",
            ]
        else:
            exprs += [f"min({c})::VARCHAR", f"max({c})::VARCHAR"]
    stats = list(con.execute(f"SELECT {', '.join(exprs)} FROM t").fetchone())
    columns = []
    for name in names:
        c = duck.sql_identifier(name)
        count, distinct = int(stats[0]), int(stats[1] or 0)
        column: dict[str, Any] = {
            "name": name,
            "type": types[name],
            "count": count,
            "nulls": total - count,
            "null_pct": round(100 * (total - count) / total, 2) if total else 0.0,
            "distinct_approx": distinct,
        }
        if is_numeric(types[name]):
            low, high, mean, std, quartiles = stats[2:7]
            stats = stats[7:]
            q = quartiles or [None, None, None]
            column.update(
                min=_num(low),
                max=_num(high),
                mean=_num(mean),
                std=_num(std),
                q25=_num(q[0]),
                q50=_num(q[1]),
                q75=_num(q[2]),
            )
            column["histogram"] = _histogram(con, c, column["min"], column["max"])
        else:
            column.update(min=stats[2], max=stats[3])
            stats = stats[4:]
        repeating = count and (distinct <= 1000 or distinct < UNIQUE_SHARE * count)
        column["top"] = (
            [
                {"value": str(v), "count": int(n)}
                for v, n in con.execute(
                    # as text: zoned times would otherwise need pytz to leave DuckDB
                    f"SELECT {c}::VARCHAR, count(*) AS n FROM t WHERE {c} IS NOT NULL "
                    f"GROUP BY {c} ORDER BY n DESC, {c} LIMIT {TOP_K}"
                ).fetchall()
            ]
            if repeating
            else []
        )
        if label is not None and name != label:
            column["vs_label"] = _association(con, c, types[name], label, types[label])
        columns.append(column)
    return {"ref": version["ref"], "rows": total, "label": label, "columns": columns}


def _finite(ident: str) -> str:
    return f"CASE WHEN isfinite({ident}::DOUBLE) THEN {ident}::DOUBLE END"


def _histogram(con: Any, ident: str, low: Any, high: Any) -> dict[str, Any]:
    if not isinstance(low, float) or not isinstance(high, float):
        return {"edges": [], "counts": []}
    if low == high:
        count = con.execute(f"SELECT count({_finite(ident)}) FROM t").fetchone()[0]
        return {"edges": [low, high], "counts": [int(count)]}
    width = (high - low) / BINS
    counts = [0] * BINS
    for bucket, count in con.execute(
        f"SELECT least(CAST(floor(({ident}::DOUBLE - {low!r}) / {width!r}) AS INTEGER), "
        f"{BINS - 1}), count(*) FROM t WHERE {_finite(ident)} IS NOT NULL GROUP BY 1"
    ).fetchall():
        counts[int(bucket)] += int(count)
    return {"edges": [low + i * width for i in range(BINS + 1)], "counts": counts}


def _association(con: Any, ident: str, duck_type: str, label: str, label_type: str) -> dict:
    lab = duck.sql_identifier(label)
    if is_numeric(duck_type) and is_numeric(label_type):
        value = con.execute(f"SELECT corr({_finite(ident)}, {_finite(lab)}) FROM t").fetchone()[0]
        return {"correlation": _num(value)}

    # Mutual information (nats) between the column and the label, numeric ones in 10
    # equal-width bins (ties always share a bin, unlike quantile bins).
    def binned(x: str) -> str:
        v = _finite(x)  # NaN and infinities fall in no bin (the pair is left out)
        return (
            f"coalesce(least(CAST(floor(({v} - min({v}) OVER ()) / "
            f"nullif((max({v}) OVER () - min({v}) OVER ()) / 10, 0)) "
            "AS INTEGER), 9), 0)"
        )

    def kept(x: str, kind: str) -> str:
        return f"{_finite(x)} IS NOT NULL" if is_numeric(kind) else f"{x} IS NOT NULL"

    feature = binned(ident) if is_numeric(duck_type) else f"CAST({ident} AS VARCHAR)"
    target = binned(lab) if is_numeric(label_type) else f"CAST({lab} AS VARCHAR)"
    value = con.execute(
        f"WITH j AS (SELECT {feature} AS x, {target} AS y FROM t "
        f"WHERE {kept(ident, duck_type)} AND {kept(lab, label_type)}), "
        "n AS (SELECT count(*) AS n FROM j), "
        "xy AS (SELECT x, y, count(*) AS c FROM j GROUP BY ALL), "
        "px AS (SELECT x, count(*) AS c FROM j GROUP BY ALL), "
        "py AS (SELECT y, count(*) AS c FROM j GROUP BY ALL) "
        "SELECT sum(xy.c / n.n * ln((xy.c * n.n) / (px.c * py.c))) "
        "FROM xy JOIN px USING (x) JOIN py USING (y), n"
    ).fetchone()[0]
    return {"mutual_information": _num(value)}
