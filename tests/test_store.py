"""Teacher-output stores built beforehand: keyed like the cache, resumable by shard, the same weights as the in-run cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import datasets
import numpy as np
import pytest
import torch
import yaml
from safetensors.torch import load_file

import polydistill
from polydistill import store
from polydistill.cache import TeacherCache, identity
from polydistill.config import load_config
from polydistill.errors import ConfigError
from polydistill.testing import tiny_config

from conftest import write_jsonl


def _config(models, data, tmp_path, task="sequence_classification", backend="sqlite", cache="cache", name="run", **extra):
    cfg = tiny_config(models, data, tmp_path, task, training__epochs=2, data__eval=[], **extra)
    cfg["cache"] = {**cfg.get("cache", {}), "enabled": True, "backend": backend, "dir": str(tmp_path / cache)}
    cfg["output_dir"] = str(tmp_path / name)
    return cfg


def _weights(result):
    return load_file(str(result.student_dir / "model.safetensors"))


def _parallel_with_repeats(data, tmp_path):
    """The tiny parallel corpus with some English sources repeated (a text first read in one batch, again in later ones)."""
    rows = [json.loads(line) for line in data["parallel"].read_text(encoding="utf-8").splitlines()]
    rows += [{**rows[i], "de": rows[i]["de"] + " nochmal"} for i in (0, 3, 5)]
    return write_jsonl(tmp_path / "repeats.jsonl", rows)


def test_a_run_from_the_store_trains_the_same_weights_as_the_in_run_cache(models, data, tmp_path):
    path = _parallel_with_repeats(data, tmp_path)
    extra = {"data__train__path": str(path), "data__shuffle": True}
    in_run = _weights(polydistill.train(_config(models, data, tmp_path, name="in_run", **extra)))

    cfg = _config(models, data, tmp_path, backend="datasets", cache="store", name="from_store", **extra)
    built = store.build(cfg, batches_per_shard=1, progress=False)
    assert built.shards == 4 and built.built == [0, 1, 2, 3]  # 15 rows, batch 4
    assert built.rows == 12  # the repeated sources are computed once, where the epoch first reads them
    result = polydistill.train(cfg)
    from_store = _weights(result)
    assert in_run.keys() == from_store.keys()
    for key in in_run:  # the same sub-batches are run as in the in-run cache: bit-identical
        assert torch.equal(in_run[key], from_store[key]), key


def test_the_store_is_keyed_like_the_cache_and_readable_with_datasets(models, data, tmp_path):
    cfg = _config(models, data, tmp_path, backend="datasets", cache="store")
    store.build(cfg, batches_per_shard=2, progress=False)
    polydistill.train(_config(models, data, tmp_path, name="cached"))  # fills the SQLite cache of the same teacher

    config = load_config(cfg)
    teacher = polydistill.models.load_model(config.teachers[0].model, "sequence_classification").eval()
    tok = polydistill.models.load_tokenizer(config.teachers[0].model)
    fp, settings, dtype = identity(config, teacher, tok)
    sqlite = TeacherCache(tmp_path / "cache", fp, settings, dtype)
    folder = next((tmp_path / "store").glob("*/store.json")).parent
    assert folder.name == sqlite.prefix
    shards = sorted(folder.glob("shard-*.arrow"))
    table = datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in shards])
    assert set(table.column_names) == {"key", "text", "shape", "values"}
    assert sorted(table["text"]) == sorted(json.loads(line)["en"] for line in data["parallel"].read_text().splitlines())
    for row in table:
        assert row["key"] == sqlite.key(row["text"])
        np.testing.assert_array_equal(np.asarray(row["values"], dtype=np.float32).reshape(row["shape"]),
                                      sqlite.get_many([row["text"]])[0])


def test_a_killed_build_goes_on_with_the_shards_it_lacks(models, data, tmp_path):
    cfg = _config(models, data, tmp_path, backend="datasets", cache="store")
    first = store.build(cfg, batches_per_shard=1, progress=False, stop_after=1)  # as if killed after one shard
    assert first.built == [0]
    folder = next((tmp_path / "store").glob("*/store.json")).parent
    before = (folder / store.shard_name(0, 3)).stat().st_mtime_ns
    (folder / ".shard-00001-of-00003.arrow.123.tmp").write_bytes(b"torn")  # a shard being written when it died
    rows = store.status(tmp_path / "store")
    assert [(r["built"], r["shards"]) for r in rows] == [(1, 3)]
    with pytest.warns(polydistill.PolydistillWarning, match="lacks 2 of its 3 shards"):
        polydistill.train(cfg)  # an incomplete store: the missing outputs are computed

    second = store.build(cfg, batches_per_shard=1, progress=False)
    assert second.skipped == [0] and second.built == [1, 2]
    assert (folder / store.shard_name(0, 3)).stat().st_mtime_ns == before  # a finished shard is not redone
    assert store.status(tmp_path / "store")[0]["built"] == 3


def test_processes_split_the_shards(models, data, tmp_path):
    cfg = _config(models, data, tmp_path, backend="datasets", cache="store")
    a = store.build(cfg, batches_per_shard=1, process_index=0, num_processes=2, progress=False)
    b = store.build(cfg, batches_per_shard=1, process_index=1, num_processes=2, progress=False)
    assert (a.built, b.built) == ([0, 2], [1])
    with pytest.raises(ConfigError, match="another batch plan is there.*batches_per_shard: 1 there, 2 now"):
        store.build(cfg, batches_per_shard=2, progress=False)


@pytest.mark.parametrize("task", ["token_classification", "embedding", "seq2seq", "causal_lm", "question_answering"])
def test_every_task_trains_the_same_from_the_store(models, data, tmp_path, task):
    extra = {"cache__top_k": 5} if task in ("seq2seq", "causal_lm") else {}
    in_run_cfg = _config(models, data, tmp_path, task, name="in_run")
    in_run_cfg["cache"].update({k.split("__")[1]: v for k, v in extra.items()})
    in_run = _weights(polydistill.train(in_run_cfg))
    cfg = _config(models, data, tmp_path, task, backend="datasets", cache="store", name="from_store")
    cfg["cache"].update({k.split("__")[1]: v for k, v in extra.items()})
    store.build(cfg, progress=False)
    from_store = _weights(polydistill.train(cfg))
    for key in in_run:
        assert torch.equal(in_run[key], from_store[key]), key


def test_sampled_top_k_rows_are_stored_as_the_cache_stores_them(models, data, tmp_path):
    cache = {"top_k": 4, "top_k_method": "sample"}
    kd = {"plugins": {"kd": {"temperature": 1.0}}}  # where sampled rows are unbiased
    in_run_cfg = {**_config(models, data, tmp_path, "causal_lm", name="in_run"), **kd}
    in_run_cfg["cache"].update(cache)
    in_run = _weights(polydistill.train(in_run_cfg))
    cfg = {**_config(models, data, tmp_path, "causal_lm", backend="datasets", cache="store", name="from_store"), **kd}
    cfg["cache"].update(cache)
    store.build(cfg, progress=False)
    from_store = _weights(polydistill.train(cfg))
    for key in in_run:
        assert torch.equal(in_run[key], from_store[key]), key


def test_a_store_of_other_settings_or_none_is_a_clear_error(models, data, tmp_path):
    cfg = _config(models, data, tmp_path, backend="datasets", cache="store")
    with pytest.raises(ConfigError, match="holds no teacher-output store.*teacher-outputs build"):
        polydistill.train(cfg)
    store.build(cfg, progress=False)
    other = _config(models, data, tmp_path, backend="datasets", cache="store", data__max_length=16)
    with pytest.raises(ConfigError, match=r"read with other settings \(max_length differ"):
        polydistill.train(other)
    with pytest.raises(ConfigError, match="cache.dir: backend 'datasets'"):
        load_config({**cfg, "cache": {"enabled": True, "backend": "datasets"}})
    streamed = _config(models, data, tmp_path, backend="datasets", cache="store", data__train__streaming=True)
    with pytest.raises(ConfigError, match="streamed source cannot be built"):
        store.build(streamed, progress=False)


def test_a_corrupt_shard_names_itself(models, data, tmp_path):
    cfg = _config(models, data, tmp_path, backend="datasets", cache="store")
    store.build(cfg, batches_per_shard=1, progress=False)
    shard = next((tmp_path / "store").glob("*/shard-00001-*.arrow"))
    shard.write_bytes(b"not arrow")
    with pytest.raises(polydistill.DataError, match=f"shard {shard}.*unreadable"):
        polydistill.train(cfg)


def test_cli_build_with_two_processes_killed_and_rerun(models, data, tmp_path):
    if shutil.which("torchrun") is None:
        pytest.skip("torchrun not on PATH")
    cfg = _config(models, data, tmp_path, backend="datasets", cache="store")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = ["torchrun", "--nproc_per_node", "2", "--master_port", "29541", "-m", "polydistill",
               "teacher-outputs", "build", str(path), "--batches-per-shard", "1", "--no-progress"]
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[process 0 of 2]" in proc.stdout and "[process 1 of 2]" in proc.stdout
    folder = next((tmp_path / "store").glob("*/store.json")).parent
    (folder / store.shard_name(1, 3)).unlink()  # as if killed before that shard was written
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "this process builds 1, 0 already built" in proc.stdout  # process 1: shard 1 again
    assert "this process builds 0, 2 already built" in proc.stdout  # process 0: shards 0 and 2 kept
    status = subprocess.run([sys.executable, "-m", "polydistill", "teacher-outputs", "status", str(tmp_path / "store")],
                            capture_output=True, text=True)
    assert "3 of 3 shards built" in status.stdout



def test_cli_build_on_ray(models, data, tmp_path):
    pytest.importorskip("ray")
    cfg = _config(models, data, tmp_path, backend="datasets", cache="store")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAY_ADDRESS": "local"}
    proc = subprocess.run([sys.executable, "-m", "polydistill", "teacher-outputs", "build", str(path), "--ray", "--workers", "2",
                           "--batches-per-shard", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "ray: 2 workers built 3 shards, 12 outputs per teacher" in proc.stdout
    assert store.status(tmp_path / "store")[0]["built"] == 3


def test_shard_teachers_outside_fsdp_or_deepspeed_warns_and_trains(models, data, tmp_path):
    cfg = tiny_config(models, data, tmp_path, data__eval=[], training__shard_teachers=True)
    with pytest.warns(polydistill.PolydistillWarning, match="shard_teachers: the run is not under FSDP or DeepSpeed"):
        result = polydistill.train(cfg)
    assert (result.student_dir / "model.safetensors").is_file()


def test_a_deepspeed_launch_with_sharded_teachers_needs_their_config(monkeypatch):
    from polydistill.build import engine_plugins
    from polydistill.config import TrainingConfig

    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(ConfigError, match="training.teacher_deepspeed_config"):
        engine_plugins(TrainingConfig(shard_teachers=True))
    assert engine_plugins(TrainingConfig()) == {}  # the student alone: the launch's own plugin
