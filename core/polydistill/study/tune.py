"""Searches: ``polydistill tune SEARCH.yaml`` samples configs from a space, prunes bad trials, writes the best config.

A search file names a base config (as a study does), a ``space`` of config fields
(ranges, choices, or named levels such as plugin sets), the number of trials and
the objectives. Optuna samples the trials (TPE by default) and keeps them in a
SQLite file in the search directory, so a killed search, run again, goes on: a
trial that was running is tried again with the same settings, resuming from its
run's latest checkpoint. With one objective, a trial is reported at each
evaluation and pruned (median or successive halving) when it falls behind. With
``engine: ray`` the trials run as Ray Tune trials on a cluster, Optuna sampling
them and an ASHA or median-stopping scheduler pruning them.

The search directory holds ``runs/trial-NNNN/seed-S/`` as a study holds its runs,
so ``polydistill report`` reads it; ``search.md`` lists every trial and
``best.yaml`` (with several objectives, ``pareto/*.yaml``) is a runnable config.
"""

from __future__ import annotations

import functools
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from polydistill.checkpoint import dump_json, find as find_checkpoint
from polydistill.config import StrictModel, format_validation_error, load_config, read_config_file, set_path
from polydistill.errors import ConfigError, PolydistillError
from polydistill.hookspecs import hookimpl
from polydistill.multitask import MultiTaskConfig
from polydistill.study.executors import _lock
from polydistill.study.plan import RESULT_FILE, STUDY_FILE, _now, _slug, read_base, single_configs
from polydistill.study.run import _prune, _read_history
from polydistill.study.schema import _show

STORAGE_FILE = "optuna.db"
#: Objectives that are not evaluation metrics: what a trial costs.
COSTS = {"student_parameters", "wall_time_s"}
#: Evaluation metrics a search minimizes unless told otherwise.
LOWER_IS_BETTER = {"perplexity", "loss", "ter", "wer", "cer"}


class Param(StrictModel):
    """One dimension of the space: a range (low, high), choices, or named levels."""

    low: float | None = Field(None, description="Lower end of a range (with high).")
    high: float | None = Field(None, description="Upper end of a range (with low).")
    log: bool = Field(False, description="Sample the range on a log scale (learning rates, weights).")
    step: float | None = Field(None, gt=0, description="A range's step (integers: default 1).")
    type: Literal["float", "int"] | None = Field(None, description="Default: int when low and high are integers and log is off, else float.")
    choices: list[Any] | None = Field(None, description="Values to choose from (any YAML values).")
    levels: dict[str, dict[str, Any]] | None = Field(
        None, description="Named levels, each a mapping of dotted config paths to values, e.g. plugin sets: "
        "{none: {}, synonym: {plugins.synonym: {p: 0.2}}}. The dimension's name is then only a label.")

    @model_validator(mode="after")
    def _one_kind(self) -> Param:
        ranged = self.low is not None or self.high is not None
        kinds = [k for k, on in (("low/high", ranged), ("choices", self.choices is not None), ("levels", self.levels is not None)) if on]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of low and high, choices, levels (got {kinds or 'none'})")
        if ranged:
            if self.low is None or self.high is None:
                raise ValueError("low and high go together")
            if self.low > self.high:
                raise ValueError(f"low ({self.low}) is above high ({self.high})")
            if self.log and self.low <= 0:
                raise ValueError("log: a log-scale range needs low above 0")
        if self.choices is not None and not self.choices:
            raise ValueError("choices: give at least one")
        if self.levels is not None and not self.levels:
            raise ValueError("levels: give at least one")
        return self

    @property
    def kind(self) -> str:
        if self.levels is not None:
            return "levels"
        if self.choices is not None:
            return "choices"
        integer = self.type == "int" or (self.type is None and not self.log and float(self.low).is_integer()
                                         and float(self.high).is_integer() and (self.step is None or float(self.step).is_integer()))
        return "int" if integer else "float"


class Objective(StrictModel):
    """What a trial is scored by."""

    metric: str = Field(description="An evaluation metric (e.g. accuracy, f1, chrf), or a cost: student_parameters, wall_time_s.")
    languages: list[str] | None = Field(None, description="Score the mean of the metric over these languages (e.g. the target "
                                        "languages); default: the metric's average over every language.")
    direction: Literal["maximize", "minimize"] | None = Field(None, description="Default: minimize for costs, perplexity and metrics named *loss*, else maximize.")

    def resolved_direction(self) -> str:
        if self.direction:
            return self.direction
        lower = self.metric in COSTS or self.metric in LOWER_IS_BETTER or self.metric.endswith("loss")
        return "minimize" if lower else "maximize"

    @property
    def label(self) -> str:
        return f"{self.metric} ({', '.join(self.languages)})" if self.languages else self.metric


