"""Recipe 2: cross-lingual topic classification on SIB-200 through parallel data.

1. The teacher (all-MiniLM-L6-v2 plus a 7-way head) is fine-tuned on the English train split.
2. A 3-layer student is cut from the fine-tuned teacher (layers 0, 2, 4, with its head).
3. Baseline: that student fine-tuned on the English labels only (zero-shot transfer).
4. polydistill: that student distilled in parallel mode; the teacher reads the English
   train sentence, the student reads the same sentence in each target language (SIB-200
   rows with the same index_id are translations) and in English. No target-language
   label is used, and no dev or test sentence.
Test accuracy per language on each language's full SIB-200 test split (204 sentences).
Students run with --seeds seeds; tables give mean ± std over seeds. The tokenizer
coverage of each language (share of [UNK] tokens, tokens per word) explains failures.

    python tests/benchmarks/recipe2_sib200.py --data ../shared/data

Results: docs/results/recipe2.{json,md}.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from common import ROOT, add_common_args, machine, save, table, teacher_dir, timer, write_jsonl

#: Languages of recipe 1, then several non-Latin scripts (SIB-200 folder names).
TARGETS = ["deu_Latn", "fra_Latn", "spa_Latn", "ita_Latn", "nld_Latn", "pol_Latn", "rus_Cyrl", "tur_Latn",
           "ell_Grek", "bul_Cyrl", "arb_Arab", "heb_Hebr", "hin_Deva", "tha_Thai", "kor_Hang", "zho_Hans"]


def read_split(data: Path, lang: str, split: str) -> list[dict[str, str]]:
    with open(data / "sib200" / lang / f"{split}.tsv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def labels_of(data: Path) -> list[str]:
    return [l for l in (data / "sib200" / "labels.txt").read_text(encoding="utf-8").split("\n") if l.strip()]


def write_data(data: Path, work: Path, targets: list[str]) -> dict[str, Any]:
    """English labelled train, parallel train (teacher: English, student: each language) and test sources."""
    english = {r["index_id"]: r for r in read_split(data, "eng_Latn", "train")}
    files: dict[str, Any] = {
        "english": write_jsonl(work / "english_train.jsonl",
                               [{"text": r["text"], "label": r["category"], "lang": "eng_Latn"} for r in english.values()]),
    }
    rows = [{"text": r["text"], "source": r["text"], "lang": "eng_Latn"} for r in english.values()]
    for lang in targets:
        for r in read_split(data, lang, "train"):
            rows.append({"text": r["text"], "source": english[r["index_id"]]["text"], "lang": lang})
    files["parallel"] = write_jsonl(work / "parallel_train.jsonl", rows)
    test = []
    for lang in ["eng_Latn", *targets]:
        test += [{"text": r["text"], "label": r["category"], "lang": lang} for r in read_split(data, lang, "test")]
    files["test"] = write_jsonl(work / "test.jsonl", test)
    files["eval"] = {"path": str(files["test"]), "columns": {"label": "label", "lang": "lang"}}
    return files


def coverage(tokenizer_dir: Path, data: Path, langs: list[str]) -> dict[str, dict[str, float]]:
    """Per language: share of [UNK] tokens and of words that are entirely [UNK], tokens per word."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    out = {}
    for lang in langs:
        tokens = unk = words = unk_words = 0
        for r in read_split(data, lang, "test"):
            for word in r["text"].split():
                pieces = tok.tokenize(word)
                words += 1
                tokens += len(pieces)
                n_unk = sum(p == tok.unk_token for p in pieces)
                unk += n_unk
                unk_words += bool(pieces) and n_unk == len(pieces)
        out[lang] = {"unk_tokens": unk / max(tokens, 1), "unk_words": unk_words / max(words, 1), "tokens_per_word": tokens / max(words, 1)}
    return out


