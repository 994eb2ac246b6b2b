"""Tests for polydistill.tiny: tiny local BERT models and WordPiece tokenizers."""

from __future__ import annotations

import socket

import pytest
import torch
from transformers import (
    AutoModel,
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
)

from polydistill.tiny import SPECIAL_TOKENS, build_tiny_model, tiny_bert_config, train_tokenizer

TEXTS = [
    "The cat sleeps on the warm mat.",
    "A dog runs in the park every morning.",
    "Die Katze schläft über dem grünen Teppich.",
    "Der Hund läuft jeden Morgen durch den Park.",
    "Müller isst gern Brötchen mit Käse.",
    "Le chat dort à côté de la fenêtre.",
    "Le chien était très fatigué après la promenade.",
    "Où est le café? Ça va très bien.",
    "El niño come una manzana por la mañana.",
]

# One English, one German, one French sentence, of different lengths.
SENTENCES = [
    "The cat sleeps.",
    "Die Katze schläft über dem grünen Teppich.",
    "Le chien était à côté.",
]

AUTO_CLASSES = {
    "sequence_classification": AutoModelForSequenceClassification,
    "token_classification": AutoModelForTokenClassification,
    "embedding": AutoModel,
}


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXTS, vocab_size=300)


def _ids(tok, *args, **kwargs):
    return tok(*args, **kwargs)["input_ids"]


def test_tokenizer_special_tokens_and_templates(tokenizer):
    assert tokenizer.convert_ids_to_tokens(list(range(5))) == list(SPECIAL_TOKENS)
    assert tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 1
    single = tokenizer("über den Park")
    assert single["input_ids"][0] == tokenizer.cls_token_id
    assert single["input_ids"][-1] == tokenizer.sep_token_id
    pair = tokenizer("le chat", "die Katze", return_token_type_ids=True)
    tokens = tokenizer.convert_ids_to_tokens(pair["input_ids"])
    assert tokens.count("[SEP]") == 2 and tokens[0] == "[CLS]"
    first_sep = tokens.index("[SEP]")
    assert set(pair["token_type_ids"][: first_sep + 1]) == {0}
    assert set(pair["token_type_ids"][first_sep + 1 :]) == {1}


def test_accented_characters_are_not_unknown(tokenizer):
    for text in ["schläft über grünen Käse Brötchen", "était côté fenêtre Ça café", "mañana niño"]:
        ids = _ids(tokenizer, text, add_special_tokens=False)
        assert tokenizer.unk_token_id not in ids, tokenizer.convert_ids_to_tokens(ids)
        assert tokenizer.decode(ids) == text.lower()
    # A character never seen in training does map to [UNK]: the check above is meaningful.
    assert _ids(tokenizer, "Ω", add_special_tokens=False) == [tokenizer.unk_token_id]


