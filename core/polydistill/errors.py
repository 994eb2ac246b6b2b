"""Exceptions with messages meant for users; the CLI prints them without a traceback."""


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
