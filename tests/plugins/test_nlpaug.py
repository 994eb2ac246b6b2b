"""The nlpaug plugin with the real nlpaug package, on augmenters that run offline."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import polydistill
from polydistill import ConfigError, hookimpl
from polydistill.testing import tiny_config

pytest.importorskip("nlpaug")

KEYBOARD = {"augmenter": "nlpaug.augmenter.char.KeyboardAug", "args": {"aug_char_p": 0.3, "aug_word_p": 0.5}}


class Seen:
    def __init__(self):
        self.rows = []

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        self.rows.append((state.epoch, list(batch.texts), list(batch.teacher_texts)))


def _config(models, data, tmp_path, options, **extra):
    return tiny_config(models, data, tmp_path, data__eval=[], plugins={"nlpaug": {"probability": 1.0, **options}}, **extra)


def _train(cfg, seen=None, **kw):
    return polydistill.train(cfg, plugins=[("seen", seen or Seen())], **kw)


def test_an_nlpaug_augmenter_enabled_by_name_changes_the_student_text(models, data, tmp_path):
    seen = Seen()
    result = _train(_config(models, data, tmp_path, KEYBOARD), seen)
    original = {r["de"] for r in map(__import__("json").loads, data["parallel"].read_text().splitlines())}
    student = [t for _, texts, _ in seen.rows for t in texts]
    assert sum(t not in original for t in student) >= len(student) // 2  # keyboard typos in the German side
    teacher = {t for _, _, texts in seen.rows for t in texts}
    assert teacher <= {r["en"] for r in map(__import__("json").loads, data["parallel"].read_text().splitlines())}
    counts = [r["nlpaug/augmented"] for r in result.history if "nlpaug/augmented" in r]
    assert counts and all(isinstance(c, int) for c in counts) and sum(counts) >= len(student) // 2


def test_several_augmenters_run_in_sequence_and_only_listed_languages_change(models, data, tmp_path):
    options = {"augmenters": [KEYBOARD, {"augmenter": "word.RandomWordAug", "args": {"action": "swap"}}], "languages": ["fr"]}
    seen = Seen()
    result = _train(_config(models, data, tmp_path, options), seen)  # the tiny rows are all German: none is listed
    assert not any(r.get("nlpaug/augmented") for r in result.history)
    options["languages"] = ["de"]
    seen = Seen()
    _train(_config(models, data, tmp_path, options, output_dir=str(tmp_path / "de")), seen)
    original = {r["de"] for r in map(__import__("json").loads, data["parallel"].read_text().splitlines())}
    changed = [t for _, texts, _ in seen.rows for t in texts if t not in original]
    assert changed  # typos and swapped words on the listed language's rows


def test_augmentation_is_deterministic_leaves_global_generators_alone_and_resumes_exactly(models, data, tmp_path):
    from polydistill.loop import Trainer

    trainer = Trainer(_config(models, data, tmp_path, KEYBOARD, output_dir=str(tmp_path / "probe")))
    plugin = trainer.host.pm.get_plugin("nlpaug")
    texts = ["die suppe ist heute sehr heiß", "wir kochen heute abend nudeln"]
    random.seed(123)
    np.random.seed(123)
    expected = (random.random(), float(np.random.rand()))
    random.seed(123)
    np.random.seed(123)
    first = plugin.augment_texts(texts, ["de", "de"], "student", torch.Generator().manual_seed(7), trainer.state)
    assert (random.random(), float(np.random.rand())) == expected  # nlpaug's draws were isolated and put back
    assert plugin.augment_texts(texts, ["de", "de"], "student", torch.Generator().manual_seed(7), trainer.state) == first
    assert first != texts

    seen = Seen()
    full = _train(_config(models, data, tmp_path, KEYBOARD, training__epochs=2, training__checkpoint_every=1,
                          training__keep_checkpoints=10), seen)
    again = Seen()
    _train(_config(models, data, tmp_path, KEYBOARD, training__epochs=2, training__checkpoint_every=1,
                   training__keep_checkpoints=10, output_dir=str(tmp_path / "again")), again)
    assert again.rows == seen.rows  # the same seed: the same typos

    # continue the run from its checkpoint at the end of the first epoch: the second epoch's texts and the weights
    # are the uninterrupted run's
    resumed_seen = Seen()
    resumed = _train(_config(models, data, tmp_path, KEYBOARD, training__epochs=2, output_dir=str(tmp_path / "part")),
                     resumed_seen, resume=tmp_path / "run" / "checkpoints" / "checkpoint-3")
    assert resumed_seen.rows == [r for r in seen.rows if r[0] == 1]
    a, b = load_file(str(full.student_dir / "model.safetensors")), load_file(str(resumed.student_dir / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_an_augmenter_that_would_download_is_refused_with_the_local_option(models, data, tmp_path):
    contextual = {"augmenter": "nlpaug.augmenter.word.ContextualWordEmbsAug", "args": {"model_path": "bert-base-uncased"}}
    with pytest.raises(ConfigError, match=r"plugins.nlpaug.augmenter.args.model_path: 'bert-base-uncased' is not a local path"):
        _train(_config(models, data, tmp_path, contextual))
    nltk = pytest.importorskip("nltk")
    try:
        nltk.data.find("corpora/wordnet")
    except LookupError:
        with pytest.raises(ConfigError, match="SynonymAug reads nltk's wordnet data, which is not installed.*`synonym`"):
            _train(_config(models, data, tmp_path, {"augmenter": "word.SynonymAug"}))


def test_bad_augmenter_options_are_clear_errors(models, data, tmp_path):
    with pytest.raises(ConfigError, match=r"plugins.nlpaug.augmenter: no class 'char.NoSuchAug'"):
        _train(_config(models, data, tmp_path, {"augmenter": "char.NoSuchAug"}))
    with pytest.raises(ConfigError, match=r"plugins.nlpaug.augmenter: KeyboardAug\(no_such_arg=1\) failed"):
        _train(_config(models, data, tmp_path, {"augmenter": "char.KeyboardAug", "args": {"no_such_arg": 1}}))
    with pytest.raises(ConfigError, match="plugins.nlpaug.*give `augmenter`.*or `augmenters`"):
        _train(_config(models, data, tmp_path, {"args": {}}))
    with pytest.raises(ConfigError, match="word lists"):
        _train(tiny_config(models, data, tmp_path, "token_classification", data__eval=[], plugins={"nlpaug": KEYBOARD}))


def test_nlpaug_as_an_ablation_axis(models, data, tmp_path):
    from polydistill.study import plan_study

    base = tiny_config(models, data, tmp_path)
    plan = plan_study({"base": base, "axes": {"aug": {"add_one_in": {"nlpaug": KEYBOARD}}}, "output_dir": str(tmp_path / "s")})
    assert [c.name for c in plan.cells] == ["base", "+nlpaug"]
    assert plan.runs[1].config["plugins"]["nlpaug"]["augmenter"] == KEYBOARD["augmenter"]
