"""Faults lose nothing: killed runs resume bit-identically, torn checkpoints and cache entries are
skipped with a warning, a full disk keeps the previous checkpoint, non-finite losses name their plugin."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import polydistill
from polydistill import hookimpl
from polydistill.checkpoint import EXTRA, MANIFEST
from polydistill.cli import main

from conftest import StopAt, parallel_config

# 12 rows in batches of 4: 3 steps an epoch, 12 steps in all, a checkpoint every 2.
RUN = dict(training__epochs=4, training__checkpoint_every=2, training__num_threads=1)


def _checkpoint_state(run_dir: Path) -> dict:
    """Everything the final checkpoint holds: weights, optimizer, scheduler, RNG, plugin states, history."""
    root = run_dir / "checkpoints"
    final = root / (root / "latest").read_text()
    extra = torch.load(final / EXTRA, weights_only=False)
    for row in extra["history"]:
        row.pop("elapsed_s", None)  # wall time, the one thing allowed to differ
    return {
        "name": final.name,
        "model": load_file(str(final / "model.safetensors")),
        "optimizer": torch.load(final / "optimizer.bin", weights_only=False),
        "rng": torch.load(final / "random_states_0.pkl", weights_only=False),
        "extra": extra,
    }


def _assert_identical(a, b, path="state"):
    """Bit-for-bit equality of nested dicts/lists of tensors, arrays and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b) or (a.is_floating_point() and torch.equal(a.nan_to_num(), b.nan_to_num())), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{path}: {sorted(map(str, a))} != {sorted(map(str, b))}"
        for k in a:
            _assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    elif hasattr(a, "shape") and hasattr(a, "dtype"):  # numpy arrays in RNG states
        assert (a == b).all(), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# The killed run: a subprocess that dies by SIGKILL (after a step, or half-way through writing a
# checkpoint) or stops on SIGTERM, as a scheduler or the OOM killer would do it.
CHILD = r"""
import json, os, signal, sys
import torch
import polydistill
from polydistill import hookimpl

cfg, mode, step = json.loads(sys.argv[1]), sys.argv[2], int(sys.argv[3])

class Kill:
    @hookimpl
    def on_step_end(self, state, logs):
        if state.step == step and mode != "sigkill-mid-checkpoint":
            os.kill(os.getpid(), signal.SIGKILL if mode == "sigkill" else signal.SIGTERM)

if mode == "sigkill-mid-checkpoint":
    # Die after accelerate wrote the weights and optimizer of checkpoint >= step, before polydistill's state.
    real_save = torch.save
    def dying_save(obj, f, *a, **k):
        if str(f).endswith("polydistill_state.pt") and int(str(f).split("checkpoint-")[1].split("/")[0]) >= step:
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *a, **k)
    torch.save = dying_save
try:
    polydistill.train(cfg, plugins=[("kill", Kill())])
except KeyboardInterrupt:
    sys.exit(130)
sys.exit(0)
"""

PLUGINS = {
    "kd": {"kl": 1.0, "ce": 0.5},
    "adaptive_temperature": {"learnable": "global"},
    "multi_teacher": {"fusion": "gate"},
    "gan_data": {"ratio": 0.5, "length": 6},
}


def _plugin_run(models, data, where):
    teachers = [{"model": str(models["teacher"]), "name": "t1"}, {"model": str(models["teacher2"]), "name": "t2"}]
    cfg = parallel_config(models, data, where, teachers=teachers, plugins=PLUGINS, **RUN)
    cfg["data"]["train"]["columns"]["label"] = "label"
    return cfg


def _cached_run(models, data, where):
    return parallel_config(models, data, where, cache={"enabled": True, "dir": str(where / "cache")},
                           plugins={"adaptive_temperature": {"learnable": "instance"}}, **RUN)


