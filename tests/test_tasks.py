"""The three tasks and the cross-lingual modes, including different tokenizers."""

from __future__ import annotations

import pytest
import torch

import polydistill
from polydistill import ConfigError
from polydistill.models import load_tokenizer

from conftest import PAIRS, parallel_config, write_jsonl
from polydistill.testing import tiny_config


def test_embedding_distillation_in_parallel_mode_improves_retrieval(models, data, tmp_path):
    """Reimers & Gurevych 2020: the student maps a sentence and its translation onto the teacher's embedding."""
    rows = [{"en": en, "de": de, "lang": "de"} for en, de, _ in PAIRS]
    # student learns from both sides: teacher(en) -> student(de) and teacher(en) -> student(en)
    train = write_jsonl(tmp_path / "emb.jsonl", rows + [{**r, "de": r["en"], "lang": "en"} for r in rows])
    ev = write_jsonl(tmp_path / "emb_eval.jsonl", rows)
    cfg = {
        "task": "embedding",
        "mode": "parallel",
        "teachers": [{"model": str(models["embed"])}],
        "student": {"model": str(models["other_tok"])},  # another vocabulary and a classification checkpoint's encoder
        "data": {
            "train": {"path": str(train), "columns": {"text": "de", "source": "en", "lang": "lang"}},
            "eval": {"path": str(ev), "columns": {"text": "de", "source": "en", "lang": "lang"}},
            "batch_size": 6,
        },
        "training": {"epochs": 40, "learning_rate": 3e-3, "progress": False, "eval_every": 10_000},
        "output_dir": str(tmp_path / "run"),
    }
    before = polydistill.evaluate({**cfg, "student": {"model": str(models["other_tok"])}})["student"]
    result = polydistill.train(cfg)
    mse = [r["loss/mse"] for r in result.history if "loss/mse" in r]
    assert mse[-1] < 0.2 * mse[0]
    after = result.metrics["per_language"]["de"]
    assert set(after) == {"src2tgt", "tgt2src", "mean"}
    assert after["mean"] > before["per_language"]["de"]["mean"]
    assert after["mean"] >= 0.75


def test_different_tokenizers_distil_sequence_logits(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, student={"model": str(models["other_tok"])}, training__max_steps=3)
    result = polydistill.train(cfg)
    assert "loss/kl" in result.history[0]
    s_tok, t_tok = load_tokenizer(str(models["other_tok"])), load_tokenizer(str(models["teacher"]))
    assert s_tok.get_vocab() != t_tok.get_vocab()


def test_per_token_terms_refuse_different_tokens(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, plugins={"kd": {"hidden": 1.0}})
    with pytest.raises(ConfigError, match="plugins.kd.hidden: matching per-token states needs"):
        polydistill.train(cfg)


def _same_mode(models, data, tmp_path, **kd):
    cfg = parallel_config(models, data, tmp_path, mode="same", training__epochs=3, plugins={"kd": kd})
    cfg["data"]["train"]["columns"] = {"text": "de", "lang": "lang"}
    return cfg


def test_hidden_state_and_attention_matching_with_projection(models, data, tmp_path):
    # wide teacher (48) -> student (32): a learned projection per mapped layer
    cfg = _same_mode(models, data, tmp_path, hidden=1.0, attention=1.0, layer_map={1: 1, 2: 2})
    cfg["teachers"] = [{"model": str(models["wide"])}]
    cfg["student"] = {"model": str(models["teacher2"])}
    result = polydistill.train(cfg)
    steps = [r for r in result.history if "loss" in r]
    assert {"loss/kl", "loss/hidden", "loss/attention"} <= set(steps[0])
    assert steps[-1]["loss/hidden"] < steps[0]["loss/hidden"]
    # the projections are checkpointed by the core; the frozen teacher is not
    latest = (result.output_dir / "checkpoints" / "latest").read_text()
    saved = result.output_dir / "checkpoints" / latest / "polydistill_state.pt"
    modules = torch.load(saved, weights_only=False)["plugin_modules"]
    assert {k.split(".")[0] for k in modules} == {"kd__projections"}
    assert modules["kd__projections.hidden_1.weight"].shape == (48, 32)
    assert not list(saved.parent.glob("model_1*"))


def test_layer_map_out_of_range(models, data, tmp_path):
    cfg = _same_mode(models, data, tmp_path, hidden=1.0, layer_map={3: 1})
    with pytest.raises(ConfigError, match="plugins.kd.layer_map"):
        polydistill.train(cfg)


