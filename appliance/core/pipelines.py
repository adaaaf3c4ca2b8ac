"""Pipeline definitions: named steps, typed parameters and explicit references, checked whole
before anything runs.

A pipeline is YAML: `name`, `params` (name: default; the default's type is the parameter's
type) and `steps` (name: step). A step is one lifecycle action, named by its one action key
(`recipe: recipes/clean.sql`, `split: ...`, `deploy: ...`), with the action's own keys and the
common ones (`when`, `after`, `cache`, `timeout`, `retries`). Values refer to parameters and
to earlier steps' outputs as `${params.NAME}` and `${steps.STEP.OUTPUT}`; a value that is one
reference takes the referred value's type, a reference inside text is text. The references
(and `after`) are the edges of the DAG. Everything is checked here, naming the step and the
key: the kind, every key, each reference and its type, cycles, the files a step reads, and
gate expressions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from appliance.core.names import validate_name
from appliance.errors import InvalidInput

_REF = re.compile(r"\$\{([^}]*)\}")
_STEP_NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")

# Value types of references and of the keys that take them.
DATASET, RUN, VERSION, MODEL, BOOL, DEPLOYMENT, TEXT, NUMBER = (
    "dataset",
    "run",
    "model version",
    "model",
    "boolean",
    "deployment",
    "text",
    "number",
)


@dataclass(frozen=True)
class Kind:
    """One step kind: its keys (key -> the type a reference there must have, or None for any),
    which must be given, which name a file, and the outputs a later step may refer to."""

    keys: dict[str, str | None]
    required: tuple[str, ...]
    outputs: dict[str, str]
    files: tuple[str, ...] = ()


KINDS: dict[str, Kind] = {
    "import": Kind(
        {"import": TEXT, "name": TEXT, "format": TEXT}, ("import", "name"), {"out": DATASET}
    ),
    "recipe": Kind(
        {"recipe": TEXT, "inputs": DATASET, "out": TEXT},
        ("recipe", "inputs", "out"),
        {"out": DATASET},
        files=("recipe",),
    ),
    "split": Kind(
        {
            "split": DATASET,
            "fractions": None,
            "stratify": TEXT,
            "time_col": TEXT,
            "group": TEXT,
            "seed": NUMBER,
        },
        ("split", "fractions"),
        {"train": DATASET, "valid": DATASET, "test": DATASET},
    ),
    "validate": Kind(
        {"validate": DATASET, "checks": TEXT},
        ("validate", "checks"),
        {"passed": BOOL},
        files=("checks",),
    ),
    "training_set": Kind(
        {"training_set": TEXT, "entities": DATASET, "out": TEXT},
        ("training_set", "entities", "out"),
        {"out": DATASET},
    ),
    "materialize": Kind({"materialize": TEXT}, ("materialize",), {}),
    "train": Kind(
        {
            "train": DATASET,
            "valid": DATASET,
            "test": DATASET,
            "label": TEXT,
            "trainer": TEXT,
            "params": None,
            "features": None,
        },
        ("train", "label"),
        {"run": RUN},
    ),
    "tune": Kind(
        {
            "tune": TEXT,
            "train": DATASET,
            "valid": DATASET,
            "test": DATASET,
            "max_trials": NUMBER,
        },
        ("tune",),
        {"best_run": RUN, "study": TEXT},
        files=("tune",),
    ),
    "evaluate": Kind({"evaluate": VERSION, "data": DATASET}, ("evaluate", "data"), {"run": RUN}),
    "register": Kind({"register": RUN, "model": TEXT}, ("register", "model"), {"version": VERSION}),
    "promote": Kind(
        {"promote": VERSION, "to": TEXT, "gate": TEXT, "data": DATASET},
        ("promote", "to"),
        {"promoted": BOOL, "version": VERSION},
    ),
    "deploy": Kind(
        {"deploy": VERSION, "name": TEXT},
        ("deploy", "name"),
        {"deployment": DEPLOYMENT, "revision": NUMBER},
    ),
    "rollback": Kind(
        {"rollback": DEPLOYMENT, "to_revision": NUMBER}, ("rollback",), {"revision": NUMBER}
    ),
    "script": Kind(
        {"script": TEXT, "args": None, "inputs": DATASET},
        ("script",),
        {"run": RUN},
        files=("script",),
    ),
}
COMMON = {"when", "after", "cache", "timeout", "retries"}
# What a text may stand for where a typed value is expected: `churn@3`, `churn@champion`.
_TEXT_STANDS_FOR = {DATASET, VERSION, MODEL, DEPLOYMENT, RUN}


@dataclass
class Step:
    """One checked step: its kind, its keys as written, and the steps it waits for."""

    name: str
    kind: str
    args: dict[str, Any]
    after: set[str] = field(default_factory=set)


@dataclass
class Pipeline:
    """A checked pipeline: parameters with their values, steps, and one order to run them."""

    name: str
    params: dict[str, Any]
    steps: dict[str, Step]
    order: list[str]
    source: str
    definition: dict[str, Any] = field(default_factory=dict)  # as written, for a run to keep
    base: Path | None = None  # where its relative files are


def _type_of(value: Any) -> str:
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int | float):
        return NUMBER
    if isinstance(value, list):
        return "list"
    return TEXT


def _refs(value: Any) -> list[tuple[str, bool]]:
    """The references in a value (and whether the value is exactly that reference)."""
    if isinstance(value, str):
        found = _REF.findall(value)
        whole = len(found) == 1 and value.strip() == "${" + found[0] + "}"
        return [(ref.strip(), whole) for ref in found]
    if isinstance(value, dict):
        return [r for v in value.values() for r in _refs(v)]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v)]
    return []


def parse_param(text: str, params: dict[str, Any]) -> tuple[str, Any]:
    """`--param KEY=VALUE`, read as the type of KEY's default."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise InvalidInput(f"--param {text!r}: expected KEY=VALUE")
    if key not in params:
        known = ", ".join(sorted(params)) or "none"
        raise InvalidInput(f"--param {key}: the pipeline has no such parameter (it has: {known})")
    default = params[key]
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("true", "false"):
                raise ValueError
            return key, raw.lower() == "true"
        if isinstance(default, int):
            return key, int(raw)
        if isinstance(default, float):
            return key, float(raw)
    except ValueError:
        raise InvalidInput(
            f"--param {key}: expected {_type_of(default)} like {default!r}, got {raw!r}"
        ) from None
    if isinstance(default, list):
        items = [v.strip() for v in raw.split(",") if v.strip()]
        kinds = {type(d) for d in default if not isinstance(d, bool)}
        if kinds and kinds <= {int, float}:  # numbers stay numbers: `--param parts=0.8,0.2`
            try:
                return key, [int(v) if kinds == {int} else float(v) for v in items]
            except ValueError:
                raise InvalidInput(
                    f"--param {key}: expected numbers separated by commas, got {raw!r}"
                ) from None
        return key, items
    return key, raw


