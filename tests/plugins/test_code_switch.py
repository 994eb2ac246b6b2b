"""The code_switch plugin (CoSDA-ML): dictionary word switching, its randomness, and what the teacher reads."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import polydistill
from polydistill import ConfigError, PolydistillWarning, hookimpl
from polydistill import models as M
from polydistill.loop import TrainState
from polydistill_plugins.augment import CodeSwitch, replace_words

from conftest import PAIRS, StopAt
from conftest import parallel_config as _parallel_config

FR = {"the": "le", "soup": "soupe", "is": "est", "hot": "chaud", "bread": "pain", "eat": "mange", "team": "équipe",
      "match": "match", "wind": "vent", "cold": "froid", "sun": "soleil", "today": "aujourd'hui", "cake": "gâteau",
      "snow": "neige", "goal": "but", "pasta": "pâtes", "rains": "pleut", "day": "jour", "morning": "matin", "coach": "entraîneur"}
ES = {"the": "el", "soup": "sopa", "is": "es", "hot": "caliente", "bread": "pan", "team": "equipo", "wind": "viento",
      "cold": "frío", "sun": "sol", "cake": "pastel", "snow": "nieve", "day": "día", "morning": "mañana"}


@pytest.fixture(scope="module")
def dictionaries(tmp_path_factory):
    root = tmp_path_factory.mktemp("muse")
    paths = {}
    for lang, table in (("fr", FR), ("es", ES)):
        paths[lang] = root / f"en-{lang}.txt"  # MUSE style: "source target" per line, space-separated
        paths[lang].write_text("".join(f"{k} {v}\n" for k, v in table.items()), encoding="utf-8")
    return {k: str(v) for k, v in paths.items()}


def fake_state(seed=0, step=0):
    state = SimpleNamespace(config=SimpleNamespace(training=SimpleNamespace(seed=seed)), step=step, epoch=0, batch_in_epoch=0, accelerator=SimpleNamespace(process_index=0))
    state.rng = lambda salt: TrainState.rng(state, salt)
    return state


def plugin(dictionaries, **options) -> CodeSwitch:
    p = CodeSwitch(CodeSwitch.Settings(dictionaries=dictionaries, **options))
    p.prepare(SimpleNamespace(config=SimpleNamespace(resolve_path=lambda x: x)))
    return p


class Seen:
    """Records, after augmentation, what the student and the teacher read and what the teacher returned."""

    def __init__(self):
        self.rows = []

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        logits = None if teacher_out is None else teacher_out.logits.detach().cpu()
        self.rows.append((list(batch.texts), list(batch.teacher_texts), dict(batch.meta.get("augmented", {})), logits))




def parallel_config(models, data, tmp_path, **extra):
    """conftest's parallel run (teacher reads `en`, student `de`), without evaluation to keep the tests fast."""
    return _parallel_config(models, data, tmp_path, data__eval=[], **extra)


def same_config(models, data, tmp_path, **extra):
    """Mode 'same' on the 12 English + 12 German labelled sentences; the teacher reads the student's text."""
    cfg = parallel_config(models, data, tmp_path, mode="same", **extra)
    cfg["data"]["train"] = {"path": str(data["eval"]), "columns": {"label": "label", "lang": "lang"}}
    cfg["data"]["shuffle"] = False
    return cfg


def test_each_word_is_switched_to_its_translation(dictionaries):
    p = plugin({"fr": dictionaries["fr"]}, word_probability=1.0)
    g = torch.Generator().manual_seed(0)
    # every dictionary word switched, case kept, punctuation and unknown words ("pepper") untouched
    assert replace_words("The soup is hot, pepper!", p.lookup, 1.0, g) == ("Le soupe est chaud, pepper!", 4)
    # token tasks: a list of words stays a list of as many words
    assert replace_words(["The", "wind", "is", "COLD", "."], p.lookup, 1.0, g) == (["Le", "vent", "est", "FROID", "."], 4)


def test_exact_switches_under_a_fixed_seed(dictionaries):
    p = plugin(dictionaries, word_probability=0.5)
    text = "the team eats bread and soup on a cold morning while the sun is hot"
    first = replace_words(text, p.lookup, 0.5, torch.Generator().manual_seed(1234))
    assert first == ("le équipe eats pain and sopa on a cold morning while el soleil is caliente", 7)
    assert replace_words(text, p.lookup, 0.5, torch.Generator().manual_seed(1234)) == first
    assert replace_words(text, p.lookup, 0.5, torch.Generator().manual_seed(99)) != first


