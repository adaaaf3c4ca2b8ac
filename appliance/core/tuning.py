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
from appliance.core.search_space import ALGORITHMS, grid_points, parse_space, space_names
from appliance.errors import InvalidInput

KEYS = {
    "name",
    "experiment",
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
TRAINER_KEYS = {"trainer", "train", "valid", "test", "label", "features", "params", "objective"}
SCRIPT_KEYS = {"script", "function", "in_process", "params"}
COMMON_KEYS = {"resources", "timeout"}
# LightGBM drops features it cannot split under the Dataset's min_data_in_leaf ("pre-filter");
# a trial that varies it must build its Dataset without that filter.
MIN_DATA_IN_LEAF = {"min_data_in_leaf", "min_data_per_leaf", "min_data", "min_child_samples"}


def _count(data: dict[str, Any], key: str, default: int, low: int = 1, within: str = "") -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InvalidInput(f"{within}{key}: expected a whole number >= {low}, got {value!r}")
    return value


def _check_mlp(space: dict[str, dict[str, Any]], params: dict[str, Any]) -> None:
    """The MLP's parameter names (and the fixed values) before anything is created."""
    from appliance.core.mlp import MlpConfig
    from appliance.core.training import COMMON_DEFAULTS

    known = set(MlpConfig.__dataclass_fields__) | set(COMMON_DEFAULTS)
    for param in sorted(space_names(space)):
        if param not in known:
            raise InvalidInput(f"space.{param}: not an MLP parameter; known: {sorted(known)}")
    try:
        MlpConfig.from_params({k: v for k, v in params.items() if k not in COMMON_DEFAULTS})
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"train.params: {exc}") from exc


def _function_defined(path: Path, function: str) -> bool:
    """Whether the file defines `function` at top level (read, never run: the study is
    checked in the submitting process, the user's code runs only in trials)."""
    import ast

    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        raise InvalidInput(f"train.script: {path.name} line {exc.lineno}: {exc.msg}") from exc
    return any(
        isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name == function
        for node in tree.body
    )


def _parse_train(app: Appliance, train: Any) -> dict[str, Any]:
    """The base training: a built-in trainer over dataset versions, or a user's script (run
    as a job that reads `sdk.params()`), or one function of it (called with the params)."""
    from appliance.core.datasets import get_dataset_version
    from appliance.core.jobs import JobSpec, parse_duration
    from appliance.core.training import OBJECTIVES, TRAINERS

    if not isinstance(train, dict):
        raise InvalidInput(
            "train: required, {trainer, train, valid, label} or {script[, function]}"
        )
    is_script = "script" in train
    allowed = (SCRIPT_KEYS if is_script else TRAINER_KEYS) | COMMON_KEYS
    unknown = sorted(set(train) - allowed)
    if unknown:
        raise InvalidInput(f"train: unknown key(s) {unknown}; expected {sorted(allowed)}")
    params = train.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidInput("train.params: expected a mapping of fixed parameters")
    resources = train.get("resources") or {"cpu": 1}
    if not isinstance(resources, dict):
        raise InvalidInput("train.resources: expected {cpu, memory, gpu}")
    try:
        request = JobSpec("command", ["x"], resources=resources).request()
    except InvalidInput as exc:
        raise InvalidInput(f"train.{exc.message}") from exc
    timeout = train.get("timeout")
    out: dict[str, Any] = {
        "params": params,
        "resources": {**resources, "cpu": request.cpu},
        "timeout": None if timeout is None else parse_duration(timeout, "train.timeout"),
    }
    if is_script:
        path = Path(str(train["script"])).expanduser()
        if not path.is_file():
            raise InvalidInput(f"train.script: {train['script']}: no such file")
        function = train.get("function")
        if function is not None and (
            not isinstance(function, str) or not _function_defined(path, function)
        ):
            raise InvalidInput(f"train.function: {path.name} defines no function {function!r}")
        in_process = train.get("in_process", False)
        if not isinstance(in_process, bool) or (in_process and function is None):
            raise InvalidInput("train.in_process: true or false, and only with train.function")
        if in_process and out["timeout"] is not None:
            raise InvalidInput(
                "train.timeout: an in-process trial cannot be cut short; run trials as jobs "
                "(in_process: false) to time them out"
            )
        return {
            **out,
            "script": str(path.resolve()),
            "function": function,
            "in_process": in_process,
        }
    trainer = train.get("trainer", "lightgbm")
    if trainer not in TRAINERS:
        raise InvalidInput(f"train.trainer: {trainer!r} is not one of {', '.join(TRAINERS)}")
    if train.get("objective") is not None and train["objective"] not in OBJECTIVES:
        raise InvalidInput(f"train.objective: {train['objective']!r} is not one of {OBJECTIVES}")
    if request.cpu != int(request.cpu):
        raise InvalidInput("train.resources.cpu: a training job takes whole cores")
    label = train.get("label")
    if not isinstance(label, str):
        raise InvalidInput("train.label: required, the label column")
    versions = {}
    for role in ("train", "valid", "test"):
        ref = train.get(role)
        if role == "train" and not isinstance(ref, str):
            raise InvalidInput("train.train: required, the training dataset (NAME[@V])")
        if ref is None:
            continue
        versions[role] = get_dataset_version(app, str(ref))  # NotFound names the dataset
        columns = {c["name"] for c in versions[role]["schema"]}
        if label not in columns:
            raise InvalidInput(f"train.{role}: {versions[role]['ref']} has no column {label!r}")
    features = train.get("features")
    if features is not None and (
        not isinstance(features, list) or not all(isinstance(f, str) for f in features)
    ):
        raise InvalidInput("train.features: expected a list of column names")
    return {
        **out,
        "trainer": trainer,
        "train": versions["train"]["ref"],
        "valid": versions["valid"]["ref"] if "valid" in versions else None,
        "test": versions["test"]["ref"] if "test" in versions else None,
        "label": label,
        "features": features,
        "objective": train.get("objective"),
    }


