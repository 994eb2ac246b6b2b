"""The task protocol: everything that differs by task, with the sequence-level defaults."""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Iterable, Protocol

import numpy as np
import torch

from polydistill.batch import Batch, ModelOutputs
from polydistill.errors import ConfigError


class Predict(Protocol):
    """The evaluated model, over a dataset in batches: ``predict(dataset)`` gives (batch, outputs) of its
    forward pass; ``predict.generate(dataset)`` (batch, generated texts) with ``config.generation``'s decoding.
    ``tokenizer`` is the model's, ``doc_stride`` the run's ``data.doc_stride``."""

    tokenizer: Any
    doc_stride: int

    def __call__(self, dataset: Any) -> Iterable[tuple[Batch, ModelOutputs]]: ...

    def generate(self, dataset: Any) -> Iterable[tuple[Batch, list[str]]]: ...


def _spread(row: np.ndarray, width: int | None) -> np.ndarray:
    """A cached top-k row ``(W, 2k)`` as log-probabilities over ``width`` classes ``(W, width)``."""
    if width is None:
        raise ValueError("top-k teacher outputs need the number of classes to rebuild")
    k = row.shape[-1] // 2
    ids, logp = row[:, :k].astype(np.int64), row[:, k:]
    rest = np.clip(1.0 - np.exp(logp).sum(-1, keepdims=True), 1e-12, None) / max(width - k, 1)
    logp = np.where(np.isfinite(logp), logp, np.log(rest))  # slots of tokens never drawn (top_k_method: sample)
    out = np.broadcast_to(np.log(rest), (row.shape[0], width)).astype(np.float32).copy()
    np.put_along_axis(out, ids, logp.astype(np.float32), axis=-1)
    return out


