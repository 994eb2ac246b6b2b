"""The synonym plugin: WordNet (read from local files, never downloaded) or a synonym table."""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import polydistill
from polydistill import ConfigError, PolydistillWarning, hookimpl
from polydistill.loop import TrainState
from polydistill.tasks import get_task
from polydistill_plugins.augment import synonym as augment
from polydistill_plugins.augment import SynonymAugment, load_wordnet

from conftest import PAIRS, write_jsonl
from conftest import parallel_config as _parallel_config

TABLE = {"soup": ["broth"], "hot": ["warm"], "bread": ["loaf"], "cold": ["chilly"], "team": ["squad"],
         "cake": ["gateau"], "wind": ["breeze"], "sun": ["star"], "match": ["game"], "morning": ["dawn"],
         "snow": ["powder"], "day": ["date"], "goal": ["score"], "pasta": ["noodles"], "players": ["athletes"]}
ENGLISH = {en for en, _, _ in PAIRS}
GERMAN = {de for _, de, _ in PAIRS}


def wordnet_available() -> bool:
    return augment._is_wordnet_db("/usr/share/wordnet")


needs_wordnet = pytest.mark.skipif(not wordnet_available(), reason="WordNet is not installed (apt-get install wordnet-base)")


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    path = tmp_path_factory.mktemp("syn") / "synonyms.tsv"
    lines = ["# word<TAB>synonyms", *("\t".join([k, *v]) for k, v in TABLE.items()), "tonight\tthis evening"]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)




def parallel_config(models, data, tmp_path, **extra):
    return _parallel_config(models, data, tmp_path, data__eval=[], **extra)


def same_config(models, data, tmp_path, **extra):
    cfg = parallel_config(models, data, tmp_path, mode="same", **extra)
    cfg["data"]["train"] = {"path": str(data["eval"]), "columns": {"label": "label", "lang": "lang"}}
    return cfg


class Seen:
    def __init__(self):
        self.rows = []

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        labels = None if batch.labels is None else batch.labels.tolist()
        self.rows.append((list(batch.texts), list(batch.teacher_texts), dict(batch.meta.get("augmented", {})), labels))


def fake_state(seed=0, step=0, batch_in_epoch=0):
    state = SimpleNamespace(config=SimpleNamespace(training=SimpleNamespace(seed=seed), resolve_path=lambda p: p, mode="same"),
                            step=step, epoch=0, batch_in_epoch=batch_in_epoch, accelerator=SimpleNamespace(process_index=0),
                            task="sequence_classification", task_def=get_task("sequence_classification"))
    state.rng = lambda salt: TrainState.rng(state, salt)
    return state


def plugin(**options) -> SynonymAugment:
    p = SynonymAugment(SynonymAugment.Settings(**options))
    p.prepare(fake_state())
    return p


def test_table_synonyms_replace_words_in_both_readers_texts(models, data, tmp_path, table):
    seen = Seen()
    options = {"dictionary": table, "probability": 1.0, "word_probability": 1.0, "languages": ["en"]}
    polydistill.train(same_config(models, data, tmp_path, plugins={"synonym": options}), plugins=[("seen", seen)])
    expected = {en: " ".join(TABLE.get(w, [w])[0] if w != "tonight" else "this evening" for w in en.split()) for en in ENGLISH}
    switched = 0
    for texts, teacher_texts, augmented, _ in seen.rows:
        assert teacher_texts == texts
        for i, text in enumerate(texts):
            if i in augmented.get("synonym", []):
                assert text in expected.values()
                switched += 1
            else:
                assert text in GERMAN  # only English rows are augmented, all of them (probability 1)
    assert switched == 12


