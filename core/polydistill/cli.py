"""The ``polydistill`` command line: train, eval, plugins, config, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import traceback
import warnings
from pathlib import Path
from typing import Any

from polydistill.version import __version__
from polydistill.errors import ConfigError, PolydistillError, PolydistillWarning

DEBUG_ENV = "POLYDISTILL_DEBUG"


def _add_set(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set training.learning_rate=3e-5 (repeatable)")


def _add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, metavar="N",
                   help="torch CPU threads (and OMP_NUM_THREADS of the processes it starts); default: torch's, all cores. "
                        "On a shared machine give each job its share: two jobs each spinning on every core run many times slower")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="polydistill", description="Knowledge distillation for cross-lingual transfer.")
    parser.add_argument("--version", action="version", version=f"polydistill {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help=f"print the traceback of an error (also: {DEBUG_ENV}=1); without it, errors are one message")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="distil (or fine-tune) a student as a config file says")
    p.add_argument("config", help="YAML or JSON config file")
    _add_set(p)
    p.add_argument("--output-dir", help="run directory (default: the config's output_dir)")
    p.add_argument("--resume", nargs="?", const=True, metavar="PATH",
                   help="continue from the latest checkpoint of the run directory (or of PATH)")
    p.add_argument("--overwrite", action="store_true",
                   help="delete a previous run in the output directory first (without it, or --resume, such a directory is refused)")
    _add_threads(p)

    p = sub.add_parser("eval", help="evaluate a run's student, or a config's models, per language")
    p.add_argument("target", help="run directory or config file")
    _add_set(p)
    p.add_argument("--which", choices=["student", "teachers", "all"], default="student",
                   help="evaluate the run's student (default), the config's teachers, or both side by side")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    _add_threads(p)

    p = sub.add_parser("plugins", help="list installed plugins, their versions and hooks; `plugins new NAME` starts one")
    p.add_argument("--json", action="store_true", help="print the list as JSON")
    psub = p.add_subparsers(dest="plugins_action", metavar="ACTION")
    n = psub.add_parser("new", help="write a plugin package (pyproject, src/, settings, a hook, a test, README)")
    n.add_argument("name", help="the plugin's name in configs, e.g. my_term")
    n.add_argument("--dir", help="where to write it (default: ./polydistill-NAME)")

    p = sub.add_parser("config", help="print the config schema or validate a config")
    csub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    csub.add_parser("schema", help="JSON schema of the config")
    v = csub.add_parser("validate", help="validate a config, including each enabled plugin's options")
    v.add_argument("config", help="YAML or JSON config file")
    _add_set(v)

    p = sub.add_parser("vocab", help="coverage of the student's vocabulary per language (and of the one student.vocabulary builds), without training")
    p.add_argument("config", help="YAML or JSON config file")
    _add_set(p)
    p.add_argument("--out", help="also write the tokenizer, vocabulary.json and coverage.{json,md} to this folder")
    p.add_argument("--json", action="store_true", help="print the coverage as JSON")
    _add_threads(p)

    p = sub.add_parser("teacher-outputs", help="build the teachers' outputs over the training data as a sharded store, in parallel")
    tsub = p.add_subparsers(dest="store_action", required=True, metavar="ACTION")
    b = tsub.add_parser("build", help="run the teachers over data.train into cache.dir (Arrow shards; resumable); "
                        "in parallel under `accelerate launch` or torchrun, or with --ray")
    b.add_argument("config", help="the run's YAML or JSON config (its cache section says where the store goes)")
    _add_set(b)
    b.add_argument("--out", help="the store's directory (default: cache.dir)")
    b.add_argument("--batches-per-shard", type=int, metavar="N",
                   help="batches of the run's first epoch per shard (default: enough for 64 shards); fixed by the first build")
    b.add_argument("--ray", action="store_true", help="build on a Ray cluster, one task per worker (pip install 'polydistill[ray]')")
    b.add_argument("--workers", type=int, default=2, help="with --ray: the number of tasks (default 2)")
    b.add_argument("--gpus-per-worker", type=float, default=0, help="with --ray: GPUs each task asks for (default 0)")
    b.add_argument("--no-progress", action="store_true", help="a line per shard instead of a progress bar")
    _add_threads(b)
    st = tsub.add_parser("status", help="the stores in a directory: teacher, settings, shards built")
    st.add_argument("dir", help="the store's directory (cache.dir)")
    st.add_argument("--json", action="store_true", help="print the status as JSON")

    p = sub.add_parser("ablate", help="run an ablation study: a base config, axes of plugin sets or options, seeds")
    p.add_argument("study", help="study file (YAML or JSON)")
    p.add_argument("--output-dir", help="study directory (default: the study's output_dir, else runs/<name>)")
    p.add_argument("--jobs", type=int, help="runs at a time, each in its own process")
    p.add_argument("--ray", action="store_true", help="run each run as a Ray task (pip install 'polydistill[ray]')")
    p.add_argument("--retry-failed", action="store_true", help="rerun runs recorded as failed")
    p.add_argument("--dry-run", action="store_true", help="validate and print the runs without training")
    p.add_argument("--no-report", action="store_true", help="do not write the report at the end")
    _add_threads(p)

    p = sub.add_parser("tune", help="search config fields and plugin sets (Optuna or Ray Tune) with pruning; writes the best config")
    p.add_argument("search", help="search file (YAML or JSON): base, space, trials, objectives")
    p.add_argument("--output-dir", help="search directory (default: the search's output_dir, else runs/<name>)")
    p.add_argument("--trials", type=int, help="trials in all (default: the search file's); a rerun adds the ones it lacks")
    p.add_argument("--report-only", action="store_true", help="write search.md, best.yaml and the report of the trials so far, run none")
    _add_threads(p)

    p = sub.add_parser("report", help="tables, significance tests and plots of a study (or search) directory; "
                       "for one run's directory, its loss terms and per-language metrics over the steps")
    p.add_argument("study_dir", help="the directory `polydistill ablate` or `tune` wrote, or a `train` run directory")
    p.add_argument("--output-dir", help="where to write the report (default: STUDY_DIR/report)")
    p.add_argument("--metric", help="metric to compare (default: the study's)")
    p.add_argument("--test", choices=["t", "permutation"], default="t",
                   help="paired significance test over seeds: Student t (default) or exact sign-flip permutation")

    p = sub.add_parser("demo", help="offline cross-lingual distillation demo (tiny models; about 25 s on 2 CPU cores)")
    p.add_argument("--output-dir", default="runs/demo", help="where the demo writes its data, models and results (default: runs/demo)")
    p.add_argument("--quick", action="store_true", help="fewer epochs (a smoke run, weaker numbers)")
    _add_threads(p)
    # --debug is accepted after the command too; SUPPRESS keeps a subcommand from resetting the global flag.
    for choice in {id(c): c for c in sub.choices.values()}.values():
        choice.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from polydistill.api import train
    from polydistill.config import load_config

    given = Path(args.config)
    if given.is_dir():
        hint = (f"its config is {given / 'config.json'}; continue the run with "
                f"`polydistill train {given / 'config.json'} --output-dir {given} --resume`") if (given / "config.json").is_file() else \
            "give the YAML or JSON config file"
        raise ConfigError(f"{given} is a directory, not a config file; {hint}")
    if args.resume is not None and args.overwrite:
        raise ConfigError("--resume and --overwrite: choose one (continue the run, or delete it and start afresh)")
    cfg = load_config(args.config, args.overrides)
    out = Path(args.output_dir or cfg.output_dir)
    resume = None
    if args.resume is not None:
        resume = out if args.resume is True else Path(args.resume)
    try:
        result = train(cfg, resume=resume, output_dir=out, overwrite=args.overwrite)
    except KeyboardInterrupt as exc:
        raise _Interrupted(_interrupt_hint(exc, out)) from None
    if int(os.environ.get("RANK", "0")) == 0:  # once, not once per process
        from polydistill.api import metrics_table

        per_task = result.metrics.get("tasks")
        if per_task:  # a multi-task run: a table per task
            for name, m in per_task.items():
                print(f"{name}:\n" + "\n".join(metrics_table(m)))
            print(f"results: {out / 'results.md'} and results-<task>.png")
        elif result.metrics.get("per_language"):
            print("\n".join(metrics_table(result.metrics)))
            print(f"results: {out / 'results.md'} and results.png")
        print(f"student saved to {result.student_dir}")
    return 0


class _Interrupted(KeyboardInterrupt):
    def __init__(self, hint: str):
        super().__init__(hint)
        self.hint = hint


def _interrupt_hint(exc: BaseException, out: Path) -> str:
    """What an interrupted `train` left: the checkpoint this stop wrote, or the newest intact one."""
    from polydistill import checkpoint as ckpt

    written = getattr(exc, "checkpoint", None)
    if written is not None:
        return f" (checkpoint {written} was written; continue with the same command plus --resume)"
    intact = next((c for c in ckpt.candidates(out) if ckpt.verify(c) is None), None)
    if intact is not None:
        return (f" (no checkpoint was written at this interrupt; the newest complete one is {intact}: "
                "--resume continues from there)")
    return " (no checkpoint is complete: nothing to resume; run the command again without --resume)"


def cmd_eval(args: argparse.Namespace) -> int:
    from polydistill.api import evaluate, format_table
    from polydistill.config import load_config
    from polydistill.evaluation import primary_metric
    from polydistill.multitask import MultiTaskConfig

    results = evaluate(args.target, args.overrides, which=args.which)
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    target = Path(args.target)
    cfg_src: Any = json.loads((target / "config.json").read_text()) if target.is_dir() else target
    cfg = load_config(cfg_src, args.overrides)
    metrics = sorted({k for r in results.values() for k in r["average"]})
    first = cfg.primary_metric if isinstance(cfg, MultiTaskConfig) else primary_metric(cfg.task)
    for metric in [first] + [m for m in metrics if m != first]:
        print(f"\n{metric}\n" + format_table(results, metric))
    return 0


def cmd_vocab(args: argparse.Namespace) -> int:
    from polydistill.config import load_config
    from polydistill.vocabulary import inspect

    built = inspect(load_config(args.config, args.overrides))
    if args.out:
        built.save(Path(args.out))
    print(json.dumps({"vocabulary": built.info, "coverage": built.coverage}, indent=2) if args.json
          else built.summary() + "\n\n" + built.markdown())
    return 0


def cmd_plugins(args: argparse.Namespace) -> int:
    from polydistill.plugins import installed_plugins, load_plugin_object

    if args.plugins_action == "new":
        return cmd_plugins_new(args)

    rows = []
    for name, info in sorted(installed_plugins().items()):
        row: dict[str, Any] = {"name": name, "version": info.version, "distribution": info.distribution,
                               "default": info.default, "object": info.value}
        try:
            obj = load_plugin_object(name)
            row["hooks"] = sorted(h for h in _hooks_of(obj))
            row["api"] = getattr(obj, "polydistill_api", None)
            row["doc"] = (obj.__doc__ or "").strip().splitlines()[0] if obj.__doc__ else ""
        except PolydistillError as exc:
            row["error"] = str(exc)
        rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no plugins installed")
    for r in rows:
        flag = " (enabled by default)" if r["default"] else ""
        print(f"{r['name']} {r['version'] or ''}{flag}  [{r['distribution'] or '?'}]")
        if "error" in r:
            print(f"  BROKEN: {r['error']}")
        else:
            if r["doc"]:
                print(f"  {r['doc']}")
            api = f" (plugin API {r['api']})" if r["api"] else ""
            print(f"  hooks: {', '.join(r['hooks']) or 'none'}{api}")
    return 0


def cmd_plugins_new(args: argparse.Namespace) -> int:
    from polydistill.scaffold import names, new_plugin

    target = new_plugin(args.name, args.dir)
    name = names(args.name)["name"]
    print(f"wrote the plugin '{name}' to {target}/")
    for path in sorted(p for p in target.rglob("*") if p.is_file()):
        print(f"  {path.relative_to(target)}")
    print(f"next:\n  pip install -e '{target}[test]'\n  python -m pytest {target}/tests\n"
          f"  then enable it in a config: plugins: {{{name}: {{weight: 0.01}}}}")
    return 0


def _hooks_of(obj: Any) -> list[str]:
    from polydistill import hookspecs

    names = hookspecs.STEP_HOOKS + hookspecs.LIFECYCLE_HOOKS
    return [n for n in names if callable(getattr(obj, n, None)) and hasattr(getattr(obj, n), "polydistill_impl")]


def cmd_config(args: argparse.Namespace) -> int:
    from polydistill import preflight
    from polydistill.config import load_config, schema
    from polydistill.multitask import MultiTaskConfig
    from polydistill.plugins import enabled_plugins

    if args.action == "schema":
        print(json.dumps(schema(), indent=2))
        return 0
    cfg = load_config(args.config, args.overrides)
    if isinstance(cfg, MultiTaskConfig):
        shown = []
        for name, task_cfg in cfg.tasks.items():
            preflight.check(task_cfg, origin=f"{args.config}: tasks.{name}")
            names = [n for n, _ in enabled_plugins(task_cfg.plugins)]
            shown.append(f"{name}: {task_cfg.task}, mode {task_cfg.mode}, plugins {', '.join(names) or 'none'}")
        off = [n for n in cfg.raw.get("tasks", {}) if n not in cfg.tasks]
        if off:
            shown.append(f"switched off: {', '.join(off)}")
        print(f"{args.config}: valid multi-task config ({'; '.join(shown)}; sampling {cfg.options.sampling}, "
              f"weighting {cfg.options.weighting})")
        return 0
    preflight.check(cfg, origin=args.config)
    names = [name for name, _ in enabled_plugins(cfg.plugins)]
    print(f"{args.config}: valid ({cfg.task}, mode {cfg.mode}; plugins: {', '.join(names) or 'none'})")
    return 0


def cmd_ablate(args: argparse.Namespace) -> int:
    from polydistill.study import ablate, plan_study

    executor = "ray" if args.ray else None
    if args.dry_run:
        plan = plan_study(args.study, args.output_dir, jobs=args.jobs, executor=executor)
        print(f"{plan.name}: {len(plan.cells)} cells x {len(plan.study.seeds)} seeds = {len(plan.runs)} runs -> {plan.dir}")
        print(f"metric: {plan.metric}; baseline: {plan.baseline}")
        for cell in plan.cells:
            changes = ", ".join(f"{k}={json.dumps(v)}" for k, v in cell.overrides.items()) or "(base config)"
            print(f"  {cell.name}: {changes}")
        return 0
    result = ablate(args.study, args.output_dir, jobs=args.jobs, executor=executor, retry_failed=args.retry_failed,
                    threads=args.threads)
    if not args.no_report:
        from polydistill.report import write_report

        report = write_report(result.dir)
        print(f"[study] report: {report.out_dir / 'report.md'} and {report.out_dir / 'report.html'}")
    return 1 if result.failed else 0


def cmd_teacher_outputs(args: argparse.Namespace) -> int:
    from polydistill import store

    if args.store_action == "status":
        rows = store.status(args.dir)
        if args.json:
            print(json.dumps(rows, indent=2))
        elif not rows:
            print(f"{args.dir}: no teacher-output store")
        for r in rows:
            s = r["settings"] or {}
            done = "complete" if r["built"] == r["shards"] else "incomplete: run the build again to finish it"
            print(f"{r['folder']}: teacher '{r['teacher']}' ({s.get('task')}, pooling {s.get('pooling')}, max_length "
                  f"{s.get('max_length')}, {r['dtype']}): {r['built']} of {r['shards']} shards built, {r['rows']} rows ({done})")
        return 0
    if args.batches_per_shard is not None and args.batches_per_shard < 1:
        raise ConfigError("--batches-per-shard: must be at least 1")
    if args.ray:
        return _build_on_ray(args)
    from polydistill.config import load_config

    store.build(load_config(args.config, args.overrides), args.out, batches_per_shard=args.batches_per_shard,
                progress=not args.no_progress)
    return 0


def _build_on_ray(args: argparse.Namespace) -> int:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray: Ray is not installed (pip install 'polydistill[ray]')") from None
    from polydistill import store

    if args.workers < 1:
        raise ConfigError("--workers: must be at least 1")
    config = str(Path(args.config).resolve())  # every worker loads it: a path on storage they share

    @ray.remote(num_cpus=1, num_gpus=args.gpus_per_worker)
    def part(index: int) -> dict[str, Any]:
        from polydistill.config import load_config

        done = store.build(load_config(config, args.overrides), args.out, batches_per_shard=args.batches_per_shard,
                           process_index=index, num_processes=args.workers, progress=False)
        return {"built": len(done.built), "rows": done.rows, "seconds": done.seconds}

    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False, log_to_driver=True)
    results = ray.get([part.remote(i) for i in range(args.workers)])
    print(f"ray: {args.workers} workers built {sum(r['built'] for r in results)} shards, "
          f"{sum(r['rows'] for r in results)} outputs per teacher")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from polydistill.study.tune import finish, load_search, tune

    if args.trials is not None and args.trials < 1:
        raise ConfigError("--trials: must be at least 1")
    if args.report_only:
        result = finish(load_search(args.search, args.output_dir))
    else:
        result = tune(args.search, args.output_dir, trials=args.trials)
    return 0 if result.best else 1


def cmd_report(args: argparse.Namespace) -> int:
    from polydistill.report import is_run_dir, write_report, write_run_report

    if is_run_dir(args.study_dir):
        run = write_run_report(args.study_dir, args.output_dir)
        print((run.out_dir / "report.md").read_text(encoding="utf-8"))
        print(f"wrote {run.out_dir}/report.md, report.html and {len(run.files) - 2} plots")
        return 0

    report = write_report(args.study_dir, args.output_dir, metric=args.metric, test=args.test)
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print((report.out_dir / "report.md").read_text(encoding="utf-8"))
    print(f"wrote {report.out_dir}/report.md, report.html, cells.csv, runs.csv and plots")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from polydistill.demo import run_demo

    run_demo(Path(args.output_dir), quick=args.quick, threads=args.threads)
    return 0


COMMANDS = {
    "train": cmd_train, "eval": cmd_eval, "plugins": cmd_plugins, "config": cmd_config,
    "ablate": cmd_ablate, "report": cmd_report, "teacher-outputs": cmd_teacher_outputs, "tune": cmd_tune, "demo": cmd_demo, "vocab": cmd_vocab,
}


def _use_threads(args: argparse.Namespace) -> None:
    """--threads: this process's torch threads, its children's OpenMP threads, and the run config's num_threads."""
    if args.threads < 1:
        raise SystemExit("polydistill: error: --threads: must be at least 1")
    import torch

    torch.set_num_threads(args.threads)
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    if hasattr(args, "overrides"):  # a run's own training.num_threads would set it again
        args.overrides = [*args.overrides, f"training.num_threads={args.threads}"]


