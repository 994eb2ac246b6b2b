"""Recipe 4: the SIB-200 distillation of recipe 2 with first-party plugins on and off.

An add-one-in study run with ``polydistill ablate`` (3 seeds, run 2 at a time):
  base                   recipe 2's distillation (KL, T = 2, one English teacher)
  +multi_teacher         two English teachers (fine-tuned with seeds 0 and 1), fused per
                         sample by confidence. In parallel mode every teacher reads the
                         English source, so per-language routing has nothing to route on;
                         fusion is the part that applies.
  +adaptive_temperature  temperature 4 -> 1, linear
  +code_switch           CoSDA-ML: words of the English rows the student reads switched
                         into the 8 target languages with MUSE dictionaries
Languages: the 8 of recipe 1 (the ones with MUSE dictionaries); test: their full SIB-200
test splits and English.

    python tests/benchmarks/recipe4_sib200_ablation.py --data ../shared/data

Results: docs/results/recipe4/ (the study report: report.md, cells.csv, runs.csv, PNGs; run.json).
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

from common import ROOT, add_common_args, run_study, teacher_dir, timer
from recipe2_sib200 import cut_student, distill_config, finetune_teacher, labels_of, write_data

TARGETS = ["deu_Latn", "fra_Latn", "spa_Latn", "ita_Latn", "nld_Latn", "pol_Latn", "rus_Cyrl", "tur_Latn"]
MUSE = {"deu_Latn": "de", "fra_Latn": "fr", "spa_Latn": "es", "ita_Latn": "it", "nld_Latn": "nl", "pol_Latn": "pl",
        "rus_Cyrl": "ru", "tur_Latn": "tr"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each with threads / jobs torch threads)")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--distill-epochs", type=int, default=1)
    parser.add_argument("--targets", default=",".join(TARGETS), help="target languages (a subset for smoke runs)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = (args.work or ROOT / "runs" / "benchmarks" / "recipe4").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    minilm = teacher_dir(args.teacher, work)
    labels = labels_of(args.data)
    targets = args.targets.split(",")
    files = write_data(args.data, work, targets)
    times: dict[str, float] = {}
    begin = time.perf_counter()
    with timer(times, "teachers_s"):
        teachers = [finetune_teacher(minilm, files, labels, work, args, seed=s, name=f"teacher-seed{s}") for s in (0, 1)]
    init = cut_student(teachers[0], labels, work / "student-init")

    base = distill_config(teachers[0], init, files, labels, work, 0, args)
    base["data"]["eval"] = files["eval"]
    base["teachers"] = [{"model": str(teachers[0]), "name": "teacher0"}]
    dictionaries = {lang: str(args.data / "muse" / f"en-{MUSE[lang]}.tsv") for lang in targets}
    levels = {
        "base": {},
        "+multi_teacher": {
            "teachers": [{"model": str(teachers[0]), "name": "teacher0"}, {"model": str(teachers[1]), "name": "teacher1"}],
            "plugins.multi_teacher": {"fusion": "confidence"},
        },
        "+adaptive_temperature": {"plugins.adaptive_temperature": {"schedule": "linear", "start": 4.0, "end": 1.0}},
        "+code_switch": {"plugins.code_switch": {
            "dictionaries": dictionaries, "languages": ["eng_Latn"], "probability": 0.5, "word_probability": 0.3}},
    }
    run_study("sib200-plugins", base, levels, work, args.out / "recipe4", args, times, begin)


if __name__ == "__main__":
    main()
