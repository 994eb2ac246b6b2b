"""Teacher-output cache: sequence-level teacher outputs on disk, keyed by input text.

An entry's key hashes the teacher's fingerprint (its weights and config), the
task, pooling, maximum length and the exact text the teacher reads, so changed
or augmented text, or a changed teacher, never hits a stale entry.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch


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


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of what a fast tokenizer computes."""
    from polydistill.data import tokenizer_spec

    return hashlib.sha1(json.dumps(tokenizer_spec(tokenizer), sort_keys=True).encode()).hexdigest()


def read_settings(config: Any, tokenizer: Any) -> dict[str, Any]:
    """Everything besides the teacher's weights and the text that changes what the teacher outputs."""
    return {
        "task": config.task,
        "pooling": config.pooling,
        "max_length": config.data.max_length,
        "mixed_precision": config.training.mixed_precision,
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


class TeacherCache:
    """A SQLite table of float arrays for one teacher and one way of reading it."""

    def __init__(self, directory: str | Path, teacher_fingerprint: str, settings: dict[str, Any], dtype: str = "float32"):
        self.directory = Path(directory).expanduser()
        self.directory.mkdir(parents=True, exist_ok=True)
        self.prefix = hashlib.sha1((teacher_fingerprint + json.dumps(settings, sort_keys=True)).encode()).hexdigest()
        self.dtype = np.dtype(dtype)
        self.path = self.directory / "teacher-outputs.sqlite"
        self.db = sqlite3.connect(self.path, timeout=60, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS outputs (key TEXT PRIMARY KEY, shape TEXT, data BLOB)")
        self.hits = 0
        self.misses = 0

    def key(self, text: Any) -> str:
        return hashlib.sha1((self.prefix + json.dumps(text, ensure_ascii=False)).encode()).hexdigest()

    def lookup(self, texts: Sequence[Any]) -> list[np.ndarray | None]:
        """The array of each text, None where it is not cached."""
        keys = [self.key(t) for t in texts]
        found: dict[str, np.ndarray] = {}
        for start in range(0, len(keys), 500):
            part = keys[start : start + 500]
            rows = self.db.execute(
                f"SELECT key, shape, data FROM outputs WHERE key IN ({','.join('?' * len(part))})", part
            ).fetchall()
            for key, shape, data in rows:
                found[key] = np.frombuffer(data, dtype=self.dtype).reshape(json.loads(shape))
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
        rows = []
        for text, arr in zip(texts, arrays):
            a = np.ascontiguousarray(arr, dtype=self.dtype)
            rows.append((self.key(text), json.dumps(list(a.shape)), a.tobytes()))
        with self.db:
            self.db.executemany("INSERT OR REPLACE INTO outputs VALUES (?, ?, ?)", rows)

    def close(self) -> None:
        self.db.close()


def stack_padded(arrays: list[np.ndarray], device: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Stack cached arrays, padding word-level ones ``(W_i, C)`` to the longest."""
    if arrays[0].ndim == 2:
        width = max(a.shape[0] for a in arrays)
        out = np.zeros((len(arrays), width, arrays[0].shape[1]), dtype=np.float32)
        for i, a in enumerate(arrays):
            out[i, : a.shape[0]] = a
        return torch.from_numpy(out).to(device=device, dtype=dtype)
    return torch.from_numpy(np.stack(arrays).astype(np.float32, copy=False)).to(device=device, dtype=dtype)
