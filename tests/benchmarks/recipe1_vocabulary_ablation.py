"""Recipe 1's vocabulary ablation: how the rows of a new student vocabulary start.

A study run with ``polydistill ablate`` on recipe 1's data, budget and 6-layer student
(750 pairs per language for de fr es it nl pl ru tr, 1 epoch, 64 sentences a step, AdamW
1e-4), with the student's own vocabulary (``--method``, default a new 16k WordPiece
vocabulary learned from both sides of the pairs) and one axis, ``student.vocabulary.init``:

  random     N(0, 0.02) rows for every token the teacher's vocabulary lacks (the baseline)
  fvt        the mean of the teacher-vocabulary pieces of the token (Gee et al. 2022)
  parallel   the IBM Model 1 alignment of the token to English tokens over the training pairs

Tokens both vocabularies have keep the teacher's rows in every cell. --seeds training
seeds (default 2); the data sample stays seed 0.

    python tests/benchmarks/recipe1_vocabulary_ablation.py --data ../shared/data

Results: docs/results/recipe1-vocabulary-ablation/ (the study report and run.json).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

from common import ROOT, add_common_args, run_study, teacher_dir
from recipe1_ablation import study_base
from recipe1_embeddings import build_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--pairs", type=int, default=750)
    parser.add_argument("--batch-pairs", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--jobs", type=int, default=1, help="runs at a time (each with threads / jobs torch threads)")
    parser.add_argument("--vocabulary", default='{"method": "new"}', help="the student.vocabulary every cell shares, as JSON")
    parser.add_argument("--eval-limit", type=int, help="test pairs per language (smoke runs only; results use all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    begin = time.perf_counter()
    work = (args.work or ROOT / "runs" / "benchmarks" / "recipe1-vocabulary-ablation").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    teacher = teacher_dir(args.teacher, work)
    train, _, evals = build_data(args.data, work, args.pairs, 0, args.eval_limit)
    base = study_base(teacher, train, evals, args)
    base["student"]["vocabulary"] = json.loads(args.vocabulary)
    levels = {init: {"student.vocabulary.init": init} for init in ("random", "fvt", "parallel")}
    run_study("tatoeba-vocabulary-init", base, levels, work, args.out / "recipe1-vocabulary-ablation", args, {}, begin, axis="init")


if __name__ == "__main__":
    main()
