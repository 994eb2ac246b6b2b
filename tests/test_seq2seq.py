"""The seq2seq task: targets, word-level KD per target token, BLEU/chrF evaluation, resume, refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import polydistill
from polydistill import ConfigError
from polydistill import models as M
from polydistill.tasks import get_task

from conftest import PAIRS, tiny_config

TASK = "seq2seq"


def mt_config(models, data, tmp_path, **overrides):
    return tiny_config(models, data, tmp_path, TASK, **overrides)


def test_targets_are_read_at_their_decoder_positions(models):
    tok = M.load_tokenizer(str(models["mt"]), task=TASK)
    inputs, positions, labels = get_task(TASK).encode(tok, ["the soup is hot", "bread"], 32, "longest", ["die suppe ist heiß", "brot"])
    for i, target in enumerate(["die suppe ist heiß", "brot"]):
        ids = tok(text_target=target)["input_ids"]
        assert labels[i][: len(ids)].tolist() == ids and (labels[i][len(ids):] == -100).all()
        assert positions[i][: len(ids)].tolist() == list(range(len(ids)))
    assert torch.equal(inputs["labels"], labels)  # the model shifts them into its decoder inputs
    model = M.load_model(str(models["mt"]), TASK).eval()
    out = M.forward(model, inputs, TASK, positions)
    assert out.logits.shape[:2] == labels.shape and torch.equal(out.word_mask, labels != -100)


@pytest.fixture(scope="module")
def trained_mt(models, data, tmp_path_factory):
    """The tiny Marian model trained on en -> de (no teacher: next-token cross-entropy on the references)."""
    out = tmp_path_factory.mktemp("trained-mt")
    cfg = mt_config(models, data, out, training__epochs=60, training__learning_rate=1e-2, training__warmup_ratio=0.0,
                    teachers=[], generation={"num_beams": 1, "max_new_tokens": 12})
    cfg["student"] = {"config": {"base": str(models["mt"]), "dropout": 0.0}}
    return polydistill.train(cfg)


def test_a_translation_model_trains_and_is_scored_by_bleu_and_chrf(trained_mt):
    de = trained_mt.metrics["per_language"]["de"]
    assert set(de) == {"bleu", "chrf"}
    assert de["chrf"] > 10 and de["bleu"] > 0  # an untrained model scores 0: the references' words come back
    sig = trained_mt.metrics["signature"]
    assert "tok:13a" in sig["bleu"] and sig["chrf"].startswith("nrefs:1")


def _kl_to(student_dir, teacher_dir, tok_dir):
    task = get_task(TASK)
    tok = M.load_tokenizer(str(tok_dir), task=TASK)
    inputs, positions, _ = task.encode(tok, [en for en, _, _ in PAIRS], 32, "longest", [de for _, de, _ in PAIRS])
    outs = []
    for path in (student_dir, teacher_dir):
        with torch.no_grad():
            outs.append(M.forward(M.load_model(str(path), TASK).eval(), inputs, task, positions))
    keep = outs[0].word_mask
    return float(F.kl_div(F.log_softmax(outs[0].logits[keep], -1), F.log_softmax(outs[1].logits[keep], -1),
                          log_target=True, reduction="batchmean"))


@pytest.mark.parametrize("divergence", ["forward", "skew_reverse"])
def test_word_level_kd_brings_a_smaller_student_to_its_teacher(models, data, trained_mt, tmp_path, divergence):
    teacher = trained_mt.student_dir
    cfg = mt_config(models, data, tmp_path, training__epochs=30, training__learning_rate=1e-2, training__warmup_ratio=0.0,
                    plugins={"kd": {"temperature": 1.0, "divergence": divergence}}, generation={"num_beams": 1, "max_new_tokens": 12})
    cfg["teachers"] = [{"model": str(teacher), "name": "teacher"}]
    cfg["student"] = {"config": {"base": str(teacher), "encoder_layers": 1, "decoder_layers": 1, "dropout": 0.0}}
    before = polydistill.train({**cfg, "training": {**cfg["training"], "max_steps": 1, "learning_rate": 1e-9},
                                "output_dir": str(tmp_path / "before")})
    result = polydistill.train(cfg)
    kl_before, kl_after = _kl_to(before.student_dir, teacher, teacher), _kl_to(result.student_dir, teacher, teacher)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    assert result.metrics["per_language"]["de"]["chrf"] > before.metrics["per_language"]["de"]["chrf"]


def test_refusals_name_the_field(models, data, tmp_path):
    cfg = mt_config(models, data, tmp_path, training__max_steps=1)
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.columns\.target: task seq2seq learns to produce a target text"):
        polydistill.train({**cfg, "data": {**cfg["data"], "train": {"path": cfg["data"]["train"]["path"], "columns": {"text": "en"}}}})
    with pytest.raises(ConfigError, match=r"student\.from_teacher\.decoder_layers: \[5\] out of range, the teacher has 2 layers"):
        polydistill.train({**cfg, "student": {"from_teacher": {"layers": [0], "decoder_layers": [5]}}})
    with pytest.raises(ConfigError, match=r"student\.from_teacher\.decoder_layers: the teacher has no decoder"):
        polydistill.train({**tiny_config(models, data, tmp_path, training__max_steps=1),
                           "student": {"from_teacher": {"layers": [0], "decoder_layers": [0]}}})
    with pytest.raises(ConfigError, match=r"data\.train\[0\]\.columns\.target: task sequence_classification reads no target text"):
        polydistill.train({**tiny_config(models, data, tmp_path, training__max_steps=1),
                           "data": {"train": {"path": cfg["data"]["train"]["path"], "columns": {"text": "de", "source": "en", "target": "de"}}}})


def test_a_student_cut_from_an_encoder_decoder_keeps_the_chosen_blocks_of_each_stack(models):
    teacher = M.load_model(str(models["mt"]), TASK)
    student = M.student_from_teacher(teacher, [1], TASK, None, decoder_layers=[0])
    assert (student.config.encoder_layers, student.config.decoder_layers) == (1, 1)
    t, s = teacher.state_dict(), student.state_dict()
    for key, value in s.items():
        if ".encoder.layers.0." in key:
            torch.testing.assert_close(value, t[key.replace(".encoder.layers.0.", ".encoder.layers.1.")])
        elif ".layers." not in key:  # embeddings, layer norms, head: the teacher's
            torch.testing.assert_close(value, t[key])
    full = M.student_from_teacher(teacher, [0], TASK, None)  # the decoder kept whole by default
    assert full.config.decoder_layers == teacher.config.decoder_layers


def test_an_ablation_over_the_generative_losses_runs_and_reports_bleu(models, data, tmp_path):
    """A study whose axes are kd's divergence and sequence-level KD, reported on the task's primary metric."""
    import yaml

    from polydistill.study import ablate

    base = mt_config(models, data, tmp_path, training__max_steps=2, generation={"num_beams": 1, "max_new_tokens": 4},
                     cache={"dir": str(tmp_path / "cache")})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    study = {"name": "generative", "base": "base.yaml", "seeds": [0],
             "axes": {"divergence": {"field": "plugins.kd.divergence", "values": ["forward", "reverse", "jsd"]},
                      "targets": {"add_one_in": {"sequence_kd": {"num_beams": 2, "max_new_tokens": 4}}}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study, sort_keys=False))
    result = ablate(tmp_path / "study.yaml", tmp_path / "out", log=lambda _: None)
    assert len(result.records) == 6 and not result.failed
    report = polydistill.write_report(tmp_path / "out", tmp_path / "report")
    assert report.metric == "bleu"
    assert (tmp_path / "report" / "report.md").read_text().count("sequence_kd") >= 1


def test_trimming_a_cached_subset_keeps_the_target_and_its_positions(models):
    """The cache runs a subset of a batch with its all-padding columns trimmed: for seq2seq only the
    source's; decoder positions are not source positions, so they do not move."""
    tok = M.load_tokenizer(str(models["mt"]), task=TASK)
    tok.padding_side = "left"
    task = get_task(TASK)
    inputs, positions, labels = task.encode(tok, ["the soup is hot and the bread is fresh", "bread"], 32, "longest",
                                            ["die suppe", "brot ist frisch und gut"])
    sub = {k: v[1:] for k, v in inputs.items()}  # the short source: left padding in every column it does not use
    trimmed, kept = task.trim_padding(sub, positions[1:])
    assert trimmed["attention_mask"].all() and trimmed["input_ids"].size(1) < sub["input_ids"].size(1)
    assert torch.equal(trimmed["labels"], labels[1:]) and torch.equal(kept, positions[1:])
    # the subset is now what encoding its row alone gives (its target already as long as the batch's)
    own, own_positions, own_labels = task.encode(tok, ["bread"], 32, "longest", ["brot ist frisch und gut"])
    assert torch.equal(trimmed["input_ids"], own["input_ids"]) and torch.equal(kept, own_positions)


