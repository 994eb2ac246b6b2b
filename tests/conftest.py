"""Shared fixtures: tiny real models and a small parallel dataset, all built offline in a temp dir."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
import torch

from polydistill import hookimpl
from polydistill.tiny import build_tiny_model, train_tokenizer

# Tiny models run fastest on one thread; more only add scheduling overhead (and
# fight over the cores with anything else running).
torch.set_num_threads(1)

LABELS = ["food", "sports", "weather"]
PAIRS = [
    ("the soup is hot", "die suppe ist heiß", "food"),
    ("i eat fresh bread", "ich esse frisches brot", "food"),
    ("we cook pasta tonight", "wir kochen heute nudeln", "food"),
    ("the cake tastes sweet", "der kuchen schmeckt süß", "food"),
    ("the team won the match", "das team hat das spiel gewonnen", "sports"),
    ("she runs every morning", "sie läuft jeden morgen", "sports"),
    ("he scored a goal", "er hat ein tor geschossen", "sports"),
    ("the coach trains the players", "der trainer trainiert die spieler", "sports"),
    ("it rains all day", "es regnet den ganzen tag", "weather"),
    ("the wind is cold", "der wind ist kalt", "weather"),
    ("snow falls in the mountains", "schnee fällt in den bergen", "weather"),
    ("the sun shines today", "die sonne scheint heute", "weather"),
]
TEXTS = [t for en, de, _ in PAIRS for t in (en, de)]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny teachers and a differently tokenized student, saved with save_pretrained."""
    root = tmp_path_factory.mktemp("models")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    id2label = dict(enumerate(LABELS))
    return {
        "teacher": build_tiny_model(root / "teacher", TEXTS, tokenizer=tok, id2label=id2label, num_layers=4, seed=1),
        "teacher2": build_tiny_model(root / "teacher2", TEXTS, tokenizer=tok, id2label=id2label, num_layers=2, seed=2),
        "wide": build_tiny_model(root / "wide", TEXTS, tokenizer=tok, id2label=id2label, num_layers=2, hidden_size=48, num_heads=2, seed=3),
        "embed": build_tiny_model(root / "embed", TEXTS, task="embedding", tokenizer=tok, num_layers=2, seed=4),
        "tagger": build_tiny_model(root / "tagger", TEXTS, task="token_classification", tokenizer=tok,
                                   id2label={0: "O", 1: "B-FOOD", 2: "I-FOOD"}, num_layers=2, seed=5),
        # Another vocabulary: a student that tokenizes differently from the teachers.
        "other_tok": build_tiny_model(root / "other_tok", TEXTS, tokenizer=train_tokenizer(TEXTS, vocab_size=120, lowercase=False),
                                      id2label=id2label, num_layers=2, seed=6),
    }


@pytest.fixture(scope="session")
def data(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    rows = [{"en": en, "de": de, "label": label} for en, de, label in PAIRS]
    return {
        "parallel": write_jsonl(root / "parallel.jsonl", [{**r, "lang": "de"} for r in rows]),
        "eval": write_jsonl(root / "eval.jsonl", [{"text": r["de"], "label": r["label"], "lang": "de"} for r in rows]
                            + [{"text": r["en"], "label": r["label"], "lang": "en"} for r in rows]),
    }


def parallel_config(models: dict[str, Path], data: dict[str, Path], tmp_path: Path, **extra) -> dict:
    """A parallel-mode sequence-classification run: teacher reads `en`, student reads `de`."""
    cfg = {
        "task": "sequence_classification",
        "mode": "parallel",
        "teachers": [{"model": str(models["teacher"]), "name": "teacher"}],
        "student": {"from_teacher": {"layers": [0, 2]}},
        "data": {
            "train": {"path": str(data["parallel"]), "columns": {"text": "de", "source": "en", "lang": "lang"}},
            "eval": {"path": str(data["eval"]), "columns": {"label": "label", "lang": "lang"}},
            "batch_size": 4,
        },
        "training": {"epochs": 1, "learning_rate": 1e-3, "progress": False, "log_every": 1, "seed": 3},
        "output_dir": str(tmp_path / "run"),
    }
    for key, value in extra.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


@pytest.fixture(scope="session")
def trained_teacher(models, data, tmp_path_factory) -> Path:
    """The tiny teacher fine-tuned on the English side only (plain fine-tuning through polydistill)."""
    import polydistill

    root = tmp_path_factory.mktemp("trained")
    cfg = {
        "task": "sequence_classification",
        "labels": LABELS,
        "student": {"model": str(models["teacher"])},
        "data": {"train": {"path": str(data["eval"]), "columns": {"label": "label", "lang": "lang"},
                           "filter": {"lang": "en"}}, "batch_size": 4},
        "training": {"epochs": 60, "learning_rate": 5e-3, "progress": False, "seed": 0},
        "output_dir": str(root / "run"),
    }
    return polydistill.train(cfg).student_dir


class StopAt:
    """A plugin that sends this process SIGINT after a given step, like a user pressing Ctrl-C."""

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_step_end(self, state, logs):
        if state.step == self.step:
            os.kill(os.getpid(), signal.SIGINT)
