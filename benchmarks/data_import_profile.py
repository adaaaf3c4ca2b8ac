"""Import + profile of a large CSV: appliance (DuckDB) vs a pandas baseline, same run.

    .venv/bin/python benchmarks/data_import_profile.py [--rows 5000000]

Generates ROWS x 20 columns (numeric, string, timestamp; about 1 GB at 5M rows), then runs
each contender in its own process and reports wall time and peak memory (max RSS):
  appliance   `data import` + `data profile`
  pandas      read_csv + describe + value_counts of string columns + to_parquet
  appliance with DuckDB's memory limit at 512 MB (must finish, spilling to disk)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

APPLIANCE = """
import sys
from appliance.core.context import Appliance
from appliance.core.datasets import import_data
from appliance.core.profiles import profile
app = Appliance.open(sys.argv[1])
version = import_data(app, "bench", sys.argv[2])
result = profile(app, version["ref"])
print(version["row_count"], len(result["columns"]))
"""

PANDAS = """
import sys
import pandas as pd
df = pd.read_csv(sys.argv[2], parse_dates=["ts1", "ts2"])
df.describe(include="all")
for column in df.select_dtypes(include="object").columns:
    df[column].value_counts()
df.to_parquet(sys.argv[1] + "/bench.parquet", compression="zstd")
print(len(df), len(df.columns))
"""


def generate(path: Path, rows: int) -> None:
    import duckdb

    duckdb.sql(
        textwrap.dedent(f"""
        COPY (
          SELECT range AS id,
                 random() * 1000 AS x1, random() AS x2, (random() - 0.5) * 1e6 AS x3,
                 random() * 50 AS x4, round(random() * 100, 2) AS x5,
                 CASE WHEN random() < 0.05 THEN NULL ELSE random() END AS x6,
                 (range % 1000)::INTEGER AS i1, (hash(range) % 100000)::BIGINT AS i2,
                 (range % 7)::INTEGER AS i3, (hash(range * 3) % 2)::INTEGER AS label,
                 'cat_' || (hash(range) % 50) AS s1, 'city_' || (hash(range * 7) % 500) AS s2,
                 CASE (range % 3) WHEN 0 THEN 'red' WHEN 1 THEN 'green' ELSE 'blue' END AS s3,
                 md5(range::VARCHAR)[:12] AS s4,
                 CASE WHEN random() < 0.1 THEN NULL ELSE 'note ' || (range % 97) END AS s5,
                 TIMESTAMP '2025-01-01' + INTERVAL (range % 31536000) SECOND AS ts1,
                 TIMESTAMP '2024-06-01' + INTERVAL (hash(range) % 8640000) SECOND AS ts2,
                 random() * random() AS x7
          FROM range({rows})
        ) TO '{path}' (HEADER)
    """)
    )


def measure(script: str, workdir: Path, csv: Path, env: dict[str, str]) -> tuple[float, float, str]:
    """(wall seconds, peak RSS in MiB, stdout) of one contender in its own process."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(workdir), str(csv)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    out, err = proc.stdout.read(), proc.stderr.read()  # type: ignore[union-attr]
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"contender failed:\n{err}")
    return wall, usage.ru_maxrss / 1024, out.strip()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=5_000_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        csv = root / "bench.csv"
        start = time.perf_counter()
        generate(csv, args.rows)
        size_mb = csv.stat().st_size / 2**20
        print(
            f"generated {args.rows} rows x 20 columns, {size_mb:.0f} MiB "
            f"in {time.perf_counter() - start:.1f}s"
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("APPLIANCE_")}
        results = {}
        for label, script, extra in (
            ("appliance", APPLIANCE, {}),
            ("pandas", PANDAS, {}),
            ("appliance, 512 MB limit", APPLIANCE, {"APPLIANCE_DUCKDB_MEMORY_LIMIT": "512MB"}),
        ):
            workdir = root / label.replace(" ", "_").replace(",", "")
            workdir.mkdir()
            results[label] = measure(script, workdir, csv, {**env, **extra})
        print(f"{'contender':<26}{'wall s':>10}{'peak MiB':>12}")
        for label, (wall, rss, _) in results.items():
            print(f"{label:<26}{wall:>10.2f}{rss:>12.0f}")
        app_wall, app_rss, _ = results["appliance"]
        pd_wall, pd_rss, _ = results["pandas"]
        print(f"speed-up vs pandas: {pd_wall / app_wall:.2f}x (target >= 5x)")
        print(f"memory vs pandas:   {app_rss / pd_rss:.2f} of pandas' peak (target <= 0.33)")


if __name__ == "__main__":
    main()
