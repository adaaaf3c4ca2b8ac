"""The Jobs screen: the queue with live states and progress bars, a log that follows, cancel.

A thread worker reads the queue and the selected job's log tail every second and posts
`JobsRefreshed`; only handlers touch widgets. Cancelling asks first (it kills processes).
CLI twins: `jobs list`, `jobs logs -f`, `jobs cancel`.
"""

from __future__ import annotations

from typing import Any, ClassVar

from rich.markup import escape
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.message import Message
from textual.screen import ModalScreen, Screen
from textual.widgets import DataTable, Footer, Header, Log, ProgressBar, Static

from appliance.core import jobs
from appliance.core.context import Appliance
from appliance.errors import ApplianceError

REFRESH_SECONDS = 1.0
COLUMNS = ("id", "run", "kind", "state", "progress", "attempt", "submitted", "error")


def progress_cell(fraction: float | None, state: str, width: int = 12) -> str:
    """A progress bar drawn in a table cell: ██████░░░░ 60%."""
    if fraction is None:
        return "" if state == "queued" else ("done" if state == "succeeded" else "")
    fraction = min(max(fraction, 0.0), 1.0)
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled) + f" {100 * fraction:3.0f}%"


class JobsRefreshed(Message):
    """The queue, and the tail of the selected job's log, read by the refresh worker."""

    def __init__(self, rows: list[dict[str, Any]], selected: str | None, log: str) -> None:
        super().__init__()
        self.rows, self.selected, self.log = rows, selected, log


class JobCancelled(Message):
    def __init__(self, job_id: str, state: str | None, error: str | None) -> None:
        super().__init__()
        self.job_id, self.state, self.error = job_id, state, error


class JobsFailed(Message):
    def __init__(self, error: str) -> None:
        super().__init__()
        self.error = error


