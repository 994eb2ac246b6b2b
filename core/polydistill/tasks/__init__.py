"""Tasks: what differs between classification, tagging, embedding (and tasks a package adds).

A task is a :class:`Task` subclass registered under the entry-point group
``polydistill.tasks``; the built-in ones are registered the same way.
``get_task(name)`` returns a task's instance; the rest of polydistill asks it,
never compares task names.
"""

from __future__ import annotations

import difflib
from importlib import metadata

from polydistill.errors import ConfigError
from polydistill.tasks.base import Task

__all__ = ["ENTRY_POINT_GROUP", "Task", "get_task", "task_names"]

ENTRY_POINT_GROUP = "polydistill.tasks"

_loaded: dict[str, Task] = {}


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def task_names() -> list[str]:
    """Every installed task's name, without importing any."""
    return sorted(set(_entry_points()) | set(_loaded))


def get_task(name: str | Task) -> Task:
    """The task registered as ``name`` (a :class:`Task` is returned as it is)."""
    if isinstance(name, Task):
        return name
    task = _loaded.get(name)
    if task is not None:
        return task
    eps = _entry_points()
    ep = eps.get(name)
    if ep is None:
        if not eps:
            raise ConfigError(f"task: no task is registered under the entry-point group '{ENTRY_POINT_GROUP}'; "
                              "polydistill's install is incomplete: reinstall it (pip install polydistill)")
        close = difflib.get_close_matches(str(name), sorted(eps), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise ConfigError(f"task: unknown task {name!r}{hint}; installed tasks: {', '.join(sorted(eps))} "
                          f"(a package adds one under the entry-point group '{ENTRY_POINT_GROUP}')")
    try:
        cls = ep.load()
    except Exception as exc:
        raise ConfigError(f"task: cannot load task '{name}' ({ep.value}): {type(exc).__name__}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, Task)):
        raise ConfigError(f"task: '{name}' ({ep.value}) is not a polydistill.tasks.Task subclass")
    if cls.name != name:
        raise ConfigError(f"task: entry point '{name}' ({ep.value}) names a task whose name is {cls.name!r}; they must agree")
    task = _loaded[name] = cls()
    return task
