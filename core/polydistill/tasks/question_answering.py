"""Extractive question answering: the answer is a span of the context (``AutoModelForQuestionAnswering``).

A row is a question (``columns.text``), its context (``columns.context``) and, for
training with gold spans and for evaluation, its answer (``columns.target``: a
string, a list of acceptable strings, or SQuAD's ``{"text": [...], "answer_start":
[...]}``). A context longer than ``data.max_length`` is cut into overlapping
windows (``data.doc_stride`` tokens shared by neighbours): each window is one
training sample (a *feature*), and evaluation takes the best span over all
windows of a question.

A model's output is its start and end logits as two distributions over the
input positions, ``logits`` ``(B, 2, L)`` with padding at -1e4, and the gold
start and end positions as labels ``(B, 2)`` (the first token, ``[CLS]``, when
the window does not hold the answer), so ``kd``'s ``kl`` and ``ce`` distil them
like per-word class distributions.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import torch

from polydistill.batch import ModelOutputs
from polydistill.errors import ConfigError, DataError
from polydistill.tasks.base import Predict, Task

#: Logit of a padding position: exp() of it is exactly 0 in float32, and it is finite in float16.
PAD_LOGIT = -1e4


def gold_answers(value: Any) -> tuple[list[str], list[int | None]]:
    """A target cell's answers and their start characters (None: not given) in any accepted form."""
    if value is None:
        return [], []
    if isinstance(value, str):
        return [value], [None]
    if isinstance(value, dict):
        texts = value.get("text", [])
        starts = value.get("answer_start", value.get("start"))
        texts = [texts] if isinstance(texts, str) else list(texts or [])
        starts = [starts] if isinstance(starts, (int, np.integer)) else list(starts or [])
        starts = [None if s is None else int(s) for s in starts]
        return texts, (starts + [None] * len(texts))[: len(texts)]
    return list(value), [None] * len(value)


def _target_error(value: Any) -> str | None:
    expect = "a string, a list of strings or {text: [...], answer_start: [...]}"
    if value is None or isinstance(value, str):
        return None
    if isinstance(value, dict):
        if "text" not in value:
            return expect + " (the mapping has no 'text')"
        texts, starts = gold_answers(value)
        if not all(isinstance(t, str) for t in texts):
            return expect
        raw = value.get("answer_start", value.get("start"))
        if raw is not None and not isinstance(raw, (int, np.integer)) and len(list(raw)) != len(texts):
            return expect + f" ({len(texts)} texts but {len(list(raw))} answer_start values)"
        return None
    if isinstance(value, (list, tuple)) and all(isinstance(t, str) for t in value):
        return None
    return expect


