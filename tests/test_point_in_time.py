"""The point-in-time join contract, rule by rule on hand-written rows, then against a brute-force
reference on thousands of random rows with ties, late data and two-column keys."""

from __future__ import annotations

import random
from datetime import datetime, timedelta
from typing import Any

import duckdb
import pytest

from appliance.core.pointintime import FeatureSource, point_in_time_sql
from appliance.errors import InvalidInput

T = datetime(2026, 1, 1)


def at(hhmm: str) -> datetime:
    hours, minutes = map(int, hhmm.split(":"))
    return T + timedelta(hours=hours, minutes=minutes)


def join(
    entity_rows: list[tuple[Any, ...]],
    feature_rows: list[tuple[Any, ...]],
    ttl_hours: float | None = 2,
    as_of_known_time: bool = True,
    keys: tuple[str, ...] = ("k",),
    created: bool = True,
    row_id: bool = False,
) -> list[Any]:
    """Entity rows (keys..., ts) and feature rows (keys..., ts, created, value, order) ->
    the value joined to each entity row, in entity order."""
    con = duckdb.connect()
    key_cols = ", ".join(f"{k} BIGINT" for k in keys)
    con.execute(f"CREATE TABLE ent ({key_cols}, event_ts TIMESTAMP, label INTEGER)")
    con.execute(
        f"CREATE TABLE feat ({key_cols}, ts TIMESTAMP, created TIMESTAMP, v DOUBLE, seq BIGINT)"
    )
    width = len(keys)
    con.executemany(
        f"INSERT INTO ent VALUES ({', '.join(['?'] * (width + 2))})",
        [(*r, i) for i, r in enumerate(entity_rows)],
    )
    if feature_rows:
        con.executemany(
            f"INSERT INTO feat VALUES ({', '.join(['?'] * (width + 4))})",
            [(*r, i) if len(r) == width + 3 else r for i, r in enumerate(feature_rows)],
        )
    source = FeatureSource(
        relation="feat",
        keys=keys,
        timestamp="ts",
        features=("v",),
        created="created" if created else None,
        ingest_order="seq",
        row_id="seq" if row_id else None,  # features then read back by id from the source
        ttl_seconds=None if ttl_hours is None else ttl_hours * 3600,
        name="view",
    )
    sql = point_in_time_sql(con, "ent", "event_ts", [source], as_of_known_time)
    rows = con.execute(sql).fetchall()
    assert [r[-2] for r in rows] == list(range(len(entity_rows)))  # every row, in order
    return [r[-1] for r in rows]


@pytest.mark.parametrize("known", [True, False])
def test_rule1_candidates_are_at_or_before_the_entity_time_and_within_the_ttl(known: bool) -> None:
    rows = [(1, at("09:00"), at("09:00"), 1.0), (1, at("10:00"), at("10:00"), 2.0)]
    entities = [(1, at("10:00")), (1, at("09:30")), (1, at("08:00"))]
    assert join(entities, rows, as_of_known_time=known) == [2.0, 1.0, None]  # equal ts counts
    exactly_ttl_old = [(1, at("10:00"), at("10:00"), 40.0)]
    assert join([(1, at("12:00"))], exactly_ttl_old, as_of_known_time=known) == [40.0]
    just_older = [(1, at("09:59"), at("09:59"), 50.0)]
    assert join([(1, at("12:00"))], just_older, as_of_known_time=known) == [None]
    assert join([(1, at("12:00"))], just_older, ttl_hours=None, as_of_known_time=known) == [50.0]


def test_rule2_a_value_written_after_the_entity_time_does_not_leak() -> None:
    rows = [(1, at("09:30"), at("09:30"), 30.0), (1, at("10:00"), at("12:00"), 31.0)]
    assert join([(1, at("11:00"))], rows) == [30.0]  # falls back to what was known at 11:00
    assert join([(1, at("11:00"))], rows, as_of_known_time=False) == [31.0]
    unknown = [(1, at("09:00"), None, 5.0)]
    assert join([(1, at("11:00"))], unknown) == [None]  # no created time: never known
    assert join([(1, at("11:00"))], unknown, as_of_known_time=False) == [5.0]


