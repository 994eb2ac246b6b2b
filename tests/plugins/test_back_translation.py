"""The back_translation plugin, with two tiny random-weight seq2seq models built locally (no hub)."""

from __future__ import annotations

import sqlite3
import warnings
from contextlib import closing
from types import SimpleNamespace

import pytest
import torch

import polydistill
from polydistill import ConfigError, PolydistillWarning, hookimpl
from polydistill.loop import TrainState
from polydistill.tiny import train_tokenizer
from polydistill_plugins.augment import BackTranslation

from conftest import PAIRS, TEXTS
from conftest import parallel_config as _parallel_config

GERMAN = {de for _, de, _ in PAIRS}
TO_GERMAN = {en: de for en, de, _ in PAIRS}
MAX_NEW = 6


@pytest.fixture(scope="module")
def translators(tmp_path_factory) -> dict[str, str]:
    """A 'de->en' and an 'en->de' model: tiny BART, random weights, a WordPiece tokenizer trained on the test texts."""
    from transformers import BartConfig, BartForConditionalGeneration

    root = tmp_path_factory.mktemp("translators")
    tok = train_tokenizer(TEXTS, vocab_size=300)
    paths = {}
    for name, seed in (("forward", 1), ("backward", 2)):
        torch.manual_seed(seed)
        config = BartConfig(
            vocab_size=len(tok), d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=64,
            pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
            decoder_start_token_id=tok.sep_token_id, forced_eos_token_id=None,
        )
        model = BartForConditionalGeneration(config)
        model.generation_config.min_new_tokens = 2  # random weights: never an empty translation
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    return paths


def options(translators, tmp_path, **extra):
    return {"forward": {"model": translators["forward"]}, "backward": {"model": translators["backward"]},
            "max_new_tokens": MAX_NEW, "cache_dir": str(tmp_path / "bt-cache"), **extra}




def parallel_config(models, data, tmp_path, **extra):
    return _parallel_config(models, data, tmp_path, data__eval=[], **extra)


def round_trip_one_by_one(translators, texts, **generate):
    """What the models make of each text alone: the reference for the plugin's batched, cached generation."""
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    out = {}
    for text in texts:
        current = text
        for which in ("forward", "backward"):
            tok = AutoTokenizer.from_pretrained(translators[which])
            model = AutoModelForSeq2SeqLM.from_pretrained(translators[which]).eval()
            enc = tok([current], return_tensors="pt")
            ids = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=MAX_NEW, **generate)
            current = tok.batch_decode(ids, skip_special_tokens=True)[0].strip()
        out[text] = current
    return out


class Seen:
    def __init__(self):
        self.rows = []

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        self.rows.append((list(batch.texts), list(batch.teacher_texts), list(batch.meta.get("augmented", {}).get("back_translation", []))))


def test_translations_replace_exactly_the_chosen_samples(models, data, tmp_path, translators):
    seen = Seen()
    cfg = parallel_config(models, data, tmp_path, training__epochs=2,
                          plugins={"back_translation": options(translators, tmp_path, probability=0.5, batch_size=1)})
    polydistill.train(cfg, plugins=[("seen", seen)])
    expected = round_trip_one_by_one(translators, sorted(GERMAN))
    assert all(expected[t] != t for t in GERMAN)
    chosen = 0
    for texts, teacher_texts, rows in seen.rows:
        for i, (text, source) in enumerate(zip(texts, teacher_texts)):
            original = TO_GERMAN[source]  # the teacher's English column is left alone (side: student)
            assert text == (expected[original] if i in rows else original)
        chosen += len(rows)
    assert 6 <= chosen <= 18  # about half of 2 epochs x 12 rows


