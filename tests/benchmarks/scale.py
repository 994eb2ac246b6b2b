"""Scale: building teacher outputs with 1 and 2 processes vs the in-run cache, and a pruned search vs a full grid.

Part 1 (outputs): all-MiniLM-L6-v2 (English) embeds the English side of parallel pairs
(Tatoeba-Challenge + NTREX-128, --pairs per language for deu fra rus tur) for a 3-layer
embedding student. Measured on this machine, each in its own process, one at a time:
  in-run    `polydistill train` with the SQLite cache, cold (the teacher runs in the first
            epoch) minus warm (every output read back): the teacher's share of a run
  build-1   `polydistill teacher-outputs build` in one process
  build-2   the same under `torchrun --nproc_per_node 2` (the threads split between them)
  store     `polydistill train` reading the built store (cache.backend: datasets)
and whether a run from the store (built by two processes, the build killed half-way and
run again) trains the same weights as a run with the in-run cache.

Part 2 (search): the demo's distillation (docs/examples/demo_parallel.yaml on the data and
teacher `polydistill demo` writes), learning rate x temperature: a full 3 x 3 grid (9 runs,
no pruning) against `polydistill tune` with TPE and median pruning (9 trials).

    python tests/benchmarks/scale.py --data ../shared/data

Results: docs/results/scale.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

from common import ROOT, add_common_args, machine, parallel_pairs, sample, save, table, teacher_dir, write_jsonl

LANGS3 = {"deu": "de", "fra": "fr", "rus": "ru", "tur": "tr"}


def _run(cmd: list[str], threads: int, log: Path, env: dict[str, str] | None = None) -> float:
    start = time.perf_counter()
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": str(threads),
                                                                              **(env or {})})
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed; see {log}")
    return round(time.perf_counter() - start, 2)


def _outputs_config(train: Path, teacher: Path, work: Path, threads: int, backend: str, cache: Path, epochs: int) -> dict[str, Any]:
    return {
        "task": "embedding", "mode": "parallel",
        "teachers": [{"model": str(teacher), "name": "minilm"}],
        "student": {"from_teacher": {"layers": [0, 2, 4]}},
        "data": {"train": {"path": str(train), "columns": {"text": "text", "source": "source", "lang": "lang"}},
                 "eval": [], "batch_size": 64, "max_length": 64, "shuffle": True},
        "training": {"epochs": epochs, "learning_rate": 1e-4, "seed": 0, "progress": False, "log_every": 1000,
                     "num_threads": threads},
        "cache": {"enabled": True, "backend": backend, "dir": str(cache)},
        "output_dir": str(work / "run"),
    }


def _built_seconds(log: Path) -> float:
    """The longest 'built N shards ... in S s' line of a build log: the time its slowest process spent on outputs."""
    times = [float(line.split(" in ")[-1].split(" s")[0]) for line in log.read_text().splitlines() if "built " in line and " in " in line]
    return max(times) if times else float("nan")


def outputs(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    teacher = teacher_dir(args.teacher, work)
    rows = []
    for lang3, lang in LANGS3.items():
        for en, xx in sample(parallel_pairs(args.data, lang3), args.pairs, 0):
            rows += [{"text": xx, "source": en, "lang": lang}, {"text": en, "source": en, "lang": "en"}]
    train = write_jsonl(work / "train.jsonl", rows)
    unique = len({r["source"] for r in rows})
    res: dict[str, Any] = {"rows": len(rows), "unique_teacher_texts": unique}
    cli = [sys.executable, "-m", "polydistill"]

    def config(name: str, backend: str, cache: Path, epochs: int = 1, threads: int = args.threads) -> Path:
        path = work / f"{name}.yaml"
        cfg = _outputs_config(train, teacher, work / name, threads, backend, cache, epochs)
        path.write_text(yaml.safe_dump(cfg))
        return path

    # in-run: a cold cache (the teacher computes every output in the first epoch), its teacher forwards timed inside
    shutil.rmtree(work / "sqlite", ignore_errors=True)
    timing = work / "cold-teacher.json"
    res["inrun_cold_s"] = _run([sys.executable, __file__, "--timed-run", str(config("cold", "sqlite", work / "sqlite")), str(timing)],
                               args.threads, work / "cold.log")
    res["inrun_teacher_s"] = json.loads(timing.read_text())["teacher_s"]
    res["inrun_warm_s"] = _run(cli + ["train", str(config("warm", "sqlite", work / "sqlite")), "--overwrite"], args.threads, work / "warm.log")

    # build with 1 process (all threads), then 2 processes (the threads split)
    shutil.rmtree(work / "store1", ignore_errors=True)
    res["build1_wall_s"] = _run(cli + ["teacher-outputs", "build", str(config("b1", "datasets", work / "store1")), "--no-progress"],
                                args.threads, work / "build1.log")
    res["build1_outputs_s"] = _built_seconds(work / "build1.log")
    per = max(1, args.threads // 2)
    two = config("b2", "datasets", work / "store2", threads=per)
    shutil.rmtree(work / "store2", ignore_errors=True)
    launch = ["torchrun", "--nproc_per_node", "2", "--master_port", "29561", "-m", "polydistill", "teacher-outputs", "build",
              str(two), "--no-progress"]
    res["build2_wall_s"] = _run(launch, per, work / "build2.log", {"ACCELERATE_USE_CPU": "1"})
    res["build2_outputs_s"] = _built_seconds(work / "build2.log")
    for key in ("inrun_teacher_s", "build1_outputs_s", "build2_outputs_s"):
        res[key.replace("_s", "_per_s")] = round(unique / res[key], 1) if res[key] > 0 else None
    res["store_train_s"] = _run(cli + ["train", str(config("fromstore", "datasets", work / "store1")), "--overwrite"],
                                args.threads, work / "fromstore.log")
    res["store_bytes"] = sum(f.stat().st_size for f in (work / "store1").rglob("*.arrow"))

    # exactness: two processes (with the training's threads each), killed half-way and run again, vs the in-run cache
    shutil.rmtree(work / "store3", ignore_errors=True)
    three = config("b3", "datasets", work / "store3", epochs=2)
    launch3 = ["torchrun", "--nproc_per_node", "2", "--master_port", "29562", "-m", "polydistill", "teacher-outputs", "build",
               str(three), "--no-progress", "--batches-per-shard", "4"]
    proc = subprocess.Popen(launch3, stdout=open(work / "build3-killed.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": str(args.threads), "ACCELERATE_USE_CPU": "1"})
    deadline = time.time() + 1200
    folder = None
    while time.time() < deadline and proc.poll() is None:
        folder = next((p.parent for p in (work / "store3").glob("*/store.json")), None)
        if folder is not None:
            info = json.loads((folder / "store.json").read_text())
            if len(list(folder.glob("shard-*.arrow"))) >= info["shards"] // 2:
                break
        time.sleep(0.2)
    # torchrun's workers are not in its process group: kill them first, as a machine failure would
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        child.kill()
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    time.sleep(1)
    res["killed_with_shards"] = f"{len(list(folder.glob('shard-*.arrow')))} of {info['shards']}" if folder else "?"
    _run(launch3, args.threads, work / "build3-rerun.log", {"ACCELERATE_USE_CPU": "1"})
    res["rerun_log"] = [line.split("] ")[0] + "]: " + line.split("this process ")[-1] for line in
                        (work / "build3-rerun.log").read_text().splitlines() if "already built" in line]
    shutil.rmtree(work / "sqlite3", ignore_errors=True)
    _run(cli + ["train", str(config("exact_inrun", "sqlite", work / "sqlite3", epochs=2)), "--overwrite"], args.threads,
         work / "exact_inrun.log")
    _run(cli + ["train", str(three), "--overwrite"], args.threads, work / "exact_store.log")
    from safetensors.torch import load_file

    a = load_file(str(work / "exact_inrun" / "run" / "student" / "model.safetensors"))
    b = load_file(str(work / "b3" / "run" / "student" / "model.safetensors"))
    res["same_weights"] = all(bool((a[k] == b[k]).all()) for k in a)
    res["max_abs_weight_diff"] = max(float((a[k] - b[k]).abs().max()) for k in a)
    return res


def lookup(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Reading every training row's output in 64-row batches from the built store and from the SQLite cache of part 1."""
    from polydistill.cache import TeacherCache
    from polydistill.store import ShardedStore

    info = json.loads(next((work / "store1").glob("*/store.json")).read_text())
    texts = [json.loads(line)["source"] for line in (work / "train.jsonl").read_text(encoding="utf-8").splitlines()]
    res: dict[str, Any] = {"lookups": len(texts)}
    store = ShardedStore(work / "store1", info["fingerprint"], info["settings"], info["dtype"])
    start = time.perf_counter()
    store.lookup(texts[:1])
    res["store_index_s"] = round(time.perf_counter() - start, 3)
    for name, source in (("store", store), ("sqlite", TeacherCache(work / "sqlite", info["fingerprint"], info["settings"], info["dtype"]))):
        start = time.perf_counter()
        for i in range(0, len(texts), 64):
            source.lookup(texts[i : i + 64])
        res[f"{name}_s"] = round(time.perf_counter() - start, 3)
    return res


