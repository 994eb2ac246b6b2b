"""Recipe 3: UPOS tagging by teacher-student learning on unlabelled target-language text (Wu et al. 2020).

1. Teacher: all-MiniLM-L6-v2 plus a 17-way token head, fine-tuned on English UD-EWT train
   (subsampled to --ewt sentences).
2. Student: the multilingual 3-layer student of recipe 1 (runs/benchmarks/recipe1/pd3)
   as encoder, with the teacher's head, fine-tuned on the same English EWT tags
   (zero-shot transfer baseline).
3. Distillation (mode same), starting from that student: it learns the teacher's soft
   tag distributions on unlabelled text, PUD sentences in the 10 other languages and
   English; no gold tag of PUD is used.
PUD is a test set: its README asks for 10-fold cross-validation. The 1000 parallel
sentences are split into 10 folds by index (the same sentences in every language); for
each fold, a student is distilled on the other nine folds' text (--per-fold-train
sentences per language, subsampled) and scored on the held-out fold. Student numbers
are over all 1000 sentences (each scored by the student that never saw it); the teacher
and the English-only student are scored on the same sentences.

    python tests/benchmarks/recipe1_embeddings.py --data ../shared/data   # writes the encoder
    python tests/benchmarks/recipe3_upos.py --data ../shared/data

Results: docs/results/recipe3.{json,md}.
"""

from __future__ import annotations

import argparse
import gzip
import random
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from common import ROOT, add_common_args, machine, save, table, teacher_dir, timer, write_jsonl

PUD = ["en", "de", "fr", "es", "it", "pl", "ru", "tr", "ar", "hi", "zh"]
UPOS = ["ADJ", "ADP", "ADV", "AUX", "CCONJ", "DET", "INTJ", "NOUN", "NUM", "PART", "PRON", "PROPN", "PUNCT", "SCONJ", "SYM", "VERB", "X"]