def parse_pipeline(
    data: Any, source: str = "pipeline", base: Path | None = None, overrides: Any = ()
) -> Pipeline:
    """Check a pipeline definition whole; `base` is where its relative files are, and
    `overrides` the `--param KEY=VALUE` texts of a run."""
    if not isinstance(data, dict):
        raise InvalidInput(f"{source}: expected a mapping with name, params and steps")
    unknown = sorted(set(data) - {"name", "description", "params", "steps"})
    if unknown:
        raise InvalidInput(f"{source}: unknown key(s) {unknown}")
    if not isinstance(data.get("name"), str):
        raise InvalidInput(f"{source}: name: expected the pipeline's name (text)")
    name = validate_name(f"{source}: name", data["name"])
    params = data.get("params") or {}
    if not isinstance(params, dict):
        raise InvalidInput(f"{source}: params: expected a mapping of name: default")
    for key, default in params.items():
        if not isinstance(key, str) or not _STEP_NAME.fullmatch(key):
            raise InvalidInput(f"{source}: params.{key}: lowercase letters, digits and '_'")
        if default is None or isinstance(default, dict):
            raise InvalidInput(
                f"{source}: params.{key}: a default of text, number, boolean or list is needed"
            )
    values = dict(params)
    for text in overrides:
        key, value = parse_param(text, params)
        values[key] = value
    raw_steps = data.get("steps")
    if not isinstance(raw_steps, dict) or not raw_steps:
        raise InvalidInput(f"{source}: steps: expected a mapping of step name: step")
    steps = {
        step_name: _step(step_name, body, source, base) for step_name, body in raw_steps.items()
    }
    for step in steps.values():
        _check_refs(step, steps, values, source)
    order = _order(steps, source)
    for step in steps.values():
        if step.kind == "promote" and step.args.get("gate") is not None:
            _check_gate(step, values, source)
    return Pipeline(name, values, steps, order, source, data, base)


