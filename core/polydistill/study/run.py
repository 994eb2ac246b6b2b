"""One run of a study: its spec file, training it into a result record, and the entry point of its own process."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from polydistill.checkpoint import dump_json, find as find_checkpoint
from polydistill.study.plan import RESULT_FILE, SPEC_FILE, Plan, Run, _now


def execute_run(spec: dict[str, Any]) -> dict[str, Any]:
    """Train one run (resuming its latest checkpoint if there is one); return its result record.

    Exceptions become a ``failed`` record; KeyboardInterrupt (after the run's own
    checkpoint) propagates.
    """
    from polydistill.api import train

    run_dir = Path(spec["dir"])
    checkpoint = find_checkpoint(run_dir)
    record: dict[str, Any] = {k: spec[k] for k in ("cell", "slug", "levels", "seed", "fingerprint")}
    record["started_at"] = _now()
    record["resumed"] = checkpoint is not None
    start = time.perf_counter()
    try:
        # the study owns its run folders: one without a checkpoint is started afresh
        result = train(spec["config"], resume=run_dir if checkpoint is not None else None, output_dir=run_dir,
                       overwrite=checkpoint is None)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a crashing cell is recorded and the study goes on
        record.update(status="failed", metrics={}, history=_read_history(run_dir), plugins={})
        record["error"] = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc()}
    else:
        record.update(status="ok", metrics=result.metrics, history=result.history, plugins=result.plugins)
    record["wall_time_s"] = round(time.perf_counter() - start, 3)
    record["finished_at"] = _now()
    record["config"] = spec["config"]
    if record["status"] == "ok":
        _prune(run_dir, spec.get("keep", "student"))
    return record


def _read_history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.jsonl"
    rows = []
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                rows.append(json.loads(line))
    return rows


def _prune(run_dir: Path, keep: str) -> None:
    if keep in ("student", "metrics"):
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    if keep == "metrics":
        shutil.rmtree(run_dir / "student", ignore_errors=True)


def _worker_main(spec_path: str) -> int:
    """Entry point of a run in its own process: ``python -m polydistill.study SPEC``."""
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    if spec.get("threads"):
        import torch

        torch.set_num_threads(spec["threads"])
    try:
        record = execute_run(spec)
    except KeyboardInterrupt:
        return 130
    dump_json(Path(spec["dir"]) / RESULT_FILE, record)
    return 0


def _die_with_parent() -> Callable[[], None] | None:
    """A Popen preexec_fn that, on Linux, asks for SIGTERM (checkpoint and stop) when the study process dies, even by SIGKILL.

    prctl is looked up here, in the parent: between fork and exec only async-signal-safe work is safe.
    The setting survives exec; a parent that died before it took effect makes the child exit at once.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL("libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def read_result(run_dir: Path) -> dict[str, Any] | None:
    """A run's result record, or None when it has none (or a torn one)."""
    path = run_dir / RESULT_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _read_spec(run_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((run_dir / SPEC_FILE).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None


def _spec(plan: Plan, run: Run, threads: int | None) -> dict[str, Any]:
    config = run.config
    if threads is not None:
        # The study shares the machine between its runs: a config's own num_threads (meant for a run
        # alone) would oversubscribe the cores, and spinning OpenMP threads then crawl.
        config = {**config, "training": {**config["training"], "num_threads": threads}}
    spec = {
        "cell": run.cell.name, "slug": run.cell.slug, "levels": run.cell.levels, "seed": run.seed,
        "fingerprint": run.fingerprint, "dir": str(run.dir), "config": config, "keep": plan.study.keep,
        "threads": threads,
    }
    run.dir.mkdir(parents=True, exist_ok=True)
    dump_json(run.dir / SPEC_FILE, spec)
    return spec
