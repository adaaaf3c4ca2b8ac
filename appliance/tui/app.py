"""The dashboard: counts of every resource kind, and one k9s-style table for the current kind.

Store reads run in a thread worker that posts `ResourcesRefreshed`; only its handler touches
widgets, so a slow disk never freezes the screen.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from textual import on, work
from textual.app import App, ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.css.query import NoMatches
from textual.message import Message
from textual.screen import ModalScreen
from textual.widgets import DataTable, Footer, Header, Input, Static

from appliance.core.context import Appliance
from appliance.core.resources import KINDS, find_kind, list_resources
from appliance.errors import ApplianceError

REFRESH_SECONDS = 2.0


class ResourcesRefreshed(Message):
    """Fresh rows for every kind, read by the refresh worker."""

    def __init__(self, snapshot: dict[str, tuple[tuple[str, ...], list[dict[str, Any]]]]) -> None:
        super().__init__()
        self.snapshot = snapshot


class RefreshFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class HelpScreen(ModalScreen[None]):
    """`?`: the key bindings, generated from the app's BINDINGS."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q,question_mark", "dismiss", "Close")]
    DEFAULT_CSS = """
    HelpScreen { align: center middle; }
    HelpScreen > Vertical { width: 64; height: auto; border: round $accent; padding: 1 2;
                            background: $surface; }
    """

    def __init__(self, bindings: list[tuple[str, str]]) -> None:
        super().__init__()
        self._lines = bindings

    def compose(self) -> ComposeResult:
        kinds = ", ".join(f":{k.name} ({', '.join(k.aliases)})" for k in KINDS.values())
        text = "\n".join(f"{key:>8}  {desc}" for key, desc in self._lines)
        with Vertical():
            yield Static("[b]Keys[/b]\n" + text + "\n\n[b]Resources[/b]\n" + kinds, id="help-text")