def load_pipeline(path: str | Path, overrides: Any = ()) -> Pipeline:
    """A pipeline file, checked; its relative files are read from its own directory."""
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InvalidInput(f"{file}: no such pipeline file") from None
    except IsADirectoryError:
        raise InvalidInput(f"{file}: a directory, not a pipeline file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{file}: cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{file}: not valid YAML: {exc}") from None
    return parse_pipeline(data, str(file), file.resolve().parent, overrides)


def _step(name: Any, body: Any, source: str, base: Path | None) -> Step:
    if not isinstance(name, str) or not _STEP_NAME.fullmatch(name):
        raise InvalidInput(
            f"{source}: step {name!r}: names are lowercase letters, digits and '_' (at most 40)"
        )
    where = f"{source}: steps.{name}"
    if not isinstance(body, dict):
        raise InvalidInput(f"{where}: expected a mapping with one action key ({_kinds()})")
    actions = [k for k in body if k in KINDS]
    # `tune: tune.yaml, train: ...`: an action key may be another kind's own key
    kinds = [k for k in actions if all(a in KINDS[k].keys for a in actions)]
    if len(kinds) != 1:
        if actions:
            what = f"several action keys ({', '.join(actions)})"
        else:
            others = [str(k) for k in body if k not in COMMON]
            what = "no action key" + (f" ({', '.join(others)}: not a step kind)" if others else "")
        raise InvalidInput(f"{where}: {what}; a step does exactly one of: {_kinds()}")
    kind = KINDS[kinds[0]]
    unknown = sorted(set(body) - set(kind.keys) - COMMON)
    if unknown:
        allowed = ", ".join(sorted(set(kind.keys) | COMMON))
        raise InvalidInput(f"{where}.{unknown[0]}: not a key of a {kinds[0]} step ({allowed})")
    missing = [k for k in kind.required if body.get(k) is None]
    if missing:
        raise InvalidInput(f"{where}.{missing[0]}: a {kinds[0]} step needs it")
    for key in kind.files:
        value = body[key]
        if not isinstance(value, str) or not value:
            raise InvalidInput(f"{where}.{key}: expected a file name")
        if base is not None and not _REF.search(value) and not (base / value).is_file():
            raise InvalidInput(f"{where}.{key}: {value}: no such file (next to {source})")
    if kinds[0] == "split" and not _refs(body["fractions"]):  # a reference: checked at run
        _check_fractions(body["fractions"], f"{where}.fractions")
    _check_literals(kinds[0], body, where)
    after = body.get("after") or []
    if isinstance(after, str):
        after = [after]
    if not isinstance(after, list) or not all(isinstance(a, str) for a in after):
        raise InvalidInput(f"{where}.after: expected a step name or a list of them")
    if "cache" in body and not isinstance(body["cache"], bool):
        raise InvalidInput(f"{where}.cache: expected true or false")
    args = {k: v for k, v in body.items() if k not in ("after",)}
    return Step(name, kinds[0], args, set(after))


# Keys whose literal values have a shape beyond "text": checked when written, not at run.
_SHAPES: dict[str, tuple[str, Any]] = {
    "features": (
        "a list of column names",
        lambda v: isinstance(v, list) and all(isinstance(x, str) for x in v),
    ),
    "params": ("a mapping of parameter: value", lambda v: isinstance(v, dict)),
    "args": ("a list of arguments", lambda v: isinstance(v, list)),
    "inputs": (
        "a dataset, a list of them or a mapping of name: dataset",
        lambda v: isinstance(v, str | list | dict),
    ),
    "retries": (
        "a whole number from 0 to 10",
        lambda v: isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 10,
    ),
}


_WHOLE = {"seed": 0, "max_trials": 1, "to_revision": 1}  # whole numbers, at least this
_NAMES = {  # keys that name something new: a dataset, model, alias or deployment
    "import": ("name",),
    "recipe": ("out",),
    "training_set": ("out",),
    "register": ("model",),
    "promote": ("to",),
    "deploy": ("name",),
}


