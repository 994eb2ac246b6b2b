"""Ablation studies: a base config, axes and seeds, expanded into runs and executed resumably.

A study file names a base config and axes. Each axis is a list of levels; a level
is a set of config changes. The cells are the product of the axes, and each cell
runs once per seed. Every run writes ``runs/<cell>/seed-<n>/result.json`` when it
ends (finished or failed); a rerun of the study skips those and resumes runs that
were interrupted from their latest checkpoint.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from polydistill import __version__
from polydistill.checkpoint import dump_json, find as find_checkpoint
from polydistill.config import RUNTIME_FIELDS, StrictModel, apply_overrides, changed_fields, format_validation_error, load_config, read_config_file, set_path, without_fields
from polydistill.errors import ConfigError, PolydistillError

STUDY_FILE = "study.json"
RESULT_FILE = "result.json"
SPEC_FILE = "run-spec.json"
LOCK_FILE = ".lock"
#: Fields that say where and how visibly a run executes, not what it computes: changing them
#: (say, adding checkpoint_every after a preemption) keeps finished runs valid.


# --------------------------------------------------------------------------- the study file


class Axis(StrictModel):
    """One factor of the study: exactly one of field+values, levels, add_one_in, leave_one_out."""

    field: str | None = Field(None, description="Dotted config path this axis varies, e.g. plugins.kd.temperature.")
    values: list[Any] | None = Field(None, description="Values of `field`, one level each.")
    levels: dict[str, dict[str, Any]] | None = Field(
        None, description="Named levels, each a mapping of dotted config paths to values, e.g. {off: {}, on: {plugins.synonym: {p: 0.2}}}."
    )
    add_one_in: dict[str, Any] | None = Field(
        None, description="Plugins with their options: levels `base` (the base config) and `+NAME` (base plus that one plugin)."
    )
    leave_one_out: dict[str, Any] | None = Field(
        None, description="Plugins with their options: levels `all` (base plus every one) and `-NAME` (all but that one)."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Axis:
        kinds = [k for k in ("field", "levels", "add_one_in", "leave_one_out") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of field (with values), levels, add_one_in, leave_one_out (got {kinds or 'none'})")
        if (self.field is None) != (self.values is None):
            raise ValueError("field and values go together")
        if self.values is not None and not self.values:
            raise ValueError("values: give at least one value")
        for kind in ("levels", "add_one_in", "leave_one_out"):
            if getattr(self, kind) == {}:
                raise ValueError(f"{kind}: give at least one entry")
        return self

    def expand(self) -> list[tuple[str, dict[str, Any]]]:
        """(level name, {dotted path: value}) in order; the first level is the axis's baseline."""
        if self.field is not None:
            return [(_show(v), {self.field: v}) for v in self.values or []]
        if self.levels is not None:
            return list(self.levels.items())
        if self.add_one_in is not None:
            return [("base", {})] + [(f"+{name}", {f"plugins.{name}": _options(opts)}) for name, opts in self.add_one_in.items()]
        plugins = self.leave_one_out or {}
        everything = {f"plugins.{name}": _options(opts) for name, opts in plugins.items()}
        # `false` is the config's own way to switch a plugin off, also one the base config enables.
        return [("all", everything)] + [(f"-{name}", {**everything, f"plugins.{name}": False}) for name in plugins]


