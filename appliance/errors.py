"""Errors a user can act on: each carries a one-line message and a process exit code."""


class ApplianceError(Exception):
    """Base of every error the CLI turns into a one-line message and a non-zero exit."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(ApplianceError):
    """The user gave something malformed: a bad name, a missing file, an empty CSV."""

    exit_code = 2


class NotFound(ApplianceError):
    """A referenced dataset, run, model or deployment does not exist."""

    exit_code = 3


class Conflict(ApplianceError):
    """The request cannot apply to the current state (e.g. rollback with no earlier revision)."""

    exit_code = 4


class Changed(Conflict):
    """The state moved on since the caller judged it (a deploy or a canary's end meanwhile)."""


class CorruptObject(ApplianceError):
    """An object's bytes no longer match the sha256 it is stored under."""

    exit_code = 5


class StoreUnavailable(ApplianceError):
    """The object store cannot be reached or refused the request."""

    exit_code = 6
