"""The Data screen: versions, preview, profile with histogram bars, lineage, SQL, recipes.

Every store or DuckDB call runs in a thread worker that posts a past-tense message; only the
handlers touch widgets.
"""

from __future__ import annotations

import time
from typing import Any, ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import (
    DataTable,
    Footer,
    Header,
    Input,
    ProgressBar,
    Static,
    TabbedContent,
    TabPane,
)

from appliance.core import datasets, jobs, lineage, profiles, query, recipes
from appliance.core.context import Appliance
from appliance.errors import ApplianceError

BARS = " ▁▂▃▄▅▆▇█"


def histogram_bars(counts: list[int]) -> str:
    """Counts as one line of block characters, tallest = the largest bin."""
    top = max(counts, default=0)
    if not top:
        return ""
    return "".join(BARS[round(c / top * (len(BARS) - 1))] for c in counts)


def render_profile(profile: dict[str, Any]) -> str:
    lines = [f"[b]{profile['ref']}[/b]  {profile['rows']} rows"]
    for c in profile["columns"]:
        lines.append(
            f"\n[b]{c['name']}[/b] {c['type']}  nulls {c['null_pct']}%  "
            f"distinct≈{c['distinct_approx']}  min {c['min']}  max {c['max']}"
        )
        if "mean" in c:
            lines.append(
                f"  mean {c['mean']:.4g}  std {c['std'] or 0:.4g}  "
                f"q25 {c['q25']}  q50 {c['q50']}  q75 {c['q75']}"
                if c["mean"] is not None
                else "  (no values)"
            )
            bars = histogram_bars(c.get("histogram", {}).get("counts", []))
            if bars:
                lines.append(f"  [green]{bars}[/green]")
        top = ", ".join(f"{t['value']} ({t['count']})" for t in c["top"])
        lines.append(f"  top: {top}")
    return "\n".join(lines)


def render_lineage(graph: dict[str, Any]) -> str:
    lines = [f"[b]{graph['ref']}[/b] ({graph['type']})", "upstream:"]
    lines += [f"{'  ' * n['depth']}<- {n['ref']} ({n['type']})" for n in graph["upstream"]]
    lines.append("downstream:")
    lines += [f"{'  ' * n['depth']}-> {n['ref']} ({n['type']})" for n in graph["downstream"]]
    return "\n".join(lines)


class VersionsLoaded(Message):
    def __init__(self, rows: list[dict[str, Any]]) -> None:
        super().__init__()
        self.rows = rows


class VersionLoaded(Message):
    """Preview, profile and lineage of one version, read by a worker."""

    def __init__(self, ref: str, page: dict, profile: dict, graph: dict | None) -> None:
        super().__init__()
        self.ref, self.page, self.profile, self.graph = ref, page, profile, graph


class SqlFinished(Message):
    def __init__(self, result: dict[str, Any] | None, error: str | None) -> None:
        super().__init__()
        self.result, self.error = result, error


class RecipeProgressed(Message):
    def __init__(self, current: float, total: float, message: str) -> None:
        super().__init__()
        self.current, self.total, self.message = current, total, message


class RecipeFinished(Message):
    def __init__(self, text: str, ok: bool) -> None:
        super().__init__()
        self.text, self.ok = text, ok


class DataFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class DataScreen(Screen[None]):
    """Datasets and their versions, and what can be done with one."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("r", "reload", "Refresh"),
    ]
    DEFAULT_CSS = """
    DataScreen #versions { width: 60; }
    DataScreen #status { height: 1; padding: 0 1; color: $text-muted; }
    DataScreen #sql-results, DataScreen #preview { height: 1fr; }
    """

    def __init__(self, ctx: Appliance) -> None:
        super().__init__()
        self.ctx = ctx
        self.selected: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", id="status")
        with Horizontal():
            yield DataTable(id="versions", cursor_type="row")
            with TabbedContent(id="tabs"):
                with TabPane("Preview", id="tab-preview"):
                    yield DataTable(id="preview")
                with TabPane("Profile", id="tab-profile"):
                    with VerticalScroll():
                        yield Static("", id="profile")
                with TabPane("Lineage", id="tab-lineage"):
                    with VerticalScroll():
                        yield Static("", id="lineage")
                with TabPane("SQL", id="tab-sql"):
                    with Vertical():
                        yield Input(placeholder="SELECT … FROM dataset (Enter runs)", id="sql")
                        yield DataTable(id="sql-results")
                with TabPane("Recipe", id="tab-recipe"):
                    with Vertical():
                        yield Input(placeholder="recipe file (.sql)", id="recipe-file")
                        yield Input(placeholder="output dataset name (Enter runs)", id="recipe-out")
                        yield ProgressBar(id="recipe-progress", total=100, show_eta=False)
                        yield Static("", id="recipe-status")
        yield Footer()

    def on_mount(self) -> None:
        self.action_reload()

    def action_reload(self) -> None:
        self.load_versions()

    @work(thread=True, exclusive=True, group="data-versions", exit_on_error=False)
    def load_versions(self) -> None:
        try:
            self.post_message(VersionsLoaded(datasets.list_all_versions(self.ctx)))
        except ApplianceError as exc:
            self.post_message(DataFailed(exc.message))

    @on(VersionsLoaded)
    def _show_versions(self, message: VersionsLoaded) -> None:
        table = self.query_one("#versions", DataTable)
        table.clear(columns=True)
        table.add_columns("VERSION", "ROWS", "COLS", "CREATED")
        for row in message.rows:
            table.add_row(
                row["ref"],
                str(row["rows"]),
                str(row["columns"]),
                row["created_at"][:19],
                key=row["ref"],
            )
        self.query_one("#status", Static).update(f"{len(message.rows)} dataset versions")
        if message.rows and self.selected is None:
            self.load_version(message.rows[0]["ref"])

    @on(DataTable.RowHighlighted, "#versions")
    def _version_highlighted(self, event: DataTable.RowHighlighted) -> None:
        ref = event.row_key.value
        if ref and ref != self.selected:
            self.load_version(ref)

    @work(thread=True, exclusive=True, group="data-version", exit_on_error=False)
    def load_version(self, ref: str) -> None:
        try:
            page = datasets.preview(self.ctx, ref, limit=50)
            prof = profiles.profile(self.ctx, ref)
            try:
                graph = lineage.lineage(self.ctx, f"dataset:{ref}")
            except ApplianceError:
                graph = None
        except ApplianceError as exc:
            self.post_message(DataFailed(exc.message))
            return
        self.post_message(VersionLoaded(ref, page, prof, graph))

    @on(VersionLoaded)
    def _show_version(self, message: VersionLoaded) -> None:
        self.selected = message.ref
        preview = self.query_one("#preview", DataTable)
        preview.clear(columns=True)
        preview.add_columns(*message.page["columns"])
        for row in message.page["rows"]:
            preview.add_row(*("" if v is None else str(v) for v in row))
        self.query_one("#profile", Static).update(render_profile(message.profile))
        self.query_one("#lineage", Static).update(
            render_lineage(message.graph) if message.graph else "(no lineage)"
        )
        self.query_one("#status", Static).update(f"{message.ref}: {message.page['total']} rows")

    @on(Input.Submitted, "#sql")
    def _run_sql(self, event: Input.Submitted) -> None:
        self.query_one("#status", Static).update("running SQL…")
        self.run_sql(event.value)

    @work(thread=True, exclusive=True, group="data-sql", exit_on_error=False)
    def run_sql(self, sql: str) -> None:
        try:
            self.post_message(SqlFinished(query.run_sql(self.ctx, sql, limit=500), None))
        except ApplianceError as exc:
            self.post_message(SqlFinished(None, exc.message))

    @on(SqlFinished)
    def _show_sql(self, message: SqlFinished) -> None:
        table = self.query_one("#sql-results", DataTable)
        table.clear(columns=True)
        status = self.query_one("#status", Static)
        if message.error or message.result is None:
            status.update(f"[red]{message.error}[/red]")
            return
        table.add_columns(*message.result["columns"])
        for row in message.result["rows"]:
            table.add_row(*("" if v is None else str(v) for v in row))
        status.update(f"{len(message.result['rows'])} rows")

    @on(Input.Submitted, "#recipe-out")
    def _run_recipe(self, event: Input.Submitted) -> None:
        path = self.query_one("#recipe-file", Input).value.strip()
        self.query_one("#recipe-status", Static).update("submitting…")
        self.run_recipe(path, event.value.strip())

    @work(thread=True, exclusive=True, group="data-recipe", exit_on_error=False)
    def run_recipe(self, path: str, out: str) -> None:
        try:
            result = recipes.run_recipe(self.ctx, path, out)
        except ApplianceError as exc:
            self.post_message(RecipeFinished(exc.message, False))
            return
        if result["cached"]:
            ref = result["version"]["ref"]
            self.post_message(RecipeFinished(f"cache hit: {ref}, not recomputed", True))
            return
        job_id = result["job"]["id"]
        while True:
            job = jobs.get_job(self.ctx, job_id)
            self.post_message(
                RecipeProgressed(
                    job.get("progress_current") or 0,
                    job.get("progress_total") or 1,
                    job.get("progress_message") or job["state"],
                )
            )
            if job["state"] in jobs.FINAL_STATES:
                break
            time.sleep(0.2)
        if job["state"] != "succeeded":
            self.post_message(RecipeFinished(f"job {job_id} {job['state']}: {job['error']}", False))
            return
        version = recipes.cached_output(self.ctx, result["key"])
        ref = version["ref"] if version else "?"
        self.post_message(RecipeFinished(f"created {ref} by job {job_id}", True))

    @on(RecipeProgressed)
    def _recipe_progress(self, message: RecipeProgressed) -> None:
        self.query_one("#recipe-progress", ProgressBar).update(
            total=message.total, progress=message.current
        )
        self.query_one("#recipe-status", Static).update(message.message)

    @on(RecipeFinished)
    def _recipe_finished(self, message: RecipeFinished) -> None:
        color = "green" if message.ok else "red"
        self.query_one("#recipe-status", Static).update(f"[{color}]{message.text}[/{color}]")
        if message.ok:
            bar = self.query_one("#recipe-progress", ProgressBar)
            bar.update(progress=bar.total or 100)
            self.action_reload()

    @on(DataFailed)
    def _failed(self, message: DataFailed) -> None:
        self.query_one("#status", Static).update(f"[red]{message.error}[/red]")
