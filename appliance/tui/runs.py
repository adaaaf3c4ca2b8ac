"""The Runs screen: every run with its final metrics, sortable by any metric; marked runs
compared side by side; the highlighted (and marked) runs' metric curves drawn in the terminal.

Store reads run in thread workers that post past-tense messages; only handlers touch widgets.
CLI twins: `runs list --sort metric.NAME`, `runs compare R1 R2`, `runs metrics RUN KEY`.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Input, Static
from textual_plotext import PlotextPlot

from appliance.core import runs
from appliance.core.context import Appliance
from appliance.errors import ApplianceError

REFRESH_SECONDS = 3.0
BASE_COLUMNS = ("", "id", "name", "experiment", "status")
MAX_METRIC_COLUMNS = 8


class RunsRefreshed(Message):
    def __init__(self, rows: list[dict[str, Any]], sort: str | None) -> None:
        super().__init__()
        self.rows, self.sort = rows, sort


class CurvesLoaded(Message):
    """Metric series of some runs: {run label: [(step, value), ...]} for one metric."""

    def __init__(
        self, metric: str | None, series: dict[str, list[tuple[int, float]]], keys: list[str]
    ) -> None:
        super().__init__()
        self.metric, self.series, self.keys = metric, series, keys


class ComparisonLoaded(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class RunsFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


def metric_columns(rows: list[dict[str, Any]], sort: str | None) -> list[str]:
    """Metric names shown as columns: the sorted one first, then final (test/valid) ones."""
    names = sorted({k for r in rows for k in r["metric_values"]})
    sort_name = (sort or "").lstrip("+-").partition(".")[2] if sort else ""

    def rank(name: str) -> tuple[int, str]:
        if name == sort_name:
            return (0, name)
        return (1 if name.startswith(("test_", "valid_")) else 2, name)

    return sorted(names, key=rank)[:MAX_METRIC_COLUMNS]


def render_comparison(result: dict[str, Any]) -> str:
    """`runs compare` as markup: differing params in yellow, each metric's leader in green."""
    names = [f"{escape(n)} ({i[:6]})" for n, i in zip(result["names"], result["runs"], strict=True)]
    lines = ["[b]params[/b]  " + " | ".join(names)]
    for p in result["params"]:
        values = " | ".join(escape(json.dumps(v)) for v in p["values"])
        line = f"{escape(p['param'])}: {values}"
        lines.append(f"[yellow]{line}[/yellow]" if p["differs"] else f"[dim]{line}[/dim]")
    lines.append("")
    lines.append("[b]metrics[/b] (final / best)")
    for m in result["metrics"]:
        cells = []
        for run_id, final, best in zip(result["runs"], m["final"], m["best"], strict=True):
            text = "-" if final is None else f"{final:.4g} / {best:.4g}"
            cells.append(f"[green]{text}[/green]" if run_id == m["leader"] else text)
        lines.append(f"{escape(m['metric'])} ({m['better']}): " + " | ".join(cells))
    return "\n".join(lines)


