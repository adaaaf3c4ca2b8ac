"""Data validation: checks declared in YAML, run in DuckDB on every new dataset version.

    checks:
      - not_null: [customer_id, amount]
      - unique: customer_id
      - range: {column: amount, min: 0, max: 10000}
      - allowed_values: {column: status, values: [active, closed]}
      - regex: {column: email, pattern: "^[^@]+@[^@]+$"}
      - row_count: {min: 100, max: 10000000}
      - max_null_fraction: {column: notes, max: 0.2}
      - freshness: {max_age: 7d}          # on the dataset's timestamp column

A failing check blocks the version unless the caller allows invalid data, in which case the
failures are recorded on the version.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date
from typing import Any

from appliance.core.duck import sql_identifier, sql_string
from appliance.errors import ApplianceError, InvalidInput

KINDS = (
    "not_null",
    "unique",
    "range",
    "allowed_values",
    "regex",
    "row_count",
    "max_null_fraction",
    "freshness",
)
SAMPLE_ROWS = 5
_AGE = re.compile(r"^(\d+)\s*(s|m|h|d|w)$")
_AGE_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day", "w": "week"}


class ValidationFailed(ApplianceError):
    """One or more checks failed; the new version was not created."""

    exit_code = 7


@dataclass(frozen=True)
class Check:
    kind: str
    args: dict[str, Any]

    def describe(self) -> str:
        detail = ", ".join(f"{k}={v}" for k, v in self.args.items())
        return f"{self.kind}({detail})"


def _columns(where: str, value: Any) -> list[str]:
    cols = [value] if isinstance(value, str) else value
    if not isinstance(cols, list) or not cols or not all(isinstance(c, str) for c in cols):
        raise InvalidInput(f"{where}: expected a column name or a list of column names")
    return cols


def parse_checks(data: Any, source: str) -> list[Check]:
    """Validate the declared checks; errors name the file and the check's position."""
    items = data.get("checks") if isinstance(data, dict) else data
    if items is None:
        return []
    if not isinstance(items, list):
        raise InvalidInput(f"{source}: 'checks' must be a list")
    parsed = []
    for i, item in enumerate(items, 1):
        where = f"{source}: check {i}"
        if not isinstance(item, dict) or len(item) != 1:
            raise InvalidInput(f"{where}: write each check as '- KIND: ARGS'")
        kind, raw = next(iter(item.items()))
        if kind not in KINDS:
            raise InvalidInput(f"{where}: unknown check {kind!r}; known: {', '.join(KINDS)}")
        where = f"{where} ({kind})"
        if kind in ("not_null", "unique"):
            args: dict[str, Any] = {"columns": _columns(where, raw)}
        else:
            if not isinstance(raw, dict):
                raise InvalidInput(f"{where}: expected a mapping of arguments")
            args = dict(raw)
            needs = {
                "range": ("column",),
                "allowed_values": ("column", "values"),
                "regex": ("column", "pattern"),
                "row_count": (),
                "max_null_fraction": ("column", "max"),
                "freshness": ("max_age",),
            }[kind]
            for key in needs:
                if key not in args:
                    raise InvalidInput(f"{where}: missing {key!r}")
            if kind == "range" and "min" not in args and "max" not in args:
                raise InvalidInput(f"{where}: give min, max or both")
            if kind == "row_count" and "min" not in args and "max" not in args:
                raise InvalidInput(f"{where}: give min, max or both")
            if kind == "allowed_values" and (
                not isinstance(args["values"], list) or not args["values"]
            ):
                raise InvalidInput(f"{where}: 'values' must be a non-empty list")
            for key in ("min", "max"):
                if kind in ("range", "row_count", "max_null_fraction") and key in args:
                    value = args[key]
                    if not isinstance(value, int | float) or isinstance(value, bool):
                        if kind == "range" and isinstance(value, str | date):
                            continue  # dates and strings compare as such
                        raise InvalidInput(f"{where}: {key} must be a number, got {value!r}")
            if kind == "max_null_fraction" and not 0 <= args["max"] <= 1:
                raise InvalidInput(f"{where}: max must be a fraction between 0 and 1")
            if kind == "regex":
                try:
                    re.compile(str(args["pattern"]))
                except re.error as exc:
                    raise InvalidInput(f"{where}: bad pattern: {exc}") from exc
            if kind == "freshness" and not _AGE.match(str(args["max_age"])):
                raise InvalidInput(f"{where}: max_age like 30m, 12h or 7d")
        parsed.append(Check(kind, args))
    return parsed


def load_checks_text(text: str, source: str) -> list[Check]:
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{source}: invalid YAML: {exc}".splitlines()[0]) from exc
    return parse_checks(data, source)


