"""Adaptive KD temperature and per-sample weights (plugin ``adaptive_temperature``).

The ``kd`` plugin's KL term follows the batch's loss hints (a temperature,
sample weights); this plugin sets both from ``augment_batch`` with
``batch.with_hints``, as callables ``f(student_out, teacher_out)`` which ``kd``
calls after the forward passes. What it can do (see ``docs/plugins/adaptive_temperature.md``):

- a schedule: ``constant``, ``linear`` or ``cosine`` annealing from ``start``
  to ``end``, after ``warmup_steps`` held at ``start``;
- a per-sample temperature (``per_sample``), clamped to
  ``[min_temperature, max_temperature]``: ``entropy``,
  ``T_i = base · f(h_i)`` with ``h_i`` the normalised entropy of the teacher's
  distribution and ``f`` linear from ``scale_confident`` (h = 0) to
  ``scale_uncertain`` (h = 1); or TextBrewer's dynamic temperatures ``flsw`` and
  ``cwsm`` (Wen et al. 2019, "Preparing Lessons"),
  ``T_i = base + beta · (mean(w) - w_i)``;
- the same flsw/cwsm values as per-sample loss weights (``weighting:
  flsw_weight | cwsm_weight``), normalised to mean 1 and detached;
- a learnable temperature (Curriculum Temperature for KD, Li et al. 2023):
  one global parameter or a small MLP on the teacher and student logits,
  squashed into ``[min_temperature, max_temperature]`` by a sigmoid and
  trained adversarially through a gradient reversal layer whose strength
  ``lambda`` follows a cosine curriculum, with its own learning rate
  (``temperature_lr``) and gradient clipping.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

import polydistill
from polydistill import ConfigError, PluginSettings, hookimpl

NAME = "adaptive_temperature"
_DEFAULT_START = 2.0  # kd's default temperature, used when kd is not enabled


class Settings(PluginSettings):
    schedule: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="How the temperature moves from `start` to `end` over the run: constant (stays at `start`), linear or cosine."
    )
    min_temperature: float = Field(1.0, gt=0, description="Lower bound of every temperature this plugin hands to kd.")
    max_temperature: float = Field(10.0, gt=0, description="Upper bound of every temperature this plugin hands to kd.")
    start: float | None = Field(
        None, gt=0, description="Temperature at the first step (and through the warm-up); default: kd's `temperature`."
    )
    end: float | None = Field(None, gt=0, description="Temperature reached at step `steps` - 1 by linear/cosine schedules; default: `start`.")
    steps: int | None = Field(
        None, ge=1, description="Length of the schedule in optimizer steps, warm-up included; default: the run's total steps."
    )
    warmup_steps: int = Field(0, ge=0, description="Steps held at `start` before annealing begins.")
    per_sample: Literal["off", "entropy", "flsw", "cwsm"] = Field(
        "off",
        description="Per-sample temperature: `entropy` scales the scheduled one by the teacher's confidence; `flsw` / `cwsm` "
        "are TextBrewer's dynamic temperatures, T_i = T + beta·(mean w - w_i).",
    )
    scale_confident: float = Field(
        1.5, gt=0, description="Factor on the scheduled temperature for a one-hot teacher distribution (normalised entropy 0)."
    )
    scale_uncertain: float = Field(
        0.5, gt=0, description="Factor on the scheduled temperature for a uniform teacher distribution (normalised entropy 1)."
    )
    beta: float = Field(
        1.0, ge=0, description="Strength of the flsw/cwsm temperature: T_i = T + beta·(mean w - w_i) (TextBrewer's `beta`)."
    )
    weighting: Literal["off", "flsw_weight", "cwsm_weight"] = Field(
        "off",
        description="Per-sample loss weights for kd's terms from the flsw value (student-teacher distance) or the cwsm value "
        "(low confidence weighs more).",
    )
    flsw_gamma: float = Field(2.0, ge=0, description="flsw exponent: w = (1 - cos(student logits, teacher logits))^gamma.")
    cwsm_confidence: Literal["student", "teacher"] = Field(
        "student", description="Whose maximum probability cwsm uses: w = 1 / (max p + 0.001). TextBrewer uses the student's."
    )
    weighting_strength: float = Field(
        1.0, ge=0, le=1, description="Blend between uniform weights (0) and the flsw/cwsm weights (1): w = 1 + s·(w - 1)."
    )
    learnable: Literal["off", "global", "instance"] = Field(
        "off", description="CTKD learnable temperature: one parameter (global) or an MLP on teacher+student logits (instance)."
    )
    mlp_hidden: int = Field(64, ge=1, description="Hidden width of the instance-temperature MLP.")
    lambda_min: float = Field(0.0, ge=0, description="Gradient-reversal strength at the first step (CTKD curriculum).")
    lambda_max: float = Field(1.0, ge=0, description="Gradient-reversal strength reached at step `lambda_steps` - 1.")
    lambda_steps: int | None = Field(None, ge=1, description="Length of the cosine lambda curriculum; default: the run's total steps.")
    temperature_lr: float = Field(
        0.05, gt=0, description="Learning rate of the learned temperature (its own parameter group); CTKD trains it at 0.05."
    )
    temperature_max_grad_norm: float | None = Field(
        None, gt=0, description="Clip the learned temperature's gradient norm on its own at this value; `null`: not clipped (as CTKD)."
    )

    @field_validator("weighting", mode="before")
    @classmethod
    def _renamed_weighting(cls, value: Any) -> Any:
        if isinstance(value, str) and value in ("flsw", "cwsm"):
            raise ValueError(
                f"{value} now names TextBrewer's per-sample temperature, not a loss weight; for the per-sample loss weights "
                f"this option used to give, write weighting: {value}_weight; for TextBrewer's temperature "
                f"T_i = T + beta·(mean w - w_i), write per_sample: {value} (and beta)"
            )
        return value

    @field_validator("max_temperature")
    @classmethod
    def _bounds(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("min_temperature")
        if low is not None and value <= low:
            raise ValueError(f"must be greater than min_temperature ({low})")
        return value

    @field_validator("start", "end")
    @classmethod
    def _in_bounds(cls, value: float | None, info: ValidationInfo) -> float | None:
        low, high = info.data.get("min_temperature"), info.data.get("max_temperature")
        if value is not None and low is not None and high is not None and not low <= value <= high:
            raise ValueError(f"must lie within [min_temperature, max_temperature] = [{low}, {high}]; widen those bounds")
        return value

    @field_validator("warmup_steps")
    @classmethod
    def _warmup_below_steps(cls, value: int, info: ValidationInfo) -> int:
        steps = info.data.get("steps")
        if steps is not None and value >= steps:
            raise ValueError(f"must be smaller than steps ({steps}), or the schedule never leaves start")
        return value

    @field_validator("lambda_max")
    @classmethod
    def _lambda_order(cls, value: float, info: ValidationInfo) -> float:
        low = info.data.get("lambda_min")
        if low is not None and value < low:
            raise ValueError(f"must be at least lambda_min ({low}): the curriculum increases lambda")
        return value

    @field_validator("learnable")
    @classmethod
    def _learnable_alone(cls, value: str, info: ValidationInfo) -> str:
        if value == "off":
            return value
        data = info.data
        if data.get("schedule", "constant") != "constant":
            raise ValueError(f"a learned temperature replaces the schedule; use schedule: constant (got {data['schedule']!r})")
        if data.get("per_sample", "off") != "off":
            raise ValueError("a learned temperature replaces per_sample; set per_sample: off (learnable: instance is per sample)")
        if data.get("warmup_steps"):
            raise ValueError("warmup_steps belongs to the schedule; the learned temperature's warm-up is the lambda curriculum (lambda_min)")
        return value


class GradientReversal(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``-lambda`` in the backward pass (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, lambda_: float) -> torch.Tensor:
        ctx.lambda_ = float(lambda_)
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad.neg() * ctx.lambda_, None


def reverse_gradient(x: torch.Tensor, lambda_: float) -> torch.Tensor:
    return GradientReversal.apply(x, lambda_)


def _per_sample(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B,) as is; (B, W) per-word values averaged over each sample's valid words."""
    if values.dim() == 1:
        return values
    m = torch.ones_like(values) if mask is None else mask.to(values.dtype)
    return (values * m).sum(-1) / m.sum(-1).clamp(min=1)


