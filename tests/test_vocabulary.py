"""The student's own vocabulary: trim, extend, new, transliteration, row initialisation, coverage, saving and resume."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

import polydistill
from polydistill import vocabulary as V
from polydistill.cli import main
from polydistill.config import load_config
from polydistill.errors import ConfigError, DataError

from conftest import PAIRS, StopAt, tiny_config, write_jsonl
from polydistill.testing import with_fields

#: The tiny parallel data in two scripts the tiny teacher's vocabulary has never seen.
RUSSIAN = ["суп горячий", "я ем свежий хлеб", "сегодня мы варим макароны", "торт сладкий", "команда выиграла матч",
           "она бегает каждое утро", "он забил гол", "тренер тренирует игроков", "дождь идёт весь день", "ветер холодный",
           "в горах падает снег", "сегодня светит солнце"]
GREEK = ["η σούπα είναι ζεστή", "τρώω φρέσκο ψωμί", "μαγειρεύουμε ζυμαρικά απόψε", "το κέικ είναι γλυκό", "η ομάδα κέρδισε τον αγώνα",
         "τρέχει κάθε πρωί", "σκόραρε ένα γκολ", "ο προπονητής προπονεί τους παίκτες", "βρέχει όλη μέρα", "ο αέρας είναι κρύος",
         "χιονίζει στα βουνά", "ο ήλιος λάμπει σήμερα"]


@pytest.fixture(scope="module")
def scripts(tmp_path_factory):
    """Parallel rows: English source, Russian / Greek / German student text, with topic labels."""
    root = tmp_path_factory.mktemp("scripts")
    rows = []
    for (en, de, label), ru, el in zip(PAIRS, RUSSIAN, GREEK):
        rows += [{"en": en, "text": ru, "label": label, "lang": "ru"}, {"en": en, "text": el, "label": label, "lang": "el"},
                 {"en": en, "text": de, "label": label, "lang": "de"}]
    return write_jsonl(root / "scripts.jsonl", rows)


def script_config(models, scripts, tmp_path, vocabulary, task="sequence_classification", **overrides):
    train = {"path": str(scripts), "columns": {"text": "text", "source": "en", "lang": "lang"}}
    evaluation = train if task == "embedding" else {"path": str(scripts), "columns": {"text": "text", "label": "label", "lang": "lang"}}
    cfg = {
        "task": task, "mode": "parallel",
        "teachers": [{"model": str(models["teacher" if task == "sequence_classification" else "embed"]), "name": "teacher"}],
        "student": {"from_teacher": {"layers": [0, 1]}, "vocabulary": vocabulary},
        "data": {"train": train, "eval": evaluation, "batch_size": 6},
        "training": {"epochs": 1, "learning_rate": 1e-3, "progress": False, "log_every": 1, "seed": 3},
        "output_dir": str(tmp_path / "run"),
    }
    return with_fields(cfg, **overrides)


def plan_for(models, scripts, tmp_path, vocabulary, **overrides):
    cfg = load_config(script_config(models, scripts, tmp_path, vocabulary, **overrides))
    from polydistill.data import load_sources

    tok = AutoTokenizer.from_pretrained(str(models["teacher"]))
    return cfg, tok, load_sources(cfg.data.train, cfg)


def rows_of(model):
    return model.get_input_embeddings().weight.detach().clone()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize("vocabulary, message", [
    ({"method": "trim", "size": 100}, None),  # options of other methods are ignored: a study may vary method alone
    ({"method": "new", "init": "parallel"}, None),
    ({"method": "nwe"}, "student.vocabulary.method"),
    ({"method": "new", "modle": "bpe"}, "did you mean 'model'"),
])
def test_vocabulary_options_are_validated_with_the_field_named(models, scripts, tmp_path, vocabulary, message):
    cfg = script_config(models, scripts, tmp_path, vocabulary)
    if message is None:
        load_config(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_parallel_init_needs_parallel_pairs(models, scripts, tmp_path):
    cfg = script_config(models, scripts, tmp_path, {"method": "new", "init": "parallel"}, mode="same")
    with pytest.raises(ConfigError, match="init 'parallel' learns from parallel pairs"):
        load_config(cfg)


def test_languages_that_have_no_rows_are_named(models, scripts, tmp_path):
    cfg, tok, ds = plan_for(models, scripts, tmp_path, {"method": "extend", "languages": ["ru", "uk"]})
    with pytest.raises(DataError, match=r"no training rows in \['uk'\].*\['de', 'el', 'ru'\]"):
        V.build_tokenizer(cfg, tok, ds)


# --------------------------------------------------------------------------- trim


def test_trim_keeps_the_tokenization_and_the_rows_of_every_kept_token(models, scripts, tmp_path):
    cfg, tok, ds = plan_for(models, scripts, tmp_path, {"method": "trim", "keep_characters": False, "keep": ["cold"]})
    model = AutoModelForSequenceClassification.from_pretrained(str(models["teacher"]))
    before = rows_of(model)
    built = V.build_vocabulary(cfg, model, tok, ds)
    new = built.tokenizer
    assert len(new) < len(tok)
    assert set(new.all_special_tokens) == set(tok.all_special_tokens)
    for text in list(ds["text"]) + ["cold"]:
        assert new.tokenize(text) == tok.tokenize(text)
        assert new(text)["input_ids"][0] == new.cls_token_id and new(text)["input_ids"][-1] == new.sep_token_id
    after = rows_of(model)
    assert after.shape == (len(new), before.shape[1]) and model.config.vocab_size == len(new)
    for token, i in new.get_vocab().items():
        torch.testing.assert_close(after[i], before[tok.convert_tokens_to_ids(token)], rtol=0, atol=0)
    assert built.info["new_rows"] == 0 and built.info["parameters_after"] < built.info["parameters_before"]


def test_trim_keeps_single_characters_so_unseen_words_do_not_become_unk(models, scripts, tmp_path):
    cfg, tok, ds = plan_for(models, scripts, tmp_path, {"method": "trim"})
    new = V.build_tokenizer(cfg, tok, ds).tokenizer
    word = "trainers"  # in the tiny vocabulary's alphabet, not in the training text
    assert new.unk_token not in new.tokenize(word)
    singles = {t for t in tok.get_vocab() if len(t.removeprefix("##")) == 1}
    assert singles <= set(new.get_vocab())
    unkept = V.build_tokenizer(load_config(with_fields(script_config(models, scripts, tmp_path, {"method": "trim", "keep_characters": False}))), tok, ds)
    assert not singles <= set(unkept.tokenizer.get_vocab())


def test_trim_refuses_keep_tokens_the_tokenizer_lacks(models, scripts, tmp_path):
    cfg, tok, ds = plan_for(models, scripts, tmp_path, {"method": "trim", "keep": ["zzqx"]})
    with pytest.raises(ConfigError, match=r"student.vocabulary.keep: \['zzqx'\]"):
        V.build_tokenizer(cfg, tok, ds)


# --------------------------------------------------------------------------- extend and new


def test_extend_adds_tokens_for_new_scripts_and_keeps_every_old_id(models, scripts, tmp_path):
    cfg, tok, ds = plan_for(models, scripts, tmp_path, {"method": "extend", "size": 400, "min_frequency": 1})
    model = AutoModelForSequenceClassification.from_pretrained(str(models["teacher"]))
    before = rows_of(model)
    built = V.build_vocabulary(cfg, model, tok, ds)
    new = built.tokenizer
    assert len(tok) < len(new) <= len(tok) + 400
    old_vocab = tok.get_vocab()
    assert all(new.convert_tokens_to_ids(t) == i for t, i in old_vocab.items())
    torch.testing.assert_close(rows_of(model)[: len(tok)], before, rtol=0, atol=0)
    train = built.coverage["train"]
    assert train["ru"]["unk_rate_before"] > 0.5 and train["ru"]["unk_rate_after"] == 0.0
    assert train["el"]["tokens_per_word_after"] < 5
    # a German sentence the old vocabulary already read is read the same
    assert new.tokenize("die sonne scheint heute") == tok.tokenize("die sonne scheint heute")


@pytest.mark.parametrize("model_type", ["wordpiece", "unigram", "bpe"])
def test_new_tokenizer_of_each_model_keeps_rows_of_shared_tokens(models, scripts, tmp_path, model_type):
    cfg, tok, ds = plan_for(models, scripts, tmp_path, {"method": "new", "model": model_type, "size": 200, "min_frequency": 1})
    model = AutoModelForSequenceClassification.from_pretrained(str(models["teacher"]))
    before = rows_of(model)
    built = V.build_vocabulary(cfg, model, tok, ds)
    new = built.tokenizer
    assert len(new) <= 200
    ids = new("ветер холодный")["input_ids"]
    assert ids[0] == new.cls_token_id and ids[-1] == new.sep_token_id and new.unk_token_id not in ids
    for special in tok.all_special_tokens:  # special tokens keep their rows
        torch.testing.assert_close(rows_of(model)[new.convert_tokens_to_ids(special)], before[tok.convert_tokens_to_ids(special)])
    # a token of the old vocabulary keeps its row: the same text at the same place in a word
    old_tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    new_tokens = new.convert_ids_to_tokens(list(range(len(new))))
    kept = [(i, j) for i, j in enumerate(built.old_ids) if j is not None]
    for i, j in kept:
        a, b = new_tokens[i], old_tokens[j]
        assert a == b or a == "\u2581" + b or "##" + a == b, (a, b)
        torch.testing.assert_close(rows_of(model)[i], before[j], rtol=0, atol=0)
    if model_type != "unigram":  # a frequent English word starts a word in both
        word = {"wordpiece": "the", "bpe": "\u2581the"}[model_type]
        assert built.old_ids[new.convert_tokens_to_ids(word)] == tok.convert_tokens_to_ids("the")
    assert built.info["kept_rows"] > len(tok.all_special_tokens)


@pytest.mark.parametrize("vocabulary", [
    {"method": "new", "model": "unigram", "size": 150},
    {"method": "new", "model": "wordpiece", "size": 150, "min_frequency": 1},
    {"method": "new", "model": "bpe", "size": 150, "min_frequency": 1},
    {"method": "extend", "size": 100, "min_frequency": 1},
])
def test_the_same_seed_builds_the_same_vocabulary_and_rows(models, scripts, tmp_path, vocabulary):
    # tokenizers' own WordPiece and Unigram trainers order tokens by hash: this fails without polydistill's fixed order
    results = []
    for _ in range(3):
        cfg, tok, ds = plan_for(models, scripts, tmp_path, {**vocabulary, "sample": 20, "init": "random"})
        model = AutoModelForSequenceClassification.from_pretrained(str(models["teacher"]))
        built = V.build_vocabulary(cfg, model, tok, ds)
        results.append((built.tokenizer.get_vocab(), rows_of(model)))
    for vocab, rows in results[1:]:
        assert vocab == results[0][0]
        torch.testing.assert_close(rows, results[0][1], rtol=0, atol=0)


# --------------------------------------------------------------------------- initialisation


def test_fvt_rows_are_the_mean_of_the_old_pieces(models, scripts, tmp_path):
    cfg, tok, ds = plan_for(models, scripts, tmp_path, {"method": "new", "size": 300, "min_frequency": 1, "init": "fvt",
                                                                  "transliterate": "anyascii"})  # Latin words the old pieces spell
    model = AutoModelForSequenceClassification.from_pretrained(str(models["teacher"]))
    before = rows_of(model)
    built = V.build_vocabulary(cfg, model, tok, ds)
    new, after = built.tokenizer, rows_of(model)
    old_vocab = tok.get_vocab()
    checked = 0
    for token, i in new.get_vocab().items():
        if token in old_vocab or token.startswith("##") or token in new.all_special_tokens:
            continue
        pieces = tok.backend_tokenizer.model.tokenize(token)
        ids = [p.id for p in pieces if p.id != tok.unk_token_id]
        if ids and len(ids) > 1:
            torch.testing.assert_close(after[i], before[ids].mean(0))
            checked += 1
    assert checked > 3
    assert built.info["fvt"] > 0


def test_parallel_init_puts_a_token_near_the_source_word_it_translates(models, tmp_path):
    # "ветер" (wind) occurs only with English "wind"; other words vary around it
    others = ["cold", "hot", "sweet", "fresh", "today"]
    rows = []
    for i in range(40):
        a, b = others[i % 5], others[(i * 3 + 1) % 5]
        rows.append({"en": f"the wind is {a}", "text": f"ветер {['холодный', 'горячий', 'сладкий', 'свежий', 'сегодня'][i % 5]}", "lang": "ru"})
        rows.append({"en": f"the soup is {b}", "text": f"суп {['холодный', 'горячий', 'сладкий', 'свежий', 'сегодня'][(i * 3 + 1) % 5]}", "lang": "ru"})
    path = write_jsonl(tmp_path / "aligned.jsonl", rows)
    cfg, tok, ds = plan_for(models, path, tmp_path, {"method": "extend", "size": 300, "min_frequency": 1, "init": "parallel", "top_k": 3})
    model = AutoModelForSequenceClassification.from_pretrained(str(models["teacher"]))
    before = rows_of(model)
    built = V.build_vocabulary(cfg, model, tok, ds)
    new, after = built.tokenizer, rows_of(model)
    assert built.info["aligned"] > 0
    wind, soup = before[tok.convert_tokens_to_ids("wind")], before[tok.convert_tokens_to_ids("soup")]
    row = after[new.convert_tokens_to_ids("ветер")]
    cos = torch.nn.functional.cosine_similarity
    assert cos(row, wind, dim=0) > 0.8 > cos(row, soup, dim=0)


def test_the_default_init_aligns_where_the_run_has_parallel_pairs(models, scripts, tmp_path):
    cfg, tok, ds = plan_for(models, scripts, tmp_path, {"method": "extend", "size": 300, "min_frequency": 1})
    assert cfg.student.vocabulary.init == "auto" and V.init_method(cfg) == "parallel"
    built = V.build_vocabulary(cfg, AutoModelForSequenceClassification.from_pretrained(str(models["teacher"])), tok, ds)
    assert built.info["init"] == "parallel" and built.info["aligned"] > 0
    same = load_config(script_config(models, scripts, tmp_path, {"method": "extend"}, mode="same"))
    assert V.init_method(same) == "fvt"


def test_ibm_model1_learns_a_one_to_one_lexicon():
    # target 0,1,2 translate source 10,11,12; each pair holds two of them
    pairs = [([0, 1], [10, 11]), ([1, 2], [11, 12]), ([0, 2], [10, 12])] * 5
    tgt, src, prob = V.ibm_model1(pairs, target_size=3, iterations=10)
    best = {}
    for t, s, p in zip(tgt.tolist(), src.tolist(), prob.tolist()):
        if t < 3 and p > best.get(t, (0, None))[0]:
            best[t] = (p, s)
    assert {t: s for t, (_, s) in best.items()} == {0: 10, 1: 11, 2: 12}


# --------------------------------------------------------------------------- transliteration


def test_transliteration_is_part_of_the_saved_tokenizer(models, scripts, tmp_path):
    cfg, tok, ds = plan_for(models, scripts, tmp_path, {"transliterate": "anyascii"})
    built = V.build_vocabulary(cfg, None, tok, ds)
    built.save(tmp_path / "vocab")
    loaded = AutoTokenizer.from_pretrained(str(tmp_path / "vocab" / "tokenizer"))
    for text in ["ветер холодный", "ο αέρας είναι κρύος", "Щука"]:  # Щ is not in the training text, but its block is
        assert loaded(text)["input_ids"] == built.tokenizer(text)["input_ids"]
        assert loaded.unk_token_id not in loaded(text)["input_ids"]
    assert loaded.tokenize("ветер") == tok.tokenize("veter")
    assert built.info["transliterated_characters"] > 60


def test_transliteration_spaces_ideographs_like_bert():
    rules = dict(V.transliteration_rules(["中国"]))
    assert rules["中"].strip() == "Zhong" and rules["中"].startswith(" ")
    assert len(rules) == 2  # only the ideographs seen, not their 20,000-character block


# --------------------------------------------------------------------------- runs


def test_a_run_with_a_new_vocabulary_saves_a_student_plain_transformers_loads(models, scripts, tmp_path):
    cfg = script_config(models, scripts, tmp_path, {"method": "new", "size": 200, "min_frequency": 1, "init": "parallel"},
                        task="embedding", training__max_steps=4)
    result = polydistill.train(cfg)
    student = result.student_dir
    tok = AutoTokenizer.from_pretrained(str(student))
    model = AutoModel.from_pretrained(str(student)).eval()
    assert len(tok) == model.config.vocab_size <= 200
    vocab_dir = result.output_dir / "vocabulary"
    cov = json.loads((vocab_dir / "coverage.json").read_text())
    assert cov["train"]["ru"]["unk_rate_before"] > 0.5 > cov["train"]["ru"]["unk_rate_after"]
    assert json.loads((vocab_dir / "vocabulary.json").read_text())["init"] == "parallel"
    card = (student / "README.md").read_text()
    assert "## Vocabulary" in card and "new wordpiece tokenizer" in card and "| ru |" in card
    # the same retrieval scores from plain transformers as from the run's own evaluation
    again = polydistill.evaluate(result.output_dir)["student"]
    assert again["per_language"] == result.metrics["per_language"]
    texts = ["ветер холодный", "the wind is cold"]
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc).last_hidden_state
    mask = enc["attention_mask"].unsqueeze(-1).float()
    plain = (hidden * mask).sum(1) / mask.sum(1)
    from polydistill.data import Collator
    from polydistill.models import forward

    batch = Collator("embedding", tok, [], 128).encode(texts, texts, ["ru", "en"], None, {})
    with torch.no_grad():
        ours = forward(model, batch.student_inputs, "embedding").embeddings
    torch.testing.assert_close(plain, ours)


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification"])
def test_classification_and_tagging_runs_with_their_own_vocabulary(models, scripts, tmp_path, task, data):
    if task == "token_classification":
        cfg = tiny_config(models, data, tmp_path, task=task, training__max_steps=3)
        cfg["student"]["vocabulary"] = {"method": "new", "model": "unigram", "size": 120, "min_frequency": 1}
    else:
        cfg = script_config(models, scripts, tmp_path, {"method": "extend", "trim_unused": True, "size": 50, "min_frequency": 1},
                            training__max_steps=3)
        cfg["cache"] = {"enabled": True, "dir": str(tmp_path / "cache")}
    result = polydistill.train(cfg)
    assert result.metrics["per_language"]
    steps = [r for r in result.history if "loss" in r]
    assert len(steps) == 3 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    again = polydistill.evaluate(result.output_dir)["student"]
    assert again["average"] == pytest.approx(result.metrics["average"])


def test_resume_with_a_vocabulary_gives_the_same_weights(models, scripts, tmp_path):
    vocabulary = {"method": "new", "model": "bpe", "size": 150, "min_frequency": 1, "init": "parallel"}
    straight = polydistill.train(script_config(models, scripts, tmp_path / "a", vocabulary, training__epochs=2))
    cfg = script_config(models, scripts, tmp_path / "b", vocabulary, training__epochs=2)
    with pytest.raises(KeyboardInterrupt):
        polydistill.train(cfg, plugins=[("stop", StopAt(5))])
    resumed = polydistill.train(cfg, resume=tmp_path / "b" / "run")
    from safetensors.torch import load_file

    a = load_file(str(straight.student_dir / "model.safetensors"))
    b = load_file(str(resumed.student_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_gan_data_refuses_a_student_vocabulary_clearly(models, tmp_path, data):
    cfg = tiny_config(models, data, tmp_path, training__max_steps=2, plugins={"gan_data": {}})
    cfg["student"]["vocabulary"] = {"method": "trim"}
    with pytest.raises(polydistill.PolydistillError, match="different vocabularies.*student.vocabulary"):
        polydistill.train(cfg)


def test_vocab_command_prints_coverage_without_training(models, scripts, tmp_path, capsys):
    import yaml

    cfg = script_config(models, scripts, tmp_path, {"method": "extend", "size": 40, "min_frequency": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["vocab", str(path), "--out", str(tmp_path / "inspect")]) == 0
    out = capsys.readouterr().out
    assert "vocabulary: extend" in out and "| ru |" in out and "evaluation text (held out)" in out
    assert (tmp_path / "inspect" / "coverage.md").is_file() and not (tmp_path / "run").exists()
    assert main(["vocab", str(path), "--set", "student.vocabulary.method=keep", "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["vocabulary"]["method"] == "keep" and shown["coverage"]["train"]["ru"]["unk_rate_before"] > 0.5


def test_a_vocabulary_setting_is_a_study_axis(models, scripts, tmp_path):
    import yaml

    from polydistill.study import plan_study

    base = script_config(models, scripts, tmp_path, {"method": "extend", "size": 40, "min_frequency": 1})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {"name": "vocab", "base": "base.yaml", "seeds": [0],
             "axes": {"init": {"field": "student.vocabulary.init", "values": ["random", "fvt", "parallel"]}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    plan = plan_study(tmp_path / "study.yaml")
    inits = sorted(run.config["student"]["vocabulary"]["init"] for run in plan.runs)
    assert inits == ["fvt", "parallel", "random"]


def test_streamed_training_data_builds_its_vocabulary_from_a_sample(models, scripts, tmp_path):
    cfg = script_config(models, scripts, tmp_path, {"method": "extend", "size": 300, "min_frequency": 1}, training__max_steps=3)
    cfg["data"]["train"]["streaming"] = True
    with pytest.raises(ConfigError, match="student.vocabulary.sample: required with streamed training data"):
        load_config(cfg)
    cfg["student"]["vocabulary"]["sample"] = 5
    result = polydistill.train(cfg)
    built = json.loads((result.output_dir / "vocabulary" / "vocabulary.json").read_text())
    assert built["languages"] == {"de": 5, "el": 5, "ru": 5} and built["added"] > 0


def test_the_documented_example_config_is_valid():
    from pathlib import Path

    example = Path(__file__).resolve().parents[1] / "docs" / "examples" / "student_vocabulary.yaml"
    cfg = load_config(example)
    assert cfg.student.vocabulary.method == "new" and cfg.student.vocabulary.init == "parallel"
