"""The point-in-time join: for each entity row, each feature view's value as it was known then.

The contract, per entity row `e` and per feature view, over feature rows `f` with the same keys:
1. candidates have `f.ts <= e.ts` and, with a ttl, `f.ts >= e.ts - ttl` (both inclusive);
2. with a created column and as-of-known-time on, also `f.created <= e.ts` (a NULL created
   is then not known at all);
3. the chosen row has the greatest `ts`, then the greatest `created`, then the latest ingestion
   order, so the answer is deterministic;
4. no candidate: the features are NULL; every entity row is kept, duplicates included;
5. timestamps without a timezone are UTC (zoned ones are converted to UTC);
6. keys are compared column by column, as tuples: (1, 12) and (11, 2) never meet.

Without the created filter the join is DuckDB's ASOF join over feature rows reduced to one per
(keys, ts); with it, the filter depends on the entity row, so it is a range join reduced per
entity row to its best candidate's row id.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.core.duck import sql_identifier as q
from appliance.errors import InvalidInput

ROW = "__pit_row"  # the entity row's position: keeps duplicates apart and the order stable


@dataclass(frozen=True)
class FeatureSource:
    """One feature view's rows as a DuckDB relation name (a table, view or subquery)."""

    relation: str
    keys: tuple[str, ...]
    timestamp: str
    features: tuple[str, ...]
    created: str | None = None
    ingest_order: str | None = None  # a column that grows with ingestion (file row number)
    ttl_seconds: float | None = None
    name: str = "features"


def _utc(con: Any, relation: str, column: str, what: str) -> str:
    """An expression for `column` as a naive UTC TIMESTAMP (rule 5), or a clear error."""
    types = dict(
        con.execute(f"SELECT column_name, column_type FROM (DESCRIBE {relation})").fetchall()
    )
    if column not in types:
        raise InvalidInput(f"{what}: no column {column!r} (columns: {', '.join(types)})")
    kind = types[column].upper()
    if kind == "TIMESTAMP WITH TIME ZONE":
        return f"timezone('UTC', {q(column)})"
    if kind.startswith("TIMESTAMP") or kind == "DATE":
        return f"CAST({q(column)} AS TIMESTAMP)"
    if kind == "VARCHAR":
        # ISO 8601 text is read as a time (naive = UTC, an offset is honoured); anything
        # else, such as a column mixing 2026-01-31 with 01/31/2026, is refused, not guessed
        con.execute("SET TimeZone = 'UTC'")
        bad = con.execute(
            f"SELECT n, v FROM (SELECT row_number() OVER () AS n, {q(column)} AS v "
            f"FROM {relation}) WHERE v IS NOT NULL AND TRY_CAST(v AS TIMESTAMPTZ) IS NULL "
            "ORDER BY n LIMIT 1"
        ).fetchone()
        if bad is not None:
            raise InvalidInput(
                f"{what}: column {column!r} row {bad[0]}: {bad[1]!r} is not an ISO 8601 time "
                "(2026-01-31 12:00:00, optionally with an offset); timestamps in mixed "
                "formats are not guessed"
            )
        return f"timezone('UTC', CAST({q(column)} AS TIMESTAMPTZ))"
    raise InvalidInput(f"{what}: column {column!r} is {types[column]}, not a timestamp")


def _columns(con: Any, relation: str) -> list[str]:
    return [r[0] for r in con.execute(f"SELECT column_name FROM (DESCRIBE {relation})").fetchall()]