@pytest.mark.parametrize("known", [True, False])
def test_rule3_ties_break_on_created_then_on_ingestion_order(known: bool) -> None:
    by_created = [(1, at("10:00"), at("10:05"), 20.0), (1, at("10:00"), at("10:01"), 21.0)]
    assert join([(1, at("11:00"))], by_created, as_of_known_time=known) == [20.0]
    full_tie = [(1, at("10:00"), at("10:00"), 60.0, 2), (1, at("10:00"), at("10:00"), 61.0, 1)]
    assert join([(1, at("11:00"))], full_tie, as_of_known_time=known) == [60.0]
    later_file_row = [
        (1, at("10:00"), at("10:00"), 60.0, 1),
        (1, at("10:00"), at("10:00"), 61.0, 2),
    ]
    assert join([(1, at("11:00"))], later_file_row, as_of_known_time=known) == [61.0]


@pytest.mark.parametrize("known", [True, False])
def test_rule4_no_candidate_is_null_and_every_entity_row_is_kept(known: bool) -> None:
    rows = [(1, at("09:00"), at("09:00"), 1.0), (1, at("10:00"), at("10:00"), 2.0)]
    entities = [(1, at("10:00")), (1, at("10:00")), (2, at("10:00")), (1, at("07:00"))]
    assert join(entities, rows, as_of_known_time=known) == [2.0, 2.0, None, None]
    assert join(entities, [], as_of_known_time=known) == [None] * 4


@pytest.mark.parametrize("known", [True, False])
def test_rule4_an_entity_row_without_a_time_has_no_candidate(known: bool) -> None:
    # enough rows for DuckDB's sorting ASOF join, which would match a NULL time
    entities = [(1, at("10:00"))] * 70 + [(1, None)] + [(1, at("10:00"))] * 70
    got = join(
        entities, [(1, at("09:00"), at("09:00"), 42.0)], ttl_hours=None, as_of_known_time=known
    )
    assert got == [42.0] * 70 + [None] + [42.0] * 70


def test_rule5_naive_timestamps_are_utc_and_zoned_ones_are_converted() -> None:
    con = duckdb.connect()
    con.execute("SET TimeZone = 'America/New_York'")  # the connection's zone must not matter
    con.execute("CREATE TABLE ent (k BIGINT, event_ts TIMESTAMP)")
    con.execute("CREATE TABLE feat (k BIGINT, ts TIMESTAMPTZ, v DOUBLE)")
    con.execute("INSERT INTO ent VALUES (1, TIMESTAMP '2026-01-01 10:00:00')")  # 10:00 UTC
    con.execute(
        "INSERT INTO feat VALUES (1, TIMESTAMPTZ '2026-01-01 10:00:00+00', 1.0), "
        "(1, TIMESTAMPTZ '2026-01-01 05:30:00-05', 2.0)"  # = 10:30 UTC: after the entity time
    )
    source = FeatureSource("feat", ("k",), "ts", ("v",), name="view")
    rows = con.execute(point_in_time_sql(con, "ent", "event_ts", [source])).fetchall()
    assert rows == [(1, datetime(2026, 1, 1, 10, 0), 1.0)]
    # ISO text: naive is UTC, an offset is honoured, whatever the connection's zone
    con.execute("CREATE TABLE ent_text (k BIGINT, event_ts VARCHAR)")
    con.execute(
        "INSERT INTO ent_text VALUES (1, '2026-01-01 10:29:00'), (1, '2026-01-01T05:30:00-05:00')"
    )
    con.execute("SET TimeZone = 'America/New_York'")
    rows = con.execute(point_in_time_sql(con, "ent_text", "event_ts", [source])).fetchall()
    assert [r[2] for r in rows] == [1.0, 2.0]


@pytest.mark.parametrize("known", [True, False])
def test_rule6_multi_column_keys_compare_as_tuples(known: bool) -> None:
    rows = [(1, 12, at("10:00"), at("10:00"), 112.0), (11, 2, at("10:00"), at("10:00"), 1102.0)]
    entities = [(1, 12, at("10:00")), (11, 2, at("10:00")), (1, 2, at("10:00"))]
    got = join(entities, rows, keys=("a", "b"), as_of_known_time=known)
    assert got == [112.0, 1102.0, None]


def _brute_force(
    entities: list[tuple[Any, ...]],
    features: list[tuple[Any, ...]],
    ttl: timedelta,
    known: bool,
) -> list[Any]:
    by_key: dict[tuple[Any, ...], list[tuple[int, tuple[Any, ...]]]] = {}
    for order, row in enumerate(features):
        by_key.setdefault(tuple(row[:-3]), []).append((order, row))
    out = []
    for *key, ts in entities:
        best = None
        for order, (*_, fts, created, value) in by_key.get(tuple(key), []):
            if fts > ts or fts < ts - ttl:
                continue
            if known and (created is None or created > ts):
                continue
            rank = (fts, created or datetime.min, order)
            if best is None or rank > best[0]:
                best = (rank, value)
        out.append(None if best is None else best[1])
    return out


