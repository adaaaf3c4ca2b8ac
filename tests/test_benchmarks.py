"""The benchmark scripts keep working (their figures are read by people, not asserted here)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
# the serving worker's CPU is read from /proc; elsewhere the benchmark leaves the line out
CPU_LINE = ("serving worker CPU per request",) if Path("/proc/self/stat").exists() else ()


@pytest.mark.slow
@pytest.mark.parametrize(
    "script, args, expect",
    [
        ("quickstart_phases.py", ["--requests", "20"], "http / Booster.predict"),
        ("data_import_profile.py", ["--rows", "20000"], "speed-up vs pandas"),
        (
            "training_overhead.py",
            ["--rows", "5000", "--starts", "2", "--points", "2000", "--repeat", "1"],
            "job start latency",
        ),
        (
            "features.py",
            ["--keys", "200", "--times", "20", "--entities", "2000", "--calls", "100"],
            "identical values: True",
        ),
        (
            "tuning.py",
            ["--trivial", "30", "--job-trials", "3", "--lgbm-trials", "2", "--rows", "3000"],
            "speed-up parallel 2 vs 1",
        ),
        ("pipelines.py", ["--rows", "2000", "--repeat", "1"], "orchestration overhead per step"),
        (
            "monitoring.py",
            [
                "--seconds",
                "1",
                "--rounds",
                "1",
                "--other-rounds",
                "1",
                "--settle",
                "1",
                "--log-rows",
                "20000",
                "--train-rows",
                "5000",
                "--model-rows",
                "3000",
            ],
            ("p99 with logging / without", *CPU_LINE, "drifting a little (+0.01): "),
        ),
        (
            "serving.py",
            ["--seconds", "1", "--cycles", "2", "--rows", "3000"],
            "deploy/rollback cycles under load",
        ),
    ],
)
def test_benchmark_runs(script: str, args: list[str], expect: str | tuple[str, ...]) -> None:
    # logs rotate and ship within a second here (5 s in the product), so the monitoring
    # benchmark's rounds wait for the agent briefly
    fast = {"APPLIANCE_LOG_ROTATE_SECONDS": "0.5", "APPLIANCE_SHIP_SECONDS": "0.5"}
    if script != "monitoring.py":
        fast = {}
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, **fast},
    )
    assert result.returncode == 0, result.stderr
    for line in (expect,) if isinstance(expect, str) else expect:
        assert line in result.stdout


def _monitoring_benchmark():
    """benchmarks/monitoring.py as a module (its imports are the standard library's)."""
    spec = importlib.util.spec_from_file_location("monitoring_bench", BENCH / "monitoring.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--loads", ","], "--loads: none given"),
        (["--loads", "single,burst"], "--loads: burst"),
        (["--sample", "0"], "--sample: 0: expected a share from 0.001 to 1"),
        (["--sample", "-0.5"], "--sample: -0.5"),
        (["--sample", "0.0001"], "--sample: 0.0001"),
        (["--sample", "1.5"], "--sample: 1.5"),
        (["--sample", "nan"], "--sample: nan"),
        (["--sample", "inf"], "--sample: inf"),
        (["--sample", "half"], "--sample: invalid float value"),
        (["--aa", "--sample", "0.1"], "--sample: nothing is logged on either side with --aa"),
    ],
)
def test_the_monitoring_benchmark_refuses_what_it_cannot_measure(
    args: list[str], needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # refused before a home is built: a typo costs no minutes of load
    with pytest.raises(SystemExit) as exited:
        _monitoring_benchmark().parse_args(args)
    assert exited.value.code == 2
    assert needle in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, side, target",
    [
        ([], "inputs 100%", "target <= 1.05"),
        (["--sample", "0.1"], "inputs 10%", "the target, <= 1.05, is at 100%"),
        (["--sample", "0.33333"], "inputs 33.3%", "the target, <= 1.05, is at 100%"),
        (["--sample", "0.9999999"], "inputs 100%", "target <= 1.05"),
        (["--aa"], "off (A/A)", "nothing logged: 1.00 but for noise"),
    ],
)
def test_the_monitoring_benchmark_names_the_share_it_logs(
    args: list[str], side: str, target: str
) -> None:
    bench = _monitoring_benchmark()
    parsed = bench.parse_args(args)
    assert bench._side(parsed) == side
    assert bench._target(parsed).startswith(target)
