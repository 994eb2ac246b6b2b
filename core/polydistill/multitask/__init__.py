"""Multi-task runs: one student encoder, one head per task, each task with its own teachers, data and plugins.

A config with ``tasks`` is a multi-task config. Its other sections are shared:
``student``, ``training``, ``cache``, ``generation``, ``output_dir`` and the
trackers belong to the run; ``task``, ``mode``, ``labels``, ``pooling``,
``teachers``, ``data`` and ``plugins`` at the top level are defaults that each
task's section overrides (``data`` and ``plugins`` merged key by key). Each task
becomes a complete single-task :class:`~polydistill.Config`, validated as one,
so an error names the task. ``multitask`` says how steps alternate between the
tasks and how their losses are weighted (:class:`MultiTaskOptions`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, ValidationError

from polydistill.config import Config, StrictModel, format_validation_error
from polydistill.errors import ConfigError

__all__ = ["MultiTaskConfig", "MultiTaskOptions", "TaskSection", "compose", "task_probabilities"]

#: Sections one run has once: a task cannot set them.
SHARED_ONLY = ("student", "training", "cache", "generation", "output_dir", "trackers", "project_name")
#: Top-level sections that are every task's defaults.
TASK_FIELDS = ("task", "mode", "labels", "pooling", "teachers", "data", "plugins")


class TaskSection(StrictModel):
    """One task of a multi-task run: what differs from the top level's defaults."""

    task: str | None = Field(None, description="The task (as the top-level `task` of a single-task config); required here or at the top level.")
    mode: Literal["same", "parallel"] | None = Field(None, description="`same` or `parallel`, for this task's data.")
    labels: list[str] | None = Field(None, description="This task's label names (classification tasks).")
    pooling: Literal["mean", "cls"] | None = Field(None, description="Sentence pooling of this task (embedding).")
    teachers: list[dict[str, Any]] | dict[str, Any] | None = Field(None, description="This task's teachers (replace the top level's).")
    data: dict[str, Any] | None = Field(None, description="This task's data: `train`, `eval` and any data setting (batch_size, max_length, ...), merged over the top level's `data`.")
    plugins: dict[str, Any] | None = Field(None, description="Plugin options merged over the top level's: a plugin's options here update its top-level options; `false` switches it off for this task.")
    weight: float = Field(1.0, gt=0, description="`weighting: fixed`: this task's loss is multiplied by it. `uncertainty`: its initial weight.")
    enabled: bool = Field(True, description="`false` leaves the task out of the run (a study's task-set axis switches tasks on and off).")


class MultiTaskOptions(StrictModel):
    """How a multi-task run alternates between its tasks and weights their losses."""

    sampling: Literal["proportional", "temperature", "round_robin"] = Field(
        "temperature",
        description="Which task each optimizer step trains. `proportional`: drawn with probability proportional to the "
        "task's training batches per epoch; `temperature`: proportional to that count to the power 1/`temperature` "
        "(small tasks are drawn more often than their size says); `round_robin`: the tasks in turn. Draws are "
        "seeded by `training.seed` and the step, so a resumed run trains the same tasks at the same steps.",
    )
    temperature: float = Field(2.0, gt=0, description="`sampling: temperature`: 1 is `proportional`; large values tend to uniform.")
    weighting: Literal["fixed", "uncertainty"] = Field(
        "fixed",
        description="`fixed`: each task's loss times its `weight`. `uncertainty`: learned weights (Kendall et al. 2018): "
        "task t's loss L becomes exp(-s_t)·L + s_t with a trained s_t (starting at -log(weight)); exp(-s_t) is "
        "logged as `<task>/weight`.",
    )
    weight_learning_rate: float = Field(
        0.05, gt=0,
        description="`weighting: uncertainty`: the learning rate of the s_t (the schedule scales it as the student's). "
        "They live on a log scale: at a student's learning rate (1e-5 to 1e-4) they would move by about 0.03 in "
        "a thousand steps, so the weights would stay where they started.",
    )


class MultiTaskConfig:
    """A validated multi-task config: each enabled task's complete :class:`Config`, its weight and the options.

    ``training``, ``student``, ``output_dir`` and the trackers are the run's (every task's config has the same).
    """

    def __init__(self, tasks: dict[str, Config], weights: dict[str, float], options: MultiTaskOptions,
                 raw: dict[str, Any], base_dir: Path, builder: str):
        self.tasks, self.weights, self.options, self.raw, self.base_dir = tasks, weights, options, raw, base_dir
        #: The task whose teachers and config build the shared student (the others add heads to it).
        self.builder = builder
        first = next(iter(tasks.values()))
        self.training, self.student, self.cache = first.training, first.student, first.cache
        self.output_dir, self.trackers, self.project_name = first.output_dir, first.trackers, first.project_name
        self.task = "multitask"

    def __repr__(self) -> str:
        return f"<multi-task config: {', '.join(f'{n} ({c.task})' for n, c in self.tasks.items())}>"

    def resolve_path(self, value: str) -> str:
        return next(iter(self.tasks.values())).resolve_path(value)

    @property
    def primary_metric(self) -> str:
        """The first task's primary metric, as multi-task metrics name it (``<task>/<metric>``)."""
        from polydistill.evaluation import primary_metric

        name, config = next(iter(self.tasks.items()))
        return f"{name}/{primary_metric(config.task)}"

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.raw))

    def resolved_dict(self) -> dict[str, Any]:
        """The config with each task's complete config (local paths absolute), runnable from any folder."""
        data = self.to_dict()
        shared = next(iter(self.tasks.values())).resolved_dict()
        for key in SHARED_ONLY:
            data[key] = shared[key]
        for name, config in self.tasks.items():
            resolved = config.resolved_dict()
            section = data["tasks"][name]
            for key in TASK_FIELDS:
                section[key] = resolved[key]
        for key in TASK_FIELDS:
            data.pop(key, None)  # now in each task's section
        return data


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on ``base``: mappings merged key by key, anything else replaced (a plugin set to false is switched off)."""
    out = dict(base)
    for key, value in over.items():
        old = out.get(key)
        if isinstance(value, dict) and isinstance(old, dict):
            out[key] = _merge(old, value)
        elif isinstance(value, dict) and old is True:  # `kd: true` at the top, options in the task
            out[key] = dict(value)
        else:
            out[key] = value
    return out


def task_probabilities(options: MultiTaskOptions, sizes: dict[str, int]) -> dict[str, float]:
    """Each task's chance to train a step, from its training batches per epoch (``sampling``)."""
    if options.sampling == "round_robin":
        return {name: 1 / len(sizes) for name in sizes}
    power = 1.0 if options.sampling == "proportional" else 1.0 / options.temperature
    raw = {name: float(n) ** power for name, n in sizes.items()}
    total = sum(raw.values())
    return {name: v / total for name, v in raw.items()}


