"""Text-to-text (translation): an encoder-decoder model's next-token distributions over its target
(``AutoModelForSeq2SeqLM``: Marian, T5/mT5, mBART, NLLB-style models), scored by BLEU and chrF."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

import torch

from polydistill.batch import ModelOutputs
from polydistill.tasks.base import Predict, Task
from polydistill.tasks.tokens import gather_words


class Seq2Seq(Task):
    name = "seq2seq"
    description = "text to text, e.g. translation (`AutoModelForSeq2SeqLM`); `columns.target` holds the output text"
    auto_class = "AutoModelForSeq2SeqLM"
    class_logits = True
    word_level = True
    per_token = True
    reads_target = "required"
    parallel_refusal = ("teacher and student read the same source text and learn the same target; the language pair "
                        "is in the data (columns.text and columns.target), so use mode 'same'")
    cache_needs_top_k = True
    primary_metric = "bleu"
    eval_column = "target"
    eval_column_why = "evaluation scores the generated text against the reference in columns.target"

    def encode(self, tokenizer: Any, texts: list[Any], max_length: int, padding: str,
               targets: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The source as inputs and the target as ``labels`` (the model builds its decoder inputs from them);
        each target token is read at its own decoder position ``(B, W)``."""
        if targets is None:
            raise ValueError("seq2seq needs each row's target text (columns.target)")
        enc = tokenizer(list(texts), truncation=True, max_length=max_length, padding=padding, return_tensors="pt")
        answers = tokenizer(text_target=list(targets), truncation=True, max_length=max_length)["input_ids"]
        width = max((len(a) for a in answers), default=0)
        labels = torch.full((len(texts), width), -100, dtype=torch.long)  # right-padded: decoders shift them right
        words = torch.full_like(labels, -1)
        for i, a in enumerate(answers):
            labels[i, : len(a)] = torch.tensor(a, dtype=torch.long)
            words[i, : len(a)] = torch.arange(len(a))
        inputs = {k: v for k, v in enc.items() if k in tokenizer.model_input_names}
        inputs["labels"] = labels
        return inputs, words, labels

    def generation_inputs(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v for k, v in inputs.items() if k in ("input_ids", "attention_mask")}

    def trim_padding(self, inputs: dict[str, torch.Tensor], words: torch.Tensor | None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The source's padding columns go; the target (``labels``) and its decoder positions stay as they are."""
        labels = inputs["labels"]
        trimmed, _ = super().trim_padding({k: v for k, v in inputs.items() if k != "labels"}, None)
        return {**trimmed, "labels": labels}, words

    def read_outputs(self, out: Any, result: ModelOutputs, words: torch.Tensor | None, pooling: str) -> None:
        if words is None:
            raise ValueError("seq2seq needs the target positions")
        result.logits, result.word_mask = gather_words(out.logits, words)
        # per-layer terms match the encoder's, whose positions result.mask (the source's) describes
        if getattr(out, "encoder_hidden_states", None) is not None and result.hidden_states is None:
            result.hidden_states = tuple(out.encoder_hidden_states)
        if getattr(out, "encoder_attentions", None) is not None and result.attentions is None:
            result.attentions = tuple(out.encoder_attentions)

    def evaluate(self, predict: Predict, dataset: Any, labels: list[str] | None, max_length: int) -> dict[str, Any]:
        """BLEU and chrF per language (sacrebleu, corpus level; ``signature`` says how they were computed),
        of the texts decoded with ``config.generation``."""
        from sacrebleu.metrics import BLEU, CHRF

        langs, refs = dataset["lang"], dataset["target"]
        hyps: dict[str, list[str]] = defaultdict(list)
        gold: dict[str, list[str]] = defaultdict(list)
        for batch, texts in predict.generate(dataset):
            for row, text in zip(batch.meta["index"], texts):
                hyps[langs[row]].append(text)
                gold[langs[row]].append(refs[row])
        bleu, chrf = BLEU(tokenize=predict.generation["bleu_tokenize"]), CHRF()
        per_lang = {lang: {"bleu": bleu.corpus_score(hyps[lang], [gold[lang]]).score,
                           "chrf": chrf.corpus_score(hyps[lang], [gold[lang]]).score} for lang in sorted(hyps)}
        return {"per_language": per_lang, "signature": {"bleu": str(bleu.get_signature()), "chrf": str(chrf.get_signature())}}
