"""Evaluation metrics for cross-lingual transfer benchmarks.

Pure functions (no I/O): sentence classification, token tagging (with
seqeval-style entity scores for IOB2 tag sets), bitext retrieval and
per-language averaging.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch

__all__ = [
    "classification_metrics",
    "token_metrics",
    "retrieval_accuracy",
    "average_over_languages",
]

_OUTSIDE = "O"


def _macro_f1(predictions: Sequence[Hashable], references: Sequence[Hashable]) -> float:
    """Unweighted mean of per-label F1 over the union of labels in both inputs.

    A label whose precision and recall are both zero gets F1 = 0. Matches
    ``sklearn.metrics.f1_score(average="macro")`` with the default labels.
    """
    labels = sorted(set(predictions) | set(references), key=repr)
    index = {label: i for i, label in enumerate(labels)}
    pred = np.fromiter((index[p] for p in predictions), dtype=np.int64, count=len(predictions))
    ref = np.fromiter((index[r] for r in references), dtype=np.int64, count=len(references))
    n = len(labels)
    tp = np.bincount(ref[pred == ref], minlength=n).astype(np.float64)
    pred_count = np.bincount(pred, minlength=n).astype(np.float64)
    ref_count = np.bincount(ref, minlength=n).astype(np.float64)
    # F1 = 2TP / (|pred| + |ref|); the denominator is > 0 for every label in the union.
    f1 = 2.0 * tp / (pred_count + ref_count)
    return float(f1.mean())


def classification_metrics(
    predictions: Sequence[int],
    references: Sequence[int],
    num_labels: int | None = None,
) -> dict[str, float]:
    """Accuracy and macro-F1 for single-label classification (e.g. XNLI, PAWS-X).

    Macro-F1 averages over the labels that occur in ``predictions`` or
    ``references``. ``num_labels``, if given, is only used to check that every
    label lies in ``[0, num_labels)``.

    Raises:
        ValueError: on empty input, length mismatch, or out-of-range labels.
    """
    preds = [int(p) for p in predictions]
    refs = [int(r) for r in references]
    if not refs and not preds:
        raise ValueError("classification_metrics: predictions and references are empty")
    if len(preds) != len(refs):
        raise ValueError(
            f"classification_metrics: got {len(preds)} predictions but {len(refs)} references"
        )
    if num_labels is not None:
        bad = [x for x in preds + refs if not 0 <= x < num_labels]
        if bad:
            raise ValueError(
                f"classification_metrics: label {bad[0]} outside [0, {num_labels})"
            )
    pred_arr = np.asarray(preds, dtype=np.int64)
    ref_arr = np.asarray(refs, dtype=np.int64)
    return {
        "accuracy": float(np.mean(pred_arr == ref_arr)),
        "macro_f1": _macro_f1(preds, refs),
    }


def _is_bio_tagset(tags: set[str]) -> bool:
    """True if every non-"O" tag starts with "B-" or "I-" and at least one does."""
    entity_tags = [t for t in tags if t != _OUTSIDE]
    return bool(entity_tags) and all(t.startswith(("B-", "I-")) for t in entity_tags)


def _split_tag(tag: str) -> tuple[str, str]:
    """Return (prefix, type). Non-"O" tags without a B-/I- prefix count as "B-<tag>"."""
    if tag == _OUTSIDE:
        return _OUTSIDE, ""
    if tag.startswith(("B-", "I-")):
        return tag[0], tag[2:]
    return "B", tag


def _extract_entities(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """IOB2 chunks of one sentence as ``(type, start, end_inclusive)``.

    Follows conlleval / seqeval default mode: an ``I-X`` after ``O`` or after a
    tag of a different type starts a new entity.
    """
    entities: set[tuple[str, int, int]] = set()
    current_type: str | None = None
    start = 0
    for i, tag in enumerate(tags):
        prefix, etype = _split_tag(tag)
        starts_new = prefix == "B" or (prefix == "I" and etype != current_type)
        if current_type is not None and (prefix == _OUTSIDE or starts_new):
            entities.add((current_type, start, i - 1))
            current_type = None
        if starts_new:
            current_type, start = etype, i
    if current_type is not None:
        entities.add((current_type, start, len(tags) - 1))
    return entities


def token_metrics(
    predictions: Sequence[Sequence[str]],
    references: Sequence[Sequence[str]],
) -> dict[str, float]:
    """Word-level tagging metrics (e.g. WikiANN NER, UD POS).

    Always returns ``token_accuracy`` and ``token_macro_f1`` (macro-F1 over the
    union of tags). If the reference tags look like IOB2 (every non-"O" tag
    starts with "B-" or "I-"), also returns seqeval-style ``entity_precision``,
    ``entity_recall`` and ``entity_f1`` (micro-averaged over exact span + type
    matches; 0.0 when undefined).

    Raises:
        ValueError: on empty input, a different number of sentences, or a
            sentence whose prediction and reference lengths differ.
    """
    if len(predictions) != len(references):
        raise ValueError(
            f"token_metrics: got {len(predictions)} predicted sentences "
            f"but {len(references)} reference sentences"
        )
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        if len(pred) != len(ref):
            raise ValueError(
                f"token_metrics: sentence {i} has {len(pred)} predicted tags "
                f"but {len(ref)} reference tags"
            )
    flat_pred = [str(t) for sent in predictions for t in sent]
    flat_ref = [str(t) for sent in references for t in sent]
    if not flat_ref:
        raise ValueError("token_metrics: no tokens in references")

    result = {
        "token_accuracy": float(np.mean(np.asarray(flat_pred, dtype=object) == np.asarray(flat_ref, dtype=object))),
        "token_macro_f1": _macro_f1(flat_pred, flat_ref),
    }

    if _is_bio_tagset(set(flat_ref)):
        n_correct = n_pred = n_gold = 0
        for pred, ref in zip(predictions, references):
            pred_entities = _extract_entities([str(t) for t in pred])
            gold_entities = _extract_entities([str(t) for t in ref])
            n_correct += len(pred_entities & gold_entities)
            n_pred += len(pred_entities)
            n_gold += len(gold_entities)
        precision = n_correct / n_pred if n_pred else 0.0
        recall = n_correct / n_gold if n_gold else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        result.update(
            entity_precision=float(precision),
            entity_recall=float(recall),
            entity_f1=float(f1),
        )
    return result


def _as_float_tensor(x: Any, name: str) -> torch.Tensor:
    """Convert a 2-D array/tensor to a floating tensor of at least float32 precision."""
    t = x if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x))
    if t.ndim != 2:
        raise ValueError(f"retrieval_accuracy: {name} must have shape (N, D), got {tuple(t.shape)}")
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.to(torch.float32)
    return t


@torch.no_grad()
def retrieval_accuracy(
    source_embeddings: torch.Tensor | np.ndarray,
    target_embeddings: torch.Tensor | np.ndarray,
    chunk_size: int = 1024,
) -> dict[str, float]:
    """Bitext retrieval accuracy by cosine nearest neighbour (Tatoeba / BUCC-style).

    Row ``i`` of ``source_embeddings`` is the translation of row ``i`` of
    ``target_embeddings``. ``src2tgt`` is the fraction of source rows whose
    highest-cosine target row is the aligned one; ``tgt2src`` the reverse;
    ``mean`` their average. Similarities are computed ``chunk_size`` source
    rows at a time (peak extra memory ~ ``chunk_size * N``), and both
    directions come from the same pass. Ties go to the lowest index.
    Half-precision inputs are upcast to float32.

    Raises:
        ValueError: on non-2-D input, empty input, mismatched N or D, or
            ``chunk_size < 1``.
    """
    if chunk_size < 1:
        raise ValueError(f"retrieval_accuracy: chunk_size must be >= 1, got {chunk_size}")
    src = _as_float_tensor(source_embeddings, "source_embeddings")
    tgt = _as_float_tensor(target_embeddings, "target_embeddings")
    if src.shape[0] != tgt.shape[0]:
        raise ValueError(
            f"retrieval_accuracy: source has {src.shape[0]} rows but target has "
            f"{tgt.shape[0]}; rows must be aligned translations"
        )
    if src.shape[1] != tgt.shape[1]:
        raise ValueError(
            f"retrieval_accuracy: embedding dims differ ({src.shape[1]} vs {tgt.shape[1]})"
        )
    n = src.shape[0]
    if n == 0:
        raise ValueError("retrieval_accuracy: embeddings are empty")

    dtype = torch.promote_types(src.dtype, tgt.dtype)
    device = src.device
    src = torch.nn.functional.normalize(src.to(device=device, dtype=dtype), dim=1)
    tgt = torch.nn.functional.normalize(tgt.to(device=device, dtype=dtype), dim=1)
    tgt_t = tgt.T.contiguous()

    src_hits = 0
    # Running column-wise best (value, source index) for the target->source direction.
    best_val = torch.full((n,), -torch.inf, dtype=dtype, device=device)
    best_idx = torch.zeros(n, dtype=torch.long, device=device)
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        sims = src[start:stop] @ tgt_t  # (chunk, N)
        rows = torch.arange(start, stop, device=device)
        src_hits += int((sims.argmax(dim=1) == rows).sum())
        col_val, col_arg = sims.max(dim=0)
        better = col_val > best_val  # strict: earlier chunk wins ties
        best_val = torch.where(better, col_val, best_val)
        best_idx = torch.where(better, col_arg + start, best_idx)
        del sims
    tgt_hits = int((best_idx == torch.arange(n, device=device)).sum())

    src2tgt = src_hits / n
    tgt2src = tgt_hits / n
    return {"src2tgt": src2tgt, "tgt2src": tgt2src, "mean": (src2tgt + tgt2src) / 2}


def average_over_languages(per_language: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric across languages.

    Only metrics present for every language are averaged; key order follows
    the first language.

    Raises:
        ValueError: if ``per_language`` is empty.
    """
    if not per_language:
        raise ValueError("average_over_languages: no languages given")
    results = list(per_language.values())
    common = [k for k in results[0] if all(k in r for r in results[1:])]
    return {k: float(np.mean([float(r[k]) for r in results])) for k in common}