def finetune_teacher(teacher: Path, files: dict[str, Any], labels: list[str], work: Path, args: argparse.Namespace, seed: int = 0,
                     name: str = "teacher") -> Path:
    import polydistill

    cfg = {
        "task": "sequence_classification", "labels": labels, "student": {"model": str(teacher)},
        "data": {"train": {"path": str(files["english"]), "columns": {"label": "label", "lang": "lang"}}, "batch_size": 16},
        "training": {"epochs": args.teacher_epochs, "learning_rate": 1e-4, "warmup_ratio": 0.1, "seed": seed,
                     "num_threads": args.threads, "progress": False, "log_every": 20},
        "output_dir": str(work / name),
    }
    return polydistill.train(cfg).student_dir


def cut_student(teacher_model: Path, labels: list[str], out: Path) -> Path:
    """The 3-layer student both baselines start from: teacher layers 0, 2, 4 with the teacher's head."""
    from transformers import AutoTokenizer

    from polydistill import models as M

    teacher = M.load_model(str(teacher_model), "sequence_classification", labels)
    student = M.student_from_teacher(teacher, [0, 2, 4], "sequence_classification", labels)
    student.save_pretrained(out)
    AutoTokenizer.from_pretrained(str(teacher_model)).save_pretrained(out)
    return out


def english_only(init: Path, files: dict[str, Any], labels: list[str], work: Path, seed: int, args: argparse.Namespace) -> Path:
    import polydistill

    cfg = {
        "task": "sequence_classification", "labels": labels, "student": {"model": str(init)},
        "data": {"train": {"path": str(files["english"]), "columns": {"label": "label", "lang": "lang"}}, "batch_size": 16},
        "training": {"epochs": args.student_epochs_en, "learning_rate": 1e-4, "warmup_ratio": 0.1, "seed": seed,
                     "num_threads": args.threads, "progress": False, "log_every": 20},
        "output_dir": str(work / f"english-only-seed{seed}"),
    }
    return polydistill.train(cfg).student_dir


def distill_config(teacher_model: Path, init: Path, files: dict[str, Any], labels: list[str], work: Path, seed: int,
                   args: argparse.Namespace) -> dict[str, Any]:
    """The distillation run as a plain polydistill config (recipe 4 ablates plugins on top of it)."""
    return {
        "task": "sequence_classification", "mode": "parallel", "labels": labels,
        "teachers": [{"model": str(teacher_model), "name": "teacher"}],
        "student": {"model": str(init), "vocabulary": json.loads(getattr(args, "vocabulary", None) or "{}")},
        "data": {"train": {"path": str(files["parallel"]), "columns": {"text": "text", "source": "source", "lang": "lang"}},
                 "batch_size": 32},
        "training": {"epochs": args.distill_epochs, "learning_rate": 1e-4, "warmup_ratio": 0.1, "seed": seed,
                     "num_threads": args.threads, "progress": False, "log_every": 25},
        "plugins": {"kd": {"kl": 1.0, "temperature": 2.0}},
        "cache": {"enabled": True, "dir": str(work / "teacher-cache")},
        "output_dir": str(work / f"distilled-seed{seed}"),
    }


def evaluate(model_dir: Path, files: dict[str, Any], labels: list[str], threads: int) -> dict[str, Any]:
    import polydistill

    cfg = {"task": "sequence_classification", "labels": labels, "student": {"model": str(model_dir)},
           "data": {"train": [], "eval": files["eval"], "batch_size": 32},
           "training": {"max_steps": 1, "num_threads": threads}}
    return polydistill.evaluate(cfg)["student"]


