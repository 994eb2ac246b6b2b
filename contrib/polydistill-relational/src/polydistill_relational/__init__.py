"""Relational knowledge distillation for polydistill.

Park et al. 2019, "Relational Knowledge Distillation". Instead of matching each
output to the teacher's, the student matches the relations among the outputs
of a batch:

- ``rkd_distance``: pairwise Euclidean distances, each model's divided by its
  mean distance over the batch;
- ``rkd_angle``: the cosine of the angle at every vertex of every triplet.

Each is compared with the Huber (smooth L1) loss and multiplied by its weight.
Relations do not depend on the output width, so a student of another width
needs no projection; they compare rows, so they work in parallel mode and
across tokenizers.

Outputs used: pooled embeddings (embedding task), class logits (sequence
classification), word logits of the words valid for both models (token
classification; the batch's words form the set).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from polydistill import ConfigError, PluginSettings, hookimpl

__version__ = "0.1.0"


class Settings(PluginSettings):
    distance: float = Field(1.0, ge=0, description="Weight of the distance-wise term (the paper's λ_D).")
    angle: float = Field(2.0, ge=0, description="Weight of the angle-wise term (the paper's λ_A).")
    beta: float = Field(1.0, gt=0, description="Where the Huber loss turns from quadratic to linear.")

    @model_validator(mode="after")
    def _something(self) -> Settings:
        if not self.distance and not self.angle:
            raise ValueError("distance and angle are both 0; set at least one, or disable the plugin")
        return self


def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(N, D) -> (N, N) Euclidean distances, with a finite gradient where two rows coincide."""
    squares = (x * x).sum(-1)
    d2 = (squares.unsqueeze(0) + squares.unsqueeze(1) - 2 * x @ x.T).clamp(min=eps)
    return d2.sqrt() * (1 - torch.eye(len(x), device=x.device, dtype=x.dtype))


def distance_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Huber loss between the mean-normalised pairwise distances of ``student`` and ``teacher`` rows."""
    with torch.no_grad():
        t = pairwise_distances(teacher)
        t = t / t[t > 0].mean()
    s = pairwise_distances(student)
    s = s / s[s > 0].mean()
    return F.smooth_l1_loss(s, t, beta=beta)


def angles(x: torch.Tensor) -> torch.Tensor:
    """(N, D) -> (N³,) cosines of the angle at vertex j of each triplet (i, j, k)."""
    unit = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), p=2, dim=2)  # unit[j, i] = direction from j to i
    return torch.bmm(unit, unit.transpose(1, 2)).flatten()


def angle_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Huber loss between the triplet angles of ``student`` and ``teacher`` rows."""
    with torch.no_grad():
        t = angles(teacher)
    return F.smooth_l1_loss(angles(student), t, beta=beta)


def representations(student_out: Any, teacher_out: Any, task: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows whose relations are compared: (N, D_student) and (N, D_teacher)."""
    if task == "embedding":
        return student_out.embeddings, teacher_out.embeddings
    if task == "token_classification":
        mask = student_out.word_mask & teacher_out.word_mask
        return student_out.logits[mask], teacher_out.logits[mask]
    return student_out.logits, teacher_out.logits


class Relational:
    """Relational KD: distance- and angle-wise relations among a batch's outputs."""

    polydistill_api = "1.0"
    Settings = Settings

    def __init__(self, settings: Settings):
        self.settings = settings

    @hookimpl
    def setup(self, state: Any) -> None:
        if not state.teachers:
            raise ConfigError("plugins.relational: relational KD learns from a teacher; the run has none")

    @hookimpl
    def loss_terms(self, batch: Any, student_out: Any, teacher_out: Any, state: Any) -> dict[str, torch.Tensor]:
        s = self.settings
        student, teacher = representations(student_out, teacher_out, state.task)
        teacher = teacher.to(student.dtype)
        terms = {}
        # Relations need two rows (distances) or three (angles); a smaller last batch adds zero.
        zero = student.sum() * 0.0
        if s.distance:
            terms["rkd_distance"] = s.distance * (distance_loss(student, teacher, s.beta) if len(student) >= 2 else zero)
        if s.angle:
            terms["rkd_angle"] = s.angle * (angle_loss(student, teacher, s.beta) if len(student) >= 3 else zero)
        return terms