def search(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    demo = work / "demo"
    if not (demo / "teacher" / "student" / "config.json").is_file():
        _run([sys.executable, "-m", "polydistill", "demo", "--output-dir", str(demo)], args.threads, work / "demo.log")
    base = yaml.safe_load((ROOT / "docs" / "examples" / "demo_parallel.yaml").read_text())
    base["teachers"][0]["model"] = str(demo / "teacher" / "student")
    base["data"]["train"]["path"] = str(demo / "data" / "parallel_train.jsonl")
    base["data"]["eval"]["path"] = str(demo / "data" / "test.jsonl")
    base["training"].update(progress=False, num_threads=args.threads)
    lrs, temps = [3e-4, 1e-3, 3e-3], [1.0, 2.0, 4.0]
    space = {"training.learning_rate": {"choices": lrs}, "plugins.kd.temperature": {"choices": temps}}
    res: dict[str, Any] = {"space": {"learning_rate": lrs, "temperature": temps}}
    for name, extra in (("grid", {"sampler": "grid", "pruner": "none"}),
                        ("pruned", {"sampler": "tpe", "pruner": "median", "startup_trials": 3, "warmup_evaluations": 2})):
        out = work / f"search-{name}"
        shutil.rmtree(out, ignore_errors=True)
        spec = {"name": f"demo-{name}", "base": base, "space": space, "trials": 9, "seed": 0, "output_dir": str(out),
                "objectives": [{"metric": "accuracy", "languages": ["de", "es", "fr", "it"]}], **extra}
        path = work / f"search-{name}.yaml"
        path.write_text(yaml.safe_dump(spec))
        wall = _run([sys.executable, "-m", "polydistill", "tune", str(path)], args.threads, work / f"search-{name}.log")
        trials = [json.loads(p.read_text()) for p in sorted(out.glob("runs/*/seed-*/result.json"))]
        steps = sum(max((h.get("step", 0) for h in t.get("history") or []), default=0) for t in trials)
        ok = [t for t in trials if t["status"] == "ok"]
        best = max(ok, key=lambda t: t["values"][0])
        res[name] = {"wall_s": wall, "trials": len(trials), "pruned": sum(t["status"] == "pruned" for t in trials),
                     "steps": steps, "best_target_accuracy": round(best["values"][0], 4), "best": best["levels"]}
    return res


def timed_run(config: str, out: str) -> None:
    """Train ``config`` with the teachers' forward passes timed (what the in-run cache spends on teacher outputs)."""
    import torch

    import polydistill

    class TeacherClock:
        def __init__(self) -> None:
            self.seconds, self.started = 0.0, 0.0

        @polydistill.hookimpl
        def setup(self, state):
            for t in state.teachers:
                t.register_forward_pre_hook(lambda *a: setattr(self, "started", time.perf_counter()))
                t.register_forward_hook(lambda *a: setattr(self, "seconds", self.seconds + time.perf_counter() - self.started))

    clock = TeacherClock()
    cfg = yaml.safe_load(Path(config).read_text())
    torch.set_num_threads(cfg["training"]["num_threads"])
    polydistill.train(cfg, plugins=[("teacher_clock", clock)], overwrite=True)
    Path(out).write_text(json.dumps({"teacher_s": round(clock.seconds, 2)}))


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--timed-run":
        return timed_run(sys.argv[2], sys.argv[3])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--pairs", type=int, default=1000, help="training pairs per language (part 1)")
    parser.add_argument("--parts", nargs="+", default=["outputs", "lookup", "search"], choices=["outputs", "lookup", "search"])
    args = parser.parse_args()
    work = (args.work or ROOT / "runs" / "benchmarks" / "scale").resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = ROOT / "docs" / "results"
    previous = json.loads((out / "scale.json").read_text()) if (out / "scale.json").is_file() else {}
    command = "python tests/benchmarks/scale.py " + " ".join(sys.argv[1:])
    results = {**previous, "machine": machine()}
    if "outputs" in args.parts:
        results["outputs"] = {**outputs(args, work), "command": command}
    if "lookup" in args.parts:
        results["lookup"] = {**lookup(args, work), "command": command}
    if "search" in args.parts:
        results["search"] = {**search(args, work), "command": command}
    save(out, "scale", results, markdown(results))


def markdown(r: dict[str, Any]) -> str:
    lines = ["# Scale: teacher-output builds and searches", "", f"Machine: {r['machine']}.", ""]
    o = r.get("outputs")
    if o:
        lines += [f"## Teacher outputs ({o['rows']} training rows, {o['unique_teacher_texts']} distinct teacher texts; "
                  "all-MiniLM-L6-v2 teacher, 3-layer student)", "",
                  table(["how", "seconds computing teacher outputs", "outputs per second", "wall s of the command"], [
                      ["in-run SQLite cache: the first epoch of `train` (teacher forwards timed inside)", o["inrun_teacher_s"],
                       o["inrun_teacher_per_s"], o["inrun_cold_s"]],
                      ["`teacher-outputs build`, 1 process, 2 threads", o["build1_outputs_s"], o["build1_outputs_per_s"], o["build1_wall_s"]],
                      ["`teacher-outputs build`, 2 processes (torchrun), 1 thread each", o["build2_outputs_s"], o["build2_outputs_per_s"],
                       o["build2_wall_s"]],
                  ]), "",
                  f"Command: `{o['command']}`. Wall times include loading Python, the models and the data. The 2-process build's seconds are its slower "
                  "process's.", "",
                  f"One epoch reading the built store: {o['store_train_s']} s wall (a warm SQLite cache: {o['inrun_warm_s']} s). "
                  f"Store size: {o['store_bytes'] / 1e6:.1f} MB for {o['unique_teacher_texts']} outputs.", "",
                  f"Exactness: a two-process build killed with {o['killed_with_shards']} shards written and run again "
                  f"(the rerun: {'; '.join(o['rerun_log'])}), then two epochs from the store vs two epochs with the in-run cache: "
                  f"same weights {o['same_weights']} (largest difference {o['max_abs_weight_diff']:.3g}).", ""]
    k = r.get("lookup")
    if k:
        lines += [f"Reading the {k['lookups']} rows' outputs in batches of 64 (`{k['command']}`): built store {k['store_s']} s "
                  f"(after indexing its keys on first use, {k['store_index_s']} s), SQLite cache {k['sqlite_s']} s.", ""]
    s = r.get("search")
    if s:
        rows = [[name, s[name]["trials"], s[name]["pruned"], s[name]["steps"], s[name]["wall_s"], s[name]["best_target_accuracy"],
                 ", ".join(f"{k}={v}" for k, v in s[name]["best"].items())] for name in ("grid", "pruned")]
        lines += ["## Search on the demo task (learning rate x temperature, 3 x 3)", "",
                  f"Command: `{s['command']}`. Both searches: 9 trials, the 3 x 3 space, seed 0; the pruned one samples with "
                  "TPE (it may repeat a point) and stops a trial below the median of earlier ones after its second "
                  "epoch's evaluation.", "",
                  table(["search", "trials", "pruned", "training steps", "wall s", "best target-language accuracy", "best settings"], rows),
                  ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
