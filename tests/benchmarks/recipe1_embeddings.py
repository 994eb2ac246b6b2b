"""Recipe 1: multilingual sentence embeddings (Reimers & Gurevych 2020) from an English teacher.

The teacher (all-MiniLM-L6-v2, English only) embeds the English side of each pair; the
student learns to map both the English sentence and its translation to that embedding.
Training pairs: parallel/ (Tatoeba-Challenge with the LASER Tatoeba test pairs removed,
plus NTREX-128) for deu fra spa ita nld pol rus tur, subsampled to --pairs per language.
Test: the full LASER Tatoeba test set of each language (1000 pairs), retrieval accuracy
in both directions.

Variants, each evaluated by the same code (polydistill.evaluate):
  teacher     the teacher, zero-shot
  st          sentence-transformers' MSELoss recipe (teacher embeddings of the English
              side precomputed, student = a copy of the teacher, trained on both sides)
  pd6         polydistill, same-size student (a copy of the teacher), same data, batch
              (in sentences), epochs, learning rate and schedule as st
  pd3         polydistill, 3-layer student from teacher layers 0, 2, 4
  pd6x2       pd6 for two epochs: what polydistill does in st's wall time
Running a subset of variants (--variants) updates those in an existing results file.

    python tests/benchmarks/recipe1_embeddings.py --data ../shared/data

Results: docs/results/recipe1.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from common import LANGS, ROOT, add_common_args, binomial_ci, machine, parallel_pairs, sample, save, table, teacher_dir, timer, write_jsonl


def build_data(data: Path, work: Path, pairs: int, seed: int, eval_limit: int | None = None,
               langs: dict[str, str] | None = None) -> tuple[Path, list[tuple[str, str, str]], list[dict[str, Any]]]:
    """Training rows (student reads xx or en, teacher reads en) and the Tatoeba eval sources of ``langs`` (default LANGS)."""
    langs = langs or LANGS
    triples = []
    for lang3, lang in langs.items():
        triples += [(en, xx, lang) for en, xx in sample(parallel_pairs(data, lang3), pairs, seed)]
    rows = [{"text": xx, "source": en, "lang": lang} for en, xx, lang in triples]
    rows += [{"text": en, "source": en, "lang": "en"} for en, _, _ in triples]
    train = write_jsonl(work / "train.jsonl", rows)
    tatoeba = data / "tatoeba"
    evals = [
        {"aligned": {"en": str(tatoeba / f"tatoeba.{l3}-eng.eng"), "xx": str(tatoeba / f"tatoeba.{l3}-eng.{l3}")},
         "columns": {"text": "xx", "source": "en"}, "lang": lang, "limit": eval_limit}
        for l3, lang in langs.items()
    ]
    return train, triples, evals


def evaluate(model_dir: Path, evals: list[dict[str, Any]], threads: int) -> dict[str, Any]:
    import polydistill

    cfg = {"task": "embedding", "student": {"model": str(model_dir)},
           "data": {"train": [], "eval": evals, "batch_size": 64, "max_length": 128},
           "training": {"max_steps": 1, "num_threads": threads}}
    return polydistill.evaluate(cfg)["student"]


def run_polydistill(teacher: Path, train: Path, work: Path, name: str, layers: list[int], args: argparse.Namespace,
                    epochs: int, vocabulary: dict[str, Any] | None = None) -> tuple[Path, float]:
    import polydistill

    out = work / name
    shutil.rmtree(out, ignore_errors=True)
    cfg = {
        "task": "embedding",
        "mode": "parallel",
        "teachers": [{"model": str(teacher), "name": "minilm"}],
        "student": {"from_teacher": {"teacher": "minilm", "layers": layers}, "vocabulary": vocabulary or {}},
        "data": {"train": {"path": str(train), "columns": {"text": "text", "source": "source", "lang": "lang"}},
                 "batch_size": 2 * args.batch_pairs, "max_length": 128, "length_grouping": args.length_grouping},
        "training": {"epochs": epochs, "learning_rate": args.lr, "warmup_ratio": 0.1, "weight_decay": 0.01,
                     "seed": args.seed, "log_every": 25, "num_threads": args.threads, "progress": False},
        # The teacher ends in a Normalize module: match unit vectors, as sentence-transformers' recipe does.
        "plugins": {"kd": {"mse": 1.0, "normalize": args.normalize}},
        "cache": {"enabled": True, "dir": str(out / "teacher-cache")},  # fresh: the teacher's time is counted
        "output_dir": str(out),
    }
    start = time.perf_counter()
    result = polydistill.train(cfg)
    return result.student_dir, time.perf_counter() - start


def run_sentence_transformers(teacher: Path, triples: list[tuple[str, str, str]], work: Path, args: argparse.Namespace) -> tuple[Path, float]:
    """sentence-transformers' make_multilingual recipe: MSELoss on both sides against precomputed teacher embeddings."""
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer.losses import MSELoss

    out = work / "st"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    teacher_model = SentenceTransformer(str(teacher), device="cpu")
    student = SentenceTransformer(str(teacher), device="cpu")
    student.max_seq_length = 128
    english = [en for en, _, _ in triples]
    labels = teacher_model.encode(english, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    ds = Dataset.from_dict({"english": english, "non_english": [xx for _, xx, _ in triples], "label": labels.tolist()})
    training_args = SentenceTransformerTrainingArguments(
        output_dir=str(out / "trainer"), num_train_epochs=args.epochs, per_device_train_batch_size=args.batch_pairs,
        learning_rate=args.lr, warmup_ratio=0.1, weight_decay=0.01, seed=args.seed, save_strategy="no",
        logging_steps=25, report_to=[], use_cpu=True, disable_tqdm=True,
    )
    SentenceTransformerTrainer(model=student, args=training_args, train_dataset=ds, loss=MSELoss(student)).train()
    seconds = time.perf_counter() - start
    student.save(str(out / "student"))
    return out / "student", seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--pairs", type=int, default=1000, help="training pairs per language (subsampled)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-pairs", type=int, default=32, help="pairs per batch (st); polydistill batches twice as many sentences")
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length-grouping", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True,
                        help="polydistill matches L2-normalised embeddings (kd normalize), like the teacher's own output")
    parser.add_argument("--variants", default="teacher,st,pd6,pd3,pd6x2")
    parser.add_argument("--eval-limit", type=int, help="test pairs per language (smoke runs only; results use all)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    work = (args.work or ROOT / "runs" / "benchmarks" / "recipe1").resolve()
    work.mkdir(parents=True, exist_ok=True)
    teacher = teacher_dir(args.teacher, work)
    train, triples, evals = build_data(args.data, work, args.pairs, args.seed, args.eval_limit)
    sentences = 2 * len(triples) * args.epochs
    print(f"[recipe1] {len(triples)} pairs ({args.pairs} per language x {len(LANGS)}), {sentences} student sentences")

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "variants": {}}
    previous = args.out / "recipe1.json"
    if args.variants != parser.get_default("variants") and previous.is_file():
        results["variants"] = json.loads(previous.read_text(encoding="utf-8"))["variants"]
    begin = time.perf_counter()
    for variant in args.variants.split(","):
        print(f"[recipe1] {variant}")
        info: dict[str, Any] = {}
        if variant == "teacher":
            model_dir, seconds = teacher, None
        elif variant == "st":
            model_dir, seconds = run_sentence_transformers(teacher, triples, work, args)
        elif variant in ("pd6", "pd3", "pd6x2"):
            layers = [0, 2, 4] if variant == "pd3" else [0, 1, 2, 3, 4, 5]
            epochs = 2 * args.epochs if variant == "pd6x2" else args.epochs
            model_dir, seconds = run_polydistill(teacher, train, work, variant, layers, args, epochs)
        else:
            raise SystemExit(f"unknown variant {variant!r}")
        with timer(info, "eval_s"):
            metrics = evaluate(model_dir, evals, args.threads)
        if seconds is not None:
            seen = sentences * (2 if variant == "pd6x2" else 1)
            info.update(train_s=round(seconds, 1), sentences_per_s=round(seen / seconds, 1), sentences_seen=seen)
        info["metrics"] = metrics
        results["variants"][variant] = info
        print(f"[recipe1] {variant}: mean {metrics['average']['mean']:.4f} {info}")
    results["total_s"] = round(time.perf_counter() - begin, 1)  # of this invocation

    langs = list(LANGS.values())
    names = {"teacher": "teacher (all-MiniLM-L6-v2), zero-shot", "st": "sentence-transformers MSELoss, 6 layers",
             "pd6": "polydistill, 6 layers", "pd3": "polydistill, 3 layers (0, 2, 4)",
             "pd6x2": "polydistill, 6 layers, 2 epochs"}
    rows = []
    for variant, info in results["variants"].items():
        per = info["metrics"]["per_language"]
        avg = info["metrics"]["average"]["mean"]
        rows.append([names[variant]] + [per[l]["mean"] for l in langs] + [avg, f"±{binomial_ci(avg, 1000 * len(langs)):.3f}",
                     f"{info['train_s']:.0f}" if "train_s" in info else "–",
                     f"{info['sentences_per_s']:.1f}" if "sentences_per_s" in info else "–"])
    md = table(["model"] + langs + ["mean", "95% CI (test)", "train s", "sentences/s"], rows)
    detail = table(["model"] + [f"{l} en→xx / xx→en" for l in langs],
                   [[names[v]] + [f"{i['metrics']['per_language'][l]['src2tgt']:.3f} / {i['metrics']['per_language'][l]['tgt2src']:.3f}"
                                  for l in langs] for v, i in results["variants"].items()])
    save(args.out, "recipe1", results, md + "\n\n" + detail)


if __name__ == "__main__":
    main()
