"""Checks of a run's inputs before any model loads, every problem reported together.

Models, tokenizers, data files, their columns and the columns evaluation needs
are checked from the config alone (a data file's first row, never the whole
file), so a config with three mistakes fails once, in a second, with three
lines. A path that looks local is never sent to the hub.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path
from typing import Any

from polydistill.config import Config, DataSource
from polydistill.errors import ConfigError, PolydistillError
from polydistill.tasks import get_task

#: Endings of data files: a path with one of these is a file, never a hub dataset id.
DATA_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv", ".parquet", ".txt", ".arrow", ".gz", ".zip", ".bz2", ".xz", ".zst")
FORMATS = {".jsonl": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}


def looks_local(value: str, base_dir: Path | None = None) -> bool:
    """True for what can only be a local path: absolute, ``./``, ``~``, a backslash,
    more than one ``/`` (hub ids are ``name`` or ``org/name``), or a first part that is
    a local folder."""
    if value.startswith(("/", ".", "~")) or "\\" in value or value.count("/") > 1:
        return True
    head = value.split("/", 1)[0]
    return "/" in value and any((root / head).is_dir() for root in {Path.cwd(), *([base_dir] if base_dir else [])})


def _shown(config: Config, value: str) -> str:
    """A path as the error shows it: where it was looked for."""
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p)
    base = config._base_dir.resolve()
    return str(base / p) if base == Path.cwd().resolve() else f"{value} (looked in {base} and {Path.cwd()})"


def _model_fields(config: Config) -> list[tuple[str, str, str]]:
    """(field, value, kind) of every model and tokenizer the run loads."""
    out = []
    for i, t in enumerate(config.teachers):
        out.append((f"teachers[{i}].model", t.model, "model"))
        if t.tokenizer:
            out.append((f"teachers[{i}].tokenizer", t.tokenizer, "tokenizer"))
    sc = config.student
    if sc.model:
        out.append(("student.model", sc.model, "model"))
    if sc.config is not None and isinstance(sc.config.get("base"), str):
        out.append(("student.config.base", sc.config["base"], "config"))
    if sc.tokenizer:
        out.append(("student.tokenizer", sc.tokenizer, "tokenizer"))
    return out


def _check_model(config: Config, field: str, value: str, kind: str) -> str | None:
    path = Path(value).expanduser()
    if path.is_dir():
        if kind in ("model", "config") and not (path / "config.json").is_file():
            return f"{field}: {path} has no config.json (not a transformers model directory)"
        if kind == "tokenizer" and not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json")):
            return f"{field}: {path} has no tokenizer.json or tokenizer_config.json (not a tokenizer directory)"
        return None
    if path.exists():
        return f"{field}: {path} is a file; give the model's directory"
    if looks_local(value, config._base_dir):
        return f"{field}: no such directory: {_shown(config, value)} (a local path, so it is not looked up on the hub)"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes") and not _cached(value, kind):
        return f"{field}: '{value}' is not a local directory and not in the local hub cache, and HF_HUB_OFFLINE is set"
    return None


def _cached(repo: str, kind: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:  # pragma: no cover - a dependency of transformers
        return True
    names = ("tokenizer_config.json", "tokenizer.json") if kind == "tokenizer" else ("config.json",)
    return any(isinstance(try_to_load_from_cache(repo, name), str) for name in names)


def _format(source: DataSource, path: Path) -> str:
    if source.format != "auto":
        return source.format
    return FORMATS.get(path.suffix.lower(), "hub")


def header(path: Path, fmt: str) -> list[str] | None:
    """Column names of a local data file from its first row (None when they cannot be read cheaply)."""
    try:
        if fmt == "jsonl" or (fmt == "json" and path.suffix.lower() == ".jsonl"):
            with open(path, "rb") as f:
                for raw in f:
                    if raw.strip():
                        row = json.loads(raw)
                        return list(row) if isinstance(row, dict) else None
            return None
        if fmt in ("csv", "tsv"):
            with open(path, newline="", encoding="utf-8-sig") as f:
                first = next(csv.reader(f, delimiter="\t" if fmt == "tsv" else ","), None)
            return first
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return list(pq.read_schema(path).names)
    except (OSError, ValueError, UnicodeDecodeError, ImportError):
        return None  # reading the data says what is wrong with it, with the line
    return None


def _check_source(config: Config, where: str, source: DataSource, evaluation: bool) -> list[str]:
    problems = []
    cols = source.columns
    task = get_task(config.task)
    if evaluation and getattr(cols, task.eval_column) is None:
        problems.append(f"{where}.columns.{task.eval_column}: {task.eval_column_why}")
    if cols.target is not None and task.reads_target == "no":
        problems.append(f"{where}.columns.target: task {task.name} reads no target text (generative tasks do: causal_lm, seq2seq; "
                        "and question_answering its answers)")
    if cols.context is None and task.reads_context:
        problems.append(f"{where}.columns.context: task {task.name} reads a passage with each text; give the column that holds it")
    if cols.context is not None and not task.reads_context:
        problems.append(f"{where}.columns.context: task {task.name} reads no context passage (question_answering does)")
    if cols.target is None and task.reads_target == "required" and not (evaluation and task.eval_column == "target"):
        problems.append(f"{where}.columns.target: task {task.name} learns to produce a target text; give the column that holds it")
    wanted = {f"columns.{role}": col for role, col in
              (("text", cols.text), ("source", cols.source), ("label", cols.label), ("lang", cols.lang), ("target", cols.target),
               ("context", cols.context))
              if col is not None}
    wanted.update({f"filter.{k}": k for k in (source.filter or {})})
    if source.aligned is not None:
        for col, value in source.aligned.items():
            path = Path(value).expanduser()
            if not path.is_file():
                problems.append(f"{where}.aligned.{col}: {'is a directory' if path.is_dir() else 'file not found'}: {_shown(config, value)}")
        names: list[str] | None = list(source.aligned)
    else:
        assert source.path is not None
        path = Path(source.path).expanduser()
        fmt = _format(source, path)
        local = fmt != "hub" or path.exists() or path.suffix.lower() in DATA_SUFFIXES or looks_local(source.path, config._base_dir)
        if not local:
            return problems  # a hub dataset id: its columns are known once it loads
        if path.is_dir():
            if fmt != "hub":  # datasets reads a local folder as a dataset repository
                problems.append(f"{where}.path: {path} is a directory; format {fmt} reads one file")
            return problems
        if not path.is_file():
            problems.append(f"{where}.path: file not found: {_shown(config, source.path)}"
                            + (" (a local path, so it is not looked up on the hub)" if fmt == "hub" else ""))
            return problems
        if fmt == "hub":
            problems.append(f"{where}.format: cannot tell the format of {path} from its name; set `format` (jsonl, json, csv, tsv, parquet)")
            return problems
        if path.stat().st_size == 0:
            problems.append(f"{where}.path: file is empty: {path}")
            return problems
        names = header(path, fmt)
    if names is not None:
        for role, col in wanted.items():
            if col not in names:
                problems.append(f"{where}.{role}: column '{col}' not found; columns are: {', '.join(map(str, names))}")
    return problems


def problems(config: Config, plugins: Any = None, output_dir: str | Path | None = None) -> list[str | PolydistillError]:
    """Every problem with the run's inputs that can be seen without loading a model, each naming its field
    (a plugin's own error as it raised it)."""
    from polydistill import plugins as P

    found: list[str | PolydistillError] = []
    for field, value, kind in _model_fields(config):
        problem = _check_model(config, field, value, kind)
        if problem:
            found.append(problem)
    for i, s in enumerate(config.data.train):
        found += _check_source(config, f"data.train[{i}]", s, evaluation=False)
    for i, s in enumerate(config.data.eval):
        found += _check_source(config, f"data.eval[{i}]", s, evaluation=True)
    for field, value in (("output_dir", str(output_dir or config.output_dir)), ("cache.dir", config.cache.dir if config.cache.enabled else None)):
        if value:
            path = Path(value).expanduser()
            blocker = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
            if blocker is not None:
                found.append(f"{field}: {blocker} is a file; {field} must be a folder (or a path to create one)")
    given = dict(plugins or ())
    installed = P.installed_plugins()
    for name, options in P.enabled_plugins(config.plugins, {**installed, **{n: None for n in given}} if given else installed):
        try:
            obj = given[name] if name in given else P.load_plugin_object(name, installed)
            P.validate_settings(name, obj, options)
        except PolydistillError as exc:  # already names the plugin
            found.append(exc)
    return found


def check(config: Config, plugins: Any = None, origin: str = "config", output_dir: str | Path | None = None) -> None:
    """Raise one :class:`ConfigError` listing every problem :func:`problems` finds."""
    found = problems(config, plugins, output_dir)
    if len(found) == 1:
        if isinstance(found[0], PolydistillError):
            raise found[0]
        raise ConfigError(f"{origin}: {found[0]}")
    if found:
        lines = "\n".join(f"  - {p}" for p in found)
        raise ConfigError(f"{origin}: {len(found)} problems found before loading any model:\n{lines}")
