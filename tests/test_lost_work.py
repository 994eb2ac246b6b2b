"""No lost or mixed work: what a run keeps when the end fails, refused reuse of a run directory,
resumes that must match their checkpoint, and messages that say what is on disk (issue 14)."""

from __future__ import annotations

import json
import re

import pytest
import torch
import yaml

import polydistill
from polydistill import ConfigError, hookimpl
from polydistill import checkpoint as ckpt
from polydistill.cli import main

from conftest import StopAt, parallel_config, write_jsonl


def _yaml(tmp_path, cfg, name="run.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    return str(path)


class FailingEvaluation:
    @hookimpl
    def on_evaluate(self, state, metrics):
        raise RuntimeError("the evaluation broke")


def test_a_failure_after_training_keeps_the_student_and_a_checkpoint(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=2)
    with pytest.raises(polydistill.PluginError, match="the evaluation broke") as info:
        polydistill.train(cfg, plugins=[("failing", FailingEvaluation())])
    out = tmp_path / "run"
    assert (out / "student" / "model.safetensors").is_file() and (out / "student" / "tokenizer_config.json").is_file()
    assert ckpt.latest(out / "checkpoints") == out / "checkpoints" / "checkpoint-2"
    assert any("the student is saved in" in note for note in info.value.__notes__)
    # the saved student is the trained one: a resume finds nothing left to train
    result = polydistill.train(cfg, resume=out)
    assert [r["step"] for r in result.history if "loss" in r] == [1, 2]


def test_the_cli_names_what_was_kept_when_the_end_fails(models, data, tmp_path, capsys, monkeypatch):
    import polydistill.api

    def broken(trainer, metrics):
        raise TypeError("the card broke")

    monkeypatch.setattr(polydistill.api, "save_results", broken)
    assert main(["train", _yaml(tmp_path, parallel_config(models, data, tmp_path, training__max_steps=1))]) == 1
    err = capsys.readouterr().err
    assert "internal error: TypeError: the card broke" in err
    assert f"polydistill: note: training had finished: the student is saved in {tmp_path / 'run' / 'student'}" in err


def test_embedding_eval_without_the_other_side_is_refused_before_training(models, data, tmp_path, capsys):
    cfg = parallel_config(models, data, tmp_path, task="embedding")
    cfg["data"]["eval"] = {"path": str(data["eval"]), "columns": {"text": "text", "lang": "lang"}}
    assert main(["config", "validate", _yaml(tmp_path, cfg)]) == 2
    assert "data.eval[0].columns.source: embedding evaluation retrieves each text's translation" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"data.eval\[0\].columns.source"):
        polydistill.train(cfg)
    assert not (tmp_path / "run").exists()  # nothing trained, nothing written


def test_every_input_problem_is_reported_together_before_any_model_loads(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path)
    cfg["teachers"][0]["model"] = str(tmp_path / "no-teacher")
    cfg["data"]["train"]["path"] = str(tmp_path / "missing.jsonl")
    cfg["data"]["eval"]["columns"] = {"lang": "lang"}  # no label column to score against
    tsv_dir = tmp_path / "folder.tsv"
    tsv_dir.mkdir()
    cfg["data"]["eval"] = [cfg["data"]["eval"], {"path": str(tsv_dir), "format": "tsv", "columns": {"label": "label"}}]
    with pytest.raises(ConfigError) as info:
        polydistill.train(cfg)
    msg = str(info.value)
    assert "4 problems found before loading any model" in msg
    for part in (f"teachers[0].model: no such directory: {tmp_path / 'no-teacher'} (a local path, so it is not looked up on the hub)",
                 f"data.train[0].path: file not found: {tmp_path / 'missing.jsonl'}",
                 "data.eval[0].columns.label: evaluating sequence_classification needs the gold labels' column",
                 f"data.eval[1].path: {tsv_dir} is a directory; format tsv reads one file"):
        assert part in msg, msg


def test_a_local_looking_path_is_never_a_hub_id(tmp_path, monkeypatch):
    from polydistill.preflight import looks_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    assert looks_local("./teacher") and looks_local("/abs/teacher") and looks_local("~/teacher")
    assert looks_local("runs/x/student") and looks_local("models/teacher")  # 2 slashes; a local first part
    assert not looks_local("bert-base-multilingual-cased") and not looks_local("sentence-transformers/LaBSE")