class SearchConfig(StrictModel):
    """A search: a base config, a space over its fields, trials, objectives, pruning and the engine that runs them."""

    name: str | None = Field(None, description="Search name used in reports; default: the file's name.")
    base: str | dict[str, Any] = Field(description="The base run config: a YAML/JSON path (relative to the search file) or a mapping.")
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides applied to the base config, as with `--set`.")
    space: dict[str, Param] = Field(description="The dimensions: dotted config path (or, with levels, a label) -> range, choices or levels.")
    trials: int = Field(20, ge=1, description="Trials in all (a resumed search runs the ones it lacks).")
    enqueue: list[dict[str, Any]] = Field(default_factory=list, description="Trials to run first, each a mapping of dimensions to values (e.g. the settings you use today, as a reference the sampler starts from); dimensions left out are sampled.")
    objectives: list[Objective] = Field(default_factory=list, description="What trials are scored by; default: the task's primary metric, maximized. Two or more make a multi-objective search (its Pareto front is reported; no pruning).")
    pruner: Literal["auto", "median", "successive_halving", "none"] = Field(
        "auto", description="Stop trials that fall behind at an evaluation: median (below the median of earlier trials at the same step), "
        "successive_halving (asynchronous successive halving), none. auto: median with one objective, none with several.")
    startup_trials: int = Field(3, ge=0, description="Trials that are never pruned, and that the TPE sampler samples at random, before the search uses what it learned.")
    warmup_evaluations: int = Field(1, ge=0, description="Evaluations of a trial before it can be pruned.")
    sampler: Literal["tpe", "random", "grid"] = Field("tpe", description="How trials are chosen; grid needs a space of choices and levels only.")
    seed: int = Field(0, description="The sampler's seed (each trial trains with the base config's training.seed).")
    engine: Literal["optuna", "ray"] = Field("optuna", description="optuna: trials one after another in this process, kept in optuna.db (resumable). ray: Ray Tune trials on a cluster, sampled by Optuna.")
    ray_address: str | None = Field(None, description="Ray cluster address (engine ray); default: start or join a local one.")
    concurrent_trials: int = Field(1, ge=1, description="Trials at a time (engine ray).")
    cpus_per_trial: float = Field(1, gt=0, description="CPUs each Ray Tune trial reserves (engine ray).")
    gpus_per_trial: float = Field(0, ge=0, description="GPUs each Ray Tune trial reserves (engine ray).")
    output_dir: str | None = Field(None, description="Search directory; default: runs/<search name>.")
    keep: Literal["all", "student", "metrics"] = Field("student", description="What a finished trial keeps: all (with checkpoints), student, metrics (results only).")

    @model_validator(mode="after")
    def _consistent(self) -> SearchConfig:
        if not self.space:
            raise ValueError("space: give at least one dimension")
        if len(self.objectives) > 1 and self.pruner in ("median", "successive_halving"):
            raise ValueError(f"pruner: {self.pruner} prunes on one objective; a search with {len(self.objectives)} objectives "
                             "cannot prune (set pruner: none, or keep one objective)")
        if self.sampler == "grid" and any(p.kind in ("int", "float") and p.step is None for p in self.space.values()):
            raise ValueError("sampler: grid needs choices or levels (or ranges with a step) in every dimension")
        for i, given in enumerate(self.enqueue):
            for dim, value in given.items():
                p = self.space.get(dim)
                if p is None:
                    raise ValueError(f"enqueue[{i}]: {dim!r} is not a dimension of the space ({', '.join(self.space)})")
                bad = (p.kind == "levels" and value not in (p.levels or {})) or (p.kind == "choices" and value not in (p.choices or [])) \
                    or (p.kind in ("int", "float") and not (isinstance(value, (int, float)) and p.low <= value <= p.high))
                if bad:
                    raise ValueError(f"enqueue[{i}].{dim}: {value!r} is not in the dimension's levels, choices or range")
        if self.engine == "ray" and len(self.objectives) > 1:
            raise ValueError("engine: ray runs single-objective searches here; use engine: optuna for several objectives")
        return self


@dataclass
class SearchPlan:
    name: str
    dir: Path
    search: SearchConfig
    base: dict[str, Any]
    base_dir: Path
    origin: str
    task: str
    objectives: list[Objective]

    @property
    def pruner(self) -> str:
        if self.search.pruner == "auto":
            return "median" if len(self.objectives) == 1 else "none"
        return self.search.pruner


