"""`appliance doctor`: what this home is, what it runs on, and whether its stores are healthy."""

from __future__ import annotations

import platform
import shutil
import sqlite3
from importlib import metadata
from typing import Any

from appliance import __version__
from appliance.core.context import Appliance
from appliance.store.db import check_health
from appliance.store.migrations import schema_version

_PACKAGES = ("duckdb", "lightgbm", "numpy", "textual", "sqlite-utils", "minio", "click")


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def doctor(app: Appliance) -> dict[str, Any]:
    """A report of checks; `ok` is False when any store is unhealthy."""
    settings = app.settings
    report: dict[str, Any] = {
        "home": str(settings.home),
        "config_file": str(settings.config_path) if settings.config_path.exists() else None,
        "versions": {
            "appliance": __version__,
            "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version,
            **{p: _version(p) for p in _PACKAGES},
        },
        "executor": settings.executor,
        "object_store": settings.store,
    }
    usage = shutil.disk_usage(settings.home)
    report["disk_free_gb"] = round(usage.free / 2**30, 1)
    checks: dict[str, str] = {}
    try:
        checks["metadata"] = check_health(app.db)
        report["schema"] = schema_version(app.db.conn)
    except Exception as exc:  # doctor reports, it does not crash
        checks["metadata"] = f"error: {exc}"
    try:
        report["object_store"] = app.objects.describe()
        checks["object_store"] = "ok"
    except Exception as exc:
        checks["object_store"] = f"error: {exc}"
    config = settings.config_path
    if config.exists() and "secret_key" in config.read_text(errors="replace"):
        loose = config.stat().st_mode & 0o077
        checks["config_permissions"] = (
            f"warning: {config} holds a secret key but is readable by others (chmod 600)"
            if loose
            else "ok"
        )
    report["checks"] = checks
    report["ok"] = not any(v.startswith("error") for v in checks.values())
    return report