def test_columns_are_checked_from_the_first_row(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"]["columns"]["source"] = "english"
    with pytest.raises(ConfigError, match=r"data.train\[0\].columns.source: column 'english' not found; columns are: en, de, label, lang"):
        polydistill.train(cfg)


def test_training_into_a_run_directory_is_refused_without_resume_or_overwrite(models, data, tmp_path, capsys):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=1)
    path = _yaml(tmp_path, cfg)
    assert main(["train", path]) == 0
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    assert main(["train", path]) == 2
    err = capsys.readouterr().err
    assert "holds a run already" in err and "--resume" in err and "--overwrite" in err
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before  # untouched
    assert main(["train", path, "--overwrite", "--resume"]) == 2
    assert "choose one" in capsys.readouterr().err
    (tmp_path / "run" / "mine.txt").write_text("a user's own file")
    assert main(["train", path, "--overwrite", "--set", "training.max_steps=2"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]  # one run's rows only
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2"]
    assert (tmp_path / "run" / "mine.txt").is_file()  # only what a run writes is deleted


def test_resume_refuses_a_config_that_changes_what_is_computed(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=2)
    polydistill.train(cfg)
    saved = (tmp_path / "run" / "config.json").read_text()
    with pytest.raises(ConfigError) as info:
        polydistill.train(cfg, overrides=["training.learning_rate=0.5", "plugins.kd.temperature=4"], resume=tmp_path / "run")
    msg = str(info.value)
    assert "(plugins.kd.temperature: (not set) -> 4; training.learning_rate: 0.001 -> 0.5)" in msg
    assert (tmp_path / "run" / "config.json").read_text() == saved  # not rewritten
    # where a run writes and what it shows may change, and a run may be trained on past its end
    result = polydistill.train(cfg, overrides=["training.log_every=5", "training.max_steps=3"], resume=tmp_path / "run")
    assert [r["step"] for r in result.history if "loss" in r] == [1, 2, 3]


def test_a_resumed_run_logs_each_step_once(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=3, training__checkpoint_every=2)
    polydistill.train(cfg)
    out = tmp_path / "run"
    # a run killed after step 3 was logged but before its checkpoint: resume from step 2
    ckpt.write_atomic(out / "checkpoints" / "latest", "checkpoint-2")
    import shutil

    shutil.rmtree(out / "checkpoints" / "checkpoint-3")
    polydistill.train(cfg, resume=out)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == [1, 2, 3]


def test_an_interrupted_run_has_its_plugins_json(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=4)
    with pytest.raises(KeyboardInterrupt):
        polydistill.train(cfg, plugins=[("stop", StopAt(2))])
    assert "kd" in json.loads((tmp_path / "run" / "plugins.json").read_text())


@pytest.mark.parametrize("complete_before", [0, 1])
def test_an_aborted_checkpoint_write_is_reported_as_it_is(models, data, tmp_path, capsys, monkeypatch, complete_before):
    """A second Ctrl-C while a checkpoint is written: no half-written folder, and the message names what is there."""
    real_save, calls = torch.save, []

    def interrupted(obj, f, *args, **kwargs):
        if "polydistill_state" in str(f):
            calls.append(f)
            if len(calls) > complete_before:
                raise KeyboardInterrupt
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", interrupted)
    cfg = parallel_config(models, data, tmp_path, training__max_steps=3, training__checkpoint_every=1)
    assert main(["train", _yaml(tmp_path, cfg)]) == 130
    err = capsys.readouterr().err
    checkpoints = tmp_path / "run" / "checkpoints"
    assert not list(checkpoints.glob(".tmp-checkpoint-*"))
    assert "a checkpoint was written" not in err
    if complete_before:
        assert f"no checkpoint was written at this interrupt; the newest complete one is {checkpoints / 'checkpoint-1'}" in err
    else:
        assert "no checkpoint is complete: nothing to resume" in err


def test_a_first_ctrl_c_names_the_checkpoint_it_wrote(models, data, tmp_path, capsys, monkeypatch):
    import polydistill.api

    real = polydistill.api.train
    monkeypatch.setattr(polydistill.api, "train", lambda *a, **k: real(*a, plugins=[("stop", StopAt(1))], **k))
    assert main(["train", _yaml(tmp_path, parallel_config(models, data, tmp_path, training__max_steps=3))]) == 130
    err = capsys.readouterr().err
    assert f"checkpoint {tmp_path / 'run' / 'checkpoints' / 'checkpoint-1'} was written; continue with the same command plus --resume" in err


def test_a_run_directory_given_as_the_config_points_to_its_config(models, data, tmp_path, capsys):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=1)
    polydistill.train(cfg)
    assert main(["train", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'run'} is a directory, not a config file; its config is {tmp_path / 'run' / 'config.json'}" in err
    assert "--resume" in err


def test_yaml_errors_name_the_file_not_a_string(tmp_path, capsys):
    path = tmp_path / "broken.yaml"
    path.write_text("task: embedding\nstudent: {model: m\n")
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "<unicode string>" not in err and f'in "{path}", line' in err


def test_streamed_bad_utf8_names_its_line(models, data, tmp_path):
    rows = tmp_path / "rows.jsonl"
    good = [json.dumps({"de": f"satz {i}", "en": f"sentence {i}", "lang": "de"}).encode() for i in range(6)]
    rows.write_bytes(b"\n".join(good[:4] + [b'{"de": "caf\xe9", "en": "cafe", "lang": "de"}'] + good[4:]) + b"\n")
    cfg = parallel_config(models, data, tmp_path, training__max_steps=3)
    cfg["data"]["train"] = {"path": str(rows), "streaming": True, "columns": {"text": "de", "source": "en", "lang": "lang"}}
    with pytest.raises(polydistill.DataError, match=r"rows.jsonl line 5: not UTF-8"):
        polydistill.train(cfg)


def test_resuming_another_run_s_checkpoint_into_a_folder_holding_a_run_is_refused(models, data, tmp_path):
    a = parallel_config(models, data, tmp_path, training__max_steps=2, output_dir=str(tmp_path / "a"))
    b = parallel_config(models, data, tmp_path, training__max_steps=2, output_dir=str(tmp_path / "b"))
    polydistill.train(a)
    polydistill.train(b)
    before = (tmp_path / "b" / "metrics.jsonl").read_text()
    a_ckpt = tmp_path / "a" / "checkpoints" / "checkpoint-2"
    with pytest.raises(ConfigError, match="holds a run already"):
        polydistill.train(b, overrides=["training.max_steps=3"], resume=a_ckpt)
    assert (tmp_path / "b" / "metrics.jsonl").read_text() == before
    # into an empty folder, a run may start from another run's checkpoint
    c = polydistill.train(b, overrides=["training.max_steps=3", f"output_dir={tmp_path / 'c'}"], resume=a_ckpt)
    assert [r["step"] for r in c.history if "loss" in r] == [1, 2, 3]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("training.max_grad_norm", -1, "training.max_grad_norm: Input should be greater than 0"),
    ("training.max_grad_norm", 0, "training.max_grad_norm: Input should be greater than 0"),
    ("training.seed", -5, "training.seed: Input should be greater than or equal to 0"),
    ("labels", ["food", "food", "weather"], "label names must be unique; ['food'] appear more than once"),
])
def test_values_that_would_train_wrongly_are_refused(models, data, tmp_path, field, value, message):
    cfg = parallel_config(models, data, tmp_path)
    with pytest.raises(ConfigError) as info:
        polydistill.load_config(cfg, [f"{field}={json.dumps(value)}"])
    assert message in str(info.value)