@dataclass
class SearchResult:
    """What :func:`tune` returns."""

    dir: Path
    trials: list[dict[str, Any]] = field(default_factory=list)
    best: list[dict[str, Any]] = field(default_factory=list)  # the best trial, or the Pareto front
    best_config: Path | None = None


class TrialPruned(PolydistillError):
    """Raised in a trial's evaluation when the pruner stops it (a PolydistillError, so hooks pass it on unwrapped)."""


def load_search(source: str | Path | dict[str, Any], output_dir: str | Path | None = None) -> SearchPlan:
    """Read and validate a search file, and its base config with a first trial's settings."""
    from polydistill.evaluation import primary_metric

    if isinstance(source, dict):
        data, here, origin, stem = dict(source), Path.cwd(), "search", "search"
    else:
        path = Path(source)
        data, here, origin, stem = read_config_file(path), path.resolve().parent, str(path), path.stem
    try:
        search = SearchConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, SearchConfig, origin)) from None
    base, base_dir, base_origin = read_base(search.base, search.set, here)
    name = search.name or stem
    out = Path(output_dir or search.output_dir or Path("runs") / _slug(name)).resolve()
    config = load_config(base, base_dir=base_dir, origin=base_origin)
    if not any(c.data.eval for c in single_configs(config)):
        raise ConfigError(f"{base_origin}: data.eval is empty; a search scores its trials on evaluation data")
    default = config.primary_metric if isinstance(config, MultiTaskConfig) else primary_metric(config.task)
    objectives = search.objectives or [Objective(metric=default)]
    plan = SearchPlan(name, out, search, base, base_dir, base_origin, config.task, objectives)
    for dim, p in search.space.items():  # every level, choice and end of a range gives a valid config
        if p.kind == "levels":
            tries = [(f"space.{dim}.levels.{name}", changes) for name, changes in p.levels.items()]
        elif p.kind == "choices":
            tries = [(f"space.{dim}.choices[{i}]", {dim: v}) for i, v in enumerate(p.choices)]
        else:
            tries = [(f"space.{dim}", {dim: int(v) if p.kind == "int" else v}) for v in (p.low, p.high)]
        for where, changes in tries:
            _trial_config(plan, changes, out / "check", where)
    return plan


def _trial_config(plan: SearchPlan, overrides: dict[str, Any], run_dir: Path, where: str) -> dict[str, Any]:
    """The resolved config of a trial: the base with ``overrides`` (dotted paths)."""
    from polydistill.plugins import enabled_plugins, load_plugin_object, validate_settings

    data = json.loads(json.dumps(plan.base))
    for key, value in overrides.items():
        set_path(data, key, value, origin=f"{where}:")
    set_path(data, "output_dir", str(run_dir))
    cfg = load_config(data, base_dir=plan.base_dir, origin=f"{plan.origin} ({where})")
    for plugin, options in [p for c in single_configs(cfg) for p in enabled_plugins(c.plugins)]:
        try:
            validate_settings(plugin, load_plugin_object(plugin), options)
        except PolydistillError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    return cfg.resolved_dict()


def overrides_of(search: SearchConfig, params: dict[str, Any]) -> dict[str, Any]:
    """A trial's sampled values as config changes: a levels dimension becomes its level's changes."""
    out: dict[str, Any] = {}
    for dim, param in search.space.items():
        if dim not in params:
            continue
        if param.kind == "levels":
            out.update(param.levels[params[dim]])
        elif param.kind == "choices":
            out[dim] = param.choices[params[dim]] if isinstance(params[dim], int) and _indexed(param) else params[dim]
        else:
            out[dim] = params[dim]
    return out


def _indexed(param: Param) -> bool:
    """Optuna's categorical values must be plain scalars: other choices (mappings, lists) are sampled by index."""
    return not all(v is None or isinstance(v, (bool, int, float, str)) for v in param.choices or [])


def _sampled_values(search: SearchConfig, given: dict[str, Any]) -> dict[str, Any]:
    """Values as the sampler holds them: a choice that is a mapping or list by its index."""
    return {dim: search.space[dim].choices.index(v) if search.space[dim].kind == "choices" and _indexed(search.space[dim]) else v
            for dim, v in given.items()}


def suggest(trial: Any, search: SearchConfig) -> dict[str, Any]:
    """Sample one value per dimension through an Optuna trial."""
    params = {}
    for dim, p in search.space.items():
        kind = p.kind
        if kind == "levels":
            params[dim] = trial.suggest_categorical(dim, list(p.levels))
        elif kind == "choices":
            params[dim] = trial.suggest_categorical(dim, list(range(len(p.choices))) if _indexed(p) else p.choices)
        elif kind == "int":
            params[dim] = trial.suggest_int(dim, int(p.low), int(p.high), step=int(p.step or 1), log=p.log)
        else:
            params[dim] = trial.suggest_float(dim, p.low, p.high, step=p.step, log=p.log)
    return params


