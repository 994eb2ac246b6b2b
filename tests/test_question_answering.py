"""The question_answering task: windows over long contexts, span labels, cache, evaluation (EM/F1), errors."""

from __future__ import annotations

import json

import datasets
import pytest
import torch

import polydistill
from polydistill import ConfigError, DataError
from polydistill import models as M
from polydistill.batch import ModelOutputs
from polydistill.data import Collator, Loader
from polydistill.tasks import get_task
from polydistill.tasks.question_answering import answer_f1, normalize_answer
from polydistill.testing import qa_rows

from conftest import tiny_config

TASK = "question_answering"
QA = get_task(TASK)


def qa_config(models, data, tmp_path, **overrides):
    return tiny_config(models, data, tmp_path, TASK, **overrides)


@pytest.fixture
def tok(models):
    return QA.prepare_tokenizer(M.load_tokenizer(str(models["qa"]), task=TASK), "student")


def raw_rows(rows=None):
    rows = rows or qa_rows()
    return datasets.Dataset.from_list([{"text": r["question"], "context": r["context"], "target": r["answers"], "lang": r["lang"]}
                                       for r in rows])


# --------------------------------------------------------------------------- windows and labels


def test_long_contexts_become_overlapping_windows_that_map_back(tok):
    raw = raw_rows()
    features = QA.prepare_data(raw, tok, 24, 4)
    assert len(features) > len(raw)  # every context is longer than one window
    for f in features:
        row = raw[f["example"]]
        assert row["context"][f["offset"]: f["offset"] + len(f["context"])] == f["context"]
        assert f["answers"] == row["target"]["text"]
        start, text = f["target"]["start"], f["target"]["text"]
        if start >= 0:  # the answer lies in this window, at these characters
            assert f["context"][start: start + len(text)] == text == row["target"]["text"][0]
    for ex in range(len(raw)):
        windows = [f for f in features if f["example"] == ex]
        assert len(windows) > 1 and any(f["target"]["start"] >= 0 for f in windows)
        for a, b in zip(windows, windows[1:]):  # neighbours share doc_stride tokens
            assert b["offset"] < a["offset"] + len(a["context"])


def test_labels_are_the_answers_first_and_last_token_or_the_first_token(tok):
    context = "the soup is hot . the wind is cold ."
    pairs = [("the wind is ?", context), ("the wind is ?", context), ("what ?", "no answer here .")]
    targets = [{"text": "cold", "start": context.index("cold")}, {"text": ["is hot"], "answer_start": [9]},
               {"text": "", "start": -1}]
    inputs, words, labels = QA.encode(tok, pairs, 32, "longest", targets)
    ids = inputs["input_ids"]
    assert tok.decode(ids[0, labels[0, 0]: labels[0, 1] + 1]) == "cold"
    assert tok.decode(ids[1, labels[1, 0]: labels[1, 1] + 1]) == "is hot"  # raw SQuAD-style cells too
    assert labels[2].tolist() == [0, 0]  # no answer: the first ([CLS]) token
    assert words.shape == (3, 2) and (words >= 0).all()


def test_outputs_are_start_and_end_distributions_with_padding_masked(models, tok):
    model = M.load_model(str(models["qa"]), TASK)
    inputs, words, _ = QA.encode(tok, [("the soup is ?", "the soup is hot ."), ("a ?", "a b c d e f g h i j k .")], 32, "longest")
    out = M.forward(model, inputs, QA, words, "mean")
    raw = model(**inputs)
    assert out.logits.shape == (2, 2, inputs["input_ids"].size(1))
    n = int(inputs["attention_mask"][0].sum())
    assert torch.equal(out.logits[0, 0, :n], raw.start_logits[0, :n]) and torch.equal(out.logits[0, 1, :n], raw.end_logits[0, :n])
    assert (out.logits[0, :, n:] == -1e4).all()  # padding gets no probability
    probs = torch.softmax(out.logits, -1)
    assert torch.allclose(probs.sum(-1), torch.ones(2, 2))


