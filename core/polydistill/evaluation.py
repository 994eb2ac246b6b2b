"""Evaluation of one model per language, with the metrics of its task."""

from __future__ import annotations

from typing import Any, Iterable

import torch

from polydistill import metrics as M
from polydistill.batch import Batch, ModelOutputs
from polydistill.data import Collator, Loader
from polydistill.models import forward
from polydistill.tasks import Task, get_task


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
) -> dict[str, Any]:
    """Score ``model`` on ``dataset`` (normalised columns text/source/label/lang).

    Returns ``{"per_language": {lang: {metric: value}}, "average": {...}, "num_examples": n}``
    and what the task adds (token tasks: ``"truncated_words": {lang: n}``, words past
    ``max_length``, which have no prediction and are left out of the metrics, with a warning).
    Classification: accuracy and macro-F1; token tasks: token accuracy/F1 and
    entity F1 for BIO tags; embeddings: Tatoeba-style retrieval accuracy in
    both directions between the ``source`` and ``text`` columns.
    """
    task = get_task(task)
    device = device if device is not None else next(model.parameters()).device
    if task.eval_column not in dataset.column_names:
        raise ValueError(f"{task.name} evaluation needs columns.{task.eval_column}: {task.eval_column_why}")
    collator = Collator(task, tokenizer, [], max_length, "longest", labels)

    def predict(ds: Any) -> Iterable[tuple[Batch, ModelOutputs]]:
        for batch in Loader(ds, collator, batch_size, seed=0, shuffle=False, group=True).iterate():
            batch = batch.to(device)
            yield batch, forward(model, batch.student_inputs, task, batch.student_words, pooling)

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