class StudyConfig(StrictModel):
    """An ablation study: what to vary, over which seeds, where to write it and how to run it."""

    name: str | None = Field(None, description="Study name used in reports; default: the study file's name.")
    base: str | dict[str, Any] = Field(description="The base run config: a YAML/JSON path (relative to the study file) or an inline mapping.")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides applied to the base config, as with `--set`.")
    axes: dict[str, Axis] = Field(default_factory=dict, description="Named axes; cells are their product, in this order.")
    seeds: list[int] = Field(default_factory=lambda: [0], description="training.seed of each repetition (an integer n means 0..n-1).")
    baseline: str | dict[str, Any] | None = Field(
        None, description="The cell other cells are compared with: a cell name or {axis: level}; default: every axis's first level."
    )
    metric: str | None = Field(None, description="Metric the report compares; default: the task's primary metric.")
    output_dir: str | None = Field(None, description="Study directory; default: runs/<study name>.")
    jobs: int = Field(1, ge=1, description="Runs at a time; more than 1 runs each in its own process.")
    executor: Literal["auto", "sequential", "processes", "ray"] = Field(
        "auto", description="auto: sequential for jobs 1, else processes; ray: tasks on a Ray cluster (pip install polydistill[ray])."
    )
    ray_address: str | None = Field(None, description="Ray cluster address for ray.init; default: start or join a local one.")
    threads_per_run: int | None = Field(None, ge=1, description="torch threads of each run in processes/ray; default: CPU cores / jobs.")
    gpus_per_run: int = Field(
        0, ge=0, description="GPUs of each run in processes/ray: each process sees its own (CUDA_VISIBLE_DEVICES); "
        "Ray reserves them. 0: processes share the machine's devices, Ray tasks see none."
    )
    keep: Literal["all", "student", "metrics"] = Field(
        "student", description="What a finished run keeps: all (with checkpoints), student (the saved model), metrics (results only)."
    )

    @field_validator("seeds", mode="before")
    @classmethod
    def _seeds(cls, v: Any) -> Any:
        return list(range(v)) if isinstance(v, int) and not isinstance(v, bool) else v

    @field_validator("seeds")
    @classmethod
    def _unique(cls, v: list[int]) -> list[int]:
        if not v:
            raise ValueError("give at least one seed")
        if len(set(v)) != len(v):
            raise ValueError(f"seeds repeat: {v}")
        return v


def _options(opts: Any) -> Any:
    return {} if opts in (None, True) else opts


def _show(value: Any) -> str:
    """A value as it would be written in YAML, on one line."""
    if isinstance(value, str):
        return value
    return yaml.safe_dump(value, default_flow_style=True, width=10_000).strip().removesuffix("...").strip()


# --------------------------------------------------------------------------- the plan


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


def plan_study(source: str | Path | dict[str, Any], output_dir: str | Path | None = None, **overrides: Any) -> Plan:
    """Expand a study into validated runs; nothing is trained or written."""
    from polydistill.evaluation import primary_metric
    from polydistill.plugins import enabled_plugins, load_plugin_object, validate_settings

    study, study_dir_base, name = load_study(source, overrides)
    if isinstance(study.base, str):
        base_path = Path(study.base).expanduser()
        base_path = base_path if base_path.is_absolute() else study_dir_base / base_path
        base, base_dir, origin = read_config_file(base_path), base_path.parent, str(base_path)
    else:
        base, base_dir, origin = json.loads(json.dumps(study.base)), study_dir_base, "base"
    apply_overrides(base, study.set, origin="set:")
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
                for plugin, options in enabled_plugins(cfg.plugins):
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
    if not runs[0].config["data"]["eval"]:
        raise ConfigError(f"{origin}: data.eval is empty; a study compares its cells on evaluation data")
    task = runs[0].config["task"]
    axes_json = [{"name": a, "levels": [lv for lv, _ in levels]} for a, levels in axes]
    return Plan(name, out, study, task, study.metric or primary_metric(task), baseline, axes_json, cells, runs)


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


# --------------------------------------------------------------------------- one run