def summarise(runs: list[dict[str, Any]], langs: list[str]) -> dict[str, Any]:
    def ms(values: list[float]) -> tuple[float, float]:
        return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)

    per = {lang: ms([r["per_language"][lang]["accuracy"] for r in runs]) for lang in langs}
    targets = [l for l in langs if l != "eng_Latn"]
    target_avg = ms([statistics.mean(r["per_language"][l]["accuracy"] for l in targets) for r in runs])
    return {"per_language": per, "target_average": target_avg}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--seeds", type=int, default=3, help="student seeds")
    parser.add_argument("--teacher-epochs", type=int, default=5)
    parser.add_argument("--student-epochs-en", type=int, default=5)
    parser.add_argument("--distill-epochs", type=int, default=1)
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--vocabulary", help="student.vocabulary of the distilled student, as JSON, e.g. '{\"method\": \"new\", \"init\": \"parallel\"}'")
    parser.add_argument("--name", default="recipe2", help="results file name (docs/results/NAME.{json,md})")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    import torch

    import polydistill

    torch.set_num_threads(args.threads)
    work = (args.work or ROOT / "runs" / "benchmarks" / "recipe2").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    minilm = teacher_dir(args.teacher, work)
    targets = args.targets.split(",")
    langs = ["eng_Latn", *targets]
    labels = labels_of(args.data)
    files = write_data(args.data, work, targets)
    times: dict[str, float] = {}
    begin = time.perf_counter()

    with timer(times, "teacher_finetune_s"):
        teacher = finetune_teacher(minilm, files, labels, work, args)
    teacher_metrics = evaluate(teacher, files, labels, args.threads)
    init = cut_student(teacher, labels, work / "student-init")
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(),
                               "teacher": teacher_metrics, "english_only": [], "distilled": [], "times": times}
    for seed in range(args.seeds):
        with timer(times, f"english_only_seed{seed}_s"):
            student = english_only(init, files, labels, work, seed, args)
        results["english_only"].append(evaluate(student, files, labels, args.threads))
        with timer(times, f"distill_seed{seed}_s"):
            run = polydistill.train(distill_config(teacher, init, files, labels, work, seed, args))
        results["distilled"].append(evaluate(run.student_dir, files, labels, args.threads))
        vocab_dir = run.output_dir / "vocabulary"
        if (vocab_dir / "vocabulary.json").is_file():
            results["student_coverage"] = coverage(run.student_dir, args.data, langs)
            results["student_vocabulary"] = json.loads((vocab_dir / "vocabulary.json").read_text(encoding="utf-8"))
        print(f"[recipe2] seed {seed}: english-only {results['english_only'][-1]['average']['accuracy']:.3f}, "
              f"distilled {results['distilled'][-1]['average']['accuracy']:.3f}")
    results["coverage"] = coverage(minilm, args.data, langs)
    results["total_s"] = round(time.perf_counter() - begin, 1)

    en_only, dist = summarise(results["english_only"], langs), summarise(results["distilled"], langs)
    rows = []
    for lang in langs:
        cov = results["coverage"][lang]
        t = teacher_metrics["per_language"][lang]["accuracy"]
        e, d = en_only["per_language"][lang], dist["per_language"][lang]
        rows.append([lang, t, f"{e[0]:.3f} ± {e[1]:.3f}", f"{d[0]:.3f} ± {d[1]:.3f}", f"{d[0] - e[0]:+.3f}",
                     f"{cov['unk_tokens']:.1%}", f"{cov['tokens_per_word']:.2f}"])
    t_avg = statistics.mean(teacher_metrics["per_language"][l]["accuracy"] for l in targets)
    e, d = en_only["target_average"], dist["target_average"]
    rows.append(["**target average**", t_avg, f"{e[0]:.3f} ± {e[1]:.3f}", f"{d[0]:.3f} ± {d[1]:.3f}", f"{d[0] - e[0]:+.3f}", "", ""])
    md = table(["language", "teacher (6 layers)", "student, English only", "student, distilled", "Δ", "[UNK] tokens", "tokens/word"], rows)
    if "student_coverage" in results:
        before, after = results["coverage"], results["student_coverage"]
        md += (f"\n\nThe distilled student's vocabulary ({results['student_vocabulary']['new_size']:,} tokens, "
               f"{results['student_vocabulary']['parameters_after'] / 1e6:.1f}M parameters), on each test split, teacher's → student's:\n\n"
               + table(["language", "tokens/word", "[UNK] tokens"],
                       [[l, f"{before[l]['tokens_per_word']:.2f} → {after[l]['tokens_per_word']:.2f}",
                         f"{before[l]['unk_tokens']:.1%} → {after[l]['unk_tokens']:.1%}"] for l in langs]))
    save(args.out, args.name, results, md)


if __name__ == "__main__":
    main()