def _sampled(logp: torch.Tensor, draws: int) -> torch.Tensor:
    """Log-frequencies of ``draws`` tokens drawn from each distribution of ``logp`` ``(..., V)``: an unbiased
    estimate of it (-inf: not drawn). The generator is seeded, so a batch's draws are the same in every run."""
    flat = logp.reshape(-1, logp.size(-1)).exp()
    generator = torch.Generator(device=flat.device).manual_seed(0)
    picks = torch.multinomial(flat, draws, replacement=True, generator=generator)
    counts = torch.zeros_like(flat).scatter_add_(1, picks, torch.ones_like(picks, dtype=flat.dtype))
    return (counts / draws).log().view_as(logp)


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
    #: Outputs are distributions over a vocabulary, too large to cache whole: only with ``cache.top_k``.
    cache_needs_top_k: ClassVar[bool] = False
    #: The forward pass needs the per-layer hidden states (e.g. to pool the last one).
    needs_hidden_states: ClassVar[bool] = False
    #: Why mode 'parallel' cannot train this task; None: it can.
    parallel_refusal: ClassVar[str | None] = None
    #: Evaluation compares the student with the first teacher (``outputs.extra["reference"]``).
    compares_with_teacher: ClassVar[bool] = False
    #: The metric tables show first.
    primary_metric: ClassVar[str] = ""
    #: Rows pair ``text`` with a ``columns.context`` passage (question answering): texts reach :meth:`encode`
    #: as ``(text, context)`` pairs.
    reads_context: ClassVar[bool] = False
    #: The column evaluation reads besides ``text`` (``"label"``, ``"source"``, ``"target"``); ``eval_column_why`` says why.
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

    def save_files(self, directory: Any, state: Any) -> list[str]:
        """Write what the saved student needs besides its weights and tokenizer (``directory``: the student folder
        being built); returns lines for the model card's usage section. Default: nothing."""
        return []

    def check_teachers(self, names: list[str], same_tokens: list[bool]) -> None:
        """Refuse teachers the task cannot learn from (``same_tokens[i]``: teacher ``i`` reads the student's tokens).

        A ``per_token`` task refuses teachers that read other tokens.
        """
        other = [name for name, same in zip(names, same_tokens) if not same]
        if self.per_token and other:
            raise ConfigError(
                f"teachers: {self.name} distils per-token distributions over one vocabulary, but {', '.join(other)} reads "
                "other tokens than the student (another tokenizer); use teachers with the student's tokenizer, a "
                "student built from the teacher (student.config with base: the teacher, or student.from_teacher)"
                + (", or a cross-tokenizer term (plugins.kd.uld)" if self.cache_needs_top_k else "")
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

    def target_error(self, value: Any) -> str | None:
        """What a ``columns.target`` cell should be, when ``value`` is not that (None: it is)."""
        return None if isinstance(value, str) else "a string"

    def prepare_data(self, dataset: Any, tokenizer: Any, max_length: int, doc_stride: int) -> Any:
        """The training rows as the samples batches are made of (``tokenizer``: the student's); by default
        the rows themselves. Question answering cuts long contexts into windows here."""
        return dataset

    def encode(self, tokenizer: Any, texts: list[Any], max_length: int, padding: str,
               targets: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        """A batch's texts (and ``targets``, generative tasks) for one model: its inputs, the positions outputs
        are read at ``(B, W)`` (-1: none; None for sequence-level tasks) and labels that come from the text
        itself (None: from the label column)."""
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=padding, return_tensors="pt")
        return {k: v for k, v in enc.items() if k in tokenizer.model_input_names}, None, None

    def trim_padding(self, inputs: dict[str, torch.Tensor], words: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Drop the input columns that are padding in every row (left or right), shifting the read positions
        alike (a subset of a batch, run for the cache, is then padded as it would be on its own)."""
        mask = inputs["attention_mask"]
        used = mask.bool().any(0).nonzero().flatten()
        if not len(used):
            return inputs, words
        lo, hi = int(used[0]), int(used[-1]) + 1
        inputs = {k: v[:, lo:hi] if v.shape == mask.shape else v for k, v in inputs.items()}
        if words is not None and lo:
            words = torch.where(words >= 0, words - lo, words)
        return inputs, words

    def row_labels(self, value: Any) -> list[Any]:
        """The labels in one row's label cell."""
        return [value]

    def encode_labels(self, raw: list[Any], texts: list[Any], label_id: Callable[[Any], int]) -> torch.Tensor | None:
        """A batch's gold labels as ids (None for a task without labels)."""
        if not self.named_labels:
            return None
        return torch.tensor([label_id(v) for v in raw], dtype=torch.long)

    # ------------------------------------------------------------------ teacher outputs

    def cache_rows(self, out: ModelOutputs, top_k: int | None = None, sample: bool = False) -> list[np.ndarray]:
        """One array per sample of a teacher's final output, as the cache stores it: word-level outputs hold
        the words that survive max_length, in order; with ``top_k`` (distributions over a vocabulary),
        ``top_k`` token ids and their log-probabilities per position, ``(W, 2 * top_k)``: the most likely
        tokens, or with ``sample`` the tokens of ``top_k`` draws (seeded) and their frequencies among them."""
        value = getattr(out, self.output_field).float()
        if top_k is not None:
            logp = torch.log_softmax(value, dim=-1)
            k = min(top_k, logp.size(-1))
            if sample:
                logp = _sampled(logp, k)
            top = logp.topk(k, dim=-1)
            value = torch.cat([top.indices.float(), top.values], dim=-1)  # ids are exact in float32 below 2**24
        array = value.cpu().numpy()
        if not self.word_level:
            return list(array)
        keep = out.word_mask.cpu().numpy()
        return [v[m] for v, m in zip(array, keep)]

    def from_cache(self, rows: list[np.ndarray], words: torch.Tensor | None, device: Any, width: int | None = None,
                   top_k: int | None = None) -> ModelOutputs:
        """Teacher outputs from cached rows (``words``: the teacher's read positions, word-level tasks).

        Top-k rows become full distributions over ``width`` classes: the kept log-probabilities, and the
        rest of the mass spread evenly over the other classes.
        """
        from polydistill.cache import stack_padded

        if top_k is not None:
            rows = [_spread(r, width) for r in rows]
        if not self.word_level:
            return ModelOutputs(**{self.output_field: stack_padded(rows, device)})
        # A row holds its surviving words only; each goes back to its word's place, as
        # wide as the batch's word positions (its longest sentence, cut or not).
        assert words is not None
        mask = words >= 0
        values = torch.zeros(*mask.shape, rows[0].shape[-1], device=device)
        for row, data in enumerate(rows):
            values[row, mask[row]] = torch.tensor(data, dtype=torch.float32, device=device)
        return ModelOutputs(**{self.output_field: values}, word_mask=mask)

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