def score(objective: Objective, metrics: dict[str, Any], record: dict[str, Any]) -> float:
    """A trial's value for ``objective`` from its final metrics (and its record, for costs)."""
    if objective.metric in COSTS:
        return float(record[objective.metric])
    return _metric(objective, metrics)


def _metric(objective: Objective, metrics: dict[str, Any]) -> float:
    if objective.languages:
        per = metrics.get("per_language") or {}
        missing = [lang for lang in objective.languages if objective.metric not in (per.get(lang) or {})]
        if missing:
            raise ConfigError(f"objectives: the evaluation has no {objective.metric} for {', '.join(missing)} "
                              f"(it has languages {', '.join(sorted(per)) or 'none'})")
        return float(sum(per[lang][objective.metric] for lang in objective.languages) / len(objective.languages))
    average = metrics.get("average") or {}
    if objective.metric not in average:
        raise ConfigError(f"objectives: the evaluation has no metric {objective.metric!r} (it has {', '.join(sorted(average)) or 'none'})")
    return float(average[objective.metric])


class _Reporter:
    """A plugin object for one trial: reports the objective at each evaluation and stops the trial when told."""

    def __init__(self, objective: Objective | None, report: Callable[[float, int], bool]):
        self.objective = objective
        self.report = report  # (value, step) -> True when the trial is to stop
        self.pruned_at: int | None = None

    @hookimpl
    def on_evaluate(self, state: Any, metrics: dict[str, Any]) -> dict[str, float]:
        if self.objective is None or not metrics.get("average"):
            return {}
        value = _metric(self.objective, metrics)
        if self.report(value, state.step) and state.step < state.total_steps:
            self.pruned_at = state.step
            raise TrialPruned(f"pruned at step {state.step}: {self.objective.label} {value:.4f} fell behind the earlier trials")
        return {}


def _levels(params: dict[str, Any]) -> dict[str, str]:
    """A trial's values as the tables show them (floats to 4 significant digits)."""
    return {k: f"{v:.4g}" if isinstance(v, float) else _show(v) for k, v in params.items()}


def _student_parameters(student_dir: Path) -> int:
    from safetensors import safe_open

    total = 0
    for path in sorted(student_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                total += math.prod(f.get_slice(key).get_shape())
    return total


def run_trial(plan: SearchPlan, number: int, params: dict[str, Any], report: Callable[[float, int], bool] | None,
              threads: int | None = None) -> dict[str, Any]:
    """Train one trial into ``runs/trial-NNNN/seed-S`` (resuming its checkpoint); its record, also written as result.json.

    ``report(value, step)`` is called at each evaluation and returns True to prune.
    """
    from polydistill.api import train

    overrides = overrides_of(plan.search, params)
    seed = int(plan.base.get("training", {}).get("seed", 0))
    run_dir = plan.dir / "runs" / f"trial-{number:04d}" / f"seed-{seed}"
    config = _trial_config(plan, overrides, run_dir, f"trial {number}")
    if threads:
        config["training"]["num_threads"] = threads
    objective = plan.objectives[0] if report is not None and plan.pruner != "none" else None
    reporter = _Reporter(objective, report or (lambda value, step: False))
    checkpoint = find_checkpoint(run_dir)
    record: dict[str, Any] = {
        "cell": f"trial {number}", "slug": f"trial-{number:04d}", "levels": _levels(params),
        "seed": seed, "trial": number, "params": params, "overrides": overrides, "started_at": _now(),
        "resumed": checkpoint is not None,
    }
    start = time.perf_counter()
    try:
        result = train(config, resume=run_dir if checkpoint is not None else None, output_dir=run_dir,
                       overwrite=checkpoint is None, plugins=[("search", reporter)])
    except TrialPruned as exc:
        record.update(status="pruned", metrics={}, history=_read_history(run_dir), error={"type": "pruned", "message": str(exc)},
                      pruned_at=reporter.pruned_at)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        record.update(status="failed", metrics={}, history=_read_history(run_dir),
                      error={"type": type(exc).__name__, "message": str(exc)})
    else:
        record.update(status="ok", metrics=result.metrics, history=result.history)
        record["student_parameters"] = _student_parameters(result.student_dir)
    record["wall_time_s"] = round(time.perf_counter() - start, 3)
    record["finished_at"] = _now()
    record["config"] = config
    if record["status"] == "ok":
        record["values"] = [score(o, record["metrics"], record) for o in plan.objectives]
        _prune(run_dir, plan.search.keep)
    else:
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a pruned or failed trial is not continued
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_json(run_dir / RESULT_FILE, record)
    return record


# --------------------------------------------------------------------------- engines


def tune(source: str | Path | dict[str, Any], output_dir: str | Path | None = None, trials: int | None = None,
         log: Callable[[str], None] = print) -> SearchResult:
    """Run a search until it has ``trials`` finished trials (ok, pruned or failed); then write its report and best config."""
    plan = load_search(source, output_dir)
    if trials is not None:
        plan.search = plan.search.model_copy(update={"trials": trials})
    plan.dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(plan.dir / "check", ignore_errors=True)
    with _lock(plan.dir):
        dump_json(plan.dir / "search.json", {"name": plan.name, "search": plan.search.model_dump(mode="json"),
                                             "objectives": [o.label for o in plan.objectives], "created_at": _now()})
        if plan.search.engine == "ray":
            _tune_ray(plan, log)
        else:
            _tune_optuna(plan, log)
        return finish(plan, log)


def _optuna() -> Any:
    try:
        import optuna
    except ImportError:
        raise ConfigError("engine: optuna is not installed (pip install 'polydistill[tune]')") from None
    return optuna


def _sampler(plan: SearchPlan) -> Any:
    optuna = _optuna()
    s = plan.search
    if s.sampler == "random":
        return optuna.samplers.RandomSampler(seed=s.seed)
    if s.sampler == "grid":
        grid = {}
        for dim, p in s.space.items():
            if p.kind == "levels":
                grid[dim] = list(p.levels)
            elif p.kind == "choices":
                grid[dim] = list(range(len(p.choices))) if _indexed(p) else list(p.choices)
            else:
                n = int(round((p.high - p.low) / p.step)) + 1
                grid[dim] = [p.low + i * p.step for i in range(n)] if p.kind == "float" else [int(p.low + i * p.step) for i in range(n)]
        return optuna.samplers.GridSampler(grid, seed=s.seed)
    return optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials, multivariate=True)


