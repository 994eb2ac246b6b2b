"""Tiny, real Hugging Face models and tokenizers built locally, without the hub.

Used by the demo and the tests, and available to plugin authors who need a
small teacher or student. Everything is built from a handful of texts in a
fraction of a second and saved with ``save_pretrained``, so the result loads
through the ``Auto*`` classes exactly like a downloaded checkpoint.

Notes on transformers 5 that this module relies on:

* ``BertTokenizerFast`` is an alias of ``BertTokenizer`` (a ``TokenizersBackend``).
  When it is loaded from disk, it rebuilds its normalizer from the
  ``do_lower_case`` and ``strip_accents`` entries of ``tokenizer_config.json``
  rather than from ``tokenizer.json``, so both are passed explicitly here.
* The default attention implementation is ``sdpa``, which returns an empty
  tuple for ``output_attentions=True``. The config built here uses ``eager``,
  and ``build_tiny_model`` writes ``"attn_implementation": "eager"`` into
  ``config.json`` so that a reloaded model returns attentions too.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    BertConfig,
    GPT2Config,
    MarianConfig,
    BertTokenizerFast,
    PreTrainedTokenizerFast,
)

__all__ = [
    "SPECIAL_TOKENS",
    "tiny_gpt2_config",
    "tiny_marian_config",
    "build_tiny_model",
    "tiny_bert_config",
    "train_tokenizer",
]

#: Special tokens of every tokenizer built here; they get ids 0 to 4 in this order.
SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")

_PREFIX = "##"


def _bert_normalizer(lowercase: bool) -> normalizers.BertNormalizer:
    return normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=lowercase
    )


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int = 1000,
    lowercase: bool = True,
    *,
    model_max_length: int | None = None,
) -> PreTrainedTokenizerFast:
    """Train a BERT-style WordPiece tokenizer on ``texts``.

    Accents are kept (``strip_accents=False``), so characters such as é or ü
    seen in ``texts`` get their own tokens rather than ``[UNK]``. Inputs are
    wrapped as ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]`` with token type
    ids 0 and 1. ``vocab_size`` is an upper bound: a small corpus yields fewer
    tokens, and the base alphabet is always kept even if it alone exceeds it.

    Training is deterministic: the same texts give the same vocabulary and ids
    in every process. (The ``tokenizers`` WordPiece trainer numbers the ``##``
    continuation pieces in hash-map order, which changes ids and tie-broken
    merges between runs, huggingface/tokenizers#1794; here all of them are
    numbered in sorted order before training starts.)

    The result is a ``BertTokenizerFast`` that round-trips through
    ``save_pretrained`` and ``AutoTokenizer.from_pretrained``.
    ``model_max_length`` is saved with it when given.
    """
    corpus = list(texts)
    if not corpus:
        raise ValueError("train_tokenizer needs at least one text")
    for text in corpus:
        if not isinstance(text, str):
            raise TypeError(f"texts must be strings, got {type(text).__name__}")

    normalizer = _bert_normalizer(lowercase)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()

    # Every character that can follow another inside a word becomes a "##c"
    # piece. Declaring them up front, sorted, gives them fixed ids, which makes
    # the trainer's tie-breaking (and so the whole vocabulary) reproducible.
    continuations = sorted(
        {
            char
            for text in corpus
            for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text))
            for char in word[1:]
        }
    )
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size,
        special_tokens=[*SPECIAL_TOKENS, *(_PREFIX + c for c in continuations)],
        continuing_subword_prefix=_PREFIX,
        show_progress=False,
    )
    scratch = Tokenizer(models.WordPiece(unk_token="[UNK]", continuing_subword_prefix=_PREFIX))
    scratch.normalizer = normalizer
    scratch.pre_tokenizer = pre_tokenizer
    scratch.train_from_iterator(corpus, trainer=trainer)
    vocab: dict[str, int] = json.loads(scratch.to_str())["model"]["vocab"]

    # Rebuild from the vocabulary alone, so that only the real special tokens
    # (not the "##c" seeds) are registered as added tokens.
    backend = Tokenizer(
        models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix=_PREFIX)
    )
    backend.normalizer = _bert_normalizer(lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix=_PREFIX)
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS]:0 $A:0 [SEP]:0",
        pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )

    extra: dict[str, Any] = {}
    if model_max_length is not None:
        extra["model_max_length"] = model_max_length
    return BertTokenizerFast(
        tokenizer_object=backend,
        do_lower_case=lowercase,
        strip_accents=False,
        tokenize_chinese_chars=True,
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        **extra,
    )


def tiny_bert_config(
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 2,
    intermediate_size: int = 64,
    max_position_embeddings: int = 128,
    **kwargs: Any,
) -> BertConfig:
    """Return a small ``BertConfig``.

    Uses eager attention unless ``attn_implementation`` is given in ``kwargs``,
    so that ``output_attentions=True`` returns attention maps. Other ``kwargs``
    (``num_labels``, ``id2label``, ``pad_token_id``, dropout rates, ...) go to
    ``BertConfig`` unchanged.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size ({hidden_size}) must be a multiple of num_heads ({num_heads})")
    kwargs.setdefault("attn_implementation", "eager")
    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        **kwargs,
    )


