"""Relational knowledge distillation for polydistill.

Park et al. 2019, "Relational Knowledge Distillation". Instead of matching each
output to the teacher's, the student matches the relations among a set of
outputs:

- ``rkd_distance``: pairwise Euclidean distances, each model's divided by its
  mean distance over the set;
- ``rkd_angle``: the cosine of the angle at every vertex of every triplet.

Each is compared with the Huber (smooth L1) loss and multiplied by its weight.
Relations do not depend on the output width, so a student of another width
needs no projection; they compare rows, so they work in parallel mode and
across tokenizers.

The sets of rows (``relation_sets``):

- embedding task: the batch's pooled embeddings (one set);
- sequence classification: the batch's class logits (one set);
- token classification: the word logits of the words valid for both models,
  the words of each sentence forming one set (``scope: sentence``, default:
  the loss is averaged over sentences) or all words of the batch one set
  (``scope: batch``).

Sample weights (the batch's loss hints, ``batch.loss_hints()``, as kd reads
them; on an API 1.1 core ``batch.meta["sample_weights"]``: a number, a ``(B,)``
tensor, or a callable ``f(student_out, teacher_out)`` returning one):
a row of weight 0 is not a point at all (multi_teacher gives its untaught
samples weight 0, and zero fused logits); a pair weighs ``w_i * w_j`` and a
triplet ``w_i * w_j * w_k``, each loss being the weighted mean over the same
``N²`` pairs and ``N³`` triplets the paper averages over (so weights of 1 give
the paper's loss), and with ``scope: sentence`` each sentence's loss counts
with its sample weight in the average over sentences.

Memory: the angle term builds a few ``G × M³`` tensors for ``G`` sets of at
most ``M`` rows. ``max_rows`` caps ``M``: a larger set is replaced by a random
subset of that size, drawn from ``state.rng`` (the same draw at the same step
of a resumed run).
"""

from __future__ import annotations

from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator

from polydistill import ConfigError, PluginError, PluginSettings, hookimpl

__version__ = "0.3.0"

NAME = "relational"
#: Salt of the subsample's generator (``state.rng``), so its draws are its own.
_SALT = 0x524B44
_TINY = 1e-12


class Settings(PluginSettings):
    distance: float = Field(1.0, ge=0, description="Weight of the distance-wise term (the paper's λ_D).")
    angle: float = Field(2.0, ge=0, description="Weight of the angle-wise term (the paper's λ_A).")
    beta: float = Field(1.0, gt=0, description="Where the Huber loss turns from quadratic to linear.")
    scope: Literal["sentence", "batch"] = Field(
        "sentence",
        description="token_classification only: relate the words of each sentence (sentence: the loss is averaged "
        "over sentences; memory B x W³ for B sentences of at most W words) or all words of the batch (batch: memory "
        "N³ for N words, e.g. 64 sentences x 30 words need ~28 GB per angle tensor; cap it with max_rows).",
    )
    max_rows: int | None = Field(
        None, ge=3,
        description="The most rows one set of relations compares (sentence scope: words per sentence; else rows "
        "of the batch). A larger set is replaced by a random subset of this size, drawn each step from the run's "
        "seeded generator (state.rng). None: every row.",
    )

    @model_validator(mode="after")
    def _something(self) -> Settings:
        if not self.distance and not self.angle:
            raise ValueError("distance and angle are both 0; set at least one, or disable the plugin")
        return self


# --------------------------------------------------------------------------- relations


