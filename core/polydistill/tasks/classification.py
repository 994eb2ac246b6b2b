"""Sequence classification: one label per text (``AutoModelForSequenceClassification``)."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from polydistill import metrics as M
from polydistill.batch import ModelOutputs
from polydistill.tasks.base import Predict, Task


class SequenceClassification(Task):
    name = "sequence_classification"
    description = "one label per text"
    auto_class = "AutoModelForSequenceClassification"
    head = "ForSequenceClassification"
    class_logits = True
    named_labels = True
    primary_metric = "accuracy"
    eval_column = "label"

    def read_outputs(self, out: Any, result: ModelOutputs, words: torch.Tensor | None, pooling: str) -> None:
        result.logits = out.logits

    def evaluate(self, predict: Predict, dataset: Any, labels: list[str] | None, max_length: int) -> dict[str, Any]:
        """Accuracy and macro-F1 per language."""
        langs = dataset["lang"]
        preds: dict[str, list[int]] = defaultdict(list)
        refs: dict[str, list[int]] = defaultdict(list)
        for batch, out in predict(dataset):
            pred, gold = out.logits.argmax(-1).cpu(), batch.labels.cpu()
            for j, row in enumerate(batch.meta["index"]):
                preds[langs[row]].append(int(pred[j]))
                refs[langs[row]].append(int(gold[j]))
        return {"per_language": {lang: M.classification_metrics(preds[lang], refs[lang]) for lang in sorted(preds)}}