class ApplianceApp(App[None]):
    """Dashboard over one appliance home."""

    TITLE = "appliance"
    CSS = """
    #summary { height: 1; padding: 0 1; background: $boost; }
    #prompt { dock: bottom; display: none; }
    #prompt.visible { display: block; }
    #status { height: 1; padding: 0 1; color: $text-muted; }
    """
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("colon", "prompt('jump')", "Jump", key_display=":"),
        Binding("slash", "prompt('filter')", "Filter", key_display="/"),
        Binding("question_mark", "help", "Help", key_display="?"),
        Binding("d", "data", "Data"),
        Binding("j", "jobs", "Jobs"),
        Binding("e", "runs", "Runs"),
        Binding("m", "models", "Models"),
        Binding("s", "deployments", "Serving"),
        Binding("f", "features", "Features"),
        Binding("t", "tuning", "Tuning"),
        Binding("p", "pipelines", "Pipelines"),
        Binding("o", "monitoring", "Monitoring"),
        Binding("c", "cluster", "Cluster"),
        Binding("r", "refresh", "Refresh"),
        Binding("escape", "clear_prompt", "Back", show=False),
        Binding("q", "quit", "Quit"),
    ]

    def __init__(self, app_ctx: Appliance, kind: str = "jobs") -> None:
        super().__init__()
        self.ctx = app_ctx
        self.kind = find_kind(kind).name
        self.filter_text = ""
        self.prompt_mode = ""
        self.snapshot: dict[str, tuple[tuple[str, ...], list[dict[str, Any]]]] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="summary")
        yield Static("", id="status")
        yield DataTable(id="table", cursor_type="row", zebra_stripes=True)
        yield Input(id="prompt")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = str(self.ctx.settings.home)
        self.refresh_resources()
        self.set_interval(REFRESH_SECONDS, self.refresh_resources)

    @work(thread=True, exclusive=True, group="refresh", exit_on_error=False)
    def refresh_resources(self) -> None:
        try:
            snapshot = {name: list_resources(self.ctx, name) for name in KINDS}
        except ApplianceError as exc:
            self.post_message(RefreshFailed(exc.message))
            return
        except Exception as exc:  # keep the UI alive; show what went wrong
            self.post_message(RefreshFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(ResourcesRefreshed(snapshot))

    @on(ResourcesRefreshed)
    def _on_refreshed(self, message: ResourcesRefreshed) -> None:
        self.snapshot = message.snapshot
        try:
            self._render_summary()
            self._render_table()
        except NoMatches:  # a refresh that lands while the app closes has nothing to draw
            return

    @on(RefreshFailed)
    def _on_refresh_failed(self, message: RefreshFailed) -> None:
        self.query_one("#status", Static).update(f"[red]refresh failed:[/red] {message.error}")

    def _render_summary(self) -> None:
        parts = []
        for name in KINDS:
            _, rows = self.snapshot.get(name, ((), []))
            label = f"[b]{name}[/b] {len(rows)}"
            if name == "jobs":
                running = sum(1 for r in rows if r.get("state") == "running")
                label += f" ({running} running)" if running else ""
            if name == "deployments":
                serving = sum(1 for r in rows if r.get("status") == "serving")
                label += f" ({serving} serving)" if serving else ""
            parts.append(f"[reverse]{label}[/reverse]" if name == self.kind else label)
        self.query_one("#summary", Static).update("  ·  ".join(parts))

    def _render_table(self) -> None:
        columns, rows = self.snapshot.get(self.kind, (KINDS[self.kind].columns, []))
        shown = rows
        if self.filter_text:
            try:
                pattern = re.compile(self.filter_text, re.IGNORECASE)
                shown = [r for r in rows if any(pattern.search(str(v)) for v in r.values())]
            except re.error:
                shown = [
                    r
                    for r in rows
                    if any(self.filter_text.lower() in str(v).lower() for v in r.values())
                ]
        table = self.query_one("#table", DataTable)
        cursor_row = table.cursor_row  # a refresh must not throw the user back to the top
        table.clear(columns=True)
        table.add_columns(*(c.upper() for c in columns))
        for row in shown:
            table.add_row(*("" if row.get(c) is None else str(row.get(c)) for c in columns))
        if shown:
            table.move_cursor(row=min(cursor_row, len(shown) - 1))
        filt = f"  filter /{self.filter_text}" if self.filter_text else ""
        self.query_one("#status", Static).update(
            f":{self.kind}  {len(shown)} of {len(rows)} shown{filt}"
        )

    def action_prompt(self, mode: str) -> None:
        prompt = self.query_one("#prompt", Input)
        self.prompt_mode = mode
        prompt.placeholder = (
            "jump to: " + ", ".join(KINDS) if mode == "jump" else "filter rows (regex)"
        )
        prompt.value = self.filter_text if mode == "filter" else ""
        prompt.add_class("visible")
        prompt.focus()

    def action_clear_prompt(self) -> None:
        prompt = self.query_one("#prompt", Input)
        if prompt.has_class("visible"):
            prompt.remove_class("visible")
        elif self.filter_text:
            self.filter_text = ""
            self._render_table()
        self.query_one("#table", DataTable).focus()

    @on(Input.Submitted, "#prompt")
    def _on_prompt(self, event: Input.Submitted) -> None:
        prompt = self.query_one("#prompt", Input)
        prompt.remove_class("visible")
        if self.prompt_mode == "jump":
            try:
                self.kind = find_kind(event.value.lstrip(":")).name
                self.filter_text = ""
                self.query_one("#table", DataTable).move_cursor(row=0)
            except ApplianceError as exc:
                self.notify(exc.message, severity="error")
        else:
            self.filter_text = event.value.strip()
        self._render_summary()
        self._render_table()
        self.query_one("#table", DataTable).focus()

    def action_help(self) -> None:
        lines = [
            (b.key_display or b.key, b.description)
            for b in self.BINDINGS
            if isinstance(b, Binding) and b.description
        ]
        self.push_screen(HelpScreen(lines))

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        # The dashboard's own actions mean nothing on a pushed screen (the Data screen).
        if (
            action
            in (
                "prompt",
                "clear_prompt",
                "data",
                "jobs",
                "runs",
                "models",
                "deployments",
                "features",
                "refresh",
            )
            and len(self.screen_stack) > 1
        ):
            return False
        return True

    def action_data(self) -> None:
        from appliance.tui.data import DataScreen

        self.push_screen(DataScreen(self.ctx))

    def action_jobs(self) -> None:
        from appliance.tui.jobs import JobsScreen

        self.push_screen(JobsScreen(self.ctx))

    def action_runs(self) -> None:
        from appliance.tui.runs import RunsScreen

        self.push_screen(RunsScreen(self.ctx))

    def action_models(self) -> None:
        from appliance.tui.models import ModelsScreen

        self.push_screen(ModelsScreen(self.ctx))

    def action_deployments(self) -> None:
        from appliance.tui.deployments import DeploymentsScreen

        self.push_screen(DeploymentsScreen(self.ctx))

    def action_features(self) -> None:
        from appliance.tui.features import FeaturesScreen

        self.push_screen(FeaturesScreen(self.ctx))

    def action_cluster(self) -> None:
        from appliance.tui.cluster import ClusterScreen

        self.push_screen(ClusterScreen(self.ctx))

    def action_tuning(self) -> None:
        from appliance.tui.tuning import TuningScreen

        self.push_screen(TuningScreen(self.ctx))

    def action_pipelines(self) -> None:
        from appliance.tui.pipelines import PipelinesScreen

        self.push_screen(PipelinesScreen(self.ctx))

    def action_monitoring(self) -> None:
        from appliance.tui.monitoring import MonitoringScreen

        self.push_screen(MonitoringScreen(self.ctx))

    @on(DataTable.RowSelected, "#table")
    def _on_row_selected(self, event: DataTable.RowSelected) -> None:
        """Enter on a row opens its kind's own screen (k9s's drill-down)."""
        if self.kind == "jobs":
            self.action_jobs()
        elif self.kind == "runs":
            self.action_runs()
        elif self.kind == "datasets":
            self.action_data()
        elif self.kind == "models":
            self.action_models()
        elif self.kind == "deployments":
            self.action_deployments()
        elif self.kind == "features":
            self.action_features()
        elif self.kind == "studies":
            self.action_tuning()
        elif self.kind == "pipelines":
            self.action_pipelines()

    def action_refresh(self) -> None:
        self.refresh_resources()


def run_tui(app_ctx: Appliance) -> None:
    """Open the dashboard (blocks until the user quits)."""
    ApplianceApp(app_ctx).run()
