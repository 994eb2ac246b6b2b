"""``polydistill demo``: cross-lingual distillation on an embedded dataset, offline, in minutes.

1. A multilingual WordPiece vocabulary and a 4-layer teacher are built locally.
2. The teacher is fine-tuned on English labelled sentences only.
3. A 2-layer student is cut from the teacher (DistilBERT-style) and distilled in
   parallel mode: the teacher reads the English sentence, the student reads its
   German, French, Spanish or Italian translation (and the English one). No
   target-language label is used.
4. Teacher, student-before and student-after are scored on held-out sentences
   per language; the table is printed and written as markdown, JSON and PNG.
"""

from __future__ import annotations

import csv
import json
import time
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

LANGS = ["en", "de", "fr", "es", "it"]
DATASET = "topics.tsv"


def read_dataset() -> list[dict[str, str]]:
    """The embedded dataset: id, split, label and one column per language."""
    text = resources.files(__package__).joinpath(DATASET).read_text(encoding="utf-8")
    return list(csv.DictReader(text.splitlines(), delimiter="\t", quoting=csv.QUOTE_NONE))


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def write_data(rows: list[dict[str, str]], data_dir: Path) -> dict[str, Path]:
    """English labelled train, parallel (unlabelled) train and labelled test files."""
    train = [r for r in rows if r["split"] == "train"]
    test = [r for r in rows if r["split"] == "test"]
    files = {"english": data_dir / "english_train.jsonl", "parallel": data_dir / "parallel_train.jsonl", "test": data_dir / "test.jsonl"}
    _write_jsonl(files["english"], [{"text": r["en"], "label": r["label"], "lang": "en"} for r in train])
    _write_jsonl(files["parallel"], [{"source": r["en"], "text": r[lang], "lang": lang} for lang in LANGS for r in train])
    _write_jsonl(files["test"], [{"text": r[lang], "label": r["label"], "lang": lang} for lang in LANGS for r in test])
    return files


