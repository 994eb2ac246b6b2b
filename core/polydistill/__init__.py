"""polydistill: knowledge distillation for cross-lingual transfer.

The public API is what this module exports; plugins import nothing else.
Heavy modules (torch, transformers) load on first use, so ``import polydistill``
stays cheap.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from polydistill.version import API_VERSION, __version__  # noqa: F401  (a leaf module: importable from anywhere)

from polydistill.errors import (  # noqa: E402
    CheckpointError,
    ConfigError,
    DataError,
    PluginError,
    PolydistillError,
    PolydistillWarning,
)
from polydistill.hookspecs import hookimpl  # noqa: E402

_LAZY = {
    "Config": "polydistill.config",
    "load_config": "polydistill.config",
    "MultiTaskConfig": "polydistill.multitask",
    "PluginSettings": "polydistill.config",
    "Batch": "polydistill.batch",
    "ModelOutputs": "polydistill.batch",
    "Trainable": "polydistill.batch",
    "LossHints": "polydistill.batch",
    "TeacherCache": "polydistill.cache",
    "teacher_fingerprint": "polydistill.cache",
    "tokenizer_fingerprint": "polydistill.cache",
    "Task": "polydistill.tasks",
    "get_task": "polydistill.tasks",
    "load_data": "polydistill.data",
    "TrainState": "polydistill.state",
    "forward": "polydistill.models",
    "evaluate_model": "polydistill.evaluation",
    "train": "polydistill.api",
    "evaluate": "polydistill.api",
    "RunResult": "polydistill.api",
    "ablate": "polydistill.study",
    "plan_study": "polydistill.study",
    "write_report": "polydistill.report",
}

__all__ = [
    "API_VERSION",
    "Batch",
    "CheckpointError",
    "Config",
    "ConfigError",
    "DataError",
    "LossHints",
    "ModelOutputs",
    "MultiTaskConfig",
    "PluginError",
    "PluginSettings",
    "PolydistillError",
    "PolydistillWarning",
    "RunResult",
    "Task",
    "TeacherCache",
    "TrainState",
    "Trainable",
    "__version__",
    "ablate",
    "evaluate",
    "evaluate_model",
    "forward",
    "get_task",
    "hookimpl",
    "load_data",
    "load_config",
    "plan_study",
    "teacher_fingerprint",
    "tokenizer_fingerprint",
    "train",
    "write_report",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'polydistill' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


if TYPE_CHECKING:  # pragma: no cover
    from polydistill.api import RunResult, evaluate, train
    from polydistill.batch import Batch, LossHints, ModelOutputs, Trainable
    from polydistill.cache import TeacherCache, teacher_fingerprint, tokenizer_fingerprint
    from polydistill.config import Config, PluginSettings, load_config
    from polydistill.data import load_data
    from polydistill.evaluation import evaluate_model
    from polydistill.models import forward
    from polydistill.multitask import MultiTaskConfig
    from polydistill.state import TrainState
    from polydistill.tasks import Task, get_task
    from polydistill.report import write_report
    from polydistill.study import ablate, plan_study
