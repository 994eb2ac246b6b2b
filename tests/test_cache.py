"""Teacher-output cache: the teacher runs once per text, results do not change, stale entries never hit."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import polydistill
from polydistill import hookimpl, models as M
from polydistill.cache import TeacherCache, fingerprint, read_settings, stack_padded

from conftest import PAIRS, parallel_config, write_jsonl

# What the unit tests below key entries with (any JSON-able dict works).
SETTINGS = {"task": "sequence_classification", "pooling": "mean", "max_length": 128}


class TeacherCalls:
    """Counts forward passes of the first teacher, per epoch, and what the teacher read."""

    def __init__(self) -> None:
        self.per_epoch: Counter[int] = Counter()
        self.steps_per_epoch: Counter[int] = Counter()
        self.read: list[list[int]] = []

    @hookimpl
    def setup(self, state):
        self.state = state
        self.tokenizer = state.teacher_tokenizers[0]
        state.teachers[0].register_forward_hook(self._seen, with_kwargs=True)

    def _seen(self, module, args, kwargs, output):
        self.per_epoch[self.state.epoch] += 1
        self.read.extend(kwargs["input_ids"].tolist())

    @hookimpl
    def on_step_end(self, state, logs):
        self.steps_per_epoch[state.epoch] += 1

    def texts_read(self) -> list[str]:
        return self.tokenizer.batch_decode(self.read, skip_special_tokens=True)

    def ids_read(self) -> list[list[int]]:
        pad = self.tokenizer.pad_token_id
        return [[i for i in ids if i != pad] for ids in self.read]


class Exclaim:
    """Changes what the teacher reads for one English sentence only."""

    def __init__(self, target: str) -> None:
        self.target = target
        self.changed_steps: list[int] = []

    @hookimpl
    def augment_batch(self, batch, state):
        if self.target not in batch.teacher_texts:
            return None
        self.changed_steps.append(state.step)
        return batch.replace_texts(teacher_texts=[t + " !" if t == self.target else t for t in batch.teacher_texts])


def _cfg(models, data, tmp_path, cache_dir, name="run", **extra):
    cfg = parallel_config(models, data, tmp_path, **extra)
    cfg["output_dir"] = str(tmp_path / name)
    if cache_dir is not None:
        cfg["cache"] = {"enabled": True, "dir": str(cache_dir)}
    return cfg


def _train(cfg, *plugins):
    return polydistill.train(cfg, plugins=[(type(p).__name__.lower(), p) for p in plugins])


def _weights(result):
    return load_file(str(result.student_dir / "model.safetensors"))


BATCHES = len(PAIRS) // 4  # parallel_config: 12 rows, batch_size 4


def test_teacher_runs_in_the_first_epoch_only_and_not_again_in_a_second_run(models, data, tmp_path):
    cache = tmp_path / "cache"
    calls = TeacherCalls()
    _train(_cfg(models, data, tmp_path, cache, training__epochs=3), calls)
    assert calls.steps_per_epoch == {0: BATCHES, 1: BATCHES, 2: BATCHES}
    assert calls.per_epoch == {0: BATCHES}
    assert sorted(calls.texts_read()) == sorted(en for en, _, _ in PAIRS)

    again = TeacherCalls()
    _train(_cfg(models, data, tmp_path, cache, name="run2", training__epochs=2), again)
    assert again.steps_per_epoch == {0: BATCHES, 1: BATCHES}
    assert again.per_epoch == {}


def test_cache_does_not_change_the_trained_student(models, data, tmp_path):
    overrides = dict(training__epochs=2)
    plain_calls = TeacherCalls()
    plain = _weights(_train(_cfg(models, data, tmp_path, None, name="plain", **overrides), plain_calls))
    assert plain_calls.per_epoch == {0: BATCHES, 1: BATCHES}  # no cache: the teacher runs every step
    cold = _weights(_train(_cfg(models, data, tmp_path, tmp_path / "cache", name="cold", **overrides)))
    warm = _weights(_train(_cfg(models, data, tmp_path, tmp_path / "cache", name="warm", **overrides)))
    assert plain.keys() == cold.keys() == warm.keys()
    for key in plain:  # measured: bit-identical (float32 storage); 1e-6 leaves room for BLAS differences
        torch.testing.assert_close(cold[key], plain[key], rtol=0, atol=1e-6, msg=key)
        torch.testing.assert_close(warm[key], plain[key], rtol=0, atol=1e-6, msg=key)
    # and training did move the weights, so the comparison means something
    start = M.student_from_teacher(M.load_model(str(models["teacher"]), "sequence_classification"), [0, 2],
                                   "sequence_classification", None).state_dict()
    assert not torch.equal(start["classifier.weight"], plain["classifier.weight"])


def test_augmented_teacher_texts_miss_the_cache(models, data, tmp_path):
    cache = tmp_path / "cache"
    _train(_cfg(models, data, tmp_path, cache))  # every original text is cached now
    target = PAIRS[0][0]
    calls, exclaim = TeacherCalls(), Exclaim(target)
    _train(_cfg(models, data, tmp_path, cache, name="aug", training__epochs=2), calls, exclaim)
    # the teacher runs once, on the changed text alone (its batch-mates are cached); in the
    # second epoch the changed text is cached too
    assert len(exclaim.changed_steps) == 2
    assert calls.per_epoch == {0: 1}
    tok = M.load_tokenizer(str(models["teacher"]))
    assert calls.ids_read() == [tok(target + " !")["input_ids"]]

    # the entry stored for the changed text is the teacher's output on the changed text
    teacher = M.load_model(str(models["teacher"]), "sequence_classification").eval()
    run_config = polydistill.load_config(_cfg(models, data, tmp_path, cache, name="aug"))
    entry = TeacherCache(cache, fingerprint(teacher), read_settings(run_config.task, run_config.pooling, run_config.data.max_length,
                                                                    run_config.training.mixed_precision, tok))
    stored = entry.get_many([target + " !"])
    assert stored is not None
    with torch.no_grad():
        logits = teacher(**tok([target + " !"], return_tensors="pt")).logits[0].numpy()
        plain_logits = teacher(**tok([target], return_tensors="pt")).logits[0].numpy()
    # (the untrained tiny teacher's logits are small: they differ by ~3e-5 between the two texts)
    np.testing.assert_allclose(stored[0], logits, rtol=0, atol=1e-6)
    assert np.abs(stored[0] - plain_logits).max() > 1e-5
    entry.close()


def test_each_source_runs_once_when_both_sides_of_a_pair_read_it(models, data, tmp_path):
    # the multilingual-embedding recipe: one row per side of a pair, both with the English source
    rows = [{"text": t, "source": en} for en, de, _ in PAIRS for t in (de, en)]
    both = write_jsonl(tmp_path / "both.jsonl", rows)
    train = {"path": str(both), "columns": {"text": "text", "source": "source"}}
    extra = dict(data__train=train, data__batch_size=6, training__epochs=2)
    calls = TeacherCalls()
    cached = _weights(_train(_cfg(models, data, tmp_path, tmp_path / "cache", name="cached", **extra), calls))
    # the first epoch reads each source once, although each is read by two rows, in one batch or two
    assert sorted(calls.texts_read()) == sorted(en for en, _, _ in PAIRS)
    assert calls.steps_per_epoch == {0: 4, 1: 4}
    plain = _weights(_train(_cfg(models, data, tmp_path, None, name="plain", **extra)))
    for key in plain:  # running a subset of a batch gives the same outputs
        torch.testing.assert_close(cached[key], plain[key], rtol=0, atol=1e-6, msg=key)


def test_a_different_teacher_does_not_reuse_entries(models, data, tmp_path):
    cache = tmp_path / "cache"
    _train(_cfg(models, data, tmp_path, cache))
    calls = TeacherCalls()
    cfg = _cfg(models, data, tmp_path, cache, name="other", training__epochs=2,
               teachers=[{"model": str(models["teacher2"]), "name": "teacher"}],
               student={"from_teacher": {"layers": [0, 1]}})
    _train(cfg, calls)
    assert calls.per_epoch == {0: BATCHES}


# --------------------------------------------------------------------------- units


def test_teacher_cache_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    texts = ["a", "b c", ["word", "list"], "ü ñ 字"]
    arrays = [rng.normal(size=3).astype(np.float32), rng.normal(size=3).astype(np.float32),
              rng.normal(size=(2, 3)).astype(np.float32), rng.normal(size=3).astype(np.float32)]
    cache = TeacherCache(tmp_path, "fp", SETTINGS)
    assert cache.get_many(texts) is None and cache.misses == 4
    cache.put_many(texts, arrays)
    got = cache.get_many(texts[::-1] + ["a"])
    assert got is not None and cache.hits == 5
    for g, a in zip(got, arrays[::-1] + [arrays[0]]):
        assert g.dtype == np.float32 and g.shape == a.shape
        np.testing.assert_array_equal(g, a)
    assert cache.get_many(["a", "not cached"]) is None  # all or nothing
    found = cache.lookup(["not cached", "a"])
    assert found[0] is None and np.array_equal(found[1], arrays[0])
    assert cache.get_many([["word", "list"]]) is not None and cache.get_many(["word list"]) is None
    cache.close()

    # entries persist, and are separate per teacher fingerprint and per settings
    again = TeacherCache(tmp_path, "fp", SETTINGS)
    np.testing.assert_array_equal(again.get_many(["b c"])[0], arrays[1])
    assert TeacherCache(tmp_path, "other-fp", SETTINGS).get_many(["a"]) is None
    assert TeacherCache(tmp_path, "fp", {**SETTINGS, "max_length": 64}).get_many(["a"]) is None

    half = TeacherCache(tmp_path / "f16", "fp", SETTINGS, dtype="float16")
    half.put_many(["a"], [arrays[0]])
    np.testing.assert_allclose(half.get_many(["a"])[0], arrays[0], rtol=1e-3)


def test_stack_padded_pads_word_level_arrays():
    a, b = np.ones((2, 3), np.float32), np.full((4, 3), 2, np.float32)
    out = stack_padded([a, b], "cpu")
    assert out.shape == (2, 4, 3) and out.dtype == torch.float32
    assert out[0, 2:].abs().sum() == 0 and torch.equal(out[1], torch.full((4, 3), 2.0))
    assert stack_padded([np.zeros(3, np.float16), np.ones(3, np.float16)], "cpu").shape == (2, 3)


def test_fingerprint_follows_the_weights(models):
    a = M.load_model(str(models["teacher"]), "sequence_classification")
    b = M.load_model(str(models["teacher"]), "sequence_classification")
    assert fingerprint(a) == fingerprint(b)
    before = fingerprint(b)
    with torch.no_grad():
        b.bert.encoder.layer[1].attention.self.query.weight[3, 5] += 1e-3
    assert fingerprint(b) != before
    with torch.no_grad():
        b.bert.encoder.layer[1].attention.self.query.weight.copy_(a.bert.encoder.layer[1].attention.self.query.weight)
    assert fingerprint(b) == before
    assert fingerprint(M.load_model(str(models["teacher2"]), "sequence_classification")) != before


def test_fingerprint_does_not_depend_on_where_the_model_was_loaded_from(models, tmp_path):
    import shutil

    copy = shutil.copytree(models["teacher"], tmp_path / "moved-teacher")
    a = M.load_model(str(models["teacher"]), "sequence_classification")
    b = M.load_model(str(copy), "sequence_classification")
    assert fingerprint(a) == fingerprint(b)


def test_fingerprint_of_a_model_with_a_scalar_tensor(models):
    model = M.load_model(str(models["teacher"]), "sequence_classification")
    model.register_buffer("temperature", torch.tensor(2.0))  # 0-dim, like CLIP's logit_scale
    before = fingerprint(model)
    model.temperature.fill_(3.0)
    assert fingerprint(model) != before


def _words_data(path):
    from conftest import write_jsonl

    rows = []
    for en, de, label in PAIRS:
        for text in (en, de):
            words = text.split()
            rows.append({"words": words, "text": text,
                         "tags": ["B-FOOD" if label == "food" and i == len(words) - 1 else "O" for i in range(len(words))]})
    return write_jsonl(path, rows)


@pytest.mark.parametrize("task", ["token_classification", "embedding"])
def test_cache_for_word_level_logits_and_embeddings(models, tmp_path, task):
    """Word-level logits are stored per text with their own length and padded back on a hit."""
    path = _words_data(tmp_path / "rows.jsonl")
    columns = {"text": "words", "label": "tags"} if task == "token_classification" else {"text": "text"}

    def cfg(name, cache):
        out = {"task": task, "teachers": [{"model": str(models["tagger" if task == "token_classification" else "embed"])}],
               "student": {"from_teacher": {"layers": [1]}},
               "data": {"train": {"path": str(path), "columns": columns}, "batch_size": 5},
               "training": {"epochs": 2, "learning_rate": 1e-3, "progress": False, "seed": 3},
               "output_dir": str(tmp_path / name)}
        if cache:
            out["cache"] = {"enabled": True, "dir": str(tmp_path / "cache")}
        return out

    plain = _weights(_train(cfg("plain", False)))
    calls = TeacherCalls()
    cached = _weights(_train(cfg("cached", True), calls))
    batches = -(-2 * len(PAIRS) // 5)
    assert calls.steps_per_epoch == {0: batches, 1: batches}
    assert calls.per_epoch == {0: batches}
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_cached_token_logits_survive_truncation(models, tmp_path, padding_side):
    """A batch whose longest sentence is cut by max_length trains alike with the cache on and off.

    Each cached row holds only its surviving words; the batch's word mask is as
    wide as its longest sentence, so cached logits are padded back to it (issue 14).
    With left padding, trimming all-padding columns must not shift word positions.
    """
    long = "the soup with bread and cheese is on the table in the kitchen of the house by the sea".split()
    assert len(long) == 19
    path = write_jsonl(tmp_path / "rows.jsonl", [
        {"words": long, "tags": ["O"] * 19}, {"words": ["good", "bread"], "tags": ["O", "B-FOOD"]},
        {"words": ["soup", "is", "hot"], "tags": ["B-FOOD", "O", "O"]}, {"words": ["cheese"], "tags": ["B-FOOD"]},
    ])
    tok_dir = tmp_path / "tok"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(models["tagger"]))
    tok.padding_side = padding_side
    tok.save_pretrained(tok_dir)

    def cfg(name, cache):
        out = {"task": "token_classification", "teachers": [{"model": str(models["tagger"]), "tokenizer": str(tok_dir)}],
               "student": {"from_teacher": {"layers": [1]}, "tokenizer": str(tok_dir)},
               "data": {"train": {"path": str(path), "columns": {"text": "words", "label": "tags"}}, "batch_size": 2,
                        "max_length": 8, "shuffle": False},
               "training": {"epochs": 2, "learning_rate": 1e-3, "progress": False, "seed": 3},
               "output_dir": str(tmp_path / name)}
        if cache:
            out["cache"] = {"enabled": True, "dir": str(tmp_path / "cache")}
        return out

    warm = cfg("warm", True)  # the long row alone: the main run's batches then mix cached and new rows
    warm["data"]["train"]["path"] = str(write_jsonl(tmp_path / "long.jsonl", [{"words": long, "tags": ["O"] * 19}]))
    _train(warm)
    plain = _weights(_train(cfg("plain", False)))
    cached = _weights(_train(cfg("cached", True)))  # epoch 0 fills the rest of the cache, epoch 1 reads it
    for key in plain:
        torch.testing.assert_close(cached[key], plain[key], rtol=0, atol=1e-6, msg=key)