def test_an_output_dir_that_is_a_file_is_named_before_any_model_loads(models, data, tmp_path):
    (tmp_path / "afile").write_text("x")
    cfg = parallel_config(models, data, tmp_path, output_dir=str(tmp_path / "afile" / "sub"))
    with pytest.raises(ConfigError, match=f"output_dir: {tmp_path / 'afile'} is a file"):
        polydistill.train(cfg)


def test_a_streamed_source_that_yields_no_rows_is_an_error_not_an_endless_loop(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=3)
    cfg["data"]["train"].update(streaming=True, filter={"lang": "fr"})
    with pytest.raises(polydistill.DataError, match="an epoch gave no batches"):
        polydistill.train(cfg)


@pytest.mark.parametrize(("value", "shown"), [(None, "null"), (7, "int 7"), (["a", "b"], "list ['a', 'b']")])
def test_a_text_that_is_not_a_string_is_named_with_its_row_when_the_data_loads(models, data, tmp_path, value, shown):
    rows = [{"de": f"satz {i}", "en": f"sentence {i}", "lang": "de"} for i in range(5)]
    rows[3]["de"] = value
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"]["path"] = str(write_jsonl(tmp_path / "rows.jsonl", rows))
    with pytest.raises(polydistill.DataError, match=re.escape(f"rows.jsonl: row 4: column 'de' (columns.text) is {shown}; expected a string")):
        polydistill.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_token_rows_whose_tags_do_not_fit_their_words_are_named_before_training(models, data, tmp_path):
    rows = [{"words": ["ich", "esse", "brot"], "tags": ["O", "O", "B-FOOD"], "lang": "de"} for _ in range(4)]
    rows[2]["tags"] = ["O", "O"]
    cfg = parallel_config(models, data, tmp_path, task="token_classification")
    cfg["data"]["eval"]["path"] = str(write_jsonl(tmp_path / "tok.jsonl", rows))
    with pytest.raises(polydistill.DataError, match=r"tok.jsonl: row 3: 3 words \(columns.text 'words'\) but 2 tags"):
        polydistill.train(cfg)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_a_null_language_tag_is_named(models, data, tmp_path):
    rows = [{"text": "brot", "label": "food", "lang": "de"}, {"text": "bread", "label": "food", "lang": None}]
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["eval"]["path"] = str(write_jsonl(tmp_path / "ev.jsonl", rows))
    with pytest.raises(polydistill.DataError, match=r"ev.jsonl: row 2: column 'lang' \(columns.lang\) is null"):
        polydistill.train(cfg)