def parse_study(app: Appliance, data: Any, source: str = "study") -> dict[str, Any]:
    """The validated study spec, with defaults filled in and `warnings` (a clamp)."""
    from appliance.core.agent import machine_capacity
    from appliance.core.jobs import parse_duration

    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: expected a mapping")
    unknown = sorted(set(data) - KEYS)
    if unknown:
        raise InvalidInput(f"{source}: unknown key(s) {unknown}; expected {sorted(KEYS)}")
    name = data.get("name")
    if not isinstance(name, str):
        raise InvalidInput(f"{source}: name is required")
    validate_name("study name", name)

    train = _parse_train(app, data.get("train"))
    params = train["params"]
    objective = data.get("objective")
    if not isinstance(objective, dict) or not isinstance(objective.get("metric"), str):
        raise InvalidInput("objective: required, {metric: NAME, direction: minimize|maximize}")
    unknown = sorted(set(objective) - {"metric", "direction", "value"})
    if unknown:
        raise InvalidInput(
            f"objective: unknown key(s) {unknown}; expected metric, direction, value"
        )
    direction = objective.get("direction", "minimize")
    if direction not in ("minimize", "maximize"):
        raise InvalidInput(f"objective.direction: {direction!r} is not minimize or maximize")
    value = objective.get("value", "final")
    if value not in ("final", "best"):
        raise InvalidInput(f"objective.value: {value!r} is not final or best")

    algorithm = data.get("algorithm", "tpe")
    if algorithm not in ALGORITHMS:
        raise InvalidInput(f"algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
    space = parse_space(data.get("space"))
    clash = sorted(space_names(space) & set(params))
    if clash:
        raise InvalidInput(f"space: {clash} also fixed in train.params; keep one")
    if train.get("trainer") == "mlp":
        _check_mlp(space, params)
    if train.get("trainer") == "lightgbm":
        from appliance.core.training import check_lightgbm_params

        for param in sorted(space_names(space)):
            try:
                check_lightgbm_params({param: 1})
            except InvalidInput as exc:
                raise InvalidInput(f"space.{param}: {exc.message.split(': ', 1)[-1]}") from exc
        try:
            check_lightgbm_params(params)
        except InvalidInput as exc:
            raise InvalidInput(f"train.params: {exc.message}") from exc
    max_trials = _count(data, "max_trials", 20)
    if algorithm == "grid":
        max_trials = min(max_trials, len(grid_points(space)))  # errors on continuous spaces
    warnings = []
    parallel = _count(data, "parallel_trials", 1)
    per_trial = train["resources"].get("cpu", 1)
    cores = max(1, int(machine_capacity().cpu // per_trial))
    if train.get("in_process"):
        if parallel > 1:
            warnings.append("parallel_trials: in-process trials run one at a time")
        parallel = 1
    elif parallel > cores:
        warnings.append(
            f"parallel_trials: {parallel} is more than this machine can run "
            f"({cores} trial(s) of {per_trial:g} core(s) each); running {cores} at a time"
        )
        parallel = cores
    timeout = data.get("timeout")
    early = data.get("early_stopping")
    if early is not None:
        expected = "expected {rule: median, start_step, min_trials_required}"
        if not isinstance(early, dict) or early.get("rule", "median") != "median":
            raise InvalidInput(f"early_stopping: {expected}")
        unknown = sorted(set(early) - {"rule", "start_step", "min_trials_required"})
        if unknown:
            raise InvalidInput(f"early_stopping: unknown key(s) {unknown}; {expected}")
        early = {
            "rule": "median",
            "start_step": _count(early, "start_step", 1, low=0, within="early_stopping."),
            "min_trials_required": _count(
                early, "min_trials_required", 5, within="early_stopping."
            ),
        }
    stop = data.get("stop") or {}
    if not isinstance(stop, dict) or set(stop) - {"patience", "target"}:
        raise InvalidInput("stop: expected {patience: N trials without improvement, target: V}")
    if "patience" in stop:
        _count(stop, "patience", 1, within="stop.")
    if "target" in stop and (
        isinstance(stop["target"], bool) or not isinstance(stop["target"], int | float)
    ):
        raise InvalidInput(f"stop.target: expected a number, got {stop['target']!r}")
    experiment = data.get("experiment", name)
    validate_name("experiment", experiment)
    return {
        "name": name,
        "experiment": experiment,
        "train": train,
        "objective": {"metric": objective["metric"], "direction": direction, "value": value},
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
    train = data.get("train")
    if isinstance(train, dict) and isinstance(train.get("script"), str):
        script = Path(train["script"]).expanduser()
        if not script.is_absolute():  # relative to the study file, as a recipe's paths are
            data = {**data, "train": {**train, "script": str(Path(path).parent / script)}}
    try:
        return parse_study(app, data, Path(path).name)
    except InvalidInput as exc:
        message = exc.message
        prefix = f"{Path(path).name}: "
        raise InvalidInput(message if message.startswith(prefix) else prefix + message) from exc


# ---- the rules that stop trials and studies ---------------------------------------------
def _best_until(curve: dict[int, float], step: int, maximize: bool) -> float | None:
    seen = [v for s, v in curve.items() if s <= step]
    if not seen:
        return None
    return max(seen) if maximize else min(seen)


def median_stop(
    running: dict[int, float],
    completed: list[dict[int, float]],
    step: int,
    rule: dict[str, Any],
    maximize: bool,
) -> bool:
    """The median stopping rule: stop a running trial at `step` when at least
    `min_trials_required` trials have completed and its best value so far is worse than the
    median of the completed trials' best values up to the same step (a true median, not a
    mean). Curves map step -> metric value."""
    import statistics

    if step < rule["start_step"] or len(completed) < rule["min_trials_required"]:
        return False
    mine = _best_until(running, step, maximize)
    others = [v for c in completed if (v := _best_until(c, step, maximize)) is not None]
    if mine is None or len(others) < rule["min_trials_required"]:
        return False
    median = statistics.median(others)
    return mine < median if maximize else mine > median


def study_should_stop(
    objectives: list[float | None], stop: dict[str, Any], maximize: bool
) -> str | None:
    """Why a study stops early (a target reached, or `patience` trials without
    improvement), or None; `objectives` are the finished trials' values in order (None for
    a failed trial, which counts towards patience)."""
    best: float | None = None
    since = 0
    for value in objectives:
        if value is not None and (best is None or (value > best if maximize else value < best)):
            best, since = value, 0
        else:
            since += 1
    target = stop.get("target")
    if best is not None and target is not None and (best >= target if maximize else best <= target):
        return f"the target {target:g} was reached ({best:g})"
    patience = stop.get("patience")
    if patience is not None and best is not None and since >= patience:
        return f"no improvement in the last {since} trials (best {best:g})"
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _columns(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's values as importance sees them: a nested option counts as a level of its
    choice (named by its fixed values and its keys, so every `dart` trial is one level) and
    its numbers as parameters of their own."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        if isinstance(value, dict):
            nested = _columns(value)
            fixed = [f"{k}={v}" for k, v in sorted(nested.items()) if not _is_number(v)]
            out[name] = ", ".join(fixed) or ", ".join(sorted(nested))
            out.update({k: v for k, v in nested.items() if _is_number(v)})
        else:
            out[name] = value
    return out


def importance(trials: list[dict[str, Any]]) -> dict[str, float]:
    """How much each parameter explains the objective across finished trials, summing to 1:
    for a number, the squared rank correlation; for a category, the share of the objective's
    variance between its levels (a one-way ANOVA's eta squared). A parameter of a nested
    option is judged over the trials that took that option. Rough, as fANOVA is, but enough
    to say which knobs mattered."""
    import numpy as np
    from scipy.stats import rankdata

    done = [t for t in trials if t.get("objective") is not None]
    if len(done) < 3:
        return {}
    pairs: dict[str, list[tuple[Any, float]]] = {}
    for t in done:
        for name, value in _columns(t["params"]).items():
            pairs.setdefault(name, []).append((value, float(t["objective"])))
    scores = {}
    for name, seen in sorted(pairs.items()):
        values = [v for v, _ in seen]
        y = np.array([target for _, target in seen])
        numeric = all(_is_number(v) for v in values)
        if len(seen) < 3 or np.var(y) == 0 or len(set(map(repr, values))) < 2:
            scores[name] = 0.0
        elif numeric:  # Spearman: average ranks, so repeated values carry no trial order
            ranks_x = rankdata(np.array(values, dtype=float))
            scores[name] = float(np.corrcoef(ranks_x, rankdata(y))[0, 1] ** 2)
        else:
            levels: dict[str, list[float]] = {}
            for value, target in seen:
                levels.setdefault(repr(value), []).append(target)
            between = sum(len(v) * (np.mean(v) - y.mean()) ** 2 for v in levels.values())
            scores[name] = float(between / (np.var(y) * len(y)))
    total = sum(scores.values())
    return {k: (v / total if total else 0.0) for k, v in sorted(scores.items())}
