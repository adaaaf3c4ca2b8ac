"""Search spaces for tuning, and the ask/tell suggester that walks them.

A space is YAML: `{param: {distribution: args}}`, with `uniform`, `loguniform`, `quniform`,
`qloguniform`, `normal`, `randint` and `choice` (whose options may be spaces themselves).
Every bound is checked and every error names the parameter. hyperopt 0.3 draws the
suggestions; it is driven ask/tell style (suggest from the current history, record pending
trials before asking again, a fresh seed per suggestion) so parallel trials differ without
Spark or MongoDB, and parameters come back as the values a trial uses, never as indices.
`grid` enumerates a discrete space instead.
"""

from __future__ import annotations

import itertools
import math
import random
import warnings
from typing import Any

from appliance.errors import InvalidInput

ALGORITHMS = ("tpe", "random", "anneal", "grid")
# distribution -> the arguments it takes, in order
DISTRIBUTIONS = {
    "uniform": ("low", "high"),
    "loguniform": ("low", "high"),
    "quniform": ("low", "high", "q"),
    "qloguniform": ("low", "high", "q"),
    "normal": ("mu", "sigma"),
    "randint": ("low", "high"),
    "choice": ("options",),
}
GRID_LIMIT = 100_000  # points a grid may have


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise InvalidInput(f"{where}: expected a finite number, got {value!r}")
    return float(value)


def _key(name: Any, where: str) -> str:
    """A parameter's name: hyperopt labels a nested option's parameters `choice.index.name`,
    so a name with a dot could collide with one of those labels."""
    if not isinstance(name, str) or not name or "." in name:
        raise InvalidInput(f"{where}: a parameter name must be non-empty text without '.'")
    return name


def _param(name: str, spec: Any, where: str) -> dict[str, Any]:
    """One parameter, validated, as {kind, args} (choice options parsed recursively)."""
    if not isinstance(spec, dict) or len(spec) != 1:
        raise InvalidInput(f"{where}: expected one distribution, e.g. {{uniform: [0, 1]}}")
    kind, args = next(iter(spec.items()))
    if kind not in DISTRIBUTIONS:
        raise InvalidInput(
            f"{where}: unknown distribution {kind!r}; expected one of {', '.join(DISTRIBUTIONS)}"
        )
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise InvalidInput(f"{where}: choice needs a non-empty list of options")
        options = []
        for i, option in enumerate(args):
            if isinstance(option, dict) and option and all(isinstance(k, str) for k in option):
                # a nested space: each of its parameters named within this option
                nested = {
                    _key(k, f"{where}[{i}].{k}"): _param(f"{name}.{i}.{k}", v, f"{where}[{i}].{k}")
                    for k, v in option.items()
                }
                _check_disjoint(nested, f"{where}[{i}]")
                options.append({"space": nested})
            else:
                options.append({"value": option})
        return {"kind": kind, "name": name, "options": options}
    names = DISTRIBUTIONS[kind]
    if not isinstance(args, list) or len(args) != len(names):
        raise InvalidInput(f"{where}: {kind} takes [{', '.join(names)}]")
    values = [_number(v, f"{where}.{n}") for v, n in zip(args, names, strict=True)]
    if kind == "normal":
        if values[1] <= 0:
            raise InvalidInput(f"{where}: normal needs sigma > 0, got {values[1]:g}")
    elif values[0] >= values[1]:
        raise InvalidInput(f"{where}: {kind} needs low < high, got [{values[0]:g}, {values[1]:g}]")
    if kind in ("loguniform", "qloguniform") and values[0] <= 0:
        raise InvalidInput(f"{where}: {kind} needs a positive low bound, got {values[0]:g}")
    if kind.startswith("q") and values[2] <= 0:
        raise InvalidInput(f"{where}: {kind} needs q > 0, got {values[2]:g}")
    if kind.startswith("q") and not _multiples(values):
        raise InvalidInput(
            f"{where}: no multiple of q={values[2]:g} lies in [{values[0]:g}, {values[1]:g}]"
        )
    if kind == "randint" and not all(float(v).is_integer() for v in values):
        raise InvalidInput(f"{where}: randint takes whole numbers")
    return {"kind": kind, "name": name, "args": values}


def parse_space(spec: Any, where: str = "space") -> dict[str, dict[str, Any]]:
    """The validated space {param: parsed}; errors name the parameter (`space.lr: …`)."""
    if not isinstance(spec, dict) or not spec:
        raise InvalidInput(f"{where}: expected a mapping of parameter: {{distribution: args}}")
    space = {_key(k, f"{where}.{k}"): _param(str(k), v, f"{where}.{k}") for k, v in spec.items()}
    _check_disjoint(space, where)
    return space