def _pruner(plan: SearchPlan) -> Any:
    optuna = _optuna()
    if plan.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=plan.search.startup_trials, n_warmup_steps=0)
    if plan.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    return optuna.pruners.NopPruner()


def open_study(plan: SearchPlan) -> Any:
    optuna = _optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = f"sqlite:///{plan.dir / STORAGE_FILE}"
    directions = [o.resolved_direction() for o in plan.objectives]
    study = optuna.create_study(study_name=plan.name, storage=storage, load_if_exists=True, directions=directions,
                                sampler=_sampler(plan), pruner=_pruner(plan))
    if [d.name.lower() for d in study.directions] != directions:
        raise ConfigError(f"{plan.dir / STORAGE_FILE}: this search was started with other objectives; search into another output_dir")
    return study


def _tune_optuna(plan: SearchPlan, log: Callable[[str], None]) -> None:
    optuna = _optuna()
    study = open_study(plan)
    # One process runs a search directory at a time (the lock): a trial still marked running was killed.
    states = optuna.trial.TrialState
    if not study.get_trials(deepcopy=False):
        for given in plan.search.enqueue:
            study.enqueue_trial(_sampled_values(plan.search, given), skip_if_exists=False)
    for t in study.get_trials(deepcopy=False, states=(states.RUNNING,)):
        number = int(t.user_attrs.get("number", t.number))
        study.tell(t.number, state=states.FAIL)
        study.enqueue_trial(t.params, user_attrs={"resumes": number})
        log(f"[search] trial {number} was interrupted: it runs again with the same settings, from its checkpoint")
    waiting = len(study.get_trials(deepcopy=False, states=(states.WAITING,)))
    done = [t for t in study.get_trials(deepcopy=False)
            if t.state in (states.COMPLETE, states.PRUNED) or (t.state == states.FAIL and t.user_attrs.get("failed"))]
    left = max(plan.search.trials - len(done), waiting)
    log(f"[search] {plan.name}: {plan.search.trials} trials ({plan.search.sampler}, pruner {plan.pruner}; "
        f"{', '.join(f'{o.resolved_direction()} {o.label}' for o in plan.objectives)}); {len(done)} done, "
        f"{max(left, 0)} to run -> {plan.dir}")
    single = len(plan.objectives) == 1
    warmup = plan.search.warmup_evaluations

    def objective(trial: Any) -> Any:
        used = [int(t.user_attrs["number"]) for t in study.get_trials(deepcopy=False) if "number" in t.user_attrs]
        # a rerun of an interrupted trial keeps its number (and run folder); new trials count on from the last
        number = int(trial.user_attrs.get("resumes", max(used, default=-1) + 1))
        trial.set_user_attr("number", number)
        params = suggest(trial, plan.search)
        evaluations = [0]

        def report(value: float, step: int) -> bool:
            evaluations[0] += 1
            trial.report(value, step)
            return evaluations[0] > warmup and trial.should_prune()

        record = run_trial(plan, number, params, report if single else None)
        log(f"[search] trial {number}: {_line(record, plan)}")
        if record["status"] == "pruned":
            raise optuna.TrialPruned(record["error"]["message"])
        if record["status"] != "ok":
            trial.set_user_attr("failed", True)
            return float("nan") if single else [float("nan")] * len(plan.objectives)  # optuna records NaN as a failed trial
        return record["values"][0] if single else record["values"]

    if left > 0:
        study.optimize(objective, n_trials=left)