def tiny_gpt2_config(vocab_size: int, **kwargs: Any) -> GPT2Config:
    """Return a small ``GPT2Config`` (a decoder-only LM) with the sizes and defaults of :func:`tiny_bert_config`."""
    sizes = {k: kwargs.pop(k) for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings") if k in kwargs}
    bert = tiny_bert_config(vocab_size, **sizes)  # the same sizes, checked the same way
    kwargs.setdefault("attn_implementation", "eager")
    return GPT2Config(vocab_size=vocab_size, n_embd=bert.hidden_size, n_layer=bert.num_hidden_layers, n_head=bert.num_attention_heads,
                      n_inner=bert.intermediate_size, n_positions=bert.max_position_embeddings, **kwargs)


def tiny_marian_config(vocab_size: int, **kwargs: Any) -> MarianConfig:
    """Return a small ``MarianConfig`` (an encoder-decoder translation model) with ``num_layers`` in each stack
    and the sizes of :func:`tiny_bert_config`."""
    sizes = {k: kwargs.pop(k) for k in ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_position_embeddings") if k in kwargs}
    bert = tiny_bert_config(vocab_size, **sizes)
    kwargs.setdefault("attn_implementation", "eager")
    return MarianConfig(vocab_size=vocab_size, d_model=bert.hidden_size, encoder_layers=bert.num_hidden_layers,
                        decoder_layers=bert.num_hidden_layers, encoder_attention_heads=bert.num_attention_heads,
                        decoder_attention_heads=bert.num_attention_heads, encoder_ffn_dim=bert.intermediate_size,
                        decoder_ffn_dim=bert.intermediate_size, max_position_embeddings=bert.max_position_embeddings, **kwargs)


def _label_kwargs(num_labels: int, id2label: dict | None) -> dict[str, Any]:
    if id2label is None:
        if num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {num_labels}")
        id2label = {i: f"LABEL_{i}" for i in range(num_labels)}
    id2label = {int(k): str(v) for k, v in id2label.items()}
    if sorted(id2label) != list(range(len(id2label))) or not id2label:
        raise ValueError(f"id2label keys must be 0..n-1, got {sorted(id2label)}")
    label2id = {label: i for i, label in id2label.items()}
    if len(label2id) != len(id2label):
        raise ValueError("id2label has duplicate labels")
    return {"num_labels": len(id2label), "id2label": id2label, "label2id": label2id}


def build_tiny_model(
    directory: str | Path,
    texts: Iterable[str],
    task: str = "sequence_classification",
    num_labels: int = 2,
    hidden_size: int = 32,
    num_layers: int = 2,
    seed: int = 0,
    tokenizer: PreTrainedTokenizerFast | None = None,
    id2label: dict | None = None,
    *,
    vocab_size: int = 1000,
    lowercase: bool = True,
    **config_kwargs: Any,
) -> Path:
    """Build a randomly initialised tiny BERT (a GPT-2 for ``causal_lm``) for ``task`` and save it to ``directory``.

    ``task`` is an installed task (``polydistill.tasks``): ``"sequence_classification"``,
    ``"token_classification"``, ``"embedding"`` (a bare ``BertModel``), ``"causal_lm"``, ...
    A tokenizer is trained on ``texts`` (with ``vocab_size`` and ``lowercase``)
    unless ``tokenizer`` is given. ``id2label``, when given, sets the labels and
    overrides ``num_labels``; both are ignored for a task without named labels.
    ``config_kwargs`` go to ``tiny_bert_config`` or ``tiny_gpt2_config`` (``num_heads``,
    ``intermediate_size``, ``max_position_embeddings``, ...).

    Weights depend only on ``seed`` and the configuration; the global torch RNG
    state is left as it was. Model and tokenizer are written with
    ``save_pretrained`` and load offline with the ``Auto*`` classes and
    ``AutoTokenizer``. Returns ``directory`` as a ``Path``.
    """
    from polydistill.errors import ConfigError
    from polydistill.tasks import get_task

    try:
        spec = get_task(task)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    directory = Path(directory)
    max_positions = int(config_kwargs.setdefault("max_position_embeddings", 128))

    if tokenizer is None:
        tokenizer = train_tokenizer(
            texts, vocab_size=vocab_size, lowercase=lowercase, model_max_length=max_positions
        )
    elif tokenizer.model_max_length > max_positions:
        # Keep the caller's object unchanged; the saved copy must not allow
        # inputs longer than the position embeddings.
        tokenizer = copy.deepcopy(tokenizer)
        tokenizer.model_max_length = max_positions
    if tokenizer.pad_token_id is None:
        raise ValueError("tokenizer has no pad token")

    if spec.named_labels:
        config_kwargs.update(_label_kwargs(num_labels, id2label))
    config_kwargs.setdefault("pad_token_id", tokenizer.pad_token_id)
    build = {"AutoModelForCausalLM": tiny_gpt2_config, "AutoModelForSeq2SeqLM": tiny_marian_config}.get(spec.auto_class, tiny_bert_config)
    if build is not tiny_bert_config:  # their own defaults lie outside a tiny vocabulary
        config_kwargs.setdefault("bos_token_id", tokenizer.cls_token_id if tokenizer.cls_token_id is not None else tokenizer.pad_token_id)
        config_kwargs.setdefault("eos_token_id", tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.pad_token_id)
    if build is tiny_marian_config:
        config_kwargs.setdefault("decoder_start_token_id", tokenizer.pad_token_id)
    config = build(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers, **config_kwargs)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = spec.model_class().from_config(config)
    model.eval()

    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)

    # transformers does not serialise the attention implementation; without it
    # a reloaded model falls back to sdpa and returns no attentions.
    attn = config._attn_implementation
    if attn is not None:
        config_path = directory / "config.json"
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        saved["attn_implementation"] = attn
        config_path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory
