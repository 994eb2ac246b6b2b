"""Memory of long runs: a 1M-line parallel corpus streamed through training, and evaluation of 100k pairs.

Run from the repository root (offline, tiny models, CPU):

    python tests/benchmarks/reliability_memory.py [--lines 1000000] [--eval-pairs 100000]

Each phase runs in its own process so that its peak RSS is its own. Training samples
the resident set size every step; bounded memory shows as a flat curve after the first
stream buffer, not a climb with the lines read. Evaluation reports the peak RSS
against what a dense N x N similarity matrix alone would take. Results are printed
and written to docs/reliability-memory.json (docs/reliability.md quotes them).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests"))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_corpus(folder: Path, lines: int, seed: int = 0) -> tuple[Path, Path]:
    """``lines`` aligned en/de sentences (the test pairs, numbered so that every line differs)."""
    from conftest import PAIRS

    rng = random.Random(seed)
    en, de = folder / "corpus.en", folder / "corpus.de"
    with open(en, "w", encoding="utf-8") as fe, open(de, "w", encoding="utf-8") as fd:
        for i in range(lines):
            a, b, _ = PAIRS[rng.randrange(len(PAIRS))]
            fe.write(f"{a} {i}\n")
            fd.write(f"{b} {i}\n")
    return en, de


def models(folder: Path) -> tuple[Path, Path]:
    from conftest import TEXTS
    from polydistill.tiny import build_tiny_model, train_tokenizer

    tok = train_tokenizer(TEXTS + [str(i) for i in range(10)], vocab_size=300)
    teacher = build_tiny_model(folder / "teacher", TEXTS, task="embedding", tokenizer=tok, num_layers=2, seed=1)
    student = build_tiny_model(folder / "student", TEXTS, task="embedding", tokenizer=tok, num_layers=1, seed=2)
    return teacher, student


def train_phase(folder: str, lines: int, batch_size: int, out: "mp.Queue") -> None:
    import torch

    import polydistill
    from polydistill import hookimpl

    torch.set_num_threads(1)
    folder_p = Path(folder)
    teacher, student = models(folder_p)
    en, de = write_corpus(folder_p, lines)
    samples: list[tuple[int, float]] = []
    start = time.perf_counter()

    class Sample:
        @hookimpl
        def on_step_end(self, state, logs):
            samples.append((state.step, rss_mib()))

    steps = -(-lines // batch_size)
    cfg = {
        "task": "embedding", "mode": "parallel",
        "teachers": [{"model": str(teacher)}], "student": {"model": str(student)},
        "data": {"train": {"aligned": {"en": str(en), "de": str(de)}, "columns": {"text": "de", "source": "en"},
                           "lang": "de", "streaming": True},
                 "batch_size": batch_size, "stream_buffer": 8192, "max_length": 16},
        "training": {"max_steps": steps, "learning_rate": 1e-3, "progress": False, "log_every": 100,
                     "checkpoint_every": max(1, steps // 4), "num_threads": 1},
        "output_dir": str(folder_p / "run"),
    }
    polydistill.train(cfg, plugins=[("sample", Sample())])
    out.put({"lines": lines, "batch_size": batch_size, "steps": steps, "seconds": round(time.perf_counter() - start, 1),
             "rss_mib": [(s, round(r, 1)) for s, r in samples[:: max(1, len(samples) // 20)]] + [(samples[-1][0], round(samples[-1][1], 1))],
             "peak_mib": round(peak_mib(), 1)})


def eval_phase(folder: str, pairs: int, out: "mp.Queue") -> None:
    import datasets
    import torch

    from polydistill import models as M
    from polydistill.evaluation import evaluate_model

    torch.set_num_threads(1)
    folder_p = Path(folder)
    _, student = models(folder_p)
    en, de = write_corpus(folder_p, pairs, seed=1)
    ds = datasets.Dataset.from_dict({
        "text": de.read_text(encoding="utf-8").splitlines(),
        "source": en.read_text(encoding="utf-8").splitlines(),
        "lang": ["de"] * pairs,
    })
    model = M.load_model(str(student), "embedding")
    tok = M.load_tokenizer(str(student))
    before = rss_mib()
    start = time.perf_counter()
    metrics = evaluate_model(model, tok, ds, "embedding", max_length=16, batch_size=1024)
    out.put({"pairs": pairs, "seconds": round(time.perf_counter() - start, 1), "rss_before_mib": round(before, 1),
             "peak_mib": round(peak_mib(), 1), "dense_matrix_mib": round(pairs * pairs * 4 / 2**20, 1),
             "mean_retrieval": round(metrics["average"]["mean"], 4)})


def run(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    result = q.get()
    p.join()
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--lines", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=1024)
    ap.add_argument("--eval-pairs", type=int, default=100_000)
    ap.add_argument("--out", default=str(ROOT / "docs" / "reliability-memory.json"))
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "e").mkdir()
        (Path(tmp) / "t").mkdir()
        evaluation = run(eval_phase, str(Path(tmp) / "e"), args.eval_pairs)
        print(json.dumps({"evaluation": evaluation}))
        training = run(train_phase, str(Path(tmp) / "t"), args.lines, args.batch_size)
        print(json.dumps({"training": training}))
    result = {"training": training, "evaluation": evaluation, "machine": f"{os.cpu_count()} CPUs, torch threads 1"}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