def normalised_entropy(logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Entropy of softmax(logits) divided by log(C), in [0, 1], one value per sample."""
    logp = F.log_softmax(logits.float(), dim=-1)
    h = -(logp.exp() * logp).sum(-1)
    classes = logits.size(-1)
    h = h / math.log(classes) if classes > 1 else torch.zeros_like(h)
    return _per_sample(h, mask)


def flsw_values(student_logits: torch.Tensor, teacher_logits: torch.Tensor, gamma: float) -> torch.Tensor:
    """flsw: (1 - cos(student logits, teacher logits))^gamma per logit vector (Wen et al. 2019, as TextBrewer computes it)."""
    cos = (F.normalize(student_logits.float(), dim=-1) * F.normalize(teacher_logits.float(), dim=-1)).sum(-1)
    return (1 - cos).clamp(min=0) ** gamma


def cwsm_values(logits: torch.Tensor) -> torch.Tensor:
    """cwsm: 1 / (max softmax probability + 0.001) per logit vector (Wen et al. 2019, as TextBrewer computes it)."""
    return 1.0 / (torch.softmax(logits.float(), dim=-1).max(-1).values + 1e-3)


def dynamic_temperature(values: torch.Tensor, base: float, beta: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """TextBrewer's flsw/cwsm temperature ``base + beta · (mean(w) - w)``, unclamped, one per sample.

    ``values`` are ``(B,)`` or per word ``(B, W)``; the mean runs over the batch
    (over its valid words, as TextBrewer's over its selected tokens), and per-word
    temperatures are averaged over each sample's valid words.
    """
    w = values.detach().float()
    if w.dim() == 1:
        mean = w.mean()
    else:
        m = torch.ones_like(w) if mask is None else mask.to(w.dtype)
        mean = (w * m).sum() / m.sum().clamp(min=1)
    return _per_sample(base + beta * (mean - w), mask)


def normalise_weights(raw: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Scale to mean 1 over the batch, blend with uniform weights by ``strength``, detach."""
    raw = raw.detach().float()
    mean = raw.mean()
    if not torch.isfinite(mean) or mean <= 0:
        return torch.ones_like(raw)
    return 1 + strength * (raw / mean - 1)


def _logit(p: float) -> float:
    p = min(max(p, 1e-3), 1 - 1e-3)
    return math.log(p / (1 - p))


class GlobalTemperature(nn.Module):
    """One learnable temperature: ``low + (high - low) · sigmoid(raw)``."""

    def __init__(self, low: float, high: float, init: float):
        super().__init__()
        self.low, self.high = low, high
        self.raw = nn.Parameter(torch.tensor(_logit((init - low) / (high - low))))

    def forward(self) -> torch.Tensor:
        return self.low + (self.high - self.low) * torch.sigmoid(self.raw)


class InstanceTemperature(nn.Module):
    """A temperature per sample from an MLP on [teacher logits, student logits] (detached inputs).

    The output layer starts at zero weights and a bias that gives ``init``, so
    every sample starts at the same temperature and the MLP learns to spread them.
    """

    def __init__(self, num_classes: int, hidden: int, low: float, high: float, init: float, generator: torch.Generator):
        super().__init__()
        self.low, self.high = low, high
        # skip_init: no draw from the global RNG (a run with this plugin keeps the student's dropout stream).
        self.hidden = nn.utils.skip_init(nn.Linear, 2 * num_classes, hidden)
        self.out = nn.utils.skip_init(nn.Linear, hidden, 1)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.randn(hidden, 2 * num_classes, generator=generator) / math.sqrt(2 * num_classes))
            self.hidden.bias.zero_()
            self.out.weight.zero_()
            self.out.bias.fill_(_logit((init - low) / (high - low)))

    def forward(self, teacher_logits: torch.Tensor, student_logits: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        dtype = self.out.weight.dtype
        x = torch.cat([teacher_logits.detach().to(dtype), student_logits.detach().to(dtype)], dim=-1)
        raw = self.out(F.gelu(self.hidden(x))).squeeze(-1)
        return self.low + (self.high - self.low) * torch.sigmoid(_per_sample(raw, mask))


class AdaptiveTemperature:
    """Scheduled, per-sample (entropy, flsw, cwsm) or learned (CTKD) KD temperatures, and flsw/cwsm sample weights."""

    polydistill_api = polydistill.API_VERSION
    Settings = Settings

    def __init__(self, settings: Settings | None = None):
        self.settings = settings = settings if settings is not None else Settings()
        self.start = settings.start
        self.horizon: int | None = settings.steps
        self.lambda_horizon: int | None = settings.lambda_steps
        self.module: nn.Module | None = None
        self._used: list[dict[str, float]] = []
        self._weights: list[dict[str, float]] = []
        self._lambda: float | None = None

    # ------------------------------------------------------------------ values by step

    @property
    def end(self) -> float:
        return self.settings.end if self.settings.end is not None else self._start()

    def _start(self) -> float:
        return self.start if self.start is not None else _DEFAULT_START

    def temperature_at(self, step: int) -> float:
        """The scheduled temperature of the step with 0-based index ``step`` (``state.step`` during that step)."""
        s, start = self.settings, self._start()
        if s.schedule == "constant" or step < s.warmup_steps:
            return start
        span = (self.horizon or 1) - 1 - s.warmup_steps
        p = 1.0 if span <= 0 else min(1.0, (step - s.warmup_steps) / span)
        if s.schedule == "linear":
            return start + (self.end - start) * p
        return self.end + (start - self.end) * (1 + math.cos(math.pi * p)) / 2

    def lambda_at(self, step: int) -> float:
        """Gradient-reversal strength of step ``step``: cosine increase from lambda_min to lambda_max (CTKD)."""
        s = self.settings
        span = (self.lambda_horizon or 1) - 1
        p = 1.0 if span <= 0 else min(1.0, step / span)
        return s.lambda_min + (s.lambda_max - s.lambda_min) * (1 - math.cos(math.pi * p)) / 2

    # ------------------------------------------------------------------ lifecycle

    @hookimpl
    def trainable_modules(self, state: Any) -> dict[str, polydistill.Trainable] | None:
        s = self.settings
        if not state.teachers:
            raise ConfigError(f"plugins.{NAME}: the KD temperature needs a teacher, and the run has none")
        if not state.task_def.class_logits:
            raise ConfigError(f"plugins.{NAME}: task {state.task} has no class logits, so there is no KL temperature or flsw/cwsm weight")
        if self.start is None:
            kd = state.settings("kd")
            self.start = float(getattr(kd, "temperature", _DEFAULT_START))
            if not s.min_temperature <= self.start <= s.max_temperature:
                raise ConfigError(
                    f"plugins.{NAME}.start: kd's temperature {self.start} is outside [min_temperature, max_temperature] = "
                    f"[{s.min_temperature}, {s.max_temperature}]; give start or widen the bounds"
                )
        if self.horizon is None:
            self.horizon = state.total_steps
        if self.lambda_horizon is None:
            self.lambda_horizon = state.total_steps
        if s.schedule != "constant" and s.warmup_steps >= self.horizon:
            raise ConfigError(
                f"plugins.{NAME}.warmup_steps: {s.warmup_steps} is not below the schedule's {self.horizon} steps, "
                "so the temperature would never leave start"
            )
        if s.learnable == "global":
            self.module = GlobalTemperature(s.min_temperature, s.max_temperature, self._start())
        elif s.learnable == "instance":
            classes = len(state.labels) if state.labels else state.teachers[0].config.num_labels
            self.module = InstanceTemperature(classes, s.mlp_hidden, s.min_temperature, s.max_temperature, self._start(), state.rng(0xA7))
        if self.module is None:
            return None
        # Its own parameter group: at a transformer's learning rate the temperature would hardly move. No weight
        # decay: AdamW decays by lr·weight_decay per step, and a decay chosen for the student's rate is far too strong here.
        return {"temperature": polydistill.Trainable(
            self.module, learning_rate=s.temperature_lr, weight_decay=0.0, max_grad_norm=s.temperature_max_grad_norm
        )}

    @hookimpl
    def state_dict(self, state: Any) -> dict[str, Any]:
        # The learned temperature's weights are checkpointed by the core (trainable_modules).
        return {"horizon": self.horizon, "lambda_horizon": self.lambda_horizon, "start": self.start}

    @hookimpl
    def load_state_dict(self, state: Any, plugin_state: dict[str, Any]) -> None:
        # A resumed run keeps the schedule it started with, even when training.max_steps changed,
        # unless the config now fixes the lengths itself.
        if self.settings.steps is None:
            self.horizon = plugin_state["horizon"]
        if self.settings.lambda_steps is None:
            self.lambda_horizon = plugin_state["lambda_horizon"]

    # ------------------------------------------------------------------ each step

    @hookimpl
    def augment_batch(self, batch: Any, state: Any) -> Any:
        step = state.step
        base = self.temperature_at(step)
        lam = self.lambda_at(step) if self.module is not None else None

        def temperature(student_out: Any, teacher_out: Any) -> Any:
            return self._temperature(student_out, teacher_out, base, lam)

        def sample_weights(student_out: Any, teacher_out: Any) -> torch.Tensor:
            return self._sample_weights(student_out, teacher_out)

        weights = sample_weights if self.settings.weighting != "off" else None
        try:  # kd multiplies these weights with any other plugin's
            return batch.with_hints(NAME, temperature=temperature, sample_weights=weights)
        except polydistill.PluginError as exc:
            raise ConfigError(f"plugins.{NAME}: {exc}") from None

    def _temperature(self, student_out: Any, teacher_out: Any, base: float, lam: float | None) -> Any:
        s = self.settings
        mask = _mask(student_out, teacher_out)
        if s.learnable == "global":
            value = reverse_gradient(self.module(), lam)
        elif s.learnable == "instance":
            value = reverse_gradient(self.module(teacher_out.logits, student_out.logits, mask), lam)
        elif s.per_sample == "entropy":
            h = normalised_entropy(teacher_out.logits.detach(), mask)
            factor = s.scale_confident + (s.scale_uncertain - s.scale_confident) * h
            value = (base * factor).clamp(s.min_temperature, s.max_temperature)
        elif s.per_sample != "off":  # flsw, cwsm
            values = self._values(s.per_sample, student_out, teacher_out)
            value = dynamic_temperature(values, base, s.beta, mask).clamp(s.min_temperature, s.max_temperature)
        else:
            value = base
        t = torch.as_tensor(value, dtype=torch.float32).detach()
        # the same reduction kd uses for kd/temperature, so both logs agree
        self._used.append({"mean": float(t.mean()), "min": float(t.min()), "max": float(t.max()), "base": base, "lambda": lam})
        return value

    def _values(self, kind: str, student_out: Any, teacher_out: Any) -> torch.Tensor:
        """Detached flsw or cwsm values per logit vector: ``(B,)``, or ``(B, W)`` for token tasks."""
        s = self.settings
        with torch.no_grad():
            student, teacher = student_out.logits.detach(), teacher_out.logits.detach()
            if kind == "flsw":
                return flsw_values(student, teacher, s.flsw_gamma)
            return cwsm_values(student if s.cwsm_confidence == "student" else teacher)

    def _sample_weights(self, student_out: Any, teacher_out: Any) -> torch.Tensor:
        s = self.settings
        mask = _mask(student_out, teacher_out)
        with torch.no_grad():
            raw = _per_sample(self._values(s.weighting.removesuffix("_weight"), student_out, teacher_out), mask)
            w = normalise_weights(raw, s.weighting_strength)
            self._weights.append({"min": float(w.min()), "max": float(w.max()), "std": float(w.std(unbiased=False))})
        return w

    @hookimpl
    def on_step_end(self, state: Any, logs: dict[str, float]) -> None:
        s, used, weights = self.settings, self._used, self._weights
        if used:
            logs[f"{NAME}/temperature"] = sum(u["mean"] for u in used) / len(used)
            if s.per_sample != "off" or s.learnable == "instance":
                logs[f"{NAME}/temperature_min"] = min(u["min"] for u in used)
                logs[f"{NAME}/temperature_max"] = max(u["max"] for u in used)
            if s.per_sample != "off":
                logs[f"{NAME}/base"] = used[-1]["base"]
            if s.learnable != "off":
                logs[f"{NAME}/lambda"] = used[-1]["lambda"]
        if weights:
            logs[f"{NAME}/weight_min"] = min(w["min"] for w in weights)
            logs[f"{NAME}/weight_max"] = max(w["max"] for w in weights)
            logs[f"{NAME}/weight_std"] = sum(w["std"] for w in weights) / len(weights)
        used.clear()
        weights.clear()


def _mask(student_out: Any, teacher_out: Any) -> torch.Tensor | None:
    """Valid words for token tasks (as kd's KL term counts them), None for sequence tasks."""
    mask = student_out.word_mask
    if mask is not None and teacher_out.word_mask is not None:
        mask = mask & teacher_out.word_mask
    return mask