class QuestionAnswering(Task):
    name = "question_answering"
    description = ("extractive question answering (`AutoModelForQuestionAnswering`): `columns.text` the question, "
                   "`columns.context` the passage, `columns.target` the answer")
    auto_class = "AutoModelForQuestionAnswering"
    head = "ForQuestionAnswering"
    class_logits = True
    word_level = True
    per_token = True
    reads_target = "optional"
    reads_context = True
    parallel_refusal = ("an answer is a span of the context the model reads, and the teacher's start and end positions "
                        "are the student's; use mode 'same'")
    primary_metric = "f1"
    eval_column = "target"
    eval_column_why = "evaluating question_answering needs the gold answers (columns.target)"
    #: Longest answer evaluation predicts, in tokens (as in transformers' QA examples).
    max_answer_tokens = 30
    #: Start and end candidates per window evaluation compares.
    n_best = 20

    def prepare_tokenizer(self, tokenizer: Any, role: str) -> Any:
        if not getattr(tokenizer, "is_fast", False):
            raise ConfigError(f"{role}: question_answering maps answers to tokens through character offsets, which only "
                              "fast (Rust) tokenizers give; use the model's fast tokenizer (tokenizer.json)")
        tokenizer.padding_side = "right"  # cached rows hold each window's own positions from the first
        return tokenizer

    def target_error(self, value: Any) -> str | None:
        return _target_error(value)

    # ------------------------------------------------------------------ windows

    def prepare_data(self, dataset: Any, tokenizer: Any, max_length: int, doc_stride: int) -> Any:
        """Each row as one feature per window of its context: ``text`` the question, ``context`` the window,
        ``target`` ``{"text", "start"}`` (the answer in the window, start -1: not in it), and ``example``,
        ``offset`` (the window's first character in the context) and ``answers`` (all gold answers)."""
        names = dataset.column_names
        if names is None:  # a stream: its columns are those of its first row
            names = list(next(iter(dataset)).keys())
        if "context" not in names:
            raise DataError("question_answering: the data has no context column (columns.context)")
        if doc_stride >= max_length // 2:
            raise ConfigError(f"data.doc_stride: {doc_stride} must be below half of data.max_length ({max_length}): "
                              "windows share doc_stride tokens, and the question takes room too")
        with_targets = "target" in names

        def windows(rows: dict[str, list[Any]], ids: list[int]) -> dict[str, list[Any]]:
            out: dict[str, list[Any]] = defaultdict(list)
            enc = tokenizer(rows["text"], rows["context"], truncation="only_second", max_length=max_length,
                            stride=doc_stride, return_overflowing_tokens=True, return_offsets_mapping=True)
            for f, row in enumerate(enc["overflow_to_sample_mapping"]):
                seq = enc.sequence_ids(f)
                spans = [o for o, s in zip(enc["offset_mapping"][f], seq) if s == 1]
                context = rows["context"][row]
                if not spans:
                    raise DataError(f"question_answering: a question leaves no room for its context within data.max_length "
                                    f"({max_length} tokens): {rows['text'][row][:80]!r}")
                lo, hi = spans[0][0], spans[-1][1]
                texts, starts = gold_answers(rows["target"][row]) if with_targets else ([], [])
                start, text = -1, ""
                if texts:
                    first = starts[0] if starts[0] is not None else context.find(texts[0])
                    if first is not None and first >= 0 and lo <= first and first + len(texts[0]) <= hi:
                        start, text = first - lo, texts[0]
                out["text"].append(rows["text"][row])
                out["context"].append(context[lo:hi])
                out["lang"].append(rows["lang"][row])
                out["target"].append({"text": text, "start": start})
                out["answers"].append(texts)
                out["example"].append(ids[row])
                out["offset"].append(lo)
            return dict(out)

        return dataset.map(windows, batched=True, batch_size=256, with_indices=True, remove_columns=names)

    # ------------------------------------------------------------------ data

    def encode(self, tokenizer: Any, texts: list[Any], max_length: int, padding: str,
               targets: list[Any] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """(question, window) pairs; the labels are the answer's first and last token ``(B, 2)`` (0, the first
        token, when the window has no answer)."""
        questions, contexts = [t[0] for t in texts], [t[1] for t in texts]
        enc = tokenizer(questions, contexts, truncation="only_second", max_length=max_length, padding=padding,
                        return_offsets_mapping=True, return_tensors="pt")
        words = torch.zeros(len(texts), 2, dtype=torch.long)  # both "words" (start, end) of every row are read
        labels = None
        if targets is not None:
            labels = torch.zeros(len(texts), 2, dtype=torch.long)
            for i, target in enumerate(targets):
                answer = _window_answer(target, contexts[i])
                if answer is None:
                    continue
                lo, hi = answer
                seq = enc.sequence_ids(i)
                offsets = enc["offset_mapping"][i].tolist()
                tokens = [j for j, (s, (a, b)) in enumerate(zip(seq, offsets)) if s == 1 and b > lo and a < hi]
                if tokens:
                    labels[i] = torch.tensor([tokens[0], tokens[-1]])
        return {k: v for k, v in enc.items() if k in tokenizer.model_input_names}, words, labels

    def trim_padding(self, inputs: dict[str, torch.Tensor], words: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        trimmed, _ = super().trim_padding(inputs, None)
        return trimmed, words  # the read "positions" are the start and end distributions, not tokens

    def read_outputs(self, out: Any, result: ModelOutputs, words: torch.Tensor | None, pooling: str) -> None:
        logits = torch.stack([out.start_logits, out.end_logits], dim=1)
        mask = result.mask.bool()
        used = int(mask.any(0).nonzero().max()) + 1 if mask.any() else mask.size(1)  # right padding
        logits, mask = logits[..., :used], mask[:, :used]
        result.logits = logits.masked_fill(~mask.unsqueeze(1), PAD_LOGIT)
        result.word_mask = torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)

    # ------------------------------------------------------------------ teacher outputs

    def cache_rows(self, out: ModelOutputs, top_k: int | None = None, sample: bool = False) -> list[np.ndarray]:
        """Each window's start and end logits over its own tokens, ``(2, n)``."""
        values = out.logits.detach().float().cpu().numpy()
        lengths = out.mask.sum(1).tolist()
        return [v[:, : int(n)] for v, n in zip(values, lengths)]

    def from_cache(self, rows: list[np.ndarray], words: torch.Tensor | None, device: Any, width: int | None = None,
                   top_k: int | None = None) -> ModelOutputs:
        length = max(r.shape[1] for r in rows)
        values = np.full((len(rows), 2, length), PAD_LOGIT, dtype=np.float32)
        for i, r in enumerate(rows):
            values[i, :, : r.shape[1]] = r
        logits = torch.from_numpy(values).to(device)
        return ModelOutputs(logits=logits, word_mask=torch.ones(logits.shape[:2], dtype=torch.bool, device=device))

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, predict: Predict, dataset: Any, labels: list[str] | None, max_length: int) -> dict[str, Any]:
        """Exact match and F1 (SQuAD's, in %) per language of the best span over each question's windows,
        against its best-matching gold answer; questions without a gold answer (SQuAD 2.0) are right when
        the model prefers no answer. ``questions``: how many were scored per language."""
        features = self.prepare_data(dataset, predict.tokenizer, max_length, predict.doc_stride)
        best: dict[int, tuple[float, str]] = {}
        null: dict[int, float] = {}
        example, offset, context = features["example"], features["offset"], features["context"]
        for batch, out in predict(features):
            enc = predict.tokenizer([t[0] for t in batch.texts], [t[1] for t in batch.texts], truncation="only_second",
                                    max_length=max_length, return_offsets_mapping=True)
            logits = out.logits.float().cpu()
            for j, row in enumerate(batch.meta["index"]):
                start, end = logits[j, 0], logits[j, 1]
                ex = example[row]
                null[ex] = min(null.get(ex, float("inf")), float(start[0] + end[0]))
                seq, offsets = enc.sequence_ids(j), enc["offset_mapping"][j]
                inside = [s == 1 for s in seq]
                k = min(self.n_best, len(inside))
                for s in start[: len(inside)].topk(k).indices.tolist():
                    for e in end[: len(inside)].topk(k).indices.tolist():
                        if not (inside[s] and inside[e]) or e < s or e - s + 1 > self.max_answer_tokens:
                            continue
                        score = float(start[s] + end[e])
                        if ex not in best or score > best[ex][0]:
                            best[ex] = (score, context[row][offsets[s][0]: offsets[e][1]])
        first = {}
        for row, ex in enumerate(example):
            first.setdefault(ex, row)
        em: dict[str, list[float]] = defaultdict(list)
        f1: dict[str, list[float]] = defaultdict(list)
        for ex, row in first.items():
            lang, golds = features["lang"][row], features["answers"][row]
            score, text = best.get(ex, (float("-inf"), ""))
            if not golds:  # unanswerable: right when no span beats the null answer
                hit = float(not (score > null.get(ex, float("inf"))))
                em[lang].append(hit)
                f1[lang].append(hit)
                continue
            em[lang].append(max(float(normalize_answer(text, lang) == normalize_answer(g, lang)) for g in golds))
            f1[lang].append(max(answer_f1(text, g, lang) for g in golds))
        per_lang = {lang: {"exact_match": 100 * sum(em[lang]) / len(em[lang]), "f1": 100 * sum(f1[lang]) / len(f1[lang])}
                    for lang in sorted(em)}
        return {"per_language": per_lang, "questions": {lang: len(em[lang]) for lang in sorted(em)},
                "windows": len(features)}


