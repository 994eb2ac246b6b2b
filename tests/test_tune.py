"""Searches: Optuna trials over config fields and plugin sets, pruning at evaluations, resume after a kill, best config."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

import polydistill
from polydistill.errors import ConfigError
from polydistill.study import tune as T
from polydistill.testing import tiny_config

optuna = pytest.importorskip("optuna")


def _search(models, data, tmp_path, **extra):
    base = tiny_config(models, data, tmp_path, training__epochs=3, training__eval_every=1)
    search = {
        "name": "tiny",
        "base": base,
        "space": {
            "training.learning_rate": {"low": 1e-4, "high": 1e-2, "log": True},
            "temperature": {"levels": {"t2": {}, "t4": {"plugins.kd.temperature": 4.0}}},
        },
        "trials": 4,
        "startup_trials": 1,
        "output_dir": str(tmp_path / "search"),
        **extra,
    }
    return search


def test_a_search_runs_its_trials_and_writes_a_runnable_best_config(models, data, tmp_path):
    result = T.tune(_search(models, data, tmp_path, pruner="none"), log=lambda s: None)
    assert len(result.trials) == 4 and all(r["status"] == "ok" for r in result.trials)
    best = result.best[0]
    assert best["values"][0] == max(r["values"][0] for r in result.trials)
    for r in result.trials:  # each trial trained with its own sampled settings
        assert r["config"]["training"]["learning_rate"] == pytest.approx(r["params"]["training.learning_rate"])
        assert r["config"]["plugins"].get("kd", {}).get("temperature", 2.0) == (4.0 if r["params"]["temperature"] == "t4" else 2.0)
    assert len({r["params"]["training.learning_rate"] for r in result.trials}) == 4

    config = yaml.safe_load(result.best_config.read_text())
    assert config["training"]["learning_rate"] == pytest.approx(best["params"]["training.learning_rate"])
    rerun = polydistill.train(config, output_dir=tmp_path / "best")
    assert rerun.metrics["average"]["accuracy"] == pytest.approx(best["metrics"]["average"]["accuracy"])

    search = tmp_path / "search"
    assert (search / "search.md").is_file() and (search / "search.png").is_file()
    assert "trial" in (search / "search.md").read_text()
    report = (search / "report" / "report.md").read_text()  # the ablation report format, one cell per trial
    assert all(f"trial {i}" in report for i in range(4))
    assert (search / "report" / "per_language.png").is_file()


def test_pruning_stops_trials_that_fall_behind_at_an_evaluation(models, data, tmp_path):
    # a learning rate that learns (the first trial), then ones that cannot, so they fall behind the median
    search = _search(models, data, tmp_path, trials=4, startup_trials=1, warmup_evaluations=0,
                     space={"training.learning_rate": {"choices": [3e-3, 1e-9]}},
                     enqueue=[{"training.learning_rate": lr} for lr in (3e-3, 1e-9, 1e-9, 1e-9)],
                     objectives=[{"metric": "perplexity"}])
    search["base"] = tiny_config(models, data, tmp_path, "causal_lm", training__epochs=3, training__eval_every=1)
    result = T.tune(search, log=lambda s: None)
    statuses = [r["status"] for r in result.trials]
    assert "pruned" in statuses, statuses
    pruned = [r for r in result.trials if r["status"] == "pruned"]
    for r in pruned:  # stopped before its last step, and its record says where
        assert r["pruned_at"] < 9 and "pruned at step" in r["error"]["message"]
        assert max(h["step"] for h in r["history"]) < 9
    md = (tmp_path / "search" / "search.md").read_text()
    assert f"{len(pruned)} pruned" in md
    report = (tmp_path / "search" / "report" / "report.md").read_text()
    assert f"{len(pruned)} pruned, 0 failed" in report  # pruned trials are not failures


def test_a_killed_search_resumes_and_reruns_the_interrupted_trial(models, data, tmp_path):
    search = _search(models, data, tmp_path, pruner="none", trials=3)
    search["base"] = tiny_config(models, data, tmp_path, training__epochs=12, training__checkpoint_every=2)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search))
    proc = subprocess.Popen([sys.executable, "-m", "polydistill", "tune", str(path)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    trial_dir = tmp_path / "search" / "runs" / "trial-0001" / "seed-3"
    # kill it once the second trial has written a checkpoint (mid-trial)
    import time

    deadline = time.time() + 240
    while time.time() < deadline and not list(trial_dir.glob("checkpoints/checkpoint-*")) and proc.poll() is None:
        time.sleep(0.05)
    assert proc.poll() is None, proc.stdout.read()[-3000:]
    proc.kill()
    proc.wait()
    assert list(trial_dir.glob("checkpoints/checkpoint-*")), "the search never reached trial 1's first checkpoint"
    assert not (trial_dir / "result.json").exists()

    out = subprocess.run([sys.executable, "-m", "polydistill", "tune", str(path)], capture_output=True, text=True,
                         env={**__import__("os").environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "trial 1 was interrupted: it runs again with the same settings" in out.stdout
    record = json.loads((trial_dir / "result.json").read_text())
    assert record["status"] == "ok" and record["resumed"] is True
    study = optuna.load_study(study_name="tiny", storage=f"sqlite:///{tmp_path / 'search' / 'optuna.db'}")
    finished = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert sorted(t.user_attrs["number"] for t in finished) == [0, 1, 2]
    again = [t for t in finished if t.user_attrs["number"] == 1][0]
    killed = [t for t in study.trials if t.state == optuna.trial.TrialState.FAIL]
    assert len(killed) == 1 and killed[0].params == again.params


def test_two_objectives_give_a_pareto_front_and_its_configs(models, data, tmp_path):
    search = _search(models, data, tmp_path, trials=3, space={"student.from_teacher.layers": {"choices": [[0], [0, 2], [0, 1, 2]]}},
                     sampler="grid", objectives=[{"metric": "accuracy", "languages": ["de"]}, {"metric": "student_parameters"}])
    result = T.tune(search, log=lambda s: None)
    sizes = sorted(r["student_parameters"] for r in result.trials)
    assert sizes[0] < sizes[1] < sizes[2]  # the layer choice changes the student's size
    assert result.best and all(r in result.trials for r in result.best)
    front = {r["trial"] for r in result.best}
    smallest = min(result.trials, key=lambda r: r["student_parameters"])
    assert smallest["trial"] in front  # nothing is smaller, so nothing dominates it
    assert sorted(p.stem for p in (tmp_path / "search" / "pareto").glob("*.yaml")) == sorted(f"trial-{n:04d}" for n in front)
    for r in result.trials:
        de = r["metrics"]["per_language"]["de"]["accuracy"]
        assert r["values"] == [pytest.approx(de), r["student_parameters"]]


def test_bad_search_files_are_clear_errors(models, data, tmp_path):
    with pytest.raises(ConfigError, match="space.training.learning_rat"):
        T.load_search(_search(models, data, tmp_path, space={"training.learning_rat": {"low": 1e-4, "high": 1e-2}}))
    with pytest.raises(ConfigError, match="pruner: median prunes on one objective"):
        T.load_search(_search(models, data, tmp_path, pruner="median",
                              objectives=[{"metric": "accuracy"}, {"metric": "student_parameters"}]))
    with pytest.raises(ConfigError, match="low and high go together|exactly one of"):
        T.load_search(_search(models, data, tmp_path, space={"training.learning_rate": {"low": 1e-4}}))
    with pytest.raises(ConfigError, match="levels.bad"):
        T.load_search(_search(models, data, tmp_path, space={"x": {"levels": {"ok": {}, "bad": {"plugins.kd.temprature": 2}}}}))
    search = _search(models, data, tmp_path, objectives=[{"metric": "accuracy", "languages": ["xx"]}], trials=1, pruner="none")
    with pytest.raises(ConfigError, match="objectives: the evaluation has no accuracy for xx .*languages de, en"):
        T.tune(search, log=lambda s: None)


def test_a_search_on_ray_tune(models, data, tmp_path):
    pytest.importorskip("ray.tune")
    search = _search(models, data, tmp_path, engine="ray", trials=2, pruner="successive_halving")
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(search))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}
    out = subprocess.run([sys.executable, "-m", "polydistill", "tune", str(path)], capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    records = T.read_trials(tmp_path / "search")
    assert sorted(r["trial"] for r in records) == [0, 1]
    assert {r["status"] for r in records} <= {"ok", "pruned"} and any(r["status"] == "ok" for r in records)
    assert (tmp_path / "search" / "best.yaml").is_file()
    assert "trial 0" in (tmp_path / "search" / "search.md").read_text()
