"""End-to-end behaviour of the loop: learning, parallel mode, resume, hook order."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

import polydistill
from polydistill import hookimpl, models as M
from polydistill.config import load_config
from polydistill.data import load_sources
from polydistill.hookspecs import LIFECYCLE_HOOKS, STEP_HOOKS

from polydistill.testing import HookRecorder as Recorder

from conftest import LABELS, PAIRS, StopAt, parallel_config


def _agreement(student, teacher, student_tok, teacher_tok) -> float:
    """Fraction of pairs where the student's class on German equals the teacher's on English."""
    with torch.no_grad():
        s = student(**student_tok([de for _, de, _ in PAIRS], return_tensors="pt", padding=True)).logits.argmax(-1)
        t = teacher(**teacher_tok([en for en, _, _ in PAIRS], return_tensors="pt", padding=True)).logits.argmax(-1)
    return float((s == t).float().mean())


def test_distillation_raises_agreement_and_lowers_loss(models, data, trained_teacher, tmp_path):
    teacher = M.load_model(str(trained_teacher), "sequence_classification").eval()
    tok = M.load_tokenizer(str(trained_teacher))
    assert len(set(teacher(**tok([en for en, _, _ in PAIRS], return_tensors="pt", padding=True)).logits.argmax(-1).tolist())) == 3
    before = M.student_from_teacher(teacher, [0, 2], "sequence_classification", LABELS).eval()
    cfg = parallel_config(models, data, tmp_path, training__epochs=25, training__learning_rate=3e-3,
                          plugins={"kd": {"temperature": 1.0}}, teachers=[{"model": str(trained_teacher)}])
    result = polydistill.train(cfg)
    after = M.load_model(str(result.student_dir), "sequence_classification").eval()
    kl = [row["loss/kl"] for row in result.history if "loss/kl" in row]
    assert kl[-1] < 0.5 * kl[0]
    assert _agreement(after, teacher, tok, tok) > _agreement(before, teacher, tok, tok)
    assert _agreement(after, teacher, tok, tok) >= 0.9


def test_hook_order_of_one_step_is_as_documented(models, data, tmp_path):
    rec = Recorder()
    polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=1), plugins=[("recorder", rec)])
    assert rec.calls == [
        "trainable_modules", "setup",
        *STEP_HOOKS,
        "state_dict", "on_evaluate", "on_train_end",  # the last checkpoint comes before the final evaluation
    ]


def test_parallel_mode_trains_student_on_target_column(models, data, tmp_path):
    rec = Recorder()
    polydistill.train(parallel_config(models, data, tmp_path), plugins=[("recorder", rec)])
    german = {de for _, de, _ in PAIRS}
    english = {en for en, _, _ in PAIRS}
    seen = [(call["batch"].texts, call["batch"].teacher_texts) for call in rec.seen("augment_batch")]
    student_texts = {t for texts, _ in seen for t in texts}
    teacher_texts = {t for _, texts in seen for t in texts}
    assert student_texts == german
    assert teacher_texts == english
    # and the rows stay aligned: each teacher text is the translation of the student text beside it
    pairs = {de: en for en, de, _ in PAIRS}
    assert all(pairs[s] == t for texts, teacher in seen for s, t in zip(texts, teacher))



def _weights(run_dir):
    return load_file(str(run_dir / "student" / "model.safetensors"))


def test_resume_after_interrupt_gives_the_same_weights(models, data, tmp_path):
    # dropout is on (BERT's default 0.1) so the RNG state must be restored too
    overrides = dict(training__epochs=3, data__batch_size=3)
    straight = polydistill.train(parallel_config(models, data, tmp_path / "a", **overrides))

    cfg = parallel_config(models, data, tmp_path / "b", **overrides)
    with pytest.raises(KeyboardInterrupt):
        polydistill.train(cfg, plugins=[("stop", StopAt(5))])
    run_dir = tmp_path / "b" / "run"
    assert (run_dir / "checkpoints" / "latest").read_text() == "checkpoint-5"
    resumed = polydistill.train(cfg, resume=run_dir)

    a, b = _weights(straight.output_dir), _weights(resumed.output_dir)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert [r["loss"] for r in straight.history if "loss" in r][-3:] == [r["loss"] for r in resumed.history if "loss" in r][-3:]


def test_resume_restores_plugin_state(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__epochs=1)
    polydistill.train(cfg, plugins=[("recorder", Recorder())])
    rec = Recorder()
    polydistill.train(cfg, resume=tmp_path / "run", plugins=[("recorder", rec)])
    assert "load_state_dict" in rec.calls
    assert rec.calls.index("load_state_dict") > rec.calls.index("setup")
    assert rec.restored["calls"] > 0


def test_every_hook_is_called_in_a_run_with_resume(models, data, tmp_path):
    """Together with the recorded order above, each hook has a test that calls it."""
    cfg = parallel_config(models, data, tmp_path, training__max_steps=2)
    polydistill.train(cfg, plugins=[("recorder", Recorder())])
    rec = Recorder()
    polydistill.train(cfg, overrides=["training.max_steps=3"], resume=tmp_path / "run", plugins=[("recorder", rec)])
    assert set(rec.calls) == set(STEP_HOOKS) | set(LIFECYCLE_HOOKS)


def test_run_directory_contents(models, data, tmp_path):
    result = polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=2))
    out = result.output_dir
    assert (out / "student" / "config.json").is_file()
    assert (out / "student" / "tokenizer_config.json").is_file()
    card = (out / "student" / "README.md").read_text()
    assert "| de |" in card and "| en |" in card
    assert json.loads((out / "plugins.json").read_text()) == {"kd": polydistill.__version__}
    assert json.loads((out / "config.json").read_text())["mode"] == "parallel"
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["per_language"]) == {"de", "en"}
    # the saved student evaluates the same through the public API
    again = polydistill.evaluate(out)["student"]
    assert again["average"]["accuracy"] == pytest.approx(metrics["average"]["accuracy"])


def test_no_teacher_means_fine_tuning_with_cross_entropy(models, data, tmp_path):
    cfg = {
        "task": "sequence_classification",
        "labels": LABELS,
        "student": {"model": str(models["teacher2"])},
        "data": {"train": {"path": str(data["eval"]), "columns": {"label": "label", "lang": "lang"}}, "batch_size": 8},
        "training": {"epochs": 30, "learning_rate": 3e-3, "progress": False, "log_every": 1},
        "output_dir": str(tmp_path / "ft"),
    }
    result = polydistill.train(cfg)
    ce = [r["loss/ce"] for r in result.history if "loss/ce" in r]
    assert "loss/kl" not in result.history[0]
    assert ce[-1] < 0.5 * ce[0]


def test_eval_data_languages_are_reported_separately(models, data, tmp_path):
    cfg = load_config(parallel_config(models, data, tmp_path))
    ds = load_sources(cfg.data.eval, cfg)
    assert sorted(set(ds["lang"])) == ["de", "en"]


def test_gradient_accumulation_and_bf16_autocast(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__epochs=2, training__gradient_accumulation_steps=3,
                          training__mixed_precision="bf16")
    result = polydistill.train(cfg)
    steps = [r["step"] for r in result.history if "loss" in r]
    # 12 rows / batch 4 = 3 micro-batches an epoch = 1 optimizer step an epoch
    assert steps == [1, 2]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in result.history if "loss" in r)


def test_an_epochs_leftover_micro_batches_still_make_a_step(models, data, tmp_path):
    # 3 micro-batches an epoch in groups of 2: steps of 2 + 1 micro-batches, none carried over
    cfg = parallel_config(models, data, tmp_path, training__epochs=2, training__gradient_accumulation_steps=2)
    result = polydistill.train(cfg)
    rows = [r for r in result.history if "loss" in r]
    assert [(r["step"], r["epoch"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 1)]


def test_tensorboard_tracker_receives_every_term(models, data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = parallel_config(models, data, tmp_path, training__max_steps=3, trackers=["tensorboard"], project_name="tb")
    polydistill.train(cfg)
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "loss/kl", "lr", "eval/accuracy", "eval/de/accuracy"} <= tags
    assert [e.step for e in acc.Scalars("loss/kl")] == [1, 2, 3]


def test_streamed_training_data(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=5)
    cfg["data"]["train"]["streaming"] = True
    cfg["data"]["stream_buffer"] = 5
    result = polydistill.train(cfg)
    assert [r["step"] for r in result.history if "loss" in r] == [1, 2, 3, 4, 5]
    cfg["training"].pop("max_steps")
    with pytest.raises(polydistill.ConfigError, match="training.max_steps: required when the training data is streamed"):
        polydistill.train(cfg)


def test_a_streamed_epoch_s_last_partial_accumulation_group_divides_by_its_own_size(models, data, tmp_path):
    """12 rows, batches of 4, 2 per step: each epoch ends in a group of one, streamed or not (issue 14)."""
    def run(name, streaming):
        cfg = parallel_config(models, data, tmp_path, training__max_steps=4, training__gradient_accumulation_steps=2,
                              data__shuffle=False, output_dir=str(tmp_path / name))
        cfg["data"]["train"]["streaming"] = streaming
        return load_file(str(polydistill.train(cfg).student_dir / "model.safetensors"))

    loaded, streamed = run("loaded", False), run("streamed", True)
    for key in loaded:
        torch.testing.assert_close(streamed[key], loaded[key], rtol=0, atol=1e-6, msg=key)


class MakeBatches:
    """Generates every training batch itself (what a data-free plugin such as gan_data does)."""

    @hookimpl
    def augment_batch(self, batch, state):
        assert batch.meta.get("placeholder") and len(batch) == 0
        n = batch.meta["batch_size"]
        texts = [PAIRS[(state.step + i) % len(PAIRS)][1] for i in range(n)]
        enc = dict(state.student_tokenizer(texts, return_tensors="pt", padding=True))
        return polydistill.Batch(texts=texts, teacher_texts=texts, langs=["de"] * n,
                                 student_inputs=enc, teacher_inputs=[enc]).to(state.device)


def test_a_run_without_training_data_trains_on_plugin_batches(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, mode="same", training__max_steps=3)
    cfg["data"]["train"] = []
    result = polydistill.train(cfg, plugins=[("make", MakeBatches())])
    assert [r["step"] for r in result.history if "loss" in r] == [1, 2, 3]
    with pytest.raises(polydistill.PluginError, match="data.train is empty and no plugin generated this batch"):
        polydistill.train(cfg, overwrite=True)
    cfg["training"].pop("max_steps")
    with pytest.raises(polydistill.ConfigError, match="data.train is empty"):
        polydistill.train(cfg)


def test_a_repeated_sigterm_does_not_abort_the_checkpoint_but_a_second_ctrl_c_does():
    import os
    import signal

    from polydistill.loop import _StopFlag

    with _StopFlag() as flag:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # schedulers and a dying parent send it again
        assert flag.requested
    with pytest.raises(KeyboardInterrupt):
        with _StopFlag():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


def test_fused_optimizer_is_the_default_and_trains_like_the_per_tensor_loop(models, data, tmp_path):
    from polydistill.loop import Trainer

    students = {}
    for fused in (True, False):  # each built and trained in turn: construction seeds the RNG
        trainer = Trainer(parallel_config(models, data, tmp_path, output_dir=str(tmp_path / str(fused)), training__fused_optimizer=fused))
        assert bool(trainer.state.optimizer.optimizer.defaults.get("fused")) is fused
        trainer.fit()
        students[fused] = trainer.state.unwrapped_student().state_dict()
    start = M.load_model(str(models["teacher"]), "sequence_classification").state_dict()
    assert not torch.equal(students[True]["classifier.weight"], start["classifier.weight"])
    for key, value in students[True].items():  # the same updates, up to float rounding
        torch.testing.assert_close(value, students[False][key], rtol=0, atol=1e-6, msg=key)
    default = Trainer(parallel_config(models, data, tmp_path, output_dir=str(tmp_path / "default")))
    assert default.state.optimizer.optimizer.defaults["fused"] is True


def test_models_keep_sdpa_attention_unless_a_plugin_needs_attention_maps(models, data, tmp_path):
    from polydistill.loop import Trainer
    from polydistill.tiny import build_tiny_model

    from conftest import LABELS, TEXTS

    sdpa = build_tiny_model(tmp_path / "sdpa", TEXTS, tokenizer=M.load_tokenizer(str(models["teacher"])),
                            id2label=dict(enumerate(LABELS)), num_layers=4, seed=1, attn_implementation="sdpa")
    teachers = [{"model": str(sdpa), "name": "teacher"}]
    plain = Trainer(parallel_config(models, data, tmp_path, teachers=teachers, output_dir=str(tmp_path / "plain")))
    assert {m.config._attn_implementation for m in [plain.state.unwrapped_student(), *plain.state.teachers]} == {"sdpa"}
    maps = Trainer(parallel_config(models, data, tmp_path, teachers=teachers, output_dir=str(tmp_path / "maps"), mode="same",
                                   data__train={"path": str(data["parallel"]), "columns": {"text": "en", "lang": "lang"}},
                                   plugins={"kd": {"attention": 1.0}}))
    assert {m.config._attn_implementation for m in [maps.state.unwrapped_student(), *maps.state.teachers]} == {"eager"}
    logs = maps.step(next(iter(maps.loader.iterate(0))))
    assert logs["loss/attention"] > 0
