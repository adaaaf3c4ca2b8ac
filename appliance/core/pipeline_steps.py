"""What each pipeline step kind does: how it starts as a job, what its cache key is made of,
whether a cached result still holds, and the body of the control steps.

Compute steps (recipe, train, evaluate, script) are the platform's own jobs, run by the
home's executor (k3s included). Control steps (import, split, validate, training_set,
materialize, tune, register, promote, deploy, rollback) act on this home's registry, so they
run as `pipeline-step` jobs on this machine: a forked body that calls the same core functions
the CLI calls, then reports its outputs as one tag. Every side-effecting body is idempotent
(registering a run already registered returns its version; deploying the served version adds
nothing), so an attempt killed half-way and run again never registers or deploys twice.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.core.context import Appliance
from appliance.core.pipelines import DATASET, KINDS, MODEL, RUN, VERSION, tidy_gate
from appliance.errors import ApplianceError, Conflict, InvalidInput, NotFound

OUTPUTS_TAG = "pipeline.outputs"
STUDY_TAG = "pipeline.study"
NOT_CACHED = {"materialize", "rollback"}  # their effect depends on time and live state
CONTROL_RESOURCES = {"cpu": 0, "memory": 0, "gpu": 0}  # see JobSpec.request
Emit = Callable[[dict[str, Any]], None]


@dataclass
class StepContext:
    """A step about to start: its resolved values and where it belongs."""

    app: Appliance
    run_id: str
    pipeline: str
    step: str
    kind: str
    args: dict[str, Any]
    base: Path | None
    use_cache: bool = True  # False: run it, even where an earlier result could be reused

    def path(self, value: str) -> Path:
        """A file a step names: the run's copy, taken at submission, of a recipe, checks or
        study file; anything else from next to the pipeline file, as it is now."""
        file = Path(value).expanduser()
        file = file if file.is_absolute() or self.base is None else self.base / file
        copy = snapshot_dir(self.app, self.run_id) / snapshot_name(value, self.base)
        return copy if copy.is_file() else file

    def where(self, key: str) -> str:
        return f"steps.{self.step}.{key}"


SNAPSHOT_KINDS = {"recipe": "recipe", "validate": "checks", "tune": "tune"}
SNAPSHOT_LIMIT = 1 << 20


def snapshot_dir(app: Appliance, run_id: str) -> Path:
    return app.settings.home / "pipelines" / run_id


def snapshot_name(value: str, base: Path | None) -> str:
    """Where a file's copy lives in the run's folder: its own relative path when it is
    below the pipeline's folder, else its name under a digest of where it was."""
    path = Path(value).expanduser()
    if not path.is_absolute() and ".." not in path.parts:
        return str(path)
    where = path if path.is_absolute() or base is None else base / path
    digest = hashlib.sha256(str(where.resolve()).encode()).hexdigest()[:16]
    return f"_/{digest}/{path.name}"


def snapshot_files(app: Appliance, run_id: str, pipeline: Any) -> None:
    """Copy the recipe, checks and study files a run's steps name (parameters put in) into
    the run's own folder, so a queued run or a retry reads what was submitted. A file named
    by another step's output, and a script (it runs from its own folder, and its content is
    in the step's cache key), are read as they are when the step starts."""
    import tempfile

    from appliance.core.pipelines import resolve

    target = snapshot_dir(app, run_id)
    for step in pipeline.steps.values():
        key = SNAPSHOT_KINDS.get(step.kind)
        value = step.args.get(key) if key else None
        if not isinstance(value, str) or "${steps." in value:
            continue
        value = str(resolve(value, pipeline.params, {}))
        source = Path(value).expanduser()
        if not source.is_absolute() and pipeline.base is not None:
            source = pipeline.base / source
        if not source.is_file():
            raise InvalidInput(f"steps.{step.name}.{key}: {value}: no such file")
        if source.stat().st_size > SNAPSHOT_LIMIT:
            raise InvalidInput(f"steps.{step.name}.{key}: {value}: larger than 1 MiB")
        dest = target / snapshot_name(value, pipeline.base)
        dest.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
            tmp.write(source.read_bytes())
        Path(tmp.name).replace(dest)


# ---- cache keys ---------------------------------------------------------------------------


