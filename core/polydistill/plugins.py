"""Plugin discovery (entry points), loading, validation and hook calling."""

from __future__ import annotations

import difflib
import functools
import inspect
import os
import re
import sys
import types
from dataclasses import dataclass
from importlib import metadata
from typing import Any, Iterable

import pluggy
from pydantic import BaseModel, ValidationError

from polydistill import hookspecs
from polydistill.version import API_VERSION
from polydistill.errors import ConfigError, PluginError, PolydistillError

ENTRY_POINT_GROUP = "polydistill.plugins"
#: Names listed in this group are enabled unless the config says ``name: false``.
DEFAULTS_GROUP = "polydistill.default_plugins"
TRACE_ENV = "POLYDISTILL_TRACE"

_SINGLE_ANSWER = tuple(h for h, rule in hookspecs.COMBINING.items() if rule == "single")
_MERGED = tuple(h for h, rule in hookspecs.COMBINING.items() if rule == "merged")


@dataclass
class InstalledPlugin:
    name: str
    value: str
    distribution: str | None
    version: str | None
    default: bool


def _entry_points(group: str) -> list[metadata.EntryPoint]:
    return list(metadata.entry_points(group=group))


def installed_plugins() -> dict[str, InstalledPlugin]:
    """Every plugin installed through the entry-point group, without importing any."""
    defaults = {ep.name for ep in _entry_points(DEFAULTS_GROUP)}
    found: dict[str, InstalledPlugin] = {}
    for ep in _entry_points(ENTRY_POINT_GROUP):
        dist = getattr(ep, "dist", None)
        found[ep.name] = InstalledPlugin(
            name=ep.name,
            value=ep.value,
            distribution=dist.metadata["Name"] if dist else None,
            version=dist.version if dist else None,
            default=ep.name in defaults,
        )
    return found


def _api_tuple(version: str) -> tuple[int, int] | None:
    parts = str(version).strip().split(".")
    if len(parts) > 2 or not all(p.isdigit() for p in parts):
        return None
    return int(parts[0]), int(parts[1]) if len(parts) > 1 else 0


def check_api(name: str, obj: Any) -> None:
    """Refuse a plugin whose ``polydistill_api`` this polydistill does not provide.

    ``MAJOR.MINOR`` runs on the same major with at least that minor (minors only
    add). A plugin without the attribute is not checked.
    """
    wanted = getattr(obj, "polydistill_api", None)
    if wanted is None:
        return
    have = _api_tuple(API_VERSION)
    need = _api_tuple(wanted)
    if need is None:
        raise PluginError(f"plugin '{name}' declares polydistill_api = {wanted!r}; expected 'MAJOR.MINOR', e.g. {API_VERSION!r}", plugin=name)
    if need[0] != have[0] or need[1] > have[1]:
        fix = "upgrade polydistill" if need > have else f"install a version of the plugin made for API {have[0]}.x"
        raise PluginError(
            f"plugin '{name}' needs polydistill plugin API {wanted}, but this polydistill provides {API_VERSION}; {fix}",
            plugin=name,
        )


def install_hint(plugin: str, exc: BaseException) -> str:
    """For a missing module, the pip command that installs it (the plugin distribution's extra when one names it)."""
    if not isinstance(exc, ModuleNotFoundError) or not exc.name:
        return ""
    module = exc.name.split(".")[0]
    dist = next((getattr(ep, "dist", None) for ep in _entry_points(ENTRY_POINT_GROUP) if ep.name == plugin), None)
    if dist is not None:
        wanted = re.sub(r"[-_.]+", "-", module).lower()
        for line in dist.requires or []:
            match = re.match(r"\s*([A-Za-z0-9._-]+).*?extra\s*==\s*[\"']([^\"']+)[\"']", line)
            if match and re.sub(r"[-_.]+", "-", match.group(1)).lower() == wanted:
                return f" (a missing optional dependency: pip install '{dist.metadata['Name']}[{match.group(2)}]')"
    return f" (a missing dependency: pip install {module})"


def load_plugin_object(name: str, installed: dict[str, InstalledPlugin] | None = None) -> Any:
    """Import the object an entry point names; errors name the plugin."""
    installed = installed if installed is not None else installed_plugins()
    if name not in installed:
        close = difflib.get_close_matches(name, list(installed), n=1, cutoff=0.5)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        listing = ", ".join(sorted(installed)) or "none"
        raise PluginError(f"unknown plugin '{name}'.{hint} Installed plugins: {listing}.", plugin=name)
    eps = [ep for ep in _entry_points(ENTRY_POINT_GROUP) if ep.name == name]
    if len({ep.value for ep in eps}) > 1:
        owners = " and ".join(f"{ep.value} ({ep.dist.metadata['Name'] if ep.dist else '?'})" for ep in eps)
        raise PluginError(f"plugin name '{name}' is registered twice: {owners}; uninstall one of them", plugin=name)
    ep = eps[0]
    try:
        obj = ep.load()
    except Exception as exc:  # a broken plugin must say which one it is
        raise PluginError(f"plugin '{name}' ({ep.value}) failed to import: {type(exc).__name__}: {exc}{install_hint(name, exc)}",
                          plugin=name) from exc
    check_api(name, obj)
    if getattr(obj, "Settings", None) is not None and settings_model(obj) is None:
        raise PluginError(f"plugin '{name}': its Settings is not a pydantic model (subclass polydistill.PluginSettings)", plugin=name)
    return obj