def _debug(args: argparse.Namespace) -> bool:
    return bool(getattr(args, "debug", False)) or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0", "false", "no")


def _format_warning(message: Any, category: type[Warning], filename: str, lineno: int, line: str | None = None) -> str:
    if issubclass(category, PolydistillWarning):
        return f"polydistill: warning: {message}\n"
    return _plain_format(message, category, filename, lineno, line)


_plain_format = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = _debug(args)
    if getattr(args, "threads", None) is not None:
        _use_threads(args)
    warnings.formatwarning = _format_warning
    try:
        return COMMANDS[args.command](args)
    except PolydistillError as exc:
        if debug:
            traceback.print_exc()
        print(f"polydistill: error: {exc}", file=sys.stderr)
        _print_notes(exc)
        return 2
    except KeyboardInterrupt as exc:
        hint = ""
        if args.command == "train":
            hint = getattr(exc, "hint", "")
        elif args.command == "ablate":
            hint = " (finished runs are kept; run the same command again to resume the study)"
        elif args.command == "tune":
            hint = " (finished trials are kept; run the same command again to resume the search)"
        elif args.command == "teacher-outputs":
            hint = " (finished shards are kept; run the same command again to build the rest)"
        print(f"polydistill: interrupted{hint}", file=sys.stderr)
        return 130
    except Exception as exc:  # a bug, not bad input: one line unless the traceback is asked for
        if debug:
            traceback.print_exc()
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        hint = "" if debug else f" (run with --debug or {DEBUG_ENV}=1 for the traceback)"
        print(f"polydistill: internal error: {type(exc).__name__}{': ' + first if first else ''}{hint}", file=sys.stderr)
        _print_notes(exc)
        return 1


def _print_notes(exc: BaseException) -> None:
    for note in getattr(exc, "__notes__", ()):
        print(f"polydistill: note: {note}", file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
