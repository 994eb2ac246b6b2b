"""The state every hook receives: the run's models, settings and progress.

Its own module, so that the hook specifications can name it without importing
the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import Accelerator
from torch import nn

from polydistill import models as M
from polydistill.batch import Batch, ModelOutputs
from polydistill.config import Config
from polydistill.plugins import PluginHost
from polydistill.tasks import Task, get_task

if TYPE_CHECKING:
    from polydistill.teachers import TeacherRunner


@dataclass
class TrainState:
    """What every hook receives as ``state``: the run's models, settings and progress."""

    config: Config
    accelerator: Accelerator
    student: nn.Module
    teachers: list[nn.Module]
    teacher_names: list[str]
    student_tokenizer: Any
    teacher_tokenizers: list[Any]
    labels: list[str] | None
    plugins: PluginHost
    output_dir: Path
    #: Per teacher: True when it reads exactly the student's tokens (same tokenizer, same text).
    same_tokens: list[bool] = field(default_factory=list)
    #: Set to its name by a plugin (in ``trainable_modules``) whose terms compare a teacher with the student
    #: across tokenizers (kd's ``uld``): per-token tasks then accept teachers that read other tokens. Since API 1.2.
    cross_tokenizer: str | None = None
    #: Set to its name by a plugin (before the first step) whose loss compares L2-normalised sentence embeddings
    #: (kd's ``normalize``): the saved embedding student then ends in a sentence-transformers Normalize module. Since API 1.3.
    normalized_embeddings: str | None = None
    optimizer: Any = None
    scheduler: Any = None
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0
    total_steps: int = 0
    #: Micro-batches left out because their loss was not finite (training.nonfinite: skip).
    skipped_batches: int = 0
    #: Set by plugins (before the first step) that need per-layer outputs.
    need_hidden_states: bool = False
    need_attentions: bool = False
    modules: dict[str, nn.Module] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    #: Runs the teachers through the cache (see :meth:`run_teacher`); set by the loop.
    teacher_runner: TeacherRunner | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def task(self) -> str:
        """The task's name (``config.task``); ask :attr:`task_def` what the task has."""
        return self.config.task

    @property
    def task_def(self) -> Task:
        """The run's :class:`~polydistill.tasks.Task`: ``class_logits``, ``word_level``, ``output_field``, ... Since API 1.2."""
        return get_task(self.config.task)

    def settings(self, plugin: str) -> Any:
        """The validated settings of an enabled plugin (None if it has no settings model)."""
        return self.plugins.settings.get(plugin)

    def rng(self, salt: int = 0) -> torch.Generator:
        """A CPU generator seeded by the run's seed and position (epoch, micro-batch, process) and ``salt``.

        The same position gives the same draws, so a resumed run makes the same
        choices; each micro-batch of an accumulation group and each process differs.
        """
        key = (self.config.training.seed, self.epoch, self.batch_in_epoch, self.accelerator.process_index, salt)
        return torch.Generator().manual_seed(hash(key) & 0x7FFF_FFFF_FFFF_FFFF)

    def unwrapped_student(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.student)

    def forward_student(self, batch: Batch) -> ModelOutputs:
        """Run the student on ``batch`` exactly as the loop's own student forward does.

        Same task, word positions, pooling and per-layer outputs; with grad, and
        in training mode during a step, so dropout makes each call differ (a
        second pass for consistency terms such as R-Drop's). Since API 1.1.
        """
        return M.forward(
            self.student, batch.student_inputs, self.task_def, batch.student_words,
            self.config.pooling, self.need_hidden_states, self.need_attentions,
        )

    def run_teacher(self, i: int, batch: Batch, per_layer: bool | None = None) -> ModelOutputs:
        """Teacher ``i``'s outputs for ``batch`` as the loop computes them: through the teacher-output
        cache when it is on (only texts it lacks are run), in the run's precision, without grad.

        ``per_layer``: with the hidden states / attentions plugins asked for
        (default: when they asked); per-layer outputs are never cached. Since API 1.2.
        """
        if self.teacher_runner is None:
            raise RuntimeError("run_teacher: the run's teachers are not set up yet (call it from setup or a step's hooks)")
        with torch.no_grad():
            return self.teacher_runner.run(i, batch, per_layer)

    def fuse_teacher_outputs(self, outputs: dict[int, ModelOutputs], weights: torch.Tensor, batch: Batch) -> ModelOutputs:
        """The core's default fusion of several teachers' final outputs (teacher index -> outputs).

        ``weights``: ``(n_teachers,)``, ``(B, n_teachers)`` or, for word-level
        tasks, ``(B, W, n_teachers)``. Per sample a weighted sum; per word, over
        the teachers that have the word, renormalised (a teacher whose tokenizer
        lost a word to max_length gives its weight to the others). A sample with
        no weight is out of ``sample_mask``. Per-layer outputs are not fused.
        Keeps the graph of ``weights`` (a learned gate). Since API 1.2.
        """
        if self.teacher_runner is None:
            raise RuntimeError("fuse_teacher_outputs: the run's teachers are not set up yet")
        return self.teacher_runner.fuse(outputs, weights, batch)