def test_ratio_of_switched_words_follows_word_probability(dictionaries):
    p = plugin(dictionaries)
    g = torch.Generator().manual_seed(7)
    eligible = sum(1 for en, _, _ in PAIRS for w in en.split() if w in FR or w in ES)
    for prob in (0.2, 0.6):
        switched = sum(replace_words(en, p.lookup, prob, g)[1] for _ in range(60) for en, _, _ in PAIRS)
        assert switched / (60 * eligible) == pytest.approx(prob, abs=0.04)


def test_min_words_makes_every_chosen_sample_change(dictionaries):
    p = plugin(dictionaries, word_probability=0.0, min_words=2)
    state = fake_state()
    texts = [en for en, _, _ in PAIRS]
    out = p.augment_texts(texts, ["en"] * 12, "student", p.rng(state), state)
    for old, new in zip(texts, out):
        eligible = sum(w in FR or w in ES for w in old.split())
        assert sum(a != b for a, b in zip(old.split(), new.split())) == min(2, eligible)
    assert plugin(dictionaries, word_probability=0.0, min_words=0).augment_texts(texts, ["en"] * 12, "student", p.rng(state), state) == texts


def test_per_sample_probability_and_language_filter(dictionaries):
    p = plugin(dictionaries, probability=0.3, languages=["en"])

    class Rows:
        # `languages` names languages: each English tag form is listed by "en", no German one
        langs = ["en", "de", "eng", "deu", "en_US", "de-DE", "EN-gb", "ger"] * 500

        def __len__(self):
            return len(self.langs)

    rows = p.choose(Rows(), torch.Generator().manual_seed(0))
    assert {Rows.langs[i] for i in rows} == {"en", "eng", "en_US", "EN-gb"}
    assert len(rows) / 2000 == pytest.approx(0.3, abs=0.03)


def test_teacher_reads_the_switched_text_and_its_outputs_are_recomputed(models, data, tmp_path, dictionaries):
    seen = Seen()
    cfg = same_config(models, data, tmp_path, training__epochs=2, cache={"enabled": True, "dir": str(tmp_path / "cache")},
                      plugins={"code_switch": {"dictionaries": dictionaries, "probability": 0.5, "languages": ["en"]}})
    polydistill.train(cfg, plugins=[("seen", seen)])
    teacher = M.load_model(str(models["teacher"]), "sequence_classification").eval()
    tok = M.load_tokenizer(str(models["teacher"]))
    english = {en for en, _, _ in PAIRS}
    switched = 0
    for texts, teacher_texts, augmented, logits in seen.rows:
        assert teacher_texts == texts  # mode 'same': one text for both
        rows = augmented.get("code_switch", [])
        assert all(texts[i] not in english for i in rows)
        assert all(t in english or t in {de for _, de, _ in PAIRS} for i, t in enumerate(texts) if i not in rows)
        switched += len(rows)
        # the teacher's logits (cache on, two epochs) are those of the text as switched, not of the original
        with torch.no_grad():
            expected = teacher(**tok(teacher_texts, return_tensors="pt", padding=True)).logits
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)
    assert 3 <= switched <= 21  # about half of the 2 x 12 English rows


def test_parallel_mode_switches_only_the_chosen_side(models, data, tmp_path, dictionaries):
    seen = Seen()
    options = {"dictionaries": dictionaries, "probability": 1.0, "word_probability": 1.0, "side": "teacher",
               "teacher_language": "en", "target_languages": ["fr"]}
    polydistill.train(parallel_config(models, data, tmp_path, plugins={"code_switch": options}), plugins=[("seen", seen)])
    pairs = {de: en for en, de, _ in PAIRS}
    expected = {en: " ".join(FR.get(w, w) for w in en.split()) for en, _, _ in PAIRS}
    for texts, teacher_texts, _, _ in seen.rows:
        assert all(t in pairs for t in texts)  # the student's German column is untouched
        assert teacher_texts == [expected[pairs[t]] for t in texts]  # the teacher's English is switched to French


