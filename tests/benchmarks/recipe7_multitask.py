"""Recipe 7: one multi-task student (topics, tags, embeddings) vs three single-task students.

Teachers (all from all-MiniLM-L6-v2, English only):
  topics  MiniLM + a 7-way head fine-tuned on the English SIB-200 train split (recipe 2);
  tags    MiniLM + a 17-way UPOS head fine-tuned on English UD-EWT train (--ewt sentences, recipe 3);
  embed   MiniLM itself, mean-pooled and normalised (recipe 1).
Student: 3 layers (0, 2, 4) cut once from the topics teacher, with its head; every
student below starts from that encoder (the topics students with its head, the tags
head new in every run), so each has the same size and start.
Distillation data, per task, in --langs and English (no test sentence is trained on):
  topics  parallel mode: the SIB-200 train sentence in each language, the teacher reads
          its English original;
  tags    same mode: unlabelled sentences of the parallel corpora (parallel/), split into
          words; no PUD sentence is read, so PUD is scored whole, zero-shot;
  embed   parallel mode: --pairs English-centric pairs per language (parallel/).
Runs, at the same total step budget --steps:
  multi        one student, a head per task, --steps steps taken in turn (round_robin), so
               each task gets --steps/3 steps; the tasks' losses added as they are
               (weighting: fixed, every weight 1);
  uncertainty  the same with learned weights (weighting: uncertainty), which bring each
               task's weighted loss towards 1 whatever its scale;
  single       three students, one per task, --steps/3 steps each.
Every run uses the same batch size, learning rate and schedule shape and the same
teacher-output cache. Scores: SIB-200 test accuracy, PUD token accuracy, Tatoeba
retrieval accuracy (mean of both directions), per language, --seeds seeds.

    python tests/benchmarks/recipe7_multitask.py --data ../shared/data

Results: docs/results/recipe7.{json,md}.
"""

from __future__ import annotations

import argparse
import random
import re
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from common import ROOT, add_common_args, machine, parallel_pairs, sample, save, table, teacher_dir, timer, write_jsonl
from recipe2_sib200 import cut_student, finetune_teacher, labels_of, read_split
from recipe3_upos import UPOS, pud, read_conllu

#: Short code -> (SIB-200 folder, LASER Tatoeba code, parallel/ code); PUD folders use the short code.
LANGUAGES = {
    "de": ("deu_Latn", "deu", "deu"), "fr": ("fra_Latn", "fra", "fra"), "es": ("spa_Latn", "spa", "spa"),
    "it": ("ita_Latn", "ita", "ita"), "pl": ("pol_Latn", "pol", "pol"), "ru": ("rus_Cyrl", "rus", "rus"),
    "tr": ("tur_Latn", "tur", "tur"), "ar": ("arb_Arab", "ara", "ara"), "hi": ("hin_Deva", "hin", "hin"),
    "zh": ("zho_Hans", "cmn", "zho"),
}
TASKS = {"topics": ("accuracy", "SIB-200 accuracy"), "tags": ("token_accuracy", "PUD UPOS accuracy"),
         "embed": ("mean", "Tatoeba retrieval")}
#: The multi-task arms: name -> multitask.weighting.
MULTI = {"multi": "fixed", "uncertainty": "uncertainty"}
WORD = re.compile(r"\w+|[^\w\s]")


