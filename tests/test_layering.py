"""The dependency rule (front ends -> core -> store) holds, and the core stays light to import."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_linter_contracts_hold() -> None:
    lint = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    result = subprocess.run(
        [lint, "--no-cache"], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Contracts: 3 kept, 0 broken" in result.stdout


def test_core_import_loads_no_heavy_or_ui_library() -> None:
    script = (
        "import importlib, json, pkgutil, sys\n"
        "import appliance.core\n"
        "for m in pkgutil.iter_modules(appliance.core.__path__):\n"
        "    importlib.import_module('appliance.core.' + m.name)\n"
        "import appliance.store.db, appliance.store.objects\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(result.stdout))
    # click is absent from the list: sqlite-utils imports it for its own CLI.
    for heavy in ("textual", "torch", "lightgbm", "duckdb", "minio"):
        assert heavy not in loaded, f"importing the core loaded {heavy}"


def test_cli_import_stays_light() -> None:
    """`appliance --help` must not pay for the TUI or the ML libraries."""
    script = (
        "import json, sys\n"
        "import appliance.cli.main\n"
        "print(json.dumps(sorted(m.split('.')[0] for m in sys.modules)))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    loaded = set(json.loads(result.stdout))
    assert not loaded & {"textual", "torch", "lightgbm", "duckdb", "minio"}
