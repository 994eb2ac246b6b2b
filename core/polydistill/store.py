"""Teacher-output stores built beforehand: sharded Arrow files in the ``datasets`` format, and the job that builds them.

``polydistill teacher-outputs build CONFIG`` runs the config's teachers over its
training data and writes, per teacher and way of reading it (the cache's key
prefix), a folder ``<cache.dir>/<prefix>/`` of ``store.json`` and
``shard-NNNNN-of-MMMMM.arrow`` files. Each row is one entry, keyed exactly like
the SQLite cache (``key``: the teacher's fingerprint, its reading settings and the
text), with the text it read (``text``), the output's ``shape`` and its ``values``.
``datasets.Dataset.from_file`` (or ``load_dataset("arrow", ...)``) reads a shard.

Shards are consecutive groups of the batches a single-process run's first epoch
reads, so every output is computed in the same sub-batch as the in-run cache
computes it, and a run trained from the store gets the same weights. Process
``p`` of ``P`` (``accelerate launch``, ``torchrun`` or Ray) builds the shards
``s`` with ``s % P == p``; a shard is written atomically once whole, so a killed
build, run again, goes on with the shards it lacks. A run with
``cache.backend: datasets`` reads the store, memory-mapped and read-only.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from polydistill.cache import entry_key, entry_prefix, identity
from polydistill.errors import ConfigError, DataError, warn

FORMAT = "polydistill-teacher-outputs"
VERSION = 1
#: Batches per shard unless ``--batches-per-shard`` says otherwise: enough shards to balance
#: a few processes, each small enough that a killed build loses little.
DEFAULT_SHARDS = 64


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}.arrow"


# --------------------------------------------------------------------------- reading


class ShardedStore:
    """One teacher's built outputs, memory-mapped: the read side of the cache interface (``lookup``, ``put_many``)."""

    def __init__(self, directory: str | Path, teacher_fingerprint: str, settings: dict[str, Any], dtype: str = "float32",
                 teacher: str = "teacher"):
        self.root = Path(directory).expanduser()
        self.prefix = entry_prefix(teacher_fingerprint, settings)
        self.path = self.root / self.prefix
        self.dtype = np.dtype(dtype)
        self.hits = 0
        self.misses = 0
        manifest = self.path / "store.json"
        if not manifest.is_file():
            raise ConfigError(_no_store(self.root, teacher, teacher_fingerprint, settings))
        self.info = json.loads(manifest.read_text(encoding="utf-8"))
        if self.info.get("dtype", "float32") != self.dtype.name:
            raise ConfigError(f"cache.dtype: the teacher-output store {self.path} holds {self.info.get('dtype')} values and "
                              f"this run asks for {self.dtype.name}; set cache.dtype: {self.info.get('dtype')} or rebuild it")
        count = int(self.info["shards"])
        self.files = [self.path / shard_name(i, count) for i in range(count)]
        missing = [f for f in self.files if not f.is_file()]
        if missing:
            warn(f"cache.dir: the teacher-output store {self.path} lacks {len(missing)} of its {count} shards (its build did not "
                 "finish: run `polydistill teacher-outputs build` again to complete it); the outputs they would hold are computed")
        self.files = [f for f in self.files if f.is_file()]
        self._shards: list[_Shard] | None = None
        self._keys: np.ndarray | None = None  # sorted, with the shard and row of each
        self._where: np.ndarray | None = None

    def _index(self) -> None:
        import pyarrow as pa

        shards, keys, where = [], [], []
        for s, path in enumerate(self.files):
            try:
                table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
                shards.append(_Shard(table))
            except (OSError, pa.ArrowInvalid) as exc:
                raise DataError(f"cache.dir: shard {path} of the teacher-output store is unreadable ({exc}); delete it and run "
                                "`polydistill teacher-outputs build` again to rebuild it") from None
            keys.append(_fixed_keys(table.column("key")))
            where.append(np.stack([np.full(table.num_rows, s, dtype=np.int64), np.arange(table.num_rows, dtype=np.int64)], 1))
        flat = np.concatenate(keys) if keys else np.zeros(0, dtype="S40")
        order = np.argsort(flat, kind="stable")
        self._shards, self._keys = shards, flat[order]
        self._where = np.concatenate(where)[order] if where else np.zeros((0, 2), dtype=np.int64)

    def __len__(self) -> int:
        if self._keys is None:
            self._index()
        return len(self._keys)

    def lookup(self, texts: Sequence[Any]) -> list[np.ndarray | None]:
        """The array of each text; None where the store does not hold it."""
        if self._keys is None:
            self._index()
        out: list[np.ndarray | None] = [None] * len(texts)
        if len(self._keys):
            wanted = np.array([entry_key(self.prefix, t) for t in texts], dtype="S40")
            pos = np.minimum(np.searchsorted(self._keys, wanted), len(self._keys) - 1)
            hit = self._keys[pos] == wanted
            for j in np.nonzero(hit)[0]:
                shard, row = self._where[pos[j]]
                out[j] = self._shards[shard].array(int(row), self.dtype)
        found = sum(a is not None for a in out)
        self.hits += found
        self.misses += len(out) - found
        return out

    def get_many(self, texts: Sequence[Any]) -> list[np.ndarray] | None:
        found = self.lookup(texts)
        return None if any(a is None for a in found) else found  # type: ignore[return-value]

    def put_many(self, texts: Sequence[Any], arrays: Sequence[np.ndarray]) -> None:
        """Nothing: a built store is read-only (many runs, on many machines, may read it at once)."""

    def close(self) -> None:
        self._shards = self._keys = self._where = None


