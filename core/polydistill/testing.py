"""Test helpers for plugin authors: tiny models, a tiny dataset, a one-call run, a hook recorder.

This module is a pytest plugin, registered in the ``pytest11`` entry-point
group, so a project that has polydistill installed gets these fixtures
without a conftest:

- ``tiny_models``: tiny teachers and students saved with ``save_pretrained``
  (``teacher``, ``teacher2``, ``wide``, ``embed``, ``tagger``, ``other_tok``);
- ``tiny_data``: the English–German dataset below as jsonl files
  (``parallel``, ``eval``, ``tokens``);
- ``tiny_trained_teacher``: ``teacher`` fine-tuned on the English side;
- ``tiny_config``: ``tiny_config(task=..., **overrides)`` builds a run config;
- ``run_plugin``: ``run_plugin(plugin, options, steps=2, task=...)`` trains a
  few steps with the plugin enabled and returns a :class:`PluginRun`;
- ``hook_recorder``: a fresh :class:`HookRecorder`.

Session fixtures build their models once per test session (about a second).
Importing this module loads neither torch nor transformers; the fixtures do,
when first used.
"""

from __future__ import annotations

import json
import os
import re
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from polydistill.hookspecs import hookimpl

__all__ = [
    "LABELS",
    "PAIRS",
    "TEXTS",
    "HookRecorder",
    "PluginRun",
    "StopAt",
    "assert_same_student",
    "build_tiny_models",
    "interrupted_and_resumed",
    "installed_plugins",
    "run_with_plugin",
    "tiny_config",
    "with_fields",
    "write_jsonl",
    "write_tiny_data",
]

