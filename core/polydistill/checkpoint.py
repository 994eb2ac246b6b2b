"""Atomic checkpoints: accelerate's state (models, optimizer, RNG) plus polydistill's own."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch

LATEST = "latest"
EXTRA = "polydistill_state.pt"


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
    with open(tmp, "wb") as f:
        f.write(data.encode("utf-8") if isinstance(data, str) else data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save(accelerator: Any, root: Path, step: int, extra: dict[str, Any], keep: int) -> Path:
    """Write ``root/checkpoint-<step>`` atomically: built in a temp dir, then renamed.

    ``root/latest`` names the newest complete checkpoint; a crash mid-write
    leaves the previous one in place. Only the newest ``keep`` are kept.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"checkpoint-{step}"
    tmp = root / f".tmp-checkpoint-{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp), safe_serialization=True)
    if accelerator.is_main_process:
        torch.save(extra, tmp / EXTRA)
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb+") as fh:
                    os.fsync(fh.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(root)
        write_atomic(root / LATEST, final.name)
        ckpts = sorted((p for p in root.glob("checkpoint-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
        for old in ckpts[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def find(path: Path) -> Path | None:
    """The checkpoint to resume from: ``path`` itself, or its run's latest."""
    path = Path(path)
    if (path / EXTRA).is_file():
        return path
    for root in (path / "checkpoints", path):
        pointer = root / LATEST
        if pointer.is_file():
            candidate = root / pointer.read_text().strip()
            if (candidate / EXTRA).is_file():
                return candidate
    return None


def load_extra(checkpoint: Path) -> dict[str, Any]:
    return torch.load(checkpoint / EXTRA, map_location="cpu", weights_only=False)


def dump_json(path: Path, data: Any) -> None:
    write_atomic(path, json.dumps(data, indent=2, ensure_ascii=False, default=str) + "\n")
