"""`appliance <noun> <verb>`: each command parses, calls one core function, prints.

Verbs mirror core function names. `--home` and `--json` are accepted on every command.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable
from typing import Any

import click

from appliance import __version__
from appliance.cli.output import emit, table
from appliance.errors import ApplianceError

F = Callable[..., Any]


def _open(home: str | None) -> Any:
    from appliance.core.context import Appliance

    root = click.get_current_context().find_root().params
    return Appliance.open(home or root.get("home"), store=root.get("store"))


def command(group: click.Group, name: str, listing: bool = True) -> Callable[[F], F]:
    """Register a command with --home and (for output commands) --json; opens the home."""

    def decorate(fn: F) -> F:
        @functools.wraps(fn)
        def wrapper(home: str | None, as_json: bool = False, **kwargs: Any) -> Any:
            app = _open(home)
            try:
                return fn(app, as_json, **kwargs) if listing else fn(app, **kwargs)
            finally:
                app.close()

        wrapper = click.option("--home", type=click.Path(), help="Appliance home directory.")(
            wrapper
        )
        if listing:
            wrapper = click.option(
                "--json", "as_json", is_flag=True, help="Print machine-readable JSON."
            )(wrapper)
        return group.command(name)(wrapper)

    return decorate


@click.group(invoke_without_command=True, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--home",
    type=click.Path(),
    help="Appliance home (default $APPLIANCE_HOME or ~/.local/share/appliance).",
)
@click.option(
    "--store",
    type=click.Choice(["local", "s3"]),
    help="Object store backend (overrides appliance.toml and APPLIANCE_STORE).",
)
@click.pass_context
def cli(ctx: click.Context, home: str | None, store: str | None) -> None:
    """appliance: a self-hosted ML platform. With no command, opens the terminal UI."""
    if ctx.invoked_subcommand is None:
        from appliance.tui.app import run_tui

        run_tui(_open(home))


@command(cli, "version")
def version(app: Any, as_json: bool) -> None:
    """Print the appliance version."""
    if as_json:
        emit({"version": __version__}, True)
    else:
        click.echo(__version__)


@command(cli, "doctor")
def doctor_cmd(app: Any, as_json: bool) -> None:
    """Report home, versions, store health, free disk and configured backends."""
    from appliance.core.doctor import doctor

    report = doctor(app)
    if as_json:
        emit(report, True)
    else:
        for key in ("home", "config_file", "executor", "object_store", "disk_free_gb", "schema"):
            click.echo(f"{key:13} {report.get(key)}")
        for name, value in report["versions"].items():
            click.echo(f"{'version':13} {name} {value}")
        for name, value in report["checks"].items():
            click.echo(f"{'check':13} {name}: {value}")
    if not report["ok"]:
        sys.exit(1)


@command(cli, "quickstart")
@click.option("--keep-serving", is_flag=True, help="Leave the deployment running afterwards.")
@click.option("--name", default="churn", show_default=True, help="Dataset/model/deployment name.")
def quickstart_cmd(app: Any, as_json: bool, keep_serving: bool, name: str) -> None:
    """Run the whole lifecycle on the bundled churn sample, end to end."""
    from appliance.core.quickstart import run_quickstart

    step = {"n": 0}

    def progress(message: str) -> None:
        step["n"] += 1
        click.echo(f"[{step['n']}/7] {message}", err=True)

    summary = run_quickstart(app, name=name, keep_serving=keep_serving, progress=progress)
    if as_json:
        emit(summary, True)
        return
    click.echo(f"dataset      {summary['dataset']}")
    for model in summary["models"]:
        click.echo(f"model        {model['ref']}  AUC {model['auc']:.4f}  (run {model['run_id']})")
    click.echo(f"served       versions {' -> '.join(summary['served_versions'])}")
    verdict = "ok" if summary["rollback_ok"] else "FAILED"
    click.echo(
        f"rollback     {verdict}: revision {summary['revision']} serves "
        f"version {summary['served_versions'][-1]}"
    )
    state = "serving" if summary["serving"] else "stopped (use --keep-serving to leave it up)"
    click.echo(f"endpoint     {summary['url']}/v2/models/{summary['deployment']}/infer  [{state}]")
    click.echo("timings      " + ", ".join(f"{k} {v:.2f}s" for k, v in summary["timings"].items()))
    click.echo(
        "next         appliance runs list | appliance lineage "
        f"deployment:{summary['deployment']} | appliance"
    )
    if not summary["rollback_ok"]:
        sys.exit(1)


@command(cli, "lineage")
@click.argument("ref")
def lineage_cmd(app: Any, as_json: bool, ref: str) -> None:
    """What REF came from and what depends on it (dataset:N@V, run:ID, model:N@V, deployment:N)."""
    from appliance.core.lineage import lineage

    graph = lineage(app, ref)
    if as_json:
        emit(graph, True)
        return
    click.echo(f"{graph['ref']}  ({graph['type']})")
    for context in graph["contexts"]:
        extra = ""
        if context["type"] == "PipelineRun" and "pipeline" in context:
            extra = f"  pipeline {context['pipeline']} params {json_cell(context['params'])}"
        click.echo(f"in {context['type']} {context['name']}{extra}")
    for key, arrow in (("upstream", "<-"), ("downstream", "->")):
        click.echo(f"{key}:")
        if not graph[key]:
            click.echo("  (none)")
        _print_tree(graph[key], graph["ref"], arrow)


def _print_tree(nodes: list[dict[str, Any]], root: str, arrow: str) -> None:
    """Nodes found breadth-first, each under the node it was reached from."""
    children: dict[str, list[dict[str, Any]]] = {}
    for node in nodes:
        children.setdefault(node["via"], []).append(node)

    def show(ref: str, depth: int) -> None:
        for node in children.get(ref, []):
            click.echo(f"{'  ' * depth}{arrow} {node['ref']}  ({node['type']})")
            show(node["ref"], depth + 1)

    show(root, 1)


# ---- data -------------------------------------------------------------------------------------
@cli.group("data")
def data() -> None:
    """Datasets: import, list, show."""


@command(data, "import")
@click.argument("name")
@click.argument("source")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["csv", "tsv", "parquet", "json", "ndjson"]),
    help="Source format (default: from the file extension).",
)
@click.option("--delimiter", help="CSV field delimiter (default: detected).")
@click.option("--header/--no-header", default=None, help="Whether the CSV has a header row.")
@click.option("--quote", default='"', show_default=True, help="CSV quote character.")
@click.option("--escape", help="CSV escape character (default: the quote).")
@click.option("--encoding", help="CSV encoding: utf-8 (default), utf-16, latin-1.")
@click.option("--schema", "schema", multiple=True, help="Column type override COL=TYPE.")
@click.option("--timestamp-col", help="The column holding each row's event time.")
@click.option(
    "--strict/--rejects",
    "strict",
    default=True,
    help="Fail on bad rows (default), or keep going and store them as rejects.",
)
@click.option("--checks", "checks_file", type=click.Path(), help="Validation checks (YAML).")
@click.option("--allow-invalid", is_flag=True, help="Keep a version that fails its checks.")
def data_import(
    app: Any,
    as_json: bool,
    name: str,
    source: str,
    fmt: str | None,
    delimiter: str | None,
    header: bool | None,
    quote: str,
    escape: str | None,
    encoding: str | None,
    schema: tuple[str, ...],
    timestamp_col: str | None,
    strict: bool,
    checks_file: str | None,
    allow_invalid: bool,
) -> None:
    """Import SOURCE (file, directory, glob or s3:// URL) as the next version of NAME."""
    from appliance.core.datasets import ImportOptions, import_data
    from appliance.errors import InvalidInput

    overrides = {}
    for item in schema:
        column, sep, duck_type = item.partition("=")
        if not sep or not column or not duck_type:
            raise InvalidInput(f"--schema {item!r}: expected COL=TYPE")
        overrides[column] = duck_type
    options = ImportOptions(
        format=fmt,
        delimiter=delimiter,
        header=header,
        quote=quote,
        escape=escape,
        encoding=encoding,
        schema=overrides,
        timestamp_col=timestamp_col,
        rejects=not strict,
        checks_file=checks_file,
        allow_invalid=allow_invalid,
    )
    result = import_data(app, name, source, options)
    if as_json:
        emit(result, True)
        return
    note = "" if result["created"] else " (unchanged: same content as the latest version)"
    rejected = f", {result['rejects_count']} rejected" if result["rejects_count"] else ""
    click.echo(f"imported {result['ref']}: {result['row_count']} rows{rejected}{note}")
    failed = [v for v in result["validation"] if v["failing"]]
    for check in failed:
        click.echo(f"  check failed (allowed): {check['check']}: {check['failing']}", err=True)


@command(data, "list")
def data_list(app: Any, as_json: bool) -> None:
    """List datasets with their latest version."""
    from appliance.core.resources import list_resources

    columns, rows = list_resources(app, "datasets")
    emit(rows, as_json, columns)


@command(data, "show")
@click.argument("ref")
def data_show(app: Any, as_json: bool, ref: str) -> None:
    """Show a dataset version (NAME or NAME@VERSION) and its schema."""
    from appliance.core.datasets import get_dataset_version

    version = get_dataset_version(app, ref)
    if as_json:
        emit(version, True)
        return
    emit({k: v for k, v in version.items() if k != "schema"}, False)
    click.echo(table(version["schema"], ("name", "type")))


@command(data, "versions")
@click.argument("name")
def data_versions(app: Any, as_json: bool, name: str) -> None:
    """List every version of a dataset."""
    from appliance.core.datasets import list_dataset_versions

    emit(
        list_dataset_versions(app, name),
        as_json,
        ("ref", "row_count", "sha256", "source", "created_at"),
    )


@command(data, "diff")
@click.argument("ref_a")
@click.argument("ref_b")
def data_diff(app: Any, as_json: bool, ref_a: str, ref_b: str) -> None:
    """How REF_B differs from REF_A: rows added/removed, schema, column stats."""
    from appliance.core.query import diff

    result = diff(app, ref_a, ref_b)
    if as_json:
        emit(result, True)
        return
    click.echo(
        f"{result['from']} -> {result['to']}: rows {result['rows'][0]} -> "
        f"{result['rows'][1]} (+{result['rows_added']} / -{result['rows_removed']})"
    )
    sch = result["schema"]
    for label in ("added", "removed"):
        if sch[label]:
            click.echo(f"columns {label}: {', '.join(sch[label])}")
    for change in sch["type_changed"]:
        click.echo(f"type changed: {change['column']} {change['from']} -> {change['to']}")
    rows = [
        {
            "column": c["column"],
            "nulls": f"{c['nulls'][0]} -> {c['nulls'][1]}",
            "mean": "" if "mean" not in c else f"{_fmt(c['mean'][0])} -> {_fmt(c['mean'][1])}",
        }
        for c in result["columns"]
    ]
    click.echo(table(rows, ("column", "nulls", "mean")))


def _fmt(value: Any) -> str:
    return "" if value is None else f"{float(value):.6g}"


@command(data, "export")
@click.argument("ref")
@click.argument("path", type=click.Path())
@click.option("--force", is_flag=True, help="Overwrite PATH if it exists.")
def data_export(app: Any, as_json: bool, ref: str, path: str, force: bool) -> None:
    """Write a version to PATH (.parquet or .csv)."""
    from appliance.core.datasets import export

    emit(export(app, ref, path, overwrite=force), as_json)


@command(data, "rm")
@click.argument("ref")
@click.option("--force", is_flag=True, help="Remove even if models or datasets depend on it.")
def data_rm(app: Any, as_json: bool, ref: str, force: bool) -> None:
    """Remove a dataset version (NAME@VERSION)."""
    from appliance.core.datasets import remove_version

    emit(remove_version(app, ref, force=force), as_json)


@command(data, "preview")
@click.argument("ref")
@click.option("--limit", default=20, show_default=True, type=int)
@click.option("--offset", default=0, show_default=True, type=int)
def data_preview(app: Any, as_json: bool, ref: str, limit: int, offset: int) -> None:
    """Show a page of rows of a version."""
    from appliance.core.datasets import preview

    page = preview(app, ref, limit=limit, offset=offset)
    if as_json:
        emit(page, True)
        return
    rows = [dict(zip(page["columns"], r, strict=True)) for r in page["rows"]]
    click.echo(table(rows, page["columns"]))
    end = page["offset"] + len(page["rows"])
    click.echo(f"rows {page['offset'] + 1}-{end} of {page['total']}", err=True)


@command(data, "profile")
@click.argument("ref")
@click.option("--label", help="Label column: adds each column's correlation or MI with it.")
def data_profile(app: Any, as_json: bool, ref: str, label: str | None) -> None:
    """Profile every column of a version (computed once, then cached)."""
    from appliance.core.profiles import profile

    result = profile(app, ref, label=label)
    if as_json:
        emit(result, True)
        return
    rows = []
    for c in result["columns"]:
        assoc = c.get("vs_label", {})
        rows.append(
            {
                "column": c["name"],
                "type": c["type"],
                "nulls": f"{c['null_pct']}%",
                "distinct": c["distinct_approx"],
                "min": c["min"],
                "max": c["max"],
                "mean": c.get("mean"),
                "top": ", ".join(str(t["value"]) for t in c["top"][:3]),
                "vs_label": next(iter(assoc.values()), None),
            }
        )
    click.echo(
        table(
            rows, ("column", "type", "nulls", "distinct", "min", "max", "mean", "top", "vs_label")
        )
    )


@command(data, "sql")
@click.argument("sql")
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV.")
@click.option("--limit", default=1000, show_default=True, type=click.IntRange(1))
def data_sql(app: Any, as_json: bool, sql: str, as_csv: bool, limit: int) -> None:
    """Run read-only SQL; dataset names read their latest version, "name@v" a given one."""
    from appliance.core.query import run_sql

    result = run_sql(app, sql, limit=limit)
    if as_json:
        emit(result, True)
    elif as_csv:
        import csv

        writer = csv.writer(sys.stdout)
        writer.writerow(result["columns"])
        writer.writerows(result["rows"])
    else:
        click.echo(
            table(
                [dict(zip(result["columns"], r, strict=True)) for r in result["rows"]],
                result["columns"],
            )
        )
    if result["truncated"]:
        click.echo(f"(first {limit} rows shown)", err=True)


@command(data, "rejects")
@click.argument("ref")
def data_rejects(app: Any, as_json: bool, ref: str) -> None:
    """Show the rows an import rejected, with line numbers and reasons."""
    from appliance.core.datasets import rejected_rows

    emit(
        rejected_rows(app, ref),
        as_json,
        ("file", "line", "column_name", "error_type", "error_message", "csv_line"),
    )


@command(data, "checks")
@click.argument("name")
@click.argument("checks_file", required=False, type=click.Path())
def data_checks(app: Any, as_json: bool, name: str, checks_file: str | None) -> None:
    """Show the checks of NAME, or set them from CHECKS_FILE (YAML)."""
    from pathlib import Path

    from appliance.core.datasets import get_checks_text, set_checks_text
    from appliance.errors import InvalidInput

    if checks_file:
        path = Path(checks_file)
        if not path.is_file():
            raise InvalidInput(f"{checks_file}: no such file")
        set_checks_text(app, name, path.read_text())
    text = get_checks_text(app, name)
    if as_json:
        emit({"dataset": name, "checks": text}, True)
    else:
        click.echo(text or "(none)")


@command(data, "split")
@click.argument("ref")
@click.option("--fractions", default="0.7,0.15,0.15", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--stratify", help="Keep the label's proportions in every split.")
@click.option("--time-col", help="Split by time: earliest rows train, latest test.")
@click.option("--group", help="Keep each group in one split.")
@click.option("--out", help="Output name prefix (default: the dataset's name).")
def data_split(
    app: Any,
    as_json: bool,
    ref: str,
    fractions: str,
    seed: int,
    stratify: str | None,
    time_col: str | None,
    group: str | None,
    out: str | None,
) -> None:
    """Split a version into PREFIX_train, PREFIX_valid and PREFIX_test."""
    from appliance.core.splits import parse_fractions, split

    versions = split(
        app,
        ref,
        parse_fractions(fractions),
        seed=seed,
        stratify=stratify,
        time_col=time_col,
        group=group,
        out=out,
    )
    emit(
        [{"ref": v["ref"], "rows": v["row_count"], "created": v["created"]} for v in versions],
        as_json,
        ("ref", "rows", "created"),
    )


@data.group("recipe")
def recipe_group() -> None:
    """Recipes: SQL files that turn dataset versions into a new one."""


@command(recipe_group, "run")
@click.argument("file", type=click.Path())
@click.option("--out", required=True, help="Output dataset name.")
@click.option("--checks", "checks_file", type=click.Path(), help="Validation checks (YAML).")
@click.option("--allow-invalid", is_flag=True, help="Keep an output that fails its checks.")
@click.option("--timestamp-col", help="The output's event-time column.")
@click.option("--no-wait", is_flag=True, help="Submit and return without waiting.")
def recipe_run(
    app: Any,
    as_json: bool,
    file: str,
    out: str,
    checks_file: str | None,
    allow_invalid: bool,
    timestamp_col: str | None,
    no_wait: bool,
) -> None:
    """Run a SQL recipe through the job executor; reuses the output when nothing changed."""
    from appliance.core.recipes import cached_output, run_recipe

    result = run_recipe(
        app,
        file,
        out,
        checks_file=checks_file,
        allow_invalid=allow_invalid,
        timestamp_col=timestamp_col,
    )
    if result["cached"]:
        version = result["version"]
        if as_json:
            emit({"cached": True, **version}, True)
        else:
            click.echo(f"cache hit: {version['ref']} ({version['row_count']} rows), not recomputed")
        return
    job = result["job"]
    if no_wait:
        emit(job, as_json)
        return
    job = _watch(app, job)
    if job["state"] != "succeeded":
        click.echo(f"error: recipe job {job['id']} {job['state']}: {job.get('error')}", err=True)
        sys.exit(1)
    version = cached_output(app, result["key"])
    assert version is not None
    if as_json:
        emit({"cached": False, "job_id": job["id"], **version}, True)
    else:
        click.echo(f"created {version['ref']} ({version['row_count']} rows) by job {job['id']}")


# ---- jobs -------------------------------------------------------------------------------------
def _env(values: tuple[str, ...]) -> dict[str, str]:
    """--env NAME=VALUE options as a mapping (the spec validates the names)."""
    from appliance.errors import InvalidInput

    out = {}
    for item in values:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise InvalidInput(f"--env {item!r}: expected NAME=VALUE")
        out[name] = value
    return out


ENV_HELP = "Set NAME=VALUE for the job (repeatable); jobs get the agent's environment plus these."


@cli.group("jobs")
def jobs_group() -> None:
    """Jobs: train, run your own script, list, logs, cancel."""


def _watch(app: Any, job: dict[str, Any]) -> dict[str, Any]:
    """Show progress on stderr until the job ends: a bar on a terminal, else a line per 25%."""
    import time

    from appliance.core.jobs import FINAL_STATES, poll_job

    interactive = sys.stderr.isatty()
    with click.progressbar(length=100, label=f"job {job['id']}", file=sys.stderr) as bar:
        shown = 0
        while True:
            job = poll_job(app, job["id"])
            total = job.get("progress_total") or 0
            done = int(100 * (job.get("progress_current") or 0) / total) if total else 0
            if done > shown:
                if interactive:
                    bar.update(done - shown)
                elif done // 25 > shown // 25 or done == 100:
                    message = job.get("progress_message") or ""
                    click.echo(f"job {job['id']}: {done}% {message}".rstrip(), err=True)
                shown = done
            if job["state"] in FINAL_STATES:
                break
            time.sleep(0.2)
    click.echo(f"job {job['id']}: {job['state']}", err=True)
    return job


def _report_job(app: Any, job: dict[str, Any], as_json: bool, wait: bool) -> None:
    if wait:
        job = _watch(app, job)
    emit(job, as_json)
    if wait and job["state"] != "succeeded":
        sys.exit(1)


@command(jobs_group, "train")
@click.option("--dataset", required=True, help="Dataset NAME or NAME@VERSION.")
@click.option("--label", "--target", "target", required=True, help="Column to predict.")
@click.option("--feature", "features", multiple=True, help="Feature column (default: all others).")
@click.option("--param", "params", multiple=True, help="Trainer parameter KEY=VALUE.")
@click.option(
    "--trainer",
    type=click.Choice(["lightgbm", "mlp"]),
    default="lightgbm",
    show_default=True,
    help="LightGBM, or a PyTorch MLP (CUDA when present).",
)
@click.option("--cpus", default=1, show_default=True, type=click.IntRange(1), help="Threads.")
@click.option("--experiment", default="default", show_default=True)
@click.option("--name", help="Run name.")
@click.option("--wait", is_flag=True, help="Wait for the job and show progress.")
def jobs_train(
    app: Any,
    as_json: bool,
    dataset: str,
    target: str,
    features: tuple[str, ...],
    params: tuple[str, ...],
    trainer: str,
    cpus: int,
    experiment: str,
    name: str | None,
    wait: bool,
) -> None:
    """Submit a training job (LightGBM or MLP) on a dataset version."""
    from appliance.core.training import parse_param, submit_training

    job = submit_training(
        app,
        dataset,
        target,
        params=dict(parse_param(p) for p in params),
        features=list(features) or None,
        experiment=experiment,
        name=name,
        cpus=cpus,
        trainer=trainer,
    )
    _report_job(app, job, as_json, wait)


@command(jobs_group, "run")
@click.argument("command_args", nargs=-1, required=True)
@click.option("--experiment", default="default", show_default=True)
@click.option("--name", help="Run name.")
@click.option("--env", "env", multiple=True, help=ENV_HELP)
@click.option("--wait", is_flag=True, help="Wait for the job and show progress.")
def jobs_run(
    app: Any,
    as_json: bool,
    command_args: tuple[str, ...],
    experiment: str,
    name: str | None,
    env: tuple[str, ...],
    wait: bool,
) -> None:
    """Run your own command as a job (use -- before it); its JSON lines become metrics."""
    from appliance.core.jobs import JobSpec, submit_job

    job = submit_job(
        app,
        JobSpec(kind="command", command=list(command_args), env=_env(env)),
        experiment=experiment,
        run_name=name or command_args[0],
    )
    _report_job(app, job, as_json, wait)


@command(jobs_group, "submit")
@click.argument("spec_file", type=click.Path())
@click.option("--wait", is_flag=True, help="Wait for the job; exit non-zero if it failed.")
def jobs_submit(app: Any, as_json: bool, spec_file: str, wait: bool) -> None:
    """Queue a job from a spec file (YAML or JSON): kind, entry, resources, timeout, retries."""
    from appliance.core.jobs import load_job_spec, submit_spec

    job = submit_spec(app, load_job_spec(spec_file), source=spec_file)
    _report_job(app, job, as_json, wait)


@command(jobs_group, "list")
def jobs_list(app: Any, as_json: bool) -> None:
    """List jobs, newest first."""
    from appliance.core.resources import list_resources

    columns, rows = list_resources(app, "jobs")
    emit(rows, as_json, columns)


@command(jobs_group, "show")
@click.argument("job_id")
def jobs_show(app: Any, as_json: bool, job_id: str) -> None:
    """Show one job's state, progress and error."""
    from appliance.core.jobs import get_job

    emit(get_job(app, job_id), as_json)


@command(jobs_group, "wait")
@click.argument("job_id")
@click.option("--timeout", type=float, help="Seconds to wait at most.")
def jobs_wait(app: Any, as_json: bool, job_id: str, timeout: float | None) -> None:
    """Wait until a job ends; exits non-zero unless it succeeded."""
    from appliance.core.jobs import wait_job

    job = wait_job(app, job_id, timeout=timeout)
    emit(job, as_json)
    if job["state"] != "succeeded":
        sys.exit(1)


@command(jobs_group, "logs", listing=False)
@click.argument("job_id")
@click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
def jobs_logs(app: Any, job_id: str, follow: bool) -> None:
    """Print a job's log (its plain output lines and errors)."""
    from appliance.core.jobs import follow_log, job_log

    if follow:
        for chunk in follow_log(app, job_id):
            click.echo(chunk, nl=False)
    else:
        click.echo(job_log(app, job_id), nl=False)


@command(jobs_group, "cancel")
@click.argument("job_id")
def jobs_cancel(app: Any, as_json: bool, job_id: str) -> None:
    """Cancel a queued or running job."""
    from appliance.core.jobs import cancel_job

    emit(cancel_job(app, job_id), as_json)


@cli.group("agent", invoke_without_command=True)
@click.option("--idle-exit", help="Exit after this long idle: seconds, or '10m'.")
@click.option(
    "--wait-lock", is_flag=True, help="Wait while another agent runs, instead of exiting (service)."
)
@click.option("--home", type=click.Path(), help="Appliance home directory.")
@click.pass_context
def agent_group(
    ctx: click.Context, idle_exit: str | None, wait_lock: bool, home: str | None
) -> None:
    """The job scheduler. Alone: run it in the foreground (what the systemd unit runs)."""
    if ctx.invoked_subcommand is not None:
        return
    from appliance.core.agent import run_agent
    from appliance.core.jobs import parse_duration

    idle = None if idle_exit is None else parse_duration(idle_exit, "--idle-exit")
    app = _open(home)
    try:
        code = run_agent(app, idle_exit=idle, wait_lock=wait_lock)
    finally:
        app.close()
    sys.exit(code)


@command(agent_group, "status")
def agent_status_cmd(app: Any, as_json: bool) -> None:
    """Whether the agent runs, its pid, the queue and its capacity (machine or cluster)."""
    from appliance.core.agent import agent_status

    emit(agent_status(app), as_json)


@command(agent_group, "start")
def agent_start_cmd(app: Any, as_json: bool) -> None:
    """Start the agent in the background unless it runs (submitting a job does this too)."""
    import time

    from appliance.core.agent import agent_status, ensure_agent

    ensure_agent(app)
    deadline = time.monotonic() + 10
    status = agent_status(app)
    while not status["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
        status = agent_status(app)
    emit(status, as_json)
    if not status["running"]:
        sys.exit(1)


@command(agent_group, "stop")
def agent_stop_cmd(app: Any, as_json: bool) -> None:
    """Stop the agent; running jobs go on under their supervisors."""
    from appliance.core.agent import stop_agent
    from appliance.core.monitors import list_monitors

    emit(stop_agent(app), as_json)
    if not as_json and (watched := len(list_monitors(app))):
        click.echo(
            f"note: {watched} monitor(s) go unchecked while no agent runs "
            "('appliance agent start'; adding a monitor starts one too)",
            err=True,
        )


@command(agent_group, "unit", listing=False)
@click.option("--user", help="Run as this user (a system unit); default: a user unit.")
def agent_unit_cmd(app: Any, user: str | None) -> None:
    """Print a systemd unit that keeps the agent running for this home."""
    from appliance.core.agent import systemd_unit

    click.echo(systemd_unit(app, user=user), nl=False)


@command(cli, "train")
@click.option("--trainer", type=click.Choice(["lightgbm", "mlp"]), help="default: lightgbm")
@click.option("--train", "train_ref", help="Training dataset NAME[@V].")
@click.option("--valid", "valid_ref", help="Validation dataset (default: a fraction of train).")
@click.option("--test", "test_ref", help="Test dataset, evaluated once at the end.")
@click.option("--label", help="Column to predict.")
@click.option(
    "--objective",
    type=click.Choice(["binary", "multiclass", "regression"]),
    help="default: inferred from the label",
)
@click.option("--feature", "features", multiple=True, help="Feature column (default: all others).")
@click.option("--param", "params", multiple=True, help="Trainer parameter KEY=VALUE.")
@click.option("--config", "config_file", type=click.Path(), help="The same keys in YAML.")
@click.option("--experiment", help="default: default")
@click.option("--name", help="Run name.")
@click.option("--cpus", type=click.IntRange(1), help="Threads (default 1).")
@click.option("--timeout", help="Kill the job after this long: seconds, or '30m', '2h'.")
@click.option("--retries", type=click.IntRange(0, 10), help="Run a failed job again (default 0).")
@click.option("--env", "env", multiple=True, help=ENV_HELP)
@click.option("--wait", is_flag=True, help="Wait for the job; exit non-zero if it failed.")
def train_cmd(
    app: Any,
    as_json: bool,
    trainer: str | None,
    train_ref: str | None,
    valid_ref: str | None,
    test_ref: str | None,
    label: str | None,
    objective: str | None,
    features: tuple[str, ...],
    params: tuple[str, ...],
    config_file: str | None,
    experiment: str | None,
    name: str | None,
    cpus: int | None,
    timeout: str | None,
    retries: int | None,
    env: tuple[str, ...],
    wait: bool,
) -> None:
    """Train LightGBM or a PyTorch MLP on dataset versions; prints the run id."""
    from appliance.core.training import load_train_config, parse_param, submit_train_config

    config = load_train_config(config_file) if config_file else {}
    flags = {
        "trainer": trainer,
        "train": train_ref,
        "valid": valid_ref,
        "test": test_ref,
        "label": label,
        "objective": objective,
        "experiment": experiment,
        "name": name,
        "cpus": cpus,
        "timeout": timeout,
        "retries": retries,
    }
    merged = {**config, **{k: v for k, v in flags.items() if v is not None}}
    merged["params"] = {**config.get("params", {}), **dict(parse_param(p) for p in params)}
    if features:
        merged["features"] = list(features)
    if env:
        merged["env"] = _env(env)
    job = submit_train_config(app, merged)
    if wait:
        job = _watch(app, job)
    if as_json:
        emit({"run_id": job["run_id"], "job_id": job["id"], "state": job["state"]}, True)
    else:
        click.echo(job["run_id"])
    if wait and job["state"] != "succeeded":
        click.echo(f"error: job {job['id']} {job['state']}: {job.get('error')}", err=True)
        sys.exit(1)


@cli.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("script", type=click.Path())
@click.argument("script_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--experiment", default="default", show_default=True)
@click.option("--name", help="Run name (default: the script's file name).")
@click.option("--input", "inputs", multiple=True, help="Dataset NAME@V the script reads.")
@click.option("--timeout", help="Kill the job after this long: seconds, or '30m', '2h'.")
@click.option("--retries", type=click.IntRange(0, 10), default=0, help="Run a failed job again.")
@click.option("--cpus", type=float, help="Cores the job needs (default 1).")
@click.option("--gpus", type=click.IntRange(0), help="GPUs the job needs (default 0).")
@click.option("--env", "env", multiple=True, help=ENV_HELP)
@click.option("--wait", is_flag=True, help="Wait for the job and show progress.")
@click.option("--home", type=click.Path(), help="Appliance home directory.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
def run_script(
    script: str,
    script_args: tuple[str, ...],
    experiment: str,
    name: str | None,
    inputs: tuple[str, ...],
    timeout: str | None,
    retries: int,
    cpus: float | None,
    gpus: int | None,
    env: tuple[str, ...],
    wait: bool,
    home: str | None,
    as_json: bool,
) -> None:
    """Run your own Python script as a tracked job: appliance run train.py -- --lr 0.1"""
    from appliance.core.jobs import submit_script

    resources = None
    if cpus is not None or gpus is not None:
        resources = {"cpu": cpus if cpus is not None else 1, "memory": "2Gi", "gpu": gpus or 0}
    app = _open(home)
    try:
        job = submit_script(
            app,
            script,
            list(script_args),
            experiment=experiment,
            name=name,
            inputs=list(inputs),
            timeout=timeout,
            retries=retries,
            resources=resources,
            env=_env(env),
        )
        if not wait and not as_json:
            click.echo(job["run_id"])
            return
        _report_job(app, job, as_json, wait)
    finally:
        app.close()


# ---- runs -------------------------------------------------------------------------------------
@cli.group("bundle")
def bundle_group() -> None:
    """Offline bundles: build one on a connected machine, verify it before installing."""


@command(bundle_group, "build")
@click.option("--arch", required=True, type=click.Choice(["amd64", "arm64"]))
@click.option("--out", required=True, type=click.Path(), help="The bundle file to write.")
@click.option(
    "--manifest",
    "manifest_path",
    default="bundles/manifest.toml",
    show_default=True,
    type=click.Path(),
    help="The pinned artifacts (TOML).",
)
@click.option(
    "--project",
    default=".",
    show_default=True,
    type=click.Path(),
    help="The appliance source tree: its wheel and constraints.txt fill wheels/.",
)
@click.option(
    "--dockerfile",
    type=click.Path(),
    help="The runtime image's Dockerfile (default: the one next to --manifest).",
)
@click.option(
    "--torch-index",
    help="The index torch comes from (default: PyTorch's CPU wheels; a CUDA index for GPUs).",
)
@click.option("--no-wheels", is_flag=True, help="Leave the wheelhouse out (needs --no-image).")
@click.option(
    "--no-image", is_flag=True, help="No Docker: leave out the runtime image and the [[image]]s."
)
def bundle_build(
    app: Any,
    as_json: bool,
    arch: str,
    out: str,
    manifest_path: str,
    project: str,
    dockerfile: str | None,
    torch_index: str | None,
    no_wheels: bool,
    no_image: bool,
) -> None:
    """Fetch every artifact for ARCH (checking its sha256), build the wheelhouse and the
    runtime image, save the container images, and pack the bundle. A manifest that lacks
    something install.sh needs is refused before anything is fetched, unless that part is
    left out on purpose (--no-image, --no-wheels)."""
    from pathlib import Path

    from appliance.core.bundles import TORCH_CPU_INDEX, build_bundle, load_manifest

    def progress(name: str, done: int, total: int) -> None:
        click.echo(f"[{done + 1}/{total}] {name}", err=True)

    manifest = load_manifest(manifest_path)
    image_file = None if no_image else (dockerfile or Path(manifest_path).parent / "Dockerfile")
    result = build_bundle(
        manifest,
        arch,
        out,
        progress=progress,
        project=None if no_wheels else project,
        torch_index=torch_index or TORCH_CPU_INDEX,
        dockerfile=image_file,
        images=not no_image,
    )
    for name in result["unpinned_images"]:
        click.echo(
            f"warning: image {name} is pinned by tag only; the bundle records the digest pulled",
            err=True,
        )
    if result["missing"]:
        click.echo(
            f"warning: a partial bundle: it lacks {', '.join(result['missing'])}, "
            "which install.sh needs (bundles/README.md)",
            err=True,
        )
    emit(result, as_json)


@command(bundle_group, "verify")
@click.argument("bundle", type=click.Path())
@click.option("--arch", type=click.Choice(["amd64", "arm64"]), help="The machine's arch.")
@click.option(
    "--partial", is_flag=True, help="Accept a bundle that lacks what install.sh needs (says what)."
)
def bundle_verify(app: Any, as_json: bool, bundle: str, arch: str | None, partial: bool) -> None:
    """Check a bundle's manifest, architecture and every file's sha256, and that it holds
    every artifact install.sh needs (unless --partial)."""
    from appliance.core.bundles import verify_bundle

    result = verify_bundle(bundle, arch, complete=not partial)
    if result["missing"]:
        click.echo(
            f"warning: a partial bundle: it lacks {', '.join(result['missing'])}, "
            "which install.sh needs",
            err=True,
        )
    emit(result, as_json)


@cli.group("cluster")
def cluster_group() -> None:
    """The k3s cluster: nodes, GPUs, health, and how to join a node."""


@command(cluster_group, "status")
def cluster_status_cmd(app: Any, as_json: bool) -> None:
    """k3s version, nodes ready of total, GPUs allocatable and free, object store health."""
    from appliance.core.cluster import cluster_status

    emit(cluster_status(app.settings), as_json)


@command(cluster_group, "nodes")
def cluster_nodes_cmd(app: Any, as_json: bool) -> None:
    """Every node: roles, readiness, version, address, architecture, cpu, memory, GPUs."""
    from appliance.core.cluster import list_nodes
    from appliance.core.kube import Kube

    emit(
        list_nodes(Kube.for_settings(app.settings)),
        as_json,
        ["name", "roles", "ready", "version", "address", "arch", "cpu", "memory_bytes", "gpus"],
    )


@command(cluster_group, "gpus")
def cluster_gpus_cmd(app: Any, as_json: bool) -> None:
    """GPUs per node: capacity, allocatable, held by running pods, free."""
    from appliance.core.cluster import list_gpus
    from appliance.core.kube import Kube

    emit(
        list_gpus(Kube.for_settings(app.settings)),
        as_json,
        ["node", "capacity", "allocatable", "in_use", "free"],
    )


@command(cluster_group, "join-command")
@click.option("--server-url", help="The URL agents reach (default: the server's address).")
@click.option(
    "--token-file", type=click.Path(), help="The server's join token (default: k3s' own)."
)
@click.option("--show-token", is_flag=True, help="Print the token too (a secret).")
@click.option(
    "--bundle",
    help="The offline bundle's file name on the new node (adds --bundle to the command).",
)
def cluster_join_command(
    app: Any,
    as_json: bool,
    server_url: str | None,
    token_file: str | None,
    show_token: bool,
    bundle: str | None,
) -> None:
    """The command that joins an edge node to this server."""
    from pathlib import Path

    from appliance.core.cluster import NODE_TOKEN, join_command
    from appliance.core.kube import Kube

    emit(
        join_command(
            Kube.for_settings(app.settings),
            server_url=server_url,
            token_file=Path(token_file) if token_file else NODE_TOKEN,
            show_token=show_token,
            bundle=bundle,
        ),
        as_json,
    )


@cli.group("tune", invoke_without_command=True)
@click.option("--config", "config", type=click.Path(), help="The study file (YAML).")
@click.option("--wait", is_flag=True, help="Follow the study; exit non-zero if it failed.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--home", type=click.Path(), help="Appliance home directory.")
@click.pass_context
def tune_group(
    ctx: click.Context, config: str | None, wait: bool, as_json: bool, home: str | None
) -> None:
    """Tuning studies. With --config: start one and print its id."""
    if ctx.invoked_subcommand is not None:
        return
    if config is None:
        click.echo(ctx.get_help())
        sys.exit(2)
    from appliance.core.studies import create_study
    from appliance.core.tuning import load_study

    app = _open(home)
    try:
        spec = load_study(app, config)
        for warning in spec["warnings"]:
            click.echo(f"warning: {warning}", err=True)
        study = create_study(app, spec)
        _report_study(app, study, as_json, wait)
    finally:
        app.close()


def _report_study(app: Any, study: dict[str, Any], as_json: bool, wait: bool) -> None:
    """Print the study id (or JSON); with --wait, a bar over trials until it ends."""
    from appliance.core.studies import get_study, wait_study

    if not wait:
        if as_json:
            emit(_study_summary(study), True)
        else:
            click.echo(study["id"])
        return
    click.echo(f"study {study['id']} ({study['name']})", err=True)
    with click.progressbar(
        length=study["max_trials"], label=f"study {study['name']}", file=sys.stderr
    ) as bar:
        shown = [0]

        def on_change(current: dict[str, Any]) -> None:
            done = current["trials"] - current["counts"]["running"]
            if done > shown[0]:
                bar.update(done - shown[0])
                shown[0] = done

        study = wait_study(app, study["id"], on_change=on_change)
    study = get_study(app, study["id"])
    click.echo(f"study {study['id']}: {study['state']}: {study['message'] or ''}", err=True)
    emit(_study_summary(study), as_json)
    if study["state"] != "succeeded":
        sys.exit(1)


def _study_summary(study: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in study.items() if k not in ("spec", "trial_rows")}


@command(tune_group, "list")
def tune_list(app: Any, as_json: bool) -> None:
    """Every study: state, trials done of the budget, best value."""
    from appliance.core.resources import KINDS
    from appliance.core.studies import list_studies

    emit(list_studies(app), as_json, KINDS["studies"].columns)


@command(tune_group, "show")
@click.argument("study")
def tune_show(app: Any, as_json: bool, study: str) -> None:
    """A study's trials (params, objective, state, duration), best trial and importance."""
    from appliance.core.studies import show_study

    shown = show_study(app, study)
    if as_json:
        emit(shown, True)
        return
    emit(
        {
            k: shown[k]
            for k in ("id", "name", "state", "message", "run_id", "best_trial", "best_value")
        }
        | {
            "trials": f"{shown['trials']}/{shown['max_trials']}",
            "objective": f"{shown['objective']['direction']} {shown['objective']['metric']}",
            "best_params": json_cell(shown["best_params"]),
        },
        False,
    )
    names = sorted({k for t in shown["trial_rows"] for k in t["params"]})
    rows = [
        {
            "trial": t["number"],
            "state": t["state"],
            "objective": _fmt(t["objective"]),
            "seconds": _fmt(t["duration_s"]),
            **{n: json_cell(t["params"].get(n)) for n in names},
            "error": (t["error"] or "")[:60],
        }
        for t in shown["trial_rows"]
    ]
    click.echo()
    click.echo(table(rows, ["trial", "state", "objective", "seconds", *names, "error"]))
    if shown["importance"]:
        click.echo()
        click.echo(
            table(
                [
                    {"param": k, "importance": f"{v:.2f}"}
                    for k, v in sorted(shown["importance"].items(), key=lambda kv: -kv[1])
                ],
                ["param", "importance"],
            )
        )


@command(tune_group, "resume")
@click.argument("study")
@click.option("--max-trials", type=click.IntRange(0), help="A larger budget (all trials count).")
@click.option("--max-failed-trials", type=click.IntRange(0), help="A larger failure budget.")
@click.option("--timeout", help="The study's whole running time: seconds, or '30m'.")
@click.option("--wait", is_flag=True, help="Follow the study; exit non-zero if it failed.")
def tune_resume(
    app: Any,
    as_json: bool,
    study: str,
    max_trials: int | None,
    max_failed_trials: int | None,
    timeout: str | None,
    wait: bool,
) -> None:
    """Continue a stopped or interrupted study from its stored trials."""
    from appliance.core.jobs import parse_duration
    from appliance.core.studies import resume_study

    seconds = None if timeout is None else parse_duration(timeout, "--timeout")
    resumed = resume_study(app, study, max_trials, max_failed_trials, timeout=seconds)
    _report_study(app, resumed, as_json, wait)


@command(tune_group, "stop")
@click.argument("study")
def tune_stop(app: Any, as_json: bool, study: str) -> None:
    """Stop a study: running trials are cancelled (they run again on resume)."""
    from appliance.core.studies import stop_study

    emit(_study_summary(stop_study(app, study)), as_json)


@command(tune_group, "register-best")
@click.argument("study")
@click.option("--model", required=True, help="Register as the next version of this model.")
def tune_register_best(app: Any, as_json: bool, study: str, model: str) -> None:
    """Register the model the study's best trial trained."""
    from appliance.core.studies import register_best

    emit(register_best(app, study, model), as_json)


@cli.group("pipelines")
def pipelines_group() -> None:
    """Pipelines: the lifecycle as a DAG of steps (definitions are checked whole)."""


@command(pipelines_group, "validate")
@click.argument("file", type=click.Path())
@click.option("--param", "params", multiple=True, help="KEY=VALUE, typed as the default.")
def pipelines_validate(app: Any, as_json: bool, file: str, params: tuple[str, ...]) -> None:
    """Check a pipeline file: step kinds and keys, references and their types, cycles, the
    files steps read, gates; print the steps in the order they would run."""
    from appliance.core.pipelines import describe, load_pipeline

    pipeline = load_pipeline(file, params)
    emit(describe(pipeline), as_json, ["step", "kind", "after", "outputs"])


def _report_pipeline_run(app: Any, run: dict[str, Any], as_json: bool, wait: bool) -> None:
    """Print the run id (or JSON); with --wait, a bar over steps, then the DAG; non-zero
    unless the run succeeded."""
    from appliance.core.pipeline_runs import show_run, wait_run

    if not wait:
        emit(run, True) if as_json else click.echo(run["id"])
        return
    click.echo(f"pipeline run {run['id']} ({run['pipeline']})", err=True)
    with click.progressbar(
        length=run["steps"], label=f"pipeline {run['pipeline']}", file=sys.stderr
    ) as bar:
        shown = [0]

        def on_change(current: dict[str, Any]) -> None:
            ended = current["done"] + current["counts"].get("failed", 0)
            if ended > shown[0]:
                bar.update(ended - shown[0])
                shown[0] = ended

        run = wait_run(app, run["id"], on_change=on_change)
    shown_run = show_run(app, run["id"])
    if as_json:
        emit(shown_run, True)
    else:
        _print_pipeline_run(shown_run)
    if run["state"] != "succeeded":
        sys.exit(1)


def _print_pipeline_run(run: dict[str, Any]) -> None:
    click.echo(
        f"run {run['id']}  {run['pipeline']}  {run['state']}  "
        f"{run['done']}/{run['steps']} steps ({run['cached']} cached)  "
        f"{run['duration_s'] or 0:.2f} s"
    )
    click.echo(f"params  {json_cell(run['params'])}")
    if run["error"]:
        click.echo(f"error   {run['error']}")
    rows = [
        {
            **s,
            "after": ",".join(s["after"]),
            "outputs": " ".join(f"{k}={v}" for k, v in s["outputs"].items() if v is not None),
        }
        for s in run["steps_detail"]
    ]
    click.echo(
        table(rows, ["step", "kind", "state", "after", "duration_s", "cache", "outputs", "job_id"])
    )
    for s in run["steps_detail"]:
        if s["why"] or s["error"]:
            click.echo(f"  {s['step']}: {s['error'] or ('cache ' + s['cache'] + ': ' + s['why'])}")


@command(pipelines_group, "run")
@click.argument("file", type=click.Path())
@click.option("--param", "params", multiple=True, help="KEY=VALUE, typed as the default.")
@click.option("--no-cache", is_flag=True, help="Run every step, even one with a cached result.")
@click.option("--wait", is_flag=True, help="Follow the run; exit non-zero unless it succeeded.")
def pipelines_run(
    app: Any, as_json: bool, file: str, params: tuple[str, ...], no_cache: bool, wait: bool
) -> None:
    """Check a pipeline file whole, then queue a run for the agent; print the run id."""
    from appliance.core.pipeline_runs import run_pipeline

    run = run_pipeline(app, file, params, no_cache=no_cache)
    _report_pipeline_run(app, run, as_json, wait)


@command(pipelines_group, "runs")
@click.option("--pipeline", help="Only runs of this pipeline.")
@click.option("--limit", type=int, default=50, show_default=True)
def pipelines_runs(app: Any, as_json: bool, pipeline: str | None, limit: int) -> None:
    """Pipeline runs, newest first."""
    from appliance.core.pipeline_runs import list_runs

    emit(
        list_runs(app, pipeline, limit),
        as_json,
        [
            "id",
            "pipeline",
            "state",
            "trigger",
            "done",
            "steps",
            "cached",
            "duration_s",
            "created_at",
            "error",
        ],
    )


@command(pipelines_group, "show")
@click.argument("run_id")
def pipelines_show(app: Any, as_json: bool, run_id: str) -> None:
    """A run's DAG: each step's state, duration, cache hit (and why), outputs and job."""
    from appliance.core.pipeline_runs import show_run

    run = show_run(app, run_id)
    emit(run, True) if as_json else _print_pipeline_run(run)


@command(pipelines_group, "retry")
@click.argument("run_id")
@click.option("--wait", is_flag=True, help="Follow the run; exit non-zero unless it succeeded.")
def pipelines_retry(app: Any, as_json: bool, run_id: str, wait: bool) -> None:
    """Continue a failed or cancelled run from the steps that did not finish."""
    from appliance.core.pipeline_runs import retry_run

    _report_pipeline_run(app, retry_run(app, run_id), as_json, wait)


@command(pipelines_group, "cancel")
@click.argument("run_id")
def pipelines_cancel(app: Any, as_json: bool, run_id: str) -> None:
    """Stop a run: its running steps' jobs are cancelled; what it made is kept."""
    from appliance.core.pipeline_runs import cancel_run

    emit(cancel_run(app, run_id), as_json)


@command(pipelines_group, "compare")
@click.argument("run_a")
@click.argument("run_b")
def pipelines_compare(app: Any, as_json: bool, run_a: str, run_b: str) -> None:
    """Two runs side by side: parameters, step outputs and final metrics (* differs)."""
    from appliance.core.pipeline_runs import compare_runs

    result = compare_runs(app, run_a, run_b)
    if as_json:
        emit(result, True)
        return
    a, b = result["a"], result["b"]
    rows = [
        {
            "key": ("* " if p["differs"] else "  ") + "param." + p["param"],
            a: json_cell(p["a"]),
            b: json_cell(p["b"]),
        }
        for p in result["params"]
    ]
    for s in result["steps"]:
        for key in sorted(set(s["a_outputs"]) | set(s["b_outputs"])):
            va, vb = s["a_outputs"].get(key), s["b_outputs"].get(key)
            mark = "* " if va != vb else "  "
            rows.append({"key": f"{mark}{s['step']}.{key}", a: json_cell(va), b: json_cell(vb)})
    for m in result["metrics"]:
        mark = "* " if m["a"] != m["b"] else "  "
        rows.append({"key": f"{mark}metric.{m['metric']}", a: m["a"], b: m["b"]})
    click.echo(table(rows, ["key", a, b]))


@command(pipelines_group, "schedule")
@click.argument("file", type=click.Path())
@click.option("--cron", required=True, help="Five cron fields in local time, e.g. '0 3 * * *'.")
@click.option("--param", "params", multiple=True, help="KEY=VALUE for every run it starts.")
@click.option(
    "--policy",
    type=click.Choice(["queue", "skip"]),
    default="queue",
    show_default=True,
    help="When a run of this pipeline is still going: queue one run behind it, or skip.",
)
def pipelines_schedule(
    app: Any, as_json: bool, file: str, cron: str, params: tuple[str, ...], policy: str
) -> None:
    """Run a pipeline on a schedule (the agent fires it; missed times run once)."""
    from appliance.core.pipeline_triggers import schedule_pipeline

    emit(schedule_pipeline(app, file, cron, params, policy), as_json)


@command(pipelines_group, "on-new-version")
@click.argument("file", type=click.Path())
@click.option("--dataset", required=True, help="The dataset whose new versions start a run.")
@click.option(
    "--param-name", help="The parameter that gets NAME@VERSION (default: the one set to NAME)."
)
@click.option("--param", "params", multiple=True, help="KEY=VALUE for every run it starts.")
@click.option(
    "--policy",
    type=click.Choice(["queue", "skip"]),
    default="queue",
    show_default=True,
    help="When a run of this pipeline is still going: queue one run behind it, or skip.",
)
def pipelines_on_new_version(
    app: Any,
    as_json: bool,
    file: str,
    dataset: str,
    param_name: str | None,
    params: tuple[str, ...],
    policy: str,
) -> None:
    """Run a pipeline whenever a dataset gets a new version, with that version."""
    from appliance.core.pipeline_triggers import on_new_version

    emit(on_new_version(app, file, dataset, param_name, params, policy), as_json)


@command(pipelines_group, "triggers")
def pipelines_triggers(app: Any, as_json: bool) -> None:
    """Schedules and dataset triggers: when each fires next and what it last did."""
    from appliance.core.pipeline_triggers import list_triggers

    emit(
        list_triggers(app),
        as_json,
        ["id", "pipeline", "when", "policy", "next", "last_run", "last_message"],
    )


@command(pipelines_group, "remove-trigger")
@click.argument("trigger_id")
def pipelines_remove_trigger(app: Any, as_json: bool, trigger_id: str) -> None:
    """Stop a schedule or dataset trigger (the runs it started are kept)."""
    from appliance.core.pipeline_triggers import remove_trigger

    emit(remove_trigger(app, trigger_id), as_json)


# ---- monitoring ---------------------------------------------------------------------------
@cli.group("monitor")
def monitor_group() -> None:
    """Monitoring: prediction logs, feedback and live quality, drift, rules and alerts."""


def _seconds(text: str, flag: str) -> float:
    from appliance.core.jobs import parse_duration

    return parse_duration(text, flag)


@command(monitor_group, "feedback")
@click.argument("deployment")
@click.argument("file", type=click.Path())
def monitor_feedback(app: Any, as_json: bool, deployment: str, file: str) -> None:
    """Labels for logged predictions (CSV, JSON lines, or POST /feedback's body as .json:
    request_id, label[, row])."""
    from appliance.core.feedback import add_feedback

    emit(add_feedback(app, deployment, file), as_json)


@command(monitor_group, "quality")
@click.argument("deployment")
@click.option("--window", default="1h", show_default=True, help="Width of each window.")
@click.option("--since", help="Only predictions newer than this long ago (e.g. 7d).")
def monitor_quality(
    app: Any, as_json: bool, deployment: str, window: str, since: str | None
) -> None:
    """Live quality per model version and window, from labelled predictions."""
    import time

    from appliance.core.feedback import quality
    from appliance.core.times import clock

    result = quality(
        app,
        deployment,
        _seconds(window, "--window"),
        time.time() - _seconds(since, "--since") if since else None,
    )
    if as_json:
        emit(result, True)
        return
    _say_behind(result.get("behind"))
    click.echo(f"{result['labels']} labels, {result.get('matched', 0)} matched to predictions")
    if result["labels"] and not result.get("matched") and not result.get("behind"):
        click.echo(
            "quality needs logged inputs and outputs: "
            f"appliance deployments logging {deployment} --sample 0.1",
            err=True,
        )
    rows = [{**w, "window_start": clock(w["window_start"])} for w in result["windows"]]
    columns = ["version", "window_start", "labelled"]
    columns += [
        k for k in ("auc", "accuracy", "logloss", "rmse", "mae", "r2") if any(k in w for w in rows)
    ]
    click.echo(table(rows, columns))


def _say_behind(behind: dict[str, Any] | None) -> None:
    """Warn (on stderr) that the figures leave out logs the spool still holds."""
    from appliance.core.prediction_log import behind_note

    note = behind_note(behind)
    if note:
        click.echo(f"note: {note}; these figures leave them out", err=True)


@command(monitor_group, "drift")
@click.argument("deployment")
@click.option("--window", default="1h", show_default=True, help="The window of logged inputs.")
def monitor_drift(app: Any, as_json: bool, deployment: str, window: str) -> None:
    """Drift of the window's logged inputs (and outputs) against the training data."""
    from appliance.core.drift import drift
    from appliance.core.times import clock

    report = drift(app, deployment, _seconds(window, "--window"))
    if as_json:
        emit(report, True)
        return
    _say_behind(report.get("behind"))
    for item in report["versions"]:
        click.echo(
            f"version {item['version']}: {item['rows']} rows from {clock(report['window_start'])}"
            f" to {clock(report['window_end'])} against {item['reference']}"
        )
        rows = [
            {
                **f,
                "missing": f"{f['missing_ref']:.3f} -> {f['missing']:.3f}",
                "test": f.get("ks") if f["type"] == "numeric" else f.get("chi2"),
                "unseen": ",".join(f.get("unseen") or []),
            }
            for f in item["features"]
        ]
        click.echo(table(rows, ["feature", "type", "psi", "test", "p_value", "missing", "unseen"]))
        out = item["prediction"]
        click.echo(f"prediction: psi {out.get('psi')} ks {out.get('ks')}")


@command(monitor_group, "add")
@click.argument("name")
@click.option("--deployment", required=True)
@click.option("--rule", required=True, help="e.g. 'psi(tenure) > 0.2', 'auc < 0.8 over 24h'.")
@click.option("--every", default="1m", show_default=True, help="How often the agent checks.")
@click.option("--rollback", is_flag=True, help="When it fires: roll the deployment back.")
@click.option(
    "--command",
    "command_line",
    help="When it fires: run this command line (no shell: sh -c '...' for pipes).",
)
@click.option(
    "--webhook", help="When it fires: POST JSON here (a loopback, private or link-local address)."
)
@click.option("--pipeline", help="When it fires: run this pipeline file (e.g. a retrain).")
def monitor_add(
    app: Any,
    as_json: bool,
    name: str,
    deployment: str,
    rule: str,
    every: str,
    rollback: bool,
    command_line: str | None,
    webhook: str | None,
    pipeline: str | None,
) -> None:
    """Watch a deployment with a rule; the agent checks it and records alerts."""
    import shlex

    from appliance.core.monitors import add_monitor, needs_shell

    command = None
    if command_line is not None:  # '' is a mistake, not "no action"
        if shell := needs_shell(command_line):
            raise click.BadParameter(
                f"{shell!r} needs a shell, and the command runs without one: quote it to "
                "mean it as it is, or write sh -c '...' (single quotes)",
                param_hint="--command",
            )
        try:
            command = shlex.split(command_line)
        except ValueError as exc:
            raise click.BadParameter(f"{command_line!r}: {exc}", param_hint="--command") from None
        if not command:
            raise click.BadParameter("expected a command line", param_hint="--command")
    action = {
        "rollback": rollback or None,
        "command": command,
        "webhook": webhook,
        "pipeline": pipeline,
    }
    emit(add_monitor(app, name, deployment, rule, every, action), as_json)


@command(monitor_group, "list")
@click.option("--deployment")
def monitor_list(app: Any, as_json: bool, deployment: str | None) -> None:
    """Monitors with their state, last value and when they were last checked."""
    from appliance.core.agent import agent_running
    from appliance.core.monitors import list_monitors
    from appliance.core.times import clock

    monitors = list_monitors(app, deployment)
    emit(
        monitors
        if as_json
        else [{**m, "checked": clock(m["checked_at"], seconds=True)} for m in monitors],
        as_json,
        ["name", "deployment", "rule", "every_s", "action", "state", "value", "checked", "error"],
    )
    if not as_json and monitors and not agent_running(app):
        click.echo(
            "note: no agent runs, so nothing checks these monitors now: their states are as "
            "last checked ('appliance agent start')",
            err=True,
        )


@command(monitor_group, "remove")
@click.argument("name")
def monitor_remove(app: Any, as_json: bool, name: str) -> None:
    """Stop a monitor (its alerts are kept)."""
    from appliance.core.monitors import remove_monitor

    emit(remove_monitor(app, name), as_json)


@command(monitor_group, "check")
@click.argument("name", required=False)
@click.option(
    "--strict",
    is_flag=True,
    help="Also exit 1 when a monitor has no data or an error, not only when one fires.",
)
def monitor_check(app: Any, as_json: bool, name: str | None, strict: bool) -> None:
    """Evaluate monitors now (the agent does it on their schedule); exit 1 if one fires."""
    from appliance.core.monitors import check_monitors, failing

    results = check_monitors(app, name, force=True)
    emit(results, as_json, ["monitor", "state", "value", "error"])
    if names := failing(results, strict):
        click.echo(f"failing: {', '.join(names)}", err=True)
        sys.exit(1)


@command(monitor_group, "alerts")
@click.option("--deployment")
def monitor_alerts(app: Any, as_json: bool, deployment: str | None) -> None:
    """Alerts, newest first: when they fired and resolved, and the action taken."""
    from appliance.core.monitors import list_alerts

    emit(
        list_alerts(app, deployment),
        as_json,
        [
            "id",
            "monitor",
            "deployment",
            "rule",
            "value",
            "fired_at",
            "resolved_at",
            "action_result",
        ],
    )


@command(monitor_group, "token")
def monitor_token(app: Any, as_json: bool) -> None:
    """The token `POST /feedback` needs (Authorization: Bearer TOKEN); made on first use."""
    from appliance.core.feedback import feedback_token

    token = feedback_token(app.settings.home)
    emit({"token": token}, True) if as_json else click.echo(token)


@command(monitor_group, "report")
@click.argument("deployment")
@click.option("--window", default="1h", show_default=True, help="Drift window, traffic window.")
@click.option("--html", "html_file", type=click.Path(), help="Also write a self-contained page.")
def monitor_report(
    app: Any, as_json: bool, deployment: str, window: str, html_file: str | None
) -> None:
    """Per version: traffic, latency percentiles, errors, drift, quality over time."""
    from appliance.core.monitor_report import build_report, render_html, render_text

    report = build_report(app, deployment, _seconds(window, "--window"))
    if html_file:
        render_html(report, html_file)
    emit(report, True) if as_json else click.echo(render_text(report))


@cli.group("runs")
def runs_group() -> None:
    """Runs: params, metrics and outputs of every job."""


@command(runs_group, "list")
@click.option("--experiment", help="Only runs of this experiment.")
@click.option("--sort", help="metric.NAME, param.NAME or a column; '-' first for descending.")
def runs_list(app: Any, as_json: bool, experiment: str | None, sort: str | None) -> None:
    """List runs, newest first (or sorted by a metric or param)."""
    from appliance.core.resources import KINDS
    from appliance.core.runs import runs_table

    emit(runs_table(app, experiment, sort), as_json, KINDS["runs"].columns)


@command(runs_group, "compare")
@click.argument("run_ids", nargs=-1, required=True)
def runs_compare(app: Any, as_json: bool, run_ids: tuple[str, ...]) -> None:
    """Params side by side (differences marked *) and final/best metrics of runs."""
    from appliance.core.runs import compare_runs

    result = compare_runs(app, list(run_ids))
    if as_json:
        emit(result, True)
        return
    ids = result["runs"]
    rows = [
        {
            "key": ("* " if p["differs"] else "  ") + p["param"],
            **{i: json_cell(v) for i, v in zip(ids, p["values"], strict=True)},
        }
        for p in result["params"]
    ]
    rows += [
        {
            "key": f"  {m['metric']} (final/best, {m['better']})",
            **{
                i: f"{_fmt(f)} / {_fmt(b)}" + (" <" if m["leader"] == i else "")
                for i, f, b in zip(ids, m["final"], m["best"], strict=True)
            },
        }
        for m in result["metrics"]
    ]
    click.echo(table(rows, ["key", *ids]))


def json_cell(value: Any) -> str:
    import json

    return "" if value is None else json.dumps(value)


@command(runs_group, "delete")
@click.argument("run_id")
def runs_delete(app: Any, as_json: bool, run_id: str) -> None:
    """Delete a run (refused while a registered model version comes from it)."""
    from appliance.core.runs import delete_run

    emit(delete_run(app, run_id), as_json)


@command(runs_group, "show")
@click.argument("run_id")
def runs_show(app: Any, as_json: bool, run_id: str) -> None:
    """Show one run (a unique id prefix is enough)."""
    from appliance.core.runs import get_run

    emit(get_run(app, run_id), as_json)


@command(runs_group, "metrics")
@click.argument("run_id")
@click.argument("key")
def runs_metrics(app: Any, as_json: bool, run_id: str, key: str) -> None:
    """Print the history of one metric (step, value, timestamp)."""
    from appliance.core.runs import metric_history

    emit(metric_history(app, run_id, key), as_json, ("step", "value", "timestamp"))


# ---- models -----------------------------------------------------------------------------------
@cli.group("models")
def models_group() -> None:
    """Model registry: register, list, show, alias."""


@command(models_group, "register")
@click.argument("name")
@click.option("--run", "run_id", required=True, help="The finished run whose model to register.")
def models_register(app: Any, as_json: bool, name: str, run_id: str) -> None:
    """Register a run's model as the next version of NAME."""
    from appliance.core.registry import register_model

    version = register_model(app, name, run_id)
    if as_json:
        emit(version, True)
    else:
        click.echo(f"registered {version['ref']} from run {version['run_id']}")


@command(models_group, "list")
def models_list(app: Any, as_json: bool) -> None:
    """List registered models."""
    from appliance.core.resources import list_resources

    columns, rows = list_resources(app, "models")
    emit(rows, as_json, columns)


@command(models_group, "versions")
@click.argument("name")
def models_versions(app: Any, as_json: bool, name: str) -> None:
    """List the versions of a model."""
    from appliance.core.registry import list_model_versions

    emit(
        list_model_versions(app, name),
        as_json,
        ("ref", "run_id", "dataset", "metrics", "aliases", "created_at"),
    )


@command(models_group, "show")
@click.argument("ref")
def models_show(app: Any, as_json: bool, ref: str) -> None:
    """Show a model version: NAME (latest), NAME/VERSION or NAME@ALIAS."""
    from appliance.core.registry import get_model_version

    emit(get_model_version(app, ref), as_json)


@models_group.group("alias")
def alias_group() -> None:
    """Aliases (champion, challenger, any name) and their history."""


@command(alias_group, "set")
@click.argument("name")
@click.argument("alias")
@click.argument("version")
@click.option("--reason", help="Why (kept in the alias history).")
def alias_set(
    app: Any, as_json: bool, name: str, alias: str, version: str, reason: str | None
) -> None:
    """Point ALIAS of model NAME at VERSION (a number, or NAME/N)."""
    from appliance.core.registry import set_alias

    emit(set_alias(app, name, alias, version, reason=reason), as_json)


@command(alias_group, "rm")
@click.argument("name")
@click.argument("alias")
@click.option("--reason", help="Why (kept in the alias history).")
def alias_rm(app: Any, as_json: bool, name: str, alias: str, reason: str | None) -> None:
    """Remove ALIAS from model NAME."""
    from appliance.core.registry import remove_alias

    emit(remove_alias(app, name, alias, reason=reason), as_json)


@command(alias_group, "history")
@click.argument("name")
@click.option("--alias", help="Only this alias.")
def alias_history_cmd(app: Any, as_json: bool, name: str, alias: str | None) -> None:
    """Every alias move of model NAME: from, to, when, who, why."""
    from appliance.core.registry import alias_history

    emit(
        alias_history(app, name, alias),
        as_json,
        ("alias", "from_version", "to_version", "changed_at", "actor", "reason"),
    )


@command(models_group, "promote")
@click.argument("ref")
@click.option("--to", "alias", required=True, help="The alias to move, e.g. champion.")
@click.option("--gate", required=True, help='e.g. "auc >= champion.auc + 0.002".')
@click.option("--dataset", required=True, help="The evaluation dataset NAME@VERSION.")
@click.option("--reason", help="Why (kept in the alias history with the report).")
def models_promote(
    app: Any, as_json: bool, ref: str, alias: str, gate: str, dataset: str, reason: str | None
) -> None:
    """Move ALIAS to REF only if, scored on the same dataset version, it passes the gate."""
    from appliance.core.promotion import promote

    report = promote(app, ref, alias, gate, dataset, reason=reason)
    if as_json:
        emit(report, True)
    else:
        for c in report["conditions"]:
            mark = "ok  " if c["holds"] else "FAIL"
            click.echo(f"{mark} {c['metric']} {c['value']:.6g} {c['op']} {c['threshold']:.6g}")
        verdict = "promoted" if report["passed"] else "not promoted"
        click.echo(f"{verdict}: {report['candidate']} -> {alias} (on {report['dataset']})")
    if not report["passed"]:
        sys.exit(1)


@command(models_group, "archive")
@click.argument("ref")
@click.option("--reason", help="Why it is retired.")
def models_archive(app: Any, as_json: bool, ref: str, reason: str | None) -> None:
    """Retire a version: kept for lineage, but no alias or deployment may use it."""
    from appliance.core.registry import archive_version

    emit(archive_version(app, ref, reason=reason), as_json)


@command(models_group, "tag")
@click.argument("ref")
@click.argument("tags", nargs=-1)
@click.option("--rm", "remove", multiple=True, help="Remove this tag key.")
def models_tag(
    app: Any, as_json: bool, ref: str, tags: tuple[str, ...], remove: tuple[str, ...]
) -> None:
    """Set free tags KEY=VALUE on a version (or --rm KEY)."""
    from appliance.core.registry import set_version_tags
    from appliance.errors import InvalidInput

    pairs = {}
    for item in tags:
        key, sep, value = item.partition("=")
        if not sep:
            raise InvalidInput(f"tag {item!r}: expected KEY=VALUE")
        pairs[key] = value
    emit(set_version_tags(app, ref, pairs, list(remove))["tags"], as_json)


@command(models_group, "card", listing=False)
@click.argument("ref")
def models_card(app: Any, ref: str) -> None:
    """Print a version's model card (markdown)."""
    from appliance.core.registry import model_card

    click.echo(model_card(app, ref), nl=False)


# ---- deployments ------------------------------------------------------------------------------
@command(cli, "deploy")
@click.argument("model_ref")
@click.option("--name", help="Deployment name (default: the model's name).")
@click.option("--host", help="Address for a new deployment (default 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port for a new deployment.")
@click.option("--workers", type=int, help="Worker processes for a new deployment (default 1).")
@click.option(
    "--follow-alias",
    is_flag=True,
    help="Deploy again, as a new revision, whenever NAME@ALIAS moves.",
)
@click.option(
    "--canary",
    type=float,
    help="Send this percentage of requests to the new revision (sticky per request id).",
)
@click.option(
    "--auto-rollback",
    help="With --canary: roll the canary back when this holds, e.g. "
    "'error_rate > 0.01 or p99_ms > 50'.",
)
@click.option("--window", help="With --auto-rollback: the window the rule is judged over.")
@click.option(
    "--feature-service",
    help="New deployment: callers send this service's entity keys; the server looks up the "
    "model's features in the online store.",
)
@click.option("--cpus", type=float, help="New deployment on k3s: cores per pod (default 1).")
@click.option("--memory", help="New deployment on k3s: memory per pod (default 1Gi).")
@click.option("--gpus", type=click.IntRange(0), help="New deployment on k3s: GPUs per pod.")
@click.option(
    "--log-sample",
    type=float,
    help="Log this share (0 to 1) of requests' inputs and outputs (default 0; request "
    "metadata is always logged).",
)
def deploy_cmd(
    app: Any,
    as_json: bool,
    model_ref: str,
    name: str | None,
    host: str | None,
    port: int | None,
    workers: int | None,
    follow_alias: bool,
    canary: float | None,
    auto_rollback: str | None,
    window: str | None,
    feature_service: str | None,
    cpus: float | None,
    memory: str | None,
    gpus: int | None,
    log_sample: float | None,
) -> None:
    """Serve NAME@ALIAS or NAME/N: a new deployment, or its next revision (returns once every
    worker serves it; on k3s, once the rollout is available; a stopped deployment records
    the revision and serves it once started)."""
    from appliance.core.deployments import deploy_model, set_logging

    resources = {"cpu": cpus, "memory": memory, "gpu": gpus}
    if log_sample is not None and not 0 <= log_sample <= 1:
        raise click.BadParameter("expected a share between 0 and 1", param_hint="--log-sample")
    done = deploy_model(
        app,
        model_ref,
        name,
        host=host,
        port=port,
        workers=workers,
        follow_alias=follow_alias,
        canary=canary,
        auto_rollback=auto_rollback,
        window=window,
        feature_service=feature_service,
        resources={k: v for k, v in resources.items() if v is not None} or None,
    )
    if log_sample is not None:
        done = {**done, **set_logging(app, done["name"], sample=log_sample)}
    if done.get("status") == "stopped":  # said, or a user waits for answers from nothing
        click.echo(
            f"note: deployment {done['name']} is stopped; it serves revision "
            f"{done['current_revision']} once started: appliance deployments start "
            f"{done['name']}",
            err=True,
        )
    emit(done, as_json)


# ---- features ----------------------------------------------------------------------------------
@cli.group("features")
def features_group() -> None:
    """Feature store: entities, feature views and services; point-in-time training sets."""


@command(features_group, "apply")
@click.argument("directory", type=click.Path(exists=True))
def features_apply(app: Any, as_json: bool, directory: str) -> None:
    """Validate the YAML definitions in DIRECTORY and register them (changed ones get their
    next version; unchanged ones are left alone)."""
    from appliance.core.features import apply

    emit(apply(app, directory), as_json, ("kind", "name", "version", "created"))


@command(features_group, "list")
@click.option("--kind", type=click.Choice(["entity", "view", "service"]))
@click.option("--all-versions", is_flag=True, help="Every version, not only the latest.")
def features_list(app: Any, as_json: bool, kind: str | None, all_versions: bool) -> None:
    """The latest version of every entity, feature view and feature service."""
    from appliance.core.features import list_definitions

    emit(
        list_definitions(app, kind, all_versions=all_versions),
        as_json,
        ("kind", "name", "version", "created_at"),
    )


@command(features_group, "profile")
@click.argument("view")
def features_profile(app: Any, as_json: bool, view: str) -> None:
    """The profile of a feature view version's output (kept per source dataset version)."""
    from appliance.core.features import view_profile

    result = view_profile(app, view)
    if as_json:
        emit(result, True)
        return
    click.echo(f"{result['ref']}: {result['rows']:,} rows")
    emit(result["columns"], False, ("name", "type", "null_pct", "distinct_approx", "min", "max"))


@command(features_group, "freshness")
def features_freshness(app: Any, as_json: bool) -> None:
    """Per view version: last materialization, rows, newest event, age against the ttl."""
    from appliance.core.features import freshness

    emit(
        freshness(app),
        as_json,
        ("ref", "status", "ttl_seconds", "age_seconds", "newest_event", "materialized_at"),
    )


@command(features_group, "show")
@click.argument("kind", type=click.Choice(["entity", "view", "service"]))
@click.argument("ref")
def features_show(app: Any, as_json: bool, kind: str, ref: str) -> None:
    """One definition (NAME or NAME@VERSION) with its full spec."""
    from appliance.core.features import get_definition

    emit(get_definition(app, kind, ref), as_json)


@command(features_group, "training-set")
@click.option("--service", required=True, help="Feature service, NAME or NAME@VERSION.")
@click.option("--entities", required=True, help="Entity dataset, NAME or NAME@VERSION.")
@click.option("--out", required=True, help="Dataset to write the training set to.")
@click.option("--timestamp-col", default="event_ts", show_default=True)
@click.option(
    "--as-of-known-time/--no-as-of-known-time",
    default=True,
    show_default=True,
    help="Also require created <= the entity time (no value written later leaks in).",
)
def features_training_set(
    app: Any,
    as_json: bool,
    service: str,
    entities: str,
    out: str,
    timestamp_col: str,
    as_of_known_time: bool,
) -> None:
    """Point-in-time join of a feature service onto an entity dataset, as a new dataset
    version."""
    from appliance.core.features import training_set

    emit(training_set(app, service, entities, out, timestamp_col, as_of_known_time), as_json)


@command(features_group, "materialize")
@click.option("--view", help="One feature view (default: all).")
@click.option("--start", help="ISO time: only rows at or after it.")
@click.option("--end", help="ISO time: only rows at or before it (default: now).")
@click.option("--incremental", is_flag=True, help="Start a lookback window before the last end.")
@click.option("--lookback", help="With --incremental: how far before the last end [1d].")
def features_materialize(
    app: Any,
    as_json: bool,
    view: str | None,
    start: str | None,
    end: str | None,
    incremental: bool,
    lookback: str,
) -> None:
    """Write the latest value per entity key into the online store (never older over newer)."""
    from appliance.core.jobs import parse_duration
    from appliance.core.online import materialize
    from appliance.errors import InvalidInput

    if lookback is not None and not incremental:
        raise InvalidInput("--lookback: only with --incremental")
    seconds = parse_duration(lookback or "1d", "--lookback")
    runs = materialize(app, view, start, end, incremental, seconds)
    emit(runs, as_json, ("view", "start", "end", "rows_read", "rows_written", "error"))
    if any(r["error"] for r in runs):
        sys.exit(1)  # the other views were written; the table says which failed and why


@command(features_group, "get")
@click.option("--service", required=True, help="Feature service, NAME or NAME@VERSION.")
@click.option(
    "--entity", "pairs", multiple=True, required=True, help="KEY=VALUE (repeat for more keys)."
)
def features_get(app: Any, as_json: bool, service: str, pairs: tuple[str, ...]) -> None:
    """Online lookup of one entity: each feature's value and status (ttl enforced)."""
    from appliance.core.online import entities_from_text, get_online_features
    from appliance.errors import InvalidInput

    texts: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise InvalidInput(f"--entity {pair!r}: expected KEY=VALUE")
        texts[key] = value
    response = get_online_features(app, service, entities_from_text(app, service, texts))
    if as_json:
        emit(response, True)
        return
    rows = [
        {"feature": n, "value": r["values"][0], "status": r["statuses"][0]}
        for n, r in zip(response["metadata"]["feature_names"], response["results"], strict=True)
    ]
    emit(rows, False, ("feature", "value", "status"))


@command(features_group, "serve", listing=False)
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=6566, show_default=True, type=click.IntRange(0, 65535))
def features_serve(app: Any, host: str, port: int) -> None:
    """The feature server in the foreground: POST /get-online-features, /health, /metrics."""
    from appliance.core.feature_server import serve_features

    click.echo(f"serving online features on http://{host}:{port} (Ctrl-C stops)")
    serve_features(app, host=host, port=port)


REVISION_COLUMNS = (
    "revision",
    "model_version",
    "action",
    "outcome",
    "reason",
    "actor",
    "created_at",
)


@cli.group("deployments")
def deployments_group() -> None:
    """Deployments: serve a model, deploy versions, roll back."""


@command(deployments_group, "create")
@click.argument("name")
@click.option("--model", "model_ref", required=True, help="NAME, NAME@VERSION or NAME@ALIAS.")
@click.option("--no-start", is_flag=True, help="Record it without starting a server.")
@click.option("--feature-service", help="Callers send its entity keys; features are looked up.")
def deployments_create(
    app: Any,
    as_json: bool,
    name: str,
    model_ref: str,
    no_start: bool,
    feature_service: str | None,
) -> None:
    """Create a deployment serving a model version on 127.0.0.1."""
    from appliance.core.deployments import create_deployment

    emit(
        create_deployment(
            app, name, model_ref, start=not no_start, feature_service=feature_service
        ),
        as_json,
    )


@command(deployments_group, "deploy")
@click.argument("name")
@click.option("--model", "model_ref", required=True, help="NAME@VERSION or NAME@ALIAS.")
def deployments_deploy(app: Any, as_json: bool, name: str, model_ref: str) -> None:
    """Serve another model version as a new revision of an existing deployment."""
    from appliance.core.deployments import deploy_model, get_deployment

    get_deployment(app, name)  # this verb never creates one (a typo must not start a server)
    emit(deploy_model(app, model_ref, name), as_json)


@command(deployments_group, "rollback")
@click.argument("name")
@click.option(
    "--to-revision",
    type=int,
    help="Revision whose model version to serve again (default: the one before the current, "
    "like kubectl rollout undo).",
)
@click.option("--reason", help="Why (kept in the deployment's history).")
def deployments_rollback(
    app: Any, as_json: bool, name: str, to_revision: int | None, reason: str | None
) -> None:
    """Roll back to an earlier revision's model version."""
    from appliance.core.deployments import rollback

    emit(rollback(app, name, to_revision, reason), as_json)


@command(deployments_group, "history")
@click.argument("name")
def deployments_history(app: Any, as_json: bool, name: str) -> None:
    """Every revision of a deployment: which model version, how it came, how a canary ended
    and why, who, when."""
    from appliance.core.deployments import list_revisions

    emit(list_revisions(app, name), as_json, REVISION_COLUMNS)


@command(deployments_group, "list")
def deployments_list(app: Any, as_json: bool) -> None:
    """List deployments."""
    from appliance.core.resources import list_resources

    columns, rows = list_resources(app, "deployments")
    emit(rows, as_json, columns)


@command(deployments_group, "show")
@click.argument("name")
def deployments_show(app: Any, as_json: bool, name: str) -> None:
    """Show a deployment and its revision history (on k3s, its rollout too)."""
    from appliance.core.deployments import get_deployment, list_revisions
    from appliance.core.k3s_serving import rollout_status
    from appliance.core.kube import ClusterUnavailable

    dep = get_deployment(app, name)
    if dep["backend"] == "k3s" and dep["status"] == "serving":
        try:
            dep["rollout"] = rollout_status(app.settings, name)
        except ClusterUnavailable as exc:  # the registry's record is still worth showing
            dep["rollout"] = {"state": "unknown", "message": exc.message}
    revisions = list_revisions(app, name)
    if as_json:
        emit({**dep, "revisions": revisions}, True)
        return
    emit(dep, False)
    click.echo(table(revisions, REVISION_COLUMNS))


@command(deployments_group, "status")
@click.argument("name")
@click.option("--wait", is_flag=True, help="Wait until the current revision is served.")
@click.option(
    "--timeout",
    type=click.FloatRange(1, 3600),
    help="With --wait: give up after this many seconds (default 180 on k3s, 30 locally).",
)
def deployments_status(
    app: Any, as_json: bool, name: str, wait: bool, timeout: float | None
) -> None:
    """Where the current revision stands: on k3s, its rollout (progressing, available,
    failed; replicas desired, updated, ready, available); locally, the server's state."""
    from appliance.core.deployments import deployment_status

    emit(deployment_status(app, name, wait=wait, timeout=timeout), as_json)


@command(deployments_group, "promote")
@click.argument("name")
@click.option("--reason", help="Why, kept with the revision.")
def deployments_promote(app: Any, as_json: bool, name: str, reason: str | None) -> None:
    """Give the canary revision all the traffic."""
    from appliance.core.deployments import promote_canary

    emit(promote_canary(app, name, reason=reason), as_json)


@command(deployments_group, "abort")
@click.argument("name")
@click.option("--reason", help="Why, kept with the revision.")
def deployments_abort(app: Any, as_json: bool, name: str, reason: str | None) -> None:
    """Send all the traffic back to the stable revision; the canary is marked aborted."""
    from appliance.core.deployments import abort_canary

    emit(abort_canary(app, name, reason=reason), as_json)


@command(deployments_group, "traffic")
@click.argument("name")
@click.option("--seconds", type=click.FloatRange(1, 3600), default=10, show_default=True)
def deployments_traffic(app: Any, as_json: bool, name: str, seconds: float) -> None:
    """Live req/s, p50/p99 and error rate, for all requests and stable/canary apart."""
    from appliance.core.deployments import traffic
    from appliance.core.traffic import dropped_note

    data = traffic(app, name, seconds)
    rows = [{"role": role, **data[role]} for role in ("all", "stable", "canary")]
    emit(
        data if as_json else rows,
        as_json,
        ("role", "requests", "rps", "p50_ms", "p99_ms", "error_rate"),
    )
    if not as_json and (note := dropped_note(data["log"])):
        click.echo(f"note: {note}", err=True)


@command(deployments_group, "start")
@click.argument("name")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, type=int, help="Port (default: a free one).")
@click.option("--workers", type=int, help="Worker processes (default: as before).")
def deployments_start(
    app: Any, as_json: bool, name: str, host: str, port: int, workers: int | None
) -> None:
    """Start a stopped deployment's server in the background."""
    from appliance.core.deployments import start_deployment

    emit(start_deployment(app, name, host=host, port=port, workers=workers), as_json)


@command(deployments_group, "logging")
@click.argument("name")
@click.option("--sample", type=float, help="Share (0 to 1) of requests whose inputs are kept.")
@click.option(
    "--requests/--no-requests", default=None, help="Log every request's metadata (default on)."
)
def deployments_logging(
    app: Any, as_json: bool, name: str, sample: float | None, requests: bool | None
) -> None:
    """What a deployment's prediction log keeps; workers follow at once."""
    from appliance.core.deployments import set_logging

    if sample is not None and not 0 <= sample <= 1:
        raise click.BadParameter("expected a share between 0 and 1", param_hint="--sample")
    emit(set_logging(app, name, sample, requests), as_json)


@command(deployments_group, "stop")
@click.argument("name")
def deployments_stop(app: Any, as_json: bool, name: str) -> None:
    """Stop a deployment's server (its history stays)."""
    from appliance.core.deployments import stop_deployment

    emit(stop_deployment(app, name), as_json)


@command(deployments_group, "serve", listing=False)
@click.argument("name")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=0, type=int, help="Port (default: a free one).")
def deployments_serve(app: Any, name: str, host: str, port: int) -> None:
    """Serve a deployment in the foreground (for systemd units and containers)."""
    from appliance.core.serving import serve_deployment

    serve_deployment(app, name, host=host, port=port)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: one-line errors and exit codes instead of tracebacks."""
    try:
        cli.main(args=argv, prog_name="appliance", standalone_mode=False)
    except ApplianceError as exc:
        click.echo(f"error: {exc.message}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.Abort:
        click.echo("aborted", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else 1
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        return 130
    except Exception as exc:  # last resort: one line, not a traceback
        click.echo(f"error: unexpected {type(exc).__name__}: {exc}", err=True)
        return 1
    return 0