def read_conllu(path: Path) -> list[tuple[list[str], list[str]]]:
    """(words, UPOS tags) per sentence; multi-word token ranges and empty nodes are skipped (their words are listed)."""
    opener = gzip.open if path.suffix == ".gz" else open
    sentences, words, tags = [], [], []
    with opener(path, "rt", encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line:
                if words:
                    sentences.append((words, tags))
                words, tags = [], []
            elif not line.startswith("#"):
                cols = line.split("\t")
                if "-" in cols[0] or "." in cols[0]:
                    continue
                words.append(cols[1])
                tags.append(cols[3] if cols[3] in UPOS else "X")
    if words:
        sentences.append((words, tags))
    return sentences


def pud(data: Path, lang: str) -> list[tuple[list[str], list[str]]]:
    return read_conllu(next((data / "ud_pud" / lang).glob("*.conllu")))


def evaluate(model_dir: Path, test: Path, threads: int) -> dict[str, Any]:
    import polydistill

    cfg = {"task": "token_classification", "labels": UPOS, "student": {"model": str(model_dir)},
           "data": {"train": [], "eval": {"path": str(test), "columns": {"label": "label", "lang": "lang"}}, "batch_size": 32},
           "training": {"max_steps": 1, "num_threads": threads}}
    return polydistill.evaluate(cfg)["student"]


def pooled(results: list[dict[str, Any]], counts: list[dict[str, int]], metric: str = "token_accuracy") -> dict[str, float]:
    """Fold results pooled per language, each fold weighted by its number of words."""
    out = {}
    for lang in results[0]["per_language"]:
        total = sum(c[lang] for c in counts)
        out[lang] = sum(r["per_language"][lang][metric] * c[lang] for r, c in zip(results, counts)) / total
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--encoder", type=Path, default=ROOT / "runs" / "benchmarks" / "recipe1" / "pd3" / "student",
                        help="the multilingual student of recipe 1")
    parser.add_argument("--ewt", type=int, default=3000, help="English EWT train sentences for the teacher (subsampled)")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--folds", type=int, default=10)
    parser.add_argument("--max-folds", type=int, help="run only the first N folds (smoke runs; results use all)")
    parser.add_argument("--per-fold-train", type=int, default=300, help="unlabelled sentences per language for each fold's student")
    parser.add_argument("--distill-epochs", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    if not (args.encoder / "config.json").is_file():
        raise SystemExit(f"--encoder {args.encoder}: no model there; run tests/benchmarks/recipe1_embeddings.py first")

    import torch

    import polydistill
    from polydistill import models as M

    torch.set_num_threads(args.threads)
    work = (args.work or ROOT / "runs" / "benchmarks" / "recipe3").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    minilm = teacher_dir(args.teacher, work)
    times: dict[str, float] = {}
    begin = time.perf_counter()

    ewt = read_conllu(args.data / "ud_ewt" / "en_ewt-ud-train.conllu.gz")
    ewt = random.Random(args.seed).sample(ewt, min(args.ewt, len(ewt)))
    ewt_file = write_jsonl(work / "ewt.jsonl", [{"text": w, "label": t, "lang": "en"} for w, t in ewt])

    def finetune_on_ewt(model: Path, out: Path) -> Path:
        return polydistill.train({
            "task": "token_classification", "labels": UPOS, "student": {"model": str(model)},
            "data": {"train": {"path": str(ewt_file), "columns": {"label": "label", "lang": "lang"}}, "batch_size": 16},
            "training": {"epochs": args.teacher_epochs, "learning_rate": 1e-4, "warmup_ratio": 0.1, "seed": args.seed,
                         "num_threads": args.threads, "progress": False, "log_every": 50},
            "output_dir": str(out),
        }).student_dir

    with timer(times, "teacher_finetune_s"):
        teacher = finetune_on_ewt(minilm, work / "teacher")

    # The multilingual student: recipe 1's encoder under the teacher's head, fine-tuned on the English EWT tags
    # (zero-shot transfer through an encoder that already maps languages together).
    encoder = M.load_model(str(args.encoder), "embedding")
    tagger = M.load_model(str(teacher), "token_classification", UPOS)
    student_init = M.student_from_teacher(tagger, [0, 2, 4], "token_classification", UPOS)
    loaded = student_init.base_model.load_state_dict(encoder.state_dict(), strict=False)
    if [k for k in loaded.unexpected_keys + loaded.missing_keys if "pooler" not in k]:  # a tagger has no pooler
        raise SystemExit(f"--encoder {args.encoder}: does not fit the 3-layer student: {loaded}")
    init = work / "student-init"
    student_init.save_pretrained(init)
    M.load_tokenizer(str(args.encoder)).save_pretrained(init)
    with timer(times, "english_only_s"):
        english_only = finetune_on_ewt(init, work / "english-only")

    data = {lang: pud(args.data, lang) for lang in PUD}
    n = min(len(s) for s in data.values())
    folds = [list(range(k, n, args.folds)) for k in range(args.folds)]
    fold_results: dict[str, list[dict[str, Any]]] = {"teacher": [], "english_only": [], "distilled": []}
    counts = []
    for k, held in enumerate(folds[: args.max_folds]):
        test = write_jsonl(work / f"fold{k}" / "test.jsonl",
                           [{"text": data[l][i][0], "label": data[l][i][1], "lang": l} for l in PUD for i in held])
        counts.append({l: sum(len(data[l][i][0]) for i in held) for l in PUD})
        rest = [i for i in range(n) if i % args.folds != k]
        rng = random.Random(args.seed * 1000 + k)
        rows = [{"text": data[l][i][0], "lang": l} for l in PUD for i in rng.sample(rest, min(args.per_fold_train, len(rest)))]
        train = write_jsonl(work / f"fold{k}" / "unlabelled.jsonl", rows)
        with timer(times, f"distill_fold{k}_s"):
            run = polydistill.train({
                "task": "token_classification", "mode": "same", "labels": UPOS,
                "teachers": [{"model": str(teacher), "name": "teacher"}],
                "student": {"model": str(english_only)},
                "data": {"train": {"path": str(train), "columns": {"text": "text", "lang": "lang"}}, "batch_size": 32},
                "training": {"epochs": args.distill_epochs, "learning_rate": 1e-4, "warmup_ratio": 0.1, "seed": args.seed,
                             "num_threads": args.threads, "progress": False, "log_every": 50},
                "plugins": {"kd": {"kl": 1.0, "temperature": 1.0}},
                "output_dir": str(work / f"fold{k}" / "student"),
            })
        for name, model in (("teacher", teacher), ("english_only", english_only), ("distilled", run.student_dir)):
            fold_results[name].append(evaluate(model, test, args.threads))
        print(f"[recipe3] fold {k}: " + ", ".join(f"{n} {r[-1]['average']['token_accuracy']:.3f}" for n, r in fold_results.items()))
        shutil.rmtree(work / f"fold{k}" / "student" / "checkpoints", ignore_errors=True)
    times["total_s"] = round(time.perf_counter() - begin, 1)

    summary = {name: pooled(rs, counts) for name, rs in fold_results.items()}
    fold_avgs = {name: [statistics.mean(r["per_language"][l]["token_accuracy"] for l in PUD if l != "en") for r in rs]
                 for name, rs in fold_results.items()}
    results = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "times": times,
               "pooled_token_accuracy": summary, "folds": fold_results, "fold_target_averages": fold_avgs}
    names = {"teacher": "teacher (MiniLM, EWT), zero-shot", "english_only": "multilingual student, EWT only (zero-shot)",
             "distilled": "the same, then distilled on unlabelled PUD text"}
    rows = []
    for name, per in summary.items():
        target = statistics.mean(per[l] for l in PUD if l != "en")
        sd = statistics.stdev(fold_avgs[name]) if len(fold_avgs[name]) > 1 else float("nan")
        rows.append([names[name]] + [per[l] for l in PUD] + [f"{target:.3f} (fold sd {sd:.3f})"])
    save(args.out, "recipe3", results, table(["model"] + PUD + ["target average"], rows))


if __name__ == "__main__":
    main()
