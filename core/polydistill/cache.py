"""Teacher-output cache: sequence-level teacher outputs on disk, keyed by input text.

An entry's key hashes the teacher's fingerprint (its weights and config), the
task, pooling, maximum length and the exact text the teacher reads, so changed
or augmented text, or a changed teacher, never hits a stale entry.

Writes are SQLite transactions (WAL), so a killed run leaves whole entries or
none. Each entry carries a CRC-32 of its bytes: an entry that fails it is
dropped with a warning and recomputed; a database file that is not one is
moved aside and replaced; a cache that cannot be written (disk full) is
switched off for the run with a warning. The cache never stops training.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import time
import zlib
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from polydistill.errors import warn


def fingerprint(model: torch.nn.Module) -> str:
    """A hash of a model's config and weights."""
    h = hashlib.sha1()
    config = model.config.to_dict()
    config.pop("_name_or_path", None)  # where it was loaded from, not what it computes
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


#: The public name (``polydistill.teacher_fingerprint``, API 1.2).
teacher_fingerprint = fingerprint


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what a fast tokenizer computes."""
    from polydistill.data import tokenizer_spec

    return hashlib.sha1(json.dumps(tokenizer_spec(tokenizer), sort_keys=True).encode()).hexdigest()


def read_settings(task: str, pooling: str, max_length: int, mixed_precision: str, tokenizer: Any, top_k: int | None = None,
                  top_k_method: str = "top") -> dict[str, Any]:
    """Everything besides the teacher's weights and the text that changes what the teacher outputs."""
    settings = {
        "task": task,
        "pooling": pooling,
        "max_length": max_length,
        "mixed_precision": mixed_precision,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    if top_k is not None:  # only in the key of what it changes, so other tasks' entries keep theirs
        settings["top_k"] = top_k
        if top_k_method != "top":
            settings["top_k_method"] = top_k_method
    return settings


def entry_prefix(teacher_fingerprint: str, settings: dict[str, Any]) -> str:
    """What every key of one teacher read one way starts from (also the folder name of its built store)."""
    return hashlib.sha1((teacher_fingerprint + json.dumps(settings, sort_keys=True)).encode()).hexdigest()


def entry_key(prefix: str, entry: Any) -> str:
    """The key of one entry (a text, a word list, a text-target pair) under ``prefix``."""
    return hashlib.sha1((prefix + json.dumps(entry, ensure_ascii=False)).encode()).hexdigest()


def identity(config: Any, teacher: torch.nn.Module, tokenizer: Any, teacher_fingerprint: str | None = None) -> tuple[str, dict[str, Any], str]:
    """A teacher's fingerprint (computed unless given), the settings it is read with and the storage dtype, as ``config`` asks."""
    from polydistill.tasks import get_task

    cc = config.cache
    top_k = cc.top_k if get_task(config.task).cache_needs_top_k else None
    settings = read_settings(config.task, config.pooling, config.data.max_length, config.training.mixed_precision,
                             tokenizer, top_k, cc.top_k_method if top_k else "top")
    return teacher_fingerprint or fingerprint(teacher), settings, "float32" if top_k else cc.dtype  # token ids must stay exact


def default_dir() -> Path:
    return Path.home() / ".cache" / "polydistill" / "teacher-outputs"


def open_cache(config: Any, teacher: torch.nn.Module, tokenizer: Any, name: str, teacher_fingerprint: str | None = None) -> Any:
    """The teacher-output store ``config.cache`` names for one teacher: the SQLite cache, or a built store (read-only)."""
    fp, settings, dtype = identity(config, teacher, tokenizer, teacher_fingerprint)
    cc = config.cache
    if cc.backend == "datasets":
        from polydistill.store import ShardedStore

        return ShardedStore(cc.dir, fp, settings, dtype, name)
    return TeacherCache(Path(cc.dir).expanduser() if cc.dir else default_dir(), fp, settings, dtype)


class TeacherCache:
    """A SQLite table of float arrays for one teacher and one way of reading it."""

    def __init__(self, directory: str | Path, teacher_fingerprint: str, settings: dict[str, Any], dtype: str = "float32"):
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = entry_prefix(teacher_fingerprint, settings)
        self.dtype = np.dtype(dtype)
        self.path = self.directory / "teacher-outputs.sqlite"
        self.db: sqlite3.Connection | None = None
        self.hits = 0
        self.misses = 0
        try:
            self.db = self._open()
        except sqlite3.DatabaseError as exc:
            aside = self.path.with_name(f"{self.path.name}.corrupt-{int(time.time())}")
            warn(f"teacher cache {self.path} is unreadable ({exc}); moved aside to {aside.name}, starting an empty cache")
            for suffix in ("", "-wal", "-shm"):
                side = Path(f"{self.path}{suffix}")
                if side.exists():
                    os.replace(side, f"{aside}{suffix}")
            self.db = self._open()

    def _open(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS outputs (key TEXT PRIMARY KEY, shape TEXT, data BLOB, crc INTEGER)")
            if "crc" not in [row[1] for row in db.execute("PRAGMA table_info(outputs)")]:
                try:  # a cache written before entries had checksums
                    db.execute("ALTER TABLE outputs ADD COLUMN crc INTEGER")
                except sqlite3.OperationalError:  # another process added it first
                    pass
        except BaseException:
            db.close()
            raise
        return db

    def _disable(self, what: str, exc: Exception) -> None:
        warn(f"teacher cache {self.path}: {what} failed ({exc}); the run goes on without the cache")
        if self.db is not None:
            self.db.close()
        self.db = None

    def key(self, text: Any) -> str:
        return entry_key(self.prefix, text)

    def _decode(self, key: str, shape: str, data: bytes, crc: int | None) -> np.ndarray | None:
        """The entry's array, or None (with a warning) when its bytes do not match its shape or checksum."""
        try:
            dims = json.loads(shape)
            array = np.frombuffer(data, dtype=self.dtype).reshape(dims)
            if crc is not None and zlib.crc32(data) != crc:
                raise ValueError("checksum mismatch")
        except (ValueError, TypeError) as exc:
            warn(f"teacher cache {self.path}: corrupt entry {key[:12]} ({exc}); dropped, the teacher output is recomputed")
            return None
        return array

    def lookup(self, texts: Sequence[Any]) -> list[np.ndarray | None]:
        """The array of each text; None where it is not cached (or corrupt, or the cache is off)."""
        if self.db is None:
            return [None] * len(texts)
        keys = [self.key(t) for t in texts]
        found: dict[str, np.ndarray] = {}
        corrupt: list[str] = []
        try:
            for start in range(0, len(keys), 500):
                part = keys[start : start + 500]
                rows = self.db.execute(
                    f"SELECT key, shape, data, crc FROM outputs WHERE key IN ({','.join('?' * len(part))})", part
                ).fetchall()
                for key, shape, data, crc in rows:
                    array = self._decode(key, shape, data, crc)
                    if array is None:
                        corrupt.append(key)
                    else:
                        found[key] = array
            if corrupt:
                with self.db:
                    self.db.executemany("DELETE FROM outputs WHERE key = ?", [(k,) for k in corrupt])
        except sqlite3.DatabaseError as exc:
            self._disable("reading", exc)
            return [None] * len(texts)
        out = [found.get(k) for k in keys]
        hits = sum(a is not None for a in out)
        self.hits += hits
        self.misses += len(out) - hits
        return out

    def get_many(self, texts: Sequence[Any]) -> list[np.ndarray] | None:
        """All arrays for ``texts``, or None if any is missing."""
        found = self.lookup(texts)
        return None if any(a is None for a in found) else found  # type: ignore[return-value]

    def put_many(self, texts: Sequence[Any], arrays: Sequence[np.ndarray]) -> None:
        if self.db is None:
            return
        rows = []
        for text, arr in zip(texts, arrays):
            a = np.ascontiguousarray(arr, dtype=self.dtype)
            data = a.tobytes()
            rows.append((self.key(text), json.dumps(list(a.shape)), data, zlib.crc32(data)))
        try:
            with self.db:
                self.db.executemany("INSERT OR REPLACE INTO outputs (key, shape, data, crc) VALUES (?, ?, ?, ?)", rows)
        except sqlite3.DatabaseError as exc:  # "database or disk is full" is an OperationalError, a DatabaseError
            self._disable("writing", exc)

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None


def stack_padded(arrays: list[np.ndarray], device: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack cached arrays, padding word-level ones ``(W_i, C)`` to the longest."""
    if arrays[0].ndim == 2:
        width = max(a.shape[0] for a in arrays)
        out = np.zeros((len(arrays), width, arrays[0].shape[1]), dtype=np.float32)
        for i, a in enumerate(arrays):
            out[i, : a.shape[0]] = a
        return torch.from_numpy(out).to(device=device, dtype=dtype)
    return torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False)).to(device=device, dtype=dtype)
