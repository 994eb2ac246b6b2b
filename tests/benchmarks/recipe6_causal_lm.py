"""Recipe 6: distilling a small multilingual causal language model (word-level KD and its divergences).

No pretrained LM can be downloaded on the development machine, so the teacher is trained
here with polydistill (a run without teachers) on multilingual news text:

1. Text: NTREX-128 (``parallel/ntrex128``), the English source and its translations into
   ``--langs``; per language the first ``--train-lines`` lines train, the last
   ``--test-lines`` lines test (whole documents apart: NTREX is in document order).
2. A unigram tokenizer (``tokenizers``) on the training text; the teacher, a GPT-2
   (``--teacher-size``: width x layers), is trained from scratch on it.
3. Students, a smaller GPT-2 (``--student-size``) with the same tokenizer, randomly
   initialised, get the same text and step budget, each with ``--seeds`` seeds:
   ``reference`` (next-token cross-entropy, no teacher), ``forward`` (KL(teacher ||
   student) per token, temperature 1, plus cross-entropy), ``reverse`` (reverse KL, plus
   cross-entropy) and ``jsd`` (generalized JSD with beta 0.5, plus cross-entropy).
Test per language: perplexity, next-token accuracy and agreement with the teacher's
most likely token.

    python tests/benchmarks/recipe6_causal_lm.py --data ../shared/data

Results: docs/results/recipe6.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import ROOT, add_common_args, load_times, machine, save, table, timer, unigram_tokenizer, write_jsonl

VARIANTS = {
    "reference": None,
    "forward": {"ce": 1.0, "kl": 1.0, "temperature": 1.0, "divergence": "forward"},
    "reverse": {"ce": 1.0, "kl": 1.0, "temperature": 1.0, "divergence": "reverse"},
    "jsd": {"ce": 1.0, "kl": 1.0, "temperature": 1.0, "divergence": "jsd", "jsd_beta": 0.5},
}


def size(text: str) -> dict[str, int]:
    """``width x layers``, e.g. ``256x4``."""
    d, layers = (int(v) for v in text.split("x"))
    return {"n_embd": d, "n_layer": layers}


def read_text(data: Path, lang: str) -> list[str]:
    root = data / "parallel" / "ntrex128"
    name = "newstest2019-src.eng.txt" if lang == "eng" else f"newstest2019-ref.{lang}.txt"
    return [line.strip() for line in (root / name).read_text(encoding="utf-8").splitlines() if line.strip()]


def init_model(tokenizer_dir: Path, dims: dict[str, int], out: Path, seed: int, max_length: int) -> Path:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = GPT2Config(vocab_size=len(tok), n_positions=max_length, n_head=max(dims["n_embd"] // 64, 1),
                        bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **dims)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run_config(files: dict[str, Path], args: argparse.Namespace, init: Path, out: Path, seed: int, steps: int, lr: float) -> dict[str, Any]:
    columns = {"text": "text", "lang": "lang"}
    return {
        "task": "causal_lm", "mode": "same", "student": {"model": str(init)},
        "data": {"train": {"path": str(files["train"]), "columns": columns}, "eval": {"path": str(files["test"]), "columns": columns},
                 "max_length": args.max_length, "batch_size": args.batch_size},
        "training": {"max_steps": steps, "learning_rate": lr, "warmup_ratio": 0.1, "seed": seed, "num_threads": args.threads,
                     "progress": False, "log_every": 50, "eval_every": steps, "checkpoint_every": steps},
        "output_dir": str(out),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--langs", type=lambda s: s.split(","), default=["eng", "deu", "rus", "ell", "tur"],
                        help="NTREX languages (ISO 639-3), comma-separated; eng is the source side")
    parser.add_argument("--train-lines", type=int, default=1700)
    parser.add_argument("--test-lines", type=int, default=200)
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--teacher-size", type=size, default=size("256x4"))
    parser.add_argument("--teacher-steps", type=int, default=1500)
    parser.add_argument("--student-size", type=size, default=size("128x2"))
    parser.add_argument("--student-steps", type=int, default=600)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    work = args.work or ROOT / "runs" / "benchmarks" / "recipe6"
    work.mkdir(parents=True, exist_ok=True)

    import polydistill

    begin = time.perf_counter()
    times_file, times = load_times(work)
    texts = {lang: read_text(args.data, lang) for lang in args.langs}
    train = [{"text": t, "lang": lang} for lang, lines in texts.items() for t in lines[: args.train_lines]]
    test = [{"text": t, "lang": lang} for lang, lines in texts.items() for t in lines[-args.test_lines:]]
    files = {"train": write_jsonl(work / "train.jsonl", train), "test": write_jsonl(work / "test.jsonl", test)}
    tokenizer = unigram_tokenizer([r["text"] for r in train], args.vocab_size, work / "tokenizer")

    teacher_run = work / "teacher"
    if not (teacher_run / "metrics.json").is_file():
        init = init_model(work / "tokenizer", args.teacher_size, work / "teacher-init", 0, args.max_length)
        with timer(times, "teacher_train_s"):
            polydistill.train(run_config(files, args, init, teacher_run, 0, args.teacher_steps, 1e-3))
        times_file.write_text(json.dumps(times, indent=1))
    teacher = teacher_run / "student"
    results: dict[str, Any] = {"teacher": json.loads((teacher_run / "metrics.json").read_text()), "students": {}}
    for variant in args.variants:
        for seed in range(args.seeds):
            run = work / f"{variant}-seed{seed}"
            if not (run / "metrics.json").is_file():
                init = init_model(work / "tokenizer", args.student_size, work / f"student-init-seed{seed}", seed, args.max_length)
                cfg = run_config(files, args, init, run, seed, args.student_steps, 2e-3)
                # every run is scored against the teacher (teacher_agreement); the reference one learns nothing from it
                cfg["teachers"] = [{"model": str(teacher), "name": "teacher"}]
                cfg["plugins"] = {"kd": VARIANTS[variant] or {"ce": 1.0, "kl": 0.0}}
                with timer(times, f"{variant}-seed{seed}_s"):
                    polydistill.train(cfg)
                times_file.write_text(json.dumps(times, indent=1))
            results["students"][f"{variant}-seed{seed}"] = json.loads((run / "metrics.json").read_text())
            print(variant, seed, results["students"][f"{variant}-seed{seed}"]["average"], flush=True)
    times["this_invocation_s"] = round(time.perf_counter() - begin, 1)
    results.update(args={k: str(v) for k, v in vars(args).items()}, machine=machine(), times=times, vocab=len(tokenizer),
                   lines={"train": len(train), "test": len(test)})
    save(args.out, "recipe6", json.loads(json.dumps(results, default=str)), report(results, args))


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    langs = args.langs
    header = ["model", *[f"{lang} ppl" for lang in langs], "mean ppl", "next-token acc", "teacher agreement"]
    t = results["teacher"]
    rows = [["teacher {n_embd}x{n_layer}".format(**args.teacher_size), *[f"{t['per_language'][l]['perplexity']:.1f}" for l in langs],
             f"{t['average']['perplexity']:.1f}", f"{t['average']['next_token_accuracy']:.3f}", "–"]]
    for variant in args.variants:
        runs = [results["students"][f"{variant}-seed{s}"] for s in range(args.seeds)]

        def cell(get: Any, fmt: str) -> str:
            vals = [get(r) for r in runs]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            return f"{statistics.mean(vals):{fmt}} ± {sd:{fmt}}"

        rows.append([f"{variant} " + "{n_embd}x{n_layer}".format(**args.student_size),
                     *[cell(lambda r, l=l: r["per_language"][l]["perplexity"], ".1f") for l in langs],
                     cell(lambda r: r["average"]["perplexity"], ".1f"), cell(lambda r: r["average"]["next_token_accuracy"], ".3f"),
                     cell(lambda r: r["average"]["teacher_agreement"], ".3f")])
    return "\n".join([f"Recipe 6: causal LM on NTREX-128 ({', '.join(langs)}), {args.test_lines} test lines per language; "
                      f"students: mean ± std over {args.seeds} seeds, {args.student_steps} steps each.", "", table(header, rows),
                      "", f"- times (s): {results['times']}"])


if __name__ == "__main__":
    main()