def test_token_task_keeps_word_count_and_labels(models, tmp_path, table):
    food = {"soup", "bread", "pasta", "cake"}
    rows = [{"words": en.split(), "tags": ["B-FOOD" if w in food else "O" for w in en.split()], "lang": "en"} for en, _, _ in PAIRS]
    path = write_jsonl(tmp_path / "tok.jsonl", rows)
    seen = Seen()
    cfg = {
        "task": "token_classification",
        "teachers": [{"model": str(models["tagger"])}],
        "student": {"model": str(models["tagger"])},
        "data": {"train": {"path": str(path), "columns": {"text": "words", "label": "tags", "lang": "lang"}}, "batch_size": 6,
                 "shuffle": False, "length_grouping": False},
        "training": {"epochs": 1, "progress": False, "log_every": 1},
        "plugins": {"kd": {"ce": 1.0}, "synonym": {"dictionary": table, "probability": 1.0, "word_probability": 1.0}},
        "output_dir": str(tmp_path / "run"),
    }
    result = polydistill.train(cfg, plugins=[("seen", seen)])
    seen_words = [words for texts, _, _, _ in seen.rows for words in texts]
    seen_labels = [tags for _, _, _, labels in seen.rows for tags in labels]
    assert len(seen_words) == len(rows) == 12
    for row, words, tags in zip(rows, seen_words, seen_labels):
        # one-for-one: same count, each word kept or replaced by its single-word synonym; labels unchanged
        assert words == [TABLE[w][0] if w in TABLE else w for w in row["words"]]
        assert tags[: len(words)] == [["O", "B-FOOD", "I-FOOD"].index(t) for t in row["tags"]]
    # "tonight" has only a two-word synonym, which would change the word count: it is kept
    assert ["we", "cook", "noodles", "tonight"] in seen_words
    assert sum(r["synonym/augmented"] for r in result.history if "loss" in r) == 12


def test_training_by_entry_point_name_logs_counts(models, data, tmp_path, table):
    options = {"dictionary": table, "probability": 1.0, "word_probability": 1.0, "side": "teacher"}
    result = polydistill.train(parallel_config(models, data, tmp_path, plugins={"synonym": options}))
    steps = [r for r in result.history if "loss" in r]
    # every English sentence has a word in the table ("it rains all day": "day"): all 4 rows of each batch change
    assert [r["synonym/augmented"] for r in steps] == [4.0, 4.0, 4.0]
    words = sum(1 for en in ENGLISH for w in en.split() if w in TABLE or w == "tonight")
    assert sum(r["synonym/words"] for r in steps) == words


def test_same_seed_and_position_same_choices(table):
    p = plugin(dictionary=table, probability=0.5, word_probability=0.5)
    texts = [en for en, _, _ in PAIRS]

    def run(seed, micro_batch):
        state = fake_state(seed, step=micro_batch, batch_in_epoch=micro_batch)
        g = p.rng(state)
        rows = p.choose(_Rows(12), g)
        return rows, p.augment_texts([texts[i] for i in rows], ["en"] * len(rows), "student", g, state)

    assert run(0, 5) == run(0, 5)
    assert run(0, 5) != run(0, 6)
    assert run(0, 5) != run(1, 5)


class _Rows:
    def __init__(self, n):
        self.langs = ["en"] * n

    def __len__(self):
        return len(self.langs)


def test_global_random_state_is_untouched(table):
    p = plugin(dictionary=table, probability=1.0)
    before = (random.getstate(), np.random.get_state()[1].copy(), torch.get_rng_state().clone())
    state = fake_state()
    p.augment_texts([en for en, _, _ in PAIRS], ["en"] * 12, "student", p.rng(state), state)
    assert random.getstate() == before[0]
    assert (np.random.get_state()[1] == before[1]).all()
    assert torch.equal(torch.get_rng_state(), before[2])


@needs_wordnet
def test_wordnet_synonyms_without_any_download(models, data, tmp_path, monkeypatch):
    import nltk

    def refuse(*args, **kwargs):
        raise AssertionError("nltk.download must never be called")

    monkeypatch.setattr(nltk, "download", refuse)
    seen = Seen()
    options = {"probability": 1.0, "word_probability": 1.0, "side": "teacher", "teacher_language": "en", "pos": ["n", "a"]}
    polydistill.train(parallel_config(models, data, tmp_path, plugins={"synonym": options}), plugins=[("seen", seen)])
    wn = load_wordnet("/usr/share/wordnet")
    pairs = {de: en for en, de, _ in PAIRS}
    changed = 0
    for texts, teacher_texts, _, _ in seen.rows:
        for de, new in zip(texts, teacher_texts):
            old = pairs[de].split()
            assert len(new.split()) >= len(old)
            if new == pairs[de]:
                continue
            changed += 1
            for word in old:
                if word not in new.split():  # a replaced word: its replacement shares a noun/adjective synset with it
                    names = {n.replace("_", " ") for p in "na" for s in wn.synsets(word, pos=p) for n in s.lemma_names()}
                    assert any(n in new for n in names - {word}), (word, new)
            assert "the" in new.split() or "the" not in old  # function words are left alone
    assert changed >= 10