def _fixed_keys(column: Any) -> np.ndarray:
    """A string column of 40-character hex keys as a NumPy ``S40`` array, without a Python loop."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if len(array) == 0:
        return np.zeros(0, dtype="S40")
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int32)[array.offset : array.offset + len(array) + 1]
    if not np.all(np.diff(offsets) == 40):
        raise DataError("cache.dir: a shard of the teacher-output store has malformed keys; rebuild it")
    data = array.buffers()[2]
    return np.frombuffer(data, dtype="S40", count=len(array), offset=int(offsets[0]))


class _Shard:
    """One shard's values and shapes as NumPy views of the memory-mapped Arrow buffers: a row is a slice, not a copy."""

    def __init__(self, table: Any):
        values = table.column("values").combine_chunks()
        shapes = table.column("shape").combine_chunks()
        self.values = values.values.to_numpy(zero_copy_only=False)
        self.offsets = values.offsets.to_numpy()
        self.dims = shapes.values.to_numpy(zero_copy_only=False)
        self.dim_offsets = shapes.offsets.to_numpy()

    def array(self, row: int, dtype: np.dtype) -> np.ndarray:
        shape = self.dims[self.dim_offsets[row] : self.dim_offsets[row + 1]]
        return self.values[self.offsets[row] : self.offsets[row + 1]].astype(dtype, copy=False).reshape(shape)


def _no_store(root: Path, teacher: str, fp: str, settings: dict[str, Any]) -> str:
    """Why ``root`` has no store for this teacher: none built, or built for other weights or reading settings."""
    others = []
    for manifest in sorted(root.glob("*/store.json")) if root.is_dir() else []:
        try:
            info = json.loads(manifest.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if info.get("format") == FORMAT:
            others.append(info)
    fix = "build it with `polydistill teacher-outputs build CONFIG` (the same config as this run)"
    if not others:
        return f"cache.dir: {root} holds no teacher-output store (backend 'datasets'); {fix}"
    near = [o for o in others if o.get("fingerprint") == fp]
    if near:
        diff = sorted({k for o in near for k in set(o.get("settings", {})) | set(settings)
                       if o.get("settings", {}).get(k) != settings.get(k)})
        return (f"cache.dir: the teacher-output store {root} holds teacher '{teacher}' read with other settings "
                f"({', '.join(diff)} differ from this run's); {fix}")
    return (f"cache.dir: the teacher-output store {root} holds {len(others)} teacher(s), none with the weights of teacher "
            f"'{teacher}' (fingerprint {fp[:12]}); {fix}")


# --------------------------------------------------------------------------- building


@dataclass
class BuildResult:
    """What one process of a build did."""

    directory: Path
    shards: int
    built: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)
    rows: int = 0
    seconds: float = 0.0


