"""Atomic, verifiable checkpoints: accelerate's state (models, optimizer, RNG) plus polydistill's own.

A checkpoint is built in a temporary folder, its files synced, a manifest of
their sizes and SHA-256 written last, and the folder renamed into place. On
resume, a checkpoint whose files are missing, truncated or changed is skipped
with a warning in favour of the one before it.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

import torch

from polydistill.errors import CheckpointError

LATEST = "latest"
EXTRA = "polydistill_state.pt"
MANIFEST = "manifest.json"


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write through a synced temporary file and a rename: readers see the old file or the new one."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)


def _step(path: Path) -> int:
    try:
        return int(path.name.split("-", 1)[1])
    except (IndexError, ValueError):
        return -1


def save(accelerator: Any, root: Path, step: int, extra: dict[str, Any], keep: int) -> Path:
    """Write ``root/checkpoint-<step>`` atomically: built in a temp dir, then renamed.

    ``root/latest`` names the newest complete checkpoint; a crash or a full disk
    mid-write leaves the previous one in place (the temp dir is removed and a
    :class:`CheckpointError` names the path). Only the newest ``keep`` are kept.
    """
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    try:
        root.mkdir(parents=True, exist_ok=True)
        if accelerator.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp), safe_serialization=True)
        if accelerator.is_main_process:
            torch.save(extra, tmp / EXTRA)
            manifest = {}
            for f in _files(tmp):
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
                manifest[f.relative_to(tmp).as_posix()] = {"size": f.stat().st_size, "sha256": _sha256(f)}
            write_atomic(tmp / MANIFEST, json.dumps({"step": step, "files": manifest}, indent=1) + "\n")
            _fsync_dir(tmp)
            # Re-saving a step (a resumed run's end) moves the old copy aside first, so that
            # some complete checkpoint-<step> exists at every moment.
            old = root / f".old-checkpoint-{step}"
            if final.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)
            _fsync_dir(root)
            write_atomic(root / LATEST, final.name)
            shutil.rmtree(old, ignore_errors=True)
            # Pruned first: later-numbered leftovers of an abandoned past (the run resumed from
            # an earlier checkpoint), then the oldest.
            ckpts = sorted((p for p in root.glob("checkpoint-*") if p.is_dir() and p != final),
                           key=lambda p: (_step(p) < step, _step(p)))
            for stale in ckpts[: max(0, len(ckpts) + 1 - keep)]:
                shutil.rmtree(stale, ignore_errors=True)
    except KeyboardInterrupt:  # a second Ctrl-C mid-write: no half-written folder is left behind
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    except OSError as exc:
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest(root)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"disk full while writing checkpoint {final}{kept}; free space, then resume") from exc
        raise CheckpointError(f"cannot write checkpoint {final}: {exc.strerror or exc}{kept}") from exc
    accelerator.wait_for_everyone()
    return final


def latest(root: Path) -> Path | None:
    """The checkpoint ``root/latest`` names, if it exists."""
    pointer = root / LATEST
    try:
        candidate = root / pointer.read_text().strip()
    except OSError:
        return None
    return candidate if candidate.is_dir() and candidate.name else None


def is_checkpoint(path: Path) -> bool:
    return (path / EXTRA).is_file() or (path / MANIFEST).is_file()


def candidates(path: Path) -> list[Path]:
    """Checkpoints to try, best first: ``path`` itself, or its run's ``latest`` and then older ones."""
    path = Path(path)
    if is_checkpoint(path):
        return [path]
    for root in (path / "checkpoints", path):
        found = sorted((p for p in root.glob("checkpoint-*") if p.is_dir()), key=_step, reverse=True)
        head = latest(root)
        if head is not None:
            # A run resumed from an earlier checkpoint may leave later-numbered ones of its
            # abandoned past: never fall back to those.
            found = [head] + [p for p in found if p != head and _step(p) < _step(head)]
        if found:
            return found
    return []


def verify(checkpoint: Path) -> str | None:
    """What is wrong with ``checkpoint`` (a missing, truncated or changed file), or None.

    A checkpoint written before manifests existed is only checked for its state file.
    """
    manifest_path = checkpoint / MANIFEST
    if not manifest_path.is_file():
        return None if (checkpoint / EXTRA).is_file() else f"{EXTRA} and {MANIFEST} are missing"
    try:
        files = json.loads(manifest_path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    for name, meta in files.items():
        f = checkpoint / name
        if not f.is_file():
            return f"{name} is missing"
        size = f.stat().st_size
        if size != meta["size"]:
            return f"{name} is truncated or changed ({size} bytes, the manifest says {meta['size']})"
        if _sha256(f) != meta["sha256"]:
            return f"{name} is corrupt (its SHA-256 differs from the manifest's)"
    return None


def find(path: Path) -> Path | None:
    """The checkpoint a resume from ``path`` would use: the first candidate that verifies."""
    return next((c for c in candidates(path) if verify(c) is None), None)


def load_extra(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / EXTRA, map_location="cpu", weights_only=False)


def tidy(value: Any) -> Any:
    """Floats (in nested dicts and lists) to 10 significant digits: 0.0575, not 0.057499999999999996."""
    if isinstance(value, float):
        return float(f"{value:.10g}") if math.isfinite(value) else value
    if isinstance(value, dict):
        return {k: tidy(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [tidy(v) for v in value]
    return value


def dump_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
