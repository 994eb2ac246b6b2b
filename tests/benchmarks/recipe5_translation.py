"""Recipe 5: translation distillation (Kim & Rush 2016) from English into several languages.

No pretrained MT model can be downloaded on the development machine, so the teacher is
trained here, with polydistill itself (a run without teachers):

1. A joint unigram tokenizer (``common.unigram_tokenizer``: decoding gives back the text)
   is trained on the training pairs; the target language is a tag token at the start of
   the source (``>>deu<<``, the opus-mt convention), so one model serves every language.
2. The teacher, a Marian encoder-decoder (``--teacher-size``), is trained from scratch on
   the English-centric pairs of ``parallel/`` (Tatoeba-Challenge with every LASER
   Tatoeba test pair removed, plus NTREX-128), pairs longer than ``--max-length`` tokens
   dropped.
3. Students of one smaller size (``--student-size``), randomly initialised, get the same
   data and step budget, each with ``--seeds`` seeds:
   - ``reference``: cross-entropy with the reference translations (no teacher);
   - ``word``: word-level KD, KL(teacher || student) at every reference token, plus
     cross-entropy (weights 0.5 / 0.5, temperature 1);
   - ``sequence``: sequence-level KD, cross-entropy with the teacher's beam output
     (decoded once per source, cached; the decoding time is reported);
   - ``both``: word-level KD along the teacher's beam output, plus cross-entropy with it.
Test: each language's LASER Tatoeba test pairs (English -> language, never in
training), BLEU and chrF (sacrebleu) with the same beam decoding for every model.

    python tests/benchmarks/recipe5_translation.py --data ../shared/data

Results: docs/results/recipe5.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

from common import ROOT, add_common_args, load_times, machine, parallel_pairs, save, table, timer, unigram_tokenizer, write_jsonl

VARIANTS = {
    "reference": {"teacher": False, "kd": {"ce": 1.0, "kl": 0.0}},
    "word": {"teacher": True, "kd": {"ce": 0.5, "kl": 0.5, "temperature": 1.0}},
    "sequence": {"teacher": True, "kd": {"ce": 1.0, "kl": 0.0}, "sequence_kd": True},
    "both": {"teacher": True, "kd": {"ce": 0.5, "kl": 0.5, "temperature": 1.0}, "sequence_kd": True},
}


def size(text: str) -> dict[str, int]:
    """``d_model x encoder layers x decoder layers``, e.g. ``256x3x3``."""
    d, enc, dec = (int(v) for v in text.split("x"))
    return {"d_model": d, "encoder_layers": enc, "decoder_layers": dec}


def laser_pairs(data: Path, lang: str) -> list[tuple[str, str]]:
    base = data / "tatoeba" / f"tatoeba.{lang}-eng"
    src = Path(f"{base}.eng").read_text(encoding="utf-8").splitlines()
    tgt = Path(f"{base}.{lang}").read_text(encoding="utf-8").splitlines()
    return [(a.strip(), b.strip()) for a, b in zip(src, tgt) if a.strip() and b.strip()]


def write_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Training and test files (rows: text = tag + English, target, lang) and the tokenizer."""
    tags = {lang: f">>{lang}<<" for lang in args.langs}
    train = {lang: parallel_pairs(args.data, lang) for lang in args.langs}
    tokenizer = unigram_tokenizer([t for pairs in train.values() for p in pairs for t in p], args.vocab_size,
                                  work / "tokenizer", list(tags.values()), end_token=True)
    rows, dropped = [], {}
    for lang, pairs in train.items():
        keep = [(a, b) for a, b in pairs
                if len(tokenizer(a)["input_ids"]) < args.max_length and len(tokenizer(b)["input_ids"]) <= args.max_length]
        dropped[lang] = len(pairs) - len(keep)
        rows += [{"text": f"{tags[lang]} {a}", "target": b, "lang": lang} for a, b in keep]
    test = [{"text": f"{tags[lang]} {a}", "target": b, "lang": lang} for lang in args.langs for a, b in laser_pairs(args.data, lang)]
    train_words = {p[0] for pairs in train.values() for p in pairs}
    leaked = sum(1 for r in test if r["text"].split(" ", 1)[1] in train_words)
    return {"train": write_jsonl(work / "train.jsonl", rows), "test": write_jsonl(work / "test.jsonl", test),
            "tokenizer": work / "tokenizer", "vocab": len(tokenizer), "pad": tokenizer.pad_token_id, "eos": tokenizer.eos_token_id,
            "train_pairs": {lang: len(p) - dropped[lang] for lang, p in train.items()}, "dropped_long": dropped,
            "test_pairs": {lang: sum(r["lang"] == lang for r in test) for lang in args.langs}, "test_sources_in_train": leaked}


