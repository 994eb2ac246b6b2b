"""Config validation and the documented error messages."""

from __future__ import annotations

import pytest

import polydistill
from polydistill import ConfigError, PluginError
from polydistill.cli import main
from polydistill.config import load_config

MINIMAL = {"task": "embedding", "student": {"model": "some/model"}, "data": {"train": {"path": "train.jsonl"}}}


def _error(data: dict, overrides: list[str] | None = None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(data, overrides)
    return str(info.value)


def test_minimal_config_gets_defaults():
    cfg = load_config(MINIMAL)
    assert cfg.mode == "same" and cfg.training.epochs == 1 and cfg.data.length_grouping
    assert len(cfg.data.train) == 1  # a single source is accepted for the list


def test_misspelled_option_names_the_field_and_suggests():
    msg = _error({**MINIMAL, "training": {"learning_rat": 1e-4}})
    assert "training.learning_rat: unknown option; did you mean 'learning_rate'?" in msg


def test_misspelled_nested_option_in_a_list():
    msg = _error({**MINIMAL, "data": {"train": [{"path": "a", "colums": {}}]}})
    assert "data.train[0].colums: unknown option; did you mean 'columns'?" in msg


def test_misspelled_top_level_section():
    assert "traning: unknown option; did you mean 'training'?" in _error({**MINIMAL, "traning": {}})


def test_all_errors_are_reported_at_once():
    msg = _error({**MINIMAL, "training": {"epochs": 0, "optimizer": "adamx"}})
    assert "2 invalid options" in msg and "training.epochs" in msg and "training.optimizer" in msg


def test_missing_required_field():
    assert "task: required option is missing" in _error({k: v for k, v in MINIMAL.items() if k != "task"})


def test_student_needs_exactly_one_source():
    msg = _error({**MINIMAL, "student": {"model": "a", "from_teacher": {"layers": [0]}}})
    assert "student" in msg and "exactly one of model, from_teacher, config" in msg


def test_parallel_mode_needs_a_source_column():
    msg = _error({**MINIMAL, "mode": "parallel"})
    assert "columns.source" in msg


def test_from_teacher_must_name_a_teacher():
    msg = _error({**MINIMAL, "teachers": [{"model": "t", "name": "big"}], "student": {"from_teacher": {"teacher": "bigg", "layers": [0]}}})
    assert "'bigg' is not one of the teachers" in msg


def test_overrides_set_nested_fields_and_list_items():
    cfg = load_config(MINIMAL, ["training.learning_rate=3e-5", "data.train.0.lang=de", "plugins.kd.temperature=4"])
    assert cfg.training.learning_rate == 3e-5
    assert cfg.data.train[0].lang == "de"
    assert cfg.plugins == {"kd": {"temperature": 4}}


def test_bad_override_syntax():
    assert "expected KEY=VALUE" in _error(MINIMAL, ["training.learning_rate"])


def test_yaml_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    (tmp_path / "train.jsonl").write_text("{}\n")
    path = tmp_path / "run.yaml"
    path.write_text("task: embedding\nstudent: {model: some/hub-id}\ndata: {train: {path: train.jsonl}}\n")
    cfg = load_config(path)
    assert cfg.resolve_path("train.jsonl") == str(tmp_path / "train.jsonl")
    assert cfg.resolve_path("some/hub-id") == "some/hub-id"  # not a local path: left for the hub


def test_misspelled_plugin_option_names_plugin_and_option(models, data, tmp_path):
    from conftest import parallel_config

    cfg = parallel_config(models, data, tmp_path, plugins={"kd": {"temprature": 2.0}})
    with pytest.raises(ConfigError) as info:
        polydistill.train(cfg)
    assert "plugins.kd.temprature: unknown option; did you mean 'temperature'?" in str(info.value)


def test_misspelled_plugin_name_lists_installed_and_suggests(models, data, tmp_path):
    from conftest import parallel_config

    cfg = parallel_config(models, data, tmp_path, plugins={"kdd": {}})
    with pytest.raises(PluginError) as info:
        polydistill.train(cfg)
    msg = str(info.value)
    assert "unknown plugin 'kdd'" in msg and "Did you mean 'kd'?" in msg
    assert "Installed plugins: " in msg and "kd" in msg.split("Installed plugins: ")[1].rstrip(".").split(", ")


def test_cli_validate_prints_errors_without_traceback(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("task: embedding\nstudent: {model: m}\ndata: {train: {path: x.jsonl}}\nplugins: {kd: {temprature: 3}}\n")
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "plugins.kd.temprature: unknown option; did you mean 'temperature'?" in err
    assert "Traceback" not in err
    path.write_text("task: embedding\nstudent: {model: m}\ndata: {train: {path: x.jsonl}}\n")
    assert main(["config", "validate", str(path)]) == 2
    assert f"data.train[0].path: file not found: x.jsonl (looked in {tmp_path}" in capsys.readouterr().err
    (tmp_path / "x.jsonl").write_text('{"text": "hello"}\n')
    assert main(["config", "validate", str(path)]) == 0
    assert "valid" in capsys.readouterr().out


def test_schema_lists_every_section(capsys):
    import json

    assert main(["config", "schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"task", "mode", "teachers", "student", "data", "training", "plugins", "cache"} <= set(schema["properties"])


def test_token_classification_refuses_parallel_mode():
    msg = _error({**MINIMAL, "task": "token_classification", "mode": "parallel"})
    assert "word i of a sentence is not word i of its translation" in msg


def test_labels_in_another_order_than_the_teachers_are_refused(models, data, tmp_path):
    from conftest import LABELS, parallel_config

    cfg = parallel_config(models, data, tmp_path, labels=list(reversed(LABELS)))
    with pytest.raises(ConfigError, match="labels are matched by position"):
        polydistill.train(cfg)


def test_run_config_has_absolute_paths_and_evaluates_from_anywhere(models, data, tmp_path, monkeypatch):
    import json
    import shutil

    from conftest import parallel_config

    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(data["parallel"], work / "p.jsonl")
    shutil.copy(data["eval"], work / "e.jsonl")
    cfg = parallel_config(models, data, tmp_path, training__max_steps=1)
    cfg["data"]["train"]["path"] = "p.jsonl"
    cfg["data"]["eval"]["path"] = "e.jsonl"
    cfg["output_dir"] = str(tmp_path / "run")
    monkeypatch.chdir(work)
    polydistill.train(cfg)
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["data"]["train"][0]["path"] == str(work / "p.jsonl")
    monkeypatch.chdir(tmp_path)
    assert "student" in polydistill.evaluate(tmp_path / "run")