def execute_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one run (resuming its latest checkpoint if there is one); return its result record.

    Exceptions become a ``failed`` record; KeyboardInterrupt (after the run's own
    checkpoint) propagates.
    """
    from polydistill.api import train

    run_dir = Path(spec["dir"])
    checkpoint = find_checkpoint(run_dir)
    record: dict[str, Any] = {k: spec[k] for k in ("cell", "slug", "levels", "seed", "fingerprint")}
    record["started_at"] = _now()
    record["resumed"] = checkpoint is not None
    start = time.perf_counter()
    try:
        # the study owns its run folders: one without a checkpoint is started afresh
        result = train(spec["config"], resume=run_dir if checkpoint is not None else None, output_dir=run_dir,
                       overwrite=checkpoint is None)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a crashing cell is recorded and the study goes on
        record.update(status="failed", metrics={}, history=_read_history(run_dir), plugins={})
        record["error"] = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
    else:
        record.update(status="ok", metrics=result.metrics, history=result.history, plugins=result.plugins)
    record["wall_time_s"] = round(time.perf_counter() - start, 3)
    record["finished_at"] = _now()
    record["config"] = spec["config"]
    if record["status"] == "ok":
        _prune(run_dir, spec.get("keep", "student"))
    return record


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def _prune(run_dir: Path, keep: str) -> None:
    if keep in ("student", "metrics"):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if keep == "metrics":
        shutil.rmtree(run_dir / "student", ignore_errors=True)


def _worker_main(spec_path: str) -> int:
    """Entry point of a run in its own process: ``python -m polydistill.study SPEC``."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    try:
        record = execute_run(spec)
    except KeyboardInterrupt:
        return 130
    dump_json(Path(spec["dir"]) / RESULT_FILE, record)
    return 0


def _die_with_parent() -> Callable[[], None] | None:
    """A Popen preexec_fn that, on Linux, asks for SIGTERM (checkpoint and stop) when the study process dies, even by SIGKILL.

    prctl is looked up here, in the parent: between fork and exec only async-signal-safe work is safe.
    The setting survives exec; a parent that died before it took effect makes the child exit at once.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


# --------------------------------------------------------------------------- the study


@dataclass
class StudyResult:
    """What ``ablate`` returns."""

    dir: Path
    plan: Plan
    records: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    ran: int = 0
    skipped: int = 0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if r["status"] != "ok"]


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """A run's result record, or None when it has none (or a torn one)."""
    path = run_dir / RESULT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def ablate(
    source: str | Path | dict[str, Any],
    output_dir: str | Path | None = None,
    jobs: int | None = None,
    executor: str | None = None,
    retry_failed: bool = False,
    log: Callable[[str], None] = print,
) -> StudyResult:
    """Run every run of a study that has no result yet; returns all records.

    Finished runs are skipped; a run interrupted earlier resumes from its latest
    checkpoint; a failed run is rerun from scratch only with ``retry_failed``. A
    finished run whose config no longer matches the study is an error (start a new
    directory), raised before anything in the directory changes.
    """
    plan = plan_study(source, output_dir, jobs=jobs, executor=executor)
    plan.dir.mkdir(parents=True, exist_ok=True)
    with _lock(plan.dir):
        result = StudyResult(plan.dir, plan)
        pending: list[Run] = []
        stale: list[Path] = []  # run folders of another config or a failed attempt to retry: cleared, not resumed
        # Check everything before touching anything: a refused study leaves its directory as it was.
        for run in plan.runs:
            record = read_result(run.dir)
            if record is not None and record.get("fingerprint") != run.fingerprint:
                if record.get("status") == "ok":
                    raise ConfigError(_changed(run, record))
                record = None  # a failed run of an older config: start it afresh
                stale.append(run.dir)
            if record is not None and (record.get("status") == "ok" or not retry_failed):
                result.records[(run.cell.name, run.seed)] = record
                result.skipped += 1
                continue
            spec = _read_spec(run.dir)
            if record is not None or (spec is not None and spec.get("fingerprint") != run.fingerprint):
                stale.append(run.dir)
            pending.append(run)
        dump_json(plan.dir / STUDY_FILE, plan.to_json())
        for run_dir in dict.fromkeys(stale):
            shutil.rmtree(run_dir, ignore_errors=True)
        total = len(plan.runs)
        log(f"[study] {plan.name}: {len(plan.cells)} cells x {len(plan.study.seeds)} seeds = {total} runs; "
            f"{result.skipped} already done, {len(pending)} to run -> {plan.dir}")
        mode = _executor(plan.study) if pending else "sequential"
        run_all = {"sequential": _run_sequential, "processes": _run_processes, "ray": _run_ray}[mode]
        done = result.skipped
        for run, record in run_all(plan, pending):
            dump_json(run.dir / RESULT_FILE, record)
            result.records[(run.cell.name, run.seed)] = record
            result.ran += 1
            done += 1
            log(f"[study] {done}/{total} {run.label}: {_summary(record, plan.metric)}")
    failed = len(result.failed)
    log(f"[study] finished: {len(result.records) - failed} ok, {failed} failed")
    return result


