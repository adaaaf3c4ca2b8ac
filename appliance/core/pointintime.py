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

Each path picks one feature row id per entity row, then reads that row's features by id.
Without the created filter, DuckDB's ASOF join finds the latest (keys, ts) at or before the
entity time and rule 3 ranks the rows at exactly that point; with it, the filter depends on the
entity row, so it is a range join reduced per entity row to its best candidate.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from appliance.core.duck import sql_identifier as q
from appliance.errors import InvalidInput

ROW = "__pit_row"  # the entity row's position: keeps duplicates apart and the order stable
RANGE_ROWS = 16  # late entity rows per key up to which a range join beats a running maximum


@dataclass(frozen=True)
class FeatureSource:
    """One feature view's rows as a DuckDB relation name (a table, view or subquery)."""

    relation: str
    keys: tuple[str, ...]
    timestamp: str
    features: tuple[str, ...]
    created: str | None = None
    ingest_order: str | None = None  # a column that grows with ingestion (file row number)
    row_id: str | None = None  # a column unique per row, stable across reads (file row number)
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
        if con.execute("SELECT current_setting('TimeZone')").fetchone()[0] != "UTC":
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
        # Every path picks a row id per entity row, then reads that row's features by id.
        # The rows the join works on are materialized once, so ids are stable across reads;
        # with a row id column in the source they hold no feature values (less to build).
        rid = q(src.row_id) if src.row_id else "row_number() OVER ()"
        carried = "" if src.row_id else f"{', '.join(feats)}, "
        # row_number() ids must be computed once; a source's own ids are stable on any read
        materialized = "" if src.row_id else "MATERIALIZED "
        parts.append(
            f"f{i} AS {materialized}(SELECT {', '.join(keys)}, {carried}"
            f"{f_ts} AS __ts, coalesce({created}, TIMESTAMP '-infinity') AS __created, "
            f"{created} IS NULL AS __unknown, {order} AS __order, "
            f"{rid} AS __rid FROM {src.relation} WHERE {f_ts} IS NOT NULL)"
        )
        oldest = (
            f"e.__pit_ts - INTERVAL ({float(src.ttl_seconds)}) SECOND" if src.ttl_seconds else None
        )
        # rule 3 as one comparable value: a NULL created ranks below any time
        rank = ", ".join(
            f"{n} := f{i}.__{c}"
            for n, c in zip("abcd", ("ts", "created", "order", "rid"), strict=True)
        )
        best = f"arg_max(f{i}.__rid, struct_pack({rank}))"  # the id of the best-ranked row
        known = as_of_known_time and src.created is not None
        # DuckDB's ASOF join finds the latest (keys, ts) at or before the entity time (which
        # of several rows at that time it meets does not matter: only the time is kept); the
        # rows at exactly that point are then ranked (rule 3), and with as-of-known-time only
        # those already written count.
        asof_keys = " AND ".join(f"e.{k} = t{i}.{k}" for k in keys)
        parts.append(
            f"a{i} AS (SELECT e.{ROW}, e.__pit_ts, {', '.join(f'e.{k}' for k in keys)}, "
            f"t{i}.__ts FROM e ASOF JOIN (SELECT {', '.join(keys)}, __ts "
            f"FROM f{i}) t{i} ON {asof_keys} AND e.__pit_ts >= t{i}.__ts "
            # an entity row without a time has no candidate (DuckDB's sorting ASOF join
            # would match a NULL time)
            f"WHERE e.__pit_ts IS NOT NULL"
            + (f" AND t{i}.__ts >= {oldest}" if oldest else "")
            + ")"
        )
        exact = " AND ".join(f"a{i}.{k} = f{i}.{k}" for k in keys)
        written = f" AND NOT f{i}.__unknown AND f{i}.__created <= a{i}.__pit_ts" if known else ""
        parts.append(
            f"{'x' if known else 'm'}{i} AS (SELECT a{i}.{ROW}, "
            f"{best} AS __rid FROM a{i} JOIN f{i} "
            f"ON {exact} AND f{i}.__ts = a{i}.__ts{written} GROUP BY a{i}.{ROW})"
        )
        if known:
            # Entity rows whose latest point was not yet written when they happened (late
            # data) need the best row among those already known then (known = the later of ts
            # and created). Per key: a few such rows take a range join over the key's rows; many
            # take a running maximum of the rank ordered by known, then an ASOF join on known,
            # so the cost stays n log n however late the data is.
            lkeys = ", ".join(keys)
            parts.append(f"l{i} AS (SELECT * FROM a{i} ANTI JOIN x{i} ON x{i}.{ROW} = a{i}.{ROW})")
            parts.append(
                f"h{i} AS (SELECT {lkeys} FROM l{i} GROUP BY ALL HAVING count(*) > {RANGE_ROWS})"
            )
            key_in = " AND ".join(f"f{i}.{k} = h{i}.{k}" for k in keys)
            parts.append(
                f"b{i} AS (SELECT {', '.join(f'f{i}.{k}' for k in keys)}, "
                f"greatest(f{i}.__ts, f{i}.__created) AS __known, "
                f"max(struct_pack({rank})) AS __best FROM f{i} SEMI JOIN h{i} ON {key_in} "
                f"WHERE NOT f{i}.__unknown GROUP BY ALL)"
            )
            parts.append(
                f"r{i} AS (SELECT {lkeys}, __known, max(__best) OVER (PARTITION BY {lkeys} "
                f"ORDER BY __known ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS __best "
                f"FROM b{i})"
            )
            asof = " AND ".join(f"l{i}.{k} = r{i}.{k}" for k in keys)
            late_ttl = f" AND r{i}.__best.a >= {oldest.replace('e.', f'l{i}.')}" if oldest else ""
            heavy = " AND ".join(f"l{i}.{k} = h{i}.{k}" for k in keys)
            late = " AND ".join(f"l{i}.{k} = f{i}.{k}" for k in keys)
            ttl = f" AND f{i}.__ts >= {oldest.replace('e.', f'l{i}.')}" if oldest else ""
            parts.append(
                f"m{i} AS (SELECT * FROM x{i} "
                f"UNION ALL SELECT l{i}.{ROW}, r{i}.__best.d FROM l{i} ASOF JOIN r{i} "
                f"ON {asof} AND l{i}.__pit_ts >= r{i}.__known WHERE TRUE{late_ttl} "
                f"UNION ALL SELECT l{i}.{ROW}, {best} "
                f"FROM (SELECT * FROM l{i} ANTI JOIN h{i} ON {heavy}) l{i} JOIN f{i} ON {late} "
                f"AND f{i}.__ts < l{i}.__ts{ttl} AND NOT f{i}.__unknown "
                f"AND f{i}.__created <= l{i}.__pit_ts GROUP BY l{i}.{ROW})"
            )
        joins.append(
            f"LEFT JOIN m{i} ON m{i}.{ROW} = e.{ROW} "
            f"LEFT JOIN "
            + (
                f"(SELECT {rid} AS __rid, {', '.join(feats)} FROM {src.relation})"
                if src.row_id
                else f"f{i}"
            )
            + f" AS g{i} ON g{i}.__rid = m{i}.__rid"
        )
        selects += [f"g{i}.{f}" for f in feats]
    return (
        "WITH "
        + ",\n".join(parts)
        + f"\nSELECT {', '.join(selects)} FROM e {' '.join(joins)} ORDER BY e.{ROW}"
    )
