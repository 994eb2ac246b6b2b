"""Token classification: one tag per word (``AutoModelForTokenClassification``); texts are lists of words."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import torch

from polydistill import metrics as M
from polydistill.batch import ModelOutputs
from polydistill.errors import DataError, warn
from polydistill.tasks.base import Predict, Task


def gather_words(values: torch.Tensor, words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick each word's first sub-word: ``(B, T, C)`` and ``(B, W)`` positions -> ``(B, W, C)``, mask."""
    mask = words >= 0
    index = words.clamp(min=0).unsqueeze(-1).expand(-1, -1, values.size(-1))
    return values.gather(1, index), mask


class TokenClassification(Task):
    name = "token_classification"
    description = "one tag per word (texts are lists of words)"
    auto_class = "AutoModelForTokenClassification"
    head = "ForTokenClassification"
    class_logits = True
    named_labels = True
    word_level = True
    text_is_words = True
    parallel_refusal = ("word i of a sentence is not word i of its translation. Distil tags on target-language text "
                        "in mode 'same' (teacher-student learning)")
    primary_metric = "token_accuracy"
    eval_column = "label"

    def read_outputs(self, out: Any, result: ModelOutputs, words: torch.Tensor | None, pooling: str) -> None:
        if words is None:
            raise ValueError("token classification needs word positions")
        result.logits, result.word_mask = gather_words(out.logits, words)

    def encode(self, tokenizer: Any, texts: list[Any], max_length: int, padding: str,
               targets: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, None]:
        """Word lists for one model; each word is read at its first sub-word ``(B, W)``."""
        enc = tokenizer(list(texts), is_split_into_words=True, truncation=True, max_length=max_length,
                        padding=padding, return_tensors="pt")
        width = max((len(t) for t in texts), default=0)
        words = torch.full((len(texts), width), -1, dtype=torch.long)
        for i in range(len(texts)):
            last = None
            for pos, w in enumerate(enc.word_ids(i)):
                if w is not None and w != last:
                    words[i, w] = pos
                last = w
        return {k: v for k, v in enc.items() if k in tokenizer.model_input_names}, words, None

    def row_labels(self, value: Any) -> list[Any]:
        return list(value or [])

    def encode_labels(self, raw: list[Any], texts: list[Any], label_id: Callable[[Any], int]) -> torch.Tensor:
        """Word-level tag ids ``(B, W)``, padded with -100."""
        width = max((len(t) for t in texts), default=0)
        out = torch.full((len(raw), width), -100, dtype=torch.long)
        for i, (tags, words) in enumerate(zip(raw, texts)):
            if len(tags) != len(words):
                raise DataError(f"row with {len(words)} words has {len(tags)} labels: {' '.join(map(str, words))[:80]}")
            out[i, : len(tags)] = torch.tensor([label_id(t) for t in tags], dtype=torch.long)
        return out

    def fuse(self, outs: dict[int, ModelOutputs], weights: torch.Tensor, batch_size: int) -> ModelOutputs:
        """Per word, the weighted mean of the teachers that have the word (weights ``(n,)``, ``(B, n)`` or ``(B, W, n)``).

        A teacher that lost a word to max_length (its tokenizer splits finer) has no
        logits there; its weight goes to the teachers that have the word. A word no
        teacher has is out of ``word_mask``; a sample none teaches, out of ``sample_mask``.
        """
        active = list(outs)
        values = {i: outs[i].logits for i in active}
        width = min(outs[i].word_mask.size(1) for i in active)

        def scale(i: int) -> torch.Tensor:
            w = weights[..., i]
            if w.dim() == 2:  # per word
                return w[:, :width].unsqueeze(-1)
            return w.view(batch_size, 1, 1) if w.dim() else w

        s = {i: scale(i) for i in active}
        has = {i: outs[i].word_mask[:, :width].unsqueeze(-1).to(values[i].dtype) for i in active}
        present = sum(s[i] * has[i] for i in active)
        total = sum(s[i] for i in active) * torch.ones_like(present)
        fused = ModelOutputs(logits=sum(s[i] * has[i] * values[i][:, :width] for i in active) * (total / present.clamp(min=1e-12)))
        fused.word_mask = present.squeeze(-1) > 0
        if weights.dim() >= 2:  # per sample or per word
            taught = fused.word_mask.any(-1) if weights.dim() == 3 else (weights != 0).any(-1)
            if not bool(taught.all()):
                fused.sample_mask = taught
        return fused

    def evaluate(self, predict: Predict, dataset: Any, labels: list[str] | None, max_length: int) -> dict[str, Any]:
        """Token accuracy/F1 (and entity F1 for BIO tags) per language; ``truncated_words``: words
        past ``max_length`` per language, which have no prediction and are left out (with a warning)."""
        langs = dataset["lang"]
        preds: dict[str, list[Any]] = defaultdict(list)
        refs: dict[str, list[Any]] = defaultdict(list)
        words: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # per language: words, words cut by max_length
        name = (lambda k: labels[k]) if labels else str
        for batch, out in predict(dataset):
            pred, gold = out.logits.argmax(-1).cpu(), batch.labels.cpu()
            for j, row in enumerate(batch.meta["index"]):
                lang = langs[row]
                keep = gold[j] != -100
                words[lang][0] += len(batch.texts[j])
                words[lang][1] += len(batch.texts[j]) - int(keep.sum())
                refs[lang].append([name(int(k)) for k in gold[j][keep]])
                preds[lang].append([name(int(k)) for k in pred[j][keep]])
        per_lang = {}
        for lang in sorted(preds):
            if not any(refs[lang]):
                raise DataError(f"evaluation: every word of language '{lang}' ({words[lang][0]} words) lies past "
                                f"data.max_length={max_length}, so none can be scored; raise data.max_length")
            per_lang[lang] = M.token_metrics(preds[lang], refs[lang])
        total, cut = sum(n for n, _ in words.values()), sum(c for _, c in words.values())
        if cut:
            langs_cut = ", ".join(f"{lang} {c}" for lang, (_, c) in sorted(words.items()) if c)
            warn(f"evaluation: {cut} of {total} words ({langs_cut}) lie past data.max_length={max_length} and are "
                 "not scored; raise data.max_length to score them")
        return {"per_language": per_lang, "truncated_words": {lang: c for lang, (_, c) in sorted(words.items())}}
