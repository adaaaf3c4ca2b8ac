"""The Tuning screen: every study; for the highlighted one, its live trial table, the
best-so-far curve and the objective against one parameter, drawn in the terminal.

Reads run in a thread worker every second and post `StudiesLoaded`; stop and resume ask for
confirmation and run in workers too. CLI twins: `tune list`, `tune show`, `tune stop`,
`tune resume`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static
from textual_plotext import PlotextPlot

from appliance.core import studies
from appliance.core.context import Appliance
from appliance.core.search_space import flatten
from appliance.errors import ApplianceError
from appliance.tui.jobs import ConfirmScreen, show_outcome

REFRESH_SECONDS = 1.0
STATE_STYLE = {
    "running": "cyan",
    "stopping": "yellow",
    "stopped": "magenta",
    "interrupted": "yellow",
    "succeeded": "green",
    "failed": "red",
    "early_stopped": "yellow",
    "cancelled": "magenta",
}


class StudiesLoaded(Message):
    def __init__(self, rows: list[dict[str, Any]], shown: dict[str, Any] | None) -> None:
        super().__init__()
        self.rows, self.shown = rows, shown


class StudiesFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class StudyActionFinished(Message):
    def __init__(self, what: str, error: str | None) -> None:
        super().__init__()
        self.what, self.error = what, error


def _styled(state: str) -> Text:
    return Text(state, style=STATE_STYLE.get(state, ""))


def _number(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict):
        return ", ".join(f"{k}={_number(v)}" for k, v in value.items())
    return str(value)


def scatter_points(trials: list[dict[str, Any]], param: str) -> tuple[list[Any], list[float]]:
    """(parameter values, objectives) of the finished trials that used `param` (a nested
    option's parameters by their own names); categories as their labels."""
    xs, ys = [], []
    for t in trials:
        used = flatten(t["params"])
        if t["objective"] is None or param not in used:
            continue
        value = used[param]
        xs.append(value if isinstance(value, int | float) else _number(value))
        ys.append(float(t["objective"]))
    return xs, ys


class TuningScreen(Screen[None]):
    """Studies on top, the highlighted study's trials in the middle, its plots below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("x", "stop", "Stop study"),
        Binding("u", "resume", "Resume study"),
        Binding("p", "next_param", "Next parameter"),
        Binding("r", "reload", "Refresh"),
    ]
    DEFAULT_CSS = """
    TuningScreen #tuning-status { height: auto; max-height: 3; padding: 0 1; color: $text-muted; }
    TuningScreen #studies { height: 1fr; }
    TuningScreen #trials { height: 2fr; }
    TuningScreen #plots { height: 2fr; }
    TuningScreen #best-curve { width: 1fr; }
    TuningScreen #scatter { width: 1fr; }
    """

    def __init__(self, ctx: Appliance) -> None:
        super().__init__()
        self.ctx = ctx
        self.rows: list[dict[str, Any]] = []
        self.selected: str | None = None
        self.shown: dict[str, Any] | None = None
        self.param: str | None = None
        self.outcome: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="tuning-status")
        yield DataTable(id="studies", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="trials", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="plots"):
            yield PlotextPlot(id="best-curve")
            yield PlotextPlot(id="scatter")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "tuning"
        self.reload()
        self.set_interval(REFRESH_SECONDS, self.reload)

    # ---- workers ------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="tuning-refresh", exit_on_error=False)
    def reload(self) -> None:
        selected = self.selected
        try:
            rows = studies.list_studies(self.ctx)
            ids = [r["id"] for r in rows]
            chosen = selected if selected in ids else (ids[0] if ids else None)
            shown = studies.show_study(self.ctx, chosen) if chosen else None
        except ApplianceError as exc:
            self.post_message(StudiesFailed(exc.message))
            return
        except Exception as exc:  # keep the screen alive; say what went wrong
            self.post_message(StudiesFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(StudiesLoaded(rows, shown))

    @work(thread=True, group="tuning-action", exit_on_error=False)
    def _act(self, verb: str, study_id: str) -> None:
        try:
            if verb == "stop":
                done = studies.stop_study(self.ctx, study_id)
            else:
                done = studies.resume_study(self.ctx, study_id)
        except ApplianceError as exc:
            self.post_message(StudyActionFinished(f"{verb} {study_id}", exc.message))
            return
        self.post_message(StudyActionFinished(f"study {done['name']} {done['state']}", None))

    # ---- handlers -----------------------------------------------------------------------
    @on(StudiesLoaded)
    def _on_loaded(self, message: StudiesLoaded) -> None:
        self.rows = message.rows
        self.shown = message.shown
        if self.shown is not None:
            self.selected = self.shown["id"]
        self._render_studies()
        self._render_trials()
        self._render_plots()

    @on(StudiesFailed)
    def _on_failed(self, message: StudiesFailed) -> None:
        status = self.query_one("#tuning-status", Static)
        status.update(f"[red]error:[/red] {escape(message.error)}")

    @on(StudyActionFinished)
    def _on_action(self, message: StudyActionFinished) -> None:
        show_outcome(self, self.query_one("#tuning-status", Static), message.what, message.error)
        # kept on the status line after refreshes, while that study is the one shown: the
        # answer to what the user just asked
        self.outcome = f"[red]{escape(message.error)}[/red]" if message.error else message.what
        self.reload()

    @on(DataTable.RowHighlighted, "#studies")
    def _on_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key and key != self.selected:
            self.selected = key
            self.param = None
            self.outcome = None  # it answered about another study
            self.reload()

    # ---- rendering ----------------------------------------------------------------------
    def _render_studies(self) -> None:
        table = self.query_one("#studies", DataTable)
        columns = ("id", "name", "state", "trials", "metric", "best", "best_trial", "message")
        ids = [r["id"] for r in self.rows]
        with self.prevent(DataTable.RowHighlighted), table.prevent(DataTable.RowHighlighted):
            if not table.columns:
                for name in columns:
                    table.add_column(name.upper(), key=name)
            table.clear()
            for row in self.rows:
                table.add_row(
                    row["id"],
                    Text(row["name"]),
                    _styled(row["state"]),
                    row["trials"],
                    row["metric"],
                    _number(row["best"]),
                    _number(row["best_trial"]),
                    Text(row["message"][:80]),
                    key=row["id"],
                )
            if self.selected in ids:
                table.move_cursor(row=ids.index(self.selected), animate=False)
        status = self.query_one("#tuning-status", Static)
        if not self.rows:
            status.update("no studies yet: appliance tune --config STUDY.yaml")
            return
        shown = self.shown
        if shown is None:
            return
        importance = ", ".join(
            f"{k} {v:.2f}" for k, v in sorted(shown["importance"].items(), key=lambda kv: -kv[1])
        )
        status.update(
            f"{escape(shown['name'])}: {shown['state']} · {shown['trials']}/{shown['max_trials']}"
            f" trials · best {_number(shown['best_value'])}"
            + (f" (trial {shown['best_trial']})" if shown["best_trial"] is not None else "")
            + (f" · importance: {escape(importance)}" if importance else "")
            + (f"\n{self.outcome}" if self.outcome else "")
        )

    def _params(self) -> list[str]:
        if self.shown is None:
            return []
        return sorted({k for t in self.shown["trial_rows"] for k in flatten(t["params"])})

    def _render_trials(self) -> None:
        table = self.query_one("#trials", DataTable)
        cursor = table.cursor_row  # a refresh must not throw the user back to the top
        table.clear(columns=True)
        if self.shown is None:
            return
        names = self._params()
        table.add_columns("TRIAL", "STATE", "OBJECTIVE", "SECONDS", *map(str.upper, names), "ERROR")
        for t in self.shown["trial_rows"]:
            table.add_row(
                str(t["number"]),
                _styled(t["state"]),
                _number(t["objective"]),
                _number(t["duration_s"]),
                *(_number(flatten(t["params"]).get(n)) for n in names),
                Text((t["error"] or "")[:60]),
            )
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1), animate=False)

    def _render_plots(self) -> None:
        curve = self.query_one("#best-curve", PlotextPlot)
        scatter = self.query_one("#scatter", PlotextPlot)
        for plot in (curve, scatter):
            plot.plt.clear_data()
            plot.plt.clear_figure()
        shown = self.shown
        if shown is None:
            for plot in (curve, scatter):
                plot.refresh()
            return
        metric = shown["objective"]["metric"]
        maximize = shown["objective"]["direction"] == "maximize"
        points = studies.best_curve(shown["trial_rows"], maximize)
        curve.plt.title(f"best {metric} so far")
        if points:
            curve.plt.plot([p[0] for p in points], [p[1] for p in points], marker="braille")
        curve.plt.xlabel("trial")
        names = self._params()
        if self.param not in names:
            self.param = names[0] if names else None
        if self.param is not None:
            xs, ys = scatter_points(shown["trial_rows"], self.param)
            scatter.plt.title(f"{metric} vs {self.param} (p: next)")
            if xs and all(isinstance(x, int | float) for x in xs):
                scatter.plt.scatter(xs, ys)
            elif xs:  # categories: one column per level
                levels = sorted({str(x) for x in xs})
                scatter.plt.scatter([levels.index(str(x)) + 1 for x in xs], ys)
                scatter.plt.xticks(list(range(1, len(levels) + 1)), levels)
            scatter.plt.xlabel(self.param)
        curve.refresh()
        scatter.refresh()

    # ---- actions ------------------------------------------------------------------------
    def action_reload(self) -> None:
        self.reload()

    def action_next_param(self) -> None:
        names = self._params()
        if not names:
            return
        index = names.index(self.param) + 1 if self.param in names else 0
        self.param = names[index % len(names)]
        self._render_plots()

    def _confirm(self, verb: str, allowed: tuple[str, ...], question: str) -> None:
        row = next((r for r in self.rows if r["id"] == self.selected), None)
        if row is None:
            return
        self.outcome = None  # a new question: the last answer no longer applies
        if row["state"] not in allowed:
            self.notify(f"study {row['name']} is {row['state']}", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._act(verb, row["id"])

        self.app.push_screen(ConfirmScreen(question.format(name=escape(row["name"]))), answered)

    def action_stop(self) -> None:
        self._confirm(
            "stop",
            ("running", "stopping", "interrupted"),
            "Stop study [b]{name}[/b]?\nRunning trials are cancelled; resume runs them again.",
        )

    def action_resume(self) -> None:
        self._confirm(
            "resume",  # a finished study too: the core says whether anything can resume
            ("stopped", "interrupted", "succeeded", "failed"),
            "Resume study [b]{name}[/b]?\nIt continues from its stored trials.",
        )
