"""The objects hooks exchange: a training batch and its loss hints, a model's outputs, a trainable plugin module."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from polydistill.errors import PluginError

Encoding = dict[str, torch.Tensor]


def _to(value: Any, device: Any, non_blocking: bool) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=non_blocking)
    if isinstance(value, dict):
        return {k: _to(v, device, non_blocking) for k, v in value.items()}
    if isinstance(value, list):
        return [_to(v, device, non_blocking) for v in value]
    return value


@dataclass(frozen=True)
class LossHints:
    """Per-sample hints the loss terms follow, set by plugins before the terms run (API 1.2).

    Set through :meth:`Batch.with_hints`, read through :meth:`Batch.loss_hints`.
    Combining: one temperature (a second plugin setting it is an error);
    sample weights multiply. Each value is a number, a ``(B,)`` tensor (it may
    carry gradients, e.g. a learned temperature) or a callable
    ``f(student_out, teacher_out)`` returning one (values that depend on the
    step's outputs).
    """

    #: The KD temperature (None: the loss plugin's own) and the plugin that set it.
    temperature: Any = None
    temperature_by: str | None = None
    #: Factors of each sample's weight, and the plugin that set each.
    weights: tuple[Any, ...] = ()
    weights_by: tuple[str, ...] = ()

    def add(self, by: str, temperature: Any = None, sample_weights: Any = None) -> LossHints:
        """These hints with ``by``'s temperature and/or weight factor added."""
        hints = self
        if temperature is not None:
            if self.temperature is not None:
                raise PluginError(f"the KD temperature is set twice: by '{self.temperature_by}' and by '{by}'; only one "
                                  "plugin may choose it (disable one, or leave its temperature out)", plugin=by)
            hints = dataclasses.replace(hints, temperature=temperature, temperature_by=by)
        if sample_weights is not None:
            hints = dataclasses.replace(hints, weights=(*hints.weights, sample_weights), weights_by=(*hints.weights_by, by))
        return hints

    def resolve_temperature(self, student_out: Any, teacher_out: Any, default: Any) -> Any:
        """The temperature (computed when callable), or ``default`` when no plugin set one."""
        value = self.temperature
        if value is None:
            return default
        return value(student_out, teacher_out) if callable(value) else value

    def resolve_weights(self, student_out: Any, teacher_out: Any, size: int) -> torch.Tensor | None:
        """The product of the weight factors as a ``(size,)`` tensor, each checked (None: no factor)."""
        total = None
        for value, by in zip(self.weights, self.weights_by):
            if callable(value):
                value = value(student_out, teacher_out)
            w = torch.as_tensor(value)
            if not w.is_floating_point():
                w = w.float()
            if w.dim() == 0:
                w = w.expand(size)
            if tuple(w.shape) != (size,):
                raise PluginError(f"sample weights set by '{by}' must hold one weight per sample, shape ({size},); got "
                                  f"shape {tuple(w.shape)}", plugin=by)
            if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
                raise PluginError(f"sample weights set by '{by}' must be finite and >= 0; got {w.detach().cpu().tolist()}", plugin=by)
            total = w if total is None else total * w.to(total.device)
        return total


@dataclass
class Batch:
    """One batch of examples, encoded for the student and for each teacher.

    ``texts`` is what the student reads and ``teacher_texts`` what the teachers
    read (the same list outside parallel mode); for token tasks each text is a
    list of words. ``teacher_inputs[i]`` is the encoding for teacher ``i`` and
    is the very same dict as ``student_inputs`` when both share tokenizer and
    text. ``labels`` are class ids ``(B,)``, word-level tag ids ``(B, W)``
    padded with -100, or None. ``student_words`` / ``teacher_words[i]`` map
    each word to its first sub-word position ``(B, W)``, -1 for padding (token
    tasks only). ``hints``: the per-sample :class:`LossHints` plugins set for the
    loss terms (:meth:`with_hints`). ``meta`` is free space for plugins.
    """

    texts: list[Any]
    teacher_texts: list[Any]
    langs: list[str]
    student_inputs: Encoding
    teacher_inputs: list[Encoding]
    labels: torch.Tensor | None = None
    student_words: torch.Tensor | None = None
    teacher_words: list[torch.Tensor | None] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    encoder: Callable[..., Batch] | None = field(default=None, repr=False, compare=False)
    hints: LossHints = field(default_factory=LossHints)
    #: Each example's ``columns.target``, else None: the text it learns to produce (generative tasks), or
    #: question answering's answer in its window (``{"text", "start"}``).
    targets: list[Any] | None = None

    def __post_init__(self) -> None:
        if not self.teacher_words:
            self.teacher_words = [None] * len(self.teacher_inputs)

    def __len__(self) -> int:
        return len(self.texts)

    @property
    def device(self) -> torch.device:
        return next(iter(self.student_inputs.values())).device

    def to(self, device: Any, non_blocking: bool = False) -> Batch:
        """Move every tensor to ``device`` (accelerate calls this)."""
        moved = {
            f.name: _to(getattr(self, f.name), device, non_blocking)
            for f in dataclasses.fields(self)
            if f.name not in ("encoder", "texts", "teacher_texts", "langs", "meta", "hints", "targets")
        }
        shared = [t is self.student_inputs for t in self.teacher_inputs]
        moved["teacher_inputs"] = [
            moved["student_inputs"] if s else t for s, t in zip(shared, moved["teacher_inputs"])
        ]
        return dataclasses.replace(self, **moved)

    def replace_texts(
        self,
        texts: list[Any] | None = None,
        teacher_texts: list[Any] | None = None,
        targets: list[Any] | None = None,
        **meta: Any,
    ) -> Batch:
        """Return a new batch with changed texts (or, generative tasks, ``targets``), re-encoded for every model.

        In ``same`` mode, changing ``texts`` alone changes what the teachers
        read too, so teacher and student keep reading the same input.
        """
        if self.encoder is None:
            raise RuntimeError("this batch has no encoder; it was not built by polydistill's collator")
        same = self.teacher_texts is self.texts
        new_texts = list(texts) if texts is not None else self.texts
        if teacher_texts is not None:
            new_teacher = list(teacher_texts)
        else:
            new_teacher = new_texts if same else self.teacher_texts
        if len(new_texts) != len(self) or len(new_teacher) != len(self):
            raise ValueError(f"replace_texts: expected {len(self)} texts, got {len(new_texts)} and {len(new_teacher)}")
        if same and teacher_texts is not None and list(teacher_texts) != new_texts:
            raise ValueError("replace_texts: in mode 'same' teacher and student read one text; pass texts= only")
        if self.labels is not None and self.labels.dim() == 2:  # word-level labels of word lists must keep aligning
            for i, (old, new) in enumerate(zip(self.texts, new_texts)):
                if isinstance(old, (list, tuple)) and len(old) != len(new):
                    raise ValueError(f"replace_texts: row {i} has {len(new)} words instead of {len(old)}; token labels would no longer align")
        if targets is not None and (self.targets is None or len(targets) != len(self)):
            raise ValueError(f"replace_texts: targets= needs a batch with targets, one per example ({len(self)})")
        batch = self.encoder(new_texts, new_teacher, self.langs, self.labels, {**self.meta, **meta},
                             self.targets if targets is None else list(targets))
        batch.hints = self.hints
        return batch.to(self.device)

    def with_hints(self, by: str, temperature: Any = None, sample_weights: Any = None) -> Batch:
        """This batch with plugin ``by``'s loss hints added (see :class:`LossHints`): a temperature
        (one plugin may set it) and/or a factor of the sample weights (factors multiply). Since API 1.2."""
        if temperature is not None:
            self.loss_hints().add(by, temperature)  # refuses a second temperature, an API 1.1 plugin's included
        return dataclasses.replace(self, hints=self.hints.add(by, temperature, sample_weights))

    def loss_hints(self) -> LossHints:
        """The hints loss terms follow: :attr:`hints`, and what an API 1.1 plugin put in
        ``meta["temperature"]`` / ``meta["sample_weights"]`` (read as if set through :meth:`with_hints`)."""
        hints = self.hints
        if self.meta.get("temperature") is not None or self.meta.get("sample_weights") is not None:
            hints = hints.add("batch.meta", self.meta.get("temperature"), self.meta.get("sample_weights"))
        return hints


@dataclass
class ModelOutputs:
    """A model's outputs in the form loss terms use.

    ``logits``: ``(B, C)`` for sequence classification, ``(B, W, C)`` word-level
    for token classification (first sub-word of each word). ``embeddings``:
    pooled sentence embeddings ``(B, H)``. ``hidden_states`` and ``attentions``:
    per-layer tuples as transformers returns them (only when a plugin asked
    for them through ``state.need_hidden_states``/``need_attentions``).
    ``mask``: ``(B, T)`` attention mask for hidden states; ``word_mask``:
    ``(B, W)`` valid words for token logits.
    """

    logits: torch.Tensor | None = None
    embeddings: torch.Tensor | None = None
    hidden_states: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    mask: torch.Tensor | None = None
    word_mask: torch.Tensor | None = None
    #: ``(B,)`` bool, teacher outputs only: the samples whose ``hidden_states`` and
    #: ``attentions`` come from a teacher that teaches them (per-layer outputs are
    #: one teacher's; a sample routed to other teachers must not learn them). None: all.
    layer_mask: torch.Tensor | None = None
    #: ``(B,)`` bool, teacher outputs only: the samples these outputs teach at all (a
    #: teacher-selection plugin may leave some untaught). Teacher terms leave the others
    #: out; terms on gold labels (``ce``) keep them. None: all.
    sample_mask: torch.Tensor | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Trainable:
    """A module from ``trainable_modules`` with its own optimizer settings.

    A bare module joins the student's parameter groups: its learning rate,
    weight decay and gradient clipping. Wrapped in ``Trainable`` it gets a
    parameter group of its own: ``learning_rate`` and ``weight_decay`` (None:
    the student's), and its gradient norm clipped on its own at
    ``max_grad_norm`` (None: not clipped), never together with the student's.
    The learning-rate schedule (warm-up, decay) scales every group alike.
    Since API 1.2.
    """

    module: Any
    learning_rate: float | None = None
    weight_decay: float | None = None
    max_grad_norm: float | None = None

    def __post_init__(self) -> None:
        for name in ("learning_rate", "max_grad_norm"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"Trainable.{name} must be > 0, got {value}")
        if self.weight_decay is not None and self.weight_decay < 0:
            raise ValueError(f"Trainable.weight_decay must be >= 0, got {self.weight_decay}")
