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


    def save_files(self, directory: Any, state: Any) -> list[str]:
        """The sentence-transformers files: modules.json, the Pooling module of ``pooling``, Normalize when the run
        normalised, max_seq_length; ``SentenceTransformer(directory)`` then encodes as polydistill evaluates."""
        import json
        from pathlib import Path

        root = Path(directory)
        config = state.config
        width = int(state.unwrapped_student().config.hidden_size)
        modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                   {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
        if state.normalized_embeddings:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            (root / "2_Normalize").mkdir(parents=True, exist_ok=True)
        (root / "1_Pooling").mkdir(parents=True, exist_ok=True)
        pooling = {"word_embedding_dimension": width, "pooling_mode_cls_token": config.pooling == "cls",
                   "pooling_mode_mean_tokens": config.pooling == "mean", "pooling_mode_max_tokens": False,
                   "pooling_mode_mean_sqrt_len_tokens": False, "pooling_mode_weightedmean_tokens": False,
                   "pooling_mode_lasttoken": False, "include_prompt": True}
        files = {
            "modules.json": modules,
            "1_Pooling/config.json": pooling,
            "sentence_bert_config.json": {"max_seq_length": config.data.max_length, "do_lower_case": False},
            "config_sentence_transformers.json": {"prompts": {}, "default_prompt_name": None, "similarity_fn_name": "cosine"},
        }
        for name, content in files.items():
            (root / name).write_text(json.dumps(content, indent=2) + "\n", encoding="utf-8")
        norm = ", then L2-normalised" if state.normalized_embeddings else ""
        return [
            f"A sentence-transformers model: {config.pooling} pooling{norm}, at most {config.data.max_length} tokens.",
            "",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            'model = SentenceTransformer("PATH/TO/student")',
            'vectors = model.encode(["A sentence.", "Ein Satz."])',
            "```",
            "",
            f"With transformers alone: `AutoModel`, then {config.pooling} pooling of the last hidden states over the attention "
            f"mask{norm}.",
        ]


def _embed(predict: Predict, dataset: Any) -> torch.Tensor:
    out: torch.Tensor | None = None
    for batch, outputs in predict(dataset):
        emb = outputs.embeddings.float().cpu()
        if out is None:
            out = torch.empty(len(dataset), emb.size(-1))
        out[torch.tensor(batch.meta["index"])] = emb
    assert out is not None
    return out