@needs_wordnet
def test_open_multilingual_wordnet_language_from_a_local_nltk_data_folder(tmp_path):
    wn = load_wordnet("/usr/share/wordnet")
    soup, hot = wn.synset("soup.n.01"), wn.synset("hot.a.01")
    omw = tmp_path / "nltk_data" / "corpora" / "omw-1.4" / "fra"
    omw.mkdir(parents=True)
    (omw / "wn-data-fra.tab").write_text(
        f"# a two-synset French wordnet\n{soup.offset():08d}-n\tfra:lemma\tsoupe\n{soup.offset():08d}-n\tfra:lemma\tpotage\n"
        f"{hot.offset():08d}-a\tfra:lemma\tchaud\n{hot.offset():08d}-a\tfra:lemma\tbrûlant\n", encoding="utf-8")
    p = plugin(nltk_data=str(tmp_path / "nltk_data"), wordnet_lang={"fr": "fra"}, word_probability=1.0, stopwords=[])
    state = fake_state()
    out = p.augment_texts(["La soupe est chaude.", "Le potage est chaud.", "the soup is hot"], ["fr", "fr", "en"], "student", p.rng(state), state)
    assert out == ["La potage est chaude.", "Le soupe est brûlant.", "the soup is hot"]  # 'en' rows have no code: left alone
    with pytest.raises(ConfigError, match=r"plugins\.synonym\.wordnet_lang: \['spa'\] not in the Open Multilingual Wordnet"):
        plugin(nltk_data=str(tmp_path / "nltk_data"), wordnet_lang="spa")
    # by default each row gets its own language's WordNet: French from the OMW data found, English from WordNet
    auto = plugin(nltk_data=str(tmp_path / "nltk_data"), word_probability=1.0, stopwords=[])
    assert [auto.wordnet_code(t) for t in ("fr", "fra", "fre", "fr_CA", "en", "de")] == ["fra", "fra", "fra", "fra", "eng", None]
    out = auto.augment_texts(["La soupe est chaude.", "the soup is hot"], ["fr_FR", "en"], "student", auto.rng(state), state)
    assert out[0] == "La potage est chaude." and out[1] != "the soup is hot"


def test_missing_wordnet_is_a_config_error_with_install_instructions(tmp_path, monkeypatch):
    import nltk

    monkeypatch.setattr(augment, "SYSTEM_WORDNET_DIRS", [])
    monkeypatch.setattr(nltk.data, "path", [str(tmp_path / "empty")])
    monkeypatch.delenv("NLTK_DATA", raising=False)
    monkeypatch.delenv("WNSEARCHDIR", raising=False)
    monkeypatch.setattr(nltk, "download", lambda *a, **k: pytest.fail("nltk.download called"))
    with pytest.raises(ConfigError, match=r"plugins\.synonym\.nltk_data: WordNet was not found.*apt-get install wordnet-base.*nltk\.downloader"):
        plugin()
    (tmp_path / "wn").mkdir()
    with pytest.raises(ConfigError, match=r"plugins\.synonym\.wordnet_dir: .* holds no WordNet database"):
        plugin(wordnet_dir=str(tmp_path / "wn"))
    with pytest.raises(ConfigError, match=r"plugins\.synonym\.nltk_data: no such folder"):
        plugin(nltk_data=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"plugins\.synonym\.dictionary: no such file"):
        plugin(dictionary=str(tmp_path / "nope.tsv"))


def test_side_teacher_in_same_mode_is_refused(models, data, tmp_path, table):
    with pytest.raises(ConfigError, match=r"plugins\.synonym\.side: in mode 'same'"):
        polydistill.train(same_config(models, data, tmp_path, plugins={"synonym": {"dictionary": table, "side": "teacher"}}))


class SeenLangs:
    def __init__(self):
        self.rows = []

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        self.rows += zip(batch.langs, batch.texts, batch.teacher_texts)


