"""The study file's schema: the pydantic models Axis and StudyConfig, and how an axis expands into levels."""

from __future__ import annotations

from typing import Any, Literal

import yaml
from pydantic import Field, field_validator, model_validator

from polydistill.config import StrictModel


class Axis(StrictModel):
    """One factor of the study: exactly one of field+values, levels, add_one_in, leave_one_out, add_tasks."""

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
    add_tasks: list[str] | None = Field(
        None, description="Tasks of a multi-task base config: levels `base` (its other tasks, these switched off) and "
        "`+NAME` (those plus this one task)."
    )

    @model_validator(mode="after")
    def _one_kind(self) -> Axis:
        kinds = [k for k in ("field", "levels", "add_one_in", "leave_one_out", "add_tasks") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError(f"give exactly one of field (with values), levels, add_one_in, leave_one_out, add_tasks (got {kinds or 'none'})")
        if (self.field is None) != (self.values is None):
            raise ValueError("field and values go together")
        if self.values is not None and not self.values:
            raise ValueError("values: give at least one value")
        if self.add_tasks is not None and (not self.add_tasks or len(set(self.add_tasks)) != len(self.add_tasks)):
            raise ValueError("add_tasks: give the names of one or more tasks, each once")
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
        if self.add_tasks is not None:
            off = {f"tasks.{name}.enabled": False for name in self.add_tasks}
            return [("base", off)] + [(f"+{name}", {**off, f"tasks.{name}.enabled": True}) for name in self.add_tasks]
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
