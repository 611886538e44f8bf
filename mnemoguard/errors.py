"""The project's error types for what a user gives it (no torch, so the command line can catch them cheaply): each
message names what was expected and what was found, and where (the key, the row and file, the checkpoint file)."""

from __future__ import annotations

from .config.schema import ConfigError

__all__ = ["ConfigError", "DataError", "OutputDirError", "StateFormatError"]


class DataError(ValueError):
    """A dataset row or file that cannot be used; the message names the row and the file."""


class StateFormatError(ValueError):
    """A saved state that does not have the expected shape; the message names the file and the key."""


class OutputDirError(FileExistsError):
    """The output directory holds an earlier run that a new run would silently overwrite."""