def test_disk_cache_translates_each_text_once_across_epochs_and_runs(models, data, tmp_path, translators):
    opts = options(translators, tmp_path, probability=1.0)
    cfg = parallel_config(models, data, tmp_path, training__epochs=2, plugins={"back_translation": opts})
    first = polydistill.train(cfg)  # enabled by entry-point name only
    steps = [r for r in first.history if "loss" in r]
    assert [r["back_translation/augmented"] for r in steps] == [4.0] * 6
    assert [r["back_translation/translated"] for r in steps] == [4.0, 4.0, 4.0, 0.0, 0.0, 0.0]  # epoch 2: all cached
    assert [r["back_translation/cache_hits"] for r in steps] == [0.0, 0.0, 0.0, 4.0, 4.0, 4.0]

    bt = BackTranslation(BackTranslation.Settings(**opts))
    again = polydistill.train(parallel_config(models, data, tmp_path / "again", plugins={"back_translation": opts}),
                              plugins=[("back_translation", bt)])
    assert bt.generate_calls == 0 and bt.models == {}  # a second run neither translates nor loads the translators
    assert sum(r["back_translation/cache_hits"] for r in again.history if "loss" in r) == 12

    uncached = {**opts, "cache": False}
    bt = BackTranslation(BackTranslation.Settings(**uncached))
    polydistill.train(parallel_config(models, data, tmp_path / "uncached", training__epochs=2,
                                      plugins={"back_translation": uncached}), plugins=[("back_translation", bt)])
    assert bt.generate_calls == 2 * 6  # forward + backward, each step of both epochs


def test_sampling_is_seeded_deterministic_and_leaves_global_rng_alone(models, data, tmp_path, translators):
    def run(seed, where):
        seen = Seen()
        opts = options(translators, tmp_path / where, probability=1.0, do_sample=True, top_k=20)
        cfg = parallel_config(models, data, tmp_path / where, training__seed=seed, training__max_steps=2, plugins={"back_translation": opts})
        polydistill.train(cfg, plugins=[("seen", seen)])
        return [(row[0], row[1]) for row in seen.rows]

    a = run(0, "a")
    assert a == run(0, "b")  # separate caches: translated twice, the same samples
    assert a != run(1, "c")
    greedy = round_trip_one_by_one(translators, sorted(GERMAN))
    sampled = [(text, TO_GERMAN[source]) for texts, sources in a for text, source in zip(texts, sources)]
    assert all(text != original for text, original in sampled)
    assert sum(text != greedy[original] for text, original in sampled) >= len(sampled) // 2  # sampling, not greedy

    bt = BackTranslation(BackTranslation.Settings(**options(translators, tmp_path / "d", do_sample=True)))
    bt.paths = {k: translators[k] for k in ("forward", "backward")}
    before = torch.get_rng_state().clone()
    bt.round_trip(sorted(GERMAN), seed=5, device="cpu")
    assert torch.equal(torch.get_rng_state(), before)


def test_bad_configurations_are_refused_naming_the_option(models, data, tmp_path, translators):
    opts = options(translators, tmp_path)
    with pytest.raises(ConfigError, match=r"plugins\.back_translation\.side: .*two columns are in different languages"):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"back_translation": {**opts, "side": "both"}}))
    bad = {**opts, "probability": 1.0, "forward": {"model": str(tmp_path / "missing")}}
    with pytest.raises(ConfigError, match=r"plugins\.back_translation\.forward\.model: cannot load"):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"back_translation": bad}))
    with pytest.raises(ConfigError, match=r"plugins\.back_translation\.num_beams"):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"back_translation": {**opts, "num_beams": 0}}))
    token = SimpleNamespace(task="token_classification", task_def=polydistill.get_task("token_classification"), config=SimpleNamespace(mode="same", resolve_path=lambda p: p))
    with pytest.raises(ConfigError, match=r"plugins\.back_translation\.side: .*token_classification"):
        BackTranslation(BackTranslation.Settings(**opts)).setup(token)


