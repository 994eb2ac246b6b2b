"""Evaluation of one model per language: classification, token tagging, bitext retrieval."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from polydistill import metrics as M
from polydistill.data import Collator, Loader
from polydistill.errors import DataError, warn
from polydistill.models import forward


@torch.no_grad()
def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    dataset: Any,
    task: str,
    labels: list[str] | None = None,
    max_length: int = 128,
    batch_size: int = 64,
    pooling: str = "mean",
    device: Any = None,
) -> dict[str, Any]:
    """Score ``model`` on ``dataset`` (normalised columns text/source/label/lang).

    Returns ``{"per_language": {lang: {metric: value}}, "average": {...}, "num_examples": n}``,
    for token tasks also ``"truncated_words": {lang: n}``: words past ``max_length``,
    which have no prediction and are left out of the metrics (with a warning).
    Classification: accuracy and macro-F1; token tasks: token accuracy/F1 and
    entity F1 for BIO tags; embeddings: Tatoeba-style retrieval accuracy in
    both directions between the ``source`` and ``text`` columns.
    """
    device = device if device is not None else next(model.parameters()).device
    was_training = model.training
    model.eval()
    collator = Collator(task, tokenizer, [], max_length, "longest", labels)
    loader = Loader(dataset, collator, batch_size, seed=0, shuffle=False, group=True)
    langs = dataset["lang"]
    per_lang: dict[str, dict[str, float]] = {}
    try:
        if task == "embedding":
            if "source" not in dataset.column_names:
                raise ValueError("embedding evaluation needs columns.source (the other side of each pair)")
            text_emb = _embed(model, loader, len(dataset), device, task, pooling)
            src_loader = Loader(dataset.rename_columns({"text": "_t", "source": "text"}), collator, batch_size, 0, False, True)
            src_emb = _embed(model, src_loader, len(dataset), device, task, pooling)
            groups = defaultdict(list)
            for i, lang in enumerate(langs):
                groups[lang].append(i)
            for lang, idx in sorted(groups.items()):
                per_lang[lang] = M.retrieval_accuracy(src_emb[idx], text_emb[idx])
        else:
            if "label" not in dataset.column_names:
                raise ValueError("classification evaluation needs columns.label")
            preds: dict[str, list[Any]] = defaultdict(list)
            refs: dict[str, list[Any]] = defaultdict(list)
            words: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # per language: words, words cut by max_length
            for batch in loader.iterate():
                batch = batch.to(device)
                out = forward(model, batch.student_inputs, task, batch.student_words, pooling)
                pred = out.logits.argmax(-1).cpu()
                gold = batch.labels.cpu()
                for j, row in enumerate(batch.meta["index"]):
                    lang = langs[row]
                    if task == "sequence_classification":
                        preds[lang].append(int(pred[j]))
                        refs[lang].append(int(gold[j]))
                    else:
                        keep = gold[j] != -100
                        words[lang][0] += len(batch.texts[j])
                        words[lang][1] += len(batch.texts[j]) - int(keep.sum())
                        name = (lambda k: labels[k]) if labels else str
                        refs[lang].append([name(int(k)) for k in gold[j][keep]])
                        preds[lang].append([name(int(k)) for k in pred[j][keep]])
            for lang in sorted(preds):
                if task == "sequence_classification":
                    per_lang[lang] = M.classification_metrics(preds[lang], refs[lang])
                elif not any(refs[lang]):
                    raise DataError(f"evaluation: every word of language '{lang}' ({words[lang][0]} words) lies past "
                                    f"data.max_length={max_length}, so none can be scored; raise data.max_length")
                else:
                    per_lang[lang] = M.token_metrics(preds[lang], refs[lang])
    finally:
        model.train(was_training)
    result = {
        "per_language": per_lang,
        "average": M.average_over_languages(per_lang) if per_lang else {},
        "num_examples": len(dataset),
    }
    if task == "token_classification":
        # Words past max_length have no logits, so they cannot be scored; say how many.
        result["truncated_words"] = {lang: cut for lang, (_, cut) in sorted(words.items())}
        total, cut = sum(n for n, _ in words.values()), sum(c for _, c in words.values())
        if cut:
            langs_cut = ", ".join(f"{lang} {c}" for lang, (_, c) in sorted(words.items()) if c)
            warn(f"evaluation: {cut} of {total} words ({langs_cut}) lie past data.max_length={max_length} and are "
                 "not scored; raise data.max_length to score them")
    return result


def _embed(model: torch.nn.Module, loader: Loader, n: int, device: Any, task: str, pooling: str) -> torch.Tensor:
    out: torch.Tensor | None = None
    for batch in loader.iterate():
        batch = batch.to(device)
        emb = forward(model, batch.student_inputs, task, None, pooling).embeddings.float().cpu()
        if out is None:
            out = torch.empty(n, emb.size(-1))
        out[torch.tensor(batch.meta["index"])] = emb
    assert out is not None
    return out


def primary_metric(task: str) -> str:
    """The metric a table shows first for ``task``."""
    return {"sequence_classification": "accuracy", "token_classification": "token_accuracy", "embedding": "mean"}[task]