def _literal(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return sql_string(str(value))


def _queries(check: Check, table: str, timestamp_col: str | None) -> tuple[str, str | None]:
    """(SQL giving the failing count, SQL giving up to 5 offending rows or None)."""
    a = check.args
    if check.kind == "not_null":
        cond = " OR ".join(f"{sql_identifier(c)} IS NULL" for c in a["columns"])
    elif check.kind == "unique":
        cols = ", ".join(sql_identifier(c) for c in a["columns"])
        present = " OR ".join(f"{sql_identifier(c)} IS NOT NULL" for c in a["columns"])
        dup = (
            f"SELECT {cols}, count(*) AS duplicates FROM {table} WHERE {present} "
            "GROUP BY ALL HAVING count(*) > 1"
        )
        return f"SELECT coalesce(sum(duplicates), 0) FROM ({dup})", f"{dup} LIMIT {SAMPLE_ROWS}"
    elif check.kind == "range":
        col = sql_identifier(a["column"])
        parts = []
        if "min" in a:
            parts.append(f"{col} < {_literal(a['min'])}")
        if "max" in a:
            parts.append(f"{col} > {_literal(a['max'])}")
        cond = " OR ".join(parts)
    elif check.kind == "allowed_values":
        values = ", ".join(_literal(v) for v in a["values"])
        cond = f"{sql_identifier(a['column'])} NOT IN ({values})"
    elif check.kind == "regex":
        col = sql_identifier(a["column"])
        cond = f"NOT regexp_full_match(CAST({col} AS VARCHAR), {sql_string(str(a['pattern']))})"
    elif check.kind == "row_count":
        parts = []
        if "min" in a:
            parts.append(f"n < {int(a['min'])}")
        if "max" in a:
            parts.append(f"n > {int(a['max'])}")
        return (
            f"SELECT CASE WHEN {' OR '.join(parts)} THEN n ELSE 0 END "
            f"FROM (SELECT count(*) AS n FROM {table})",
            None,
        )
    elif check.kind == "max_null_fraction":
        col = sql_identifier(a["column"])
        return (
            f"SELECT CASE WHEN count(*) > 0 AND count(*) FILTER ({col} IS NULL) > "
            f"{float(a['max'])} * count(*) THEN count(*) FILTER ({col} IS NULL) ELSE 0 END "
            f"FROM {table}",
            None,
        )
    else:  # freshness
        if not timestamp_col:
            raise InvalidInput(
                "check freshness: the dataset has no timestamp column "
                "(set one with --timestamp-col)"
            )
        number, unit = _AGE.match(str(a["max_age"])).groups()  # type: ignore[union-attr]
        ts = sql_identifier(timestamp_col)
        interval = f"INTERVAL {int(number)} {_AGE_UNITS[unit]}"
        return (
            # Naive timestamps are taken as UTC; make_timestamp(epoch_us(now())) is UTC now.
            f"SELECT CASE WHEN max({ts}) IS NULL OR CAST(max({ts}) AS TIMESTAMP) < "
            f"make_timestamp(epoch_us(now())) - {interval} THEN 1 ELSE 0 END FROM {table}",
            f"SELECT max({ts}) AS newest FROM {table}",
        )
    return (
        f"SELECT count(*) FROM {table} WHERE {cond}",
        f"SELECT * FROM {table} WHERE {cond} LIMIT {SAMPLE_ROWS}",
    )


def run_checks(
    con: Any, table: str, checks: list[Check], columns: list[str], timestamp_col: str | None
) -> list[dict[str, Any]]:
    """Run every check on `table`; returns one result per check (failing 0 = passed)."""
    import duckdb

    known = {c.lower() for c in columns}
    results = []
    for check in checks:
        named = check.args.get("columns") or (
            [check.args["column"]] if "column" in check.args else []
        )
        missing = [c for c in named if c.lower() not in known]
        if missing:
            raise InvalidInput(f"check {check.describe()}: no column {missing[0]!r} in the data")
        count_sql, rows_sql = _queries(check, table, timestamp_col)
        try:
            failing = int(con.execute(count_sql).fetchone()[0] or 0)
            sample: list[dict[str, Any]] = []
            if failing and rows_sql:
                cur = con.execute(rows_sql)
                names = [d[0] for d in cur.description]
                sample = [
                    dict(zip(names, map(_jsonable, row), strict=True)) for row in cur.fetchall()
                ]
        except duckdb.Error as exc:
            first = str(exc).strip().splitlines()[0]
            raise InvalidInput(
                f"check {check.describe()}: cannot run on this data: {first}"
            ) from exc
        results.append({"check": check.describe(), "failing": failing, "rows": sample})
    return results


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    return str(value)


def failure_message(source: str, results: list[dict[str, Any]]) -> str:
    failed = [r for r in results if r["failing"]]
    lines = [f"{source}: {len(failed)} check(s) failed; no version was created"]
    for r in failed:
        lines.append(f"  {r['check']}: {r['failing']} failing")
        lines += [f"    {row}" for row in r["rows"]]
    return "\n".join(lines)
