"""Model serving speed and rollback safety, against the in-process floor measured in the same run.

    .venv/bin/python benchmarks/serving.py [--seconds 30] [--connections 8] [--workers 1]

The model: LightGBM binary, 100 trees, 31 leaves, 20 float features, trained through the
platform and served by a real deployment on 127.0.0.1. One run measures:
  1. the floor: in-process booster.predict on 1 row and on 1,000 rows;
  2. unloaded latency: one connection, one request at a time (p50 vs the 1-row floor);
  3. single-row JSON requests under closed-loop load (req/s, p50, p99, errors);
  4. 1,000-row batches as JSON and with the binary tensor extension (rows/s vs the floor);
  5. deploy/rollback cycles under the single-row load, from a separate process as the CLI
     would: failed requests, and how long each swap takes until every worker serves the
     target version (the command's return).
The load generator (benchmarks/loadgen.py) runs in this process, on the same cores.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadgen import http_request, run_load  # noqa: E402

FEATURES = [f"f{i:02d}" for i in range(20)]
CYCLES = """
import json, sys, time
from appliance.core import deployments
from appliance.core.context import Appliance
app = Appliance.open(sys.argv[1])
swaps = []
for i in range(int(sys.argv[2]) * 2):
    started = time.perf_counter()
    if i % 2 == 0:
        deployments.deploy(app, "bench", sys.argv[3])
    else:
        deployments.rollback(app, "bench")
    swaps.append(time.perf_counter() - started)
    time.sleep(0.1)
