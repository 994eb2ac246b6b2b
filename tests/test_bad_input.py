"""Bad input through the real command line: exit code 2, a message naming what is wrong, no traceback.

Each case writes a broken config or data file, runs ``polydistill`` as a user
would, and checks that stderr names the field, file, column or plugin at
fault. ``--debug`` (or POLYDISTILL_DEBUG=1) adds the traceback.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from polydistill.cli import main
from polydistill.tiny import build_tiny_model

from conftest import TEXTS, parallel_config, write_jsonl


def _yaml(tmp_path: Path, cfg: dict, name: str = "run.yaml") -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, allow_unicode=True), encoding="utf-8")
    return str(path)


def _train(tmp_path, cfg, *extra):
    return ["train", _yaml(tmp_path, cfg), *extra]


# Each case: (models, data, tmp_path, monkeypatch) -> (argv, [substrings stderr must contain]).

def yaml_syntax(models, data, tmp_path, mp):
    path = tmp_path / "broken.yaml"
    path.write_text("task: embedding\nstudent: {model: m\ndata: {}\n")
    return ["train", str(path)], [str(path), "not valid YAML", "line 3, column"]


def json_syntax(models, data, tmp_path, mp):
    path = tmp_path / "broken.json"
    path.write_text('{"task": "embedding",\n "student": }\n')
    return ["config", "validate", str(path)], [str(path), "not valid JSON", "line 2 column 13"]


def top_level_not_a_mapping(models, data, tmp_path, mp):
    path = tmp_path / "list.yaml"
    path.write_text("- task: embedding\n")
    return ["train", str(path)], [str(path), "top level must be a mapping"]


def unknown_key(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path)
    cfg["training"]["lerning_rate"] = 1e-3
    return _train(tmp_path, cfg), ["training.lerning_rate: unknown option; did you mean 'learning_rate'?"]


def wrong_type(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path)
    cfg["training"]["epochs"] = "many"
    return _train(tmp_path, cfg), ["training.epochs", "valid integer", "'many'"]


def missing_required(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path)
    del cfg["student"]
    return _train(tmp_path, cfg), ["student: required option is missing"]


def unknown_plugin(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path, plugins={"multi_teachr": {}})
    return _train(tmp_path, cfg), ["unknown plugin 'multi_teachr'", "Did you mean 'multi_teacher'?", "Installed plugins:"]


def unknown_plugin_option(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path, plugins={"kd": {"temprature": 2.0}})
    return _train(tmp_path, cfg), ["plugins.kd.temprature: unknown option; did you mean 'temperature'?"]


def plugin_optional_dependency_missing(models, data, tmp_path, mp):
    mp.setitem(sys.modules, "nltk", None)  # what `import nltk` does when nltk is not installed
    cfg = parallel_config(models, data, tmp_path, plugins={"synonym": {}})
    return _train(tmp_path, cfg), ["plugin 'synonym'", "ModuleNotFoundError", "pip install 'polydistill[augment]'"]


def missing_data_file(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"]["path"] = str(tmp_path / "missing.jsonl")
    return _train(tmp_path, cfg), [f"data.train[0].path: file not found: {tmp_path / 'missing.jsonl'}"]


def empty_data_file(models, data, tmp_path, mp):
    (tmp_path / "empty.jsonl").write_text("")
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"]["path"] = str(tmp_path / "empty.jsonl")
    return _train(tmp_path, cfg), [f"data.train[0].path: file is empty: {tmp_path / 'empty.jsonl'}"]


def filter_leaves_no_rows(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"]["filter"] = {"lang": "xx"}
    return _train(tmp_path, cfg), [str(data["parallel"]), "no rows left after `filter`"]


def missing_column(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"]["columns"]["text"] = "deutsch"
    return _train(tmp_path, cfg), ["data.train[0].columns.text: column 'deutsch' not found", "columns are: en, de, label, lang"]


def _aligned(tmp_path, en: bytes, de: bytes) -> dict:
    (tmp_path / "train.en").write_bytes(en)
    (tmp_path / "train.de").write_bytes(de)
    return {"aligned": {"en": str(tmp_path / "train.en"), "de": str(tmp_path / "train.de")},
            "columns": {"text": "de", "source": "en"}, "lang": "de"}


def misaligned_parallel_files(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"] = _aligned(tmp_path, b"the soup is hot\nit rains\nthe wind is cold\n", b"die suppe ist hei\xc3\x9f\nes regnet\n")
    return _train(tmp_path, cfg), ["aligned files differ in length", str(tmp_path / "train.de"), "after line 2", str(tmp_path / "train.en")]


def undecodable_bytes_aligned(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"] = _aligned(tmp_path, b"the soup is hot\nit rains\nthe wind\n", b"die suppe\nes regnet\nder wind ist kalt \xff\xfe\n")
    return _train(tmp_path, cfg), [str(tmp_path / "train.de"), "line 3", "not UTF-8", "0xff"]


def undecodable_bytes_jsonl(models, data, tmp_path, mp):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"en": "a", "de": "b", "lang": "de"}\n{"en": "hot", "de": "hei\xdf", "lang": "de"}\n')
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"]["path"] = str(path)
    return _train(tmp_path, cfg), [str(path), "line 2", "not UTF-8", "0xdf"]


def malformed_jsonl_line(models, data, tmp_path, mp):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"en": "a", "de": "b", "lang": "de"}\n{"en": "a", "de": \n', encoding="utf-8")
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"]["path"] = str(path)
    return _train(tmp_path, cfg), [str(path), "line 2", "not valid JSON"]


def label_outside_label_set(models, data, tmp_path, mp):
    path = write_jsonl(tmp_path / "labelled.jsonl", [{"text": "die suppe", "label": "food", "lang": "de"},
                                                     {"text": "es regnet", "label": "cooking", "lang": "de"}])
    cfg = parallel_config(models, data, tmp_path, mode="same")
    cfg["data"]["train"] = {"path": str(path), "columns": {"label": "label", "lang": "lang"}}
    return _train(tmp_path, cfg), [str(path), "row 2", "label 'cooking' (column 'label')", "['food', 'sports', 'weather']"]


def eval_label_outside_label_set(models, data, tmp_path, mp):
    path = write_jsonl(tmp_path / "eval.jsonl", [{"text": "die suppe", "label": 7, "lang": "de"}])
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["eval"] = {"path": str(path), "columns": {"label": "label", "lang": "lang"}}
    return _train(tmp_path, cfg), [str(path), "label 7 (column 'label')", "nor an id 0..2"]


def config_labels_differ_from_teacher(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path, labels=["food", "sports"])
    return _train(tmp_path, cfg), ["labels: ['food', 'sports'] do not match teacher 'teacher'"]


def teacher_and_student_label_counts_differ(models, data, tmp_path, mp):
    two = build_tiny_model(tmp_path / "two_labels", TEXTS, id2label={0: "yes", 1: "no"}, seed=7)
    cfg = parallel_config(models, data, tmp_path)
    cfg["student"] = {"model": str(two)}
    return _train(tmp_path, cfg), ["student.model", str(two), "2 labels", "3"]


def layer_map_out_of_range(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path, mode="same", plugins={"kd": {"hidden": 1.0, "layer_map": {1: 9}}})
    cfg["data"]["train"]["columns"] = {"text": "de", "lang": "lang"}
    return _train(tmp_path, cfg), ["plugins.kd.layer_map", "out of range", "teacher 4"]


def gan_with_different_vocabularies(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path, plugins={"gan_data": {}}, training__max_steps=1)
    cfg["student"] = {"model": str(models["other_tok"])}
    return _train(tmp_path, cfg), ["plugins.gan_data: teacher 'teacher' and the student have different vocabularies"]


def model_path_does_not_exist(models, data, tmp_path, mp):
    cfg = parallel_config(models, data, tmp_path)
    cfg["teachers"][0]["model"] = str(tmp_path / "no-such-model")
    return _train(tmp_path, cfg), [f"teachers[0].model: no such directory: {tmp_path / 'no-such-model'}"]


def model_path_is_not_a_model(models, data, tmp_path, mp):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "README.txt").write_text("not a model")
    cfg = parallel_config(models, data, tmp_path)
    cfg["teachers"][0]["model"] = str(folder)
    return _train(tmp_path, cfg), [f"teachers[0].model: {folder} has no config.json (not a transformers model directory)"]


def override_of_unknown_field(models, data, tmp_path, mp):
    return _train(tmp_path, parallel_config(models, data, tmp_path), "--set", "training.lerning_rate=1e-3"), [
        "training.lerning_rate: unknown option; did you mean 'learning_rate'?"]


def override_without_value(models, data, tmp_path, mp):
    return _train(tmp_path, parallel_config(models, data, tmp_path), "--set", "training.epochs"), [
        "--set 'training.epochs': expected KEY=VALUE"]


def override_into_a_scalar(models, data, tmp_path, mp):
    return _train(tmp_path, parallel_config(models, data, tmp_path), "--set", "task.name=x"), [
        "--set task.name: task is 'sequence_classification', not a mapping"]


def resume_without_checkpoint(models, data, tmp_path, mp):
    return _train(tmp_path, parallel_config(models, data, tmp_path), "--resume"), ["--resume: no checkpoint found"]


def eval_of_a_folder_that_is_no_run(models, data, tmp_path, mp):
    return ["eval", str(tmp_path)], [str(tmp_path), "not a polydistill run directory"]


CASES = [
    yaml_syntax, json_syntax, top_level_not_a_mapping, unknown_key, wrong_type, missing_required, unknown_plugin,
    unknown_plugin_option, plugin_optional_dependency_missing, missing_data_file, empty_data_file,
    filter_leaves_no_rows, missing_column, misaligned_parallel_files, undecodable_bytes_aligned,
    undecodable_bytes_jsonl, malformed_jsonl_line, label_outside_label_set, eval_label_outside_label_set,
    config_labels_differ_from_teacher, teacher_and_student_label_counts_differ, layer_map_out_of_range,
    gan_with_different_vocabularies, model_path_does_not_exist, model_path_is_not_a_model,
    override_of_unknown_field, override_without_value, override_into_a_scalar, resume_without_checkpoint,
    eval_of_a_folder_that_is_no_run,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__ for c in CASES])
def test_bad_input_exits_2_naming_the_fault_without_traceback(case, models, data, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("POLYDISTILL_DEBUG", raising=False)
    argv, expected = case(models, data, tmp_path, monkeypatch)
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("polydistill: error: "), err
    for part in expected:
        assert part in err, f"{part!r} not in:\n{err}"
    assert "Traceback" not in err


def test_debug_flag_and_environment_show_the_traceback(models, data, tmp_path, monkeypatch, capsys):
    argv, _ = missing_column(models, data, tmp_path, monkeypatch)
    assert main(["--debug", *argv]) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "ConfigError" in err
    assert err.rstrip().splitlines()[-1].startswith("polydistill: error: config: data.train[0].columns.text")
    assert main([*argv, "--debug"]) == 2  # after the command too
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.setenv("POLYDISTILL_DEBUG", "1")
    assert main(argv) == 2
    assert "Traceback" in capsys.readouterr().err


def test_an_internal_error_is_one_line_unless_debugging(models, data, tmp_path, monkeypatch, capsys):
    import polydistill.api

    def broken(*args, **kwargs):
        raise RuntimeError("something nobody foresaw\nsecond line")

    monkeypatch.delenv("POLYDISTILL_DEBUG", raising=False)
    monkeypatch.setattr(polydistill.api, "train", broken)
    argv = _train(tmp_path, parallel_config(models, data, tmp_path))
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err == ("polydistill: internal error: RuntimeError: something nobody foresaw "
                   "(run with --debug or POLYDISTILL_DEBUG=1 for the traceback)\n")
    assert main(["--debug", *argv]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "second line" in err


def test_a_subprocess_user_sees_the_same_single_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("task: [embedding\n")
    proc = subprocess.run([sys.executable, "-m", "polydistill", "train", str(path)], capture_output=True, text=True,
                          env={**os.environ, "POLYDISTILL_DEBUG": ""})
    assert proc.returncode == 2
    assert proc.stderr.startswith(f"polydistill: error: {path}: not valid YAML") and "Traceback" not in proc.stderr
    assert proc.stdout == ""
