"""Evaluation of one model per language, with the metrics of its task."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from polydistill import metrics as M
from polydistill.batch import Batch, ModelOutputs
from polydistill.data import Collator, Loader
from polydistill.models import forward
from polydistill.tasks import Task, get_task


class _Predictor:
    """:class:`~polydistill.tasks.base.Predict` for one model: forward passes and decoding in batches."""

    def __init__(self, model: Any, tokenizer: Any, collator: Collator, task: Task, batch_size: int, pooling: str,
                 device: Any, generation: dict[str, Any], progress: bool, reference: Any = None, doc_stride: int = 32):
        self.model, self.tokenizer, self.collator, self.task = model, tokenizer, collator, task
        self.doc_stride = doc_stride
        self.batch_size, self.pooling, self.device = batch_size, pooling, device
        self.generation, self.progress, self.reference = generation, progress, reference

    def _batches(self, ds: Any, what: str) -> Iterable[Batch]:
        loader = Loader(ds, self.collator, self.batch_size, seed=0, shuffle=False, group=True)
        if not self.progress:
            return loader.iterate()
        from tqdm.auto import tqdm

        return tqdm(loader.iterate(), total=len(loader), desc=what, unit="batch", dynamic_ncols=True, leave=False)

    def __call__(self, ds: Any) -> Iterable[tuple[Batch, ModelOutputs]]:
        for batch in self._batches(ds, "eval"):
            batch = batch.to(self.device)
            out = forward(self.model, batch.student_inputs, self.task, batch.student_words, self.pooling)
            if self.reference is not None:  # the model it is compared with, on the same inputs
                out.extra["reference"] = forward(self.reference, batch.student_inputs, self.task, batch.student_words, self.pooling)
            yield batch, out

    def generate(self, ds: Any) -> Iterable[tuple[Batch, list[str]]]:
        settings = {k: v for k, v in self.generation.items() if k in ("num_beams", "max_new_tokens")}
        for batch in self._batches(ds, "decode"):
            batch = batch.to(self.device)
            inputs = self.task.generation_inputs(batch.student_inputs)
            if inputs is None:
                raise ValueError(f"task {self.task.name}: its models do not generate targets (Task.generation_inputs)")
            out = self.model.generate(**inputs, **settings, do_sample=False)
            yield batch, self.tokenizer.batch_decode(out, skip_special_tokens=True)


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    task: str | Task,
    labels: list[str] | None = None,
    max_length: int = 128,
    batch_size: int = 64,
    pooling: str = "mean",
    device: Any = None,
    generation: dict[str, Any] | None = None,
    progress: bool = False,
    reference: torch.nn.Module | None = None,
    doc_stride: int = 32,
) -> dict[str, Any]:
    """Score ``model`` on ``dataset`` (normalised columns text/source/label/lang/target).

    Returns ``{"per_language": {lang: {metric: value}}, "average": {...}, "num_examples": n}``
    and what the task adds (token tasks: ``"truncated_words": {lang: n}``, words past
    ``max_length``, which have no prediction and are left out of the metrics, with a warning).
    Classification: accuracy and macro-F1; token tasks: token accuracy/F1 and
    entity F1 for BIO tags; embeddings: Tatoeba-style retrieval accuracy in
    both directions between the ``source`` and ``text`` columns; generative tasks
    their own (``polydistill.tasks``), decoding with ``generation`` (``config.generation``'s
    fields) and, with ``progress``, a progress bar per pass. ``reference``: a model reading the same
    tokens (a teacher) whose outputs reach the task as ``outputs.extra["reference"]``, for metrics that
    compare the two (causal_lm: ``teacher_agreement``). ``doc_stride``: ``data.doc_stride`` (question answering's
    windows over long contexts).
    """
    from polydistill.config import GenerationConfig

    task = get_task(task)
    device = device if device is not None else next(model.parameters()).device
    if task.eval_column not in dataset.column_names:
        raise ValueError(f"{task.name} evaluation needs columns.{task.eval_column}: {task.eval_column_why}")
    collator = Collator(task, tokenizer, [], max_length, "longest", labels)
    settings = GenerationConfig.model_validate(generation or {}).model_dump()
    predict = _Predictor(model, tokenizer, collator, task, batch_size, pooling, device, settings, progress, reference, doc_stride)
    was_training = model.training
    model.eval()
    try:
        scored = task.evaluate(predict, dataset, labels, max_length)
    finally:
        model.train(was_training)
    per_lang = scored.pop("per_language")
    return {
        "per_language": per_lang,
        "average": M.average_over_languages(per_lang) if per_lang else {},
        "num_examples": len(dataset),
        **scored,
    }


def primary_metric(task: str | Task) -> str:
    """The metric a table shows first for ``task``."""
    return get_task(task).primary_metric
