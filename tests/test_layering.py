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


HEAVY = {"textual", "torch", "lightgbm", "duckdb", "minio"}


def _top_level_modules_after(imports: str) -> set[str]:
    """Top-level packages in sys.modules after running `imports` in a fresh interpreter."""
    script = (
        imports
        + "\nimport json, sys\nprint(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    return set(json.loads(result.stdout))


def test_core_import_loads_no_heavy_or_ui_library() -> None:
    loaded = _top_level_modules_after(
        "import importlib, pkgutil\n"
        "import appliance.core\n"
        "for m in pkgutil.iter_modules(appliance.core.__path__):\n"
        "    importlib.import_module('appliance.core.' + m.name)\n"
        "import appliance.store.db, appliance.store.objects"
    )
    # click is not in HEAVY: sqlite-utils imports it for its own CLI.
    assert not loaded & HEAVY


def test_cli_import_stays_light() -> None:
    """`appliance --help` must not pay for the TUI or the ML libraries."""
    assert not _top_level_modules_after("import appliance.cli.main") & HEAVY
