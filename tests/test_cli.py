"""The command line as a user drives it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import yaml

import polydistill
from polydistill.cli import main

from conftest import parallel_config


def test_train_then_eval_a_run_directory(models, data, tmp_path, capsys):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--set", "training.max_steps=3"]) == 0
    out = capsys.readouterr().out
    assert "student saved to" in out
    run_dir = tmp_path / "run"
    # the end of a run: its per-language table, printed and written, with a plot; eval lines name each language
    metrics = json.loads((run_dir / "metrics.json").read_text())
    for lang, m in metrics["per_language"].items():
        assert f"| {lang} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |" in out
        assert f"{lang} {m['accuracy']:.4f}" in out.split("eval step 3:")[1].splitlines()[0]
    assert "| language | accuracy | macro_f1 |" in (run_dir / "results.md").read_text()
    assert (run_dir / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((run_dir / "config.json").read_text())["training"]["max_steps"] == 3

    assert main(["eval", str(run_dir)]) == 0
    out = capsys.readouterr().out
    assert "| model | de | en | average |" in out and "| student |" in out

    assert main(["eval", str(path), "--which", "teachers", "--json"]) == 0
    teachers = json.loads(capsys.readouterr().out)
    assert set(teachers) == {"teacher:teacher"} and set(teachers["teacher:teacher"]["per_language"]) == {"de", "en"}


def test_resume_flag_continues_a_finished_run_to_more_steps(models, data, tmp_path, capsys):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=2)
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    assert main(["train", str(path), "--resume", "--set", "training.max_steps=4"]) == 0
    out = capsys.readouterr().out
    assert "resumed from" in out and "checkpoint-2" in out
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]


def test_errors_exit_2_with_a_message(tmp_path, capsys):
    assert main(["train", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err
    path = tmp_path / "bad.yaml"
    path.write_text("task: embeding\nstudent: {model: m}\ndata: {train: {path: x.jsonl}}\n")
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "task: unknown task (did you mean 'embedding'?); installed tasks: causal_lm, embedding, " in err
    assert "(a package adds one under the entry-point group 'polydistill.tasks') (got 'embeding')" in err


def test_missing_data_file_is_named(models, data, tmp_path, capsys):
    cfg = parallel_config(models, data, tmp_path)
    cfg["data"]["train"]["path"] = str(tmp_path / "missing.jsonl")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 2
    assert f"data.train[0].path: file not found: {tmp_path / 'missing.jsonl'}" in capsys.readouterr().err


def _console_script() -> str:
    """The `polydistill` script that installing this environment's polydistill wrote (its entry point)."""
    schemes = [sysconfig.get_path("scripts"), sysconfig.get_path("scripts", f"{os.name}_user")]
    for folder in [str(Path(sys.executable).parent), *schemes]:
        found = shutil.which("polydistill", path=folder)
        if found:
            return found
    found = shutil.which("polydistill")
    assert found, f"no polydistill console script next to {sys.executable} or on PATH: is polydistill installed?"
    return found


def test_console_script_and_module_entry_point():
    version = f"polydistill {polydistill.__version__}\n"
    script = subprocess.run([_console_script(), "--version"], capture_output=True, text=True)
    assert (script.returncode, script.stdout, script.stderr) == (0, version, "")
    module = subprocess.run([sys.executable, "-m", "polydistill", "--version"], capture_output=True, text=True)
    assert (module.returncode, module.stdout, module.stderr) == (0, version, "")
    # the script is the CLI itself, not only its --version: a usage error exits 2 naming the program
    usage = subprocess.run([_console_script(), "train"], capture_output=True, text=True)
    assert usage.returncode == 2 and usage.stderr.startswith("usage: polydistill train"), usage.stderr


def test_demo_quick_run_shows_transfer(tmp_path):
    from polydistill.demo import run_demo

    results = run_demo(tmp_path / "demo", quick=True)
    assert set(results) == {"teacher", "student before", "student after"}
    after, before = results["student after"], results["teacher"]
    targets = ["de", "es", "fr", "it"]
    gain = [after["per_language"][l]["accuracy"] - before["per_language"][l]["accuracy"] for l in targets]
    assert min(gain) > 0.15  # the student learnt every target language from the English-only teacher
    png = (tmp_path / "demo" / "results.png").read_bytes()
    assert png.startswith(b"\x89PNG")
    assert "| student after |" in (tmp_path / "demo" / "results.md").read_text()


def test_threads_option_sets_the_runs_threads(models, data, tmp_path, monkeypatch):
    import torch

    before = torch.get_num_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", ""))  # restored after the test
    cfg = parallel_config(models, data, tmp_path, training__max_steps=1, data__eval=[])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    try:
        assert main(["train", str(path), "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1 and os.environ["OMP_NUM_THREADS"] == "1"
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "run" / "config.json").read_text())["training"]["num_threads"] == 1
    for verb in (["train"], ["eval"], ["vocab"], ["ablate"], ["tune"], ["demo"], ["teacher-outputs", "build"]):
        shown = subprocess.run([sys.executable, "-m", "polydistill", *verb, "--help"], capture_output=True, text=True).stdout
        assert "--threads" in shown, verb


def test_every_cli_option_has_help_text():
    import argparse

    from polydistill.cli import build_parser

    missing = []

    def walk(parser, name):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub, child in action.choices.items():
                    walk(child, f"{name} {sub}")
            elif action.help is None:
                missing.append(f"{name} {action.option_strings or action.dest}")

    walk(build_parser(), "polydistill")
    assert not missing