def test_training_by_entry_point_name_logs_counts(models, data, tmp_path, dictionaries):
    options = {"dictionaries": dictionaries, "probability": 1.0, "word_probability": 1.0, "side": "teacher",
               "teacher_language": "en"}
    result = polydistill.train(parallel_config(models, data, tmp_path, plugins={"code_switch": options}))
    steps = [r for r in result.history if "loss" in r]
    # every English source sentence has dictionary words; 12 rows in batches of 4
    assert [r["code_switch/augmented"] for r in steps] == [4.0, 4.0, 4.0]
    assert all(r["code_switch/words"] >= 4 for r in steps)
    off = polydistill.train(parallel_config(models, data, tmp_path / "off", plugins={"code_switch": {**options, "probability": 0.0}}))
    assert [r["code_switch/augmented"] for r in off.history if "loss" in r] == [0.0, 0.0, 0.0]


def test_same_seed_same_switches_other_seed_other_switches(models, data, tmp_path, dictionaries):
    def texts(seed, where):
        seen = Seen()
        cfg = same_config(models, data, tmp_path / where, training__seed=seed, training__max_steps=4,
                          plugins={"code_switch": {"dictionaries": dictionaries, "languages": ["en"]}})
        polydistill.train(cfg, plugins=[("seen", seen)])
        return [row[0] for row in seen.rows]

    first = texts(3, "a")  # each run in its own folder: a run's output_dir is not reused
    assert first == texts(3, "b")
    assert first != texts(4, "c")



@pytest.mark.filterwarnings("ignore:plugins.code_switch. rows tagged 'de' are left alone")  # asserted in the first run
def test_resumed_run_switches_and_trains_exactly_like_an_uninterrupted_one(models, data, tmp_path, dictionaries):
    # side both: the English teacher column is switched, the German student rows are skipped (en-X dictionaries)
    options = {"dictionaries": dictionaries, "side": "both", "teacher_language": "en", "word_probability": 0.5}
    overrides = dict(training__epochs=2, data__batch_size=3, training__gradient_accumulation_steps=2,
                     plugins={"code_switch": options})
    seen_a = Seen()
    with pytest.warns(PolydistillWarning, match="rows tagged 'de' are left alone"):
        straight = polydistill.train(parallel_config(models, data, tmp_path / "a", **overrides), plugins=[("seen", seen_a)])
    assert all(t in {de for _, de, _ in PAIRS} for texts, _, _, _ in seen_a.rows for t in texts)
    assert sum(r["code_switch/skipped_rows"] for r in straight.history if "loss" in r) == 2 * 12
    cfg = parallel_config(models, data, tmp_path / "b", **overrides)
    with pytest.raises(KeyboardInterrupt):
        polydistill.train(cfg, plugins=[("stop", StopAt(3))])
    seen_b = Seen()
    resumed = polydistill.train(cfg, resume=tmp_path / "b" / "run", plugins=[("seen", seen_b)])
    # the same switched teacher texts (and untouched student texts) after the resume
    assert [r[:2] for r in seen_a.rows][-len(seen_b.rows):] == [r[:2] for r in seen_b.rows]
    a, b = (load_file(str(r.output_dir / "student" / "model.safetensors")) for r in (straight, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_bad_options_name_the_option(models, data, tmp_path, dictionaries):
    with pytest.raises(ConfigError, match=r"plugins\.code_switch\.dictionaries\.fr: no such file"):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"code_switch": {"dictionaries": {"fr": str(tmp_path / "no.txt")}}}))
    with pytest.raises(ConfigError, match=r"plugins\.code_switch\.target_languages: \['it'\] have no dictionary"):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"code_switch": {"dictionaries": dictionaries, "target_languages": ["it"]}}))
    with pytest.raises(ConfigError, match=r"plugins\.code_switch\.side: in mode 'same'"):
        cfg = same_config(models, data, tmp_path, plugins={"code_switch": {"dictionaries": dictionaries, "side": "teacher"}})
        polydistill.train(cfg)
    with pytest.raises(ConfigError, match=r"plugins\.code_switch\.word_probability"):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"code_switch": {"dictionaries": dictionaries, "word_probability": 2}}))


