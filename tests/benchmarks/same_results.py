"""Same results across a refactor: train tiny configs of every task and plugin path and compare bit for bit.

Runs 13 two-epoch trainings on the tiny models of polydistill.testing (three tasks with
and without the teacher cache, multi_teacher fusions, adaptive temperatures and weights,
per-layer kd terms, two token teachers) with whichever polydistill is importable, and
writes every logged loss and the final metrics as JSON. Compare two such files:

    git worktree add /tmp/old REV
    PYTHONPATH=/tmp/old/core:/tmp/old/plugins python tests/benchmarks/same_results.py /tmp/same/old --out /tmp/same/old.json
    python tests/benchmarks/same_results.py /tmp/same/new --out /tmp/same/new.json
    python tests/benchmarks/same_results.py --compare /tmp/same/old.json /tmp/same/new.json

About 15 s per side on two CPU cores.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path


def runs(root: Path) -> dict:
    import torch

    import polydistill
    from polydistill.testing import build_tiny_models, tiny_config, write_tiny_data

    torch.set_num_threads(2)
    if not (root / "models").exists():
        (root / "data").mkdir(parents=True, exist_ok=True)
        build_tiny_models(root / "models")
        write_tiny_data(root / "data")
    models = {p.name: p for p in (root / "models").iterdir()}
    data = {p.stem: p for p in (root / "data").iterdir()}
    out = {}

    def run(name: str, task: str, **fields) -> None:
        where = root / "runs" / name
        shutil.rmtree(where, ignore_errors=True)
        result = polydistill.train(tiny_config(models, data, where, task, training__epochs=2, **fields))
        out[name] = {"metrics": result.metrics,
                     "losses": [{k: v for k, v in row.items() if k.startswith("loss")} for row in result.history if "loss" in row]}

    for task in ("sequence_classification", "token_classification", "embedding"):
        run(task, task)
        run(f"{task}-cache", task, cache={"enabled": True, "dir": str(root / "cache" / task)})
    two = [{"model": str(models["teacher"]), "name": "a"}, {"model": str(models["teacher2"]), "name": "b"}]
    for fusion, extra in (("mean", {}), ("weights", {"weights": {"a": 3, "b": 1}}), ("confidence", {}),
                          ("gate", {"gate_objective": "student_kl"})):
        run(f"multi-{fusion}", "sequence_classification", teachers=two, plugins={"multi_teacher": {"fusion": fusion, **extra}})
    run("adaptive", "sequence_classification", plugins={"adaptive_temperature": {"per_sample": "flsw", "weighting": "cwsm_weight"}})
    run("kd-per-layer", "token_classification", plugins={"kd": {"hidden": 0.5, "attention": 0.5}})
    run("tokens-two-teachers", "token_classification",
        teachers=[{"model": str(models["tagger"]), "name": "a"}, {"model": str(models["tagger"]), "name": "b"}])
    return out


def compare(a: dict, b: dict) -> bool:
    same = True
    for name in sorted(set(a) | set(b)):
        if a.get(name) == b.get(name):
            print(f"{name}: identical")
            continue
        same = False
        print(f"{name}: DIFFERENT (old {a.get(name, {}).get('metrics', {}).get('average')}, "
              f"new {b.get(name, {}).get('metrics', {}).get('average')})")
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", nargs="?", type=Path, help="scratch folder for models, data and runs")
    parser.add_argument("--out", type=Path, help="where to write the results JSON")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("OLD", "NEW"), help="compare two results files")
    args = parser.parse_args()
    if args.compare:
        old, new = (json.loads(p.read_text()) for p in args.compare)
        return 0 if compare(old, new) else 1
    if args.root is None or args.out is None:
        parser.error("give ROOT and --out, or --compare OLD NEW")
    args.out.write_text(json.dumps(runs(args.root), indent=1, sort_keys=True))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