def test_cached_rows_rebuild_the_outputs_of_any_batch_width(models, tok):
    model = M.load_model(str(models["qa"]), TASK)
    pairs = [("the soup is ?", "the soup is hot ."), ("a ?", "a b c d e f g h i j k .")]
    inputs, words, _ = QA.encode(tok, pairs, 32, "longest")
    out = M.forward(model, inputs, QA, words, "mean")
    rows = QA.cache_rows(out)
    assert [r.shape[1] for r in rows] == inputs["attention_mask"].sum(1).tolist()
    back = QA.from_cache(rows, words, "cpu")
    assert torch.equal(back.logits, out.logits)
    alone = QA.from_cache(rows[:1], words[:1], "cpu")  # a batch of the short one only is as wide as it is
    assert alone.logits.shape[-1] == rows[0].shape[1]


# --------------------------------------------------------------------------- metrics


def test_squad_normalisation_and_f1_by_hand():
    assert normalize_answer("The  Eiffel-Tower!", "en") == "eiffel tower"
    assert normalize_answer("The Eiffel Tower", "de") == "the eiffel tower"  # articles are English ones
    assert normalize_answer("«Die Suppe»", "de") == "die suppe"  # any Unicode punctuation
    # prediction "the soup is hot" vs gold "soup hot": 2 common of 3 predicted (the dropped) and 2 gold
    assert answer_f1("the soup is hot", "soup hot", "en") == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))
    assert answer_f1("北京大学", "北京", "zh") == pytest.approx(2 * 0.5 * 1 / 1.5)  # per character
    assert answer_f1("", "") == 1.0 and answer_f1("x", "") == 0.0


class Oracle:
    """Predict for evaluation whose start/end logits peak at each window's gold span."""

    def __init__(self, tok, wrong=()):
        self.tokenizer, self.doc_stride, self.wrong = tok, 4, set(wrong)
        self.collator = Collator(TASK, tok, [], 24)

    def __call__(self, ds):
        for batch in Loader(ds, self.collator, 5, seed=0, shuffle=False, group=False).iterate():
            width = batch.student_inputs["input_ids"].size(1)
            logits = torch.full((len(batch), 2, width), -5.0)
            for j, row in enumerate(batch.meta["index"]):
                s, e = batch.labels[j].tolist()
                if ds[row]["example"] in self.wrong:
                    s = e = max(1, width - 2)
                if (s, e) != (0, 0):
                    logits[j, 0, s], logits[j, 1, e] = 5.0, 5.0
            yield batch, ModelOutputs(logits=logits, word_mask=torch.ones(len(batch), 2, dtype=torch.bool))


def test_evaluation_takes_the_best_span_over_windows(tok):
    raw = raw_rows()
    scored = QA.evaluate(Oracle(tok), raw, None, 24)
    assert scored["per_language"] == {"de": {"exact_match": 100.0, "f1": 100.0}, "en": {"exact_match": 100.0, "f1": 100.0}}
    assert scored["questions"] == {"de": 12, "en": 12} and scored["windows"] > len(raw)
    missed = QA.evaluate(Oracle(tok, wrong={0, 1, 2}), raw, None, 24)  # three English questions answered elsewhere
    assert missed["per_language"]["en"]["exact_match"] == pytest.approx(100 * 9 / 12)


def test_unanswerable_questions_are_right_when_no_answer_is_preferred(tok):
    rows = [{"text": "where ?", "context": "the soup is hot .", "target": {"text": [], "answer_start": []}, "lang": "en"}]
    scored = QA.evaluate(Oracle(tok), datasets.Dataset.from_list(rows), None, 24)
    assert scored["per_language"]["en"] == {"exact_match": 100.0, "f1": 100.0}


# --------------------------------------------------------------------------- runs


def test_distils_a_qa_student_and_evaluates_per_language(models, data, tmp_path):
    result = polydistill.train(qa_config(models, data, tmp_path, training__max_steps=4))
    assert set(result.metrics["per_language"]) == {"de", "en"}
    assert set(result.metrics["average"]) == {"exact_match", "f1"}
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(row["loss/kl"] >= 0 for row in logged if "loss/kl" in row)


