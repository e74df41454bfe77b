"""alseg's errors: one base type, so that the command line can turn every expected failure into one message.

Each error's message names the file, the value and what to do. The command line prints it (``error: ...``),
exits with status 1 and leaves the traceback to ``alseg.log``; anything that is not an ``AlsegError`` is a bug
and keeps its traceback.
"""

from __future__ import annotations


class AlsegError(Exception):
    """An expected failure: bad input, a changed dataset, a full disk, a locked experiment."""


class ExperimentError(AlsegError, RuntimeError):
    """The experiment cannot be created or continued; the message says why."""