def test_a_t5_teacher_is_cut_and_distilled(models, data, tmp_path):
    """T5 keeps its relative position bias in each stack's first block only: a student keeping
    decoder block 1 gets block 1's weights and the bias of block 0."""
    from transformers import T5Config, T5ForConditionalGeneration

    tok = M.load_tokenizer(str(models["mt"]))
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    teacher_dir = tmp_path / "t5"
    T5ForConditionalGeneration(config).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    teacher = M.load_model(str(teacher_dir), "seq2seq")
    student = M.student_from_teacher(teacher, [1], "seq2seq", None, [1])
    t_block, s_block = teacher.decoder.block, student.decoder.block
    assert torch.equal(s_block[0].layer[1].EncDecAttention.q.weight, t_block[1].layer[1].EncDecAttention.q.weight)
    bias = "layer.0.SelfAttention.relative_attention_bias.weight"
    assert torch.equal(s_block[0].state_dict()[bias], t_block[0].state_dict()[bias])
    cfg = tiny_config({**models, "mt": teacher_dir}, data, tmp_path, "seq2seq", training__max_steps=3,
                      generation={"num_beams": 2, "max_new_tokens": 6})
    result = polydistill.train(cfg)
    assert set(result.metrics["per_language"]["de"]) == {"bleu", "chrf"}