def pairwise_distances(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """(..., N, D) -> (..., N, N) Euclidean distances, with a finite gradient where two rows coincide."""
    squares = (x * x).sum(-1)
    d2 = (squares.unsqueeze(-1) + squares.unsqueeze(-2) - 2 * x @ x.transpose(-1, -2)).clamp(min=eps)
    return d2.sqrt() * (1 - torch.eye(x.size(-2), device=x.device, dtype=x.dtype))


def angles(x: torch.Tensor) -> torch.Tensor:
    """(..., N, D) -> (..., N, N, N): ``[..., j, i, k]`` is the cosine of the angle at vertex j of triplet (i, j, k).

    Degenerate triplets (i = j or k = j) give 0, as in the paper's code.
    """
    unit = F.normalize(x.unsqueeze(-3) - x.unsqueeze(-2), p=2, dim=-1)  # unit[..., j, i] = direction from j to i
    return unit @ unit.transpose(-1, -2)


def distance_losses(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per set: (G, M, Ds), (G, M, Dt), row weights (G, M) -> (G,) weighted Huber loss of the normalised distances.

    Pair (i, j) weighs ``w_i * w_j``; each model's distances are divided by their
    weighted mean over pairs i != j, and the loss is the weighted mean over all
    ``M²`` pairs (the diagonal, always 0, included, as in the paper's code).
    """
    pair = weights.unsqueeze(-1) * weights.unsqueeze(-2)
    off = pair * (1 - torch.eye(pair.size(-1), device=pair.device, dtype=pair.dtype))
    off_total = off.sum((-1, -2)).clamp(min=_TINY)

    def normalised(d: torch.Tensor) -> torch.Tensor:
        mean = (d * off).sum((-1, -2)) / off_total
        return d / mean.clamp(min=_TINY)[..., None, None]

    with torch.no_grad():
        t = normalised(pairwise_distances(teacher))
    s = normalised(pairwise_distances(student))
    huber = F.smooth_l1_loss(s, t, beta=beta, reduction="none")
    return (huber * pair).sum((-1, -2)) / pair.sum((-1, -2)).clamp(min=_TINY)


def angle_losses(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per set: (G, M, Ds), (G, M, Dt), row weights (G, M) -> (G,) weighted Huber loss of the triplet angles.

    Triplet (i, j, k) weighs ``w_i * w_j * w_k``; the loss is the weighted mean over
    all ``M³`` triplets (degenerate ones included, as in the paper's code).
    """
    with torch.no_grad():
        t = angles(teacher)
    huber = F.smooth_l1_loss(angles(student), t, beta=beta, reduction="none")  # (G, M, M, M), [j, i, k]
    w = weights
    # Σ_jik w_j w_i w_k huber[j, i, k] by matrix products: no other G x M³ tensor
    v = (huber @ w[:, None, :, None]).squeeze(-1)  # (G, M_j, M_i): Σ_k
    v = (v @ w[:, :, None]).squeeze(-1)  # (G, M_j): Σ_i
    return (v * w).sum(-1) / (w.sum(-1) ** 3).clamp(min=_TINY)


def _one_set(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor | None) -> tuple[torch.Tensor, ...]:
    w = torch.ones(len(student), device=student.device, dtype=student.dtype) if weights is None else weights
    return student[None], teacher[None].to(student.dtype), w.to(student.device, student.dtype)[None]


def distance_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Huber loss between the mean-normalised pairwise distances of ``student`` and ``teacher`` rows (N, D).

    ``weights`` (N,): row weights (pair (i, j) weighs ``w_i * w_j``); None: all 1.
    """
    return distance_losses(*_one_set(student, teacher, weights), beta)[0]


def angle_loss(student: torch.Tensor, teacher: torch.Tensor, beta: float = 1.0, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Huber loss between the triplet angles of ``student`` and ``teacher`` rows (N, D).

    ``weights`` (N,): row weights (triplet (i, j, k) weighs ``w_i * w_j * w_k``); None: all 1.
    """
    return angle_losses(*_one_set(student, teacher, weights), beta)[0]


# --------------------------------------------------------------------------- rows, sets, weights


def sample_weights(value: Any, student_out: Any, teacher_out: Any, size: int) -> torch.Tensor | None:
    """``batch.meta["sample_weights"]`` resolved as kd resolves it, as a float ``(size,)`` tensor (None: absent).

    ``value`` is None, a number, a ``(size,)`` tensor (or sequence), or a callable
    ``f(student_out, teacher_out)`` returning one of those.
    """
    if callable(value):
        value = value(student_out, teacher_out)
    if value is None:
        return None
    like = student_out.embeddings if student_out.logits is None else student_out.logits
    w = torch.as_tensor(value, device=like.device)
    if not w.is_floating_point():
        w = w.float()
    if w.dim() == 0:
        w = w.expand(size)
    what = 'plugins.relational: batch.meta["sample_weights"] (set by another plugin)'
    if tuple(w.shape) != (size,):
        raise PluginError(f"{what} must hold one weight per sample, shape ({size},); got shape {tuple(w.shape)}",
                          plugin=NAME, hook="loss_terms")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise PluginError(f"{what} must be finite and >= 0; got {w.detach().cpu().tolist()}", plugin=NAME, hook="loss_terms")
    return w


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (G, K) of each set of ``x`` (G, M, ...)."""
    return x.gather(1, index.view(*index.shape, *[1] * (x.dim() - 2)).expand(*index.shape, *x.shape[2:]))


def _pack(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Move each set's rows of positive weight to its front, in order, and drop the columns no set needs."""
    keep = weights > 0
    # a left-out row's values never enter a relation (a zero weight would not stop a NaN)
    student, teacher = student.masked_fill(~keep[..., None], 0.0), teacher.masked_fill(~keep[..., None], 0.0)
    width = int(keep.sum(-1).max()) if keep.numel() else 0
    if width == weights.size(-1):
        return student, teacher, weights
    index = torch.argsort((~keep).to(torch.int8), dim=-1, stable=True)[:, :width]
    return _gather(student, index), _gather(teacher, index), _gather(weights, index)


def relation_sets(student_out: Any, teacher_out: Any, task: str, weights: torch.Tensor | None = None,
                  scope: str = "sentence") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sets whose relations are compared: (G, M, D_student), (G, M, D_teacher) and row weights (G, M).

    Embedding and sequence classification: one set, the batch's rows. Token
    classification: the words valid for both models, one set per sentence
    (``scope="sentence"``) or one set of all of them (``"batch"``). A row's weight
    is its sample's weight (``weights``, (B,); None: 1); rows of weight 0 are left
    out, and sets shorter than M are padded with rows of weight 0.
    """
    field = "embeddings" if task == "embedding" else "logits"
    student, teacher = getattr(student_out, field), getattr(teacher_out, field)
    w = torch.ones(student.size(0), device=student.device) if weights is None else weights.to(student.device)
    if task == "token_classification":
        mask = student_out.word_mask
        if teacher_out.word_mask is not None:
            mask = mask & teacher_out.word_mask
        rows = mask.to(w.dtype) * w[:, None]
        if scope == "batch":
            student, teacher, rows = student[mask][None], teacher[mask][None], rows[mask][None]
        return _pack(student, teacher, rows)
    return _pack(student[None], teacher[None], w[None])


def subsample(student: torch.Tensor, teacher: torch.Tensor, weights: torch.Tensor, max_rows: int,
              generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """At most ``max_rows`` rows of each set: a uniform choice (from ``generator``, on the CPU) among its rows of weight > 0."""
    if weights.size(-1) <= max_rows:
        return student, teacher, weights
    keys = torch.rand(weights.shape, generator=generator).masked_fill(~(weights > 0).cpu(), float("inf"))
    index = keys.topk(max_rows, dim=-1, largest=False).indices.sort(-1).values.to(weights.device)
    return _gather(student, index), _gather(teacher, index), _gather(weights, index)


def _mean_over_sets(loss: Callable[..., torch.Tensor], student: torch.Tensor, teacher: torch.Tensor,
                    weights: torch.Tensor, needs: int, beta: float) -> torch.Tensor | None:
    """``loss`` of each set with at least ``needs`` rows, averaged with the mean weight of each set's rows; None: no set."""
    rows = (weights > 0).sum(-1)
    ok = rows >= needs
    if not bool(ok.any()):
        return None
    if not bool(ok.all()):
        student, teacher, weights, rows = student[ok], teacher[ok], weights[ok], rows[ok]
    per = loss(student, teacher, weights, beta)
    set_weight = weights.sum(-1) / rows
    return (per * set_weight).sum() / set_weight.sum()


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
        if "scope" in self.settings.model_fields_set and state.task != "token_classification":
            raise ConfigError(
                f"plugins.relational.scope: only token_classification chooses between the words of each sentence and "
                f"those of the batch; task {state.task} relates the batch's samples. Leave scope out"
            )

    @hookimpl
    def loss_terms(self, batch: Any, student_out: Any, teacher_out: Any, state: Any) -> dict[str, torch.Tensor]:
        s, task = self.settings, state.task
        output = student_out.embeddings if task == "embedding" else student_out.logits
        if hasattr(batch, "loss_hints"):  # API 1.2: the typed hints (weights of every plugin, multiplied, checked)
            weights = batch.loss_hints().resolve_weights(student_out, teacher_out, output.size(0))
        else:
            weights = sample_weights(batch.meta.get("sample_weights"), student_out, teacher_out, output.size(0))
        if getattr(teacher_out, "sample_mask", None) is not None:  # samples no teacher teaches are not points
            keep = teacher_out.sample_mask.to(output.device, torch.float32)
            weights = keep if weights is None else weights * keep
        student, teacher, w = relation_sets(student_out, teacher_out, task, weights, s.scope)
        if s.max_rows is not None and w.size(-1) > s.max_rows:
            student, teacher, w = subsample(student, teacher, w, s.max_rows, state.rng(_SALT))
        teacher, w = teacher.to(student.dtype), w.to(student.dtype)
        terms = {}
        # Relations need two rows (distances) or three (angles); a batch without such a set adds zero.
        zero = output.sum() * 0.0
        if s.distance:
            value = _mean_over_sets(distance_losses, student, teacher, w, 2, s.beta)
            terms["rkd_distance"] = s.distance * (zero if value is None else value)
        if s.angle:
            value = _mean_over_sets(angle_losses, student, teacher, w, 3, s.beta)
            terms["rkd_angle"] = s.angle * (zero if value is None else value)
        return terms