def _check_disjoint(space: dict[str, dict[str, Any]], where: str) -> None:
    """Two parameters a trial takes together must not hand the trainer the same name (one
    value would silently win); the options of one choice may share names, as only one of
    them is taken."""
    seen: dict[str, str] = {}
    for key, param in space.items():
        for name in sorted(space_names({key: param})):
            if name in seen:
                raise InvalidInput(
                    f"{where}.{key}: parameter {name!r} is also set by {where}.{seen[name]}; "
                    "a trial would get only one of them"
                )
            seen[name] = key


def _hyperopt(param: dict[str, Any]) -> Any:
    from hyperopt import hp

    name, kind = param["name"], param["kind"]
    if kind == "choice":
        return hp.choice(
            name,
            [
                {k: _hyperopt(v) for k, v in o["space"].items()} if "space" in o else o["value"]
                for o in param["options"]
            ],
        )
    args = param["args"]
    if kind == "loguniform":  # hyperopt takes log-space bounds; the spec says real ones
        return hp.loguniform(name, math.log(args[0]), math.log(args[1]))
    if kind == "qloguniform":
        return hp.qloguniform(name, math.log(args[0]), math.log(args[1]), args[2])
    if kind == "randint":
        return hp.randint(name, int(args[0]), int(args[1]) + 1)  # both bounds inclusive
    return getattr(hp, kind)(name, *args)


def _plain(value: Any) -> Any:
    """numpy scalars and containers as plain Python (JSON, YAML, LightGBM params)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item"):
        return value.item()
    return value


def _multiples(args: list[float]) -> list[float]:
    """The multiples of q within [low, high]: a quantized parameter's only values."""
    low, high, q = args
    steps = range(math.ceil(low / q - 1e-9), math.floor(high / q + 1e-9) + 1)
    whole = float(q).is_integer()
    return [int(i * q) if whole else round(i * q, 12) for i in steps]


def _whole(param: dict[str, Any]) -> bool:
    """A quantized parameter whose step is a whole number: its values are integers."""
    return param["kind"] in ("quniform", "qloguniform") and float(param["args"][2]).is_integer()


def typed(
    space: dict[str, dict[str, Any]], params: dict[str, Any], vals: dict[str, list[Any]]
) -> dict[str, Any]:
    """Values as a trainer expects them: a quantized value within its bounds (hyperopt
    rounds `exp(u)` to q and may fall below `low`, even to 0), a whole-number step as an int
    (LightGBM refuses `min_data_in_leaf: 45.0`), nested options typed by their own spaces
    (the option hyperopt chose, by its index in `vals`: options may share names)."""
    out = dict(params)
    for name, value in params.items():
        param = space.get(name)
        if param is None:
            continue
        if isinstance(value, dict):
            chosen = vals.get(param["name"]) or []
            option = param["options"][int(chosen[0])] if chosen else {}
            if "space" in option:
                out[name] = typed(option["space"], value, vals)
        elif param["kind"] in ("quniform", "qloguniform") and isinstance(value, int | float):
            points = _multiples(param["args"])
            value = min(max(value, points[0]), points[-1])
            out[name] = int(round(value)) if _whole(param) else round(value, 12)
    return out


