"""Feature views computed by SQL (window aggregations), profiles and freshness, and a feature
service carried from the training set to the model version and to a deployment that looks
features up from entity keys, over real HTTP."""

from __future__ import annotations

import json
import random
import re
import urllib.error
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import duckdb
import pytest

from appliance.core import datasets, features
from appliance.core.context import Appliance
from appliance.errors import Conflict, InvalidInput

T0 = datetime(2026, 1, 1)

TRIPS = [  # driver_id, event_ts, fare
    (1, T0, 10.0),
    (1, T0 + timedelta(days=2), 20.0),
    (1, T0 + timedelta(days=8), 5.0),  # the first trip has left the 7-day window
    (2, T0 + timedelta(days=1), 7.0),
]
WINDOW_VIEW = """
entities:
  - {name: driver, join_keys: [driver_id]}
feature_views:
  - name: driver_weekly
    entities: [driver]
    source: trips
    timestamp: event_ts
    sql: |
      SELECT driver_id, event_ts,
             sum(fare) OVER (PARTITION BY driver_id ORDER BY event_ts
                             RANGE BETWEEN INTERVAL 7 DAYS PRECEDING AND CURRENT ROW) AS fare_7d,
             count(*) OVER (PARTITION BY driver_id ORDER BY event_ts
                            RANGE BETWEEN INTERVAL 7 DAYS PRECEDING AND CURRENT ROW) AS trips_7d
      FROM source
    features:
      - {name: fare_7d, type: float64, description: fares over the last 7 days}
      - {name: trips_7d, type: int64}
feature_services:
  - {name: weekly, features: ["driver_weekly:fare_7d", "driver_weekly:trips_7d"]}
"""