LABELS = ["food", "sports", "weather"]
#: (English, German, label): a parallel, labelled topic dataset.
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
TAGS = ["O", "B-FOOD", "I-FOOD"]
_FOOD = {"soup", "bread", "pasta", "cake", "suppe", "brot", "nudeln", "kuchen"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def installed_plugins() -> dict[str, Any]:
    """The plugins polydistill finds through the entry-point group, by name, without importing them.

    Each value has ``distribution``, ``version``, ``value`` (``module:object``) and
    ``default``: what ``polydistill plugins`` lists. Use it to test that a package's
    entry point is registered.
    """
    from polydistill.plugins import installed_plugins as found

    return found()


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Build the tiny models into ``root``; returns ``{name: directory}``.

    ``teacher`` (4 layers), ``teacher2`` and ``wide`` (hidden size 48) classify
    ``LABELS``; ``embed`` is a bare encoder; ``tagger`` tags ``TAGS``;
    ``other_tok`` classifies with another vocabulary (a student that
    tokenizes differently); ``lm`` is a 4-layer GPT-2 language model, ``mt`` a
    2+2-layer Marian translation model, ``qa`` a 2-layer extractive QA model. All but
    ``other_tok`` share one tokenizer.
    Heads are random: use ``tiny_trained_teacher`` for a teacher that knows
    the labels.
    """
    from polydistill.tiny import build_tiny_model, train_tokenizer

    root = Path(root)
    tok = train_tokenizer(TEXTS, vocab_size=300)
    id2label = dict(enumerate(LABELS))
    return {
        "teacher": build_tiny_model(root / "teacher", TEXTS, tokenizer=tok, id2label=id2label, num_layers=4, seed=1),
        "teacher2": build_tiny_model(root / "teacher2", TEXTS, tokenizer=tok, id2label=id2label, num_layers=2, seed=2),
        "wide": build_tiny_model(root / "wide", TEXTS, tokenizer=tok, id2label=id2label, num_layers=2, hidden_size=48, num_heads=2, seed=3),
        "embed": build_tiny_model(root / "embed", TEXTS, task="embedding", tokenizer=tok, num_layers=2, seed=4),
        "tagger": build_tiny_model(root / "tagger", TEXTS, task="token_classification", tokenizer=tok,
                                   id2label=dict(enumerate(TAGS)), num_layers=2, seed=5),
        "other_tok": build_tiny_model(root / "other_tok", TEXTS, tokenizer=train_tokenizer(TEXTS, vocab_size=120, lowercase=False),
                                      id2label=id2label, num_layers=2, seed=6),
        "lm": build_tiny_model(root / "lm", TEXTS, task="causal_lm", tokenizer=tok, num_layers=4, seed=7),
        "mt": build_tiny_model(root / "mt", TEXTS, task="seq2seq", tokenizer=tok, num_layers=2, seed=8),
        "qa": build_tiny_model(root / "qa", TEXTS, task="question_answering", tokenizer=tok, num_layers=2, seed=9),
    }


def write_tiny_data(root: Path) -> dict[str, Path]:
    """Write the dataset as jsonl files into ``root``; returns ``{name: path}``.

    ``parallel``: columns en, de, label, lang (``de``); ``eval``: text, label
    and lang, each sentence in both languages; ``tokens``: words, tags (food
    words are ``B-FOOD``) and lang.
    """
    root = Path(root)
    rows = [{"en": en, "de": de, "label": label} for en, de, label in PAIRS]
    tokens = [
        {"words": text.split(), "tags": ["B-FOOD" if w in _FOOD else "O" for w in text.split()], "lang": lang}
        for en, de, _ in PAIRS for text, lang in ((en, "en"), (de, "de"))
    ]
    return {
        "parallel": write_jsonl(root / "parallel.jsonl", [{**r, "lang": "de"} for r in rows]),
        "eval": write_jsonl(root / "eval.jsonl", [{"text": r["de"], "label": r["label"], "lang": "de"} for r in rows]
                            + [{"text": r["en"], "label": r["label"], "lang": "en"} for r in rows]),
        "tokens": write_jsonl(root / "tokens.jsonl", tokens),
        "qa": write_jsonl(root / "qa.jsonl", qa_rows()),
    }


def qa_rows(sentences: int = 4) -> list[dict[str, Any]]:
    """Extractive QA rows in both languages of ``PAIRS``: a context of ``sentences`` consecutive sentences,
    a question (one sentence without its last word) and its answer (that word), SQuAD-style
    (``answers: {text, answer_start}``), with ``lang``."""
    rows = []
    for side, lang in ((0, "en"), (1, "de")):
        texts = [p[side] for p in PAIRS]
        for i in range(len(texts)):
            chosen = [texts[(i + k) % len(texts)] for k in range(sentences)]
            context = " . ".join(chosen) + " ."
            asked = chosen[i % sentences]
            *head, last = asked.split()
            start = context.index(asked) + len(asked) - len(last)
            rows.append({"question": " ".join(head) + " ?", "context": context,
                         "answers": {"text": [last], "answer_start": [start]}, "lang": lang})
    return rows


def tiny_config(models: dict[str, Path], data: dict[str, Path], tmp_path: Path, task: str = "sequence_classification", **overrides: Any) -> dict:
    """A small run config for ``task``, writing to ``tmp_path / "run"``.

    - ``sequence_classification``: parallel mode, ``teacher`` reads English,
      a 2-layer student cut from it reads German; evaluated on both languages.
    - ``embedding``: parallel mode, ``embed`` teaches a student cut from it;
      evaluated by retrieval of each German sentence's English translation.
    - ``token_classification``: same mode, ``tagger`` teaches a student cut
      from it on word lists.
    - ``causal_lm``: same mode, ``lm`` teaches a 2-layer student cut from it
      the next tokens of the en/de sentences; evaluated on the same sentences.
    - ``seq2seq``: ``mt`` teaches a 1+1-layer student cut from it to translate
      English into German; evaluated by BLEU/chrF on the same pairs.
    - ``question_answering``: ``qa`` teaches a 1-layer student cut from it the
      answer spans of ``qa_rows`` (contexts longer than ``max_length`` 24, in
      windows); evaluated by exact match and F1 on the same rows.

    ``overrides`` set fields by path, with ``__`` between the parts:
    ``training__max_steps=3``, ``plugins={"kd": False}``.
    """
    parallel = {"path": str(data["parallel"]), "columns": {"text": "de", "source": "en", "lang": "lang"}}
    runs = {  # task -> teacher, mode, training and evaluation data of its tiny run
        "sequence_classification": ("teacher", "parallel", parallel,
                                    {"path": str(data["eval"]), "columns": {"label": "label", "lang": "lang"}}),
        "embedding": ("embed", "parallel", parallel, parallel),
        "token_classification": ("tagger", "same", {"path": str(data["tokens"]), "columns": {"text": "words", "lang": "lang"}},
                                 {"path": str(data["tokens"]), "columns": {"text": "words", "label": "tags", "lang": "lang"}}),
        "causal_lm": ("lm", "same", {"path": str(data["eval"]), "columns": {"text": "text", "lang": "lang"}},
                      {"path": str(data["eval"]), "columns": {"text": "text", "lang": "lang"}}),
        "seq2seq": ("mt", "same", translate := {"path": str(data["parallel"]), "columns": {"text": "en", "target": "de", "lang": "lang"}},
                    translate),
        "question_answering": ("qa", "same", qa := {"path": str(data["qa"]), "columns": {
            "text": "question", "context": "context", "target": "answers", "lang": "lang"}}, qa),
    }
    if task not in runs:
        raise ValueError(f"unknown task {task!r}; tiny_config has runs for {', '.join(sorted(runs))}")
    teacher, mode, train, evaluation = runs[task]
    # contexts longer than one window, so the tiny run cuts them
    data_fields = {"question_answering": {"max_length": 24, "doc_stride": 4}}.get(task, {})
    cut = {"teacher": [0, 2], "mt": [0], "qa": [0]}.get(teacher, [0, 1])  # the mt student keeps one block of each stack
    student: dict[str, Any] = {"from_teacher": {"layers": cut, **({"decoder_layers": [0]} if teacher == "mt" else {})}}
    cfg: dict[str, Any] = {
        "task": task,
        "mode": mode,
        "teachers": [{"model": str(models[teacher]), "name": "teacher"}],
        "student": student,
        "data": {"train": train, "eval": evaluation, "batch_size": 4, **data_fields},
        "training": {"epochs": 1, "learning_rate": 1e-3, "progress": False, "log_every": 1, "seed": 3},
        "output_dir": str(Path(tmp_path) / "run"),
    }
    return with_fields(cfg, **overrides)


def with_fields(cfg: dict[str, Any], **fields: Any) -> dict[str, Any]:
    """``cfg`` with fields set by path, ``__`` between the parts (``training__max_steps=3``); changed in place."""
    for key, value in fields.items():
        node = cfg
        *parents, last = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[last] = value
    return cfg


@dataclass
class PluginRun:
    """What :func:`run_with_plugin` returns."""

    #: The ``polydistill.loop.Trainer`` after training (``trainer.state`` is the TrainState).
    trainer: Any
    #: The plugin instance the run used.
    plugin: Any
    #: Every logged row: one per step (``log_every`` is 1), plus evaluations.
    history: list[dict[str, Any]]
    #: The final evaluation's metrics (``{}`` without eval data).
    metrics: dict[str, Any]

    @property
    def steps(self) -> list[dict[str, Any]]:
        """The logged training steps (rows with a ``loss``)."""
        return [row for row in self.history if "loss" in row]

    def term(self, name: str) -> list[float]:
        """The logged values of loss term (or penalty) ``name``, one per step."""
        return [row.get(f"loss/{name}", row.get(f"reg/{name}")) for row in self.steps]


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def run_with_plugin(
    plugin: Any,
    config: dict | Any,
    options: dict[str, Any] | None = None,
    steps: int | None = 2,
    name: str | None = None,
    extra: list[tuple[str, Any]] = (),  # type: ignore[assignment]
) -> PluginRun:
    """Train ``steps`` steps of ``config`` with ``plugin`` enabled with ``options``.

    ``plugin`` is an installed plugin's name (found through its entry point,
    as in a real run), or a plugin class, module or object registered
    directly under ``name`` (default: the class name in snake_case). A class
    is validated and instantiated like an installed one. ``extra`` registers
    more ``(name, object)`` plugins (a :class:`HookRecorder`, say).
    ``steps=None`` keeps the config's own length.
    """
    from polydistill.config import load_config
    from polydistill.loop import Trainer

    cfg = load_config(config)
    data = cfg.to_dict()
    if isinstance(plugin, str):
        name, given = plugin, []
    else:
        name = name or _snake(getattr(plugin, "__name__", type(plugin).__name__))
        given = [(name, plugin)]
    data["plugins"] = {**data["plugins"], name: options or {}}
    data["training"]["log_every"] = 1
    if steps is not None:
        data["training"]["max_steps"] = steps
    trainer = Trainer(load_config(data, base_dir=cfg._base_dir), plugins=[*given, *extra])
    metrics = trainer.fit()
    return PluginRun(trainer, trainer.host.get(name), trainer.state.history, metrics)


class HookRecorder:
    """A plugin that implements every hook and records each call in order.

    ``calls`` lists hook names; ``records`` pairs each name with the keyword
    arguments the hook received. It answers nothing, except ``state_dict``
    (``{"calls": n}``) so that a resumed run calls its ``load_state_dict``;
    ``restored`` is what that received.
    """

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.records: list[tuple[str, dict[str, Any]]] = []
        self.restored: dict[str, Any] | None = None

    def _record(self, hook: str, **kwargs: Any) -> None:
        self.calls.append(hook)
        self.records.append((hook, kwargs))

    def seen(self, hook: str) -> list[dict[str, Any]]:
        """The keyword arguments of every call of ``hook``."""
        return [kwargs for name, kwargs in self.records if name == hook]

    @hookimpl
    def trainable_modules(self, state):
        self._record("trainable_modules", state=state)

    @hookimpl
    def setup(self, state):
        self._record("setup", state=state)

    @hookimpl
    def augment_batch(self, batch, state):
        self._record("augment_batch", batch=batch, state=state)

    @hookimpl
    def select_teachers(self, batch, teachers, state):
        self._record("select_teachers", batch=batch, teachers=teachers, state=state)

    @hookimpl
    def teacher_outputs(self, batch, teachers, weights, state):
        self._record("teacher_outputs", batch=batch, teachers=teachers, weights=weights, state=state)

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        self._record("loss_terms", batch=batch, student_out=student_out, teacher_out=teacher_out, state=state)

    @hookimpl
    def regularize(self, student, state):
        self._record("regularize", student=student, state=state)

    @hookimpl
    def on_step_end(self, state, logs):
        self._record("on_step_end", state=state, logs=dict(logs))

    @hookimpl
    def on_evaluate(self, state, metrics):
        self._record("on_evaluate", state=state, metrics=metrics)

    @hookimpl
    def state_dict(self, state):
        self._record("state_dict", state=state)
        return {"calls": len(self.calls)}

    @hookimpl
    def load_state_dict(self, state, plugin_state):
        self._record("load_state_dict", state=state, plugin_state=plugin_state)
        self.restored = plugin_state

    @hookimpl
    def on_train_end(self, state, metrics):
        self._record("on_train_end", state=state, metrics=metrics)



class StopAt:
    """A plugin that sends this process SIGINT after step ``step``, like a user pressing Ctrl-C.

    The run writes a checkpoint and raises ``KeyboardInterrupt``: use it to
    test that a plugin's state survives ``resume``.
    """

    def __init__(self, step: int) -> None:
        self.step = step

    @hookimpl
    def on_step_end(self, state, logs):
        if state.step == self.step:
            os.kill(os.getpid(), signal.SIGINT)


def interrupted_and_resumed(config: dict[str, Any], step: int, plugins: Any = ()) -> Any:
    """Train ``config`` until Ctrl-C after ``step`` steps, then ``--resume`` it to the end; the resumed run's result."""
    import polydistill

    with pytest.raises(KeyboardInterrupt):
        polydistill.train(config, plugins=[*plugins, ("stop", StopAt(step))])
    return polydistill.train(config, plugins=list(plugins), resume=Path(config["output_dir"]))


