"""The user's mistakes, as exceptions the commands report in one line (``dmt.cli``), never as tracebacks.

Each is also the built-in exception callers already catch (``ValueError``, ``FileExistsError``), so code
that handles those keeps working. Anything else that escapes a command is a bug in dmt, and keeps its
traceback.
"""

from __future__ import annotations


class DmtError(Exception):
    """A mistake in what the user gave: a setting, a file, a directory. The message names it."""


class ConfigError(DmtError, ValueError):
    """A setting is invalid; the message opens with its key (``swap.read.topk: must be >= 1, got -1``)."""


class InputFileError(DmtError, ValueError):
    """A file or directory the user named is missing, unreadable or not of the expected kind."""


class OutputExistsError(DmtError, FileExistsError):
    """Writing an output would replace or delete something the user did not ask to replace."""