def _csv(tmp_path: Path, name: str, header: str, rows: list[tuple[Any, ...]]) -> Path:
    path = tmp_path / f"{name}.csv"
    lines = [header] + [",".join(str(v) for v in row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def _defs(tmp_path: Path, text: str) -> Path:
    folder = tmp_path / "defs"
    folder.mkdir(exist_ok=True)
    (folder / "features.yaml").write_text(text)
    return folder


def _rows(app: Appliance, ref: str, columns: str) -> list[tuple[Any, ...]]:
    version = datasets.get_dataset_version(app, ref)
    path = str(app.objects.get_file(version["sha256"]))
    return duckdb.sql(f"SELECT {columns} FROM read_parquet('{path}')").fetchall()


def test_a_sql_view_computes_window_aggregations_joined_point_in_time(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.online import get_online_features, materialize

    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", TRIPS), "trips")
    entities = [
        (1, T0 + timedelta(days=3)),  # trips at day 0 and 2 -> 30
        (1, T0 + timedelta(days=9)),  # the day-8 row: day 2 and 8 -> 25
        (2, T0 + timedelta(hours=1)),  # before driver 2's first trip -> nothing
        (1, T0 - timedelta(days=1)),
    ]
    datasets.import_csv(app, _csv(tmp_path, "asks", "driver_id,event_ts", entities), "asks")
    applied = features.apply(app, _defs(tmp_path, WINDOW_VIEW))
    assert [r["created"] for r in applied] == [True, True, True]
    view = features.get_definition(app, "view", "driver_weekly")
    assert "RANGE BETWEEN INTERVAL 7 DAYS" in view["sql"]
    built = features.training_set(app, "weekly", "asks", "weekly_train")
    assert _rows(app, built["ref"], "fare_7d, trips_7d") == [
        (30.0, 2),
        (25.0, 2),
        (None, None),
        (None, None),
    ]
    materialize(app, end="2026-02-01T00:00:00")
    online = get_online_features(app, "weekly", {"driver_id": [1, 2]}, now=T0.timestamp())
    assert online["results"][1]["values"] == [25.0, 7.0]  # the latest window per driver
    assert online["results"][2]["values"] == [2, 1]
    # the SQL is part of the definition: changing it is a new version
    changed = WINDOW_VIEW.replace("INTERVAL 7 DAYS", "INTERVAL 3 DAYS")
    again = features.apply(app, _defs(tmp_path, changed))
    assert [(r["name"], r["version"], r["created"]) for r in again][1:] == [
        ("driver_weekly", 2, True),
        ("weekly", 2, True),
    ]


def test_bad_view_sql_is_refused_naming_the_view(app: Appliance, tmp_path: Path) -> None:
    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", TRIPS), "trips")
    where = "features.yaml: feature view 'driver_weekly'"
    cases = [
        (WINDOW_VIEW.replace("sum(fare)", "sum(tip)"), f"{where}: sql: .*tip"),
        (
            WINDOW_VIEW.replace("FROM source", "FROM source; DROP TABLE x"),
            r"sql: statement 2 \(DROP: DROP TABLE x\) is not allowed",
        ),
        (WINDOW_VIEW.replace("AS trips_7d", "AS trips_seven"), "feature 'trips_7d' is not"),
        (
            WINDOW_VIEW.replace("count(*) OVER", "sum(driver_id) OVER"),
            "'trips_7d' is declared int64 but the output of its sql .* HUGEINT .*CAST",
        ),
    ]
    secret = tmp_path / "secret.csv"
    secret.write_text("driver_id,event_ts,fare\n1,2026-01-01,1.0\n")
    elsewhere = WINDOW_VIEW.replace("FROM source", f"FROM read_csv('{secret}')")
    cases.append((elsewhere, f"{where}: sql: .*(Permission|disabled|not allowed)"))
    for text, needle in cases:
        with pytest.raises(InvalidInput, match=needle):
            features.apply(app, _defs(tmp_path, text))
    assert features.list_definitions(app) == []


def test_each_view_version_keeps_a_profile_and_freshness_follows_materialization(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.online import materialize

    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", TRIPS), "trips")
    features.apply(app, _defs(tmp_path, WINDOW_VIEW.replace("entities: [driver]", TTL_LINE)))
    profile = features.view_profile(app, "driver_weekly@1")
    assert profile["cached"] is True  # computed when the version was applied
    assert profile["rows"] == 4 and profile["ref"] == "driver_weekly@1 over trips@1"
    fare = next(c for c in profile["columns"] if c["name"] == "fare_7d")
    assert fare["max"] == 30.0 and fare["nulls"] == 0
    (state,) = features.freshness(app)
    assert state["status"] == "not materialized" and state["ttl_seconds"] == 2 * 86400
    materialize(app, end="2026-02-01T00:00:00")
    newest = (T0 + timedelta(days=8)).replace(tzinfo=UTC).timestamp()
    (state,) = features.freshness(app, now=newest + 86400)
    assert state["status"] == "fresh" and state["rows_written"] == 2
    assert state["newest_event"].startswith("2026-01-09T00:00:00")
    (state,) = features.freshness(app, now=newest + 3 * 86400)
    assert state["status"] == "stale" and state["age_seconds"] == 3 * 86400


def test_cli_lists_versions_profiles_freshness_and_types_keys(  # type: ignore[no-untyped-def]
    cli, app: Appliance, tmp_path: Path
) -> None:
    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", TRIPS), "trips")
    home = ["--home", str(app.settings.home)]
    assert cli("features", "apply", str(_defs(tmp_path, WINDOW_VIEW)), *home).code == 0
    changed = WINDOW_VIEW.replace("INTERVAL 7 DAYS", "INTERVAL 3 DAYS")
    assert cli("features", "apply", str(_defs(tmp_path, changed)), *home).code == 0
    listed = cli("features", "list", "--kind", "view", "--all-versions", "--json", *home).json()
    assert [(r["name"], r["version"]) for r in listed] == [
        ("driver_weekly", 2),
        ("driver_weekly", 1),
    ]
    profile = cli("features", "profile", "driver_weekly@1", "--json", *home).json()
    assert profile["rows"] == 4 and "fare_7d" in [c["name"] for c in profile["columns"]]
    assert "fare_7d" in cli("features", "profile", "driver_weekly", *home).out
    fresh = cli("features", "freshness", "--json", *home).json()
    assert [(r["ref"], r["status"]) for r in fresh] == [
        ("driver_weekly@2", "not materialized"),
        ("driver_weekly@1", "not materialized"),
    ]
    end = ["--end", "2026-02-01T00:00:00"]
    done = cli("features", "materialize", *end, "--json", *home).json()
    assert [r["view"] for r in done] == ["driver_weekly@2"]  # nothing reads version 1 online
    assert cli("features", "materialize", "--view", "driver_weekly@1", *end, *home).code == 0
    got = cli("features", "get", "--service", "weekly@1", "--entity", "driver_id=001", *home)
    assert got.code == 0 and "fare_7d    25 " in got.out  # 001 is driver 1
    got = cli("features", "get", "--service", "weekly", "--entity", "driver_id=1", "--json", *home)
    assert got.json()["results"][1]["values"] == [5.0]  # version 2 sums 3 days only
    bad = cli("features", "get", "--service", "weekly", "--entity", "driver_id=abc", *home)
    assert bad.code != 0 and "'driver_id': 'abc' is not a whole number" in bad.err
    bad = cli("features", "get", "--service", "weekly", "--entity", "rider=1", *home)
    assert bad.code != 0 and "entity key 'rider'" in bad.err


TTL_LINE = "entities: [driver]\n    ttl: 2d"
PLAIN_VIEW = """
entities:
  - {name: driver, join_keys: [driver_id]}
feature_views:
  - {name: fares, entities: [driver], source: trips, timestamp: event_ts,
     features: [{name: fare, type: float64}]}
feature_services:
  - {name: weekly, features: ["fares:fare"]}
"""


def test_zoned_source_times_materialize_and_mixed_format_entity_times_are_refused(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.online import get_online_features, materialize

    zoned = [(1, "2026-01-01 10:00:00+02:00", 1.5), (1, "2026-01-01 09:30:00+00:00", 2.5)]
    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", zoned), "trips")
    features.apply(app, _defs(tmp_path, PLAIN_VIEW))
    materialize(app, end="2026-02-01T00:00:00")
    got = get_online_features(app, "weekly", {"driver_id": [1]}, now=T0.timestamp())
    assert got["results"][1]["values"] == [2.5]  # 09:30 UTC is later than 10:00+02 = 08:00 UTC
    assert got["results"][1]["event_timestamps"] == ["2026-01-01T09:30:00+00:00"]
    mixed = _csv(
        tmp_path, "mixed", "driver_id,event_ts", [(1, "2026-01-02 10:00"), (1, "01/02/2026")]
    )
    datasets.import_csv(app, mixed, "mixed")
    with pytest.raises(InvalidInput, match="column 'event_ts' row 2: '01/02/2026' is not an ISO"):
        features.training_set(app, "weekly", "mixed", "never")
    with pytest.raises(Exception, match="never"):
        datasets.get_dataset_version(app, "never")


# ---- a feature service from training to serving --------------------------------------------
SERVICE_DEFS = """
entities:
  - {name: driver, join_keys: [driver_id]}
  - {name: trip_count, join_keys: [trips]}
feature_views:
  - name: driver_stats
    entities: [driver]
    source: stats
    timestamp: event_ts
    ttl: 1000d
    features:
      - {name: conv_rate, type: float64}
      - {name: trips, type: int64}
  - {name: by_trips, entities: [trip_count], source: stats, timestamp: event_ts,
     features: [{name: conv_rate, type: float64}]}
feature_services:
  - {name: driver_model, features: ["driver_stats:conv_rate", "driver_stats:trips"]}
  - {name: rate_only, features: ["driver_stats:conv_rate"]}
  - {name: by_trips, features: ["by_trips:conv_rate"]}
"""


def _post(url: str, payload: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@pytest.mark.slow
def test_a_model_trained_on_a_training_set_is_served_from_entity_keys(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core import deployments, jobs, registry, training
    from appliance.core.inference import ModelRuntime
    from appliance.core.online import materialize

    rng = random.Random(3)
    stats, rides = [], []
    for driver in range(1, 41):
        for hour in range(0, 48, 6):
            rate = round(rng.random(), 3)
            stats.append((driver, T0 + timedelta(hours=hour), rate, rng.randrange(50)))
    for _ in range(600):
        driver, when = rng.randrange(1, 41), T0 + timedelta(minutes=rng.randrange(60, 48 * 60))
        rides.append((driver, when, int(rng.random() < 0.5)))
    header = "driver_id,event_ts,conv_rate,trips"
    datasets.import_csv(app, _csv(tmp_path, "stats", header, stats), "stats")
    datasets.import_csv(app, _csv(tmp_path, "rides", "driver_id,event_ts,label", rides), "rides")
    features.apply(app, _defs(tmp_path, SERVICE_DEFS))
    built = features.training_set(app, "driver_model", "rides", "rides_train")

    job = training.submit_training(
        app, built["ref"], "label", params={"num_boost_round": 5, "num_leaves": 4}
    )
    finished = jobs.wait_job(app, job["id"], timeout=120)
    assert finished["state"] == "succeeded", finished
    mv = registry.register_model(app, "drivers", finished["run_id"])
    assert mv["feature_service"] == "driver_model@1"
    # the keys and the timestamp joined the rows; the service's features are the inputs
    assert [f["name"] for f in mv["signature"]["signature"]] == ["conv_rate", "trips"]
    assert "feature service: driver_model@1" in registry.model_card(app, mv["ref"])

    materialize(app, end="2026-02-01T00:00:00")
    with pytest.raises(InvalidInput, match="keyed by \\['driver_id'\\]; deployment 'by-trips'"):
        deployments.create_deployment(app, "by-trips", mv["ref"], feature_service="by_trips")
    # keys match: the version is served from the service it was trained with
    other = deployments.create_deployment(
        app, "drivers-rate", mv["ref"], feature_service="rate_only", start=False
    )
    assert other["feature_service"] == "rate_only@1"
    dep = deployments.create_deployment(
        app, "drivers-fs", mv["ref"], feature_service="driver_model"
    )
    try:
        assert dep["feature_service"] == "driver_model@1"
        url = dep["url"]
        status, body = _post(
            url + "/v2/models/drivers/infer",
            {
                "inputs": [
                    {"name": "driver_id", "datatype": "INT64", "shape": [3], "data": [1, 2, 999]}
                ]
            },
        )
        assert status == 200, body
        assert body["parameters"] == {"feature_service": "driver_model@1", "features_missing": 2}
        latest = {d: (r, t) for d, _, r, t in sorted(stats, key=lambda s: s[1])}
        runtime = ModelRuntime(mv, str(app.objects.get_file(mv["sha256"])))
        want = runtime.predict(
            {
                "conv_rate": [latest[1][0], latest[2][0], None],
                "trips": [latest[1][1], latest[2][1], None],
            }
        )
        assert body["outputs"][0]["data"] == pytest.approx(want)
        status, body = _post(url + "/invocations", {"dataframe_records": [{"driver_id": 2}]})
        assert status == 200 and body["predictions"] == pytest.approx(want[1:2])
        status, body = _post(url + "/invocations", {"dataframe_records": [{"driver_id": "x2"}]})
        assert status == 400 and "'driver_id' row 0 is 'x2'" in body["error"]
        csv = urllib.request.Request(
            url + "/invocations", data=b"driver_id\n2\n", headers={"Content-Type": "text/csv"}
        )
        with urllib.request.urlopen(csv, timeout=30) as response:  # CSV cells are text
            assert json.loads(response.read())["predictions"] == pytest.approx(want[1:2])
        status, body = _post(
            url + "/v2/models/drivers/infer",
            {"inputs": [{"name": "driver_id", "datatype": "BYTES", "shape": [1], "data": ["2"]}]},
        )
        assert status == 200 and body["outputs"][0]["data"] == pytest.approx(want[1:2])
        status, body = _post(
            url + "/invocations",
            {"dataframe_split": {"columns": ["driver_id", "conv_rate"], "data": [[2, 0.5]]}},
        )
        assert status == 400 and "takes the entity keys ['driver_id']" in body["error"]
        with urllib.request.urlopen(url + "/v2/models/drivers", timeout=10) as response:
            meta = json.loads(response.read())
        assert meta["inputs"] == [{"name": "driver_id", "datatype": "INT64", "shape": [-1]}]
        with pytest.raises(Conflict, match="keeps the feature service"):
            deployments.deploy_model(app, mv["ref"], "drivers-fs", feature_service="rate_only")
        # a new view version: the deployment's pinned one stays live for materialization
        features.apply(app, _defs(tmp_path, SERVICE_DEFS.replace("1000d", "999d")))
        done = materialize(app, end="2026-02-01T00:00:00")
        assert [r["view"] for r in done] == ["by_trips@1", "driver_stats@1", "driver_stats@2"]
    finally:
        deployments.stop_deployment(app, "drivers-fs")


# ---- definitions that would fail later are refused at apply; a changed source at use ----
def test_apply_refuses_definitions_that_could_never_be_used(app: Appliance, tmp_path: Path) -> None:
    rows = [(1, "k1", T0, 1.5, 0.5)]
    header = "driver_id,code,event_ts,fare,tip"
    datasets.import_csv(app, _csv(tmp_path, "trips", header, rows), "trips")
    base = """
entities:
  - {name: driver, join_keys: [driver_id]}
  - {name: coded, join_keys: [code]}
  - {name: by_fare, join_keys: [fare]}
feature_views:
  - {name: fares, entities: ENTITIES, source: trips, timestamp: event_ts,
     features: [{name: FEATURE, type: float64}]}
  - {name: coded_fares, entities: [coded], source: trips, timestamp: event_ts,
     features: [{name: fare, type: float64}]}
feature_services:
SERVICES
"""

    def defs(entities: str = "[driver]", feature: str = "fare", services: str = "") -> str:
        text = base.replace("ENTITIES", entities).replace("FEATURE", feature)
        return text.replace("SERVICES", services or '  - {name: s, features: ["fares:fare"]}')

    cases = [
        (defs(entities="[]"), "'fares': entities must name at least one entity"),
        (defs(feature="driver_id"), "feature 'driver_id' is a join key"),
        (
            defs(entities="[by_fare]", feature="tip"),
            "join key 'fare' is DOUBLE .* whole numbers or text",
        ),
        (defs(services="  - {name: s, features: []}"), "features must list at least one"),
        (
            defs(services='  - {name: s, features: ["fares:fare", "fares:fare"]}'),
            r"\['fares:fare'\] listed more than once",
        ),
        (
            defs(services='  - {name: s, features: ["fares:fare"]}\n' * 2),
            "feature service 's' is defined twice",
        ),
    ]
    for text, needle in cases:
        with pytest.raises(InvalidInput, match=needle):
            features.apply(app, _defs(tmp_path, text))
    assert features.list_definitions(app) == []
    # one request cannot carry a key that two views type differently
    clash = defs(
        entities="[driver]",
        services='  - {name: s, features: ["fares:fare", "other:fare"], full_feature_names: true}',
    ).replace(
        "  - {name: coded_fares",
        "  - {name: other, entities: [texts], source: texts, timestamp: event_ts,\n"
        "     features: [{name: fare, type: float64}]}\n  - {name: coded_fares",
    )
    clash = clash.replace(
        "  - {name: by_fare", "  - {name: texts, join_keys: [driver_id]}\n  - {name: by_fare"
    )
    texts = _csv(tmp_path, "texts", "driver_id,event_ts,fare", [("d1", T0, 2.0)])
    datasets.import_csv(app, texts, "texts")
    with pytest.raises(
        InvalidInput, match="join key 'driver_id' is integer in view 'fares' but text"
    ):
        features.apply(app, _defs(tmp_path, clash))


def test_a_source_changed_since_apply_is_refused_naming_the_view(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.online import materialize

    header = "driver_id,event_ts,fare"
    datasets.import_csv(app, _csv(tmp_path, "trips", header, TRIPS), "trips")
    features.apply(app, _defs(tmp_path, PLAIN_VIEW))
    asks = _csv(tmp_path, "asks", "driver_id,event_ts", [(1, T0 + timedelta(days=1))])
    datasets.import_csv(app, asks, "asks")
    # the source is re-imported without the feature column
    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,tip", TRIPS), "trips")
    needle = "feature view fares@1: feature 'fare' is not a column of trips@2 .*re-apply"
    with pytest.raises(InvalidInput, match=needle):
        features.training_set(app, "weekly", "asks", "never")
    (run,) = materialize(app)  # every live view: a failing one is reported, not raised
    assert run["rows_written"] is None and re.search(needle, run["error"])
    with pytest.raises(InvalidInput, match=needle):
        materialize(app, view="fares")
    # ... or with its key retyped
    retyped = [(f"d{d}", t, f) for d, t, f in TRIPS]
    datasets.import_csv(app, _csv(tmp_path, "trips", header, retyped), "trips")
    with pytest.raises(InvalidInput, match="join key 'driver_id' was BIGINT when applied"):
        features.view_profile(app, "fares")
    # an entity dataset whose key has another type than the view's
    texts = _csv(tmp_path, "text_asks", "driver_id,event_ts", [("A1", T0)])
    datasets.import_csv(app, texts, "text_asks")
    with pytest.raises(InvalidInput, match="'driver_id' is VARCHAR, but feature view fares@1"):
        features.training_set(app, "weekly", "text_asks", "never")


def test_sql_views_keep_the_file_order_tie_break_when_they_keep_order(
    app: Appliance, tmp_path: Path
) -> None:
    tied = [(1, T0, 10.0), (1, T0, 5.0)]  # same key and time: the later row wins (rule 3)
    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", tied), "trips")
    datasets.import_csv(
        app, _csv(tmp_path, "asks", "driver_id,event_ts", [(1, T0 + timedelta(hours=1))]), "asks"
    )
    kept = PLAIN_VIEW.replace(
        "timestamp: event_ts,",
        'timestamp: event_ts, sql: "SELECT * FROM source",',
    )
    features.apply(app, _defs(tmp_path, kept))
    built = features.training_set(app, "weekly", "asks", "out")
    assert _rows(app, built["ref"], "fare") == [(5.0,)]


def test_freshness_stays_empty_and_big_lookups_are_read_in_chunks(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.online import get_online_features, materialize

    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", TRIPS), "trips")
    features.apply(app, _defs(tmp_path, PLAIN_VIEW))
    for _ in range(2):  # nothing before 2025: no rows, twice
        assert materialize(app, end="2025-01-01T00:00:00")[0]["rows_read"] == 0
    (state,) = features.freshness(app)
    assert state["status"] == "empty" and state["newest_event"] is None
    with pytest.raises(InvalidInput, match="--start with --incremental"):
        materialize(app, start="2026-01-01T00:00:00", incremental=True)
    materialize(app, end="2026-02-01T00:00:00")
    keys = list(range(25_000)) + [1]
    got = get_online_features(app, "weekly", {"driver_id": keys}, now=T0.timestamp())
    values = got["results"][1]["values"]
    assert values[1] == 5.0 and values[2] == 7.0 and values[-1] == 5.0
    assert sum(v is not None for v in values) == 3


def test_removing_a_source_version_keeps_the_store_consistent(
    app: Appliance, tmp_path: Path
) -> None:
    header = "driver_id,event_ts,fare"
    datasets.import_csv(app, _csv(tmp_path, "trips", header, TRIPS), "trips")
    datasets.import_csv(app, _csv(tmp_path, "trips", header, TRIPS[:2]), "trips")
    pinned = PLAIN_VIEW.replace("source: trips,", "source: trips@1,")
    features.apply(app, _defs(tmp_path, pinned))
    assert "feature-view:fares@1" in datasets.dependents(app, "trips@1")
    features.view_profile(app, "fares")  # a profile row refers to trips@1
    datasets.remove_version(app, "trips@1", force=True)
    with pytest.raises(Exception, match="trips@1"):
        datasets.get_dataset_version(app, "trips@1")


def test_nan_values_read_back_as_null_and_profile_without_breaking(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.online import get_online_features, materialize

    rows = [(1, T0, "nan"), (2, T0, "inf"), (3, T0, 2.5)]
    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", rows), "trips")
    applied = features.apply(app, _defs(tmp_path, PLAIN_VIEW))
    assert "profile_error" not in applied[1]
    fare = next(c for c in features.view_profile(app, "fares")["columns"] if c["name"] == "fare")
    assert (fare["min"], fare["max"], fare["nulls"]) == (2.5, 2.5, 0)
    assert fare["histogram"]["counts"] == [1]  # only the finite value
    from appliance.core.profiles import profile

    by_label = profile(app, "trips@1", label="driver_id")  # binning leaves NaN and inf out
    assert next(c for c in by_label["columns"] if c["name"] == "fare")["vs_label"]
    materialize(app, end="2026-02-01T00:00:00")
    got = get_online_features(app, "weekly", {"driver_id": [1, 2, 3]}, now=T0.timestamp())
    assert got["results"][1]["values"] == [None, None, 2.5]
    assert got["results"][1]["statuses"] == ["NULL_VALUE", "NULL_VALUE", "PRESENT"]


def test_typed_keys_reach_the_model_and_bad_text_is_named(app: Appliance, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from appliance.core.inference import RequestError
    from appliance.core.online import FeatureLookup, entities_from_text, materialize
    from appliance.core.serving import EntityInputs

    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", TRIPS), "trips")
    features.apply(app, _defs(tmp_path, PLAIN_VIEW))
    materialize(app, end="2026-02-01T00:00:00")
    inputs = EntityInputs(FeatureLookup(app, "weekly"))
    model = SimpleNamespace(feature_names=["driver_id", "fare"])  # a join key as an input
    columns, missing = inputs.columns(model, {"driver_id": ["2", " 1 "]})  # as CSV gives them
    assert columns == {"driver_id": [2, 1], "fare": [7.0, 5.0]} and missing == 0
    for text in ("+-5", "²", "1.5"):
        with pytest.raises(RequestError, match="'driver_id' row 0 is"):
            inputs.columns(model, {"driver_id": [text]})
        with pytest.raises(InvalidInput, match=re.escape(f"{text!r} is not a whole number")):
            entities_from_text(app, "weekly", {"driver_id": text})


def test_materialize_goes_on_past_a_broken_view_and_sources_are_guarded(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.online import materialize

    header = "driver_id,event_ts,fare"
    datasets.import_csv(app, _csv(tmp_path, "trips", header, TRIPS), "trips")
    datasets.import_csv(app, _csv(tmp_path, "tips", header, TRIPS), "tips")
    two = PLAIN_VIEW.replace(
        "feature_services:",
        "  - {name: tipping, entities: [driver], source: tips, timestamp: event_ts,\n"
        "     features: [{name: fare, type: float64}]}\nfeature_services:",
    )
    features.apply(app, _defs(tmp_path, two))
    assert "feature-view:fares@1" in datasets.dependents(app, "trips@1")  # follows the latest
    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,tip", TRIPS), "trips")
    runs = {r["view"]: r for r in materialize(app, end="2026-02-01T00:00:00")}
    assert "feature 'fare' is not a column of trips@2" in runs["fares@1"]["error"]
    assert runs["tipping@1"]["error"] is None and runs["tipping@1"]["rows_written"] == 2
    datasets.remove_version(app, "tips@1", force=True)
    with pytest.raises(Exception, match="feature view tipping@1: its source is gone"):
        materialize(app, view="tipping")
    reserved = _csv(tmp_path, "odd", "driver_id,event_ts,file_row_number", [(1, T0, 3)])
    datasets.import_csv(app, reserved, "odd")
    odd = PLAIN_VIEW.replace("source: trips,", "source: odd,").replace("name: fare,", "name: x,")
    with pytest.raises(InvalidInput, match="column 'file_row_number' of odd@1 has a name"):
        features.apply(app, _defs(tmp_path, odd))


def test_a_rebuilt_identical_training_set_names_the_service_that_built_it(
    app: Appliance, tmp_path: Path
) -> None:
    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", TRIPS), "trips")
    asks = _csv(tmp_path, "asks", "driver_id,event_ts", [(1, T0 + timedelta(hours=1))])
    datasets.import_csv(app, asks, "asks")
    features.apply(app, _defs(tmp_path, PLAIN_VIEW))
    first = features.training_set(app, "weekly", "asks", "out")
    features.apply(
        app,
        _defs(
            tmp_path, PLAIN_VIEW.replace("timestamp: event_ts,", "timestamp: event_ts, ttl: 30d,")
        ),
    )
    again = features.training_set(app, "weekly", "asks", "out")
    assert again["ref"] == first["ref"] and again["created"] is False  # the same bytes
    assert features.training_set_service(app, first["ref"]) == "weekly@2"


def test_a_sql_view_that_fails_on_its_data_is_named_and_the_others_go_on(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.online import materialize

    rows = [(1, T0, "7"), (2, T0, "x")]  # text that one row cannot be cast from
    datasets.import_csv(app, _csv(tmp_path, "trips", "driver_id,event_ts,fare", rows), "trips")
    datasets.import_csv(app, _csv(tmp_path, "tips", "driver_id,event_ts,fare", TRIPS), "tips")
    text = PLAIN_VIEW.replace(
        "timestamp: event_ts,",
        'timestamp: event_ts, sql: "SELECT driver_id, event_ts, CAST(fare AS DOUBLE) AS fare '
        'FROM source",',
    ).replace(
        "feature_services:",
        "  - {name: tipping, entities: [driver], source: tips, timestamp: event_ts,\n"
        "     features: [{name: fare, type: float64}]}\nfeature_services:",
    )
    applied = {r["name"]: r for r in features.apply(app, _defs(tmp_path, text))}
    assert "fares@1: Conversion Error" in applied["fares"]["profile_error"]
    runs = {r["view"]: r for r in materialize(app, end="2026-02-01T00:00:00")}
    assert runs["fares@1"]["error"].startswith("feature view fares@1: Conversion Error")
    assert runs["tipping@1"]["rows_written"] == 2
    asks = _csv(tmp_path, "asks", "driver_id,event_ts", [(1, T0 + timedelta(hours=1))])
    datasets.import_csv(app, asks, "asks")
    with pytest.raises(InvalidInput, match="training set of weekly@1: Conversion Error"):
        features.training_set(app, "weekly", "asks", "never")
    with pytest.raises(InvalidInput, match="not a whole number"):
        from appliance.core.online import entities_from_text

        entities_from_text(app, "weekly", {"driver_id": "9" * 30})
