"""The Python API that mirrors the CLI: train, evaluate, and what a run leaves behind."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from polydistill.version import __version__
from polydistill.checkpoint import tidy, dump_json, write_atomic
from polydistill.config import Config, load_config
from polydistill.errors import ConfigError


@dataclass
class RunResult:
    """What ``train`` returns: where the run lives and its final metrics."""

    output_dir: Path
    student_dir: Path
    metrics: dict[str, Any]
    history: list[dict[str, Any]] = field(default_factory=list)
    plugins: dict[str, str | None] = field(default_factory=dict)


def train(
    config: Config | dict | str | Path,
    overrides: list[str] | None = None,
    resume: str | Path | None = None,
    plugins: Iterable[tuple[str, Any]] = (),
    output_dir: str | Path | None = None,
    overwrite: bool = False,
) -> RunResult:
    """Distil (or fine-tune) as ``config`` says and save the student.

    ``plugins`` registers extra plugin objects as ``(name, object)`` without
    installing them (notebooks, tests); ``resume`` is a run directory or a
    checkpoint. A directory that holds a run already is refused unless
    ``resume`` continues it or ``overwrite`` deletes it first. Writes
    ``OUTPUT_DIR/student`` (model, tokenizer, model card), ``config.json``,
    ``plugins.json``, ``metrics.json`` and ``metrics.jsonl``.
    """
    from polydistill.loop import Trainer
    from polydistill.multitask import MultiTaskConfig
    from polydistill.multitask.trainer import MultiTaskTrainer

    cfg = load_config(config, overrides)
    trainer = (MultiTaskTrainer if isinstance(cfg, MultiTaskConfig) else Trainer)(cfg, plugins=plugins, output_dir=str(output_dir) if output_dir else None)
    metrics = trainer.fit(resume=resume, overwrite=overwrite)
    return RunResult(trainer.output_dir, trainer.output_dir / "student", metrics, trainer.state.history, trainer.plugin_versions())


def save_student(trainer: Any) -> Path:
    """Save the student's weights and tokenizer, and ``plugins.json``, with a model card without results."""
    state, acc = trainer.state, trainer.accelerator
    student_dir = trainer.output_dir / "student"
    acc.wait_for_everyone()
    # Every process takes part: under FSDP or DeepSpeed ZeRO-3 the full weights are gathered from the shards.
    weights = acc.get_state_dict(state.student)
    if acc.is_main_process:
        def fill(tmp: Path) -> None:
            acc.unwrap_model(state.student).save_pretrained(tmp, state_dict=weights, safe_serialization=True)
            state.student_tokenizer.save_pretrained(tmp)
            trainer.usage = state.task_def.save_files(tmp, state)
            write_atomic(tmp / "README.md", model_card(trainer.config, {}, trainer.host.versions(), state.step, trainer.vocabulary,
                                                       trainer.usage))

        replace_dir(student_dir, fill)
        dump_json(trainer.output_dir / "plugins.json", trainer.plugin_versions())
    return student_dir