def init_model(files: dict[str, Any], dims: dict[str, int], out: Path, seed: int) -> Path:
    """A randomly initialised Marian model of ``dims`` with the recipe's tokenizer."""
    import torch
    from transformers import AutoTokenizer, MarianConfig, MarianMTModel

    d = dims["d_model"]
    config = MarianConfig(vocab_size=files["vocab"], d_model=d, encoder_layers=dims["encoder_layers"],
                          decoder_layers=dims["decoder_layers"], encoder_attention_heads=max(d // 64, 1),
                          decoder_attention_heads=max(d // 64, 1), encoder_ffn_dim=4 * d, decoder_ffn_dim=4 * d,
                          max_position_embeddings=256, pad_token_id=files["pad"], eos_token_id=files["eos"],
                          decoder_start_token_id=files["pad"], forced_eos_token_id=files["eos"],
                          dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, scale_embedding=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MarianMTModel(config)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(files["tokenizer"]).save_pretrained(out)
    return out


def base_config(files: dict[str, Any], args: argparse.Namespace, init: Path, out: Path, seed: int, steps: int, lr: float) -> dict[str, Any]:
    return {
        "task": "seq2seq", "mode": "same", "student": {"model": str(init)},
        "data": {"train": {"path": str(files["train"]), "columns": {"text": "text", "target": "target", "lang": "lang"}},
                 "eval": {"path": str(files["test"]), "columns": {"text": "text", "target": "target", "lang": "lang"}},
                 "max_length": args.max_length, "batch_size": args.batch_size},
        "generation": {"num_beams": args.beams, "max_new_tokens": args.max_length},
        "training": {"max_steps": steps, "learning_rate": lr, "warmup_ratio": 0.1, "scheduler": "linear", "seed": seed,
                     "num_threads": args.threads, "progress": False, "log_every": 50,
                     "eval_every": steps, "checkpoint_every": steps},  # evaluated and saved once, at the end
        "cache": {"dir": str(out.parent / "cache")},
        "output_dir": str(out),
    }


def scores(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))


def decode_cost(run_dir: Path) -> dict[str, float]:
    """Sources the sequence_kd plugin decoded and the seconds it spent, summed over the run's log
    (each record holds the mean per step since the previous record)."""
    decoded = seconds = 0.0
    last = 0
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        entry = json.loads(line)
        if "sequence_kd/decode_s" in entry:
            steps = entry["step"] - last
            decoded += entry["sequence_kd/decoded"] * steps
            seconds += entry["sequence_kd/decode_s"] * steps
            last = entry["step"]
    return {"decoded": round(decoded), "seconds": round(seconds, 1)}


def n_params(model_dir: Path) -> int:
    from safetensors.torch import load_file

    return sum(t.numel() for t in load_file(str(model_dir / "model.safetensors")).values())


def report(results: dict[str, Any], args: argparse.Namespace) -> str:
    langs = args.langs
    metrics = ("bleu", "chrf")
    header = ["model", "steps", *[f"{lang} {m.upper() if m == 'bleu' else 'chrF'}" for lang in langs for m in metrics], "train s"]
    t = results["teacher"]["per_language"]
    rows = [["teacher " + results["sizes"]["teacher"], args.teacher_steps,
             *[f"{t[lang][m]:.1f}" for lang in langs for m in metrics], results["times"].get("teacher_train_s", "(earlier run)")]]
    for variant in args.variants:
        runs = [results["students"][f"{variant}-seed{s}"]["per_language"] for s in range(args.seeds)]
        cells = []
        for lang in langs:
            for m in metrics:
                vals = [r[lang][m] for r in runs]
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cells.append(f"{statistics.mean(vals):.1f} ± {sd:.1f}")
        secs = [results["times"].get(f"{variant}-seed{s}_s") for s in range(args.seeds)]
        rows.append([f"{variant} " + results["sizes"]["student"], args.student_steps, *cells,
                     " / ".join(str(s) for s in secs if s is not None) or "(earlier run)"])
    lines = [f"Recipe 5: English -> {', '.join(langs)}, LASER Tatoeba test pairs, beam {args.beams}; "
             f"students: mean ± std over {args.seeds} seeds.", "", table(header, rows), ""]
    cost = results.get("sequence_kd_cost", {})
    for run, c in cost.items():
        lines.append(f"- {run}: sequence_kd decoded {c['decoded']} sources in {c['seconds']} s")
    lines.append(f"- signatures: {results['teacher']['signature']}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_common_args(parser)
    parser.add_argument("--langs", type=lambda s: s.split(","), default=["deu", "spa"], help="target languages (ISO 639-3), comma-separated")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--max-length", type=int, default=40, help="tokens per side; longer training pairs are dropped")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--beams", type=int, default=4, help="beam width of evaluation and of the teacher's decoding")
    parser.add_argument("--teacher-size", type=size, default=size("256x3x3"))
    parser.add_argument("--teacher-steps", type=int, default=2500)
    parser.add_argument("--student-size", type=size, default=size("128x2x2"))
    parser.add_argument("--student-steps", type=int, default=1200)
    parser.add_argument("--teacher-lr", type=float, default=7e-4)
    parser.add_argument("--student-lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=list(VARIANTS))
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    work = args.work or ROOT / "runs" / "benchmarks" / "recipe5"
    work.mkdir(parents=True, exist_ok=True)

    import polydistill

    begin = time.perf_counter()
    times_file, times = load_times(work)
    with timer(times, "data_s"):
        files = write_data(args, work)
    print({k: v for k, v in files.items() if k not in ("train", "test", "tokenizer")}, flush=True)

    teacher_run = work / "teacher"
    if not (teacher_run / "student" / "metrics.json").is_file():
        init = init_model(files, args.teacher_size, work / "teacher-init", seed=0)
        with timer(times, "teacher_train_s"):
            polydistill.train(base_config(files, args, init, teacher_run, 0, args.teacher_steps, args.teacher_lr))
        times_file.write_text(json.dumps(times, indent=1))
    teacher = teacher_run / "student"
    results: dict[str, Any] = {"teacher": scores(teacher_run), "students": {}, "sequence_kd_cost": {},
                               "sizes": {}, "params": {"teacher": n_params(teacher)}}
    print("teacher", results["teacher"]["per_language"], flush=True)

    for variant in args.variants:
        spec = VARIANTS[variant]
        for seed in range(args.seeds):
            run = work / f"{variant}-seed{seed}"
            if not (run / "student" / "metrics.json").is_file():
                init = init_model(files, args.student_size, work / f"student-init-seed{seed}", seed=seed)
                cfg = base_config(files, args, init, run, seed, args.student_steps, args.student_lr)
                if spec["teacher"]:
                    cfg["teachers"] = [{"model": str(teacher), "name": "teacher"}]
                cfg["plugins"] = {"kd": dict(spec["kd"])}
                if spec.get("sequence_kd"):
                    cfg["plugins"]["sequence_kd"] = {"num_beams": args.beams, "max_new_tokens": args.max_length}
                with timer(times, f"{variant}-seed{seed}_s"):
                    polydistill.train(cfg)
                times_file.write_text(json.dumps(times, indent=1))
            results["students"][f"{variant}-seed{seed}"] = scores(run)
            results["params"]["student"] = n_params(run / "student")
            if spec.get("sequence_kd"):
                results["sequence_kd_cost"][f"{variant}-seed{seed}"] = decode_cost(run)
            print(variant, seed, results["students"][f"{variant}-seed{seed}"]["per_language"], flush=True)
    times["this_invocation_s"] = round(time.perf_counter() - begin, 1)
    results.update(args={k: str(v) for k, v in vars(args).items()}, machine=machine(), times=times, data=files)
    results["sizes"] = {role: "{d_model}x{encoder_layers}x{decoder_layers}".format(**dims) + f" ({results['params'].get(role, 0) / 1e6:.1f}M)"
                        for role, dims in (("teacher", args.teacher_size), ("student", args.student_size))}
    results = json.loads(json.dumps(results, default=str))
    save(args.out, "recipe5", results, report(results, args))


if __name__ == "__main__":
    main()