def assert_same_student(a: Any, b: Any) -> None:
    """The students two runs (``RunResult``) saved are equal tensor by tensor, bit for bit."""
    import torch
    from safetensors.torch import load_file

    wa, wb = (load_file(str(r.output_dir / "student" / "model.safetensors")) for r in (a, b))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=0, msg=key)


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="session", name="tiny_models")
def _tiny_models_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """:func:`build_tiny_models`, once per session."""
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"))


@pytest.fixture(scope="session", name="tiny_data")
def _tiny_data_fixture(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """:func:`write_tiny_data`, once per session."""
    return write_tiny_data(tmp_path_factory.mktemp("tiny-data"))


@pytest.fixture(scope="session", name="tiny_trained_teacher")
def _tiny_trained_teacher_fixture(tiny_models: dict[str, Path], tiny_data: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``teacher`` fine-tuned on the English sentences only (a plain fine-tuning run); its student directory."""
    import polydistill

    root = tmp_path_factory.mktemp("tiny-trained")
    cfg = {
        "task": "sequence_classification",
        "labels": LABELS,
        "student": {"model": str(tiny_models["teacher"])},
        "data": {"train": {"path": str(tiny_data["eval"]), "columns": {"label": "label", "lang": "lang"},
                           "filter": {"lang": "en"}}, "batch_size": 4},
        "training": {"epochs": 60, "learning_rate": 5e-3, "progress": False, "seed": 0},
        "output_dir": str(root / "run"),
    }
    return polydistill.train(cfg).student_dir


@pytest.fixture(name="tiny_config")
def _tiny_config_fixture(tiny_models: dict[str, Path], tiny_data: dict[str, Path], tmp_path: Path) -> Callable[..., dict]:
    """``tiny_config(task="sequence_classification", **overrides)``: see :func:`polydistill.testing.tiny_config`."""
    return lambda task="sequence_classification", **overrides: tiny_config(tiny_models, tiny_data, tmp_path, task, **overrides)


@pytest.fixture(name="run_plugin")
def _run_plugin_fixture(tiny_models: dict[str, Path], tiny_data: dict[str, Path], tmp_path: Path) -> Callable[..., PluginRun]:
    """``run_plugin(plugin, options=None, steps=2, task=..., name=None, extra=(), **overrides)``.

    Trains on the tiny config of ``task`` (``overrides`` as for ``tiny_config``)
    with ``plugin`` enabled; see :func:`run_with_plugin`.
    """
    counter = iter(range(1_000_000))

    def run(plugin: Any, options: dict[str, Any] | None = None, steps: int | None = 2, task: str = "sequence_classification",
            name: str | None = None, extra: list[tuple[str, Any]] = (), **overrides: Any) -> PluginRun:  # type: ignore[assignment]
        cfg = tiny_config(tiny_models, tiny_data, tmp_path / f"run{next(counter)}", task, **overrides)
        return run_with_plugin(plugin, cfg, options, steps, name, extra)

    return run


@pytest.fixture(name="hook_recorder")
def _hook_recorder_fixture() -> HookRecorder:
    """A fresh :class:`HookRecorder`; pass it as ``extra=[("recorder", hook_recorder)]``."""
    return HookRecorder()