def replace_dir(target: Path, fill: Any) -> None:
    """Build a folder with ``fill(tmp)`` aside, then rename it into ``target``: an interrupted save leaves the old one or the new."""
    import shutil

    tmp, old = target.with_name(f".tmp-{target.name}"), target.with_name(f".old-{target.name}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        fill(tmp)
        shutil.rmtree(old, ignore_errors=True)
        if target.exists():
            os.replace(target, old)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not target.exists():
            os.replace(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def save_results(trainer: Any, metrics: dict[str, Any]) -> None:
    """Write ``metrics.json``, the model card with the final evaluation, and ``results.md`` and ``results.png``."""
    from polydistill.evaluation import primary_metric
    from polydistill.report import plot_run

    state, acc = trainer.state, trainer.accelerator
    if acc.is_main_process:
        out = trainer.output_dir
        dump_json(out / "metrics.json", tidy(metrics))
        card = model_card(trainer.config, metrics, trainer.host.versions(), state.step, trainer.vocabulary,
                          getattr(trainer, "usage", None))
        write_atomic(out / "student" / "README.md", card)
        if metrics.get("per_language"):
            metric = primary_metric(trainer.config.task)
            write_atomic(out / "results.md", f"# {out.name}: the student after {state.step} steps\n\n"
                         + "\n".join(metrics_table(metrics)) + f"\n\n![{metric} per language](results.png)\n")
            write_atomic(out / "results.png", plot_run(metrics, metric, f"{out.name}: {metric} per language"))


def metrics_table(metrics: dict[str, Any]) -> list[str]:
    """Markdown lines: one row per language and the average, one column per metric."""
    per_lang = metrics.get("per_language", {})
    names = sorted({k for m in per_lang.values() for k in m})
    lines = ["| language | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for lang in sorted(per_lang):
        lines.append(f"| {lang} | " + " | ".join(f"{per_lang[lang].get(n, float('nan')):.4f}" for n in names) + " |")
    avg = metrics.get("average", {})
    lines.append("| **average** | " + " | ".join(f"{avg.get(n, float('nan')):.4f}" for n in names) + " |")
    return lines


def model_card(config: Config, metrics: dict[str, Any], plugins: dict[str, str | None], steps: int, vocabulary: Any = None,
               usage: list[str] | None = None) -> str:
    per_lang = metrics.get("per_language", {})
    langs = sorted(per_lang)
    tags = set(langs) | set(vocabulary.info.get("languages", {}) if vocabulary is not None else ())  # the vocabulary's languages
    lines = [
        "---",
        "library_name: transformers",
        "tags: [polydistill, knowledge-distillation, cross-lingual]",
        f"language: [{', '.join(sorted(t for t in tags if t != 'und'))}]",
        "---",
        "",
        "# Student distilled with polydistill",
        "",
        f"- task: `{config.task}`, mode: `{config.mode}`, steps: {steps}",
        f"- teachers: {', '.join(f'`{t.model}`' for t in config.teachers) or 'none (fine-tuned)'}",
        f"- plugins: {', '.join(f'{n} {v}' if v else n for n, v in plugins.items()) or 'none'}",
        f"- polydistill {__version__}",
        "",
    ]
    if usage:
        lines += ["## Usage", "", *usage, ""]
    if vocabulary is not None:
        vc = config.student.vocabulary
        how = {"keep": "the starting tokenizer's vocabulary", "trim": "the starting tokenizer trimmed to the tokens the training text uses",
               "extend": "the starting tokenizer extended with tokens learned from the training text",
               "new": f"a new {vc.model} tokenizer learned from the training text"}[vc.method]
        lines += ["## Vocabulary", "", f"{how[0].upper() + how[1:]}"
                  + ("; text is transliterated to Latin script (anyascii) by the tokenizer's normalizer" if vc.transliterate != "none" else "")
                  + f". New token rows: `{vocabulary.info.get('init', vc.init)}` initialisation.", "", vocabulary.summary() + ".", "",
                  vocabulary.markdown(), ""]
    if langs:
        lines += ["## Evaluation", "", *metrics_table(metrics), ""]
    return "\n".join(lines)


def evaluate(
    source: Config | dict | str | Path,
    overrides: list[str] | None = None,
    which: str = "student",
) -> dict[str, dict[str, Any]]:
    """Evaluate a run directory's student, or a config's student and/or teachers, on ``data.eval``.

    ``which``: ``student``, ``teachers`` or ``all``. Returns ``{model name: metrics}``.
    """
    from polydistill.multitask import MultiTaskConfig

    run_dir: Path | None = None
    if isinstance(source, (str, Path)) and Path(source).is_dir():
        run_dir = Path(source)
        if not (run_dir / "config.json").is_file():
            raise ConfigError(f"{run_dir}: not a polydistill run directory (no config.json)")
        cfg = load_config(json.loads((run_dir / "config.json").read_text()), overrides)
    else:
        cfg = load_config(source, overrides)
    student_dir = run_dir / "student" if run_dir is not None else None
    if isinstance(cfg, MultiTaskConfig):  # each task's head on its eval data; names as in the run's metrics
        from polydistill.multitask.trainer import combine

        per_task: dict[str, dict[str, dict[str, Any]]] = {}
        for name, task_cfg in cfg.tasks.items():
            if task_cfg.data.eval:
                head = student_dir / name if student_dir is not None else None
                for model, m in _evaluate(task_cfg, head, which).items():
                    per_task.setdefault(model if model == "student" else f"{model} ({name})", {})[name] = m
        if not per_task:
            raise ConfigError("data.eval: no task has evaluation data")
        return {model: combine(m) for model, m in per_task.items()}
    return _evaluate(cfg, student_dir, which)


def _evaluate(cfg: Config, student_dir: Path | None, which: str) -> dict[str, dict[str, Any]]:
    from polydistill import models as M
    from polydistill.data import load_sources
    from polydistill.evaluation import evaluate_model

    if not cfg.data.eval:
        raise ConfigError("data.eval: no evaluation data configured")
    data = load_sources(cfg.data.eval, cfg)
    dc = cfg.data
    targets: list[tuple[str, str, str | None]] = []
    if which in ("student", "all"):
        if student_dir is not None and student_dir.is_dir():
            targets.append(("student", str(student_dir), None))
        elif cfg.student.model:
            targets.append(("student", cfg.student.model, cfg.student.tokenizer))
        elif which == "student":
            raise ConfigError("student: nothing to evaluate before training (give a run directory, or student.model)")
    if which in ("teachers", "all"):
        for name, t in zip(cfg.teacher_names(), cfg.teachers):
            targets.append((f"teacher:{name}", t.model, t.tokenizer))
    results = {}
    for name, path, tok in targets:
        model = M.load_model(path, cfg.task, cfg.labels, role=name)
        labels = cfg.labels or M.model_labels(model)
        tokenizer = M.load_tokenizer(tok or path, name, task=cfg.task)
        results[name] = evaluate_model(model, tokenizer, data, cfg.task, labels, dc.max_length, dc.eval_batch_size or 2 * dc.batch_size,
                                       cfg.pooling, generation=cfg.generation.model_dump(), progress=cfg.training.progress,
                                       doc_stride=dc.doc_stride)
    return results


def format_table(results: dict[str, dict[str, Any]], metric: str) -> str:
    """A per-language markdown table of one metric for several models."""
    langs = sorted({lang for r in results.values() for lang in r["per_language"]})
    head = "| model | " + " | ".join(langs) + " | average |"
    rows = [head, "|---" * (len(langs) + 2) + "|"]
    for name, r in results.items():
        cells = [f"{r['per_language'].get(l, {}).get(metric, float('nan')):.3f}" for l in langs]
        rows.append(f"| {name} | " + " | ".join(cells) + f" | {r['average'].get(metric, float('nan')):.3f} |")
    return "\n".join(rows)
