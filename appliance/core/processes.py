"""Liveness of the detached processes the appliance starts (job supervisors, model servers)."""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

EXEC_WAIT = 2.0  # the longest a process is given to show the command line it exec'd


def alive(pid: int | None) -> bool:
    """True while `pid` runs; a zombie counts as gone (and is reaped if it is our child)."""
    if not pid or pid <= 0:  # waitpid/kill would read 0 and -1 as "any" and "all"
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it
    if not _exists(pid):
        return False
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def identity(pid: int | None) -> str | None:
    """Boot id + start time of a process: unlike its pid, never reused. None without procfs."""
    if not pid:
        return None
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        started = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[19]
    except (OSError, IndexError):
        return None
    return f"{boot}:{started}"


def is_same(pid: int | None, known: str | None) -> bool:
    """True while `pid` is still the process whose identity was recorded (and not a zombie).
    With no identity recorded (no procfs then), liveness is all that can be checked."""
    if not alive(pid):
        return False
    if known is None:
        return True
    return identity(pid) == known


def is_ours(pid: int | None) -> bool:
    """True if `pid` is still an appliance process (guards against PID reuse before a kill).

    A process whose exec is under way shows an empty command line: `posix_spawn` returns
    before the new program's arguments are in place (nearly always, measured), so a job
    checked the moment its supervisor was spawned read as gone. Wait for them, briefly."""
    if not alive(pid):
        return False
    deadline = time.monotonic() + EXEC_WAIT
    while True:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return alive(pid)  # gone meanwhile; or no procfs: alive() is all we can know
        if cmdline or time.monotonic() > deadline or not alive(pid):
            break
        time.sleep(0.001)
    return b"appliance" in cmdline.replace(b"\0", b" ")


def signal_ours(pid: int | None, signum: int) -> bool:
    """Send `signum` to our process; False if it is gone or not ours."""
    if not pid or not is_ours(pid):
        return False
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        return False
    return True


@contextmanager
def exclusive(lock_path: Path) -> Iterator[None]:
    """An advisory lock across processes (start one server per deployment, not three)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _proc_table() -> dict[int, tuple[str, int, int]]:
    """pid -> (state, ppid, pgrp) for every process, from /proc; {} without procfs."""
    table: dict[int, tuple[str, int, int]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return table
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[-1].split()
        table[int(entry)] = (fields[0], int(fields[1]), int(fields[2]))
    return table


def tree_members(pid: int) -> list[int]:
    """The live (non-zombie) processes of a job: `pid`, everything below it, and its group."""
    table = _proc_table()
    if not table:  # no procfs: the group is all we can reach
        return [pid] if _exists(pid) else []
    children: dict[int, list[int]] = {}
    for child, (_, ppid, _) in table.items():
        children.setdefault(ppid, []).append(child)
    found = {pid} if pid in table else set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    found |= {p for p, (_, _, pgrp) in table.items() if pgrp == pid}
    return sorted(p for p in found if table.get(p, ("Z",))[0] != "Z")


def _exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _live(pids: set[int]) -> set[int]:
    table = _proc_table()
    if not table:
        return {p for p in pids if _exists(p)}
    return {p for p in pids if p in table and table[p][0] != "Z"}


def _signal_all(pids: set[int], pgid: int, signum: int) -> None:
    for target in pids:
        try:
            os.kill(target, signum)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.killpg(pgid, signum)
    except (ProcessLookupError, PermissionError):
        pass


def kill_tree(pid: int | None, grace: float = 1.0) -> bool:
    """SIGTERM a process-group leader and everything below it, SIGKILL what is left after
    `grace` seconds; True once none of it runs. Never reaps, so the parent keeps the exit code.
    The caller vouches that `pid` is ours (see is_ours)."""
    if not pid:
        return True
    # Remember the first snapshot: a grandchild orphaned by its parent's death is still ours.
    seen = set(tree_members(pid))

    def remaining() -> set[int]:
        seen.update(tree_members(pid))
        return _live(seen)

    for signum, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 1.0)):
        _signal_all(remaining(), pid, signum)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if not remaining():
                return True
            time.sleep(0.02)
    return not remaining()
