"""R-Drop for polydistill: consistency between two dropout passes of the student.

Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks". In each
training step the student reads the batch a second time; dropout drops other
units, and the loss term ``rdrop`` pulls the two passes' outputs together:

- classification and token tasks: ``alpha · ½ (KL(p1‖p2) + KL(p2‖p1))`` of the
  softmax outputs, averaged over samples (token tasks: over valid words);
- embedding task: ``alpha · MSE`` between the two pooled embeddings, or
  ``alpha · (1 − cos)`` with ``embedding_loss: cosine``.

The first pass is the loop's own (``student_out``), the second
``state.forward_student(batch)``; gradients flow through both, as in the paper.
The other plugins' terms (the teacher's KD terms) see the first pass only.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from polydistill import ConfigError, PluginSettings, hookimpl

__version__ = "0.1.0"


class Settings(PluginSettings):
    alpha: float = Field(1.0, gt=0, description="Weight of the consistency term (the paper's α).")
    embedding_loss: Literal["mse", "cosine"] = Field("mse", description="Distance between the two embeddings (embedding task).")
    warmup_steps: int = Field(0, ge=0, description="Optimizer steps before the term starts; until then no second pass runs.")


def symmetric_kl(p_logits: torch.Tensor, q_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over samples (or over words where ``mask`` is True) of ½ (KL(p‖q) + KL(q‖p))."""
    p_log, q_log = F.log_softmax(p_logits, dim=-1), F.log_softmax(q_logits, dim=-1)
    # F.kl_div(a, b) is KL(b ‖ a) with both given as log-probabilities here
    per = 0.5 * (F.kl_div(q_log, p_log, log_target=True, reduction="none").sum(-1)
                 + F.kl_div(p_log, q_log, log_target=True, reduction="none").sum(-1))
    if mask is None:
        return per.mean()
    mask = mask.to(per.dtype)
    return (per * mask).sum() / mask.sum().clamp(min=1)


def embedding_distance(a: torch.Tensor, b: torch.Tensor, how: str = "mse") -> torch.Tensor:
    """Mean over samples of the squared distance per dimension, or of 1 − cosine similarity."""
    if how == "cosine":
        return (1 - F.cosine_similarity(a, b, dim=-1)).mean()
    return ((a - b) ** 2).mean(-1).mean()


class RDrop:
    """R-Drop: a consistency term between two dropout passes of the student."""

    # API 1.1 added TrainState.forward_student, which the second pass uses.
    polydistill_api = "1.1"
    Settings = Settings

    def __init__(self, settings: Settings):
        self.settings = settings
        self.checked = False

    def _check_dropout(self, student: nn.Module) -> None:
        # Checked at the first step, not in setup: another plugin (``dropout``) may set
        # the rates in its own setup, and setups run in no guaranteed order.
        if not any(isinstance(m, nn.Dropout) and m.p > 0 for m in student.modules()):
            raise ConfigError("plugins.rdrop: the student has no active dropout, so both passes are the same; "
                              "give it some (e.g. the `dropout` plugin) or disable rdrop")
        self.checked = True

    @hookimpl
    def loss_terms(self, batch: Any, student_out: Any, state: Any) -> dict[str, torch.Tensor] | None:
        s = self.settings
        if state.step < s.warmup_steps:
            return None
        if not self.checked:
            self._check_dropout(state.unwrapped_student())
        second = state.forward_student(batch)
        if state.task == "embedding":
            value = embedding_distance(student_out.embeddings, second.embeddings, s.embedding_loss)
        else:
            value = symmetric_kl(student_out.logits, second.logits, student_out.word_mask)
        return {"rdrop": s.alpha * value}