@pytest.mark.parametrize("build, mode", [
    (_plugin_run, "sigkill"),
    (_cached_run, "sigkill-mid-checkpoint"),
    (_plugin_run, "sigterm"),
], ids=["plugins-sigkill", "cache-sigkill-mid-checkpoint", "plugins-sigterm"])
def test_a_killed_run_resumes_to_the_same_weights_optimizer_plugin_state_and_metrics(build, mode, models, data, tmp_path):
    step = random.Random().randint(3, 11)
    straight = polydistill.train(build(models, data, tmp_path / "a"))

    cfg = build(models, data, tmp_path / "b")
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(cfg), mode, str(step)],
                          capture_output=True, text=True, timeout=600)
    why = f"mode {mode}, step {step}:\n{proc.stderr[-2000:]}"
    run_dir = tmp_path / "b" / "run"
    if mode == "sigterm":
        assert proc.returncode == 130, why  # stopped cleanly, after writing a checkpoint of this step
        assert (run_dir / "checkpoints" / "latest").read_text() == f"checkpoint-{step}", why
    else:
        assert proc.returncode == -signal.SIGKILL, why
    if mode == "sigkill-mid-checkpoint":
        torn = run_dir / "checkpoints" / f".tmp-checkpoint-{step + step % 2}"
        assert (torn / "model.safetensors").is_file() and not (torn / EXTRA).exists(), why

    resumed = polydistill.train(cfg, resume=run_dir)
    a, b = _checkpoint_state(straight.output_dir), _checkpoint_state(resumed.output_dir)
    assert a["name"] == b["name"] == "checkpoint-12"
    _assert_identical(a, b)
    if build is _plugin_run:  # the plugin states compared above are really there
        assert {"gan_data"} <= set(a["extra"]["plugins"])
        assert any(k.startswith("multi_teacher") for k in a["extra"]["plugin_modules"])
        assert any(k.startswith("adaptive_temperature") for k in a["extra"]["plugin_modules"])


# ---------------------------------------------------------------- torn and corrupt checkpoints


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF
    path.write_bytes(bytes(raw))