print(json.dumps(swaps))
"""


def build_home(home: Path, rows: int) -> tuple[object, list[dict]]:
    """A home with one dataset and two registered versions of the benchmark model."""
    import numpy as np

    from appliance.core import datasets, jobs, registry, training
    from appliance.core.context import Appliance

    rng = np.random.default_rng(7)
    x = rng.normal(size=(rows, len(FEATURES)))
    logit = x[:, 0] - 0.8 * x[:, 1] + 0.5 * x[:, 2] * x[:, 3] + rng.normal(scale=0.5, size=rows)
    path = home.parent / "bench.csv"
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow([*FEATURES, "label"])
        for row, y in zip(x, logit > 0, strict=True):
            writer.writerow([f"{v:.6f}" for v in row] + [int(y)])
    app = Appliance.open(home)
    dataset = datasets.import_csv(app, path, "bench")
    versions = []
    for seed in (1, 2):
        params = {
            "num_boost_round": 100,
            "num_leaves": 31,
            "early_stopping_rounds": 0,
            "seed": seed,
        }
        job = training.submit_training(app, dataset["ref"], "label", params=params, name=f"b{seed}")
        job = jobs.wait_job(app, job["id"], timeout=600)
        assert job["state"] == "succeeded", job
        versions.append(registry.register_model(app, "bench", job["run_id"]))
    return app, versions


def floor(model_file: str, batch: list[list[float]]) -> tuple[float, float]:
    """Seconds per booster.predict call on 1 row and on the batch (median of repeats)."""
    import lightgbm as lgb
    import numpy as np

    booster = lgb.Booster(model_file=model_file)
    assert booster.num_trees() == 100, booster.num_trees()
    one, many = np.asarray(batch[:1]), np.asarray(batch)

    def timed(data: object, n: int) -> float:
        runs = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(n):
                booster.predict(data)
            runs.append((time.perf_counter() - start) / n)
        return statistics.median(runs)

    return timed(one, 2000), timed(many, 100)


def v2_body(rows: list[list[float]]) -> bytes:
    tensor = {"name": "input-0", "shape": [len(rows), len(FEATURES)], "datatype": "FP64"}
    return json.dumps({"inputs": [{**tensor, "data": rows}]}).encode()


def v2_binary(rows: list[list[float]]) -> tuple[bytes, dict[str, str]]:
    flat = [v for r in rows for v in r]
    data = struct.pack(f"<{len(flat)}d", *flat)
    tensor = {
        "name": "input-0",
        "shape": [len(rows), len(FEATURES)],
        "datatype": "FP64",
        "parameters": {"binary_data_size": len(data)},
    }
    header = json.dumps(
        {"inputs": [tensor], "outputs": [{"name": "predict", "parameters": {"binary_data": True}}]}
    ).encode()
    return header + data, {
        "Content-Type": "application/octet-stream",
        "Inference-Header-Content-Length": str(len(header)),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=30.0, help="per load phase")
    parser.add_argument("--connections", type=int, default=8)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--cycles", type=int, default=20, help="deploy/rollback cycles")
    parser.add_argument("--rows", type=int, default=20000, help="training rows")
    args = parser.parse_args()

    from appliance.core import deployments

    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "home"
        print("building the model (2 versions, 100 trees, 31 leaves, 20 features)...", flush=True)
        app, versions = build_home(home, args.rows)
        import numpy as np

        rng = np.random.default_rng(11)
        batch = rng.normal(size=(1000, len(FEATURES))).round(6).tolist()
        v1, v2 = versions
        floor_1, floor_1000 = floor(str(app.objects.get_file(v1["sha256"])), batch)
        dep = deployments.create_deployment(app, "bench", v1["ref"], workers=args.workers)
        port = int(dep["port"])
        path = "/v2/models/bench/infer"
        try:
            single = http_request(path, v2_body(batch[:1]))
            run_load(port, single, connections=1, seconds=min(2, args.seconds))  # warm-up
            unloaded = run_load(port, single, connections=1, seconds=min(5, args.seconds))
            loaded = run_load(port, single, args.connections, args.seconds)
            json_batch = run_load(
                port, http_request(path, v2_body(batch)), args.connections, args.seconds
            )
            body, headers = v2_binary(batch)
            bin_batch = run_load(
                port, http_request(path, body, headers), args.connections, args.seconds
            )

            swaps: list[float] = []

            def cycles() -> None:
                # In a process of its own, as the CLI is: the load generator's event loop
                # must not hold the deploying thread back (one GIL).
                out = subprocess.run(
                    [sys.executable, "-c", CYCLES, str(home), str(args.cycles), v2["ref"]],
                    capture_output=True,
                    text=True,
                    check=True,
                    env={**os.environ, "APPLIANCE_HOME": str(home)},
                )
                swaps.extend(json.loads(out.stdout))

            cycled = run_load(port, single, args.connections, 600, during=cycles)
        finally:
            from appliance.core.agent import stop_agent

            deployments.stop_deployment(app, "bench")
            stop_agent(app)  # the home is about to be deleted
            app.close()

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.2f} ms"

    print(
        f"\nfloor      booster.predict 1 row {floor_1 * 1e6:.0f} us, 1,000 rows {ms(floor_1000)}"
        f" ({1000 / floor_1000:,.0f} rows/s)"
    )
    print(
        f"unloaded   1 connection: p50 {ms(unloaded.percentile(0.5))}, p99 "
        f"{ms(unloaded.percentile(0.99))}; p50 - floor = {ms(unloaded.percentile(0.5) - floor_1)}"
    )
    print(
        f"single-row {args.connections} connections, {args.workers} worker(s): "
        f"{loaded.rps:,.0f} req/s, p50 {ms(loaded.percentile(0.5))}, "
        f"p99 {ms(loaded.percentile(0.99))}, failures {loaded.failures}"
    )
    for label, result in (("batch json", json_batch), ("batch bin ", bin_batch)):
        rows_s = result.rps * 1000
        print(
            f"{label} 1,000 rows: {rows_s:,.0f} rows/s = {rows_s * floor_1000 / 1000:.0%} of the "
            f"floor; p50 {ms(result.percentile(0.5))}, failures {result.failures}"
        )
    print(
        f"rollback   {args.cycles} deploy/rollback cycles under load: "
        f"{cycled.requests:,} requests, "
        f"{cycled.failures} failed; swap (command to every worker serving) median "
        f"{ms(statistics.median(swaps))}, max {ms(max(swaps))}"
    )
    errors = [e for r in (unloaded, loaded, json_batch, bin_batch, cycled) for e in r.errors]
    if errors:
        print("errors:", errors[:5])
    failed = sum(r.failures for r in (unloaded, loaded, json_batch, bin_batch, cycled))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