def write_data(data: Path, work: Path, langs: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Each task's training and eval sources (polydistill data sections) and the teachers' English train files."""
    files: dict[str, Any] = {}
    # topics: SIB-200 train in each language, the teacher reading the English row of the same index_id
    english = {r["index_id"]: r for r in read_split(data, "eng_Latn", "train")}
    files["english"] = write_jsonl(work / "sib_english.jsonl",
                                   [{"text": r["text"], "label": r["category"], "lang": "en"} for r in english.values()])
    rows = [{"text": r["text"], "source": r["text"], "lang": "en"} for r in english.values()]
    test = [{"text": r["text"], "label": r["category"], "lang": "en"} for r in read_split(data, "eng_Latn", "test")]
    for lang in langs:
        sib = LANGUAGES[lang][0]
        rows += [{"text": r["text"], "source": english[r["index_id"]]["text"], "lang": lang} for r in read_split(data, sib, "train")]
        test += [{"text": r["text"], "label": r["category"], "lang": lang} for r in read_split(data, sib, "test")]
    files["topics"] = {
        "train": {"path": str(write_jsonl(work / "topics_train.jsonl", rows)), "columns": {"text": "text", "source": "source", "lang": "lang"}},
        "eval": {"path": str(write_jsonl(work / "topics_test.jsonl", test)), "columns": {"text": "text", "label": "label", "lang": "lang"}},
    }
    # tags: unlabelled words of parallel sentences (both sides), PUD whole as the test set
    pairs = {lang: parallel_pairs(data, LANGUAGES[lang][2]) for lang in langs}
    rng = random.Random(args.seed_data)
    untagged = []
    for lang in langs:
        chosen = rng.sample(pairs[lang], min(args.tag_sentences, len(pairs[lang])))
        untagged += [{"words": WORD.findall(xx), "lang": lang} for _, xx in chosen]
        untagged += [{"words": WORD.findall(en), "lang": "en"} for en, _ in chosen[: args.tag_sentences // len(langs)]]
    untagged = [r for r in untagged if r["words"]]
    tagged = [{"words": w, "tags": t, "lang": lang} for lang in ["en", *langs] for w, t in pud(data, lang)]
    files["tags"] = {
        "train": {"path": str(write_jsonl(work / "tags_train.jsonl", untagged)), "columns": {"text": "words", "lang": "lang"}},
        "eval": {"path": str(write_jsonl(work / "tags_test.jsonl", tagged)), "columns": {"text": "words", "label": "tags", "lang": "lang"}},
    }
    ewt = read_conllu(data / "ud_ewt" / "en_ewt-ud-train.conllu.gz")
    ewt = random.Random(args.seed_data).sample(ewt, min(args.ewt, len(ewt)))
    files["ewt"] = write_jsonl(work / "ewt.jsonl", [{"text": w, "label": t, "lang": "en"} for w, t in ewt])
    # embed: English-centric pairs (the student reads both sides), Tatoeba test sets
    triples = [(en, xx, lang) for lang in langs for en, xx in sample(pairs[lang], args.pairs, args.seed_data)]
    rows = [{"text": xx, "source": en, "lang": lang} for en, xx, lang in triples] + [{"text": en, "source": en, "lang": "en"} for en, _, _ in triples]
    tatoeba = data / "tatoeba"
    files["embed"] = {
        "train": {"path": str(write_jsonl(work / "embed_train.jsonl", rows)), "columns": {"text": "text", "source": "source", "lang": "lang"}},
        "eval": [{"aligned": {"en": str(tatoeba / f"tatoeba.{code}-eng.eng"), "xx": str(tatoeba / f"tatoeba.{code}-eng.{code}")},
                  "columns": {"text": "xx", "source": "en"}, "lang": lang, "limit": args.tatoeba}
                 for lang in langs for code in [LANGUAGES[lang][1]]],
        "max_length": 128,
    }
    return files


def finetune_tagger(minilm: Path, files: dict[str, Any], work: Path, args: argparse.Namespace) -> Path:
    import polydistill

    return polydistill.train({
        "task": "token_classification", "labels": UPOS, "student": {"model": str(minilm)},
        "data": {"train": {"path": str(files["ewt"]), "columns": {"label": "label", "lang": "lang"}}, "batch_size": 16},
        "training": {"epochs": args.tags_teacher_epochs, "learning_rate": 1e-4, "warmup_ratio": 0.1, "seed": 0,
                     "num_threads": args.threads, "progress": False, "log_every": 50},
        "output_dir": str(work / "tags-teacher"),
    }).student_dir


def task_sections(files: dict[str, Any], teachers: dict[str, Path], labels: list[str], batch: int) -> dict[str, dict[str, Any]]:
    """Each task's part of a config: the multi-task run's ``tasks`` and, with the shared part, each single-task run."""
    def data(name: str) -> dict[str, Any]:
        return {**files[name], "batch_size": batch}

    return {
        "topics": {"task": "sequence_classification", "mode": "parallel", "labels": labels,
                   "teachers": [{"model": str(teachers["topics"]), "name": "topics_teacher"}], "data": data("topics"),
                   "plugins": {"kd": {"kl": 1.0, "temperature": 2.0}}},
        "tags": {"task": "token_classification", "mode": "same", "labels": UPOS,
                 "teachers": [{"model": str(teachers["tags"]), "name": "tagger"}], "data": data("tags"),
                 "plugins": {"kd": {"kl": 1.0, "temperature": 1.0}}},
        "embed": {"task": "embedding", "mode": "parallel", "teachers": [{"model": str(teachers["embed"]), "name": "minilm"}],
                  "data": data("embed"), "plugins": {"kd": {"mse": 1.0, "normalize": True}}},
    }


def shared(init: Path, steps: int, seed: int, out: Path, work: Path, args: argparse.Namespace) -> dict[str, Any]:
    return {
        "student": {"model": str(init)},
        "training": {"max_steps": steps, "learning_rate": args.lr, "warmup_ratio": 0.1, "seed": seed,
                     "eval_every": steps, "checkpoint_every": steps, "keep_checkpoints": 1,
                     "num_threads": args.threads, "progress": False, "log_every": 25},
        "cache": {"enabled": True, "dir": str(work / "teacher-cache")},
        "output_dir": str(out),
    }


def teacher_scores(teachers: dict[str, Path], sections: dict[str, dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import polydistill

    out = {}
    for name, section in sections.items():
        cfg = {k: v for k, v in section.items() if k not in ("teachers", "plugins", "mode")}
        cfg.update(student={"model": str(teachers[name])}, training={"max_steps": 1, "num_threads": args.threads},
                   data={**section["data"], "train": []})
        out[name] = polydistill.evaluate(cfg)["student"]
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--langs", default="de,fr,es,ru", help=f"target languages, comma-separated, of {', '.join(LANGUAGES)}")
    parser.add_argument("--steps", type=int, default=900, help="total optimizer steps of each comparison (a multiple of 3)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--pairs", type=int, default=750, help="embedding training pairs per language")
    parser.add_argument("--tag-sentences", type=int, default=500, help="unlabelled tagging sentences per language")
    parser.add_argument("--tatoeba", type=int, default=None, help="Tatoeba test pairs per language (default: all 1000)")
    parser.add_argument("--ewt", type=int, default=2000, help="English EWT sentences for the tagging teacher")
    parser.add_argument("--topics-teacher-epochs", type=int, default=5, help="epochs of the topics teacher on English SIB-200")
    parser.add_argument("--tags-teacher-epochs", type=int, default=2, help="epochs of the tagging teacher on English EWT")
    parser.add_argument("--seed-data", type=int, default=0, help="seed of the data subsamples")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "results")
    args = parser.parse_args()
    langs = args.langs.split(",")
    unknown = [l for l in langs if l not in LANGUAGES]
    if unknown:
        parser.error(f"--langs: {', '.join(unknown)} not among {', '.join(LANGUAGES)}")
    if args.steps % 3:
        parser.error("--steps: must be a multiple of 3 (each single-task student gets a third)")

    import torch

    import polydistill

    torch.set_num_threads(args.threads)
    work = (args.work or ROOT / "runs" / "benchmarks" / "recipe7").resolve()
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    minilm = teacher_dir(args.teacher, work)
    labels = labels_of(args.data)
    files = write_data(args.data, work, langs, args)
    times: dict[str, float] = {}
    begin = time.perf_counter()

    with timer(times, "topics_teacher_s"):
        topics_teacher = finetune_teacher(minilm, files, labels, work, argparse.Namespace(
            teacher_epochs=args.topics_teacher_epochs, threads=args.threads), name="topics-teacher")
    with timer(times, "tags_teacher_s"):
        tagger = finetune_tagger(minilm, files, work, args)
    teachers = {"topics": topics_teacher, "tags": tagger, "embed": minilm}
    init = cut_student(topics_teacher, labels, work / "student-init")
    # the single tags and embed students start from the same encoder without the topics head, as the
    # multi-task student's tags and embed heads do
    from transformers import AutoModel, AutoTokenizer
    encoder = work / "student-init-encoder"
    AutoModel.from_pretrained(str(init)).save_pretrained(encoder)
    AutoTokenizer.from_pretrained(str(init)).save_pretrained(encoder)
    sections = task_sections(files, teachers, labels, args.batch)
    with timer(times, "teacher_eval_s"):
        teacher_metrics = teacher_scores(teachers, sections, args)

    runs: dict[str, list[dict[str, Any]]] = {arm: [] for arm in [*MULTI, "single"]}
    learned: list[dict[str, float]] = []
    for seed in range(args.seeds):
        for arm, weighting in MULTI.items():
            out = work / f"{arm}-seed{seed}"
            cfg = {**shared(init, args.steps, seed, out, work, args),
                   "multitask": {"sampling": "round_robin", "weighting": weighting}, "tasks": sections}
            with timer(times, f"{arm}_seed{seed}_s"):
                result = polydistill.train(cfg)
            runs[arm].append(result.metrics["tasks"])
            if weighting == "uncertainty":
                learned.append({k.split("/")[0]: r[k] for r in result.history for k in r if k.endswith("/weight")})
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        single = {}
        for name, section in sections.items():
            out = work / f"{name}-seed{seed}"
            with timer(times, f"{name}_seed{seed}_s"):
                start = init if name == "topics" else encoder
                single[name] = polydistill.train({**shared(start, args.steps // 3, seed, out, work, args), **section}).metrics
            shutil.rmtree(out / "checkpoints", ignore_errors=True)
        runs["single"].append(single)
        print(f"[recipe7] seed {seed}: " + "; ".join(
            f"{name} " + " ".join(f"{arm} {runs[arm][-1][name]['average'][m]:.3f}" for arm in runs)
            for name, (m, _) in TASKS.items()) + f"; learned weights {learned[-1]}")
    times["total_s"] = round(time.perf_counter() - begin, 1)

    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "times": times,
                               "teacher": teacher_metrics, "runs": runs, "learned_weights": learned, "summary": {}}
    md = [f"Total steps {args.steps} per comparison (each task {args.steps // 3}), {args.seeds} seeds, mean ± sd; "
          "Δ = multi-task − single-task, per seed, averaged. *fixed*: losses added as they are; *uncertainty*: "
          "learned weights.", ""]
    for name, (metric, title) in TASKS.items():
        scored = [l for l in ["en", *langs] if l in teacher_metrics[name]["per_language"]]
        rows, summary = [], {}
        for lang in [*scored, "average"]:
            def score(m: dict[str, Any]) -> float:
                return m["average"][metric] if lang == "average" else m["per_language"][lang][metric]
            single = mean_sd([score(r[name]) for r in runs["single"]])
            summary[lang] = {"teacher": score(teacher_metrics[name]), "single": single}
            row = [f"**{lang}**" if lang == "average" else lang, score(teacher_metrics[name]), f"{single[0]:.3f} ± {single[1]:.3f}"]
            for arm in MULTI:
                multi = mean_sd([score(r[name]) for r in runs[arm]])
                deltas = [score(a[name]) - score(b[name]) for a, b in zip(runs[arm], runs["single"])]
                summary[lang].update({arm: multi, f"{arm}_delta": mean_sd(deltas)})
                row += [f"{multi[0]:.3f} ± {multi[1]:.3f}", f"{statistics.mean(deltas):+.3f}"]
            rows.append(row)
        results["summary"][name] = summary
        heads = ["language", "teacher (6 layers)", "single-task"]
        for arm, weighting in MULTI.items():
            heads += [f"multi-task, {weighting}", "Δ"]
        md += [f"**{name}** ({title}, `{metric}`)", "", table(heads, rows), ""]
    md.append("Learned weights at the end (uncertainty), per seed: " + "; ".join(
        ", ".join(f"{k} {v:.2f}" for k, v in w.items()) for w in learned) + ".")
    last = args.seeds - 1  # the first seed's first run also built the teacher-output cache
    md.append(f"Wall time of seed {last}: " + ", ".join(f"multi-task ({w}) {times[f'{a}_seed{last}_s']:.0f} s" for a, w in MULTI.items())
              + f", three single-task runs {sum(times[f'{n}_seed{last}_s'] for n in TASKS):.0f} s; total {times['total_s']:.0f} s.")
    save(args.out, "recipe7", results, "\n".join(md))


if __name__ == "__main__":
    main()
