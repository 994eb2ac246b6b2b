"""GPU check of sharded training (FSDP2, DeepSpeed ZeRO-2 student + ZeRO-3 teacher); needs CUDA, not run by CI.

accelerate runs FSDP and DeepSpeed on GPUs only, so the CPU test suite cannot cover them.
This script trains the tiny classification run of polydistill.testing four ways on the
GPUs it finds (--gpus, default all) and checks what docs/scale.md promises:

  ddp        accelerate launch (plain data parallel): the reference
  fsdp       docs/examples/accelerate/fsdp.yaml, teachers sharded too (training.shard_teachers)
  fsdp-resume  the fsdp run continued from its step-6 checkpoint into a new directory: the
             same weights as fsdp uninterrupted (exact resume of sharded checkpoints)
  deepspeed  docs/examples/accelerate/ds_zero2.yaml + ds_zero3_teacher.json (if deepspeed is installed)

Each saved student must load with transformers and match the ddp one to 1e-3 (the engines
reduce in other orders). Results: docs/results/sharded-gpu.json.

    python tests/benchmarks/sharded_gpu_check.py
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "docs" / "examples" / "accelerate"


def launch(config: Path, gpus: int, cfg: Path, out: Path, *extra: str) -> None:
    cmd = ["accelerate", "launch", "--num_processes", str(gpus)]
    cmd += ["--config_file", str(config)] if config.name != "ddp" else ["--multi_gpu"] if gpus > 1 else []
    cmd += ["-m", "polydistill", "train", str(cfg), "--output-dir", str(out), *extra]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, env={**os.environ, "ACCELERATE_MIXED_PRECISION": "no"})


def main() -> None:
    import torch
    from safetensors.torch import load_file

    from polydistill.testing import build_tiny_models, tiny_config, write_tiny_data

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=torch.cuda.device_count())
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("no CUDA device: this check runs on GPUs only")
    work = Path(tempfile.mkdtemp(prefix="sharded-"))
    models = build_tiny_models(work / "models")
    (work / "data").mkdir()
    data = write_tiny_data(work / "data")
    cfg = tiny_config(models, data, work, training__epochs=4, training__checkpoint_every=2, training__keep_checkpoints=10,
                      training__mixed_precision="no")
    path = work / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    results: dict[str, object] = {"gpus": args.gpus, "device": torch.cuda.get_device_name(0)}
    runs = {"ddp": (Path("ddp"), []), "fsdp": (EXAMPLES / "fsdp.yaml", ["--set", "training.shard_teachers=true"])}
    if importlib.util.find_spec("deepspeed") is not None:
        runs["deepspeed"] = (EXAMPLES / "ds_zero2.yaml", ["--set", "training.shard_teachers=true", "--set",
                                                         f"training.teacher_deepspeed_config={EXAMPLES / 'ds_zero3_teacher.json'}"])
    else:
        results["deepspeed"] = "not installed"
    weights = {}
    for name, (config, extra) in runs.items():
        launch(config, args.gpus, path, work / name, *extra)
        weights[name] = load_file(str(work / name / "student" / "model.safetensors"))
    # the fsdp run continued from its step-6 checkpoint (12 steps in all: 12 rows, batch 4, 4 epochs)
    launch(EXAMPLES / "fsdp.yaml", args.gpus, path, work / "fsdp-resume", "--set", "training.shard_teachers=true",
           "--resume", str(work / "fsdp" / "checkpoints" / "checkpoint-6"))
    weights["fsdp-resume"] = load_file(str(work / "fsdp-resume" / "student" / "model.safetensors"))
    ref = weights["ddp"]
    for name, w in weights.items():
        diff = max(float((w[k].float() - ref[k].float()).abs().max()) for k in ref)
        results[name] = {"max_abs_diff_vs_ddp": diff, "ok": diff < 1e-3}
    results["fsdp-resume"]["same_as_fsdp"] = all(torch.equal(weights["fsdp-resume"][k], weights["fsdp"][k]) for k in ref)
    out = ROOT / "docs" / "results" / "sharded-gpu.json"
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