def task_at(step: int, names: list[str], probabilities: dict[str, float], options: MultiTaskOptions, seed: int) -> str:
    """The task that trains optimizer step ``step`` (0-based): a function of the seed and the step alone."""
    if options.sampling == "round_robin":
        return names[step % len(names)]
    p = np.array([probabilities[n] for n in names])
    return names[int(np.random.default_rng([seed, step, 0x6D74]).choice(len(names), p=p / p.sum()))]


def compose(data: dict[str, Any], base_dir: Path, origin: str) -> MultiTaskConfig:
    """Validate a multi-task config (a dict with ``tasks``): each task's section over the top-level defaults."""
    data = json.loads(json.dumps(data))
    raw = json.loads(json.dumps(data))
    tasks = data.pop("tasks")
    try:
        options = MultiTaskOptions.model_validate(data.pop("multitask", None) or {})
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, MultiTaskOptions, origin, ("multitask",))) from None
    unknown = [k for k in data if k not in Config.model_fields]
    if unknown:
        import difflib

        close = difflib.get_close_matches(unknown[0], [*Config.model_fields, "tasks", "multitask"], n=1)
        raise ConfigError(f"{origin}: {unknown[0]}: unknown option" + (f"; did you mean '{close[0]}'?" if close else ""))
    if not isinstance(tasks, dict) or not tasks:
        raise ConfigError(f"{origin}: tasks: give a mapping of task names to their sections, e.g. "
                          "{topics: {task: sequence_classification, ...}, tags: {task: token_classification, ...}}")
    sections: dict[str, TaskSection] = {}
    for name, section in tasks.items():
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", str(name)):
            raise ConfigError(f"{origin}: tasks.{name}: a task name is letters, digits, '_' and '-', starting with a letter "
                              "(it prefixes the task's metrics and logs)")
        section = section if isinstance(section, dict) else {}
        shared = [k for k in SHARED_ONLY if k in section]
        if shared:
            raise ConfigError(f"{origin}: tasks.{name}.{shared[0]}: one run has one {shared[0]}, shared by every task; "
                              "set it at the top level")
        try:
            sections[name] = TaskSection.model_validate(section)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, TaskSection, origin, ("tasks", name))) from None
    enabled = [n for n, s in sections.items() if s.enabled]
    if not enabled:
        raise ConfigError(f"{origin}: tasks: every task is switched off (enabled: false); enable at least one")
    configs: dict[str, Config] = {}
    for name in enabled:
        section = sections[name].model_dump(exclude_unset=True, exclude={"weight", "enabled"})
        own = _merge({k: v for k, v in data.items() if k in TASK_FIELDS}, section)
        if isinstance(section.get("data"), dict):  # a task's train/eval lists replace the top level's
            own["data"] = _merge(data.get("data") or {}, section["data"])
        full = {**{k: v for k, v in data.items() if k not in TASK_FIELDS}, **own}
        where = f"{origin}: tasks.{name}"
        if "task" not in full:
            raise ConfigError(f"{where}.task: required option is missing (here or at the top level)")
        try:
            config = Config.model_validate(full, context={"shared_student": True})
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, Config, where)) from None
        config._base_dir = base_dir
        config._resolve_paths()
        configs[name] = config
    builder = _builder(configs, origin)
    return MultiTaskConfig(configs, {n: sections[n].weight for n in enabled}, options, raw, base_dir, builder)


def _builder(configs: dict[str, Config], origin: str) -> str:
    """The task whose config builds the shared student: the one holding ``student.from_teacher``'s teacher, else the first."""
    first = next(iter(configs.values()))
    ft = first.student.from_teacher
    if ft is None:
        return next(iter(configs))
    if isinstance(ft.teacher, int):
        if not 0 <= ft.teacher < len(first.teachers):
            raise ConfigError(f"{origin}: student.from_teacher.teacher={ft.teacher}: an index counts the first task's "
                              f"teachers ({next(iter(configs))}: {len(first.teachers)}); name the teacher instead")
        return next(iter(configs))
    holders = [n for n, c in configs.items() if ft.teacher in c.teacher_names()]
    if not holders:
        names = sorted({t for c in configs.values() for t in c.teacher_names()})
        raise ConfigError(f"{origin}: student.from_teacher.teacher={ft.teacher!r} is not a teacher of any task ({', '.join(names) or 'none'})")
    return holders[0]
