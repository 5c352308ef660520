"""The project's error base class, so callers (the CLI) can tell a user's problem from a bug."""

from __future__ import annotations


class ReshuffleError(Exception):
    """A problem the user can fix: the message names it and what to do."""
