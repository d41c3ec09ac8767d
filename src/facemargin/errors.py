"""The one exception type for a user's mistake, and what an entry point does with it.

A :class:`UserError` is raised where facemargin can say exactly what is wrong with the user's
input or environment -- a file, a record, a key, an option -- and what to do about it. Entry
points (:func:`facemargin.cli.run_cli`) print it as one line, ``<prog>: error: <message>``, plus
``hint: <hint>`` when the raiser knows a fix that applies, and exit with status 2: no traceback.
Anything else that escapes is a bug in facemargin and keeps its traceback.

Domain errors subclass it next to the builtin they always were (``class RecordIOError(UserError,
ValueError)``), so ``except ValueError`` in user code keeps working. Stdlib only: every entry point
imports this before anything heavy.
"""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A mistake in the user's input or set-up, stated completely in its message.

    ``message`` names the file, line, record or key; ``hint`` (optional) is a fix that applies to
    this case only -- never a generic "check your paths".
    """

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.hint = hint
