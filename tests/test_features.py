"""Feature definitions (apply, versions, checks) and point-in-time training sets written as
dataset versions, on real files."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.core import datasets, features
from appliance.core.context import Appliance
from appliance.errors import InvalidInput, NotFound

STATS = """driver_id,event_ts,created_ts,conv_rate,trips
1,2026-01-01 09:00:00,2026-01-01 09:00:00,0.1,10
1,2026-01-01 10:00:00,2026-01-01 12:00:00,0.2,20
2,2026-01-01 09:30:00,2026-01-01 09:30:00,0.5,5
"""
ENTITIES = """driver_id,event_ts,label
1,2026-01-01 11:00:00,1
1,2026-01-01 08:00:00,0
2,2026-01-01 13:00:00,1
3,2026-01-01 11:00:00,0
1,2026-01-01 11:00:00,1
"""
DEFINITIONS = """
entities:
  - {name: driver, join_keys: [driver_id]}
feature_views:
  - name: driver_stats
    entities: [driver]
    source: driver_stats
    timestamp: event_ts
    created_timestamp: created_ts
    ttl: TTL
    features:
      - {name: conv_rate, type: float64, description: share of accepted rides}
      - {name: trips, type: int64}
feature_services:
  - {name: driver_model, features: ["driver_stats:conv_rate", "driver_stats:trips"]}
"""


@pytest.fixture
def app(tmp_path: Path) -> Appliance:
    appliance = Appliance.open(tmp_path / "home")
    for name, text in (("driver_stats", STATS), ("rides", ENTITIES)):
        path = tmp_path / f"{name}.csv"
        path.write_text(text)
        datasets.import_csv(appliance, path, name)
    return appliance


def write(tmp_path: Path, text: str, ttl: str = "3h") -> Path:
    folder = tmp_path / "defs"
    folder.mkdir(exist_ok=True)
    (folder / "features.yaml").write_text(text.replace("TTL", ttl))
    return folder


def test_apply_registers_versions_and_an_unchanged_apply_is_a_no_op(
    app: Appliance, tmp_path: Path
) -> None:
    first = features.apply(app, write(tmp_path, DEFINITIONS))
    assert [(r["kind"], r["name"], r["version"], r["created"]) for r in first] == [
        ("entity", "driver", 1, True),
        ("view", "driver_stats", 1, True),
        ("service", "driver_model", 1, True),
    ]
    again = features.apply(app, write(tmp_path, DEFINITIONS))
    assert [r["created"] for r in again] == [False, False, False]
    changed = features.apply(app, write(tmp_path, DEFINITIONS, ttl="1h"))
    assert [(r["name"], r["version"], r["created"]) for r in changed] == [
        ("driver", 1, False),
        ("driver_stats", 2, True),
        ("driver_model", 2, True),  # it pins the view's version, so it moves too
    ]
    old = features.get_definition(app, "service", "driver_model@1")
    assert old["features"][0] == {"view": "driver_stats", "view_version": 1, "feature": "conv_rate"}
    view = features.get_definition(app, "view", "driver_stats")
    assert view["ttl_seconds"] == 3600 and view["features"][0]["description"]


def _values(app: Appliance, ref: str) -> list[tuple]:
    import duckdb

    version = datasets.get_dataset_version(app, ref)
    path = str(app.objects.get_file(version["sha256"]))
    return duckdb.sql(
        f"SELECT driver_id, label, conv_rate, trips FROM read_parquet('{path}')"
    ).fetchall()


def test_a_training_set_is_point_in_time_correct_and_a_new_dataset_version(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.lineage import lineage

    features.apply(app, write(tmp_path, DEFINITIONS))
    known = features.training_set(app, "driver_model", "rides", "train_set")
    assert known["ref"] == "train_set@1" and known["row_count"] == 5
    # 11:00 for driver 1: the 10:00 row was written at 12:00, so 09:00's value is what was known
    assert _values(app, "train_set@1") == [
        (1, 1, 0.1, 10),
        (1, 0, None, None),  # nothing yet at 08:00
        (2, 1, None, None),  # 09:30 is more than the 3 h ttl before 13:00
        (3, 0, None, None),  # no such driver
        (1, 1, 0.1, 10),  # duplicates kept
    ]
    leaky = features.training_set(app, "driver_model", "rides", "train_set", as_of_known_time=False)
    assert leaky["ref"] == "train_set@2"
    assert _values(app, "train_set@2")[0] == (1, 1, 0.2, 20)
    upstream = str(lineage(app, "dataset:train_set@1")["upstream"])
    for expected in ("dataset:rides@1", "feature-view:driver_stats@1", "dataset:driver_stats@1"):
        assert expected in upstream


def test_bad_definitions_name_what_is_wrong_and_register_nothing(
    app: Appliance, tmp_path: Path
) -> None:
    cases = [
        (DEFINITIONS.replace("timestamp: event_ts", "timestamp: when"), "timestamp column 'when'"),
        (DEFINITIONS.replace("type: int64", "type: float64"), "'trips' is declared float64"),
        (DEFINITIONS.replace("join_keys: [driver_id]", "join_keys: [car_id]"), "join key 'car_id'"),
        (DEFINITIONS.replace("source: driver_stats", "source: nowhere"), "nowhere"),
        (DEFINITIONS.replace("entities: [driver]", "entities: [rider]"), "unknown entity 'rider'"),
        (DEFINITIONS.replace("driver_stats:trips", "driver_stats:speed"), "no feature 'speed'"),
        (DEFINITIONS.replace("type: int64", "type: int128"), "type 'int128'"),
    ]
    for text, needle in cases:
        with pytest.raises((InvalidInput, NotFound), match=needle):
            features.apply(app, write(tmp_path, text))
    with pytest.raises(InvalidInput, match="ttl"):
        features.apply(app, write(tmp_path, DEFINITIONS, ttl="soon"))
    twice = (
        DEFINITIONS
        + """  - {name: other, features: ["driver_stats:trips", "copy:trips"]}