def test_token_classification_aligns_words_across_tokenizers(models, tmp_path):
    """Teacher-student learning for tagging on unlabelled text, student with another tokenizer."""
    food = {"soup", "bread", "pasta", "cake", "suppe", "brot", "nudeln", "kuchen"}
    rows, evals = [], []
    for en, de, _ in PAIRS:
        for text, lang in ((en, "en"), (de, "de")):
            words = text.split()
            tags = ["B-FOOD" if w in food else "O" for w in words]
            rows.append({"words": words, "lang": lang})
            evals.append({"words": words, "tags": tags, "lang": lang})
    train = write_jsonl(tmp_path / "tok.jsonl", rows)
    ev = write_jsonl(tmp_path / "tok_eval.jsonl", evals)
    # teacher: fine-tune the tagger on the labelled rows
    teacher = polydistill.train({
        "task": "token_classification",
        "student": {"model": str(models["tagger"])},
        "data": {"train": {"path": str(ev), "columns": {"text": "words", "label": "tags", "lang": "lang"}}, "batch_size": 8},
        "training": {"epochs": 40, "learning_rate": 5e-3, "progress": False},
        "output_dir": str(tmp_path / "teacher"),
    })
    assert teacher.metrics == {}  # no eval data configured
    cfg = {
        "task": "token_classification",
        "teachers": [{"model": str(teacher.student_dir)}],
        "student": {"config": {"base": str(models["other_tok"]), "num_hidden_layers": 1}},
        "labels": ["O", "B-FOOD", "I-FOOD"],
        "data": {
            "train": {"path": str(train), "columns": {"text": "words", "lang": "lang"}},
            "eval": {"path": str(ev), "columns": {"text": "words", "label": "tags", "lang": "lang"}},
            "batch_size": 8,
        },
        "training": {"epochs": 40, "learning_rate": 5e-3, "progress": False, "eval_every": 10_000},
        "output_dir": str(tmp_path / "student"),
    }
    result = polydistill.train(cfg)
    per_lang = result.metrics["per_language"]
    assert set(per_lang) == {"de", "en"}
    assert {"token_accuracy", "token_macro_f1", "entity_f1"} <= set(per_lang["en"])
    assert result.metrics["average"]["entity_f1"] > 0.5
    kl = [r["loss/kl"] for r in result.history if "loss/kl" in r]
    assert kl[-1] < kl[0]


class SharpenBatch:
    """Hands kd a temperature and per-sample weights computed from the outputs."""

    def __init__(self):
        self.seen = []

    @polydistill.hookimpl
    def augment_batch(self, batch, state):
        def temperature(student_out, teacher_out):
            t = torch.full((len(batch),), 0.5, device=student_out.logits.device)
            self.seen.append(t)
            return t

        batch.meta["temperature"] = temperature
        batch.meta["sample_weights"] = lambda s, t: torch.ones(len(batch), device=s.logits.device)
        return batch


def test_kd_takes_temperature_and_weights_from_another_plugin(models, data, tmp_path):
    sharpen = SharpenBatch()
    result = polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=2), plugins=[("sharpen", sharpen)])
    assert len(sharpen.seen) == 2
    assert [r["kd/temperature"] for r in result.history if "loss" in r] == [0.5, 0.5]


def test_normalized_mse_is_the_cosine_loss_rescaled(models, tmp_path):
    """With unit vectors, mean((s - t)²) = (2 - 2·cos) / D: kd's normalised mse must be exactly that."""
    rows = [{"en": en, "de": de, "lang": "de"} for en, de, _ in PAIRS]
    train = write_jsonl(tmp_path / "emb.jsonl", rows)
    cfg = {
        "task": "embedding", "mode": "parallel",
        "teachers": [{"model": str(models["embed"])}],
        "student": {"model": str(models["other_tok"])},
        "data": {"train": {"path": str(train), "columns": {"text": "de", "source": "en", "lang": "lang"}}, "batch_size": 4},
        "training": {"max_steps": 3, "progress": False, "log_every": 1},
        "plugins": {"kd": {"mse": 1.0, "cosine": 1.0, "normalize": True}},
        "output_dir": str(tmp_path / "run"),
    }
    history = [r for r in polydistill.train(cfg).history if "loss/mse" in r]
    width = 32  # hidden size of the tiny embedding teacher and student
    assert len(history) == 3
    for row in history:
        assert row["loss/mse"] * width / 2 == pytest.approx(row["loss/cosine"], rel=1e-5)


