"""Planning a study: the file names of its directory, its cells, its runs with their validated configs, and their fingerprints."""

from __future__ import annotations

import datetime as _dt
import hashlib
import itertools
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from polydistill.version import __version__
from polydistill.config import RUNTIME_FIELDS, apply_overrides, format_validation_error, load_config, read_config_file, set_path, without_fields
from polydistill.errors import ConfigError, PolydistillError
from polydistill.multitask import MultiTaskConfig
from polydistill.study.schema import StudyConfig, _show

STUDY_FILE = "study.json"
RESULT_FILE = "result.json"
SPEC_FILE = "run-spec.json"
LOCK_FILE = ".lock"
#: Fields that say where and how visibly a run executes, not what it computes: changing them
#: (say, adding checkpoint_every after a preemption) keeps finished runs valid.


@dataclass
class Cell:
    """One combination of axis levels."""

    name: str
    slug: str
    levels: dict[str, str]
    overrides: dict[str, Any]


@dataclass
class Run:
    """One cell at one seed: its validated config and directory."""

    cell: Cell
    seed: int
    dir: Path
    config: dict[str, Any]
    fingerprint: str

    @property
    def label(self) -> str:
        return f"{self.cell.name} · seed {self.seed}"


@dataclass
class Plan:
    """A study expanded into cells and runs, every config validated."""

    name: str
    dir: Path
    study: StudyConfig
    task: str
    metric: str
    baseline: str
    axes: list[dict[str, Any]]
    cells: list[Cell]
    runs: list[Run]

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "task": self.task,
            "metric": self.metric,
            "baseline": self.baseline,
            "seeds": self.study.seeds,
            "axes": self.axes,
            "cells": [{"name": c.name, "slug": c.slug, "levels": c.levels, "overrides": c.overrides} for c in self.cells],
            "study": self.study.model_dump(mode="json"),
            "polydistill": __version__,
            "created_at": _now(),
        }


def load_study(source: str | Path | dict[str, Any], overrides: dict[str, Any] | None = None) -> tuple[StudyConfig, Path, str]:
    """Read and validate a study file (or mapping); returns it, the folder paths resolve from, and its name."""
    if isinstance(source, dict):
        data, base_dir, origin, stem = dict(source), Path.cwd(), "study", "study"
    else:
        path = Path(source)
        data, base_dir, origin, stem = read_config_file(path), path.resolve().parent, str(path), path.stem
    data.update({k: v for k, v in (overrides or {}).items() if v is not None})
    try:
        study = StudyConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, StudyConfig, origin)) from None
    return study, base_dir, study.name or stem


def read_base(base: str | dict[str, Any], overrides: list[str], here: Path) -> tuple[dict[str, Any], Path, str]:
    """A study's or search's base config (a path relative to ``here``, or a mapping) with its ``set`` overrides applied;
    returns it, the folder its paths resolve from and its name in messages."""
    if isinstance(base, str):
        path = Path(base).expanduser()
        path = path if path.is_absolute() else here / path
        data, base_dir, origin = read_config_file(path), path.parent, str(path)
    else:
        data, base_dir, origin = json.loads(json.dumps(base)), here, "base"
    apply_overrides(data, overrides, origin="set:")
    return data, base_dir, origin