class ConfirmScreen(ModalScreen[bool]):
    """A yes/no question for a dangerous action; `y` confirms, anything else declines."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("y", "answer(True)", "Yes"),
        Binding("n,escape", "answer(False)", "No"),
    ]
    DEFAULT_CSS = """
    ConfirmScreen { align: center middle; }
    ConfirmScreen > Vertical { width: 64; height: auto; border: thick $error; padding: 1 2;
                               background: $surface; }
    """

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical():
            yield Static(f"{self.question}\n\n[b]y[/b] yes    [b]n[/b] no", id="question")

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)


def show_outcome(screen: Screen[Any], status: Static, what: str, error: str | None) -> bool:
    """An action's end on a screen's status line and as a notification; True when it was
    an action that succeeded (the caller reloads), False on an error or a mere refresh."""
    if error:
        status.update(f"[red]{escape(error)}[/red]")
        screen.notify(error, severity="error")
        return False
    if what == "refresh":
        return False
    status.update(f"{escape(what)}: done")
    screen.notify(f"{what}: done")
    return True


class JobsScreen(Screen[None]):
    """Every job, newest first; the highlighted one's progress and log below."""

    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "app.pop_screen", "Back"),
        Binding("c", "cancel_job", "Cancel job"),
        Binding("f", "toggle_follow", "Follow log"),
        Binding("r", "reload", "Refresh"),
    ]
    DEFAULT_CSS = """
    JobsScreen #jobs { height: 1fr; }
    JobsScreen #job-pane { height: 1fr; }
    JobsScreen #job-head { height: 1; }
    JobsScreen #job-detail { width: 1fr; padding: 0 1; }
    JobsScreen #job-progress { width: 40; }
    JobsScreen #job-log { height: 1fr; border: round $panel; }
    JobsScreen #jobs-status { height: 1; padding: 0 1; color: $text-muted; }
    """

    def __init__(self, ctx: Appliance) -> None:
        super().__init__()
        self.ctx = ctx
        self.rows: list[dict[str, Any]] = []
        self.selected: str | None = None
        self.follow = True
        self.shown_log = ""

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("loading…", id="jobs-status")
        yield DataTable(id="jobs", cursor_type="row", zebra_stripes=True)
        with Vertical(id="job-pane"):
            with Horizontal(id="job-head"):
                yield Static("", id="job-detail")
                yield ProgressBar(id="job-progress", total=100, show_eta=False)
            yield Log(id="job-log", auto_scroll=True)
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = "jobs"
        table = self.query_one("#jobs", DataTable)
        for column in COLUMNS:
            table.add_column(column.upper(), key=column)
        self.reload()
        self.set_interval(REFRESH_SECONDS, self.reload)

    @work(thread=True, exclusive=True, group="jobs-refresh", exit_on_error=False)
    def reload(self) -> None:
        selected = self.selected
        try:
            rows = jobs.list_jobs(self.ctx)
            if selected is None and rows:
                selected = rows[0]["id"]
            log = jobs.log_tail(self.ctx, selected) if selected else ""
        except ApplianceError as exc:
            self.post_message(JobsFailed(exc.message))
            return
        except Exception as exc:  # keep the screen alive; say what went wrong
            self.post_message(JobsFailed(f"{type(exc).__name__}: {exc}"))
            return
        self.post_message(JobsRefreshed(rows, selected, log))

    def action_reload(self) -> None:
        self.reload()

    @on(JobsRefreshed)
    def _on_refreshed(self, message: JobsRefreshed) -> None:
        self.rows = message.rows
        if self.selected is None:
            self.selected = message.selected
        self._render_table()
        if message.selected == self.selected:
            self._render_selected(message.log)
        running = sum(1 for r in self.rows if r["state"] == "running")
        queued = sum(1 for r in self.rows if r["state"] == "queued")
        follow = "following" if self.follow else "paused"
        self.query_one("#jobs-status", Static).update(
            f"{len(self.rows)} jobs · {running} running · {queued} queued · log {follow}"
            "   c cancel · f follow · esc back"
        )

    @on(JobsFailed)
    def _on_failed(self, message: JobsFailed) -> None:
        self.query_one("#jobs-status", Static).update(f"[red]refresh failed:[/red] {message.error}")

    def _render_table(self) -> None:
        table = self.query_one("#jobs", DataTable)
        cells = [
            (
                row["id"],
                Text(row.get("run_name") or ""),  # user text: never parsed as markup
                row["kind"],
                _state_markup(row["state"]),
                progress_cell(row.get("fraction"), row["state"]),
                f"{row['attempt']}/{row['retries'] + 1}",
                (row.get("submitted_at") or "")[:19].replace("T", " "),
                Text((row.get("error") or "")[:60]),
            )
            for row in self.rows
        ]
        ids = [r["id"] for r in self.rows]
        # The refresh is not the user: its cursor moves must not change the selection.
        with self.prevent(DataTable.RowHighlighted), table.prevent(DataTable.RowHighlighted):
            if [str(k.value) for k in table.rows] == ids:
                for job_id, values in zip(ids, cells, strict=True):  # in place: no flicker
                    for column, value in zip(COLUMNS, values, strict=True):
                        table.update_cell(job_id, column, value, update_width=True)
            else:
                table.clear()
                for job_id, values in zip(ids, cells, strict=True):
                    table.add_row(*values, key=job_id)
                if self.selected in ids:
                    table.move_cursor(row=ids.index(self.selected), animate=False)

    def _render_selected(self, log: str) -> None:
        job = next((r for r in self.rows if r["id"] == self.selected), None)
        detail = self.query_one("#job-detail", Static)
        bar = self.query_one("#job-progress", ProgressBar)
        if job is None:
            detail.update("")
            return
        message = job.get("progress_message") or ""
        detail.update(f"[b]{job['id']}[/b] {job['state']}  {escape(message)}".rstrip())
        total = job.get("progress_total")
        if total:
            bar.update(total=total, progress=job.get("progress_current") or 0)
        elif job["state"] == "succeeded":
            bar.update(total=1, progress=1)
        else:
            bar.update(total=None)
        if self.follow and log != self.shown_log:
            widget = self.query_one("#job-log", Log)
            if log.startswith(self.shown_log) and self.shown_log:
                widget.write(log[len(self.shown_log) :])
            else:
                widget.clear()
                widget.write(log)
            self.shown_log = log

    @on(DataTable.RowHighlighted, "#jobs")
    def _on_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value
        if key and key != self.selected:
            self.selected = key
            self.shown_log = ""
            self.query_one("#job-log", Log).clear()
            self.reload()

    def action_toggle_follow(self) -> None:
        self.follow = not self.follow
        self.reload()

    def action_cancel_job(self) -> None:
        job = next((r for r in self.rows if r["id"] == self.selected), None)
        if job is None:
            return
        if job["state"] not in jobs.ACTIVE_STATES:
            self.notify(f"job {job['id']} already {job['state']}", severity="warning")
            return
        name = escape(job.get("run_name") or job["kind"])
        question = (
            f"Cancel job [b]{job['id']}[/b] ({name}, {job['state']})?\nThis kills its processes."
        )

        def answered(yes: bool | None) -> None:
            if yes:
                self._cancel(job["id"])

        self.app.push_screen(ConfirmScreen(question), answered)

    @work(thread=True, group="jobs-cancel", exit_on_error=False)
    def _cancel(self, job_id: str) -> None:
        try:
            done = jobs.cancel_job(self.ctx, job_id)
        except ApplianceError as exc:
            self.post_message(JobCancelled(job_id, None, exc.message))
            return
        self.post_message(JobCancelled(job_id, done["state"], None))

    @on(JobCancelled)
    def _on_cancelled(self, message: JobCancelled) -> None:
        if message.error:
            self.notify(message.error, severity="error")
        else:
            self.notify(f"job {message.job_id} {message.state}")
        self.reload()


def _state_markup(state: str) -> str:
    colour = {
        "running": "cyan",
        "queued": "yellow",
        "succeeded": "green",
        "failed": "red",
        "timed_out": "red",
        "cancelled": "magenta",
    }.get(state, "white")
    return f"[{colour}]{state}[/{colour}]"
