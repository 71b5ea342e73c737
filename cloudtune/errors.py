"""Errors a user can act on.

Every failure caused by input (a spec, a flag, a file, a missing credential) is raised as a
`UserError` subclass; the CLI prints its message as one line and exits with its `exit_code`, never
with a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class UserError(Exception):
    """A problem the user can fix. The message names the thing, the value and what to do."""

    exit_code: int = 2

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class SpecError(UserError):
    """The job spec (YAML/JSON) is malformed or inconsistent."""


class DataError(UserError):
    """A dataset file is missing or a record is malformed (file, line and field in the message)."""


class NothingFits(UserError):
    """No offer satisfies the memory and price constraints."""


class NotFound(UserError):
    """A job, model or other named object does not exist."""
