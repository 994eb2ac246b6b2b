"""The state every hook receives: the run's models, settings and progress.

Its own module, so that the hook specifications can name it without importing
the training loop.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn

from polydistill import models as M
from polydistill.batch import Batch, ModelOutputs
from polydistill.config import Config
from polydistill.plugins import PluginHost


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

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def task(self) -> str:
        return self.config.task

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
            self.student, batch.student_inputs, self.config.task, batch.student_words,
            self.config.pooling, self.need_hidden_states, self.need_attentions,
        )