def _check_literals(kind: str, body: dict[str, Any], where: str) -> None:
    """A value written as it is (no reference in it) has the type its key takes."""
    from appliance.core.jobs import parse_duration

    for key, value in body.items():
        if _refs(value):
            continue
        expected = KINDS[kind].keys.get(key)
        if expected == NUMBER and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InvalidInput(f"{where}.{key}: expected a number, got {value!r}")
        if expected in _TEXT_STANDS_FOR | {TEXT} and key != "inputs" and not isinstance(value, str):
            raise InvalidInput(f"{where}.{key}: expected text, got {value!r}")
        if key in _SHAPES and not _SHAPES[key][1](value):
            raise InvalidInput(f"{where}.{key}: expected {_SHAPES[key][0]}, got {value!r}")
        if key == "timeout":
            try:
                parse_duration(value, f"{where}.timeout")
            except InvalidInput as exc:
                raise InvalidInput(exc.message) from None
        if key in _WHOLE and (
            isinstance(value, bool) or value != int(value) or value < _WHOLE[key]
        ):
            raise InvalidInput(f"{where}.{key}: expected a whole number from {_WHOLE[key]}")
        if key in _NAMES.get(kind, ()) and isinstance(value, str):
            validate_name(f"{where}.{key}", value)


def check_values(step: Step, args: dict[str, Any], where: str) -> None:
    """A step's values once references are put in: the checks a written value gets."""
    _check_literals(step.kind, args, where)
    if step.kind == "split":
        _check_fractions(args["fractions"], f"{where}.fractions")


def _kinds() -> str:
    return ", ".join(KINDS)


def _check_fractions(value: Any, where: str) -> None:
    if (
        not isinstance(value, list)
        or len(value) not in (2, 3)
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
        or not all(0 < v < 1 for v in value)
        or abs(sum(value) - 1) > 1e-9
    ):
        raise InvalidInput(f"{where}: expected 2 or 3 fractions between 0 and 1 that add up to 1")


def _check_refs(step: Step, steps: dict[str, Step], params: dict[str, Any], source: str) -> None:
    """Every reference of a step: it names a parameter or an earlier step's output, of the
    type the key takes; each one is an edge of the DAG."""
    kind = KINDS[step.kind]
    for key, value in step.args.items():
        expected = kind.keys.get(key) if key not in COMMON else (BOOL if key == "when" else None)
        for ref, whole in _refs(value):
            where = f"{source}: steps.{step.name}.{key}: ${{{ref}}}"
            parts = ref.split(".")
            if parts[0] == "params" and len(parts) == 2:
                if parts[1] not in params:
                    known = ", ".join(sorted(params)) or "none"
                    raise InvalidInput(f"{where}: no parameter {parts[1]!r} (params: {known})")
                found = _type_of(params[parts[1]])
            elif parts[0] == "steps" and len(parts) == 3:
                other, output = parts[1], parts[2]
                if other not in steps:
                    raise InvalidInput(f"{where}: no step {other!r} (steps: {', '.join(steps)})")
                if other == step.name:
                    raise InvalidInput(f"{where}: a step cannot use its own output")
                outputs = KINDS[steps[other].kind].outputs
                if output not in outputs:
                    have = ", ".join(outputs) or "no outputs"
                    raise InvalidInput(
                        f"{where}: a {steps[other].kind} step has no output {output!r} ({have})"
                    )
                found = outputs[output]
                fractions = steps[other].args.get("fractions")
                if output == "test" and isinstance(fractions, list) and len(fractions) == 2:
                    raise InvalidInput(
                        f"{where}: step {other!r} splits in two (train, valid): no test"
                    )
                step.after.add(other)
            else:
                raise InvalidInput(f"{where}: expected ${{params.NAME}} or ${{steps.STEP.OUTPUT}}")
            if whole and expected is not None and not _fits(found, expected, key):
                raise InvalidInput(f"{where}: is a {found}, but {key} takes a {expected}")
            if not whole and expected in (BOOL, NUMBER):
                raise InvalidInput(
                    f"{where}: {key} takes a {expected}: write the reference alone, not in text"
                )
        if expected == BOOL and not _refs(value) and not isinstance(value, bool):
            raise InvalidInput(
                f"{source}: steps.{step.name}.{key}: expected true, false or a reference"
            )
    for other in step.after:
        if other not in steps:
            raise InvalidInput(f"{source}: steps.{step.name}.after: no step {other!r}")


