"""Executing a study's pending runs: sequentially, in processes (GPU slots, SIGTERM handling) or on Ray; the study directory's lock."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

from polydistill.errors import ConfigError
from polydistill.study.plan import LOCK_FILE, SPEC_FILE, Plan, Run, _now
from polydistill.study.run import _die_with_parent, _read_history, _spec, execute_run, read_result
from polydistill.study.schema import StudyConfig


@contextlib.contextmanager
def _lock(study_dir: Path) -> Iterator[None]:
    """One study process per directory; the OS drops the lock if the process dies."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    with open(study_dir / LOCK_FILE, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            pid = f.read().strip() or "?"
            raise ConfigError(f"{study_dir}: another polydistill process (pid {pid}) is running this study") from None
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _executor(study: StudyConfig) -> str:
    if study.executor != "auto":
        return study.executor
    return "sequential" if study.jobs == 1 else "processes"


def _threads(study: StudyConfig) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)  # cgroups, SLURM
    return study.threads_per_run or max(1, cores // study.jobs)


def _run_sequential(plan: Plan, runs: list[Run]) -> Iterator[tuple[Run, dict[str, Any]]]:
    for run in runs:
        yield run, execute_run(_spec(plan, run, None))


def _run_processes(plan: Plan, runs: list[Run]) -> Iterator[tuple[Run, dict[str, Any]]]:
    """Each run in its own Python process, ``jobs`` at a time; a process that dies is a failed run."""
    threads = _threads(plan.study)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    slots = _gpu_slots(plan.study)
    queue = list(runs)
    active: dict[subprocess.Popen, tuple[Run, Any, int]] = {}
    previous = _raise_on_sigterm()
    try:
        while queue or active:
            while queue and len(active) < len(slots):
                run = queue.pop(0)
                slot = next(i for i in range(len(slots)) if i not in {s for _, _, s in active.values()})
                _spec(plan, run, threads)
                logf = open(run.dir / "log.txt", "a", encoding="utf-8")
                cmd = [sys.executable, "-m", "polydistill.study", str(run.dir / SPEC_FILE)]
                run_env = env if slots[slot] is None else {**env, "CUDA_VISIBLE_DEVICES": slots[slot]}
                # Own session: a Ctrl-C in the terminal reaches only this process, which then stops
                # each run with exactly one SIGTERM (a second signal would abort its checkpoint).
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=run_env, start_new_session=True,
                                        preexec_fn=_die_with_parent())
                active[proc] = (run, logf, slot)
            time.sleep(0.2)
            for proc in [p for p in active if p.poll() is not None]:
                run, logf, _ = active.pop(proc)
                logf.close()
                record = read_result(run.dir)
                if proc.returncode == 130 and record is None:
                    raise KeyboardInterrupt
                if record is None:
                    record = _died(run, proc.returncode)
                yield run, record
    finally:
        for proc in active:
            if proc.poll() is None:
                proc.terminate()  # each run writes a checkpoint on SIGTERM, then exits
        for proc, (_, logf, _) in active.items():
            proc.wait()
            logf.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _gpu_slots(study: StudyConfig) -> list[str | None]:
    """One entry per concurrent run: the CUDA_VISIBLE_DEVICES it gets (None: inherit)."""
    if not study.gpus_per_run:
        return [None] * study.jobs
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devices = [d for d in visible.split(",") if d.strip()]
    else:
        import torch

        devices = [str(i) for i in range(torch.cuda.device_count())]
    g = study.gpus_per_run
    slots = [",".join(devices[i * g:(i + 1) * g]) for i in range(min(study.jobs, len(devices) // g))]
    if not slots:
        raise ConfigError(f"gpus_per_run: {g} GPUs per run, but this machine shows {len(devices)}")
    return slots


def _raise_on_sigterm() -> Any:
    """Make SIGTERM (kill, scancel) stop the study like Ctrl-C, so its runs get one SIGTERM and checkpoint."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


def _died(run: Run, returncode: int) -> dict[str, Any]:
    tail = ""
    with contextlib.suppress(OSError):
        tail = "\n".join((run.dir / "log.txt").read_text(encoding="utf-8", errors="replace").splitlines()[-20:])
    return {
        "cell": run.cell.name, "slug": run.cell.slug, "levels": run.cell.levels, "seed": run.seed,
        "fingerprint": run.fingerprint, "status": "failed", "metrics": {}, "history": _read_history(run.dir),
        "plugins": {}, "wall_time_s": 0.0, "finished_at": _now(), "config": run.config,
        "error": {"type": "ProcessDied", "message": f"the run's process exited with code {returncode} without a result; "
                  f"see {run.dir / 'log.txt'}", "traceback": tail},
    }


def _run_ray(plan: Plan, runs: list[Run]) -> Iterator[tuple[Run, dict[str, Any]]]:
    """Each run as a Ray task needing ``threads_per_run`` CPUs; records come back to this process."""
    try:
        import ray
    except ImportError:
        raise ConfigError("executor: ray needs Ray installed: pip install 'polydistill[ray]'") from None
    threads = plan.study.threads_per_run or 1
    if not ray.is_initialized():
        ray.init(address=plan.study.ray_address, include_dashboard=False, log_to_driver=False)
    remote = ray.remote(num_cpus=threads, num_gpus=plan.study.gpus_per_run, max_retries=0)(_ray_task)
    pending = {}
    queue = list(runs)
    limit = plan.study.jobs if plan.study.jobs > 1 else len(runs)
    try:
        while queue or pending:
            while queue and len(pending) < limit:
                run = queue.pop(0)
                pending[remote.remote(_spec(plan, run, threads))] = run
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                run = pending.pop(ref)
                try:
                    record = ray.get(ref)
                except Exception as exc:  # the task's process died (OOM, node lost)
                    record = _died(run, -1)
                    record["error"].update(type=type(exc).__name__, message=str(exc).splitlines()[0])
                yield run, record
    finally:
        for ref in pending:
            ray.cancel(ref)


def _ray_task(spec: dict[str, Any]) -> dict[str, Any]:
    import torch

    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return execute_run(spec)
