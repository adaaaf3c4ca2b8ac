"""Promotion with a gate: move an alias to a candidate only if, on the same evaluation dataset
version, it beats the alias's current holder by the rule given.

    appliance models promote churn/4 --to champion --dataset churn_test@1 \\
        --gate "auc >= champion.auc + 0.002 and logloss <= champion.logloss"

Both versions are scored by one `evaluate` job (so the numbers come from the same rows, the
same code and a verified copy of each model); the report (both metrics, the dataset version,
the rule and its outcome) is stored with the alias move.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from appliance.core.context import Appliance
from appliance.errors import ApplianceError, Conflict, InvalidInput

_TOKEN = re.compile(
    r"\s*(?:(?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?|\.\d+)|(?P<op>>=|<=|==|>|<)"
    r"|(?P<sign>[+-])|(?P<name>[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)?))"
)
_COMPARE: dict[str, Callable[[float, float], bool]] = {
    ">=": operator.ge,
    "<=": operator.le,
    ">": operator.gt,
    "<": operator.lt,
    "==": operator.eq,
}


@dataclass(frozen=True)
class Term:
    """The current holder's `metric` plus `offset`, or (metric None) the constant `offset`."""

    metric: str | None
    offset: float


@dataclass(frozen=True)
class Condition:
    left: str  # a candidate metric
    op: str
    right: Term


def parse_gate(text: str, alias: str = "champion") -> list[Condition]:
    """`METRIC OP (NUMBER | ALIAS.METRIC [+|- NUMBER])` joined by `and`, where ALIAS is the
    alias being moved (its current holder) or `current`; errors say what was expected."""
    tokens: list[tuple[str, str, int]] = []
    position = 0
    while position < len(text):
        match = _TOKEN.match(text, position)
        if match is None or match.end() == position:
            if text[position:].strip() == "":
                break
            raise InvalidInput(f"--gate: cannot read {text[position:].strip()[:20]!r}")
        kind = match.lastgroup or ""
        tokens.append((kind, match.group(kind), match.start(kind)))
        position = match.end()
    conditions: list[Condition] = []
    index = 0

    def take(kind: str, what: str) -> str:
        nonlocal index
        if index >= len(tokens) or tokens[index][0] != kind:
            found = repr(tokens[index][1]) if index < len(tokens) else "the end"
            raise InvalidInput(f"--gate: expected {what}, found {found}")
        index += 1
        return tokens[index - 1][1]

    while True:
        left = take("name", "a metric name")
        if "." in left:
            raise InvalidInput(f"--gate: {left!r}: the left side is the candidate's metric")
        op = take("op", "a comparison (>=, >, <=, <, ==)")
        if index < len(tokens) and tokens[index][0] == "num":
            right = Term(None, float(take("num", "a number")))
        elif index < len(tokens) - 1 and [t[0] for t in tokens[index : index + 2]] == [
            "sign",
            "num",
        ]:  # a signed constant: `loss <= -0.5`
            sign = take("sign", "+ or -")
            value = float(take("num", "a number"))
            right = Term(None, -value if sign == "-" else value)
        else:
            name = take("name", "a number or ALIAS.METRIC")
            holder, _, metric = name.partition(".")
            if not metric:
                raise InvalidInput(f"--gate: {name!r}: compare with ALIAS.METRIC or a number")
            offset = 0.0
            if index < len(tokens) and tokens[index][0] == "sign":
                sign = take("sign", "+ or -")
                value = float(take("num", "a number after " + sign))
                offset = value if sign == "+" else -value
            if holder not in (alias, "current"):
                raise InvalidInput(
                    f"--gate: {name!r}: compare with the current holder as "
                    f"{alias}.{metric} (or current.{metric})"
                )
            right = Term(metric, offset)
        conditions.append(Condition(left, op, right))
        if index == len(tokens):
            return conditions
        if tokens[index][0] == "name" and tokens[index][1] == "and":
            index += 1
            continue
        raise InvalidInput(f"--gate: expected 'and' or the end, found {tokens[index][1]!r}")


def check_gate(
    conditions: list[Condition],
    candidate: dict[str, float],
    holder: dict[str, float] | None,
) -> list[dict[str, Any]]:
    """Each condition with both sides' values and whether it holds."""
    results = []
    for c in conditions:
        if c.left not in candidate:
            raise InvalidInput(
                f"--gate: the candidate has no metric {c.left!r} on this dataset "
                f"(it has {', '.join(sorted(candidate))})"
            )
        if c.right.metric is None:
            threshold = c.right.offset
        else:
            if holder is None:
                raise Conflict("--gate compares with the current holder, but the alias has none")
            if c.right.metric not in holder:
                raise InvalidInput(f"--gate: the current holder has no metric {c.right.metric!r}")
            threshold = holder[c.right.metric] + c.right.offset
        value = candidate[c.left]
        holds = math.isfinite(value) and math.isfinite(threshold)
        holds = holds and _COMPARE[c.op](value, threshold)
        results.append(
            {"metric": c.left, "op": c.op, "value": value, "threshold": threshold, "holds": holds}
        )
    return results