class RunsScreen(Screen[None]):
    """Runs sortable by any metric, with compare and metric curves."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "back", "Back"),
        Binding("s", "sort_prompt", "Sort"),
        Binding("space", "mark", "Mark"),
        Binding("c", "compare", "Compare marked"),
        Binding("m", "next_metric", "Next curve"),
        Binding("r", "reload", "Refresh"),
    ]
    DEFAULT_CSS = """
    RunsScreen #runs { height: 1fr; }
    RunsScreen #runs-lower { height: 1fr; }
    RunsScreen #curve { width: 1fr; }
    RunsScreen #compare-pane { width: 1fr; border: round $panel; }
    RunsScreen #runs-status { height: 1; padding: 0 1; color: $text-muted; }
    RunsScreen #sort-prompt { dock: bottom; display: none; }
    RunsScreen #sort-prompt.visible { display: block; }
    """

    def __init__(self, ctx: Appliance, experiment: str | None = None) -> None:
        super().__init__()
        self.ctx = ctx
        self.experiment = experiment
        self.sort: str | None = None
        self.rows: list[dict[str, Any]] = []
        self.columns: list[str] = []
        self.selected: str | None = None
        self.marked: list[str] = []
        self.metric: str | None = None
        self.curve_metrics: list[str] = []
        self.series: dict[str, list[tuple[int, float]]] = {}

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="runs-status")
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        with Horizontal(id="runs-lower"):
            yield PlotextPlot(id="curve")
            with VerticalScroll(id="compare-pane"):
                yield Static("mark runs with space, then c to compare", id="compare")
        yield Input(id="sort-prompt", placeholder="sort by: metric.NAME, -metric.NAME, param.NAME")
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "runs"
        self.reload()
        self.set_interval(REFRESH_SECONDS, self.reload)

    # ---- workers ------------------------------------------------------------------------

    @work(thread=True, exclusive=True, group="runs-refresh", exit_on_error=False)
    def reload(self) -> None:
        sort = self.sort
        try:
            rows = runs.runs_table(self.ctx, self.experiment, sort=sort)
        except ApplianceError as exc:
            self.post_message(RunsFailed(exc.message))
            return
        except Exception as exc:  # keep the screen alive; say what went wrong
            self.post_message(RunsFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(RunsRefreshed(rows, sort))

    @work(thread=True, exclusive=True, group="runs-curves", exit_on_error=False)
    def load_curves(self, run_ids: list[str], metric: str | None) -> None:
        try:
            names = {r["id"]: r["name"] for r in self.rows}
            keys = runs.curve_keys(self.ctx, run_ids)
            chosen = metric if metric in keys else (keys[0] if keys else None)
            series = {}
            if chosen:
                for run_id in run_ids:
                    points = runs.metric_history(self.ctx, run_id, chosen)
                    label = f"{names.get(run_id, run_id)} ({run_id[:6]})"
                    series[label] = [(p["step"], p["value"]) for p in points]
        except ApplianceError as exc:
            self.post_message(RunsFailed(exc.message))
            return
        self.post_message(CurvesLoaded(chosen, series, keys))

    @work(thread=True, exclusive=True, group="runs-compare", exit_on_error=False)
    def load_comparison(self, run_ids: list[str]) -> None:
        try:
            result = runs.compare_runs(self.ctx, run_ids)
        except ApplianceError as exc:
            self.post_message(ComparisonLoaded(f"[red]{escape(exc.message)}[/red]"))
            return
        self.post_message(ComparisonLoaded(render_comparison(result)))

    # ---- handlers -----------------------------------------------------------------------

    @on(RunsRefreshed)
    def _on_refreshed(self, message: RunsRefreshed) -> None:
        self.rows = message.rows
        self.columns = metric_columns(self.rows, message.sort)
        table = self.query_one("#runs", DataTable)
        keys = [name or "mark" for name in (*BASE_COLUMNS, *self.columns)]
        labels = []
        for name in (*BASE_COLUMNS, *self.columns):
            arrow = ""
            if message.sort and name == (message.sort.lstrip("+-").partition(".")[2]):
                arrow = " ↓" if message.sort.startswith("-") else " ↑"
                if message.sort[:1] not in "+-":
                    arrow = " ★"  # best first
            labels.append(name.upper() + arrow)
        cells = [
            (
                "●" if row["id"] in self.marked else "",
                row["id"],
                Text(row["name"]),
                Text(row["experiment"]),
                row["status"],
                *(
                    f"{row['metric_values'][c]:.4g}" if c in row["metric_values"] else ""
                    for c in self.columns
                ),
            )
            for row in self.rows
        ]
        ids = [r["id"] for r in self.rows]
        same_shape = (
            [str(k.value) for k in table.columns] == keys
            and [str(c.label) for c in table.columns.values()] == labels
            and [str(k.value) for k in table.rows] == ids
        )
        # The refresh is not the user: its cursor moves must not change the selection, and
        # an unchanged table is updated in place (the scroll position stays).
        with self.prevent(DataTable.RowHighlighted), table.prevent(DataTable.RowHighlighted):
            if same_shape:
                for run_id, values in zip(ids, cells, strict=True):
                    for key, value in zip(keys, values, strict=True):
                        table.update_cell(run_id, key, value, update_width=True)
            else:
                table.clear(columns=True)
                for key, label in zip(keys, labels, strict=True):
                    table.add_column(label, key=key)
                for run_id, values in zip(ids, cells, strict=True):
                    table.add_row(*values, key=run_id)
                if self.selected in ids:
                    table.move_cursor(row=ids.index(self.selected), animate=False)
        if self.selected not in ids and ids:
            self.selected = ids[0]
            self.load_curves(self._curve_runs(), self.metric)
        sort = f"  sorted by {message.sort}" if message.sort else ""
        marked = f"  {len(self.marked)} marked" if self.marked else ""
        self.query_one("#runs-status", Static).update(f"{len(self.rows)} runs{sort}{marked}")

    @on(RunsFailed)
    def _on_failed(self, message: RunsFailed) -> None:
        self.query_one("#runs-status", Static).update(f"[red]error:[/red] {escape(message.error)}")

    @on(CurvesLoaded)
    def _on_curves(self, message: CurvesLoaded) -> None:
        self.metric = message.metric
        self.series = message.series
        self.curve_metrics = message.keys
        plot = self.query_one("#curve", PlotextPlot)
        plt = plot.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(message.metric or "no metric with more than one point")
        for label, points in message.series.items():
            if points:
                plt.plot([p[0] for p in points], [p[1] for p in points], label=label)
        plt.xlabel("step")
        plot.refresh()

    @on(ComparisonLoaded)
    def _on_comparison(self, message: ComparisonLoaded) -> None:
        self.query_one("#compare", Static).update(message.text)

    @on(DataTable.RowHighlighted, "#runs")
    def _on_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key and key != self.selected:
            self.selected = key
            self.load_curves(self._curve_runs(), self.metric)

    @on(DataTable.HeaderSelected, "#runs")
    def _on_header(self, event: DataTable.HeaderSelected) -> None:
        name = str(event.column_key.value)
        if name in self.columns:  # a metric header: best first, then flip
            current = self.sort or ""
            self.sort = f"-metric.{name}" if current == f"metric.{name}" else f"metric.{name}"
            if current == f"-metric.{name}":
                self.sort = f"+metric.{name}"
            self.reload()
        elif name in ("id", "name", "experiment", "status"):
            self.sort = name if self.sort != name else f"-{name}"
            self.reload()

    def _curve_runs(self) -> list[str]:
        chosen = list(self.marked)
        if self.selected and self.selected not in chosen:
            chosen.append(self.selected)
        return chosen

    # ---- actions ------------------------------------------------------------------------

    def action_sort_prompt(self) -> None:
        prompt = self.query_one("#sort-prompt", Input)
        prompt.value = self.sort or ""
        prompt.add_class("visible")
        prompt.focus()

    @on(Input.Submitted, "#sort-prompt")
    def _on_sort(self, event: Input.Submitted) -> None:
        prompt = self.query_one("#sort-prompt", Input)
        prompt.remove_class("visible")
        text = event.value.strip()
        if text and "." not in text and text.lstrip("+-") not in BASE_COLUMNS:
            sign = text[0] if text[0] in "+-" else ""
            text = f"{sign}metric.{text.lstrip('+-')}"  # a bare name is a metric
        self.sort = text or None
        self.query_one("#runs", DataTable).focus()
        self.reload()

    def action_back(self) -> None:
        prompt = self.query_one("#sort-prompt", Input)
        if prompt.has_class("visible"):
            prompt.remove_class("visible")
            self.query_one("#runs", DataTable).focus()
            return
        self.app.pop_screen()

    def action_mark(self) -> None:
        if not self.selected:
            return
        if self.selected in self.marked:
            self.marked.remove(self.selected)
        else:
            self.marked.append(self.selected)
        table = self.query_one("#runs", DataTable)
        table.update_cell(self.selected, "mark", "●" if self.selected in self.marked else "")
        self.load_curves(self._curve_runs(), self.metric)

    def action_compare(self) -> None:
        chosen = self._curve_runs()
        if len(chosen) < 2:
            self.notify("mark at least two runs (space) to compare", severity="warning")
            return
        self.load_comparison(chosen)

    def action_next_metric(self) -> None:
        keys = self.curve_metrics
        if not keys:
            return
        index = keys.index(self.metric) + 1 if self.metric in keys else 0
        self.load_curves(self._curve_runs(), keys[index % len(keys)])

    def action_reload(self) -> None:
        self.reload()