def settings_model(obj: Any) -> type[BaseModel] | None:
    model = getattr(obj, "Settings", None)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def validate_settings(name: str, obj: Any, options: Any) -> BaseModel | None:
    """Validate a plugin's config section with its Settings model."""
    from polydistill.config import format_validation_error

    model = settings_model(obj)
    options = {} if options in (None, True) else options
    if model is None:
        if options:
            raise ConfigError(f"plugins.{name}: this plugin takes no options, got {sorted(options)}")
        return None
    if not isinstance(options, dict):
        raise ConfigError(f"plugins.{name}: options must be a mapping, got {options!r}")
    try:
        return model.model_validate(options)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, model, f"plugin '{name}'", prefix=("plugins", name))) from None


def enabled_plugins(plugins_section: dict[str, Any], installed: dict[str, InstalledPlugin | None] | None = None) -> list[tuple[str, Any]]:
    """(name, options) of every enabled plugin: defaults first, then the config's order."""
    installed = installed if installed is not None else installed_plugins()
    out = [(n, None) for n in sorted(installed) if installed[n] is not None and installed[n].default and n not in plugins_section]
    out += [(n, opts) for n, opts in plugins_section.items() if opts is not False]
    return out


def instantiate(name: str, obj: Any, settings: BaseModel | None) -> Any:
    """A class is instantiated per run (with its settings if it has any); a module is used as is."""
    if isinstance(obj, types.ModuleType):
        return obj
    if inspect.isclass(obj):
        try:
            return obj(settings) if settings is not None else obj()
        except PolydistillError:  # already names the option at fault
            raise
        except Exception as exc:
            raise PluginError(f"plugin '{name}' failed to start: {type(exc).__name__}: {exc}{install_hint(name, exc)}",
                              plugin=name) from exc
    return obj


def _trace_writer(text: str) -> None:
    """Print the first line of each pluggy trace message; its argument dumps (whole models) would bury it."""
    line = text.split("\n", 1)[0].strip()
    if line:
        sys.stderr.write(f"[polydistill trace] {line}\n")