def test_default_fusion_gives_a_word_only_teachers_that_read_it(models, tmp_path):
    """Two token teachers without multi_teacher: a word one teacher lost to max_length is the other's alone.

    The finer tokenizer reaches max_length words earlier; before, its logits at
    the first sub-word (position 0, [CLS]) were averaged into those words (issue 14).
    """
    from polydistill.loop import Trainer
    from polydistill.tiny import train_tokenizer

    from conftest import TEXTS

    fine = train_tokenizer(TEXTS, vocab_size=80, lowercase=False)
    fine.save_pretrained(tmp_path / "fine")
    words = "soup bread the is on the table".split()
    path = write_jsonl(tmp_path / "rows.jsonl", [{"words": words}, {"words": ["good", "bread"]}])
    trainer = Trainer({
        "task": "token_classification",
        "teachers": [{"model": str(models["tagger"]), "name": "coarse"},
                     {"model": str(models["tagger"]), "tokenizer": str(tmp_path / "fine"), "name": "fine"}],
        "student": {"from_teacher": {"layers": [1]}},
        "data": {"train": {"path": str(path), "columns": {"text": "words"}}, "batch_size": 2, "max_length": 8, "shuffle": False},
        "training": {"max_steps": 1, "progress": False},
        "output_dir": str(tmp_path / "run"),
    })
    batch = next(iter(trainer.loader.iterate(0)))
    coarse, fine_out = trainer.state.run_teacher(0, batch), trainer.state.run_teacher(1, batch)
    lost = coarse.word_mask & ~fine_out.word_mask
    both = coarse.word_mask & fine_out.word_mask
    assert lost.any() and both.any()  # the case under test happens
    fused = trainer.runner.outputs(batch)
    torch.testing.assert_close(fused.logits[lost], coarse.logits[lost])
    torch.testing.assert_close(fused.logits[both], (coarse.logits[both] + fine_out.logits[both]) / 2)
    assert torch.equal(fused.word_mask, coarse.word_mask | fine_out.word_mask)


def test_token_evaluation_counts_and_reports_words_cut_by_max_length(models, tmp_path):
    long = "the soup and the bread and the cake are on the table".split()
    path = write_jsonl(tmp_path / "eval.jsonl", [
        {"words": long, "tags": ["O"] * len(long), "lang": "en"}, {"words": ["good", "bread"], "tags": ["O", "B-FOOD"], "lang": "de"},
    ])
    cfg = {"task": "token_classification", "student": {"model": str(models["tagger"])},
           "data": {"train": [], "eval": {"path": str(path), "columns": {"text": "words", "label": "tags", "lang": "lang"}},
                    "max_length": 8},
           "training": {"max_steps": 1}}
    with pytest.warns(polydistill.PolydistillWarning, match=r"evaluation: \d+ of 14 words \(en \d+\) lie past data.max_length=8"):
        metrics = polydistill.evaluate(cfg)["student"]
    cut = metrics["truncated_words"]
    assert cut["de"] == 0 and 0 < cut["en"] < len(long)


@pytest.mark.parametrize("task", ["causal_lm", "seq2seq", "question_answering"])
def test_generative_tasks_resume_exactly(models, data, tmp_path, task):
    """Interrupted after 4 steps and resumed: the same weights as a straight run (dropout on: RNG restored)."""
    from polydistill.testing import assert_same_student, interrupted_and_resumed

    from conftest import tiny_config

    overrides = dict(training__epochs=2, data__batch_size=5, generation={"num_beams": 1, "max_new_tokens": 4})
    straight = polydistill.train(tiny_config(models, data, tmp_path / "a", task, **overrides))
    assert_same_student(straight, interrupted_and_resumed(tiny_config(models, data, tmp_path / "b", task, **overrides), 4))


@pytest.mark.parametrize("pooling,normalize", [("mean", False), ("cls", True)])
def test_an_embedding_student_is_a_complete_sentence_transformers_model(models, data, tmp_path, pooling, normalize):
    st = pytest.importorskip("sentence_transformers")
    import json as _json

    from polydistill import models as PM
    from polydistill.tasks import get_task

    cfg = tiny_config(models, data, tmp_path, "embedding", pooling=pooling, data__eval=[],
                      plugins={"kd": {"mse": 1.0, "normalize": normalize}})
    result = polydistill.train(cfg)
    student = result.student_dir
    modules = [m["type"].rsplit(".", 1)[-1] for m in _json.loads((student / "modules.json").read_text())]
    assert modules == ["Transformer", "Pooling"] + (["Normalize"] if normalize else [])
    assert "SentenceTransformer" in (student / "README.md").read_text()

    texts = [_json.loads(line)["de"] for line in data["parallel"].read_text().splitlines()][:6]
    loaded = st.SentenceTransformer(str(student), device="cpu")
    assert loaded.max_seq_length == polydistill.load_config(cfg).data.max_length
    theirs = torch.tensor(loaded.encode(texts, convert_to_numpy=True))

    model = PM.load_model(str(student), "embedding").eval()
    tok = PM.load_tokenizer(str(student))
    with torch.no_grad():
        ours = PM.forward(model, dict(tok(texts, padding=True, return_tensors="pt")), get_task("embedding"), None, pooling).embeddings
    if normalize:
        ours = torch.nn.functional.normalize(ours, dim=-1)
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
