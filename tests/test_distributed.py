"""Two processes through torch.distributed on CPU: the same loop, sharded data, one saved student."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import yaml

from conftest import parallel_config


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun not on PATH")
def test_two_processes_shard_batches_and_train_plugin_modules(models, data, tmp_path):
    # hidden-state matching between different widths adds kd's projection modules (outside DDP)
    cfg = parallel_config(models, data, tmp_path, mode="same", training__epochs=2,
                          plugins={"kd": {"hidden": 1.0}})
    cfg["data"]["train"]["columns"] = {"text": "de", "lang": "lang"}
    cfg["teachers"] = [{"model": str(models["wide"])}]
    cfg["student"] = {"model": str(models["teacher2"])}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        ["torchrun", "--nproc_per_node", "2", "--master_port", "29533", "-m", "polydistill", "train", str(path)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("student saved to") == 1
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # 12 rows, batch 4: 3 batches an epoch, 1 per process after sharding (the odd one is dropped)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    assert {"loss/kl", "loss/hidden"} <= set(rows[0])
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()
