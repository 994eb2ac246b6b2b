"""Causal language modelling: next-token distributions of a decoder-only LM (``AutoModelForCausalLM``).

A text's targets are its next tokens: output ``j`` is the distribution the model
gives token ``j + 1`` (``(B, W, V)`` over the vocabulary, with ``word_mask``), so
the KD terms that work per word (``kd``'s ``kl`` and ``ce``) work per token.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

import torch
import torch.nn.functional as F

from polydistill.batch import ModelOutputs
from polydistill.errors import ConfigError
from polydistill.tasks.base import Predict, Task
from polydistill.tasks.tokens import gather_words


class CausalLM(Task):
    name = "causal_lm"
    description = "next-token distributions of a decoder-only language model (`AutoModelForCausalLM`)"
    auto_class = "AutoModelForCausalLM"
    class_logits = True
    word_level = True
    per_token = True
    parallel_refusal = ("a language model's targets are the next tokens of the text it reads, and the teacher must read "
                        "the same tokens; use mode 'same'")
    cache_needs_top_k = True
    primary_metric = "next_token_accuracy"
    compares_with_teacher = True
    eval_column = "text"
    reads_target = "optional"

    def prepare_tokenizer(self, tokenizer: Any, role: str) -> Any:
        if tokenizer.pad_token is None:  # GPT-2 style tokenizers have none; padded positions are never targets
            if tokenizer.eos_token is None:
                raise ConfigError(f"{role}: the tokenizer has neither a padding nor an end-of-text token; give one with a pad_token")
            tokenizer.pad_token = tokenizer.eos_token
        return tokenizer

    def encode(self, tokenizer: Any, texts: list[Any], max_length: int, padding: str,
               targets: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Inputs, the position predicting each target token ``(B, W)``, and those tokens as labels (-100: none).

        Without ``targets`` every next token of a text is a target; with them, a
        text is a prompt followed by its target (the response), and only the
        response's tokens (and the end-of-text token) are.
        """
        if targets is None:
            enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=padding, return_tensors="pt")
            first = [1] * len(texts)  # the first token has no prediction
        else:
            prompts = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
            end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            answers = tokenizer(list(targets), add_special_tokens=False)["input_ids"]
            rows = [(p + a + end)[:max_length] for p, a in zip(prompts, answers)]
            first = [max(len(p), 1) for p in prompts]
            enc = tokenizer.pad({"input_ids": rows}, padding=padding, max_length=max_length, return_tensors="pt")
        ids, mask = enc["input_ids"], enc["attention_mask"]
        used = [row.nonzero().flatten() for row in mask]  # left or right padding alike
        spans = [pos[f:] for pos, f in zip(used, first)]  # positions of the target tokens
        width = max((len(s) for s in spans), default=0)
        words = torch.full((len(texts), width), -1, dtype=torch.long)
        labels = torch.full_like(words, -100)
        for i, span in enumerate(spans):
            if len(span):
                words[i, : len(span)] = span - 1  # each target is predicted at the token before it
                labels[i, : len(span)] = ids[i, span]
        return {k: v for k, v in enc.items() if k in tokenizer.model_input_names}, words, labels

    def read_outputs(self, out: Any, result: ModelOutputs, words: torch.Tensor | None, pooling: str) -> None:
        if words is None:
            raise ValueError("causal_lm needs the positions of the next-token predictions")
        result.logits, result.word_mask = gather_words(out.logits, words)

    def evaluate(self, predict: Predict, dataset: Any, labels: list[str] | None, max_length: int) -> dict[str, Any]:
        """Per language: how often the most likely token is the next one, perplexity and mean negative
        log-likelihood of the next tokens, and, with a teacher, ``teacher_agreement`` (how often the
        student's most likely token is the teacher's); ``tokens``: how many were scored per language."""
        langs = dataset["lang"]
        nll: dict[str, float] = defaultdict(float)
        hits: dict[str, int] = defaultdict(int)
        count: dict[str, int] = defaultdict(int)
        agree: dict[str, int] = defaultdict(int)
        compared = False
        for batch, out in predict(dataset):
            logp = F.log_softmax(out.logits.float(), dim=-1)
            gold = batch.labels
            keep = gold != -100
            token_nll = -logp.gather(-1, gold.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            right = logp.argmax(-1) == gold
            reference = out.extra.get("reference")
            same = (out.logits.argmax(-1) == reference.logits.argmax(-1)) if reference is not None else None
            compared = compared or same is not None
            for j, row in enumerate(batch.meta["index"]):
                lang = langs[row]
                nll[lang] += float(token_nll[j][keep[j]].sum())
                hits[lang] += int(right[j][keep[j]].sum())
                count[lang] += int(keep[j].sum())
                if same is not None:
                    agree[lang] += int(same[j][keep[j]].sum())
        per_lang = {}
        for lang in sorted(count):
            if not count[lang]:
                continue  # texts of one token have no next token to score
            mean = nll[lang] / count[lang]
            per_lang[lang] = {"next_token_accuracy": hits[lang] / count[lang], "perplexity": math.exp(min(mean, 700.0)),
                              "nll": mean}
            if compared:
                per_lang[lang]["teacher_agreement"] = agree[lang] / count[lang]
        return {"per_language": per_lang, "tokens": dict(sorted(count.items()))}
