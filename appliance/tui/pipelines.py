"""The Pipelines screen: pipelines and their triggers; runs; for the highlighted run, its DAG
drawn in the terminal with live step states, and its steps (cache hit and why, outputs).

Reads run in a thread worker every second and post `PipelinesLoaded`; Enter on a step opens
its job's log (followed live); retry, cancel and removing a trigger ask for confirmation and
run in workers. CLI twins: `pipelines runs`, `pipelines show`, `pipelines retry`,
`pipelines cancel`, `pipelines triggers`, `pipelines remove-trigger`, `jobs logs`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, VerticalScroll
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Static

from appliance.core import jobs, pipeline_runs, pipeline_triggers
from appliance.core.context import Appliance
from appliance.errors import ApplianceError
from appliance.tui.jobs import ConfirmScreen, show_outcome
from appliance.tui.tables import fill_table

REFRESH_SECONDS = 1.0
GLYPH = {
    "pending": ("○", "dim"),
    "running": ("●", "cyan"),
    "succeeded": ("✓", "green"),
    "cached": ("↺", "blue"),
    "skipped": ("⤼", "yellow"),
    "failed": ("✗", "red"),
    "cancelled": ("⊘", "magenta"),
    "queued": ("○", "dim"),
}


def dag_layers(steps: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    """Steps in columns: each one column right of the furthest step it waits for."""
    depth: dict[str, int] = {}
    by_name = {s["step"]: s for s in steps}

    def level(name: str) -> int:
        if name not in depth:
            after = [a for a in by_name[name]["after"] if a in by_name]
            depth[name] = 1 + max((level(a) for a in after), default=-1)
        return depth[name]

    layers: list[list[dict[str, Any]]] = []
    for step in steps:
        column = level(step["step"])
        while len(layers) <= column:
            layers.append([])
        layers[column].append(step)
    return layers


def draw_dag(steps: list[dict[str, Any]]) -> Text:
    """The DAG as text: columns left to right in run order, each step with its state glyph,
    duration, and (when it is not simply the step before it) what it waits for."""
    layers = dag_layers(steps)
    if not layers:
        return Text("")
    cells: list[list[Text]] = []
    for index, layer in enumerate(layers):
        previous = {s["step"] for s in layers[index - 1]} if index else set()
        column = []
        for step in layer:
            glyph, style = GLYPH.get(step["state"], ("?", ""))
            cell = Text(f"{glyph} ", style=style)
            cell.append(step["step"], style="bold" if step["state"] == "running" else "")
            if step.get("duration_s") is not None and step["state"] != "pending":
                cell.append(f" {step['duration_s']:.1f}s", style="dim")
            waits = [a for a in step["after"] if a not in previous or len(layer) > 1]
            if waits and index:
                cell.append(f" ◂{','.join(waits)}", style="dim")
            column.append(cell)
        cells.append(column)
    widths = [max(c.cell_len for c in column) for column in cells]
    out = Text()
    for row in range(max(len(column) for column in cells)):
        for index, column in enumerate(cells):
            cell = column[row] if row < len(column) else Text("")
            if index:
                out.append(" ──▶ " if row == 0 else "     ", style="dim")
            out.append_text(cell)
            out.append(" " * (widths[index] - cell.cell_len))
        out.append("\n")
    out.rstrip()
    return out


class PipelinesLoaded(Message):
    def __init__(
        self,
        seen: list[dict[str, Any]],
        triggers: list[dict[str, Any]],
        runs: list[dict[str, Any]],
        shown: dict[str, Any] | None,
    ) -> None:
        super().__init__()
        self.seen, self.triggers, self.runs, self.shown = seen, triggers, runs, shown


class PipelinesFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class PipelineActionFinished(Message):
    def __init__(self, what: str, error: str | None) -> None:
        super().__init__()
        self.what, self.error = what, error


class LogLoaded(Message):
    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text


class StepLogScreen(ModalScreen[None]):
    """One step's job log, followed while the job runs (`jobs logs JOB --follow`)."""

    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,q", "dismiss", "Close")]
    DEFAULT_CSS = """
    StepLogScreen { align: center middle; }
    StepLogScreen > VerticalScroll { width: 90%; height: 90%; border: round $accent;
                                     background: $surface; padding: 0 1; }
    """

    def __init__(self, ctx: Appliance, job_id: str, title: str) -> None:
        super().__init__()
        self.ctx, self.job_id, self.title_text = ctx, job_id, title

    def compose(self) -> ComposeResult:
        with VerticalScroll():
            yield Static(f"[b]{escape(self.title_text)}[/b]  (job {self.job_id})")
            yield Static("loading…", id="step-log")

    def on_mount(self) -> None:
        self.load()
        self.set_interval(REFRESH_SECONDS, self.load)

    @work(thread=True, exclusive=True, group="step-log", exit_on_error=False)
    def load(self) -> None:
        try:
            text = jobs.log_tail(self.ctx, self.job_id, 65_536)
        except ApplianceError as exc:
            text = f"error: {exc.message}"
        self.post_message(LogLoaded(text))

    @on(LogLoaded)
    def _on_log(self, message: LogLoaded) -> None:
        self.query_one("#step-log", Static).update(Text(message.text or "(no output yet)"))


