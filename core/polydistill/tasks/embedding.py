"""Sentence embeddings: pooled hidden states (``AutoModel``), scored by bitext retrieval."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from polydistill import metrics as M
from polydistill.batch import ModelOutputs
from polydistill.tasks.base import Predict, Task


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """Sentence vectors from token states: ``cls`` (the first token) or the mean over ``mask``."""
    if how == "cls":
        return hidden[:, 0]
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1).clamp(min=1e-9)


class Embedding(Task):
    name = "embedding"
    description = "pooled sentence embeddings (the model is loaded with `AutoModel`)"
    auto_class = "AutoModel"
    output_field = "embeddings"
    needs_hidden_states = True
    primary_metric = "mean"
    eval_column = "source"
    eval_column_why = "embedding evaluation retrieves each text's translation, so it needs the column of the other side of each pair"

    def read_outputs(self, out: Any, result: ModelOutputs, words: torch.Tensor | None, pooling: str) -> None:
        last = out.last_hidden_state if getattr(out, "last_hidden_state", None) is not None else out.hidden_states[-1]
        mask = result.mask
        if mask is None:
            mask = torch.ones(last.shape[:2], device=last.device, dtype=torch.long)
        result.embeddings = pool(last, mask, pooling)

    def evaluate(self, predict: Predict, dataset: Any, labels: list[str] | None, max_length: int) -> dict[str, Any]:
        """Tatoeba-style retrieval accuracy per language, in both directions between ``source`` and ``text``."""
        text_emb = _embed(predict, dataset)
        src_emb = _embed(predict, dataset.rename_columns({"text": "_t", "source": "text"}))
        groups: dict[str, list[int]] = defaultdict(list)
        for i, lang in enumerate(dataset["lang"]):
            groups[lang].append(i)
        return {"per_language": {lang: M.retrieval_accuracy(src_emb[idx], text_emb[idx]) for lang, idx in sorted(groups.items())}}


def _embed(predict: Predict, dataset: Any) -> torch.Tensor:
    out: torch.Tensor | None = None
    for batch, outputs in predict(dataset):
        emb = outputs.embeddings.float().cpu()
        if out is None:
            out = torch.empty(len(dataset), emb.size(-1))
        out[torch.tensor(batch.meta["index"])] = emb
    assert out is not None
    return out