def test_labels_given_as_names_and_ids_in_one_column_are_read(models, data, tmp_path):
    rows = [{"text": "brot", "label": "food", "lang": "de"}, {"text": "regen", "label": 2, "lang": "de"}]
    cfg = parallel_config(models, data, tmp_path, training__max_steps=1)
    cfg["data"]["eval"]["path"] = str(write_jsonl(tmp_path / "ev.jsonl", rows))
    assert polydistill.train(cfg).metrics["per_language"]["de"]


def test_a_pretrained_head_for_other_labels_or_another_task_is_refused(models, data, tmp_path):
    from transformers import AutoModelForSequenceClassification

    other = AutoModelForSequenceClassification.from_pretrained(str(models["teacher2"]))
    other.config.id2label = {0: "weather", 1: "sports", 2: "food"}
    other.config.label2id = {v: k for k, v in other.config.id2label.items()}
    other.save_pretrained(tmp_path / "permuted")
    cfg = parallel_config(models, data, tmp_path, student={"model": str(tmp_path / "permuted")})
    with pytest.raises(ConfigError, match=r"student.model: .* has a head for \['weather', 'sports', 'food'\] \(in another order"):
        polydistill.train(cfg)
    cfg = parallel_config(models, data, tmp_path, labels=["O", "B-FOOD", "I-FOOD"])
    cfg["teachers"][0]["model"] = str(models["tagger"])
    with pytest.raises(ConfigError, match=r"teachers\[0\]: .* is a BertForTokenClassification checkpoint, its head is not for sequence_classification"):
        polydistill.train(cfg)


def test_token_evaluation_where_max_length_cuts_every_word_says_so(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, task="token_classification", training__max_steps=1, data__max_length=2)
    with pytest.raises(polydistill.DataError, match=r"every word of language '\w+' .* lies past data.max_length=2"):
        polydistill.train(cfg)
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()  # trained, and kept


def test_a_failure_mid_epoch_checkpoints_the_last_good_step(models, data, tmp_path):
    rows = [{"de": f"satz {i}", "en": f"sentence {i}", "lang": "de"} for i in range(12)]
    rows[9]["de"] = None  # found when its batch is read (streamed data is not read up front)
    cfg = parallel_config(models, data, tmp_path, training__max_steps=6, data__batch_size=2, data__shuffle=False,
                          data__stream_buffer=4)
    cfg["data"]["train"] = {"path": str(write_jsonl(tmp_path / "rows.jsonl", rows)), "streaming": True,
                            "columns": {"text": "de", "source": "en", "lang": "lang"}}
    with pytest.raises(polydistill.DataError, match="a row's text .* is null") as info:
        polydistill.train(cfg)
    latest = ckpt.latest(tmp_path / "run" / "checkpoints")
    assert latest is not None and latest.name == "checkpoint-4"
    assert any(f"checkpoint {latest} holds the last good state (step 4)" in n for n in info.value.__notes__)


def test_resuming_on_changed_training_data_warns(models, data, tmp_path):
    rows = [{"de": f"satz {i}", "en": f"sentence {i}", "lang": "de"} for i in range(8)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = parallel_config(models, data, tmp_path, training__max_steps=2)
    cfg["data"]["train"]["path"] = str(path)
    polydistill.train(cfg)
    write_jsonl(path, rows[:4])
    with pytest.warns(polydistill.PolydistillWarning, match="the training data changed since checkpoint"):
        polydistill.train(cfg, overrides=["training.max_steps=3"], resume=tmp_path / "run")


def test_a_csv_with_a_byte_order_mark_keeps_its_first_column_name(models, data, tmp_path):
    path = tmp_path / "bom.csv"
    path.write_bytes("\ufeffde,en,lang\n".encode("utf-8") + "".join(f"satz {i},sentence {i},de\n" for i in range(6)).encode())
    cfg = parallel_config(models, data, tmp_path, training__max_steps=1)
    cfg["data"]["train"]["path"] = str(path)
    assert [r["step"] for r in polydistill.train(cfg).history if "loss" in r] == [1]


def test_the_logged_learning_rate_is_the_one_the_step_trained_at(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=2, training__learning_rate=0.01)
    rows = [r for r in polydistill.train(cfg).history if "lr" in r]
    assert [r["lr"] for r in rows] == pytest.approx([0.01, 0.005])  # linear decay to 0 after the last step


def test_a_warm_up_as_long_as_the_run_warns(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=2, training__warmup_steps=5)
    with pytest.warns(polydistill.PolydistillWarning, match=r"training.warmup_steps: the warm-up \(5 steps\) is as long as the run \(2 steps\)"):
        polydistill.train(cfg)