def _line(record: dict[str, Any], plan: SearchPlan) -> str:
    shown = ", ".join(f"{k}={v}" for k, v in record["levels"].items())
    if record["status"] == "ok":
        values = ", ".join(f"{o.label} {v:.4g}" for o, v in zip(plan.objectives, record["values"]))
        return f"{values} ({shown}; {record['wall_time_s']:.0f} s)"
    return f"{record['status'].upper()} {record['error']['message'].splitlines()[0]} ({shown})"


def _tune_ray(plan: SearchPlan, log: Callable[[str], None]) -> None:
    try:
        import ray
        from ray import tune as rt
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        raise ConfigError("engine: ray needs Ray Tune and Optuna (pip install 'polydistill[ray,tune]')") from None
    s = plan.search
    objective = plan.objectives[0]
    mode = "max" if objective.resolved_direction() == "maximize" else "min"
    if not ray.is_initialized():
        ray.init(address=s.ray_address, include_dashboard=False, log_to_driver=False)

    if plan.pruner == "none":
        scheduler = rt.schedulers.FIFOScheduler()
    elif plan.pruner == "median":
        scheduler = rt.schedulers.MedianStoppingRule(time_attr="step", grace_period=1, min_samples_required=s.startup_trials)
    else:
        scheduler = rt.schedulers.ASHAScheduler(time_attr="step", grace_period=1)
    storage = plan.dir / "ray"
    resources = rt.with_resources(functools.partial(_ray_trial, plan), {"cpu": s.cpus_per_trial, "gpu": s.gpus_per_trial})
    if rt.Tuner.can_restore(str(storage / plan.name)):
        log(f"[search] resuming the Ray Tune search in {storage / plan.name}")
        tuner = rt.Tuner.restore(str(storage / plan.name), trainable=resources, resume_errored=True)
    else:
        search = OptunaSearch(space=functools.partial(_ray_space, s), metric="objective", mode=mode, sampler=_sampler(plan))
        tuner = rt.Tuner(resources, tune_config=rt.TuneConfig(
            search_alg=search, scheduler=scheduler, num_samples=s.trials, metric="objective", mode=mode,
            max_concurrent_trials=s.concurrent_trials),
            run_config=rt.RunConfig(name=plan.name, storage_path=str(storage), verbose=0))
    grid = tuner.fit()
    for result in grid:  # a trial the scheduler stopped was ended mid-training, before it wrote its record
        trial_id = (result.metrics or {}).get("trial_id")
        folder = next((m.parent for m in (plan.dir / "runs").glob("trial-*/ray-trial-id")
                       if m.read_text(encoding="utf-8").strip() == trial_id), None)
        if folder is None:
            continue
        for run_dir in folder.glob("seed-*"):
            if not (run_dir / RESULT_FILE).exists():
                number = int(folder.name.removeprefix("trial-"))
                params = dict(result.config or {})
                step = (result.metrics or {}).get("step")
                error = {"type": "pruned" if result.error is None else type(result.error).__name__,
                         "message": f"stopped by the Ray Tune scheduler at step {step}" if result.error is None else str(result.error)}
                dump_json(run_dir / RESULT_FILE, {
                    "cell": f"trial {number}", "slug": folder.name, "levels": _levels(params), "seed": int(run_dir.name[5:]),
                    "trial": number, "params": params, "overrides": overrides_of(s, params), "status": error["type"] if
                    error["type"] == "pruned" else "failed", "pruned_at": step, "metrics": {}, "history": _read_history(run_dir),
                    "error": error, "config": _trial_config(plan, overrides_of(s, params), run_dir, f"trial {number}"),
                    "finished_at": _now()})
                shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)