def test_augment_batch_directly_uses_state_rng(translators, tmp_path):
    """The chosen rows depend on (seed, step, micro-batch) only."""
    bt = BackTranslation(BackTranslation.Settings(**options(translators, tmp_path, probability=0.5)))

    class Rows:
        langs = ["de"] * 50

        def __len__(self):
            return 50

    def rows(seed, step, micro):
        state = SimpleNamespace(config=SimpleNamespace(training=SimpleNamespace(seed=seed)), step=step, epoch=0, batch_in_epoch=micro, accelerator=SimpleNamespace(process_index=0))
        state.rng = lambda salt: TrainState.rng(state, salt)
        return bt.choose(Rows(), bt.rng(state))

    assert rows(0, 3, 7) == rows(0, 3, 7)
    assert rows(0, 3, 7) != rows(0, 3, 8) != rows(1, 3, 7)


def started(translators, tmp_path, **extra) -> BackTranslation:
    """A plugin after its setup hook, as a run in mode 'same' would have it."""
    bt = BackTranslation(BackTranslation.Settings(**options(translators, tmp_path, **extra)))
    bt.setup(SimpleNamespace(task="sequence_classification", task_def=polydistill.get_task("sequence_classification"), config=SimpleNamespace(
        mode="same", resolve_path=lambda p: p, training=SimpleNamespace(seed=0))))
    return bt


@pytest.mark.parametrize("byte, why", [(b"Q", "checksum mismatch"), (b"\xff", "not UTF-8 text")], ids=["changed", "not-utf8"])
def test_a_corrupt_cache_entry_is_dropped_with_a_warning_and_translated_again(translators, tmp_path, byte, why):
    texts = sorted(GERMAN)
    first = started(translators, tmp_path)
    good = first.round_trip(texts, seed=0, device="cpu")
    first.on_train_end(None)  # closes the database, which moves the WAL's pages into the file
    path = tmp_path / "bt-cache" / "back-translation.sqlite"
    # SQLite stores a row's values one after the other: key, pivot, result; find one entry's result in the file
    victim = texts[0]
    with closing(sqlite3.connect(path)) as db:
        (pivot,) = db.execute("SELECT pivot FROM translations WHERE key = ?", (first.key(victim),)).fetchone()
    raw = bytearray(path.read_bytes())
    record = (first.key(victim) + pivot + good[victim]).encode()
    assert raw.count(record) == 1
    at = raw.index(record) + len(record) - 1  # the result's last byte
    assert raw[at] != byte[0]
    raw[at] = byte[0]  # one byte changed on disk
    path.write_bytes(bytes(raw))

    again = started(translators, tmp_path)
    with pytest.warns(PolydistillWarning, match=r"back-translation cache .*back-translation\.sqlite: corrupt entry "
                      rf"[0-9a-f]{{12}} \({why}\); dropped, the text is translated again") as caught:
        assert again.round_trip(texts, seed=0, device="cpu") == good  # the corrupt result is never returned
    assert len(caught) == 1
    assert again.counts["translated"] == 1 and again.counts["cache_hits"] == len(texts) - 1
    again.on_train_end(None)

    third = started(translators, tmp_path)  # the recomputed entry was stored with a valid checksum
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert third.round_trip(texts, seed=0, device="cpu") == good
    assert third.generate_calls == 0 and third.counts["cache_hits"] == len(texts)


def test_a_cache_written_before_checksums_is_still_read(translators, tmp_path):
    texts = sorted(GERMAN)
    keys = started(translators, tmp_path, cache=False)  # the same cache keys, no database
    (tmp_path / "bt-cache").mkdir()
    with closing(sqlite3.connect(tmp_path / "bt-cache" / "back-translation.sqlite")) as db, db:
        db.execute("CREATE TABLE translations (key TEXT PRIMARY KEY, pivot TEXT, result TEXT)")  # the schema before checksums
        db.executemany("INSERT INTO translations VALUES (?, ?, ?)",
                       [(keys.key(t), f"pivot {i}", f"paraphrase {i}") for i, t in enumerate(texts)])
    bt = started(translators, tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert bt.round_trip(texts, seed=0, device="cpu") == {t: f"paraphrase {i}" for i, t in enumerate(texts)}
    assert bt.generate_calls == 0 and bt.models == {}