"""
    )
    twice = twice.replace(
        "feature_services:",
        """  - name: copy
    entities: [driver]
    source: driver_stats
    timestamp: event_ts
    features:
      - {name: trips, type: int64}
feature_services:""",
    )
    with pytest.raises(InvalidInput, match=r"\['trips'\] come from more than one view"):
        features.apply(app, write(tmp_path, twice))
    assert features.list_definitions(app) == []  # nothing registered half
    fixed = twice.replace(
        '["driver_stats:trips", "copy:trips"]}',
        '["driver_stats:trips", "copy:trips"], full_feature_names: true}',
    )
    assert len(features.apply(app, write(tmp_path, fixed))) == 5


def test_training_set_input_errors_name_the_column(app: Appliance, tmp_path: Path) -> None:
    features.apply(app, write(tmp_path, DEFINITIONS))
    with pytest.raises(InvalidInput, match="entity dataset: no column 'ts'"):
        features.training_set(app, "driver_model", "rides", "t", timestamp_col="ts")
    keyless = tmp_path / "keyless.csv"
    keyless.write_text("rider_id,event_ts\n1,2026-01-01 11:00:00\n")
    datasets.import_csv(app, keyless, "keyless")
    with pytest.raises(InvalidInput, match="no join key 'driver_id'"):
        features.training_set(app, "driver_model", "keyless", "t")
    with pytest.raises(NotFound, match="feature service 'nope' not found"):
        features.training_set(app, "nope", "rides", "t")


def test_cli_apply_and_training_set(cli, app: Appliance, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    home = ["--home", str(app.settings.home)]
    applied = cli("features", "apply", str(write(tmp_path, DEFINITIONS)), "--json", *home)
    assert applied.code == 0, applied.err
    built = cli(
        "features",
        "training-set",
        "--service",
        "driver_model",
        "--entities",
        "rides",
        "--out",
        "train_set",
        "--json",
        *home,
    )
    assert built.code == 0, built.err and built.json()["ref"] == "train_set@1"
    listed = cli("features", "list", *home)
    assert "driver_model" in listed.out and "driver_stats" in listed.out


def test_materialize_never_overwrites_newer_values_and_reruns_change_nothing(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.online import get_online_features, materialize

    features.apply(app, write(tmp_path, DEFINITIONS, ttl="1000d"))
    newer = materialize(app, end="2026-01-01T10:30:00")
    assert newer[0]["rows_written"] == 2  # drivers 1 (10:00) and 2 (09:30)
    older = materialize(app, end="2026-01-01T09:15:00")  # only driver 1's 09:00 row
    assert (older[0]["rows_read"], older[0]["rows_written"]) == (1, 0)  # 10:00 stays
    got = get_online_features(app, "driver_model", {"driver_id": [1, 2, 3]})
    assert got["metadata"]["feature_names"] == ["driver_id", "conv_rate", "trips"]
    assert got["results"][0]["values"] == [1, 2, 3]
    assert got["results"][1]["values"] == [0.2, 0.5, None]  # 10:00 kept over the older 09:00
    assert got["results"][1]["statuses"] == ["PRESENT", "PRESENT", "NOT_FOUND"]
    assert got["results"][2]["values"] == [20, 5, None]
    again = materialize(app, end="2026-01-01T10:30:00")
    assert (again[0]["rows_read"], again[0]["rows_written"]) == (2, 0)
    assert get_online_features(app, "driver_model", {"driver_id": [1, 2, 3]}) == got


def test_incremental_runs_pick_up_late_rows_within_the_lookback(
    app: Appliance, tmp_path: Path
) -> None:
    from appliance.core.online import get_online_features, materialize

    features.apply(app, write(tmp_path, DEFINITIONS, ttl="1000d"))
    materialize(app, end="2026-01-01T12:00:00")
    late = tmp_path / "late.csv"  # a row for 11:00 that arrives after the run that ended at 12:00
    late.write_text(STATS + "2,2026-01-01 11:00:00,2026-01-01 13:00:00,0.9,9\n")
    datasets.import_csv(app, late, "driver_stats")  # the view follows the latest version
    runs = materialize(app, incremental=True, lookback_seconds=3 * 3600)
    assert runs[0]["start"].startswith("2026-01-01T09:00:00")  # 12:00 minus the lookback
    got = get_online_features(app, "driver_model", {"driver_id": [2]})
    assert got["results"][1]["values"] == [0.9]


def test_online_reads_enforce_the_ttl_and_check_the_request(app: Appliance, tmp_path: Path) -> None:
    from datetime import UTC, datetime

    from appliance.core.online import get_online_features, materialize

    features.apply(app, write(tmp_path, DEFINITIONS, ttl="1h"))
    materialize(app, end="2026-01-01T12:00:00")
    at_1030 = datetime(2026, 1, 1, 10, 30, tzinfo=UTC).timestamp()
    fresh = get_online_features(app, "driver_model", {"driver_id": [1, 2]}, now=at_1030)
    assert fresh["results"][1]["statuses"] == ["PRESENT", "PRESENT"]
    rows = [{"driver_id": 1}, {"driver_id": 2}]  # Feast's entity_rows give the same answer
    assert get_online_features(app, "driver_model", rows, now=at_1030) == fresh
    with pytest.raises(InvalidInput, match=r"entity_rows\[1\]: keys \['rider'\]"):
        get_online_features(app, "driver_model", [{"driver_id": 1}, {"rider": 2}])
    later = get_online_features(app, "driver_model", {"driver_id": [1, 2]}, now=at_1030 + 3600)
    assert later["results"][1]["statuses"] == ["OUTSIDE_MAX_AGE", "OUTSIDE_MAX_AGE"]
    assert later["results"][1]["values"] == [None, None]
    with pytest.raises(InvalidInput, match="'driver_id' row 0 is '1', but view 'driver_stats'"):
        get_online_features(app, "driver_model", {"driver_id": ["1"]})
    with pytest.raises(InvalidInput, match="'rider_id' is not a join key of driver_model@1"):
        get_online_features(app, "driver_model", {"rider_id": [1]})
    with pytest.raises(InvalidInput, match="'driver_id' row 0 is 1180591620717411303424, but"):
        get_online_features(app, "driver_model", {"driver_id": [2**70]})
    with pytest.raises(InvalidInput, match="expected {key column"):
        get_online_features(app, "driver_model", {})
    with pytest.raises(NotFound, match="feature service 'nope'"):
        get_online_features(app, "nope", {"driver_id": [1]})


def test_materializing_before_any_apply_is_refused(app: Appliance) -> None:
    from appliance.core.online import materialize

    with pytest.raises(InvalidInput, match="no feature views applied yet"):
        materialize(app)
    with pytest.raises(NotFound, match="feature view 'ghost' not found"):
        materialize(app, view="ghost")


def test_the_feature_server_answers_feast_requests_over_http(
    app: Appliance, tmp_path: Path
) -> None:
    import json
    import urllib.error
    import urllib.request

    from appliance.core.online import materialize
    from tests.clients import feature_server

    features.apply(app, write(tmp_path, DEFINITIONS, ttl="1000d"))
    materialize(app, end="2026-01-01T12:00:00")
    with feature_server(app.settings.home) as url:

        def post(payload: object) -> tuple[int, dict]:
            request = urllib.request.Request(
                url + "/get-online-features", data=json.dumps(payload).encode(), method="POST"
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    return response.status, json.loads(response.read())
            except urllib.error.HTTPError as exc:
                return exc.code, json.loads(exc.read())

        entities = {"driver_id": [2, 1]}
        status, body = post({"feature_service": "driver_model", "entities": entities})
        assert status == 200
        assert body["metadata"]["feature_names"] == ["driver_id", "conv_rate", "trips"]
        assert body["results"][1]["values"] == [0.5, 0.2]
        assert body["results"][1]["statuses"] == ["PRESENT", "PRESENT"]
        assert post({"feature_service": "nope", "entities": {"driver_id": [1]}})[0] == 404
        status, body = post({"feature_service": "driver_model", "entities": {"driver_id": ["x"]}})
        assert status == 400 and "driver_id" in body["error"]
        assert post({"entities": {}})[0] == 400
        with urllib.request.urlopen(url + "/metrics", timeout=10) as response:
            assert 'code="200"' in response.read().decode()