def _claim_number(runs: Path, trial_id: str) -> int:
    """The trial number of a Ray trial: the one it had before (a restored trial resumes its folder), else the next free one."""
    runs.mkdir(parents=True, exist_ok=True)
    for marker in runs.glob("trial-*/ray-trial-id"):
        if marker.read_text(encoding="utf-8").strip() == trial_id:
            return int(marker.parent.name.removeprefix("trial-"))
    number = 0
    while True:
        try:
            (runs / f"trial-{number:04d}").mkdir()  # atomic: concurrent trials never share a number
        except FileExistsError:
            number += 1
            continue
        (runs / f"trial-{number:04d}" / "ray-trial-id").write_text(trial_id, encoding="utf-8")
        return number


def _ray_space(search: SearchConfig, trial: Any) -> None:
    suggest(trial, search)


def _ray_trial(plan: SearchPlan, params: dict[str, Any]) -> None:
    """One Ray Tune trial: reports the objective at each evaluation; the scheduler stops a trial that falls behind."""
    from ray import tune as rt

    number = _claim_number(plan.dir / "runs", rt.get_context().get_trial_id())

    def report(value: float, step: int) -> bool:
        rt.report({"objective": value, "step": step})
        return False

    record = run_trial(plan, number, params, report, threads=max(1, int(plan.search.cpus_per_trial)))
    if record["status"] == "ok":
        last = max((h.get("step", 0) for h in record["history"]), default=0)
        rt.report({"objective": record["values"][0], "step": last + 1})


# --------------------------------------------------------------------------- results