@needs_wordnet
def test_english_wordnet_leaves_german_rows_alone_and_counts_them(models, data, tmp_path):
    wn = load_wordnet("/usr/share/wordnet")
    assert all(wn.synsets(w) for w in ("die", "hat", "team", "wind"))  # German words English WordNet would rewrite
    seen = Seen()
    options = {"probability": 1.0, "word_probability": 1.0}  # parallel mode, side student: the German column
    with pytest.warns(PolydistillWarning, match=r"plugins\.synonym: rows tagged 'de' are left alone: no WordNet serves 'de' "
                      r"\(counted in synonym/skipped_rows\); WordNets found: eng; to use one for it on purpose, map it "
                      r"\(a mapping lists every language to augment\), e\.g\. wordnet_lang: \{eng: eng, de: eng\}"):
        result = polydistill.train(parallel_config(models, data, tmp_path, plugins={"synonym": options}), plugins=[("seen", seen)])
    assert sorted(t for texts, _, _, _ in seen.rows for t in texts) == sorted(GERMAN)
    assert all(not augmented for _, _, augmented, _ in seen.rows)
    steps = [r for r in result.history if "loss" in r]
    assert [r["synonym/skipped_rows"] for r in steps] == [4.0, 4.0, 4.0]
    assert [r["synonym/augmented"] for r in steps] == [0.0, 0.0, 0.0]


@needs_wordnet
def test_rows_are_matched_to_their_wordnet_by_iso_639_code(models, data, tmp_path):
    english = ["en", "eng", "en_US", "EN-gb", "eng_Latn"]
    other = ["de", "deu", "ger", "de_DE", "fr", "und"]
    path = write_jsonl(tmp_path / "tags.jsonl", [{"text": "the soup is hot", "label": "food", "lang": t} for t in english + other])
    cfg = same_config(models, data, tmp_path, plugins={"synonym": {"probability": 1.0, "word_probability": 1.0}})
    cfg["data"]["train"] = {"path": str(path), "columns": {"label": "label", "lang": "lang"}}
    seen = SeenLangs()
    with pytest.warns(PolydistillWarning) as caught:
        result = polydistill.train(cfg, plugins=[("seen", seen)])
    assert len(seen.rows) == 11
    for lang, text, _ in seen.rows:
        assert (text != "the soup is hot") == (lang in english), lang
    assert sum(r["synonym/skipped_rows"] for r in result.history if "loss" in r) == len(other)
    warned = {m for w in caught for m in other if f"rows tagged {m!r} are left alone" in str(w.message)}
    assert warned == set(other)


@needs_wordnet
def test_a_mapping_applies_english_wordnet_to_german_rows_on_purpose(models, data, tmp_path):
    seen = Seen()
    options = {"probability": 1.0, "word_probability": 1.0, "pos": ["n"], "wordnet_lang": {"de": "eng"}}
    result = polydistill.train(parallel_config(models, data, tmp_path, plugins={"synonym": options}), plugins=[("seen", seen)])
    texts = [t for texts, _, _, _ in seen.rows for t in texts]
    assert "die suppe ist heiß" not in texts and "das team hat das spiel gewonnen" not in texts  # die, team: English nouns
    assert sum(r["synonym/skipped_rows"] for r in result.history if "loss" in r) == 0


@needs_wordnet
def test_wordnet_configurations_that_could_never_change_a_row_are_refused(models, data, tmp_path):
    def train(options, **extra):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"synonym": options}, **extra))

    with pytest.raises(ConfigError, match=r"plugins\.synonym\.languages: no WordNet serves \['de', 'fr'\], so no row would "
                       r"ever be changed; WordNets found: eng; .* wordnet_lang: \{eng: eng, de: eng\}"):
        train({"languages": ["de", "fr"]})
    with pytest.raises(ConfigError, match=r"plugins\.synonym\.teacher_language: side 'teacher' changes the teachers' source "
                       r"column \(columns\.source\), whose language the rows' tags do not give; set it, e\.g\. teacher_language: en"):
        train({"side": "teacher"})
    with pytest.raises(ConfigError, match=r"plugins\.synonym\.teacher_language: no WordNet serves 'de'"):
        train({"side": "teacher", "teacher_language": "de"})
    with pytest.raises(ConfigError, match=r"plugins\.synonym\.wordnet_lang: the training data's languages \(data\.train "
                       r"lang: \['de'\]\): no WordNet serves \['de'\], so no row would ever be changed"):
        train({}, data__train__columns__lang=None, data__train__lang="de")
    with pytest.raises(ConfigError, match=r"plugins\.synonym\.wordnet_lang: \['de', 'de_DE'\] are tags of one language "
                       r"\(deu\) mapped to different WordNets"):
        plugin(wordnet_lang={"en": "eng", "de": "eng", "de_DE": "fra"})
    # some listed languages have a WordNet: the others are warned about up front, and the run goes on
    p = SynonymAugment(SynonymAugment.Settings(languages=["en", "de"]))
    with pytest.warns(PolydistillWarning, match=r"plugins\.synonym\.languages: rows tagged 'de' are left alone"):
        p.setup(fake_state())