def _fits(found: str, expected: str, key: str = "") -> bool:
    if found == expected:
        return True
    if found == "list" and key == "inputs":
        return True  # a script's inputs, given as a list parameter
    if found == TEXT and expected in _TEXT_STANDS_FOR:
        return True  # a name or ref given as a parameter: `churn`, `churn@champion`
    return found == VERSION and expected == MODEL


def _order(steps: dict[str, Step], source: str) -> list[str]:
    """The steps in an order that runs every step after what it waits for (Kahn's algorithm,
    ties in the file's order); a cycle is named step by step."""
    waiting = {name: set(step.after) for name, step in steps.items()}
    order: list[str] = []
    while waiting:
        ready = [name for name, deps in waiting.items() if not deps]
        if not ready:
            raise InvalidInput(f"{source}: steps form a cycle: {' -> '.join(_cycle(waiting))}")
        for name in ready:
            order.append(name)
            del waiting[name]
        for deps in waiting.values():
            deps.difference_update(ready)
    return order


def _cycle(waiting: dict[str, set[str]]) -> list[str]:
    """One cycle among steps that all wait: follow what each waits for until a repeat."""
    path: list[str] = []
    name = sorted(waiting)[0]
    while name not in path:
        path.append(name)
        name = sorted(waiting[name])[0]
    return [*path[path.index(name) :], name]


def _check_gate(step: Step, params: dict[str, Any], source: str) -> None:
    """A promote step's gate parses, with the parameters it names put in."""
    from appliance.core.promotion import parse_gate

    gate = step.args["gate"]
    if not isinstance(gate, str):
        raise InvalidInput(f"{source}: steps.{step.name}.gate: expected an expression")

    def value(match: re.Match[str]) -> str:  # a step's output is known only when it runs
        ref = match.group(1).strip()
        return str(params.get(ref.removeprefix("params."), 0))

    text = tidy_gate(_REF.sub(value, gate))
    try:
        parse_gate(text, alias=str(step.args.get("to", "champion")))
    except InvalidInput as exc:
        message = exc.message.removeprefix("--gate: ")
        raise InvalidInput(f"{source}: steps.{step.name}.gate: {message}") from None


def tidy_gate(text: str) -> str:
    """A gate with a negative number put in (`+ -0.01`) as the gate grammar reads it."""
    text = re.sub(r"\+\s*-\s*", "- ", text)
    return re.sub(r"-\s*-\s*", "+ ", text)


def describe(pipeline: Pipeline) -> list[dict[str, Any]]:
    """The steps in run order: kind, what each waits for, its outputs (for `validate`)."""
    return [
        {
            "step": name,
            "kind": pipeline.steps[name].kind,
            "after": ",".join(sorted(pipeline.steps[name].after)),
            "outputs": ",".join(KINDS[pipeline.steps[name].kind].outputs),
        }
        for name in pipeline.order
    ]


def resolve(value: Any, params: dict[str, Any], outputs: dict[str, dict[str, Any]]) -> Any:
    """A step's value with its references put in: a value that is one reference becomes the
    referred value itself (a number stays a number), a reference inside text becomes text."""
    if isinstance(value, dict):
        return {k: resolve(v, params, outputs) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve(v, params, outputs) for v in value]
    if not isinstance(value, str):
        return value

    def lookup(ref: str) -> Any:
        parts = ref.strip().split(".")
        if parts[0] == "params":
            if parts[1] not in params:
                raise InvalidInput(f"${{{ref.strip()}}}: the run has no parameter {parts[1]!r}")
            return params[parts[1]]
        found = outputs[parts[1]].get(parts[2])
        if found is None:
            raise InvalidInput(f"${{{ref.strip()}}}: step {parts[1]!r} produced no {parts[2]}")
        return found

    found = _REF.findall(value)
    if len(found) == 1 and value.strip() == "${" + found[0] + "}":
        return lookup(found[0])
    return _REF.sub(lambda m: str(lookup(m.group(1))), value)
