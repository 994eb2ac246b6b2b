"""Exceptions and warnings with messages meant for users; the CLI prints them without a traceback."""

from __future__ import annotations

import warnings


class PolydistillError(Exception):
    """Base class of every error polydistill reports to users."""


class ConfigError(PolydistillError):
    """The configuration (file, override or plugin section) is invalid."""


class PluginError(PolydistillError):
    """A plugin is unknown, broken, incompatible, or raised inside a hook."""

    def __init__(self, message: str, plugin: str | None = None, hook: str | None = None):
        super().__init__(message)
        self.plugin = plugin
        self.hook = hook


class DataError(PolydistillError):
    """A data file, column or value cannot be used."""


class CheckpointError(PolydistillError):
    """A checkpoint cannot be written (disk full, permissions) or read (torn, corrupt)."""


class PolydistillWarning(UserWarning):
    """Something was skipped or repaired and the run goes on (a corrupt checkpoint or cache entry)."""


def warn(message: str) -> None:
    """Issue a :class:`PolydistillWarning` (the CLI prints it as ``polydistill: warning: ...``)."""
    warnings.warn(message, PolydistillWarning, stacklevel=2)
