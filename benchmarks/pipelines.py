"""Pipeline orchestration overhead and a fully cached re-run, measured in one run.

    .venv/bin/python benchmarks/pipelines.py [--rows 5000] [--repeat 3]

A 6-step chain on small data (recipe -> split -> train -> register -> promote -> deploy),
each step a job, with the agent running (its normal state):

1. overhead per step = (the run's wall time, submit to `succeeded` seen by the caller,
   minus the sum of its step jobs' own times, claim to end) / 6. What is left is the
   orchestration: the agent noticing a job's end, writing its outputs, working out the next
   step's cache key and submitting its job, and the caller seeing the end (polled every
   50 ms, included).
2. a fully cached re-run: the same pipeline again, submit to `succeeded` (every step a
   cache hit), in-process and through the CLI (`appliance pipelines run --wait`, a fresh
   interpreter included).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PIPELINE = """
name: bench
params: {data: churn}
steps:
  prep:     {recipe: clean.sql, inputs: {raw: "${params.data}"}, out: churn_clean}
  split:    {split: "${steps.prep.out}", fractions: [0.7, 0.15, 0.15], stratify: churned}
  train:    {train: "${steps.split.train}", valid: "${steps.split.valid}",
             test: "${steps.split.test}", label: churned, params: {num_boost_round: 30}}
  register: {register: "${steps.train.run}", model: churn}
  gate:     {promote: "${steps.register.version}", to: champion,
             gate: "test_auc >= champion.test_auc"}
  deploy:   {deploy: churn@champion, name: churn, when: "${steps.gate.promoted}"}
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5000)
    parser.add_argument("--repeat", type=int, default=3, help="median of this many runs")
    args = parser.parse_args()
    os.environ["APPLIANCE_AGENT_IDLE_EXIT"] = "600"

    from appliance.core.agent import ensure_agent, stop_agent
    from appliance.core.context import Appliance
    from appliance.core.datasets import import_csv
    from appliance.core.deployments import stop_deployment
    from appliance.core.pipeline_runs import run_pipeline, show_run, wait_run
    from appliance.core.quickstart import sample_csv
    from appliance.store.db import parse_utc

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        home = root / "home"
        os.environ["APPLIANCE_HOME"] = str(home)
        lines = sample_csv().read_text().splitlines()
        data = root / "churn.csv"
        data.write_text("\n".join(lines[: args.rows + 1]) + "\n")
        (root / "clean.sql").write_text("SELECT * FROM raw WHERE total_charges IS NOT NULL\n")
        path = root / "pipeline.yaml"
        path.write_text(PIPELINE)
        app = Appliance.open(home)
        try:
            import_csv(app, data, "churn")
            ensure_agent(app)
            time.sleep(2)  # the agent up and its job libraries loaded, as a service's are
            overheads, walls, jobs = [], [], []
            for _ in range(args.repeat):
                started = time.perf_counter()
                run = wait_run(app, run_pipeline(app, path, no_cache=True)["id"], timeout=600)
                wall = time.perf_counter() - started
                if run["state"] != "succeeded":
                    raise SystemExit(f"run {run['id']} {run['state']}: {run['error']}")
                steps = show_run(app, run["id"])["steps_detail"]
                job_time = 0.0
                for step in steps:
                    row = app.db.one(
                        "SELECT started_at, finished_at FROM jobs WHERE id = ?", (step["job_id"],)
                    )
                    job_time += parse_utc(row["finished_at"]) - parse_utc(row["started_at"])
                walls.append(wall)
                jobs.append(job_time)
                overheads.append((wall - job_time) / len(steps))
            cached = []
            for _ in range(args.repeat):
                started = time.perf_counter()
                run = wait_run(app, run_pipeline(app, path)["id"], timeout=60)
                cached.append(time.perf_counter() - started)
                assert run["cached"] == 6, run
            cli = []
            exe = Path(sys.executable).parent / "appliance"
            command = [str(exe)] if exe.exists() else [sys.executable, "-m", "appliance"]
            for _ in range(args.repeat):
                started = time.perf_counter()
                subprocess.run(
                    [*command, "pipelines", "run", str(path), "--wait"],
                    check=True,
                    capture_output=True,
                )
                cli.append(time.perf_counter() - started)
        finally:
            try:
                stop_deployment(app, "churn")
            finally:
                stop_agent(app)
                app.close()

    print(f"6-step pipeline on {args.rows} rows, median of {args.repeat} runs")
    print(f"  run wall time           {statistics.median(walls):.3f} s")
    print(f"  sum of step job times   {statistics.median(jobs):.3f} s")
    print(
        f"  orchestration overhead per step  {1000 * statistics.median(overheads):.0f} ms "
        "(target < 300 ms)"
    )
    print(
        f"  fully cached re-run     {statistics.median(cached):.3f} s in process, "
        f"{statistics.median(cli):.3f} s through the CLI (target < 2 s)"
    )


if __name__ == "__main__":
    main()