def read_trials(search_dir: Path) -> list[dict[str, Any]]:
    records = []
    for path in sorted(search_dir.glob("runs/trial-*/seed-*/result.json")):
        try:
            records.append(json.loads(path.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            continue
    return sorted(records, key=lambda r: r.get("trial", 0))


def _pareto(records: list[dict[str, Any]], directions: list[str]) -> list[dict[str, Any]]:
    signs = [1 if d == "maximize" else -1 for d in directions]

    def better_or_equal(a: list[float], b: list[float]) -> bool:
        return all(s * x >= s * y for s, x, y in zip(signs, a, b))

    front = []
    for r in records:
        if not any(better_or_equal(o["values"], r["values"]) and o["values"] != r["values"] for o in records):
            front.append(r)
    return front


def finish(plan: SearchPlan, log: Callable[[str], None] = print) -> SearchResult:
    """The search's study-format directory (study.json, for ``polydistill report``), search.md and its plots, best.yaml."""
    from polydistill.report import write_report

    records = read_trials(plan.dir)
    result = SearchResult(plan.dir, records)
    ok = [r for r in records if r["status"] == "ok"]
    directions = [o.resolved_direction() for o in plan.objectives]
    if ok:
        if len(plan.objectives) == 1:
            sign = 1 if directions[0] == "maximize" else -1
            result.best = [max(ok, key=lambda r: sign * r["values"][0])]
        else:
            result.best = _pareto(ok, directions)
    metric = next((o.metric for o in plan.objectives if o.metric not in COSTS), None)
    cells = [{"name": r["cell"], "slug": r["slug"], "levels": r["levels"], "overrides": r.get("overrides", {})} for r in records]
    dump_json(plan.dir / STUDY_FILE, {
        "name": plan.name, "task": plan.task, "metric": metric, "baseline": result.best[0]["cell"] if result.best else None,
        "seeds": sorted({r["seed"] for r in records}) or [0], "axes": [{"name": d, "levels": []} for d in plan.search.space],
        "cells": cells, "search": True, "created_at": _now(),
    })
    for old in (plan.dir / "pareto").glob("*.yaml"):
        old.unlink()
    if result.best:
        result.best_config = plan.dir / "best.yaml"
        _write_config(result.best_config, result.best[0], plan)
        if len(plan.objectives) > 1:
            for r in result.best:
                _write_config(plan.dir / "pareto" / f"{r['slug']}.yaml", r, plan)
    _write_search_md(plan, records, result)
    if metric and ok:
        write_report(plan.dir, metric=metric)
    log(f"[search] {len(ok)} ok, {sum(r['status'] == 'pruned' for r in records)} pruned, "
        f"{sum(r['status'] == 'failed' for r in records)} failed; {plan.dir / 'search.md'}"
        + (f"; best config {result.best_config}" if result.best_config else ""))
    return result


def _write_config(path: Path, record: dict[str, Any], plan: SearchPlan) -> None:
    config = json.loads(json.dumps(record["config"]))
    config["output_dir"] = str(Path("runs") / _slug(plan.name) / "best")
    config["training"]["num_threads"] = plan.base.get("training", {}).get("num_threads")  # not a Ray trial's share
    values = ", ".join(f"{o.label} {v:.4g}" for o, v in zip(plan.objectives, record["values"]))
    changes = ", ".join(f"{k}={json.dumps(v)}" for k, v in record["overrides"].items())
    head = (f"# {record['cell']} of the search '{plan.name}': {values}\n# its settings: {changes}\n"
            f"# train it: polydistill train {path.name}\n")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(head + yaml.safe_dump(config, sort_keys=False, allow_unicode=True), encoding="utf-8")


def _write_search_md(plan: SearchPlan, records: list[dict[str, Any]], result: SearchResult) -> None:
    dims = list(plan.search.space)
    best = {r["trial"] for r in result.best}
    header = ["trial", "status", *[o.label for o in plan.objectives], *dims, "steps", "wall s"]
    rows = []
    for r in records:
        values = r.get("values") or []
        steps = max((h.get("step", 0) for h in r.get("history") or []), default=0)
        rows.append([f"{r['trial']}{' (best)' if r['trial'] in best else ''}", r["status"],
                     *([f"{v:.4g}" for v in values] or ["–"] * len(plan.objectives)),
                     *[r["levels"].get(d, "") for d in dims], str(steps), f"{r.get('wall_time_s', 0):.0f}"])
    saved = sum(r["status"] == "pruned" for r in records)
    lines = [f"# Search: {plan.name}", "",
             f"{len(records)} trials ({plan.search.sampler} sampler, pruner {plan.pruner}): "
             f"{sum(r['status'] == 'ok' for r in records)} ok, {saved} pruned, {sum(r['status'] == 'failed' for r in records)} failed. "
             f"Objectives: {', '.join(f'{d} {o.label}' for o, d in zip(plan.objectives, (o.resolved_direction() for o in plan.objectives)))}.",
             ""]
    if result.best_config:
        front = "the Pareto front: " + ", ".join(r["cell"] for r in result.best) + " (configs in pareto/); " if len(result.best) > 1 else ""
        lines += [f"Best: {front}`{result.best_config.name}` is {result.best[0]['cell']}; train it with "
                  f"`polydistill train {result.best_config}`.", ""]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |" for row in rows]
    steps_all = sum(max((h.get("step", 0) for h in r.get("history") or []), default=0) for r in records)
    lines += ["", f"Training steps over all trials: {steps_all}. Per-language tables and plots: report/report.md "
              "(`polydistill report` on this directory)."]
    images = _plot_search(plan, records, result)
    if images:
        (plan.dir / "search.png").write_bytes(images)
        lines += ["", "![objective per trial](search.png)"]
    (plan.dir / "search.md").write_text("\n".join(lines) + "\n", encoding="utf-8")


def _plot_search(plan: SearchPlan, records: list[dict[str, Any]], result: SearchResult) -> bytes | None:
    from polydistill.report import _png, _pyplot

    ok = [r for r in records if r["status"] == "ok"]
    if not ok:
        return None
    plt = _pyplot()
    if len(plan.objectives) >= 2:
        fig, ax = plt.subplots(figsize=(6, 4.5))
        front = {r["trial"] for r in result.best}
        for r in ok:
            on = r["trial"] in front
            ax.scatter(r["values"][1], r["values"][0], color="C3" if on else "C0", zorder=3 if on else 2)
            ax.annotate(str(r["trial"]), (r["values"][1], r["values"][0]), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(plan.objectives[1].label)
        ax.set_ylabel(plan.objectives[0].label)
        ax.set_title(f"{plan.name}: trials (red: the Pareto front)")
    else:
        fig, ax = plt.subplots(figsize=(7, 4))
        sign = 1 if plan.objectives[0].resolved_direction() == "maximize" else -1
        xs = [r["trial"] for r in ok]
        ys = [r["values"][0] for r in ok]
        ax.scatter(xs, ys, label="finished trial", zorder=3)
        best, running = None, []
        for y in ys:
            best = y if best is None or sign * y > sign * best else best
            running.append(best)
        ax.step(xs, running, where="post", color="C3", label="best so far")
        for r in records:
            if r["status"] == "pruned" and r.get("history"):
                evals = [h for h in r["history"] if any(k.startswith("eval/") for k in h)]
                key = f"eval/{plan.objectives[0].metric}"
                vals = [h[key] for h in evals if key in h]
                if vals and not plan.objectives[0].languages:
                    ax.scatter([r["trial"]], [vals[-1]], marker="x", color="0.5", zorder=2)
        ax.scatter([], [], marker="x", color="0.5", label="pruned (its last evaluation)")
        ax.set_xlabel("trial")
        ax.set_ylabel(plan.objectives[0].label)
        ax.set_title(f"{plan.name}: objective per trial")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