class PluginHost:
    """A fresh pluggy manager for one run, with the hook-combining rules of hookspecs.py."""

    def __init__(self, plugins: Iterable[tuple[str, Any]], settings: dict[str, BaseModel | None] | None = None):
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.order: list[str] = []
        self.settings: dict[str, BaseModel | None] = dict(settings or {})
        self._answered: list[str] = []
        self._owners: dict[str, list[str]] = {}  # term name -> plugins that returned it, in the last merged call
        for name, plugin in plugins:
            try:
                self.pm.register(plugin, name=name)
            except (pluggy.PluginValidationError, ValueError) as exc:
                raise PluginError(f"plugin '{name}' is invalid: {exc}", plugin=name) from exc
            self.order.append(name)
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:
            plugin_name = self.pm.get_name(exc.plugin) or "?"
            known = [n for n in dir(hookspecs) if n in hookspecs.STEP_HOOKS + hookspecs.LIFECYCLE_HOOKS]
            raise PluginError(f"plugin '{plugin_name}': {exc}. Known hooks: {', '.join(sorted(known))}", plugin=plugin_name) from exc
        for hook_name in hookspecs.STEP_HOOKS + hookspecs.LIFECYCLE_HOOKS:
            for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                impl.function = self._guard(impl.plugin_name, hook_name, impl.function)
        self._augmenters = [
            self._only(name, "augment_batch")
            for name in self.order
            if any(i.plugin_name == name for i in self.pm.hook.augment_batch.get_hookimpls())
        ]
        if os.environ.get(TRACE_ENV, "").strip() not in ("", "0", "false", "no"):
            self.pm.trace.root.setwriter(_trace_writer)
            self.pm.enable_tracing()

    @classmethod
    def from_config(cls, plugins_section: dict[str, Any], extra: Iterable[tuple[str, Any]] = ()) -> PluginHost:
        """Load, validate and instantiate the enabled plugins, plus objects given directly."""
        installed = installed_plugins()
        given = dict(extra)
        wanted = enabled_plugins(plugins_section, {**installed, **{n: None for n in given}} if given else installed)
        wanted += [(n, None) for n in given if n not in dict(wanted) and plugins_section.get(n) is not False]
        loaded: list[tuple[str, Any]] = []
        settings: dict[str, BaseModel | None] = {}
        for name, options in wanted:
            if name in given:
                obj = given[name]
                check_api(name, obj)
            else:
                obj = load_plugin_object(name, installed)
            settings[name] = validate_settings(name, obj, options)
            loaded.append((name, instantiate(name, obj, settings[name])))
        return cls(loaded, settings)

    def _guard(self, plugin: str, hook: str, func: Any) -> Any:
        answered, owners = self._answered, self._owners

        @functools.wraps(func)
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                result = func(*args, **kwargs)
            except PolydistillError:  # already a message for the user
                raise
            except Exception as exc:
                raise PluginError(f"plugin '{plugin}' failed in hook '{hook}': {type(exc).__name__}: {exc}{install_hint(plugin, exc)}",
                                  plugin=plugin, hook=hook) from exc
            if result is not None and hook in _SINGLE_ANSWER:
                answered.append(plugin)
            if isinstance(result, dict) and hook in _MERGED:
                for key in result:
                    owners.setdefault(key, []).append(plugin)
            return result

        return call

    def get(self, name: str) -> Any:
        return self.pm.get_plugin(name)

    def implements(self, hook: str) -> bool:
        return bool(getattr(self.pm.hook, hook).get_hookimpls())

    # ---- combining rules -------------------------------------------------

    def run(self, hook: str, **kwargs: Any) -> Any:
        """Call ``hook`` and combine its answers by its rule in ``hookspecs.COMBINING``."""
        rule = hookspecs.COMBINING[hook]
        if rule == "chain":
            return self.augment_batch(**kwargs)
        if rule == "single":
            return self.single(hook, **kwargs)
        if rule == "merged":
            return self.merged(hook, **kwargs)
        if rule == "per_plugin":
            return self.per_plugin(hook, **kwargs)
        if rule == "own_state":
            return self.load_states(**kwargs)
        self.call(hook, **kwargs)
        return None

    def augment_batch(self, batch: Any, state: Any) -> Any:
        for caller in self._augmenters:
            (result,) = caller(batch=batch, state=state) or [None]
            if result is not None:
                batch = result
        return batch

    def single(self, hook: str, **kwargs: Any) -> Any:
        self._answered.clear()
        results = getattr(self.pm.hook, hook)(**kwargs)
        if len(results) > 1:
            raise PluginError(f"plugins {' and '.join(sorted(self._answered))} both answered '{hook}'; only one plugin may provide it", hook=hook)
        return results[0] if results else None

    def merged(self, hook: str, taken: dict[str, Any] | None = None, **kwargs: Any) -> dict[str, Any]:
        """The union of every plugin's dict; :meth:`owner` then names the plugin behind each key."""
        out: dict[str, Any] = {}
        seen = set(taken or ())
        earlier = {k: list(self._owners.get(k, [])) for k in seen}
        self._owners.clear()
        self._owners.update(earlier)
        for result in getattr(self.pm.hook, hook)(**kwargs):
            for key, value in result.items():
                if key in out or key in seen:
                    who = " and ".join(f"'{p}'" for p in self._owners.get(key, [])) or "two plugins"
                    raise PluginError(f"plugins {who} both return a term named '{key}' from '{hook}'; names must be unique", hook=hook)
                out[key] = value
        return out

    def owner(self, key: str) -> str | None:
        """The plugin that returned ``key`` in the latest :meth:`merged` call (and the ``taken`` keys before it)."""
        found = self._owners.get(key)
        return found[0] if found else None

    def call(self, hook: str, **kwargs: Any) -> list[Any]:
        return getattr(self.pm.hook, hook)(**kwargs)

    def per_plugin(self, hook: str, **kwargs: Any) -> dict[str, Any]:
        """Call each implementation separately, keyed by plugin name (state_dict)."""
        out = {}
        for impl in getattr(self.pm.hook, hook).get_hookimpls():
            (value,) = self._only(impl.plugin_name, hook)(**kwargs) or [None]
            if value is not None:
                out[impl.plugin_name] = value
        return out

    def _only(self, name: str, hook: str) -> Any:
        return self.pm.subset_hook_caller(hook, [p for n, p in self.pm.list_name_plugin() if n != name])

    def load_states(self, state: Any, saved: dict[str, Any]) -> None:
        """Hand each plugin that saved a state (``saved``: plugin name -> state) its own back."""
        for impl in self.pm.hook.load_state_dict.get_hookimpls():
            if impl.plugin_name in saved:
                self._only(impl.plugin_name, "load_state_dict")(state=state, plugin_state=saved[impl.plugin_name])

    def versions(self) -> dict[str, str | None]:
        installed = installed_plugins()
        return {n: (installed[n].version if n in installed else None) for n in self.order}
