"""Feature store speed against same-run baselines.

    .venv/bin/python benchmarks/features.py [--keys 10000] [--times 100] [--entities 100000]
                                            [--repeat 3]

Data: KEYS entities x TIMES event times (1,000,000 feature rows by default) with 5 float
features and a created time; ENTITIES entity rows at random times; ttl 1 day. One run measures:
  1. the training set (point-in-time join written as a dataset version) vs pandas
     `merge_asof` on the same data, which must give identical values (by event time, the
     semantics merge_asof has; as of known time is timed too); each the median of REPEAT runs;
  2. materializing the whole range into the online store;
  3. online lookups in process: 1 entity (p50/p99 over 2,000 calls) and 100 entities per call;
  4. the same single-entity lookup over HTTP against `appliance features serve`;
  5. a model trained on the training set, deployed with its feature service: in-process
     predict with features given (the baseline), lookup + predict, and keys-only V2 requests.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from http.client import HTTPConnection
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFINITIONS = """
entities:
  - {name: key, join_keys: [k]}
feature_views:
  - name: stats
    entities: [key]
    source: stats
    timestamp: ts
    created_timestamp: created
    ttl: 1d
    features:
      - {name: f1, type: float64}
      - {name: f2, type: float64}
      - {name: f3, type: float64}
      - {name: f4, type: float64}
      - {name: f5, type: float64}
feature_services:
  - {name: model, features: ["stats:f1", "stats:f2", "stats:f3", "stats:f4", "stats:f5"]}