def test_tokenizer_round_trip(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert reloaded.is_fast
    assert reloaded.get_vocab() == tokenizer.get_vocab()

    for kwargs in ({}, {"padding": True}, {"padding": "longest", "return_token_type_ids": True}):
        assert reloaded(SENTENCES, **kwargs).data == tokenizer(SENTENCES, **kwargs).data
    assert reloaded("le chat", "die Katze").data == tokenizer("le chat", "die Katze").data

    words = [s.split() for s in SENTENCES]
    a = tokenizer(words, is_split_into_words=True, padding="longest", return_tensors="pt")
    b = reloaded(words, is_split_into_words=True, padding="longest", return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    assert torch.equal(a["attention_mask"], b["attention_mask"])
    for i, sentence_words in enumerate(words):
        word_ids = b.word_ids(i)
        assert word_ids == a.word_ids(i)
        assert word_ids[0] is None  # [CLS]
        assert max(w for w in word_ids if w is not None) == len(sentence_words) - 1
    assert b["input_ids"].shape[1] == max(len(_ids(reloaded, w, is_split_into_words=True)) for w in words)


def test_cased_tokenizer_keeps_case(tmp_path):
    cased = train_tokenizer(TEXTS, vocab_size=300, lowercase=False)
    cased.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "Die Katze schläft"
    assert reloaded.decode(_ids(reloaded, text, add_special_tokens=False)) == text
    assert _ids(reloaded, SENTENCES, padding=True) == _ids(cased, SENTENCES, padding=True)


def test_training_is_deterministic():
    vocabs = [train_tokenizer(TEXTS, vocab_size=120).get_vocab() for _ in range(5)]
    assert all(v == vocabs[0] for v in vocabs[1:])


def test_tiny_bert_config():
    config = tiny_bert_config(100, hidden_size=16, num_layers=3, num_heads=4, num_labels=5)
    assert (config.vocab_size, config.hidden_size, config.num_hidden_layers) == (100, 16, 3)
    assert (config.num_attention_heads, config.intermediate_size) == (4, 64)
    assert config.max_position_embeddings == 128 and config.num_labels == 5
    assert config._attn_implementation == "eager"
    with pytest.raises(ValueError, match=r"^hidden_size \(30\) must be a multiple of num_heads \(4\)$"):
        tiny_bert_config(100, hidden_size=30, num_heads=4)


@pytest.mark.parametrize(
    ("task", "num_layers"),
    [("sequence_classification", 2), ("token_classification", 3), ("embedding", 1)],
)
def test_build_reload_forward(task, num_layers, tokenizer, tmp_path):
    path = build_tiny_model(
        tmp_path / task, TEXTS, task=task, num_labels=3, num_layers=num_layers, tokenizer=tokenizer
    )
    assert path == tmp_path / task
    model = AUTO_CLASSES[task].from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config._attn_implementation == "eager"
    assert not model.training

    batch = tok(SENTENCES, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], tokenizer(SENTENCES, padding=True, return_tensors="pt")["input_ids"])
    assert (batch["attention_mask"] == 0).any()  # really padded
    with torch.no_grad():
        out = model(**batch, output_hidden_states=True, output_attentions=True)

    n, length = batch["input_ids"].shape
    if task == "sequence_classification":
        assert out.logits.shape == (n, 3)
    elif task == "token_classification":
        assert out.logits.shape == (n, length, 3)
    else:
        assert out.last_hidden_state.shape == (n, length, 32)
    assert len(out.hidden_states) == num_layers + 1
    assert all(h.shape == (n, length, 32) for h in out.hidden_states)
    assert out.attentions is not None and len(out.attentions) == num_layers
    for attention in out.attentions:
        assert attention is not None and attention.shape == (n, 2, length, length)
        assert torch.allclose(attention.sum(-1), torch.ones(n, 2, length), atol=1e-5)


def test_build_trains_tokenizer_and_sets_labels(tmp_path):
    labels = {0: "neg", 1: "neu", 2: "pos"}
    path = build_tiny_model(tmp_path, TEXTS, id2label=labels, hidden_size=16, num_heads=4)
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert model.config.id2label == labels and model.config.label2id == {"neg": 0, "neu": 1, "pos": 2}
    assert model.config.vocab_size == len(tok) and model.config.pad_token_id == tok.pad_token_id
    assert tok.model_max_length == model.config.max_position_embeddings == 128
    ids = _ids(tok, "Müller café mañana", add_special_tokens=False)
    assert tok.unk_token_id not in ids
    assert model(**tok(SENTENCES, padding=True, return_tensors="pt")).logits.shape == (3, 3)


def test_same_seed_same_weights(tmp_path):
    def state(path):
        return AutoModelForTokenClassification.from_pretrained(path).state_dict()

    rng_before = torch.get_rng_state()
    a = state(build_tiny_model(tmp_path / "a", TEXTS, task="token_classification", seed=7))
    b = state(build_tiny_model(tmp_path / "b", TEXTS, task="token_classification", seed=7))
    c = state(build_tiny_model(tmp_path / "c", TEXTS, task="token_classification", seed=8))
    assert torch.equal(torch.get_rng_state(), rng_before)  # global RNG untouched
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert (tmp_path / "a" / "tokenizer.json").read_text() == (tmp_path / "b" / "tokenizer.json").read_text()


def test_loading_needs_no_network(tokenizer, tmp_path, monkeypatch):
    path = build_tiny_model(tmp_path, TEXTS, tokenizer=tokenizer)
    attempts = []

    def record(kind):
        def refuse(*args, **kwargs):
            attempts.append((kind, args[1:] if kind.startswith("socket.") else args))
            raise OSError(f"network disabled in this test ({kind})")  # what a machine without network raises

        return refuse

    # Not offline mode: loading must not reach for the network by itself. Every way out is recorded,
    # so an attempt counts even when the library catches the error and carries on.
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    for name in ("connect", "connect_ex", "sendto"):
        monkeypatch.setattr(socket.socket, name, record(f"socket.{name}"))
    for name in ("create_connection", "getaddrinfo", "gethostbyname"):
        monkeypatch.setattr(socket, name, record(name))
    model = AutoModelForSequenceClassification.from_pretrained(path)
    tok = AutoTokenizer.from_pretrained(path)
    assert attempts == []
    assert model.config.vocab_size == len(tok)  # both really loaded
    assert tok.get_vocab() == tokenizer.get_vocab()


def test_given_tokenizer_is_not_modified(tokenizer, tmp_path):
    before = tokenizer.model_max_length
    build_tiny_model(tmp_path, [], tokenizer=tokenizer, max_position_embeddings=64)
    assert tokenizer.model_max_length == before
    assert AutoTokenizer.from_pretrained(tmp_path).model_max_length == 64


def test_invalid_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown task"):
        build_tiny_model(tmp_path, TEXTS, task="translation")
    with pytest.raises(ValueError, match=r"^id2label keys must be 0\.\.n-1, got \[1, 2\]$"):
        build_tiny_model(tmp_path, TEXTS, id2label={1: "a", 2: "b"})
    with pytest.raises(ValueError, match="^train_tokenizer needs at least one text$"):
        train_tokenizer([])
