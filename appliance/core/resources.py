"""The resource kinds every front end lists (k9s-style): one registry, one generic table.

The CLI's `list` verbs and the TUI's resource view both read from here, so a new kind shows
up in both at once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.core import (
    datasets,
    deployments,
    features,
    jobs,
    pipeline_runs,
    registry,
    runs,
    studies,
)
from appliance.core.context import Appliance
from appliance.errors import InvalidInput


@dataclass(frozen=True)
class Kind:
    name: str
    aliases: tuple[str, ...]
    columns: tuple[str, ...]
    lister: Callable[[Appliance], list[dict[str, Any]]]


KINDS: dict[str, Kind] = {
    k.name: k
    for k in (
        Kind(
            "datasets",
            ("ds", "data", "dataset"),
            ("name", "latest", "rows", "columns", "sha256", "created_at"),
            datasets.list_datasets,
        ),
        Kind(
            "jobs",
            ("job", "j"),
            ("id", "kind", "state", "progress", "attempt", "run_id", "submitted_at", "error"),
            jobs.list_jobs,
        ),
        Kind(
            "runs",
            ("run", "r"),
            ("id", "experiment", "name", "status", "metrics", "created_at"),
            runs.list_runs,
        ),
        Kind(
            "models",
            ("model", "m"),
            ("name", "latest", "versions", "aliases", "created_at"),
            registry.list_models,
        ),
        Kind(
            "deployments",
            ("deployment", "deploy", "dp", "d"),
            (
                "name",
                "revision",
                "model_version",
                "canary",
                "port",
                "state",
                "rps",
                "p99_ms",
                "error_rate",
            ),
            deployments.list_deployments,
        ),
        Kind(
            "features",
            ("feature", "fs", "f"),
            ("kind", "name", "version", "created_at"),
            features.list_definitions,
        ),
        Kind(
            "studies",
            ("study", "tune", "t"),
            ("id", "name", "state", "trials", "metric", "best", "best_trial", "message"),
            studies.list_studies,
        ),
        Kind(
            "pipelines",
            ("pipeline", "pl", "p"),
            ("id", "pipeline", "state", "trigger", "done", "steps", "cached", "created_at"),
            lambda app: pipeline_runs.list_runs(app),
        ),
    )
}


def find_kind(text: str) -> Kind:
    """A kind by name or alias (`:m` -> models)."""
    key = text.strip().lower()
    for kind in KINDS.values():
        if key == kind.name or key in kind.aliases:
            return kind
    raise InvalidInput(f"unknown resource {text!r}; try one of {', '.join(KINDS)}")


def list_resources(app: Appliance, kind: str) -> tuple[tuple[str, ...], list[dict[str, Any]]]:
    found = find_kind(kind)
    return found.columns, found.lister(app)
