"""Quickstart phases timed, with same-run baselines.

    .venv/bin/python benchmarks/quickstart_phases.py [--requests 300]

Prints one table: each quickstart phase in seconds, then two ratios against baselines measured
in the same run: executor training vs bare in-process LightGBM on the same data and params,
and one-row HTTP V2 prediction latency vs in-process `Booster.predict` on the same row.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import urllib.request
from pathlib import Path

from appliance.core import deployments, registry
from appliance.core.context import Appliance
from appliance.core.inference import ModelRuntime
from appliance.core.quickstart import VARIANTS, run_quickstart, sample_csv, sample_rows
from appliance.core.training import DEFAULT_PARAMS


def bare_lightgbm_seconds() -> float:
    """Both quickstart variants trained in-process, sequentially, from the CSV (no executor)."""
    import duckdb
    import lightgbm as lgb
    import numpy as np

    start = time.perf_counter()
    data = duckdb.sql(f"SELECT * FROM read_csv('{sample_csv()}')").fetchnumpy()
    target = data.pop("churned").astype(np.float64)
    columns = []
    for values in data.values():
        if values.dtype.kind in "iuf":
            columns.append(values.astype(np.float64))
        else:
            cats = {c: i for i, c in enumerate(sorted(set(values)))}
            columns.append(np.array([cats[v] for v in values], dtype=np.float64))
    x = np.column_stack(columns)
    for variant in VARIANTS:
        params = {**DEFAULT_PARAMS, **variant}
        rounds = params.pop("num_boost_round")
        params.pop("early_stopping_rounds")
        params.update(objective="binary", verbosity=-1, num_threads=1)
        lgb.train(params, lgb.Dataset(x, target), num_boost_round=rounds)
    return time.perf_counter() - start


def http_latencies(url: str, features: list[str], row: list, n: int) -> list[float]:
    inputs = [
        {
            "name": f,
            "shape": [1],
            "datatype": "BYTES" if isinstance(v, str) else "FP64",
            "data": [v],
        }
        for f, v in zip(features, row, strict=True)
    ]
    body = json.dumps({"inputs": inputs}).encode()
    out = []
    for _ in range(n):
        request = urllib.request.Request(
            f"{url}/v2/models/churn/infer", data=body, headers={"Content-Type": "application/json"}
        )
        start = time.perf_counter()
        with urllib.request.urlopen(request, timeout=10) as response:
            response.read()
        out.append(time.perf_counter() - start)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        app = Appliance.open(Path(tmp) / "home")
        wall = time.perf_counter()
        summary = run_quickstart(app, keep_serving=True)
        wall = time.perf_counter() - wall
        try:
            features, rows = sample_rows(1)
            http = http_latencies(summary["url"], features, rows[0], args.requests)
            mv = registry.get_model_version(app, "churn@1")
            runtime = ModelRuntime(mv, str(app.objects.get_file(mv["sha256"])))
            columns = {f: [v] for f, v in zip(features, rows[0], strict=True)}
            local = []
            for _ in range(args.requests):
                start = time.perf_counter()
                runtime.predict(columns)
                local.append(time.perf_counter() - start)
            bare_raw = []
            matrix = runtime.matrix(columns)
            for _ in range(args.requests):
                start = time.perf_counter()
                runtime.booster.predict(matrix)
                bare_raw.append(time.perf_counter() - start)
        finally:
            deployments.stop_deployment(app, "churn")
            app.close()
    bare = bare_lightgbm_seconds()
    timings = summary["timings"]
    print(f"{'phase':<28}{'seconds':>10}")
    for label in ("import", "train", "register", "serve-ready", "predict", "deploy", "rollback"):
        print(f"{label:<28}{timings[label]:>10.3f}")
    print(f"{'quickstart total (wall)':<28}{wall:>10.3f}")
    print()
    p50 = statistics.median
    print(f"{'baseline / ratio':<28}{'value':>10}")
    print(f"{'bare lightgbm (2 models) s':<28}{bare:>10.3f}")
    print(f"{'train phase / bare':<28}{timings['train'] / bare:>10.2f}x")
    print(f"{'http v2 p50 ms (1 row)':<28}{1000 * p50(http):>10.3f}")
    print(f"{'runtime.predict p50 ms':<28}{1000 * p50(local):>10.3f}")
    print(f"{'Booster.predict p50 ms':<28}{1000 * p50(bare_raw):>10.3f}")
    print(f"{'http / Booster.predict':<28}{p50(http) / p50(bare_raw):>10.2f}x")


if __name__ == "__main__":
    main()