def evaluate_job(spec: Any, emit: Callable[[dict[str, Any]], None]) -> None:
    """The body of an `evaluate` job: each model scored on the same dataset version.

    Metrics are emitted as `ROLE.METRIC` (candidate.auc, champion.auc...)."""
    import os

    import numpy as np

    from appliance.config import load_settings
    from appliance.core.inference import ModelRuntime
    from appliance.core.training import encode, evaluate, label_codes, load_columns
    from appliance.store.objects import open_object_store

    store = open_object_store(load_settings(os.environ.get("APPLIANCE_HOME")))
    dataset = spec.inputs["dataset"]
    models = spec.inputs["models"]
    label = spec.params["label"]
    emit({"type": "progress", "done": 0, "total": len(models), "message": "loading data"})
    names = sorted({f["name"] for m in models for f in m["version"]["signature"]["signature"]})
    data = load_columns(store.get_file(dataset["sha256"]), [*names, label])
    known = ~np.ma.getmaskarray(data[label])
    data = {k: v[known] for k, v in data.items()}
    raw = np.asarray(np.ma.getdata(data[label]))
    print(f"evaluating {len(models)} model(s) on {dataset['ref']} ({len(raw)} rows)")
    for done, model in enumerate(models, 1):
        version = model["version"]
        runtime = ModelRuntime(version, str(store.get_file(version["sha256"])))
        signature = version["signature"]
        objective = signature.get("objective") or "binary"
        labels = list(signature.get("labels") or [])
        y = raw.astype(np.float64) if objective == "regression" else label_codes(raw, labels, label)
        pred = np.asarray(runtime.booster.predict(encode(signature["signature"], data)))
        classes = len(labels) if objective == "multiclass" else 2
        for key, value in evaluate(objective, y, pred, classes).items():
            if math.isfinite(value):
                emit({"type": "metric", "name": f"{model['role']}.{key}", "value": value})
        emit({"type": "progress", "done": done, "total": len(models), "message": model["role"]})


def evaluation_spec(
    dataset: dict[str, Any],
    roles: list[tuple[str, dict[str, Any]]],
    params: dict[str, Any],
    **job: Any,
) -> Any:
    """An `evaluate` job scoring each (role, model version) on one dataset version."""
    from appliance.core.jobs import JobSpec

    return JobSpec(
        kind="evaluate",
        inputs={
            "dataset": {"ref": dataset["ref"], "sha256": dataset["sha256"]},
            "models": [
                {
                    "role": role,
                    "version": {
                        k: model[k] for k in ("model", "version", "flavor", "signature", "sha256")
                    },
                }
                for role, model in roles
            ],
        },
        params=params,
        resources={"cpu": 1, "memory": "1Gi", "gpu": 0},
        **job,
    )


def promote(
    app: Appliance,
    ref: str,
    alias: str,
    gate: str,
    dataset: str,
    reason: str | None = None,
    timeout: float = 600.0,
) -> dict[str, Any]:
    """Score the candidate and the alias's current holder in one job; move the alias only
    if every condition holds. Returns the report (stored with the move when it happens)."""
    from appliance.core.datasets import get_dataset_version
    from appliance.core.jobs import submit_job, wait_job
    from appliance.core.registry import get_model_version, set_alias
    from appliance.core.runs import latest_metrics

    conditions = parse_gate(gate, alias)
    candidate = get_model_version(app, ref)
    if candidate["archived_at"]:
        raise Conflict(f"{candidate['ref']} is archived; it cannot be promoted")
    try:
        holder = get_model_version(app, f"{candidate['model']}@{alias}")
    except ApplianceError:
        holder = None
    if holder is not None and holder["id"] == candidate["id"]:
        raise Conflict(f"{candidate['ref']} already is {candidate['model']}@{alias}")
    needs_holder = any(c.right.metric is not None for c in conditions)
    if holder is None and needs_holder:
        raise Conflict(
            f"{candidate['model']}@{alias} does not exist yet: nothing to compare with "
            f"(set it with 'models alias set', or use a gate with numbers only)"
        )
    version = get_dataset_version(app, dataset)
    label = candidate["signature"].get("target")
    have = {c["name"] for c in version["schema"]}
    if not label or label not in have:
        raise InvalidInput(f"--dataset {version['ref']}: has no label column {label!r}")
    roles = [("candidate", candidate)] + ([("champion", holder)] if holder else [])
    for role, model in roles:
        missing = [f["name"] for f in model["signature"]["signature"] if f["name"] not in have]
        if missing:
            raise InvalidInput(f"--dataset {version['ref']}: {role} needs column {missing[0]!r}")
    spec = evaluation_spec(version, roles, {"label": label, "gate": gate, "alias": alias})
    job = submit_job(
        app,
        spec,
        experiment="promotions",
        run_name=f"promote {candidate['ref']} to {alias}",
        inputs=[("DatasetVersion", f"dataset:{version['ref']}")],
    )
    done = wait_job(app, job["id"], timeout=timeout)
    if done["state"] != "succeeded":
        raise ApplianceError(f"the evaluation job {job['id']} {done['state']}: {done['error']}")
    metrics = latest_metrics(app, job["run_id"])
    scores = {
        role: {k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith(role + ".")}
        for role, _ in roles
    }
    results = check_gate(conditions, scores["candidate"], scores.get("champion"))
    report = {
        "candidate": candidate["ref"],
        "holder": holder["ref"] if holder else None,
        "dataset": version["ref"],
        "gate": gate,
        "conditions": results,
        "metrics": scores,
        "run_id": job["run_id"],
        "passed": all(r["holds"] for r in results),
    }
    if report["passed"]:
        set_alias(
            app,
            candidate["model"],
            alias,
            candidate["version"],
            reason=reason or f"promoted: {gate}",
            report=report,
        )
    return report
