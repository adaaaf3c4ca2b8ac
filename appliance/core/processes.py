"""Liveness of the detached processes the appliance starts (job supervisors, model servers)."""

from __future__ import annotations

import fcntl
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def alive(pid: int | None) -> bool:
    """True while `pid` runs; a zombie counts as gone (and is reaped if it is our child)."""
    if not pid:
        return False
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return False
    except ChildProcessError:
        pass  # not our child: its parent (or init) reaps it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill(0)
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def is_ours(pid: int | None, marker: str = "appliance") -> bool:
    """True if `pid` is still a process we started (guards against PID reuse before a kill)."""
    if not alive(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return True  # no procfs: alive() is all we can know
    return marker.encode() in cmdline


def signal_ours(pid: int | None, signum: int, group: bool = False) -> bool:
    """Send `signum` to our process (or its process group); False if it is gone or not ours."""
    if not pid or not is_ours(pid):
        return False
    try:
        if group:
            os.killpg(pid, signum)
        else:
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