def test_global_random_state_is_untouched(dictionaries):
    import random

    import numpy as np

    p = plugin(dictionaries)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    state = fake_state()
    p.augment_texts([en for en, _, _ in PAIRS], ["en"] * 12, "student", p.rng(state), state)
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])


def test_rows_in_a_language_without_a_dictionary_are_left_alone_and_counted(models, data, tmp_path, dictionaries):
    """en-X dictionaries switch English rows only: German rows keep their words ("das team", "der wind")."""
    seen = Seen()
    cfg = same_config(models, data, tmp_path, plugins={"code_switch": {"dictionaries": dictionaries, "probability": 1.0,
                                                                         "word_probability": 1.0}})
    with pytest.warns(PolydistillWarning, match=r"plugins\.code_switch: rows tagged 'de' are left alone: no dictionary "
                      r"serves 'de' \(counted in code_switch/skipped_rows\); the dictionaries are from \['en'\]"):
        result = polydistill.train(cfg, plugins=[("seen", seen)])
    english = {en for en, _, _ in PAIRS}
    german = {de for _, de, _ in PAIRS}
    assert {"das team hat das spiel gewonnen", "der wind ist kalt"} <= german  # words the en-X dictionaries have
    rows = [(text, i in augmented.get("code_switch", [])) for texts, _, augmented, _ in seen.rows for i, text in enumerate(texts)]
    assert sorted(text for text, switched in rows if not switched) == sorted(german)
    assert sum(switched for _, switched in rows) == 12 and not any(text in english for text, _ in rows)
    steps = [r for r in result.history if "loss" in r]
    assert sum(r["code_switch/skipped_rows"] for r in steps) == 12


def test_dictionary_languages_apply_the_dictionaries_to_another_language_on_purpose(models, data, tmp_path, dictionaries):
    seen = Seen()
    options = {"dictionaries": {"fr": dictionaries["fr"]}, "probability": 1.0, "word_probability": 1.0,
               "dictionary_languages": ["deu"]}  # ISO 639-3 here, 'de' in the data: one language
    with pytest.warns(PolydistillWarning, match=r"rows tagged 'en' are left alone: no dictionary serves 'en'"):
        result = polydistill.train(same_config(models, data, tmp_path, plugins={"code_switch": options}), plugins=[("seen", seen)])
    texts = [t for texts, _, _, _ in seen.rows for t in texts]
    assert "das équipe hat das spiel gewonnen" in texts and "der vent ist kalt" in texts
    assert sorted(t for t in texts if t in {en for en, _, _ in PAIRS}) == sorted(en for en, _, _ in PAIRS)  # English: skipped
    assert sum(r["code_switch/skipped_rows"] for r in result.history if "loss" in r) == 12


def test_configurations_that_could_never_switch_a_row_are_refused(models, data, tmp_path, dictionaries):
    def train(options, **extra):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"code_switch": {"dictionaries": dictionaries, **options}}, **extra))

    with pytest.raises(ConfigError, match=r"plugins\.code_switch\.languages: no dictionary serves \['de', 'fr'\], so no row "
                       r"would ever be changed; the dictionaries are from \['en'\] \(dictionary_languages\); add 'de' there"):
        train({"languages": ["de", "fr"]})
    with pytest.raises(ConfigError, match=r"plugins\.code_switch\.teacher_language: side 'teacher' changes the teachers' "
                       r"source column \(columns\.source\), whose language the rows' tags do not give; set it"):
        train({"side": "teacher"})
    with pytest.raises(ConfigError, match=r"plugins\.code_switch\.teacher_language: no dictionary serves 'de'"):
        train({"side": "both", "teacher_language": "de"})
    # every row's tag is known from the config (a source's `lang`, no `columns.lang`): German only
    with pytest.raises(ConfigError, match=r"plugins\.code_switch\.dictionary_languages: the training data's languages "
                       r"\(data\.train lang: \['de'\]\): no dictionary serves \['de'\], so no row would ever be changed"):
        train({}, data__train__columns__lang=None, data__train__lang="de")
    with pytest.raises(ConfigError, match=r"data\.train lang: \['und'\]\) \(rows of a source without `lang` or "
                       r"`columns\.lang` are tagged 'und'\)"):
        train({}, data__train__columns__lang=None)
    with pytest.raises(ConfigError, match=r"plugins\.code_switch\.dictionary_languages"):
        train({"dictionary_languages": []})
