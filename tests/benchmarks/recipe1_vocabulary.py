"""Recipe 1 with the student's own vocabulary: Tatoeba retrieval from an English teacher.

Recipe 1's data, budget and evaluation (750 pairs per language for de fr es it nl pl ru tr,
1 epoch of 64 sentences a step, AdamW 1e-4, the full LASER Tatoeba test sets), with the
student's vocabulary as the only change. The student is the teacher's 6 layers unless
a variant says otherwise. Variants (``--variants``, comma-separated):

  keep          the teacher's vocabulary: recipe 1's pd6 again, for wall times on this machine
  translit      the teacher's vocabulary; the student's text in Latin script (anyascii)
  extend        8000 tokens learned from the training text added; new rows by alignment
  extend_fvt    the same, new rows by FVT
  new           a new 16k WordPiece vocabulary from both sides of the pairs; rows by alignment
  new_fvt       the same, rows by FVT
  new_random    the same, random rows
  translit_new  a new vocabulary over the transliterated text; rows by alignment
  trim3         the teacher's vocabulary trimmed to the training text, 3 layers (0, 2, 4)
  NAME_x2       any of the above for 2 epochs (recipe 1's pd6x2 budget)

The baselines (teacher, sentence-transformers, polydistill with the teacher's vocabulary)
are read from docs/results/recipe1.json, made by recipe1_embeddings.py on the same data.
Running a subset of variants updates those in an existing results file.

    python tests/benchmarks/recipe1_vocabulary.py --data ../shared/data

Results: docs/results/recipe1-vocabulary.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from common import LANGS, ROOT, add_common_args, binomial_ci, machine, save, table, teacher_dir, timer
from recipe1_embeddings import build_data, evaluate, run_polydistill

VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "keep": ("teacher's vocabulary (recipe 1's pd6, rerun here)", {}),
    "translit": ("transliterated (anyascii), teacher's vocabulary", {"transliterate": "anyascii"}),
    "extend": ("extend +8k, aligned init", {"method": "extend", "init": "parallel"}),
    "extend_fvt": ("extend +8k, FVT init", {"method": "extend", "init": "fvt"}),
    "new": ("new 16k WordPiece, aligned init", {"method": "new", "init": "parallel"}),
    "new_fvt": ("new 16k WordPiece, FVT init", {"method": "new", "init": "fvt"}),
    "new_random": ("new 16k WordPiece, random init", {"method": "new", "init": "random"}),
    "translit_new": ("transliterated, new 16k WordPiece, aligned init", {"method": "new", "init": "parallel", "transliterate": "anyascii"}),
    "trim3": ("trimmed teacher vocabulary, 3 layers", {"method": "trim"}),
}
BASELINES = {"teacher": "teacher (all-MiniLM-L6-v2), zero-shot", "st": "sentence-transformers MSELoss, 6 layers",
             "pd6": "polydistill, teacher's vocabulary, 6 layers", "pd6x2": "polydistill, teacher's vocabulary, 6 layers, 2 epochs"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--pairs", type=int, default=750, help="training pairs per language (recipe 1's budget)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-pairs", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--length-grouping", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--variants", default="translit,extend,new,new_fvt,translit_new,trim3")
    parser.add_argument("--eval-limit", type=int, help="test pairs per language (smoke runs only; results use all)")
    parser.add_argument("--tables-only", action="store_true", help="rewrite the .md tables from the results file, run nothing")
    parser.add_argument("--langs", help="ISO 639-3 codes of other languages (e.g. hin,kor,vie), for a run on data no recipe used")
    parser.add_argument("--name", default="recipe1-vocabulary", help="results file name (docs/results/NAME.{json,md})")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    langs = {l: l for l in args.langs.split(",")} if args.langs else LANGS

    import torch

    torch.set_num_threads(args.threads)
    work = (args.work or ROOT / "runs" / "benchmarks" / args.name).resolve()
    work.mkdir(parents=True, exist_ok=True)
    teacher = teacher_dir(args.teacher, work)
    train, triples, evals = build_data(args.data, work, args.pairs, args.seed, args.eval_limit, langs)
    sentences = 2 * len(triples) * args.epochs

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "variants": {}}
    previous = args.out / f"{args.name}.json"
    if previous.is_file():
        results["variants"] = json.loads(previous.read_text(encoding="utf-8"))["variants"]
    if args.tables_only:
        return save_tables(args, json.loads(previous.read_text(encoding="utf-8")), list(langs.values()))
    for variant in args.variants.split(","):
        base = variant.removesuffix("_x2")
        if base not in VARIANTS:
            raise SystemExit(f"unknown variant {variant!r}; known: {', '.join(VARIANTS)} (and NAME_x2)")
        epochs = args.epochs * (2 if variant.endswith("_x2") else 1)
        layers = [0, 2, 4] if base == "trim3" else [0, 1, 2, 3, 4, 5]
        print(f"[recipe1-vocabulary] {variant}")
        info: dict[str, Any] = {"vocabulary": VARIANTS[base][1], "epochs": epochs, "layers": layers}
        model_dir, seconds = run_polydistill(teacher, train, work, variant, layers, args, epochs, VARIANTS[base][1])
        with timer(info, "eval_s"):
            info["metrics"] = evaluate(model_dir, evals, args.threads)
        run_dir = model_dir.parent
        if (run_dir / "vocabulary").is_dir():
            info["coverage"] = json.loads((run_dir / "vocabulary" / "coverage.json").read_text())["train"]
            info["build"] = json.loads((run_dir / "vocabulary" / "vocabulary.json").read_text())
        info.update(train_s=round(seconds, 1), sentences_per_s=round(sentences * epochs / args.epochs / seconds, 1))
        results["variants"][variant] = info
        print(f"[recipe1-vocabulary] {variant}: mean {info['metrics']['average']['mean']:.4f}, {seconds:.0f} s")
        save_tables(args, results, list(langs.values()))


def save_tables(args: argparse.Namespace, results: dict[str, Any], langs: list[str]) -> None:
    # recipe 1's baselines, on its languages only
    base = json.loads((args.out / "recipe1.json").read_text(encoding="utf-8"))["variants"] if langs == list(LANGS.values()) else {}
    rows = []
    for key, name in BASELINES.items():
        if key in base:
            m = base[key]["metrics"]
            avg = m["average"]["mean"]
            rows.append([name] + [m["per_language"][l]["mean"] for l in langs] + [avg, f"±{binomial_ci(avg, 1000 * len(langs)):.3f}",
                        f"{base[key]['train_s']:.0f}" if "train_s" in base[key] else "–", "–"])
    order = list(VARIANTS)
    variants = sorted(results["variants"].items(), key=lambda kv: (order.index(kv[0].removesuffix("_x2")), kv[0]))
    for variant, info in variants:
        base_name, x2 = (variant[:-3], True) if variant.endswith("_x2") else (variant, False)
        m = info["metrics"]
        avg = m["average"]["mean"]
        name = "polydistill, " + VARIANTS[base_name][0] + (", 2 epochs" if x2 else "")
        size = f"{info['build']['new_size']:,} / {info['build']['parameters_after'] / 1e6:.1f}M" if "build" in info else "30,522 / 22.7M"
        rows.append([name] + [m["per_language"][l]["mean"] for l in langs] + [avg, f"±{binomial_ci(avg, 1000 * len(langs)):.3f}",
                    f"{info['train_s']:.0f}", size])
    md = table(["model"] + langs + ["mean", "95% CI (test)", "train s", "vocabulary / parameters"], rows)
    cov_rows = []
    for variant, info in variants:
        if "coverage" not in info:
            continue
        cov = info["coverage"]
        cov_rows.append([variant] + [f"{cov[l]['tokens_per_word_before']:.2f} → {cov[l]['tokens_per_word_after']:.2f}" for l in langs + ["en"]])
    md += "\n\nTokens per word on the training text, teacher's vocabulary → the student's:\n\n" + table(["variant"] + langs + ["en"], cov_rows)
    save(args.out, args.name, results, md)


if __name__ == "__main__":
    main()
