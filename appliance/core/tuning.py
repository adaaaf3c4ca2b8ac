"""Tuning studies: the study spec, checked before anything is created.

A study names a base training (a built-in trainer over dataset versions), an objective (a
metric its trials report, minimized or maximized), a search space (`core/search_space.py`),
an algorithm and its budget (trials, parallel trials, failures, time), and the rules that stop
a trial (median of completed trials at the same step) or the study (no improvement for N
trials, or a target reached). Every error names the key it is about.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.names import validate_name
from appliance.core.search_space import ALGORITHMS, grid_points, parse_space
from appliance.errors import InvalidInput

KEYS = {
    "name",
    "train",
    "objective",
    "algorithm",
    "space",
    "max_trials",
    "parallel_trials",
    "max_failed_trials",
    "timeout",
    "seed",
    "early_stopping",
    "stop",
}
TRAIN_KEYS = {"trainer", "train", "valid", "label", "features", "params", "objective"}


def _count(data: dict[str, Any], key: str, default: int, low: int = 1) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInput(f"{key}: expected a whole number >= {low}, got {value!r}")
    return value


def parse_study(app: Appliance, data: Any, source: str = "study") -> dict[str, Any]:
    """The validated study spec, with defaults filled in and `warnings` (a clamp)."""
    from appliance.core.agent import machine_capacity
    from appliance.core.datasets import get_dataset_version
    from appliance.core.jobs import parse_duration
    from appliance.core.training import OBJECTIVES, TRAINERS

    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: expected a mapping")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise InvalidInput(f"{source}: unknown key(s) {unknown}; expected {sorted(KEYS)}")
    name = data.get("name")
    if not isinstance(name, str):
        raise InvalidInput(f"{source}: name is required")
    validate_name("study name", name)

    train = data.get("train")
    if not isinstance(train, dict):
        raise InvalidInput("train: required, {trainer, train, valid, label}")
    unknown = sorted(set(train) - TRAIN_KEYS)
    if unknown:
        raise InvalidInput(f"train: unknown key(s) {unknown}; expected {sorted(TRAIN_KEYS)}")
    trainer = train.get("trainer", "lightgbm")
    if trainer not in TRAINERS:
        raise InvalidInput(f"train.trainer: {trainer!r} is not one of {', '.join(TRAINERS)}")
    if train.get("objective") is not None and train["objective"] not in OBJECTIVES:
        raise InvalidInput(f"train.objective: {train['objective']!r} is not one of {OBJECTIVES}")
    label = train.get("label")
    if not isinstance(label, str):
        raise InvalidInput("train.label: required, the label column")
    versions = {}
    for role in ("train", "valid"):
        ref = train.get(role)
        if role == "train" and not isinstance(ref, str):
            raise InvalidInput("train.train: required, the training dataset (NAME[@V])")
        if ref is None:
            continue
        versions[role] = get_dataset_version(app, str(ref))  # NotFound names the dataset
        columns = {c["name"] for c in versions[role]["schema"]}
        if label not in columns:
            raise InvalidInput(f"train.{role}: {versions[role]['ref']} has no column {label!r}")
    params = train.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidInput("train.params: expected a mapping of fixed trainer parameters")

    objective = data.get("objective")
    if not isinstance(objective, dict) or not isinstance(objective.get("metric"), str):
        raise InvalidInput("objective: required, {metric: NAME, direction: minimize|maximize}")
    direction = objective.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise InvalidInput(f"objective.direction: {direction!r} is not minimize or maximize")

    algorithm = data.get("algorithm", "tpe")
    if algorithm not in ALGORITHMS:
        raise InvalidInput(f"algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    space = parse_space(data.get("space"))
    clash = sorted(set(space) & set(params))
    if clash:
        raise InvalidInput(f"space: {clash} also fixed in train.params; keep one")
    max_trials = _count(data, "max_trials", 20)
    if algorithm == "grid":
        max_trials = min(max_trials, len(grid_points(space)))  # errors on continuous spaces
    warnings = []
    parallel = _count(data, "parallel_trials", 1)
    cores = max(1, int(machine_capacity().cpu))
    if parallel > cores:
        warnings.append(
            f"parallel_trials: {parallel} is more than this machine's {cores} core(s); "
            f"running {cores} at a time"
        )
        parallel = cores
    timeout = data.get("timeout")
    early = data.get("early_stopping")
    if early is not None:
        if not isinstance(early, dict) or early.get("rule", "median") != "median":
            raise InvalidInput(
                "early_stopping: expected {rule: median, start_step, min_trials_required}"
            )
        early = {
            "rule": "median",
            "start_step": _count(early, "start_step", 1, low=0),
            "min_trials_required": _count(early, "min_trials_required", 5),
        }
    stop = data.get("stop") or {}
    if not isinstance(stop, dict) or set(stop) - {"patience", "target"}:
        raise InvalidInput("stop: expected {patience: N trials without improvement, target: V}")
    if "patience" in stop:
        _count(stop, "patience", 1)
    if "target" in stop and (
        isinstance(stop["target"], bool) or not isinstance(stop["target"], int | float)
    ):
        raise InvalidInput(f"stop.target: expected a number, got {stop['target']!r}")
    return {
        "name": name,
        "train": {
            "trainer": trainer,
            "train": versions["train"]["ref"],
            "valid": versions["valid"]["ref"] if "valid" in versions else None,
            "label": label,
            "features": train.get("features"),
            "params": params,
            "objective": train.get("objective"),
        },
        "objective": {"metric": objective["metric"], "direction": direction},
        "algorithm": algorithm,
        "space": data.get("space"),
        "max_trials": max_trials,
        "parallel_trials": parallel,
        "max_failed_trials": _count(data, "max_failed_trials", 3, low=0),
        "timeout_s": None if timeout is None else parse_duration(timeout, "timeout"),
        "seed": _count(data, "seed", 0, low=0),
        "early_stopping": early,
        "stop": stop,
        "warnings": warnings,
    }


def load_study(app: Appliance, path: str | Path) -> dict[str, Any]:
    """A study file (YAML), parsed and checked; errors name the file and the key."""
    from appliance.core.jobs import load_yaml_mapping

    data = load_yaml_mapping(path, "study")
    try:
        return parse_study(app, data, Path(path).name)
    except InvalidInput as exc:
        message = exc.message
        prefix = f"{Path(path).name}: "
        raise InvalidInput(message if message.startswith(prefix) else prefix + message) from exc