def point_in_time_sql(
    con: Any,
    entities: str,
    entity_timestamp: str,
    sources: list[FeatureSource],
    as_of_known_time: bool = True,
) -> str:
    """SQL for the training set: every entity column, then each source's features, one row
    per entity row in entity order. `entities` and each source's `relation` are relation
    names the connection knows."""
    entity_columns = _columns(con, entities)
    e_ts = _utc(con, entities, entity_timestamp, "entity dataset")
    parts = [f"e AS (SELECT *, {e_ts} AS __pit_ts, row_number() OVER () AS {ROW} FROM {entities})"]
    selects = [f"e.{q(c)}" for c in entity_columns]
    joins = []
    seen: dict[str, str] = {c: "the entity dataset" for c in entity_columns}
    for i, src in enumerate(sources):
        have = _columns(con, src.relation)
        for key in src.keys:
            if key not in entity_columns:
                raise InvalidInput(f"entity dataset: no join key {key!r} for {src.name}")
            if key not in have:
                raise InvalidInput(f"{src.name}: its source has no key column {key!r}")
        for feature in src.features:
            if feature not in have:
                raise InvalidInput(f"{src.name}: its source has no column {feature!r}")
            if feature in seen:
                raise InvalidInput(
                    f"feature {feature!r} of {src.name} clashes with {seen[feature]}'s"
                )
            seen[feature] = src.name
        f_ts = _utc(con, src.relation, src.timestamp, src.name)
        created = _utc(con, src.relation, src.created, src.name) if src.created else "NULL"
        order = q(src.ingest_order) if src.ingest_order else "0"
        keys = [q(k) for k in src.keys]
        feats = [q(f) for f in src.features]
        ranged = as_of_known_time and src.created is not None
        # the ranged path reads its rows twice (candidates, then features by row id)
        parts.append(
            f"f{i} AS {'MATERIALIZED ' if ranged else ''}(SELECT {', '.join(keys)}, "
            f"{', '.join(feats)}, {f_ts} AS __ts, {created} AS __created, {order} AS __order"
            + (", row_number() OVER () AS __rid" if ranged else "")
            + f" FROM {src.relation} WHERE {f_ts} IS NOT NULL)"
        )
        key_match = " AND ".join(f"e.{k} = f{i}.{k}" for k in keys)
        oldest = (
            f"e.__pit_ts - INTERVAL ({float(src.ttl_seconds)}) SECOND" if src.ttl_seconds else None
        )
        if ranged:
            # The created filter depends on the entity row: a range join, then per entity row
            # the id of the best candidate (a small aggregate state, not a sort of every
            # candidate), then that row's features by id. A NULL created fails the filter.
            ttl = f" AND f{i}.__ts >= {oldest}" if oldest else ""
            rank = ", ".join(
                f"{n} := f{i}.__{c}"
                for n, c in zip("abcd", ("ts", "created", "order", "rid"), strict=True)
            )
            parts.append(
                f"m{i} AS (SELECT e.{ROW}, arg_max(f{i}.__rid, struct_pack({rank})) AS __rid "
                "FROM e "
                f"JOIN f{i} ON {key_match} AND f{i}.__ts <= e.__pit_ts{ttl} "
                f"AND f{i}.__created <= e.__pit_ts GROUP BY e.{ROW})"
            )
            joins.append(
                f"LEFT JOIN m{i} ON m{i}.{ROW} = e.{ROW} "
                f"LEFT JOIN f{i} AS g{i} ON g{i}.__rid = m{i}.__rid"
            )
            selects += [f"g{i}.{f}" for f in feats]
            continue
        # one row per (keys, ts) first, then at most one match per entity row
        parts.append(
            f"d{i} AS (SELECT * FROM f{i} QUALIFY row_number() OVER (PARTITION BY "
            f"{', '.join(keys)}, __ts ORDER BY __created DESC NULLS LAST, __order DESC) = 1)"
        )
        asof_keys = " AND ".join(f"e.{k} = d{i}.{k}" for k in keys)
        ttl_ok = f"d{i}.__ts >= {oldest}" if oldest else "TRUE"
        parts.append(
            f"m{i} AS (SELECT e.{ROW}, "
            + ", ".join(f"CASE WHEN {ttl_ok} THEN d{i}.{f} END AS {f}" for f in feats)
            + f" FROM e ASOF JOIN d{i} ON {asof_keys} AND e.__pit_ts >= d{i}.__ts)"
        )
        joins.append(f"LEFT JOIN m{i} ON m{i}.{ROW} = e.{ROW}")
        selects += [f"m{i}.{f}" for f in feats]
    return (
        "WITH "
        + ",\n".join(parts)
        + f"\nSELECT {', '.join(selects)} FROM e {' '.join(joins)} ORDER BY e.{ROW}"
    )