def _random_rows(seed: int) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    rng = random.Random(seed)
    features = []
    for n in range(4000):
        ts = T + timedelta(minutes=rng.randrange(0, 600, 15))  # coarse: many equal times
        late = rng.random() < 0.2  # written well after its event time
        created = ts + timedelta(minutes=rng.choice([0, 0, 5, 120] if late else [0, 5]))
        if rng.random() < 0.03:
            created = None
        features.append((rng.randrange(4), rng.randrange(4), ts, created, float(n)))
    entities = [
        (rng.randrange(5), rng.randrange(4), T + timedelta(minutes=rng.randrange(-30, 660)))
        for _ in range(3000)
    ]
    entities += entities[:50]  # duplicates are kept
    return features, entities


@pytest.mark.parametrize("row_id", [False, True])
@pytest.mark.parametrize("known", [True, False])
def test_matches_a_brute_force_reference_on_random_rows(known: bool, row_id: bool) -> None:
    features, entities = _random_rows(7 if known else 8)
    got = join(
        entities, features, ttl_hours=1.5, as_of_known_time=known, keys=("a", "b"), row_id=row_id
    )
    want = _brute_force(entities, features, timedelta(hours=1.5), known)
    assert got == want
    assert sum(v is None for v in want) > 100 and sum(v is not None for v in want) > 1000


@pytest.mark.parametrize("known", [True, False])
def test_matches_the_brute_force_reference_without_a_ttl(known: bool) -> None:
    features, entities = _random_rows(9)
    got = join(entities, features, ttl_hours=None, as_of_known_time=known, keys=("a", "b"))
    assert got == _brute_force(entities, features, timedelta(days=10_000), known)


@pytest.mark.parametrize("range_rows", [0, 10**9])
@pytest.mark.parametrize("ttl_hours", [1.5, None])
def test_late_rows_take_either_fallback_with_the_same_answer(
    monkeypatch: pytest.MonkeyPatch, range_rows: int, ttl_hours: float | None
) -> None:
    # every key through the running maximum, or every key through the range join
    from appliance.core import pointintime

    monkeypatch.setattr(pointintime, "RANGE_ROWS", range_rows)
    features, entities = _random_rows(10)
    got = join(entities, features, ttl_hours=ttl_hours, keys=("a", "b"), row_id=True)
    ttl = timedelta(hours=ttl_hours) if ttl_hours else timedelta(days=10_000)
    assert got == _brute_force(entities, features, ttl, True)


def test_bad_definitions_name_the_view_and_the_column() -> None:
    con = duckdb.connect()
    con.execute("CREATE TABLE ent (k BIGINT, event_ts VARCHAR)")
    con.execute("INSERT INTO ent VALUES (1, '2026-01-01 10:00:00'), (1, '01/02/2026 10:00')")
    con.execute("CREATE TABLE feat (k BIGINT, ts TIMESTAMP, v DOUBLE)")
    source = FeatureSource("feat", ("k",), "ts", ("v",), name="driver_stats")
    with pytest.raises(
        InvalidInput, match="entity dataset: column 'event_ts' row 2: '01/02/2026 10:00' is not"
    ):
        point_in_time_sql(con, "ent", "event_ts", [source])
    con.execute("CREATE TABLE ent_int (k BIGINT, event_ts INTEGER)")
    with pytest.raises(InvalidInput, match="column 'event_ts' is INTEGER, not a timestamp"):
        point_in_time_sql(con, "ent_int", "event_ts", [source])
    con.execute("CREATE TABLE ent2 (driver BIGINT, event_ts TIMESTAMP)")
    with pytest.raises(InvalidInput, match="entity dataset: no join key 'k' for driver_stats"):
        point_in_time_sql(con, "ent2", "event_ts", [source])
    con.execute("CREATE TABLE ent3 (k BIGINT, event_ts TIMESTAMP)")
    with pytest.raises(InvalidInput, match="entity dataset: no column 'ts_typo'"):
        point_in_time_sql(con, "ent3", "ts_typo", [source])
    missing = FeatureSource("feat", ("k",), "ts", ("nope",), name="driver_stats")
    with pytest.raises(InvalidInput, match="driver_stats: its source has no column 'nope'"):
        point_in_time_sql(con, "ent3", "event_ts", [missing])
    twice = [source, FeatureSource("feat", ("k",), "ts", ("v",), name="other")]
    with pytest.raises(InvalidInput, match="feature 'v' of other clashes with driver_stats"):
        point_in_time_sql(con, "ent3", "event_ts", twice)