def configs(out: Path, files: dict[str, Path], labels: list[str], quick: bool, threads: int | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The teacher fine-tuning config and the distillation config (plain polydistill configs)."""
    test = {"path": str(files["test"]), "columns": {"text": "text", "label": "label", "lang": "lang"}}
    common = {"progress": False, "log_every": 20, "seed": 0, "num_threads": threads}
    teacher = {
        "task": "sequence_classification",
        "labels": labels,
        "student": {"model": str(out / "teacher-init")},
        "data": {"train": {"path": str(files["english"]), "columns": {"label": "label", "lang": "lang"}}, "eval": test, "batch_size": 16},
        "training": {"epochs": 6 if quick else 20, "learning_rate": 1e-3, "warmup_ratio": 0.1, "eval_every": 10_000, **common},
        "output_dir": str(out / "teacher"),
    }
    distill = {
        "task": "sequence_classification",
        "mode": "parallel",
        "teachers": [{"model": str(out / "teacher" / "student"), "name": "teacher"}],
        "student": {"from_teacher": {"teacher": "teacher", "layers": [1, 3]}},
        "data": {
            "train": {"path": str(files["parallel"]), "columns": {"text": "text", "source": "source", "lang": "lang"}},
            "eval": test,
            "batch_size": 32,
        },
        "training": {"epochs": 4 if quick else 12, "learning_rate": 1e-3, "warmup_ratio": 0.05, **common},
        "plugins": {"kd": {"kl": 1.0, "temperature": 2.0}},
        "output_dir": str(out / "student"),
    }
    return teacher, distill


ABLATION = """\
# An ablation of the demo's distillation (distill.yaml): plain KD, then each plugin
# that applies to this task added on its own, three seeds each. Run it with
#   polydistill ablate {study}
# (the report lands in {output_dir}/report; a rerun resumes an interrupted study).
name: demo-ablation
base: distill.yaml
output_dir: {output_dir}
seeds: 3
axes:
  plugins:
    add_one_in:
      adaptive_temperature: {{schedule: linear, start: 4.0, end: 1.0}}
      dropout: {{hidden: 0.2, attention: 0.2}}
      l2: {{sp_alpha: 0.01}}
"""


def run_demo(out: Path, quick: bool = False, threads: int | None = None) -> dict[str, Any]:
    """Run the whole demo into ``out`` (``threads``: torch CPU threads); returns the per-language results."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    import polydistill
    from polydistill import models as M
    from polydistill.api import format_table
    from polydistill.data import load_sources
    from polydistill.evaluation import evaluate_model
    from polydistill.tiny import build_tiny_model, train_tokenizer

    start = time.perf_counter()
    torch.manual_seed(0)
    out = Path(out)
    rows = read_dataset()
    labels = sorted({r["label"] for r in rows})
    files = write_data(rows, out / "data")
    print(f"[demo] {len(rows)} sentences x {len(LANGS)} languages, labels: {', '.join(labels)}")

    train_texts = [r[lang] for r in rows if r["split"] == "train" for lang in LANGS]
    tokenizer = train_tokenizer(train_texts, vocab_size=3000)
    build_tiny_model(
        out / "teacher-init", train_texts, tokenizer=tokenizer, id2label=dict(enumerate(labels)),
        hidden_size=64, num_layers=4, num_heads=4, intermediate_size=128, seed=0,
    )
    teacher_cfg, distill_cfg = configs(out, files, labels, quick, threads)
    for name, cfg in (("teacher.yaml", teacher_cfg), ("distill.yaml", distill_cfg)):
        (out / name).write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
    (out / "ablation.yaml").write_text(ABLATION.format(output_dir=out.resolve() / "ablation", study=out.resolve() / "ablation.yaml"), encoding="utf-8")

    print("[demo] 1/3 fine-tuning the teacher on English only")
    polydistill.train(teacher_cfg, overwrite=True)  # the demo rebuilds its own folder

    print("[demo] 2/3 distilling a 2-layer student through parallel data (teacher reads English)")
    cfg = polydistill.load_config(distill_cfg)
    test = load_sources(cfg.data.eval, cfg)
    teacher = M.load_model(str(out / "teacher" / "student"), cfg.task, labels)
    before = M.student_from_teacher(teacher, [1, 3], cfg.task, labels)
    results = {"teacher": evaluate_model(teacher, tokenizer, test, cfg.task, labels)}
    results["student before"] = evaluate_model(before, tokenizer, test, cfg.task, labels)
    run = polydistill.train(cfg, overwrite=True)
    results["student after"] = run.metrics

    print("[demo] 3/3 results (accuracy on held-out sentences)")
    table = format_table(results, "accuracy")
    print(table)
    (out / "results.md").write_text(
        "# polydistill demo\n\nAccuracy on held-out sentences per language. The teacher was trained on English "
        "labels only; the student learnt the other languages from the teacher through parallel sentences.\n\n"
        + table + "\n\n![per-language accuracy](results.png)\n",
        encoding="utf-8",
    )
    (out / "results.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    plot(results, "accuracy", out / "results.png", chance=1 / len(labels))
    print(f"[demo] wrote {out / 'results.md'} and {out / 'results.png'} in {time.perf_counter() - start:.0f}s")
    print(f"[demo] next, an ablation of the plugins: polydistill ablate {out / 'ablation.yaml'}")
    return results


def plot(results: dict[str, dict[str, Any]], metric: str, path: Path, chance: float | None = None) -> None:
    """Grouped bars: one group per language (plus the average), one bar per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    langs = sorted({lang for r in results.values() for lang in r["per_language"]}, key=lambda l: (l != "en", l))
    groups = langs + ["average"]
    width = 0.8 / len(results)
    fig, ax = plt.subplots(figsize=(8, 4), dpi=120)
    for k, (name, r) in enumerate(results.items()):
        values = [r["per_language"].get(l, {}).get(metric, 0.0) for l in langs] + [r["average"].get(metric, 0.0)]
        xs = [i + (k - (len(results) - 1) / 2) * width for i in range(len(groups))]
        bars = ax.bar(xs, values, width, label=name)
        ax.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", linewidth=1, label=f"chance ({chance:.2f})")
    ax.set_xticks(range(len(groups)), groups)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(metric)
    ax.set_title("Cross-lingual distillation: teacher trained on English only")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=len(results) + 1, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