def grid_points(space: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Every combination of a discrete space (choice, randint, quniform, qloguniform), in a
    stable order; a continuous parameter is an error naming it."""

    def values(param: dict[str, Any]) -> list[Any]:
        kind = param["kind"]
        if kind == "choice":
            out: list[Any] = []
            for option in param["options"]:
                if "space" in option:
                    out += grid_points(option["space"])
                else:
                    out.append(option["value"])
            return out
        if kind == "randint":
            return list(range(int(param["args"][0]), int(param["args"][1]) + 1))
        if kind in ("quniform", "qloguniform"):
            return _multiples(param["args"])
        raise InvalidInput(
            f"space.{param['name']}: grid needs a discrete space (choice, randint, quniform, "
            f"qloguniform); {kind} is continuous"
        )

    columns = [(name, values(param)) for name, param in space.items()]
    total = math.prod(len(v) for _, v in columns)
    if total > GRID_LIMIT:
        raise InvalidInput(f"space: the grid has {total:,} points (at most {GRID_LIMIT:,})")
    return [
        dict(zip([n for n, _ in columns], combo, strict=True))
        for combo in itertools.product(*(v for _, v in columns))
    ]


def flatten(params: dict[str, Any]) -> dict[str, Any]:
    """A trial's values as the trainer takes them: a nested choice's option (a mapping of
    parameters that go together) contributes its parameters, not itself."""
    out: dict[str, Any] = {}
    for key, value in params.items():
        if isinstance(value, dict):
            out.update(flatten(value))
        else:
            out[key] = value
    return out


def space_names(space: dict[str, dict[str, Any]]) -> set[str]:
    """Every parameter name a trial can hand the trainer (nested options included)."""
    names = set()
    for name, param in space.items():
        options = param.get("options") or []
        nested = [o for o in options if "space" in o]
        if len(nested) < len(options) or not options:
            names.add(name)
        for option in nested:
            names |= space_names(option["space"])
    return names


class Suggester:
    """Ask/tell over hyperopt's algorithms: `ask` returns new trials' parameters (pending
    ones count, so parallel asks differ), `tell` records a loss, a failure or an early stop.
    Failed trials are kept in the history but never steer the search."""

    def __init__(self, space: dict[str, dict[str, Any]], algorithm: str, seed: int = 0) -> None:
        from hyperopt import Domain, Trials

        if algorithm not in ALGORITHMS:
            raise InvalidInput(f"algorithm: {algorithm!r} is not one of {', '.join(ALGORITHMS)}")
        self.space = space
        self.algorithm = algorithm
        self.seed = seed
        self.grid = grid_points(space) if algorithm == "grid" else None
        self.hp_space = {name: _hyperopt(p) for name, p in space.items()}
        self.domain = Domain(lambda params: 0.0, self.hp_space)
        self.trials = Trials()
        self._docs: dict[int, dict[str, Any]] = {}
        self.asked = 0

    def _algo(self) -> Any:
        from hyperopt import anneal, rand, tpe

        return {"tpe": tpe.suggest, "random": rand.suggest, "anneal": anneal.suggest}[
            self.algorithm
        ]

    def ask(self) -> dict[str, Any] | None:
        """The next trial's parameters as plain values ({"trial": id, "params": {...}}), or
        None when a grid is exhausted."""

        if self.grid is not None:
            if self.asked >= len(self.grid):
                return None
            params = self.grid[self.asked]
            self.asked += 1
            return {"trial": self.asked - 1, "params": params, "vals": params}
        (trial_id,) = self.trials.new_trial_ids(1)
        # a fresh seed per suggestion, fixed by the trial number: a resumed study asks the same way
        seed = random.Random(self.seed * 1_000_003 + trial_id).randrange(2**31 - 1)
        with warnings.catch_warnings():
            # anneal takes log(0) of a qloguniform drawn below its first step (then clamped)
            warnings.filterwarnings("ignore", "divide by zero", RuntimeWarning)
            docs = self._algo()([trial_id], self.domain, self.trials, seed)
        self.trials.insert_trial_docs(docs)  # pending: the next ask sees it
        self.trials.refresh()
        doc = self.trials._dynamic_trials[-1]  # the stored doc: tell must change this one
        self._docs[trial_id] = doc
        self.asked += 1
        return {
            "trial": trial_id,
            "params": self.params(doc["misc"]["vals"]),
            "vals": _plain(doc["misc"]["vals"]),
        }

    def params(self, vals: dict[str, list[Any]]) -> dict[str, Any]:
        """hyperopt's encoding of a point (choice indices, inactive branches empty) as the
        values a trial uses."""
        from hyperopt import space_eval

        if self.grid is not None:
            return dict(vals)
        point = space_eval(self.hp_space, {k: v[0] for k, v in vals.items() if len(v)})
        return typed(self.space, _plain(point), vals)

    def replay(self, trial: int, vals: dict[str, Any], loss: float | None, state: str) -> None:
        """Put a stored trial back into the history (a resumed study): `state` 'pending' for
        one that will run again, else as `tell` takes it. Trials replay in number order."""
        from hyperopt.base import JOB_STATE_NEW

        if self.grid is not None:
            self.asked = max(self.asked, trial + 1)
            return
        (trial_id,) = self.trials.new_trial_ids(1)
        if trial_id != trial:
            raise ValueError(f"trial {trial} replayed out of order (expected {trial_id})")
        names = self.domain.params
        misc = {
            "tid": trial_id,
            "cmd": self.domain.cmd,
            "workdir": self.domain.workdir,
            "idxs": {k: [trial_id] if vals.get(k) else [] for k in names},
            "vals": {k: list(vals.get(k) or []) for k in names},
        }
        (doc,) = self.trials.new_trial_docs([trial_id], [None], [{"status": "new"}], [misc])
        doc["state"] = JOB_STATE_NEW
        self.trials.insert_trial_docs([doc])
        self.trials.refresh()
        self._docs[trial_id] = self.trials._dynamic_trials[-1]
        self.asked += 1
        if state != "pending":
            self.tell(trial_id, loss, state)

    def tell(self, trial: int, loss: float | None, state: str = "ok") -> None:
        """Record a finished trial: `loss` (lower is better) for `ok` and `early_stopped`
        (its best value so far), None for `failed`."""
        from hyperopt import JOB_STATE_DONE, JOB_STATE_ERROR, STATUS_FAIL, STATUS_OK

        if self.grid is not None:
            return
        doc = self._docs.get(trial)
        if doc is None:
            raise InvalidInput(f"trial {trial}: never asked for")
        if state == "failed" or loss is None or not math.isfinite(loss):
            doc["state"] = JOB_STATE_ERROR
            doc["result"] = {"status": STATUS_FAIL}
        else:
            doc["state"] = JOB_STATE_DONE
            doc["result"] = {"status": STATUS_OK, "loss": float(loss)}
        self.trials.refresh()