def test_fine_tuning_on_gold_spans_learns_them(models, data, tmp_path):
    cfg = qa_config(models, data, tmp_path, teachers=[], student={"model": str(models["qa"])},
                    training__epochs=30, training__learning_rate=3e-3)
    before = polydistill.evaluate(cfg)["student"]["average"]["f1"]
    after = polydistill.train(cfg).metrics["average"]["f1"]
    assert after > before + 20


def test_streamed_rows_are_cut_into_windows_too(models, data, tmp_path):
    cfg = qa_config(models, data, tmp_path, training__max_steps=3)
    cfg["data"]["train"] = {**cfg["data"]["train"], "streaming": True}
    result = polydistill.train(cfg)
    assert result.history[-1]["step"] == 3


def test_a_students_own_vocabulary_is_learned_from_questions_and_contexts(models, data, tmp_path):
    cfg = qa_config(models, data, tmp_path, training__max_steps=2, teachers=[],
                    student={"model": str(models["qa"]), "vocabulary": {"method": "trim", "size": 120}})
    result = polydistill.train(cfg)
    def whole(tok):  # the answer words (only contexts hold them) the tokenizer reads as one token
        return {w for r in qa_rows() for w in r["answers"]["text"] if len(tok(w, add_special_tokens=False)["input_ids"]) == 1}

    kept, before = whole(M.load_tokenizer(str(result.student_dir))), whole(M.load_tokenizer(str(models["qa"])))
    assert len(before) > 10 and kept == before


def test_teacher_outputs_come_from_the_cache_in_the_second_epoch(models, data, tmp_path):
    runs = {}
    for cached in (False, True):
        cfg = qa_config(models, data, tmp_path / str(cached), training__epochs=2,
                        cache={"enabled": cached, "dir": str(tmp_path / "cache")}, plugins={"kd": {"kl": 1.0, "ce": 0.5}})
        polydistill.train(cfg)
        runs[cached] = [json.loads(line) for line in (tmp_path / str(cached) / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in runs.items()}
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


@pytest.mark.parametrize("change, message", [
    ({"data__train__columns": {"text": "question", "target": "answers", "lang": "lang"}},
     r"columns.context: task question_answering reads a passage"),
    ({"data__doc_stride": 12}, r"data.doc_stride: 12 must be below half of data.max_length \(24\)"),
    ({"mode": "parallel"}, r"an answer is a span of the context"),
])
def test_config_mistakes_name_the_field(models, data, tmp_path, change, message):
    with pytest.raises((ConfigError, DataError), match=message):
        polydistill.train(qa_config(models, data, tmp_path, **change))


def test_a_context_column_on_another_task_is_refused(models, data, tmp_path):
    cfg = tiny_config(models, data, tmp_path, "seq2seq")
    cfg["data"]["train"]["columns"]["context"] = "de"
    with pytest.raises(ConfigError, match=r"columns.context: task seq2seq reads no context passage"):
        polydistill.train(cfg)


def test_a_malformed_answer_names_the_row_and_column(models, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"q": "where ?", "c": "here .", "a": {"answer_start": [0]}}) + "\n")
    cfg = {"task": TASK, "student": {"model": str(models["qa"])},
           "data": {"train": {"path": str(path), "columns": {"text": "q", "context": "c", "target": "a"}}},
           "training": {"max_steps": 1}, "output_dir": str(tmp_path / "run")}
    with pytest.raises(DataError, match=r"row 1: column 'a' \(columns.target\) is .*the mapping has no 'text'"):
        polydistill.train(cfg)


def test_text_augmentation_is_refused(models, data, tmp_path):
    with pytest.raises(ConfigError, match=r"plugins.synonym: task question_answering reads each text with a passage"):
        polydistill.train(qa_config(models, data, tmp_path, plugins={"synonym": {"probability": 0.5}}))


def test_a_slow_tokenizer_is_refused(tok):
    class Slow:
        is_fast = False

    with pytest.raises(ConfigError, match="fast"):
        QA.prepare_tokenizer(Slow(), "teachers[0]")