def _changed(run: Run, record: dict[str, Any]) -> str:
    diff = changed_fields(record.get("config", {}), run.config)
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:3])
    return (
        f"{run.dir}: run '{run.label}' finished with another config ({shown or 'different fingerprint'}). "
        "The study file or its base config changed since; write the changed study to a new --output-dir, "
        f"or delete {run.dir} to rerun that run"
    )


def _summary(record: dict[str, Any], metric: str) -> str:
    if record["status"] != "ok":
        err = record.get("error", {})
        return f"FAILED {err.get('type', '?')}: {str(err.get('message', '')).splitlines()[0] if err.get('message') else ''}"
    value = record.get("metrics", {}).get("average", {}).get(metric)
    shown = f"{metric} {value:.4f}" if isinstance(value, (int, float)) else "no evaluation data"
    resumed = ", resumed" if record.get("resumed") else ""
    wall = record["wall_time_s"]
    return f"{shown} ({wall:.1f} s{resumed})" if wall < 10 else f"{shown} ({wall:.0f} s{resumed})"


def _read_spec(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _spec(plan: Plan, run: Run, threads: int | None) -> dict[str, Any]:
    config = run.config
    if threads is not None:
        # The study shares the machine between its runs: a config's own num_threads (meant for a run
        # alone) would oversubscribe the cores, and spinning OpenMP threads then crawl.
        config = {**config, "training": {**config["training"], "num_threads": threads}}
    spec = {
        "cell": run.cell.name, "slug": run.cell.slug, "levels": run.cell.levels, "seed": run.seed,
        "fingerprint": run.fingerprint, "dir": str(run.dir), "config": config, "keep": plan.study.keep,
        "threads": threads,
    }
    run.dir.mkdir(parents=True, exist_ok=True)
    dump_json(run.dir / SPEC_FILE, spec)
    return spec


@contextlib.contextmanager
def _lock(study_dir: Path) -> Iterator[None]:
    """One study process per directory; the OS drops the lock if the process dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    with open(study_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise ConfigError(f"{study_dir}: another polydistill process (pid {pid}) is running this study") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _executor(study: StudyConfig) -> str:
    if study.executor != "auto":
        return study.executor
    return "sequential" if study.jobs == 1 else "processes"


def _threads(study: StudyConfig) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # cgroups, SLURM
    return study.threads_per_run or max(1, cores // study.jobs)


def _run_sequential(plan: Plan, runs: list[Run]) -> Iterator[tuple[Run, dict[str, Any]]]:
    for run in runs:
        yield run, execute_run(_spec(plan, run, None))


def _run_processes(plan: Plan, runs: list[Run]) -> Iterator[tuple[Run, dict[str, Any]]]:
    """Each run in its own Python process, ``jobs`` at a time; a process that dies is a failed run."""
    threads = _threads(plan.study)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    slots = _gpu_slots(plan.study)
    queue = list(runs)
    active: dict[subprocess.Popen, tuple[Run, Any, int]] = {}
    previous = _raise_on_sigterm()
    try:
        while queue or active:
            while queue and len(active) < len(slots):
                run = queue.pop(0)
                slot = next(i for i in range(len(slots)) if i not in {s for _, _, s in active.values()})
                _spec(plan, run, threads)
                logf = open(run.dir / "log.txt", "a", encoding="utf-8")
                cmd = [sys.executable, "-m", "polydistill.study", str(run.dir / SPEC_FILE)]
                run_env = env if slots[slot] is None else {**env, "CUDA_VISIBLE_DEVICES": slots[slot]}
                # Own session: a Ctrl-C in the terminal reaches only this process, which then stops
                # each run with exactly one SIGTERM (a second signal would abort its checkpoint).
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=run_env, start_new_session=True,
                                        preexec_fn=_die_with_parent())
                active[proc] = (run, logf, slot)
            time.sleep(0.2)
            for proc in [p for p in active if p.poll() is not None]:
                run, logf, _ = active.pop(proc)
                logf.close()
                record = read_result(run.dir)
                if proc.returncode == 130 and record is None:
                    raise KeyboardInterrupt
                if record is None:
                    record = _died(run, proc.returncode)
                yield run, record
    finally:
        for proc in active:
            if proc.poll() is None:
                proc.terminate()  # each run writes a checkpoint on SIGTERM, then exits
        for proc, (_, logf, _) in active.items():
            proc.wait()
            logf.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _gpu_slots(study: StudyConfig) -> list[str | None]:
    """One entry per concurrent run: the CUDA_VISIBLE_DEVICES it gets (None: inherit)."""
    if not study.gpus_per_run:
        return [None] * study.jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devices = [d for d in visible.split(",") if d.strip()]
    else:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    g = study.gpus_per_run
    slots = [",".join(devices[i * g:(i + 1) * g]) for i in range(min(study.jobs, len(devices) // g))]
    if not slots:
        raise ConfigError(f"gpus_per_run: {g} GPUs per run, but this machine shows {len(devices)}")
    return slots


def _raise_on_sigterm() -> Any:
    """Make SIGTERM (kill, scancel) stop the study like Ctrl-C, so its runs get one SIGTERM and checkpoint."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _died(run: Run, returncode: int) -> dict[str, Any]:
    tail = ""
    with contextlib.suppress(OSError):
        tail = "\n".join((run.dir / "log.txt").read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
    return {
        "cell": run.cell.name, "slug": run.cell.slug, "levels": run.cell.levels, "seed": run.seed,
        "fingerprint": run.fingerprint, "status": "failed", "metrics": {}, "history": _read_history(run.dir),
        "plugins": {}, "wall_time_s": 0.0, "finished_at": _now(), "config": run.config,
        "error": {"type": "ProcessDied", "message": f"the run's process exited with code {returncode} without a result; "
                  f"see {run.dir / 'log.txt'}", "traceback": tail},
    }


def _run_ray(plan: Plan, runs: list[Run]) -> Iterator[tuple[Run, dict[str, Any]]]:
    """Each run as a Ray task needing ``threads_per_run`` CPUs; records come back to this process."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor: ray needs Ray installed: pip install 'polydistill[ray]'") from None
    threads = plan.study.threads_per_run or 1
    if not ray.is_initialized():
        ray.init(address=plan.study.ray_address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=threads, num_gpus=plan.study.gpus_per_run, max_retries=0)(_ray_task)
    pending = {}
    queue = list(runs)
    limit = plan.study.jobs if plan.study.jobs > 1 else len(runs)
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                run = queue.pop(0)
                pending[remote.remote(_spec(plan, run, threads))] = run
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                run = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as exc:  # the task's process died (OOM, node lost)
                    record = _died(run, -1)
                    record["error"].update(type=type(exc).__name__, message=str(exc).splitlines()[0])
                yield run, record
    finally:
        for ref in pending:
            ray.cancel(ref)


def _ray_task(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return execute_run(spec)


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1]))