def _window_answer(target: Any, context: str) -> tuple[int, int] | None:
    """The answer's characters ``[lo, hi)`` in a window, from a feature target or a raw answer cell."""
    if isinstance(target, dict) and "start" in target and isinstance(target.get("text"), str):
        start, text = target["start"], target["text"]
        if start is None or start < 0 or not text:
            return None
        return start, start + len(text)
    texts, starts = gold_answers(target)
    if not texts or not texts[0]:
        return None
    start = starts[0] if starts[0] is not None else context.find(texts[0])
    return (start, start + len(texts[0])) if start >= 0 else None


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str, lang: str = "") -> str:
    """SQuAD's answer normalisation: lower case, no punctuation (any Unicode punctuation), single spaces;
    English articles are dropped for English rows (``lang`` ``en``, ``eng``, ``en_US``, ...)."""
    text = "".join(" " if ch in _PUNCT or unicodedata.category(ch).startswith("P") else ch for ch in text.lower())
    if re.split(r"[_-]", lang.lower())[0] in ("en", "eng"):
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _tokens(text: str) -> list[str]:
    # scripts written without spaces are compared character by character (as MLQA's evaluation does for Chinese)
    out: list[str] = []
    for word in text.split():
        if any(unicodedata.name(ch, "").startswith(("CJK", "HIRAGANA", "KATAKANA", "THAI", "LAO", "KHMER", "MYANMAR")) for ch in word):
            out.extend(word)
        else:
            out.append(word)
    return out


def answer_f1(prediction: str, gold: str, lang: str = "") -> float:
    """Token-overlap F1 of two answers after :func:`normalize_answer` (0 to 1)."""
    pred, ref = _tokens(normalize_answer(prediction, lang)), _tokens(normalize_answer(gold, lang))
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if not common:
        return 0.0
    p, r = common / len(pred), common / len(ref)
    return 2 * p * r / (p + r)