CORRUPTIONS = {
    "truncated-weights": (lambda c: _truncate(c / "model.safetensors"), "model.safetensors is truncated"),
    "flipped-byte-in-weights": (lambda c: _flip(c / "model.safetensors"), "model.safetensors is corrupt"),
    "truncated-state": (lambda c: _truncate(c / EXTRA), f"{EXTRA} is truncated"),
    "missing-optimizer": (lambda c: (c / "optimizer.bin").unlink(), "optimizer.bin is missing"),
    "garbled-manifest": (lambda c: (c / MANIFEST).write_text("{not json"), f"{MANIFEST} is unreadable"),
    "empty-folder": (lambda c: [f.unlink() for f in c.iterdir()], "are missing"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_latest_checkpoint_is_skipped_for_the_previous_one(corruption, models, data, tmp_path):
    damage, problem = CORRUPTIONS[corruption]
    run = dict(RUN, training__epochs=2)  # 6 steps
    straight = polydistill.train(parallel_config(models, data, tmp_path / "a", **run))
    cfg = parallel_config(models, data, tmp_path / "b", **run)
    with pytest.raises(KeyboardInterrupt):
        polydistill.train(cfg, plugins=[("stop", StopAt(5))])
    root = tmp_path / "b" / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-4", "checkpoint-5", "latest"]
    damage(root / "checkpoint-5")
    with pytest.warns(polydistill.PolydistillWarning, match=f"skipping checkpoint {root / 'checkpoint-5'}: .*{problem}"):
        resumed = polydistill.train(cfg, resume=tmp_path / "b" / "run")
    _assert_identical(_checkpoint_state(straight.output_dir), _checkpoint_state(resumed.output_dir))


def test_a_torn_checkpoint_without_a_manifest_falls_back_when_it_cannot_be_loaded(models, data, tmp_path):
    """Checkpoints written before manifests existed are still checked by loading them."""
    cfg = parallel_config(models, data, tmp_path, **dict(RUN, training__epochs=1))
    with pytest.raises(KeyboardInterrupt):
        polydistill.train(cfg, plugins=[("stop", StopAt(3))])
    root = tmp_path / "run" / "checkpoints"
    for c in root.glob("checkpoint-*"):
        (c / MANIFEST).unlink()
    _truncate(root / "checkpoint-3" / "model.safetensors")
    with pytest.warns(polydistill.PolydistillWarning, match="checkpoint-3: cannot be loaded"):
        result = polydistill.train(cfg, resume=tmp_path / "run")
    assert result.history[-1]["step"] == 3


def test_a_corrupt_checkpoint_named_directly_is_an_error_naming_the_file(models, data, tmp_path, capsys):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=2)
    polydistill.train(cfg)
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-2"
    _truncate(ckpt / "optimizer.bin")
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    assert main(["train", str(path), "--resume", str(ckpt)]) == 2
    err = capsys.readouterr().err
    assert f"--resume: checkpoint {ckpt} optimizer.bin is truncated" in err and "Traceback" not in err


def test_every_checkpoint_corrupt_is_an_error(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=2)
    polydistill.train(cfg)
    _flip(tmp_path / "run" / "checkpoints" / "checkpoint-2" / EXTRA)
    with pytest.warns(polydistill.PolydistillWarning), pytest.raises(polydistill.CheckpointError, match="every checkpoint .* is torn or corrupt"):
        polydistill.train(cfg, resume=tmp_path / "run")


# ---------------------------------------------------------------- disk full


def test_disk_full_during_a_checkpoint_keeps_the_previous_one(models, data, tmp_path, monkeypatch, capsys):
    run = dict(RUN, training__epochs=2)
    straight = polydistill.train(parallel_config(models, data, tmp_path / "a", **run))
    cfg = parallel_config(models, data, tmp_path / "b", **run)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    root = tmp_path / "b" / "run" / "checkpoints"
    assert f"disk full while writing checkpoint {root / 'checkpoint-4'}; the previous checkpoint {root / 'checkpoint-2'} is intact" in err
    assert "Traceback" not in err
    assert sorted(p.name for p in root.iterdir()) == ["checkpoint-2", "latest"]  # no half-written folder left

    monkeypatch.setattr(torch, "save", real_save)
    assert main(["train", str(path), "--resume"]) == 0
    assert f"resumed from {root / 'checkpoint-2'}" in capsys.readouterr().out
    _assert_identical(_checkpoint_state(straight.output_dir), _checkpoint_state(tmp_path / "b" / "run"))


# ---------------------------------------------------------------- teacher cache


def _cache_cfg(models, data, where, cache_dir):
    return parallel_config(models, data, where, cache={"enabled": True, "dir": str(cache_dir)}, training__max_steps=3)


def test_corrupt_cache_entries_are_dropped_and_recomputed(models, data, tmp_path):
    cache = tmp_path / "cache"
    first = polydistill.train(_cache_cfg(models, data, tmp_path / "a", cache))
    db = sqlite3.connect(cache / "teacher-outputs.sqlite")
    with db:
        db.execute("UPDATE outputs SET data = substr(data, 1, 4) WHERE rowid = 1")  # truncated
        db.execute("UPDATE outputs SET data = zeroblob(length(data)) WHERE rowid = 2")  # same size, wrong bytes
    db.close()
    with pytest.warns(polydistill.PolydistillWarning, match="corrupt entry") as seen:
        again = polydistill.train(_cache_cfg(models, data, tmp_path / "b", cache))
    messages = " ".join(str(w.message) for w in seen)
    assert "checksum mismatch" in messages and "cannot reshape" in messages
    a, b = (load_file(str(r.student_dir / "model.safetensors")) for r in (first, again))
    for k in a:
        assert torch.equal(a[k], b[k]), k
    db = sqlite3.connect(cache / "teacher-outputs.sqlite")
    assert db.execute("SELECT count(*) FROM outputs WHERE length(data) = 4").fetchone() == (0,)


def test_a_cache_file_that_is_not_a_database_is_moved_aside(models, data, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "teacher-outputs.sqlite").write_bytes(b"this is not sqlite" * 100)
    with pytest.warns(polydistill.PolydistillWarning, match="is unreadable .* moved aside"):
        polydistill.train(_cache_cfg(models, data, tmp_path, cache))
    assert len(list(cache.glob("teacher-outputs.sqlite.corrupt-*"))) == 1
    assert sqlite3.connect(cache / "teacher-outputs.sqlite").execute("SELECT count(*) FROM outputs").fetchone()[0] > 0


class FullDisk:
    """A SQLite connection whose INSERTs fail as on a full disk."""

    def __init__(self, db):
        self.db = db

    def __getattr__(self, name):
        return getattr(self.db, name)

    def __enter__(self):
        return self.db.__enter__()

    def __exit__(self, *exc):
        return self.db.__exit__(*exc)

    def executemany(self, sql, rows):
        if sql.startswith("INSERT"):
            raise sqlite3.OperationalError("database or disk is full")
        return self.db.executemany(sql, rows)


def test_a_full_disk_switches_the_cache_off_and_training_goes_on(models, data, tmp_path, monkeypatch):
    from polydistill.cache import TeacherCache

    real_open = TeacherCache._open
    monkeypatch.setattr(TeacherCache, "_open", lambda self: FullDisk(real_open(self)))
    with pytest.warns(polydistill.PolydistillWarning, match=r"writing failed \(database or disk is full\); the run goes on without the cache"):
        result = polydistill.train(_cache_cfg(models, data, tmp_path, tmp_path / "cache"))
    assert [r["step"] for r in result.history if "loss" in r] == [1, 2, 3]


# ---------------------------------------------------------------- non-finite losses


class NanAt:
    """Returns a loss term that is NaN (or inf) at the given (epoch, batch) positions."""

    def __init__(self, at: set[tuple[int, int]], value: float = float("nan")) -> None:
        self.at, self.value = at, value

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        zero = student_out.logits.sum() * 0
        bad = (state.epoch, state.batch_in_epoch) in self.at
        return {"wobble": zero + self.value if bad else zero}


def test_a_nan_term_stops_the_run_naming_term_and_plugin_with_a_checkpoint_of_the_last_good_state(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__epochs=2)
    with pytest.raises(polydistill.PluginError) as err:
        polydistill.train(cfg, plugins=[("nanny", NanAt({(1, 1)}))])
    msg = str(err.value)
    assert "non-finite loss at step 5 (epoch 1, batch 1): 'wobble' = nan from plugin 'nanny' (other terms: kl:" in msg
    assert "set training.nonfinite: skip" in msg and "checkpoint-4" in msg and err.value.plugin == "nanny"
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint-4"
    assert torch.load(ckpt / EXTRA, weights_only=False)["batch_in_epoch"] == 1
    resumed = polydistill.train(cfg, resume=tmp_path / "run")  # once the cause is gone, it resumes from there
    assert [r["step"] for r in resumed.history if "loss" in r] == [1, 2, 3, 4, 5, 6]


def test_skip_policy_skips_counts_and_resumes_exactly(models, data, tmp_path):
    bad = {(0, 1), (2, 0)}
    run = dict(RUN, training__epochs=3, training__nonfinite="skip", training__max_skipped_batches=2)
    with pytest.warns(polydistill.PolydistillWarning) as seen:
        straight = polydistill.train(parallel_config(models, data, tmp_path / "a", **run), plugins=[("nanny", NanAt(bad, float("inf")))])
    assert [str(w.message).split("'wobble' = ")[1].split(" (")[0] for w in seen] == ["inf from plugin 'nanny'"] * 2
    assert "batch skipped, no optimizer step (1 of at most 2)" in str(seen[0].message)
    rows = [r for r in straight.history if "lr" in r]
    assert [r.get("skipped_batches", 0) for r in rows] == [0, 1, 1, 1, 1, 1, 2, 2, 2]
    assert "loss" not in rows[1] and "loss" not in rows[6]  # nothing was learnt from those batches
    weights = load_file(str(straight.student_dir / "model.safetensors"))
    assert all(torch.isfinite(w).all() for w in weights.values())

    cfg = parallel_config(models, data, tmp_path / "b", **run)
    with pytest.raises(KeyboardInterrupt), pytest.warns(polydistill.PolydistillWarning):
        polydistill.train(cfg, plugins=[("nanny", NanAt(bad, float("inf"))), ("stop", StopAt(3))])
    with pytest.warns(polydistill.PolydistillWarning, match=r"\(2 of at most 2\)"):
        resumed = polydistill.train(cfg, resume=tmp_path / "b" / "run", plugins=[("nanny", NanAt(bad, float("inf")))])
    _assert_identical(_checkpoint_state(straight.output_dir), _checkpoint_state(resumed.output_dir))


def test_skip_policy_stops_past_the_limit(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__epochs=2, training__nonfinite="skip", training__max_skipped_batches=1)
    with pytest.warns(polydistill.PolydistillWarning), pytest.raises(
            polydistill.PluginError, match=r"more than training.max_skipped_batches=1 batches had a non-finite loss"):
        polydistill.train(cfg, plugins=[("nanny", NanAt({(0, 0), (0, 2)}))])


def test_with_accumulation_a_bad_micro_batch_skips_its_whole_group(models, data, tmp_path):
    from polydistill import models as M

    cfg = parallel_config(models, data, tmp_path, training__epochs=1, training__gradient_accumulation_steps=3,
                          training__nonfinite="skip")
    with pytest.warns(polydistill.PolydistillWarning):
        result = polydistill.train(cfg, plugins=[("nanny", NanAt({(0, 2)}))])
    teacher = M.load_model(str(models["teacher"]), "sequence_classification")
    before = M.student_from_teacher(teacher, [0, 2], "sequence_classification", None).state_dict()
    after = load_file(str(result.student_dir / "model.safetensors"))
    assert after and all(torch.equal(before[k], after[k]) for k in after)  # the one group made no update
    assert result.history[0]["skipped_batches"] == 1