def _file_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pin(app: Appliance, kind: str | None, value: Any, where: str) -> Any:
    """A value as the exact thing it names now: a dataset as name@N and its content, a
    model version through its alias, so a key changes exactly when an input does."""
    from appliance.core.datasets import get_dataset_version
    from appliance.core.registry import get_model_version

    if isinstance(value, dict):
        return {k: _pin(app, kind, v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_pin(app, kind, v, where) for v in value]
    if not isinstance(value, str):
        return value
    try:
        if kind == DATASET:
            version = get_dataset_version(app, value)
            return {"ref": version["ref"], "sha256": version["sha256"]}
        if kind in (VERSION, MODEL):
            version = get_model_version(app, value)
            return {"ref": version["ref"], "sha256": version["sha256"]}
    except NotFound as exc:
        raise InvalidInput(f"{where}: {exc.message}") from None
    return value


def key_material(ctx: StepContext) -> dict[str, Any]:
    """What a step's cache key is made of: its kind, its values with every input pinned,
    and the content of the files it reads."""
    kind = KINDS[ctx.kind]
    args: dict[str, Any] = {}
    for key, value in sorted(ctx.args.items()):
        if key in ("cache", "timeout", "retries"):
            continue
        args[key] = _pin(ctx.app, kind.keys.get(key), value, ctx.where(key))
    files: dict[str, str] = {}
    for key in kind.files:
        if isinstance(ctx.args.get(key), str):
            path = ctx.path(ctx.args[key])
            if not path.is_file():
                raise InvalidInput(f"{ctx.where(key)}: {ctx.args[key]}: no such file")
            files[key] = _file_sha(path)
    material: dict[str, Any] = {"kind": ctx.kind, "args": args, "files": files}
    if ctx.kind == "import":
        from appliance.core.datasets import resolve_sources

        source = str(ctx.args["import"])
        if "://" in source:  # what a URL holds now is not known without reading it
            material["always"] = f"an import from {source.split('://')[0]}:// always runs"
        else:
            names, _ = resolve_sources(str(ctx.path(source)))
            files["import"] = {Path(n).name: _file_sha(Path(n)) for n in names}
    if ctx.kind == "recipe":
        from appliance.core.query import referenced_datasets

        bound = ctx.args.get("inputs")
        bound = {bound.partition("@")[0]} if isinstance(bound, str) else set(bound or {})
        sql = ctx.path(str(ctx.args["recipe"])).read_text()
        material["reads"] = {  # datasets the SQL names itself, beside its inputs
            token: {"ref": v["ref"], "sha256": v["sha256"]}
            for token, v in sorted(referenced_datasets(ctx.app, sql).items())
            if token not in {b.lower() for b in bound}
        }
    if ctx.kind == "tune":
        spec = _tune_yaml(ctx)
        train = spec.get("train") or {}
        script = train.get("script")
        if isinstance(script, str) and ctx.path(script).is_file():
            files["tune.script"] = _file_sha(ctx.path(script))
        material["reads"] = {  # datasets the study file names that the step does not set
            role: _pin(ctx.app, DATASET, train[role], ctx.where(f"tune: train.{role}"))
            for role in ("train", "valid", "test")
            if isinstance(train.get(role), str) and ctx.args.get(role) is None
        }
    if ctx.kind == "training_set":
        material["reads"] = _service_sources(ctx)
    return material


def _service_sources(ctx: StepContext) -> dict[str, Any]:
    """A feature service as it is now: its version, and each view's version and the
    dataset version it reads (a new definition or new source data changes the key)."""
    from appliance.core.features import get_definition, source_version

    try:
        service = get_definition(ctx.app, "service", str(ctx.args["training_set"]))
        pinned: dict[str, Any] = {"service": service["ref"]}
        for item in service["features"]:
            view = get_definition(ctx.app, "view", f"{item['view']}@{item['view_version']}")
            source = source_version(ctx.app, view)
            pinned[view["ref"]] = {"ref": source["ref"], "sha256": source["sha256"]}
    except NotFound as exc:
        raise InvalidInput(f"{ctx.where('training_set')}: {exc.message}") from None
    return pinned


def cache_key(material: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


def differences(before: Any, after: Any, prefix: str = "") -> list[str]:
    """Where two key materials differ, as `path: old -> new` (why a step missed)."""
    pinned = isinstance(before, dict) and "ref" in before  # one input: name@N and content
    if isinstance(before, dict) and isinstance(after, dict) and not pinned:
        found = []
        for key in sorted(set(before) | set(after)):
            found += differences(before.get(key), after.get(key), f"{prefix}{key}.")
        return found
    if before == after:
        return []

    def short(value: Any) -> str:
        if isinstance(value, dict) and "ref" in value:
            return str(value["ref"]) + (
                "" if "sha256" not in value else f" ({str(value['sha256'])[:8]})"
            )
        text = json.dumps(value) if not isinstance(value, str) else value
        return text if len(text) <= 40 else text[:12] + "…"

    return [f"{prefix.rstrip('.')}: {short(before)} -> {short(after)}"]


def still_holds(app: Appliance, kind: str, outputs: dict[str, Any]) -> str | None:
    """None when an earlier result can be reused now, else why not (a version removed, an
    alias moved, a deployment serving something else)."""
    from appliance.core.datasets import get_dataset_version
    from appliance.core.registry import get_model_version

    for name, value in outputs.items():
        typed = KINDS[kind].outputs.get(name)
        if value is None or typed is None:
            continue
        try:
            if typed == DATASET:
                get_dataset_version(app, str(value))
            elif typed == VERSION:
                if get_model_version(app, str(value))["archived_at"]:
                    return f"{value} was archived since"
            elif typed == RUN:
                if app.db.scalar("SELECT status FROM runs WHERE id = ?", (value,)) != "finished":
                    return f"run {value} is gone or not finished"
        except NotFound:
            return f"{value} no longer exists"
    if kind == "promote":
        alias, model = outputs.get("alias"), str(outputs.get("version", "")).partition("@")[0]
        holder = _holder(app, model, alias) if alias else None
        expected = outputs["version"] if outputs.get("promoted") else outputs.get("holder")
        if holder != expected:
            return f"{model}@{alias} is {holder or 'unset'} now, not {expected or 'unset'}"
    if kind == "deploy":
        from appliance.core.deployments import get_deployment

        try:
            dep = get_deployment(app, str(outputs["deployment"]))
        except NotFound:
            return f"deployment {outputs['deployment']} no longer exists"
        serves = f"{dep['model']}@{dep['model_version']}"
        if serves != outputs.get("version") or dep["status"] != "serving":
            return f"deployment {dep['name']} is {dep['status']} with {serves} now"
    return None


def _holder(app: Appliance, model: str, alias: str) -> str | None:
    from appliance.core.registry import get_model_version

    try:
        return str(get_model_version(app, f"{model}@{alias}")["ref"])
    except ApplianceError:
        return None


# ---- starting a step ----------------------------------------------------------------------


Record = Callable[[sqlite3.Connection, str, str], None]


def start_step(ctx: StepContext, record: Record, tags: dict[str, str]) -> dict[str, Any]:
    """Submit the step's job (its row is written by `record` in the job's transaction);
    returns {"job": job} or, for a result known without running anything, {"outputs": ...}."""
    timeout = ctx.args.get("timeout")
    retries = ctx.args.get("retries", 0)
    submit = {"record": record, "tags": tags}
    a = ctx.args
    if ctx.kind == "recipe":
        from appliance.core.recipes import run_recipe

        inputs = a["inputs"]
        if isinstance(inputs, str):
            inputs = {inputs.partition("@")[0]: inputs}
        if not isinstance(inputs, dict):
            raise InvalidInput(f"{ctx.where('inputs')}: expected a mapping of SQL name: dataset")
        result = run_recipe(
            ctx.app,
            ctx.path(a["recipe"]),
            str(a["out"]),
            bindings=inputs,
            use_cache=ctx.use_cache,
            **submit,
        )
        if result["cached"]:
            return {"outputs": {"out": result["version"]["ref"]}, "note": "the recipe's cache"}
        return {"job": result["job"]}
    if ctx.kind == "train":
        from appliance.core.training import submit_training

        job = submit_training(
            ctx.app,
            str(a["train"]),
            str(a["label"]),
            params=dict(a.get("params") or {}),
            features=list(a["features"]) if a.get("features") else None,
            experiment=ctx.pipeline,
            name=f"{ctx.pipeline}.{ctx.step}",
            trainer=str(a.get("trainer", "lightgbm")),
            valid=a.get("valid"),
            test=a.get("test"),
            timeout=timeout,
            retries=retries,
            **submit,
        )
        return {"job": job}
    if ctx.kind == "script":
        from appliance.core.jobs import submit_script

        args = a.get("args") or []
        if not isinstance(args, list):
            raise InvalidInput(f"{ctx.where('args')}: expected a list")
        inputs = a.get("inputs") or []
        inputs = list(inputs.values()) if isinstance(inputs, dict) else inputs
        if isinstance(inputs, str):
            inputs = [inputs]
        job = submit_script(
            ctx.app,
            ctx.path(a["script"]),
            [str(v) for v in args],
            experiment=ctx.pipeline,
            name=f"{ctx.pipeline}.{ctx.step}",
            inputs=[str(v) for v in inputs],
            timeout=timeout,
            retries=retries,
            **submit,
        )
        return {"job": job}
    if ctx.kind == "evaluate":
        return {"job": _submit_evaluate(ctx, submit, timeout, retries)}
    return {"job": _submit_control(ctx, submit, timeout, retries)}


def _submit_evaluate(
    ctx: StepContext, submit: dict[str, Any], timeout: Any, retries: Any
) -> dict[str, Any]:
    from appliance.core.datasets import get_dataset_version
    from appliance.core.jobs import submit_job
    from appliance.core.promotion import evaluation_spec
    from appliance.core.registry import get_model_version

    model = get_model_version(ctx.app, str(ctx.args["evaluate"]))
    version = get_dataset_version(ctx.app, str(ctx.args["data"]))
    label = model["signature"].get("target")
    have = {c["name"] for c in version["schema"]}
    if not label or label not in have:
        raise InvalidInput(f"{ctx.where('data')}: {version['ref']} has no label column {label!r}")
    spec = evaluation_spec(
        version, [("candidate", model)], {"label": label}, timeout=timeout, retries=retries
    )
    return submit_job(
        ctx.app,
        spec,
        experiment=ctx.pipeline,
        run_name=f"{ctx.pipeline}.{ctx.step}",
        inputs=[("DatasetVersion", f"dataset:{version['ref']}")],
        **submit,
    )


def _submit_control(
    ctx: StepContext, submit: dict[str, Any], timeout: Any, retries: Any
) -> dict[str, Any]:
    from appliance.core.jobs import JobSpec, submit_job

    spec = JobSpec(
        kind="pipeline-step",
        params={
            "pipeline_run": ctx.run_id,
            "step": ctx.step,
            "kind": ctx.kind,
            "args": ctx.args,
            "base": str(ctx.base) if ctx.base else None,
        },
        resources=dict(CONTROL_RESOURCES),
        timeout=timeout,
        retries=retries,
    )
    return submit_job(
        ctx.app,
        spec,
        experiment=ctx.pipeline,
        run_name=f"{ctx.pipeline}.{ctx.step}",
        executor_name="local",
        **submit,
    )


def job_outputs(app: Appliance, kind: str, job_run_id: str, detail: dict[str, Any]) -> dict:
    """A finished step job's outputs, read from what the job recorded."""
    if kind in ("train", "evaluate", "script"):
        return {"run": job_run_id}
    if kind == "recipe":
        from appliance.core.recipes import cached_output

        spec = app.db.scalar(  # the recipe's own key travels in its job's spec
            "SELECT j.spec_json FROM jobs j JOIN runs r ON r.job_id = j.id WHERE r.id = ?",
            (job_run_id,),
        )
        version = cached_output(
            app, str(json.loads(spec or "{}").get("params", {}).get("cache_key"))
        )
        if version is None:
            raise ApplianceError("the recipe job succeeded but recorded no dataset version")
        return {"out": version["ref"]}
    text = app.db.scalar(
        "SELECT value FROM run_tags WHERE run_id = ? AND key = ?", (job_run_id, OUTPUTS_TAG)
    )
    if text is None:
        raise ApplianceError("the step's job succeeded but reported no outputs")
    return dict(json.loads(text))


# ---- control step bodies (run inside a pipeline-step job) ---------------------------------


def step_job(spec: Any, emit: Emit) -> None:
    """The body of a `pipeline-step` job: one control action on this home's registry, then
    its outputs as one tag (the supervisor records it; the orchestrator reads it)."""
    params = spec.params
    app = Appliance.open(os.environ.get("APPLIANCE_HOME"))
    try:
        ctx = StepContext(
            app=app,
            run_id=params["pipeline_run"],
            pipeline="",
            step=params["step"],
            kind=params["kind"],
            args=params["args"],
            base=Path(params["base"]) if params.get("base") else None,
        )
        emit({"type": "status", "message": f"{ctx.kind} {ctx.step}"})
        outputs = _BODIES[ctx.kind](ctx, emit)
        print(f"{ctx.kind} step {ctx.step}: {json.dumps(outputs, sort_keys=True)}", flush=True)
        emit({"type": "tag", "name": OUTPUTS_TAG, "value": json.dumps(outputs, sort_keys=True)})
    finally:
        app.close()


def _import(ctx: StepContext, emit: Emit) -> dict[str, Any]:
    from appliance.core.datasets import ImportOptions, import_data

    source = str(ctx.args["import"])
    local = ctx.path(source)
    if "://" not in source:
        source = str(local)
    opts = ImportOptions(format=ctx.args["format"]) if ctx.args.get("format") else None
    version = import_data(ctx.app, str(ctx.args["name"]), source, opts)
    return {"out": version["ref"]}


def _split(ctx: StepContext, emit: Emit) -> dict[str, Any]:
    from appliance.core.splits import split

    a = ctx.args
    made = split(
        ctx.app,
        str(a["split"]),
        [float(f) for f in a["fractions"]],
        seed=int(a.get("seed", 0)),
        stratify=a.get("stratify"),
        time_col=a.get("time_col"),
        group=a.get("group"),
    )
    names = ("train", "valid", "test")
    return {names[i]: v["ref"] for i, v in enumerate(made)} | {n: None for n in names[len(made) :]}


def _validate(ctx: StepContext, emit: Emit) -> dict[str, Any]:
    from appliance.core import duck
    from appliance.core.checks import load_checks_text, run_checks
    from appliance.core.datasets import get_dataset_version, table_sql

    version = get_dataset_version(ctx.app, str(ctx.args["validate"]))
    path = ctx.path(str(ctx.args["checks"]))
    checks = load_checks_text(path.read_text(), str(path))
    con = duck.connect(ctx.app.settings)
    try:
        results = run_checks(
            con,
            table_sql(ctx.app, version),
            checks,
            [c["name"] for c in version["schema"]],
            version.get("timestamp_col"),
        )
    finally:
        con.close()
    for result in results:
        print(json.dumps(result, default=str))
    failed = [r for r in results if r.get("failing")]
    if failed:  # stops what depends on it: data that fails its checks is not trained on
        raise InvalidInput(
            f"{ctx.where('checks')}: {version['ref']} fails {len(failed)} check(s) of "
            f"{path.name}: " + "; ".join(f"{r['check']}: {r['failing']} failing" for r in failed)
        )
    return {"passed": True}


def _training_set(ctx: StepContext, emit: Emit) -> dict[str, Any]:
    from appliance.core.features import training_set

    made = training_set(
        ctx.app, str(ctx.args["training_set"]), str(ctx.args["entities"]), str(ctx.args["out"])
    )
    return {"out": made["ref"]}


def _materialize(ctx: StepContext, emit: Emit) -> dict[str, Any]:
    from appliance.core.online import materialize

    view = ctx.args["materialize"]
    written = materialize(ctx.app, None if view in ("all", "*") else str(view))
    print(json.dumps(written, default=str))
    return {}


def _tune(ctx: StepContext, emit: Emit) -> dict[str, Any]:
    """Run the study here, as its driver (its trials are jobs); a retried attempt resumes
    the study the first attempt started instead of starting another."""
    from appliance.core.runs import set_tags
    from appliance.core.studies import (
        create_study,
        drive_study,
        get_study,
        resume_study,
        stop_study,
    )
    from appliance.core.tuning import parse_study

    study_id = step_study(ctx.app, ctx.run_id, ctx.step)  # an interrupted attempt's
    if study_id is None:
        data = _tune_yaml(ctx)
        train = dict(data.get("train") or {})
        for key in ("train", "valid", "test"):
            if ctx.args.get(key) is not None:
                train[key] = ctx.args[key]
        data["train"] = train
        if ctx.args.get("max_trials") is not None:
            data["max_trials"] = int(ctx.args["max_trials"])
        if isinstance(train.get("script"), str):
            train["script"] = str(ctx.path(train["script"]))
        spec = parse_study(ctx.app, data, ctx.where("tune"))
        study = create_study(ctx.app, spec, start=False)
        study_id = study["id"]
        with ctx.app.db.transaction() as conn:
            set_tags(conn, study["run_id"], {"pipeline.run": ctx.run_id, "pipeline.step": ctx.step})
    elif get_study(ctx.app, study_id)["state"] not in ("running", "stopping", "succeeded"):
        resume_study(ctx.app, study_id, start=False)
    print(f"study {study_id}", flush=True)
    emit({"type": "tag", "name": STUDY_TAG, "value": study_id})
    previous = signal.signal(signal.SIGTERM, _stop_tuning)
    try:
        drive_study(ctx.app, study_id)
    except _Stopped:  # the step was cancelled: its trials must not run on without it
        stop_study(ctx.app, study_id)
        raise ApplianceError(f"study {study_id} stopped: the step was cancelled") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    study = get_study(ctx.app, study_id)
    if study["state"] != "succeeded" or study["best_trial"] is None:
        raise ApplianceError(
            f"study {study['name']} ({study_id}) {study['state']}: "
            f"{study.get('stop_reason') or 'no succeeded trial'}"
        )
    best_run = ctx.app.db.scalar(
        "SELECT run_id FROM trials WHERE study_id = ? AND number = ?",
        (study_id, study["best_trial"]),
    )
    return {"best_run": best_run, "study": study_id}


def step_study(app: Appliance, run_id: str, step: str) -> str | None:
    """The study a tune step started (its parent run is tagged with the step)."""
    found = app.db.scalar(
        "SELECT s.id FROM studies s JOIN run_tags a ON a.run_id = s.run_id "
        "JOIN run_tags b ON b.run_id = s.run_id WHERE a.key = 'pipeline.run' AND a.value = ? "
        "AND b.key = 'pipeline.step' AND b.value = ? ORDER BY s.created_at DESC LIMIT 1",
        (run_id, step),
    )
    return str(found) if found is not None else None


def abandon_study(app: Appliance, run_id: str, step: str) -> None:
    """A tune step that ended without succeeding (cancelled, timed out, killed): its study
    stops and no trial of it runs on. The agent calls this, so it holds even when the step's
    own process was killed before it could clean up."""
    from appliance.core.studies import cancel_trial_jobs, get_study, stop_study

    study_id = step_study(app, run_id, step)
    if study_id is None:
        return
    # `interrupted`: its driver (the step's process) is gone while it still says running
    if get_study(app, study_id)["state"] in ("running", "stopping", "interrupted"):
        with contextlib.suppress(ApplianceError):
            stop_study(app, study_id, timeout=0.5)
    cancel_trial_jobs(app, study_id)


class _Stopped(BaseException):
    """SIGTERM inside a tune step: unwinds the driver so its trials are stopped."""


def _stop_tuning(signum: int, frame: object) -> None:
    raise _Stopped


def _tune_yaml(ctx: StepContext) -> dict[str, Any]:
    import yaml

    path = ctx.path(str(ctx.args["tune"]))
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise InvalidInput(f"{ctx.where('tune')}: {path.name}: {exc}") from None
    if not isinstance(data, dict):
        raise InvalidInput(f"{ctx.where('tune')}: {path.name}: expected a study mapping")
    return data


def _register(ctx: StepContext, emit: Emit) -> dict[str, Any]:
    from appliance.core.registry import register_model

    model, run_id = str(ctx.args["model"]), str(ctx.args["register"])
    existing = ctx.app.db.one(
        "SELECT m.name, v.version FROM model_versions v JOIN registered_models m "
        "ON m.id = v.model_id WHERE m.name = ? AND v.run_id = ?",
        (model, run_id),
    )
    if existing is not None:  # an attempt that registered, then died: never twice
        return {"version": f"{existing['name']}@{existing['version']}"}
    return {"version": register_model(ctx.app, model, run_id)["ref"]}


def _promote(ctx: StepContext, emit: Emit) -> dict[str, Any]:
    """Move the alias if the gate holds: on a dataset (both scored by one evaluate job) when
    `data` is given, else on the metrics each version was registered with. With no holder
    yet, the conditions that compare with it have nothing to beat: the others (fixed
    thresholds) must still hold, and every metric the gate names must exist."""
    from appliance.core.promotion import check_gate, parse_gate, promote
    from appliance.core.registry import get_model_version, set_alias

    alias = str(ctx.args["to"])
    candidate = get_model_version(ctx.app, str(ctx.args["promote"]))
    holder = _holder(ctx.app, candidate["model"], alias)
    out = {"version": candidate["ref"], "alias": alias, "holder": holder, "promoted": False}
    if holder == candidate["ref"]:
        return {**out, "promoted": True}
    gate = ctx.args.get("gate")
    if not gate:
        set_alias(ctx.app, candidate["model"], alias, candidate["version"], reason="pipeline")
        return {**out, "promoted": True}
    gate = tidy_gate(str(gate))
    conditions = parse_gate(gate, alias)
    if holder is None:
        # a condition on the holder becomes "the metric exists": nothing to beat, but a
        # misspelt metric still fails the gate
        checked = [
            f"{c.left} {c.op} {c.right.offset:g}"
            if c.right.metric is None
            else f"{c.left} >= -1e308"
            for c in conditions
        ]
        gate_now = " and ".join(checked)
        conditions = parse_gate(gate_now, alias)
    else:
        gate_now = gate
    if ctx.args.get("data"):
        report = promote(ctx.app, candidate["ref"], alias, gate_now, str(ctx.args["data"]))
        print(json.dumps(report, default=str))
        return {**out, "promoted": bool(report["passed"])}
    held = get_model_version(ctx.app, holder)["metrics"] if holder else None
    try:
        results = check_gate(conditions, candidate["metrics"], held)
    except InvalidInput as exc:
        raise InvalidInput(f"{ctx.where('gate')}: {exc.message.removeprefix('--gate: ')}") from None
    for result in results:
        print(json.dumps(result))
    if all(r["holds"] for r in results):
        why = gate if holder else f"{gate} (no {alias} yet to compare with)"
        report = {"candidate": candidate["ref"], "holder": holder, "conditions": results}
        set_alias(
            ctx.app,
            candidate["model"],
            alias,
            candidate["version"],
            reason=f"promoted: {why}",
            report=report,
        )
        return {**out, "promoted": True}
    return out


def _deploy(ctx: StepContext, emit: Emit) -> dict[str, Any]:
    from appliance.core.deployments import (
        create_deployment,
        deploy,
        get_deployment,
        start_deployment,
    )
    from appliance.core.registry import get_model_version

    name = str(ctx.args["name"])
    version = get_model_version(ctx.app, str(ctx.args["deploy"]))
    try:
        get_deployment(ctx.app, name)
        deploy(ctx.app, name, version["ref"])
    except NotFound:
        create_deployment(ctx.app, name, version["ref"])
    dep = get_deployment(ctx.app, name)
    if dep["status"] != "serving":  # a stopped deployment: a deploy step means "serve it"
        start_deployment(ctx.app, name, dep["host"], dep["port"] or 0)
        dep = get_deployment(ctx.app, name)
    if f"{dep['model']}@{dep['model_version']}" != version["ref"]:
        raise Conflict(f"deployment {name} serves {dep['model']}@{dep['model_version']}")
    return {
        "deployment": name,
        "revision": dep["current_revision"],
        "version": version["ref"],
        "url": dep.get("url"),
    }


def _rollback(ctx: StepContext, emit: Emit) -> dict[str, Any]:
    from appliance.core.deployments import rollback

    target = ctx.args.get("to_revision")
    dep = rollback(ctx.app, str(ctx.args["rollback"]), int(target) if target else None)
    return {"revision": dep["current_revision"]}


_BODIES: dict[str, Callable[[StepContext, Emit], dict[str, Any]]] = {
    "import": _import,
    "split": _split,
    "validate": _validate,
    "training_set": _training_set,
    "materialize": _materialize,
    "tune": _tune,
    "register": _register,
    "promote": _promote,
    "deploy": _deploy,
    "rollback": _rollback,
}