"""


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--keys", type=int, default=10_000)
    parser.add_argument("--times", type=int, default=100)
    parser.add_argument("--entities", type=int, default=100_000)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3, help="Training-set runs (median).")
    args = parser.parse_args()

    import duckdb
    import pandas as pd

    from appliance.core import datasets, features
    from appliance.core.context import Appliance
    from appliance.core.online import get_online_features, materialize
    from tests.clients import feature_server

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        con = duckdb.connect()
        # hourly event times over TIMES hours; created a minute later; one row per (k, ts)
        con.execute(
            f"COPY (SELECT k, TIMESTAMP '2026-01-01' + INTERVAL (t * 3600) SECOND AS ts, "
            f"TIMESTAMP '2026-01-01' + INTERVAL (t * 3600 + 60) SECOND AS created, "
            f"random() AS f1, random() AS f2, random() AS f3, random() AS f4, random() AS f5 "
            f"FROM range({args.keys}) a(k), range({args.times}) b(t) ORDER BY t, k) "
            f"TO '{tmp_path / 'stats.parquet'}' (FORMAT parquet)"
        )
        con.execute(
            f"COPY (SELECT (random() * {args.keys})::BIGINT % {args.keys} AS k, "
            f"TIMESTAMP '2026-01-01' + INTERVAL ((random() * {args.times} * 3600)::BIGINT) "
            f"SECOND AS event_ts, (random() > 0.5)::INTEGER AS label "
            f"FROM range({args.entities})) TO '{tmp_path / 'rides.parquet'}' (FORMAT parquet)"
        )
        app = Appliance.open(tmp_path / "home")
        datasets.import_data(app, "stats", tmp_path / "stats.parquet")
        datasets.import_data(app, "rides", tmp_path / "rides.parquet")
        (tmp_path / "defs").mkdir()
        (tmp_path / "defs" / "features.yaml").write_text(DEFINITIONS)
        features.apply(app, tmp_path / "defs")
        feature_rows = args.keys * args.times

        def timed(build: Any) -> tuple[Any, float]:
            # the median of REPEAT runs, each from files on disk to a result
            times, result = [], None
            for _ in range(args.repeat):
                started = time.perf_counter()
                result = build()
                times.append(time.perf_counter() - started)
            return result, statistics.median(times)

        ours, ours_s = timed(
            lambda: features.training_set(app, "model", "rides", "train", as_of_known_time=False)
        )
        _, known_s = timed(
            lambda: features.training_set(app, "model", "rides", "train", as_of_known_time=True)
        )

        def merge_asof() -> Any:
            left = pd.read_parquet(tmp_path / "rides.parquet")
            right = pd.read_parquet(tmp_path / "stats.parquet").drop(columns=["created"])
            left["__row"] = range(len(left))
            return pd.merge_asof(
                left.sort_values("event_ts"),
                right.sort_values("ts"),
                left_on="event_ts",
                right_on="ts",
                by="k",
                tolerance=pd.Timedelta("1D"),
                direction="backward",
                allow_exact_matches=True,
            ).sort_values("__row")

        reference, pandas_s = timed(merge_asof)
        path = app.objects.get_file(datasets.get_dataset_version(app, ours["ref"])["sha256"])
        got = con.execute(f"SELECT f1, f2, f3, f4, f5 FROM read_parquet('{path}')").fetchdf()
        want = reference[["f1", "f2", "f3", "f4", "f5"]].reset_index(drop=True)
        identical = got.equals(want) or bool(
            ((got - want).abs().fillna(0).max().max() == 0)
            and (got.isna().values == want.isna().values).all()
        )

        started = time.perf_counter()
        materialize(app)
        materialize_s = time.perf_counter() - started

        get_online_features(app, "model", {"k": [1]})
        one, hundred = [], []
        for i in range(args.calls):
            started = time.perf_counter()
            get_online_features(app, "model", {"k": [i % args.keys]})
            one.append(time.perf_counter() - started)
        for i in range(max(1, args.calls // 10)):
            keys = [(i * 100 + j) % args.keys for j in range(100)]
            started = time.perf_counter()
            get_online_features(app, "model", {"k": keys})
            hundred.append(time.perf_counter() - started)

        over_http: list[float] = []
        with feature_server(app.settings.home) as url:
            conn = HTTPConnection("127.0.0.1", int(url.rsplit(":", 1)[1]), timeout=10)
            for i in range(args.calls):
                body = json.dumps({"feature_service": "model", "entities": {"k": [i % args.keys]}})
                started = time.perf_counter()
                conn.request("POST", "/get-online-features", body=body)
                response = conn.getresponse()
                response.read()
                over_http.append(time.perf_counter() - started)
                assert response.status == 200
            conn.close()

        # a model trained on the training set, served with its feature service: keys in
        from appliance.core import deployments, jobs, registry, training
        from appliance.core.agent import stop_agent
        from appliance.core.inference import ModelRuntime
        from appliance.core.online import FeatureLookup
        from appliance.core.serving import EntityInputs

        job = training.submit_training(
            app, "train", "label", params={"num_boost_round": 20, "num_leaves": 15}
        )
        job = jobs.wait_job(app, job["id"], timeout=600)
        mv = registry.register_model(app, "bench_features", job["run_id"])
        runtime = ModelRuntime(mv, str(app.objects.get_file(mv["sha256"])))
        inputs = EntityInputs(FeatureLookup(app, mv["feature_service"]))
        given = {f: [0.5] for f in runtime.feature_names}
        bare, looked_up, served = [], [], []
        for i in range(args.calls):
            started = time.perf_counter()
            runtime.predict(given)  # the baseline: features handed in
            bare.append(time.perf_counter() - started)
            started = time.perf_counter()
            runtime.predict(inputs.columns(runtime, {"k": [i % args.keys]})[0])
            looked_up.append(time.perf_counter() - started)
        dep = deployments.create_deployment(
            app, "bench-features", mv["ref"], feature_service=mv["feature_service"]
        )
        try:
            conn = HTTPConnection("127.0.0.1", int(dep["port"]), timeout=10)
            path = f"/v2/models/{mv['model']}/infer"
            for i in range(args.calls):
                key = {"name": "k", "datatype": "INT64", "shape": [1], "data": [i % args.keys]}
                body = json.dumps({"inputs": [key]})
                started = time.perf_counter()
                conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
                response = conn.getresponse()
                response.read()
                served.append(time.perf_counter() - started)
                assert response.status == 200
            conn.close()
        finally:
            deployments.stop_deployment(app, "bench-features")
            stop_agent(app)  # the home is about to be deleted
        app.close()

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.3f} ms"

    print(f"\n{feature_rows:,} feature rows, {args.entities:,} entity rows, ttl 1 day")
    print(
        f"training set   {ours_s:.2f} s = {args.entities / ours_s:,.0f} entity rows/s "
        f"(as of known time: {known_s:.2f} s = {args.entities / known_s:,.0f} rows/s)"
    )
    print(
        f"pandas         merge_asof {pandas_s:.2f} s = {args.entities / pandas_s:,.0f} rows/s; "
        f"ours/pandas speed {pandas_s / ours_s:.2f}x; identical values: {identical}"
    )
    print(f"materialize    {materialize_s:.2f} s ({args.keys:,} keys)")
    print(
        f"online, in process: 1 entity p50 {ms(statistics.median(one))} p99 "
        f"{ms(percentile(one, 0.99))}; 100 entities p50 {ms(statistics.median(hundred))} "
        f"p99 {ms(percentile(hundred, 0.99))}"
    )
    print(
        f"online, HTTP:       1 entity p50 {ms(statistics.median(over_http))} "
        f"p99 {ms(percentile(over_http, 0.99))}"
    )
    print(
        f"model with its feature service, 1 entity: in-process predict with features given "
        f"p50 {ms(statistics.median(bare))} p99 {ms(percentile(bare, 0.99))}; lookup + predict "
        f"p50 {ms(statistics.median(looked_up))} p99 {ms(percentile(looked_up, 0.99))}; "
        f"over HTTP (keys only) p50 {ms(statistics.median(served))} "
        f"p99 {ms(percentile(served, 0.99))}"
    )
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