def build(config: Any, out: str | Path | None = None, *, batches_per_shard: int | None = None, process_index: int | None = None,
          num_processes: int | None = None, progress: bool = True, stop_after: int | None = None,
          encoder: tuple[Any, Any] | None = None) -> BuildResult:
    """Build (or complete) the teacher-output store of ``config``'s teachers over its training data
    (a multi-task config: each task's, one after the other; the result adds theirs up).

    ``out``: the store's directory (default ``cache.dir``). Without ``process_index``/``num_processes``
    they come from the launch (``accelerate launch``, ``torchrun``), else 0 of 1. ``stop_after``:
    build at most this many shards in this process (to split a build over separate jobs).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import send_to_device

    from polydistill import build as B
    from polydistill import preflight
    from polydistill.config import load_config
    from polydistill.multitask import MultiTaskConfig
    from polydistill.plugins import PluginHost
    from polydistill.state import TrainState
    from polydistill.tasks import get_task
    from polydistill.teachers import TeacherRunner

    config = load_config(config)
    if isinstance(config, MultiTaskConfig):  # each task's teachers into the one store (their entries' prefixes differ)
        _, _, student, student_tok, _ = B.models(config.tasks[config.builder])  # batches are cut by its tokenizer
        done = [build(c, out, batches_per_shard=batches_per_shard, process_index=process_index, num_processes=num_processes,
                      progress=progress, stop_after=stop_after, encoder=None if name == config.builder else (student, student_tok))
                for name, c in config.tasks.items() if c.teachers and c.data.train]
        return BuildResult(done[0].directory if done else Path(out or config.cache.dir or ""), sum(d.shards for d in done),
                           [i for d in done for i in d.built], [i for d in done for i in d.skipped],
                           sum(d.rows for d in done), sum(d.seconds for d in done))
    cc, dc, task = config.cache, config.data, get_task(config.task)
    directory = Path(out or cc.dir or "").expanduser()
    if not (out or cc.dir):
        raise ConfigError("cache.dir: give the store's directory (or --out) to build teacher outputs into")
    if not config.teachers:
        raise ConfigError("teachers: the config has no teacher to build outputs of")
    if not dc.train:
        raise ConfigError("data.train: the config has no training data to build teacher outputs for")
    if any(s.streaming for s in dc.train):
        raise ConfigError("data.train: a streamed source cannot be built into a store (its batches are not known in advance); "
                          "load it without `streaming` (datasets memory-maps it, so a large corpus still fits)")
    if task.cache_needs_top_k and cc.top_k is None:
        raise ConfigError(f"cache.top_k: teacher outputs of {task.name} are a distribution over the vocabulary per token; "
                          "set cache.top_k (and cache.top_k_method) to store the top_k of each")
    preflight.check(config, (), output_dir=None)
    if config.training.num_threads:
        torch.set_num_threads(config.training.num_threads)
    B.fresh_accelerate_state()
    acc = Accelerator(mixed_precision=config.training.mixed_precision)
    p = acc.process_index if process_index is None else process_index
    n = acc.num_processes if num_processes is None else num_processes
    if not 0 <= p < n:
        raise ConfigError(f"process {p} of {n}: the process index must be below the number of processes")

    teachers, teacher_toks, student, student_tok, labels = B.models(config, encoder)
    data = B.pipeline(config, student, student_tok, teacher_toks, labels)
    plan = data.loader.batches(0)  # the batches of a single-process run's first epoch
    if not plan:
        raise DataError("data.train: no rows to build teacher outputs for")
    per_shard = batches_per_shard or max(1, -(-len(plan) // DEFAULT_SHARDS))
    count = -(-len(plan) // per_shard)

    identities = [identity(config, t, tok) for t, tok in zip(teachers, teacher_toks)]
    prefixes = [entry_prefix(fp, settings) for fp, settings, _ in identities]
    manifest = {
        "format": FORMAT, "version": VERSION, "shards": count, "batches_per_shard": per_shard, "batches": len(plan),
        "rows": int(sum(len(b) for b in plan)), "data_fingerprint": getattr(data.train, "_fingerprint", None),
        "batch_size": dc.batch_size, "seed": config.training.seed, "shuffle": dc.shuffle, "length_grouping": dc.length_grouping,
    }
    for name, (fp, settings, dtype), prefix in zip(config.teacher_names(), identities, prefixes):
        folder = directory / prefix
        info = {**manifest, "teacher": name, "fingerprint": fp, "settings": settings, "dtype": dtype}
        existing = folder / "store.json"
        if existing.is_file():
            old = json.loads(existing.read_text(encoding="utf-8"))
            changed = [k for k in manifest if k != "data_fingerprint" and old.get(k) != info.get(k)]
            if changed:
                shown = "; ".join(f"{k}: {old.get(k)!r} there, {info.get(k)!r} now" for k in changed)
                raise ConfigError(f"{folder}: a store built with another batch plan is there ({shown}); delete the folder "
                                  "to rebuild it, or build into another cache.dir")
            if old.get("data_fingerprint") and info["data_fingerprint"] and old["data_fingerprint"] != info["data_fingerprint"]:
                warn(f"{folder}: the training data changed since this store's build began; its finished shards hold "
                     "outputs for the data as it was (entries are keyed by text, so none is wrong, some may be missing)")
        else:
            folder.mkdir(parents=True, exist_ok=True)
            # every process writes the same manifest, each through a file of its own
            tmp = existing.with_name(f".store.json.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
            os.replace(tmp, existing)

    state = TrainState(
        config=config, accelerator=acc, student=student, teachers=[t.to(acc.device) for t in teachers],
        teacher_names=config.teacher_names(), student_tokenizer=data.student_tokenizer, teacher_tokenizers=teacher_toks,
        labels=labels, plugins=PluginHost([]), output_dir=directory,
    )
    top_k = cc.top_k if task.cache_needs_top_k else None
    runner = TeacherRunner(state, [None] * len(teachers), top_k, bool(top_k) and cc.top_k_method == "sample")

    mine = [s for s in range(count) if s % n == p]
    done = [s for s in mine if all((directory / prefix / shard_name(s, count)).is_file() for prefix in prefixes)]
    todo = [s for s in mine if s not in done][: stop_after if stop_after is not None else None]
    result = BuildResult(directory, count, skipped=done)
    who = f"[process {p} of {n}] " if n > 1 else ""
    print(f"{who}teacher outputs -> {directory}: {count} shards of {per_shard} batches; this process builds "
          f"{len(todo)}, {len(done)} already built", flush=True)
    if not todo:
        return result

    first = _first_occurrences(data.train, data.collator, plan)
    starts = np.cumsum([0] + [len(b) for b in plan])
    start = time.perf_counter()
    from polydistill.loop import _progress

    bar = _progress(bool(progress and todo), len(todo), 0, f"{who}teacher outputs", "shard")
    for s in todo:
        t0 = time.perf_counter()
        columns: list[dict[str, list[Any]]] = [{"key": [], "text": [], "shape": [], "values": []} for _ in teachers]
        for b in range(s * per_shard, min((s + 1) * per_shard, len(plan))):
            rows = np.nonzero(first[starts[b] : starts[b + 1]])[0].tolist()
            if not rows:  # every text of this batch was read by an earlier one: the in-run cache computes nothing here
                continue
            idx = plan[b]
            raw = data.train[idx.tolist()]
            raw["__index__"] = idx.tolist()
            batch = send_to_device(data.collator(raw), acc.device)
            entries = TeacherRunner.entries(batch)
            for i, cols in enumerate(columns):
                arrays = runner.compute(i, batch, rows)
                for j, a in zip(rows, arrays):
                    cols["key"].append(entry_key(prefixes[i], entries[j]))
                    cols["text"].append(entries[j] if isinstance(entries[j], str) else json.dumps(entries[j], ensure_ascii=False))
                    cols["shape"].append(list(a.shape))
                    cols["values"].append(np.ascontiguousarray(a, dtype=identities[i][2]).reshape(-1))
        for prefix, cols in zip(prefixes, columns):
            _write_shard(directory / prefix / shard_name(s, count), cols)
        made = len(columns[0]["key"])
        result.built.append(s)
        result.rows += made
        took = time.perf_counter() - t0
        bar.update(1)
        bar.set_postfix({"rows": result.rows, "rows/s": f"{made / max(took, 1e-9):.0f}"}, refresh=False)
        if not progress:
            print(f"{who}shard {s + 1} of {count}: {made} outputs in {took:.1f} s", flush=True)
    bar.close()
    result.seconds = time.perf_counter() - start
    print(f"{who}built {len(result.built)} shards, {result.rows} outputs per teacher in {result.seconds:.1f} s "
          f"({result.rows / max(result.seconds, 1e-9):.0f} per second)", flush=True)
    return result


def status(directory: str | Path) -> list[dict[str, Any]]:
    """Each store in ``directory``: its teacher, settings and how many of its shards are built."""
    root = Path(directory).expanduser()
    out = []
    for manifest in sorted(root.glob("*/store.json")) if root.is_dir() else []:
        info = json.loads(manifest.read_text(encoding="utf-8"))
        if info.get("format") != FORMAT:
            continue
        built = sum((manifest.parent / shard_name(i, info["shards"])).is_file() for i in range(info["shards"]))
        out.append({"folder": str(manifest.parent), "teacher": info.get("teacher"), "fingerprint": info.get("fingerprint"),
                    "settings": info.get("settings"), "dtype": info.get("dtype"), "shards": info["shards"], "built": built,
                    "rows": info.get("rows")})
    return out


def _first_occurrences(dataset: Any, collator: Any, plan: list[np.ndarray]) -> np.ndarray:
    """Per position of the epoch's batch order: True where its entry is read for the first time in the epoch
    (the in-run cache computes exactly those, each in its batch)."""
    import hashlib

    from polydistill.teachers import entries_of

    n = len(dataset)
    hashes = np.zeros(n, dtype=np.uint64)
    names = set(dataset.column_names)
    wanted = [c for c in ("text", "context", "source", "target") if c in names]
    chunk = 50_000
    for start in range(0, n, chunk):
        rows = dataset.select_columns(wanted)[start : start + chunk]
        teacher_texts = rows["source"] if collator.parallel else collator.texts(rows)
        for k, e in enumerate(entries_of(teacher_texts, rows.get("target"))):
            digest = hashlib.sha1(json.dumps(e, ensure_ascii=False).encode()).digest()
            hashes[start + k] = int.from_bytes(digest[:8], "little")
    order = np.concatenate(plan)
    _, first = np.unique(hashes[order], return_index=True)
    flags = np.zeros(len(order), dtype=bool)
    flags[first] = True
    return flags


def _write_shard(path: Path, cols: dict[str, list[Any]]) -> None:
    import pyarrow as pa

    flat = np.concatenate(cols["values"]) if cols["values"] else np.zeros(0, dtype=np.float32)
    offsets = np.cumsum([0] + [len(v) for v in cols["values"]], dtype=np.int64)
    table = pa.table({
        "key": pa.array(cols["key"], pa.string()),
        "text": pa.array(cols["text"], pa.string()),
        "shape": pa.array(cols["shape"], pa.list_(pa.int32())),
        "values": pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(flat)),
    })
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
