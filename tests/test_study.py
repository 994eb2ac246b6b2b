"""Ablation studies: plans, resumable execution, failures, executors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from polydistill.errors import ConfigError
from polydistill.study import RESULT_FILE, _lock, ablate, plan_study, read_result

from conftest import parallel_config

AXES = {
    "temperature": {"field": "plugins.kd.temperature", "values": [1.0, 4.0]},
    "reg": {"add_one_in": {"dropout": {"hidden": 0.3}}},
}


def write_study(root: Path, models, data, trained_teacher, **study) -> Path:
    """A base config file and a 2x2, 2-seed study file next to it."""
    cfg = parallel_config(models, data, root)
    cfg["teachers"] = [{"model": str(trained_teacher), "name": "teacher"}]
    cfg["plugins"] = {"kd": {"temperature": 2.0}}
    cfg["training"].update(epochs=2, checkpoint_every=1, log_every=1)
    (root / "base.yaml").write_text(yaml.safe_dump(cfg))
    spec = {"name": "tiny", "base": "base.yaml", "seeds": [0, 1], "axes": AXES, **study}
    path = root / "study.yaml"
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def quiet(_: str) -> None:
    pass


@pytest.fixture(scope="module")
def finished(models, data, trained_teacher, tmp_path_factory):
    """The 2x2x2 study run start to end without interruption."""
    root = tmp_path_factory.mktemp("study")
    path = write_study(root, models, data, trained_teacher)
    return ablate(path, root / "out", log=quiet)


# --------------------------------------------------------------------------- plans


def test_axes_expand_into_named_cells_seed_major(tmp_path, models, data, trained_teacher):
    plan = plan_study(write_study(tmp_path, models, data, trained_teacher))
    assert [c.name for c in plan.cells] == [
        "temperature=1.0, reg=base", "temperature=1.0, reg=+dropout",
        "temperature=4.0, reg=base", "temperature=4.0, reg=+dropout",
    ]
    assert [c.slug for c in plan.cells][1] == "temperature-1.0_reg-with-dropout"
    assert plan.baseline == "temperature=1.0, reg=base" and plan.metric == "accuracy"
    assert [(r.cell.name, r.seed) for r in plan.runs][:5:4] == [(plan.cells[0].name, 0), (plan.cells[0].name, 1)]
    run = plan.runs[1]
    assert run.config["plugins"] == {"kd": {"temperature": 1.0}, "dropout": {"hidden": 0.3}}
    assert run.config["training"]["seed"] == 0 and run.config["output_dir"] == str(run.dir)
    assert plan.dir == (Path.cwd() / "runs" / "tiny").resolve()
    # The base's relative data paths were made absolute: a run works from any folder.
    assert Path(run.config["data"]["train"][0]["path"]).is_absolute()


def test_leave_one_out_levels_switch_plugins_off_and_baseline_by_levels(tmp_path, models, data, trained_teacher):
    axes = {"plugins": {"leave_one_out": {"dropout": {"hidden": 0.3}, "l2": {"weight": 0.01}}}}
    plan = plan_study(write_study(tmp_path, models, data, trained_teacher, axes=axes, seeds=3, baseline={"plugins": "-l2"}))
    assert [c.name for c in plan.cells] == ["all", "-dropout", "-l2"]
    assert [c.slug for c in plan.cells] == ["all", "without-dropout", "without-l2"]
    assert plan.cells[1].overrides == {"plugins.dropout": False, "plugins.l2": {"weight": 0.01}}
    assert plan.baseline == "-l2" and plan.study.seeds == [0, 1, 2] and len(plan.runs) == 9


def test_named_levels_and_a_study_without_axes(tmp_path, models, data, trained_teacher):
    axes = {"lr": {"levels": {"slow": {"training.learning_rate": 1e-4}, "fast": {"training.learning_rate": 1e-2, "training.warmup_steps": 1}}}}
    plan = plan_study(write_study(tmp_path, models, data, trained_teacher, axes=axes))
    assert [c.name for c in plan.cells] == ["slow", "fast"]
    assert plan.runs[1].config["training"]["warmup_steps"] == 1
    plan = plan_study(write_study(tmp_path, models, data, trained_teacher, axes={}))
    assert [c.name for c in plan.cells] == ["base"] and len(plan.runs) == 2


@pytest.mark.parametrize(
    ("study", "message"),
    [
        ({"axes": {"t": {"field": "plugins.kd.temperature"}}}, "axes.t: field and values go together"),
        ({"axes": {"t": {"values": [1]}}}, "give exactly one of field (with values), levels"),
        ({"axes": {"t": {"add_one_in": {}}}}, "add_one_in: give at least one entry"),
        ({"seeds": [1, 1]}, "seeds: seeds repeat"),
        ({"jobz": 2}, "jobz: unknown option; did you mean 'jobs'?"),
        ({"baseline": "nope"}, "baseline: 'nope' is not a cell"),
        ({"baseline": {"temp": "1.0"}}, "baseline: 'temp' is not an axis"),
        ({"axes": {"t": {"field": "training.learnig_rate", "values": [0.1]}}},
         "(cell '0.1'): 1 invalid option:\n  training.learnig_rate: unknown option; did you mean 'learning_rate'?"),
        ({"axes": {"p": {"add_one_in": {"dropout": {"hiden": 0.1}}}}}, "cell '+dropout': plugin 'dropout'"),
        ({"axes": {"p": {"add_one_in": {"dropuot": {}}}}}, "Did you mean 'dropout'?"),
        ({"set": ["training.epochs"]}, "set: 'training.epochs': expected KEY=VALUE"),
    ],
)
def test_bad_study_files_name_the_field(tmp_path, models, data, trained_teacher, study, message):
    with pytest.raises(ConfigError) as err:
        plan_study(write_study(tmp_path, models, data, trained_teacher, **study))
    assert message in str(err.value)


def test_missing_base_config_names_the_file(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump({"base": "nope.yaml"}))
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        plan_study(path)


# --------------------------------------------------------------------------- running


def test_a_study_runs_every_cell_and_seed_and_a_rerun_skips_them(finished):
    assert finished.ran == 8 and finished.skipped == 0 and not finished.failed
    study = json.loads((finished.dir / "study.json").read_text())
    assert study["baseline"] == "temperature=1.0, reg=base" and len(study["cells"]) == 4
    record = read_result(finished.dir / "runs" / "temperature-4.0_reg-with-dropout" / "seed-1")
    assert record["status"] == "ok" and record["seed"] == 1 and record["levels"] == {"temperature": "4.0", "reg": "+dropout"}
    assert set(record["metrics"]["per_language"]) == {"de", "en"}
    assert record["plugins"].keys() == {"kd", "dropout"} and record["config"]["plugins"]["kd"]["temperature"] == 4.0
    assert [row["step"] for row in record["history"] if "loss" in row] == [1, 2, 3, 4, 5, 6]
    assert record["wall_time_s"] > 0 and record["resumed"] is False
    # keep: student (the default) leaves the model, not the checkpoints.
    run_dir = finished.dir / "runs" / "temperature-4.0_reg-with-dropout" / "seed-1"
    assert (run_dir / "student" / "config.json").is_file() and not (run_dir / "checkpoints").exists()
    # Seeds differ, so results do.
    metrics = {(r["cell"], r["seed"]): r["metrics"]["average"]["accuracy"] for r in finished.records.values()}
    assert len(set(metrics.values())) > 1

    again = ablate(finished.dir.parent / "study.yaml", finished.dir, log=quiet)
    assert again.ran == 0 and again.skipped == 8


def test_a_killed_study_resumes_without_rerunning_finished_runs(models, data, trained_teacher, tmp_path, finished):
    path = write_study(tmp_path, models, data, trained_teacher)
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "polydistill", "ablate", str(path), "--output-dir", str(out), "--no-report"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # Kill it (SIGKILL: no chance to clean up) in the middle of the fourth run, after one of its checkpoints.
    deadline = time.time() + 120
    victim = None
    while time.time() < deadline and victim is None:
        done = list(out.glob(f"runs/*/seed-*/{RESULT_FILE}"))
        if len(done) >= 3:
            for d in out.glob("runs/*/seed-*"):
                if (d / "checkpoints" / "latest").is_file() and not (d / RESULT_FILE).exists():
                    victim = d
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    assert victim is not None, proc.stderr.read().decode()
    before = {p.parent: p.read_text() for p in out.glob(f"runs/*/seed-*/{RESULT_FILE}")}
    assert 3 <= len(before) < 8

    resumed = ablate(path, out, log=quiet)
    assert resumed.skipped == len(before) and resumed.ran == 8 - len(before) and not resumed.failed
    for run_dir, text in before.items():
        assert (run_dir / RESULT_FILE).read_text() == text  # not rerun
    assert read_result(victim)["resumed"] is True
    # Exactly the numbers of the uninterrupted study, including the run that was resumed mid-way.
    for key, record in finished.records.items():
        assert resumed.records[key]["metrics"] == record["metrics"], key


def test_a_crashing_cell_is_recorded_and_the_rest_go_on(models, data, trained_teacher, tmp_path):
    axes = {"data": {"levels": {"ok": {}, "broken": {"data.train.0.path": str(tmp_path / "missing.jsonl")}}}}
    path = write_study(tmp_path, models, data, trained_teacher, axes=axes, seeds=[0])
    result = ablate(path, tmp_path / "out", log=quiet)
    assert result.ran == 2 and len(result.failed) == 1
    failure = result.failed[0]
    assert failure["cell"] == "broken" and failure["status"] == "failed"
    assert failure["error"]["type"] == "ConfigError" and "data.train[0].path: file not found" in failure["error"]["message"]
    assert "missing.jsonl" in failure["error"]["message"]
    assert "Traceback" in failure["error"]["traceback"]
    assert result.records[("ok", 0)]["status"] == "ok"

    assert ablate(path, tmp_path / "out", log=quiet).ran == 0  # failures are results too...
    again = ablate(path, tmp_path / "out", retry_failed=True, log=quiet)  # ...until asked to retry
    assert again.ran == 1 and len(again.failed) == 1


def test_a_finished_run_whose_config_changed_is_an_error(models, data, trained_teacher, tmp_path):
    path = write_study(tmp_path, models, data, trained_teacher, axes={}, seeds=[0])
    ablate(path, tmp_path / "out", log=quiet)
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["training"]["learning_rate"] = 0.5
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match=r"training.learning_rate: 0.001 -> 0.5.*new --output-dir"):
        ablate(path, tmp_path / "out", log=quiet)


def test_one_process_per_study_directory(models, data, trained_teacher, tmp_path):
    path = write_study(tmp_path, models, data, trained_teacher, axes={}, seeds=[0])
    (tmp_path / "out").mkdir()
    with _lock(tmp_path / "out"):
        with pytest.raises(ConfigError, match=f"another polydistill process \\(pid {os.getpid()}\\)"):
            ablate(path, tmp_path / "out", log=quiet)


def test_parallel_processes_give_the_sequential_results(models, data, trained_teacher, tmp_path, finished):
    path = write_study(tmp_path, models, data, trained_teacher, seeds=[0], threads_per_run=1)
    result = ablate(path, tmp_path / "out", jobs=2, log=quiet)
    assert result.ran == 4 and not result.failed
    for (cell, seed), record in result.records.items():
        assert record["metrics"] == finished.records[(cell, seed)]["metrics"], cell
        assert (result.dir / "runs" / record["slug"] / "seed-0" / "log.txt").is_file()
        assert record["config"]["training"]["num_threads"] == 1  # threads_per_run, not the config's own


def test_a_run_process_that_dies_is_a_failed_run(models, data, trained_teacher, tmp_path, monkeypatch):
    from polydistill.study import executors as S  # the module whose _run_processes looks _spec up

    def torn_spec(plan, run, threads):  # the worker crashes before it can write a result
        spec = original(plan, run, threads)
        (run.dir / S.SPEC_FILE).write_text("{not json")
        return spec

    original = S._spec
    monkeypatch.setattr(S, "_spec", torn_spec)
    path = write_study(tmp_path, models, data, trained_teacher, axes={}, seeds=[0], jobs=2)
    result = ablate(path, tmp_path / "out", log=quiet)
    failure = result.failed[0]
    assert failure["error"]["type"] == "ProcessDied" and "exited with code 1" in failure["error"]["message"]
    assert "JSONDecodeError" in failure["error"]["traceback"]


def test_ray_executor_on_a_local_cluster(models, data, trained_teacher, tmp_path, finished):
    ray = pytest.importorskip("ray")
    path = write_study(tmp_path, models, data, trained_teacher, seeds=[1], axes={"temperature": AXES["temperature"]})
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        result = ablate(path, tmp_path / "out", executor="ray", log=quiet)
    finally:
        ray.shutdown()
    assert result.ran == 2 and not result.failed
    for (cell, seed), record in result.records.items():
        assert record["metrics"] == finished.records[(f"temperature={cell}, reg=base", seed)]["metrics"]


def test_cli_dry_run_lists_cells(models, data, trained_teacher, tmp_path, capsys):
    from polydistill.cli import main

    path = write_study(tmp_path, models, data, trained_teacher)
    assert main(["ablate", str(path), "--dry-run", "--output-dir", str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "tiny: 4 cells x 2 seeds = 8 runs" in out
    assert '  temperature=4.0, reg=+dropout: plugins.kd.temperature=4.0, plugins.dropout={"hidden": 0.3}' in out
    assert not (tmp_path / "out").exists()


def test_report_of_a_study_matches_its_runs(finished, tmp_path):
    import csv
    import statistics

    from polydistill.cli import main

    assert main(["report", str(finished.dir), "--output-dir", str(tmp_path / "report")]) == 0
    rows = {r["cell"]: r for r in csv.DictReader(open(tmp_path / "report" / "cells.csv", encoding="utf-8"))}
    assert list(rows) == [c.name for c in finished.plan.cells]
    base = [finished.records[(finished.plan.baseline, s)]["metrics"]["average"]["accuracy"] for s in (0, 1)]
    for cell in finished.plan.cells:
        runs = [finished.records[(cell.name, s)]["metrics"] for s in (0, 1)]
        for lang in ("average", "de", "en"):
            values = [m["average"]["accuracy"] if lang == "average" else m["per_language"][lang]["accuracy"] for m in runs]
            assert float(rows[cell.name][f"{lang}_mean"]) == pytest.approx(statistics.mean(values))
            assert float(rows[cell.name][f"{lang}_std"]) == pytest.approx(statistics.stdev(values))
        if cell.name != finished.plan.baseline:
            mine = [m["average"]["accuracy"] for m in runs]
            assert float(rows[cell.name]["delta_mean"]) == pytest.approx(statistics.mean(a - b for a, b in zip(mine, base)))
    for name in ("report.md", "report.html", "runs.csv", "per_language.png", "curves.png", "deltas.png"):
        assert (tmp_path / "report" / name).stat().st_size > 0


def test_a_refused_study_leaves_its_directory_as_it_was(models, data, trained_teacher, tmp_path):
    path = write_study(tmp_path, models, data, trained_teacher, axes={}, seeds=[0, 1])
    out = tmp_path / "out"
    ablate(path, out, log=quiet)
    # Seed 0 (checked first) as if killed after a checkpoint; the refusal comes from seed 1, checked later.
    interrupted = out / "runs" / "base" / "seed-0"
    (interrupted / RESULT_FILE).unlink()
    (interrupted / "checkpoints").mkdir(exist_ok=True)
    before = (out / "study.json").read_text()
    base = yaml.safe_load((tmp_path / "base.yaml").read_text())
    base["training"]["learning_rate"] = 0.5
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    with pytest.raises(ConfigError, match="learning_rate"):
        ablate(path, out, log=quiet)
    assert (out / "study.json").read_text() == before and (interrupted / "checkpoints").is_dir()


def test_runtime_fields_do_not_invalidate_finished_runs(models, data, trained_teacher, tmp_path):
    path = write_study(tmp_path, models, data, trained_teacher, axes={}, seeds=[0])
    ablate(path, tmp_path / "out", log=quiet)
    study = yaml.safe_load(path.read_text())
    study["set"] = ["training.checkpoint_every=100", "training.log_every=5", "training.keep_checkpoints=1"]
    path.write_text(yaml.safe_dump(study))
    assert ablate(path, tmp_path / "out", log=quiet).skipped == 1


def test_retrying_a_failed_run_starts_it_from_scratch(models, data, trained_teacher, tmp_path):
    axes = {"data": {"levels": {"broken": {"data.train.0.path": str(tmp_path / "later.jsonl")}}}}
    path = write_study(tmp_path, models, data, trained_teacher, axes=axes, seeds=[0])
    run_dir = tmp_path / "out" / "runs" / "broken" / "seed-0"
    assert ablate(path, tmp_path / "out", log=quiet).failed
    # A checkpoint left by the failed attempt, unloadable: resuming from it instead of starting afresh fails the run.
    (run_dir / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run_dir / "checkpoints" / "checkpoint-1" / "polydistill_state.pt").write_text("not a checkpoint")
    (run_dir / "checkpoints" / "latest").write_text("checkpoint-1")
    (tmp_path / "later.jsonl").write_text((data["parallel"]).read_text())  # the user fixes the data
    again = ablate(path, tmp_path / "out", retry_failed=True, log=quiet)
    assert again.ran == 1 and not again.failed and read_result(run_dir)["resumed"] is False


def test_cells_that_come_out_identical_are_refused(tmp_path, models, data, trained_teacher):
    axes = {"p": {"leave_one_out": {"dropout": {"hidden": 0.3}}}, "h": {"field": "plugins.dropout.hidden", "values": [0.3]}}
    with pytest.raises(ConfigError, match="cells 'p=all, h=0.3' and 'p=-dropout, h=0.3' have the same config"):
        plan_study(write_study(tmp_path, models, data, trained_teacher, axes=axes))


def test_a_study_needs_evaluation_data_and_a_valid_set(tmp_path, models, data, trained_teacher):
    with pytest.raises(ConfigError, match="data.eval is empty"):
        plan_study(write_study(tmp_path, models, data, trained_teacher, set=["data.eval=[]"]))
    with pytest.raises(ConfigError, match=r"set: 'data.batch_size=\[16': value is not valid YAML"):
        plan_study(write_study(tmp_path, models, data, trained_teacher, set=["data.batch_size=[16"]))


def test_baseline_by_numeric_level(tmp_path, models, data, trained_teacher):
    plan = plan_study(write_study(tmp_path, models, data, trained_teacher, baseline={"temperature": 4.0, "reg": "+dropout"}))
    assert plan.baseline == "temperature=4.0, reg=+dropout"


def test_gpu_slots_give_each_process_its_own_devices(monkeypatch):
    from polydistill.study import StudyConfig, _gpu_slots

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert _gpu_slots(StudyConfig(base={}, jobs=3, gpus_per_run=1)) == ["0", "1", "2"]
    assert _gpu_slots(StudyConfig(base={}, jobs=3, gpus_per_run=2)) == ["0,1", "2,3"]
    assert _gpu_slots(StudyConfig(base={}, jobs=2)) == [None, None]
    with pytest.raises(ConfigError, match="gpus_per_run: 8 GPUs per run, but this machine shows 4"):
        _gpu_slots(StudyConfig(base={}, jobs=1, gpus_per_run=8))