class PipelinesScreen(Screen[None]):
    """Pipelines and triggers on top, runs below, the highlighted run's DAG and steps."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("enter", "log", "Step log", show=False),
        Binding("l", "log", "Step log"),
        Binding("u", "retry", "Retry run"),
        Binding("x", "cancel", "Cancel run"),
        Binding("delete", "remove_trigger", "Remove trigger"),
        Binding("r", "reload", "Refresh"),
    ]
    DEFAULT_CSS = """
    PipelinesScreen #pipelines-status { height: auto; max-height: 3; padding: 0 1;
                                        color: $text-muted; }
    PipelinesScreen #definitions-row { height: 1fr; }
    PipelinesScreen #definitions { width: 1fr; }
    PipelinesScreen #triggers { width: 2fr; }
    PipelinesScreen #runs { height: 1fr; }
    PipelinesScreen #dag { height: auto; max-height: 12; padding: 0 1; border: round $primary; }
    PipelinesScreen #steps { height: 2fr; }
    """

    def __init__(self, ctx: Appliance) -> None:
        super().__init__()
        self.ctx = ctx
        self.seen: list[dict[str, Any]] = []
        self.triggers: list[dict[str, Any]] = []
        self.runs: list[dict[str, Any]] = []
        self.selected: str | None = None
        self.shown: dict[str, Any] | None = None
        self.outcome: str | None = None

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="pipelines-status")
        with Horizontal(id="definitions-row"):
            yield DataTable(id="definitions", cursor_type="row", zebra_stripes=True)
            yield DataTable(id="triggers", cursor_type="row", zebra_stripes=True)
        yield DataTable(id="runs", cursor_type="row", zebra_stripes=True)
        yield Static("", id="dag")
        yield DataTable(id="steps", cursor_type="row", zebra_stripes=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "pipelines"
        self.reload()
        self.set_interval(REFRESH_SECONDS, self.reload)

    # ---- workers ------------------------------------------------------------------------
    @work(thread=True, exclusive=True, group="pipelines-refresh", exit_on_error=False)
    def reload(self) -> None:
        selected = self.selected
        try:
            seen = pipeline_runs.pipelines_seen(self.ctx)
            triggers = pipeline_triggers.list_triggers(self.ctx)
            runs = pipeline_runs.list_runs(self.ctx)
            ids = [r["id"] for r in runs]
            chosen = selected if selected in ids else (ids[0] if ids else None)
            shown = pipeline_runs.show_run(self.ctx, chosen) if chosen else None
        except ApplianceError as exc:
            self.post_message(PipelinesFailed(exc.message))
            return
        except Exception as exc:  # keep the screen alive; say what went wrong
            self.post_message(PipelinesFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(PipelinesLoaded(seen, triggers, runs, shown))

    @work(thread=True, group="pipelines-action", exit_on_error=False)
    def _act(self, verb: str, ident: str) -> None:
        try:
            if verb == "retry":
                done = pipeline_runs.retry_run(self.ctx, ident)
                what = f"run {done['id']} {done['state']}"
            elif verb == "cancel":
                done = pipeline_runs.cancel_run(self.ctx, ident)
                what = f"run {done['id']}: cancel requested"
            else:
                pipeline_triggers.remove_trigger(self.ctx, ident)
                what = f"trigger {ident} removed"
        except ApplianceError as exc:
            self.post_message(PipelineActionFinished(f"{verb} {ident}", exc.message))
            return
        self.post_message(PipelineActionFinished(what, None))

    # ---- handlers -----------------------------------------------------------------------
    @on(PipelinesLoaded)
    def _on_loaded(self, message: PipelinesLoaded) -> None:
        self.seen, self.triggers, self.runs = message.seen, message.triggers, message.runs
        self.shown = message.shown
        if self.shown is not None:
            self.selected = self.shown["id"]
        self._render_tables()
        self._render_run()

    @on(PipelinesFailed)
    def _on_failed(self, message: PipelinesFailed) -> None:
        status = self.query_one("#pipelines-status", Static)
        status.update(f"[red]error:[/red] {escape(message.error)}")

    @on(PipelineActionFinished)
    def _on_action(self, message: PipelineActionFinished) -> None:
        show_outcome(self, self.query_one("#pipelines-status", Static), message.what, message.error)
        self.outcome = f"[red]{escape(message.error)}[/red]" if message.error else message.what
        self.reload()

    @on(DataTable.RowHighlighted, "#runs")
    def _on_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key and key != self.selected:
            self.selected = key
            self.outcome = None
            self.reload()

    @on(DataTable.RowSelected, "#steps")
    def _on_step_selected(self, event: DataTable.RowSelected) -> None:
        self.action_log()

    # ---- rendering ----------------------------------------------------------------------
    def _render_tables(self) -> None:
        fill_table(
            self.query_one("#definitions", DataTable),
            ("pipeline", "runs", "last", "triggers"),
            [
                (p["pipeline"], p["pipeline"], p["runs"], _state(p["last_state"]), p["triggers"])
                for p in self.seen
            ],
        )
        fill_table(
            self.query_one("#triggers", DataTable),
            ("id", "pipeline", "when", "policy", "next", "last"),
            [
                (
                    t["id"],
                    t["id"],
                    t["pipeline"],
                    Text(t["when"]),
                    t["policy"],
                    t["next"] or "",
                    Text((t["last_message"] or "")[:60]),
                )
                for t in self.triggers
            ],
        )
        runs = self.query_one("#runs", DataTable)
        with self.prevent(DataTable.RowHighlighted):
            fill_table(
                runs,
                ("id", "pipeline", "state", "trigger", "steps", "cached", "seconds", "error"),
                [
                    (
                        r["id"],
                        r["id"],
                        r["pipeline"],
                        _state(r["state"]),
                        r["trigger"],
                        f"{r['done']}/{r['steps']}",
                        r["cached"],
                        f"{r['duration_s']:.1f}" if r["duration_s"] is not None else "",
                        Text((r["error"] or "")[:60]),
                    )
                    for r in self.runs
                ],
            )
            ids = [r["id"] for r in self.runs]
            if self.selected in ids:
                runs.move_cursor(row=ids.index(self.selected), animate=False)
        status = self.query_one("#pipelines-status", Static)
        if not self.runs and not self.triggers:
            status.update("no pipeline runs yet: appliance pipelines run PIPELINE.yaml")
            return
        shown = self.shown
        if shown is not None:
            status.update(
                f"{escape(shown['pipeline'])} run {shown['id']}: {shown['state']} · "
                f"{shown['done']}/{shown['steps']} steps ({shown['cached']} cached) · params "
                f"{escape(str(shown['params']))}"
                + (f"\n[red]{escape(shown['error'])}[/red]" if shown["error"] else "")
                + (f"\n{self.outcome}" if self.outcome else "")
            )

    def _render_run(self) -> None:
        dag = self.query_one("#dag", Static)
        steps = self.shown["steps_detail"] if self.shown else []
        dag.update(draw_dag(steps))
        fill_table(
            self.query_one("#steps", DataTable),
            ("step", "kind", "state", "seconds", "cache", "why", "outputs", "job"),
            [
                (
                    s["step"],
                    s["step"],
                    s["kind"],
                    _state(s["state"]),
                    f"{s['duration_s']:.2f}" if s["duration_s"] is not None else "",
                    s["cache"],
                    Text((s["error"] or s["why"] or "")[:70]),
                    Text(" ".join(f"{k}={v}" for k, v in s["outputs"].items() if v is not None)),
                    s["job_id"] or "",
                )
                for s in steps
            ],
        )

    # ---- actions ------------------------------------------------------------------------
    def action_reload(self) -> None:
        self.reload()

    def action_log(self) -> None:
        if self.shown is None:
            return
        table = self.query_one("#steps", DataTable)
        steps = self.shown["steps_detail"]
        if not steps or table.cursor_row >= len(steps):
            return
        step = steps[table.cursor_row]
        if not step["job_id"]:
            why = "came from the cache" if step["state"] == "cached" else step["state"]
            self.notify(f"step {step['step']} has no job ({why})", severity="warning")
            return
        self.app.push_screen(
            StepLogScreen(self.ctx, step["job_id"], f"{self.shown['pipeline']}.{step['step']}")
        )

    def _confirm_run(self, verb: str, allowed: tuple[str, ...], question: str) -> None:
        run = self.shown
        if run is None:
            return
        self.outcome = None
        if run["state"] not in allowed:
            self.notify(f"run {run['id']} is {run['state']}", severity="warning")
            return

        def answered(yes: bool | None) -> None:
            if yes:
                self._act(verb, run["id"])

        self.app.push_screen(ConfirmScreen(question.format(id=run["id"])), answered)

    def action_retry(self) -> None:
        self._confirm_run(
            "retry",
            ("failed", "cancelled"),
            "Retry run [b]{id}[/b]?\nIts failed and unfinished steps run; the rest is kept.",
        )

    def action_cancel(self) -> None:
        self._confirm_run(
            "cancel",
            ("queued", "running"),
            "Cancel run [b]{id}[/b]?\nIts running steps' jobs are cancelled; retry continues.",
        )

    def action_remove_trigger(self) -> None:
        table = self.query_one("#triggers", DataTable)
        if not self.triggers or table.cursor_row >= len(self.triggers):
            return
        trigger = self.triggers[table.cursor_row]

        def answered(yes: bool | None) -> None:
            if yes:
                self._act("remove", trigger["id"])

        self.app.push_screen(
            ConfirmScreen(
                f"Remove trigger [b]{trigger['id']}[/b] ({escape(trigger['when'])}) of "
                f"{escape(trigger['pipeline'])}?\nIts runs are kept."
            ),
            answered,
        )


def _state(state: str | None) -> Text:
    glyph, style = GLYPH.get(state or "", ("", ""))
    return Text(f"{glyph} {state}" if state else "", style=style)
