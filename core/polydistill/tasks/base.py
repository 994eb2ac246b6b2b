"""The task protocol: everything that differs by task, with the sequence-level defaults."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Protocol

import numpy as np
import torch

from polydistill.batch import Batch, ModelOutputs
from polydistill.errors import ConfigError

class Predict(Protocol):
    """The evaluated model, over a dataset in batches: ``predict(dataset)`` gives (batch, outputs) of its
    forward pass; ``predict.generate(dataset)`` (batch, generated texts) with ``config.generation``'s decoding."""

    def __call__(self, dataset: Any) -> Iterable[tuple[Batch, ModelOutputs]]: ...

    def generate(self, dataset: Any) -> Iterable[tuple[Batch, list[str]]]: ...


class Task:
    """One task: its models, labels, outputs, cache entries, default fusion and metrics.

    Subclass it, set the class attributes and implement :meth:`read_outputs` and
    :meth:`evaluate`; register the class under the entry-point group
    ``polydistill.tasks`` with its ``name``. The defaults are those of a
    sequence-level task whose final output is the ``output_field`` of
    :class:`~polydistill.ModelOutputs`.

    Plugins ask a task what it has (``state.task_def``): ``class_logits`` (outputs
    hold logits over classes, or over the vocabulary, and batches gold ids),
    ``named_labels`` (the classes are the run's ``labels``), ``word_level``
    (outputs are per word or per target token, ``(B, W, ...)`` with a
    ``word_mask``), ``text_is_words`` (texts are lists of words), ``per_token``
    (positions are the student's tokens: teachers must read the same tokens)
    and ``output_field`` (the field that holds a model's final output: what the
    cache stores and fusion averages).
    """

    #: The config's ``task`` value and the entry point's name.
    name: ClassVar[str] = ""
    #: One sentence for the config reference.
    description: ClassVar[str] = ""
    #: The transformers Auto class models load with (``"AutoModel"``).
    auto_class: ClassVar[str] = "AutoModel"
    #: Architecture suffix of a checkpoint with this task's head (``"ForTokenClassification"``); None: no head.
    head: ClassVar[str | None] = None
    class_logits: ClassVar[bool] = False
    named_labels: ClassVar[bool] = False
    word_level: ClassVar[bool] = False
    text_is_words: ClassVar[bool] = False
    per_token: ClassVar[bool] = False
    output_field: ClassVar[str] = "logits"
    #: Whether the task reads ``columns.target`` (the text a generative model produces): "no", "optional", "required".
    reads_target: ClassVar[str] = "no"
    #: Why teacher outputs of this task are not cached; None: they are.
    cache_refusal: ClassVar[str | None] = None
    #: The forward pass needs the per-layer hidden states (e.g. to pool the last one).
    needs_hidden_states: ClassVar[bool] = False
    #: Why mode 'parallel' cannot train this task; None: it can.
    parallel_refusal: ClassVar[str | None] = None
    #: Evaluation compares the student with the first teacher (``outputs.extra["reference"]``).
    compares_with_teacher: ClassVar[bool] = False
    #: The metric tables show first.
    primary_metric: ClassVar[str] = ""
    #: The column evaluation reads besides ``text`` (``"label"`` or ``"source"``); ``eval_column_why`` says why.
    eval_column: ClassVar[str] = "label"

    @property
    def eval_column_why(self) -> str:
        return f"evaluating {self.name} needs the gold labels' column"

    def __repr__(self) -> str:
        return f"<task {self.name}>"

    # ------------------------------------------------------------------ models

    def model_class(self) -> Any:
        import transformers

        return getattr(transformers, self.auto_class)

    def prepare_tokenizer(self, tokenizer: Any, role: str) -> Any:
        """The tokenizer as the task needs it (e.g. with a padding token)."""
        return tokenizer

    def check_teachers(self, names: list[str], same_tokens: list[bool]) -> None:
        """Refuse teachers the task cannot learn from (``same_tokens[i]``: teacher ``i`` reads the student's tokens).

        A ``per_token`` task refuses teachers that read other tokens.
        """
        other = [name for name, same in zip(names, same_tokens) if not same]
        if self.per_token and other:
            raise ConfigError(
                f"teachers: {self.name} distils per-token distributions over one vocabulary, but {', '.join(other)} reads "
                "other tokens than the student (another tokenizer); use teachers with the student's tokenizer, or a "
                "student built from the teacher (student.config with base: the teacher, or student.from_teacher)"
            )

    def label_config(self, labels: list[str] | None) -> dict[str, Any]:
        """Model config fields that set ``labels`` (none for a task without named labels)."""
        if not self.named_labels or not labels:
            return {}
        return {
            "num_labels": len(labels),
            "id2label": dict(enumerate(labels)),
            "label2id": {name: i for i, name in enumerate(labels)},
        }

    def read_outputs(self, out: Any, result: ModelOutputs, words: torch.Tensor | None, pooling: str) -> None:
        """Fill ``result``'s task fields from a transformers output ``out`` (``result.mask`` is set)."""
        raise NotImplementedError(f"task {self.name}: read_outputs")

    def generation_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
        """What ``model.generate`` reads of a batch's encoding, for a task whose targets a model can decode
        from its inputs alone (seq2seq); None: the task's models do not generate targets."""
        return None

    # ------------------------------------------------------------------ data

    def encode(self, tokenizer: Any, texts: list[Any], max_length: int, padding: str,
               targets: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """A batch's texts (and ``targets``, generative tasks) for one model: its inputs, the positions outputs
        are read at ``(B, W)`` (-1: none; None for sequence-level tasks) and labels that come from the text
        itself (None: from the label column)."""
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=padding, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in tokenizer.model_input_names}, None, None

    def row_labels(self, value: Any) -> list[Any]:
        """The labels in one row's label cell."""
        return [value]

    def encode_labels(self, raw: list[Any], texts: list[Any], label_id: Callable[[Any], int]) -> torch.Tensor | None:
        """A batch's gold labels as ids (None for a task without labels)."""
        if not self.named_labels:
            return None
        return torch.tensor([label_id(v) for v in raw], dtype=torch.long)

    # ------------------------------------------------------------------ teacher outputs

    def cache_rows(self, out: ModelOutputs) -> list[np.ndarray]:
        """One array per sample of a teacher's final output, as the cache stores it."""
        return list(getattr(out, self.output_field).float().cpu().numpy())

    def from_cache(self, rows: list[np.ndarray], words: torch.Tensor | None, device: Any) -> ModelOutputs:
        """Teacher outputs from cached rows (``words``: the teacher's word positions, word-level tasks)."""
        from polydistill.cache import stack_padded

        return ModelOutputs(**{self.output_field: stack_padded(rows, device)})

    def fuse(self, outs: dict[int, ModelOutputs], weights: torch.Tensor, batch_size: int) -> ModelOutputs:
        """The weighted sum of the final outputs of the teachers in ``outs`` (weights ``(n,)`` or ``(B, n)``).

        A sample whose weights are all 0 is left out through ``sample_mask``.
        """
        active = list(outs)
        values = {i: getattr(outs[i], self.output_field) for i in active}
        shape = (batch_size, *[1] * (values[active[0]].dim() - 1))
        scale = {i: (weights[..., i].view(shape) if weights[..., i].dim() else weights[..., i]) for i in active}
        fused = ModelOutputs(**{self.output_field: sum(scale[i] * values[i] for i in active)})
        if weights.dim() == 2:  # per sample
            taught = (weights != 0).any(-1)
            if not bool(taught.all()):
                fused.sample_mask = taught
        return fused

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, predict: Predict, dataset: Any, labels: list[str] | None, max_length: int) -> dict[str, Any]:
        """Score per language: ``{"per_language": {lang: {metric: value}}}`` and any extra fields."""
        raise NotImplementedError(f"task {self.name}: evaluate")
