"""Ablation studies: a base config, axes and seeds, expanded into runs and executed resumably.

A study file names a base config and axes. Each axis is a list of levels; a level
is a set of config changes. The cells are the product of the axes, and each cell
runs once per seed. Every run writes ``runs/<cell>/seed-<n>/result.json`` when it
ends (finished or failed); a rerun of the study skips those and resumes runs that
were interrupted from their latest checkpoint.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from polydistill.checkpoint import dump_json
from polydistill.config import changed_fields
from polydistill.errors import ConfigError
from polydistill.study.executors import _executor, _gpu_slots, _lock, _run_processes, _run_ray, _run_sequential
from polydistill.study.plan import LOCK_FILE, RESULT_FILE, SPEC_FILE, STUDY_FILE, Cell, Plan, Run, fingerprint, load_study, plan_study
from polydistill.study.run import _read_spec, execute_run, read_result
from polydistill.study.schema import Axis, StudyConfig

__all__ = [
    "Axis", "Cell", "LOCK_FILE", "Plan", "RESULT_FILE", "Run", "SPEC_FILE", "STUDY_FILE", "StudyConfig", "StudyResult",
    "ablate", "execute_run", "fingerprint", "load_study", "plan_study", "read_result",
    # private helpers the tests import from here
    "_gpu_slots", "_lock",
]


@dataclass
class StudyResult:
    """What ``ablate`` returns."""

    dir: Path
    plan: Plan
    records: dict[tuple[str, int], dict[str, Any]] = field(default_factory=dict)
    ran: int = 0
    skipped: int = 0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [r for r in self.records.values() if r["status"] != "ok"]


def ablate(
    source: str | Path | dict[str, Any],
    output_dir: str | Path | None = None,
    jobs: int | None = None,
    executor: str | None = None,
    retry_failed: bool = False,
    log: Callable[[str], None] = print,
    threads: int | None = None,
) -> StudyResult:
    """Run every run of a study that has no result yet; returns all records.

    Finished runs are skipped; a run interrupted earlier resumes from its latest
    checkpoint; a failed run is rerun from scratch only with ``retry_failed``; ``threads``: torch threads of each
    run in its own process (``threads_per_run``). A
    finished run whose config no longer matches the study is an error (start a new
    directory), raised before anything in the directory changes.
    """
    plan = plan_study(source, output_dir, jobs=jobs, executor=executor, threads_per_run=threads)
    plan.dir.mkdir(parents=True, exist_ok=True)
    with _lock(plan.dir):
        result = StudyResult(plan.dir, plan)
        pending: list[Run] = []
        stale: list[Path] = []  # run folders of another config or a failed attempt to retry: cleared, not resumed
        # Check everything before touching anything: a refused study leaves its directory as it was.
        for run in plan.runs:
            record = read_result(run.dir)
            if record is not None and record.get("fingerprint") != run.fingerprint:
                if record.get("status") == "ok":
                    raise ConfigError(_changed(run, record))
                record = None  # a failed run of an older config: start it afresh
                stale.append(run.dir)
            if record is not None and (record.get("status") == "ok" or not retry_failed):
                result.records[(run.cell.name, run.seed)] = record
                result.skipped += 1
                continue
            spec = _read_spec(run.dir)
            if record is not None or (spec is not None and spec.get("fingerprint") != run.fingerprint):
                stale.append(run.dir)
            pending.append(run)
        dump_json(plan.dir / STUDY_FILE, plan.to_json())
        for run_dir in dict.fromkeys(stale):
            shutil.rmtree(run_dir, ignore_errors=True)
        total = len(plan.runs)
        log(f"[study] {plan.name}: {len(plan.cells)} cells x {len(plan.study.seeds)} seeds = {total} runs; "
            f"{result.skipped} already done, {len(pending)} to run -> {plan.dir}")
        mode = _executor(plan.study) if pending else "sequential"
        run_all = {"sequential": _run_sequential, "processes": _run_processes, "ray": _run_ray}[mode]
        done = result.skipped
        for run, record in run_all(plan, pending):
            dump_json(run.dir / RESULT_FILE, record)
            result.records[(run.cell.name, run.seed)] = record
            result.ran += 1
            done += 1
            log(f"[study] {done}/{total} {run.label}: {_summary(record, plan.metric)}")
    failed = len(result.failed)
    log(f"[study] finished: {len(result.records) - failed} ok, {failed} failed")
    return result


def _changed(run: Run, record: dict[str, Any]) -> str:
    diff = changed_fields(record.get("config", {}), run.config)
    shown = ", ".join(f"{k}: {a!r} -> {b!r}" for k, a, b in diff[:3])
    return (
        f"{run.dir}: run '{run.label}' finished with another config ({shown or 'different fingerprint'}). "
        "The study file or its base config changed since; write the changed study to a new --output-dir, "
        f"or delete {run.dir} to rerun that run"
    )


def _summary(record: dict[str, Any], metric: str) -> str:
    if record["status"] != "ok":
        err = record.get("error", {})
        return f"FAILED {err.get('type', '?')}: {str(err.get('message', '')).splitlines()[0] if err.get('message') else ''}"
    value = record.get("metrics", {}).get("average", {}).get(metric)
    shown = f"{metric} {value:.4f}" if isinstance(value, (int, float)) else "no evaluation data"
    resumed = ", resumed" if record.get("resumed") else ""
    wall = record["wall_time_s"]
    return f"{shown} ({wall:.1f} s{resumed})" if wall < 10 else f"{shown} ({wall:.0f} s{resumed})"