def plan_study(source: str | Path | dict[str, Any], output_dir: str | Path | None = None, **overrides: Any) -> Plan:
    """Expand a study into validated runs; nothing is trained or written."""
    from polydistill.evaluation import primary_metric
    from polydistill.plugins import enabled_plugins, load_plugin_object, validate_settings

    study, study_dir_base, name = load_study(source, overrides)
    base, base_dir, origin = read_base(study.base, study.set, study_dir_base)
    out = Path(output_dir or study.output_dir or Path("runs") / _slug(name)).resolve()

    axes = [(axis_name, axis.expand()) for axis_name, axis in study.axes.items()]
    for axis_name, levels in axes:
        names = [lv for lv, _ in levels]
        if len(set(names)) != len(names):
            raise ConfigError(f"axes.{axis_name}: level names repeat: {names}")
    cells: list[Cell] = []
    used: set[str] = set()
    for combo in itertools.product(*[levels for _, levels in axes]):
        levels = {axis_name: level for (axis_name, _), (level, _) in zip(axes, combo)}
        changes: dict[str, Any] = {}
        for _, change in combo:
            changes.update(change)
        if not axes:
            cell_name = "base"
        elif len(axes) == 1:
            cell_name = next(iter(levels.values()))
        else:
            cell_name = ", ".join(f"{a}={lv}" for a, lv in levels.items())
        slug = "_".join(_slug(lv) if len(axes) == 1 else f"{_slug(a)}-{_slug(lv)}" for a, lv in levels.items()) or "base"
        unique, n = slug, 2
        while unique in used:
            unique, n = f"{slug}-{n}", n + 1
        used.add(unique)
        cells.append(Cell(cell_name, unique, levels, changes))

    baseline = _baseline(study, cells, axes)
    runs: list[Run] = []
    validated: set[str] = set()
    for seed in study.seeds:  # seed-major: every cell gets a first seed before any gets a second
        for cell in cells:
            data = json.loads(json.dumps(base))
            for key, value in cell.overrides.items():
                set_path(data, key, value, origin=f"cell '{cell.name}':")
            run_dir = out / "runs" / cell.slug / f"seed-{seed}"
            set_path(data, "training.seed", seed)
            set_path(data, "output_dir", str(run_dir))
            cfg = load_config(data, base_dir=base_dir, origin=f"{origin} (cell '{cell.name}')")
            if cell.slug not in validated:  # plugin options are the same for every seed
                for plugin, options in [p for c in single_configs(cfg) for p in enabled_plugins(c.plugins)]:
                    try:
                        validate_settings(plugin, load_plugin_object(plugin), options)
                    except PolydistillError as exc:
                        raise ConfigError(f"cell '{cell.name}': {exc}") from None
                validated.add(cell.slug)
            resolved = cfg.resolved_dict()
            runs.append(Run(cell, seed, run_dir, resolved, fingerprint(resolved)))
    first = {}
    for run in runs[: len(cells)]:  # one seed: cells whose changes cancel out would repeat each other's numbers
        if run.fingerprint in first:
            raise ConfigError(
                f"cells '{first[run.fingerprint]}' and '{run.cell.name}' have the same config: their axes set the same "
                "fields to the same values (e.g. a field axis under a plugin another axis switches off); change an axis"
            )
        first[run.fingerprint] = run.cell.name
    first = load_config(runs[0].config)
    if not any(c.data.eval for c in single_configs(first)):
        raise ConfigError(f"{origin}: data.eval is empty; a study compares its cells on evaluation data")
    metric = study.metric or (first.primary_metric if isinstance(first, MultiTaskConfig) else primary_metric(first.task))
    axes_json = [{"name": a, "levels": [lv for lv, _ in levels]} for a, levels in axes]
    return Plan(name, out, study, first.task, metric, baseline, axes_json, cells, runs)


def single_configs(config: Any) -> list[Any]:
    """The single-task configs of a run config: each task's of a multi-task config, else the config itself."""
    return list(config.tasks.values()) if isinstance(config, MultiTaskConfig) else [config]


def _baseline(study: StudyConfig, cells: list[Cell], axes: list[tuple[str, list[tuple[str, dict[str, Any]]]]]) -> str:
    names = [c.name for c in cells]
    if study.baseline is None:
        return names[0]
    if isinstance(study.baseline, str):
        if study.baseline not in names:
            raise ConfigError(f"baseline: {study.baseline!r} is not a cell; cells: {', '.join(names)}")
        return study.baseline
    axis_names = [a for a, _ in axes]
    unknown = [a for a in study.baseline if a not in axis_names]
    if unknown:
        raise ConfigError(f"baseline: {unknown[0]!r} is not an axis; axes: {', '.join(axis_names)}")
    wanted = {a: _show(study.baseline[a]) if a in study.baseline else levels[0][0] for a, levels in axes}
    for cell in cells:
        if cell.levels == wanted:
            return cell.name
    raise ConfigError(f"baseline: no cell has levels {wanted}")


def fingerprint(config: dict[str, Any]) -> str:
    """Hash of what a run computes: its resolved config without the runtime fields."""
    data = without_fields(config, RUNTIME_FIELDS)
    return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()[:16]


def _slug(text: str) -> str:
    text = re.sub(r"^\+", "with-", text)
    text = re.sub(r"^-", "without-", text)
    return re.sub(r"[^A-Za-z0-9.+=-]+", "-", text).strip("-.") or "x"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
