"""Speed: polydistill against a hand-written PyTorch loop, TextBrewer and sentence-transformers.

Workloads (variants interleaved in one process, repeated; medians and ratios reported):
  w1        logit KD, sequence classification with 3 labels: KL(T=2)·T² + CE, AdamW, fp32,
            batch 32. Teacher all-MiniLM-L6-v2 with a seeded 3-label head, student its
            layers 0, 2, 4. Data: English Tatoeba sentences, labels from a hash (speed only).
            Variants: hand-written loop (teacher under inference_mode, pad to 64), TextBrewer
            GeneralDistiller, polydistill padded to 64, a hand-written loop and polydistill
            with length-aware batching (dynamic padding), polydistill with length-aware
            batching and the teacher-output cache (epoch 1 fills it, epoch 2 reads it),
            polydistill with five no-op plugins that implement every hook, and polydistill
            with the student's vocabulary trimmed to the training text (student.vocabulary).
  w2        multilingual embedding distillation on parallel pairs (8 languages): MSE to the
            teacher's normalised embeddings, 3-layer student, both sides of each pair.
            sentence-transformers' MSELoss recipe (teacher embeddings precomputed, counted in
            its wall time) against polydistill (teacher on the fly, cache on), same examples.
  hooks     the plugin machinery alone: the hook calls of one step with 0 and 5 no-op plugins.
  memory    peak RSS of each w1/w2 variant, each in its own process (peak RSS is per process).

    python tests/benchmarks/speed.py --data ../shared/data

Results: docs/benchmarks/speed.{json,md}; docs/benchmarks.md discusses them.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any, Callable

from common import LANGS, ROOT, add_common_args, machine, parallel_pairs, sample, table, teacher_dir, write_jsonl

BATCH = 32
MAX_LEN = 64
TEMPERATURE = 2.0
LR = 5e-5


# ---------------------------------------------------------------- models and data


def build_models(minilm: Path, work: Path) -> dict[str, Path]:
    """Save the W1 teacher (MiniLM + seeded 3-label head), its 3-layer student, and W2's 3-layer encoder."""
    import torch
    from torch import nn
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    paths = {k: work / k for k in ("w1-teacher", "w1-student", "w2-student")}
    if all((p / "config.json").is_file() for p in paths.values()):
        return paths
    tok = AutoTokenizer.from_pretrained(minilm)
    torch.manual_seed(0)
    labels = {0: "a", 1: "b", 2: "c"}
    teacher = AutoModelForSequenceClassification.from_pretrained(minilm, num_labels=3, id2label=labels, label2id={v: k for k, v in labels.items()})
    teacher.save_pretrained(paths["w1-teacher"])
    tok.save_pretrained(paths["w1-teacher"])
    for name, model in (("w1-student", teacher), ("w2-student", AutoModel.from_pretrained(minilm))):
        base = model.bert if hasattr(model, "bert") else model
        keep = [0, 2, 4]
        full = base.encoder.layer
        base.encoder.layer = nn.ModuleList([full[i] for i in keep])
        model.config.num_hidden_layers = len(keep)
        model.save_pretrained(paths[name])
        tok.save_pretrained(paths[name])
        base.encoder.layer = full
        model.config.num_hidden_layers = len(full)
    return paths


def english_sentences(data: Path, n: int, seed: int = 0) -> list[str]:
    seen: dict[str, None] = {}
    for f in sorted((data / "tatoeba").glob("tatoeba.*-eng.eng")):
        for line in f.read_text(encoding="utf-8").splitlines():
            if line.strip():
                seen.setdefault(line.strip(), None)
    texts = list(seen)
    random.Random(seed).shuffle(texts)
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} English Tatoeba sentences, need {n}")
    return texts[:n]


def label_of(text: str) -> int:
    return zlib.crc32(text.encode("utf-8")) % 3


# ---------------------------------------------------------------- W1 variants


def hand_loop(paths: dict[str, Path], texts: list[str], steps: int, warmup: int, grouped: bool, fused: bool = False) -> dict[str, float]:
    """The baseline: a plain PyTorch loop. Returns samples/s over the steps after ``warmup``."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(paths["w1-teacher"])
    teacher = AutoModelForSequenceClassification.from_pretrained(paths["w1-teacher"]).eval()
    student = AutoModelForSequenceClassification.from_pretrained(paths["w1-student"]).train()
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.01, fused=fused or None)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=steps)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(0)).tolist()
    batches = [order[i : i + BATCH] for i in range(0, len(order), BATCH)][:steps]
    if grouped:  # sort by length, cut, shuffle the batches: what a careful hand-written loop does
        lengths = [len(t) for t in tok(texts, truncation=True, max_length=MAX_LEN)["input_ids"]]
        by_len = sorted(range(len(texts)), key=lambda i: lengths[i])
        batches = [by_len[i : i + BATCH] for i in range(0, len(by_len), BATCH)][:steps]
        random.Random(0).shuffle(batches)
    marks, teacher_s = [], 0.0
    for step, idx in enumerate(batches):
        if step == warmup:
            marks.append(time.perf_counter())
            teacher_s = 0.0
        batch_texts = [texts[i] for i in idx]
        enc = tok(batch_texts, padding="longest" if grouped else "max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt")
        labels = torch.tensor([label_of(t) for t in batch_texts])
        t0 = time.perf_counter()
        with torch.inference_mode():
            t_logits = teacher(**enc).logits
        teacher_s += time.perf_counter() - t0
        s_logits = student(**enc).logits
        kl = F.kl_div(F.log_softmax(s_logits / TEMPERATURE, -1), F.log_softmax(t_logits / TEMPERATURE, -1), log_target=True,
                      reduction="batchmean") * TEMPERATURE**2
        loss = kl + F.cross_entropy(s_logits, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        float(loss)  # a loop that logs its loss reads it every step
    marks.append(time.perf_counter())
    seconds = marks[1] - marks[0]
    return {"samples_per_s": (steps - warmup) * BATCH / seconds, "teacher_share": teacher_s / seconds}


def textbrewer_loop(paths: dict[str, Path], texts: list[str], steps: int, warmup: int, work: Path) -> dict[str, float]:
    """TextBrewer's GeneralDistiller on the same models, padding and objective (kd 'ce' · T² = KL · T² + const)."""
    import textbrewer
    import torch
    from textbrewer import DistillationConfig, GeneralDistiller, TrainingConfig
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_scheduler

    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(paths["w1-teacher"])
    teacher = AutoModelForSequenceClassification.from_pretrained(paths["w1-teacher"]).eval()
    student = AutoModelForSequenceClassification.from_pretrained(paths["w1-student"]).train()
    opt = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.01)
    sched = get_scheduler("linear", opt, num_warmup_steps=0, num_training_steps=steps)

    def collate(batch_texts: list[str]) -> dict[str, Any]:
        enc = dict(tok(batch_texts, padding="max_length", truncation=True, max_length=MAX_LEN, return_tensors="pt"))
        enc["labels"] = torch.tensor([label_of(t) for t in batch_texts])
        return enc

    loader = torch.utils.data.DataLoader(texts, batch_size=BATCH, shuffle=True, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    marks: list[float] = []

    def stamp(batch: Any) -> Any:  # called before each step: the only per-step hook TextBrewer offers
        marks.append(time.perf_counter())
        return batch

    out = work / "textbrewer"
    shutil.rmtree(out, ignore_errors=True)
    distiller = GeneralDistiller(
        train_config=TrainingConfig(device="cpu", output_dir=str(out), ckpt_steps=10**9),
        distill_config=DistillationConfig(temperature=TEMPERATURE, kd_loss_type="ce", kd_loss_weight=TEMPERATURE**2, hard_label_weight=1.0),
        model_T=teacher, model_S=student,
        adaptor_T=lambda batch, out: {"logits": out.logits},
        adaptor_S=lambda batch, out: {"logits": out.logits, "losses": out.loss},
    )
    import logging

    logging.getLogger("textbrewer").setLevel(logging.WARNING)
    with distiller:
        distiller.train(opt, loader, scheduler=sched, num_steps=steps, max_grad_norm=1.0, batch_postprocessor=stamp)
    del textbrewer
    # marks[i] is the start of step i: steps warmup .. steps-2 are complete between these two
    return {"samples_per_s": (steps - 1 - warmup) * BATCH / (marks[steps - 1] - marks[warmup])}


def pd_config(paths: dict[str, Path], train: Path, work: Path, name: str, steps: int, warmup: int, grouped: bool,
              cache: Path | None = None, epochs: int | None = None) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "task": "sequence_classification",
        "teachers": [{"model": str(paths["w1-teacher"])}],
        "student": {"model": str(paths["w1-student"])},
        "data": {"train": {"path": str(train), "columns": {"text": "text", "label": "label"}}, "batch_size": BATCH, "max_length": MAX_LEN,
                 "padding": "longest" if grouped else "max_length", "length_grouping": grouped},
        "training": {"max_steps": steps, "learning_rate": LR, "weight_decay": 0.01, "scheduler": "linear",
                     "log_every": warmup, "progress": False, "seed": 0},
        "plugins": {"kd": {"kl": 1.0, "ce": 1.0, "temperature": TEMPERATURE}},
        "cache": {"enabled": cache is not None, "dir": str(cache) if cache else None},
        "output_dir": str(work / name),
    }
    if epochs:
        cfg["training"].pop("max_steps")
        cfg["training"]["epochs"] = epochs
    return cfg


def rate_between(history: list[dict[str, Any]], first: int, last: int) -> float:
    """Samples/s from the ``elapsed_s`` the loop logs at steps ``first`` and ``last``."""
    at = {row["step"]: row["elapsed_s"] for row in history if "elapsed_s" in row}
    return (last - first) * BATCH / (at[last] - at[first])


def pd_run(cfg: dict[str, Any], plugins: list[tuple[str, Any]] | None = None) -> list[dict[str, Any]]:
    import polydistill
    from polydistill.loop import Trainer

    shutil.rmtree(cfg["output_dir"], ignore_errors=True)
    trainer = Trainer(cfg, plugins=plugins or [])
    trainer.fit()
    del polydistill
    return trainer.state.history


class NoOp:
    """A plugin that implements every hook and changes nothing."""

    def __init__(self) -> None:
        import polydistill

        for name in polydistill.hookspecs.STEP_HOOKS + polydistill.hookspecs.LIFECYCLE_HOOKS:
            setattr(self, name, polydistill.hookimpl(_noop_for(name)))


def _noop_for(name: str) -> Callable[..., Any]:
    import inspect

    import polydistill

    params = list(inspect.signature(getattr(polydistill.hookspecs, name)).parameters)

    def impl(**kwargs: Any) -> Any:
        return None

    impl.__signature__ = inspect.Signature([inspect.Parameter(p, inspect.Parameter.KEYWORD_ONLY) for p in params])  # type: ignore[attr-defined]
    impl.__name__ = name
    return impl


def noop_plugins(n: int = 5) -> list[tuple[str, Any]]:
    return [(f"noop{i}", NoOp()) for i in range(n)]


# ---------------------------------------------------------------- W2


def w2_pairs(data: Path, pairs: int) -> list[tuple[str, str]]:
    per = max(1, pairs // len(LANGS))
    out: list[tuple[str, str]] = []
    for lang3 in LANGS:
        out += sample(parallel_pairs(data, lang3), per, 0)
    return out


def w2_st(paths: dict[str, Path], minilm: Path, pairs: list[tuple[str, str]], work: Path) -> dict[str, float]:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.sentence_transformer import modules as models
    from sentence_transformers.sentence_transformer.losses import MSELoss

    out = work / "w2-st"
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    teacher = SentenceTransformer(str(minilm), device="cpu")
    enc = models.Transformer(str(paths["w2-student"]), max_seq_length=128)
    student = SentenceTransformer(modules=[enc, models.Pooling(enc.get_word_embedding_dimension(), "mean"), models.Normalize()], device="cpu")
    english = [en for en, _ in pairs]
    labels = teacher.encode(english, batch_size=64, convert_to_numpy=True, show_progress_bar=False)
    ds = Dataset.from_dict({"english": english, "non_english": [xx for _, xx in pairs], "label": labels.tolist()})
    args = SentenceTransformerTrainingArguments(
        output_dir=str(out), num_train_epochs=1, per_device_train_batch_size=BATCH, learning_rate=1e-4, warmup_ratio=0.1,
        weight_decay=0.01, seed=0, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, logging_steps=10**6,
    )
    SentenceTransformerTrainer(model=student, args=args, train_dataset=ds, loss=MSELoss(student)).train()
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples_per_s": 2 * len(pairs) / seconds}


def w2_pd(paths: dict[str, Path], minilm: Path, pairs: list[tuple[str, str]], work: Path) -> dict[str, float]:
    import polydistill

    rows = [{"text": xx, "source": en} for en, xx in pairs] + [{"text": en, "source": en} for en, _ in pairs]
    train = write_jsonl(work / "w2-train.jsonl", rows)
    out = work / "w2-pd"
    shutil.rmtree(out, ignore_errors=True)
    cfg = {
        "task": "embedding", "mode": "parallel",
        "teachers": [{"model": str(minilm)}],
        "student": {"model": str(paths["w2-student"])},
        "data": {"train": {"path": str(train), "columns": {"text": "text", "source": "source"}}, "batch_size": 2 * BATCH,
                 "max_length": 128},
        "training": {"epochs": 1, "learning_rate": 1e-4, "warmup_ratio": 0.1, "weight_decay": 0.01, "progress": False, "seed": 0},
        "plugins": {"kd": {"mse": 1.0, "normalize": True}},
        "cache": {"enabled": True, "dir": str(out / "cache")},  # fresh each run: the teacher's time is counted
        "output_dir": str(out),
    }
    start = time.perf_counter()
    polydistill.train(cfg)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "samples_per_s": 2 * len(pairs) / seconds}


# ---------------------------------------------------------------- hooks alone


def hook_overhead(paths: dict[str, Path], train: Path, work: Path, calls: int) -> dict[str, float]:
    """Seconds per step of the step hooks' dispatch, with no plugins but kd and with 5 no-ops added."""
    import torch

    from polydistill.loop import Trainer

    out = {}
    for label, plugins in (("kd only", []), ("kd + 5 no-ops", noop_plugins())):
        cfg = pd_config(paths, train, work, "hooks", 1, 1, True)
        trainer = Trainer(cfg, plugins=plugins)
        state, host = trainer.state, trainer.host
        batch = next(iter(trainer.loader.iterate(0)))
        zero = {"kl": torch.zeros(())}
        start = time.perf_counter()
        for _ in range(calls):
            host.augment_batch(batch, state)
            host.single("select_teachers", batch=batch, teachers=state.teachers, state=state)
            host.single("teacher_outputs", batch=batch, teachers=state.teachers, weights=None, state=state)
            host.merged("regularize", taken=zero, student=state.student, state=state)
            host.call("on_step_end", state=state, logs={})
        out[label] = (time.perf_counter() - start) / calls
    return out


# ---------------------------------------------------------------- driver


W1_VARIANTS = ["hand", "textbrewer", "hand_fused", "pd", "hand_grouped", "pd_grouped", "pd_grouped_cache", "pd_grouped_noops",
               "pd_grouped_trim"]
W2_VARIANTS = ["st", "pd"]


def run_w1(variant: str, paths: dict[str, Path], texts: list[str], train: Path, work: Path, steps: int, warmup: int) -> dict[str, float]:
    if variant == "hand":
        return hand_loop(paths, texts, steps, warmup, grouped=False)
    if variant == "hand_grouped":
        return hand_loop(paths, texts, steps, warmup, grouped=True)
    if variant == "hand_fused":
        return hand_loop(paths, texts, steps, warmup, grouped=False, fused=True)
    if variant == "textbrewer":
        return textbrewer_loop(paths, texts, steps, warmup, work)
    if variant in ("pd", "pd_grouped", "pd_grouped_noops"):
        grouped = variant != "pd"
        history = pd_run(pd_config(paths, train, work, variant, steps, warmup, grouped),
                         noop_plugins() if variant == "pd_grouped_noops" else None)
        return {"samples_per_s": rate_between(history, warmup, steps)}
    if variant == "pd_grouped_trim":  # the student's vocabulary trimmed to the training text (student.vocabulary)
        cfg = pd_config(paths, train, work, variant, steps, warmup, True)
        cfg["student"]["vocabulary"] = {"method": "trim"}
        history = pd_run(cfg)
        built = json.loads((work / variant / "vocabulary" / "vocabulary.json").read_text(encoding="utf-8"))
        return {"samples_per_s": rate_between(history, warmup, steps), "vocabulary": built["new_size"],
                "parameters": built["parameters_after"], "parameters_untrimmed": built["parameters_before"]}
    if variant == "pd_grouped_cache":
        cache = work / "cache-w1"
        shutil.rmtree(cache, ignore_errors=True)  # epoch 1 fills it, epoch 2 reads it
        history = pd_run(pd_config(paths, train, work, variant, steps, warmup, True, cache=cache, epochs=2))
        return {"samples_per_s": rate_between(history, warmup, steps),  # epoch 1: cold, writing
                "warm_samples_per_s": rate_between(history, steps + warmup, 2 * steps)}
    raise SystemExit(f"unknown w1 variant {variant!r}")


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def memory_child(args: argparse.Namespace) -> None:
    """One variant in this process; prints its peak RSS (MiB) as JSON."""
    work, paths, minilm, texts, train = setup(args)
    workload, variant = args.memory_child.split(":")
    if workload == "w1":
        result = run_w1(variant, paths, texts, train, work, args.steps, args.warmup)
    else:
        pairs = w2_pairs(args.data, args.w2_pairs)
        result = (w2_st if variant == "st" else w2_pd)(paths, minilm, pairs, work)
    # VmHWM, not ru_maxrss: Linux carries the forked parent's high-water mark across exec into ru_maxrss.
    status = Path("/proc/self/status").read_text()
    peak = int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    print(json.dumps({"peak_rss_mib": peak, **result}))


def setup(args: argparse.Namespace) -> tuple[Path, dict[str, Path], Path, list[str], Path]:
    import torch

    torch.set_num_threads(args.threads)
    work = (args.work or ROOT / "runs" / "benchmarks" / "speed").resolve()
    work.mkdir(parents=True, exist_ok=True)
    minilm = teacher_dir(args.teacher, work)
    paths = build_models(minilm, work)
    texts = english_sentences(args.data, BATCH * args.steps)
    train = write_jsonl(work / "w1-train.jsonl", [{"text": t, "label": "abc"[label_of(t)]} for t in texts])
    return work, paths, minilm, texts, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(parser)
    parser.add_argument("--workloads", default="w1,w2,overhead,hooks,memory")
    parser.add_argument("--w1-variants", default=",".join(W1_VARIANTS))
    parser.add_argument("--reps", type=int, default=3, help="repetitions of each workload's interleaved variants")
    parser.add_argument("--steps", type=int, default=40, help="W1 steps per run (one epoch of steps x 32 sentences)")
    parser.add_argument("--warmup", type=int, default=5, help="W1 steps before timing starts")
    parser.add_argument("--w2-pairs", type=int, default=1024, help="W2 parallel pairs (split over 8 languages)")
    parser.add_argument("--hook-calls", type=int, default=2000)
    parser.add_argument("--overhead-reps", type=int, default=10, help="pairs of runs with and without 5 no-op plugins")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks")
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        return memory_child(args)

    work, paths, minilm, texts, train = setup(args)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(paths["w1-teacher"])
    lengths = [len(ids) for ids in tok(texts, truncation=True, max_length=MAX_LEN)["input_ids"]]
    workloads = args.workloads.split(",")
    results: dict[str, Any] = {
        "command": "python tests/benchmarks/speed.py " + " ".join(sys.argv[1:]),
        "machine": machine(), "args": {k: str(v) for k, v in vars(args).items()},
        "w1_real_token_share_pad64": sum(lengths) / (MAX_LEN * len(lengths)),
    }
    try:
        import sentence_transformers
        import textbrewer

        results["machine"].update(textbrewer=textbrewer.__version__, sentence_transformers=sentence_transformers.__version__)
    except ImportError:
        pass
    begin = time.perf_counter()
    if "w1" in workloads:
        variants = args.w1_variants.split(",")
        runs: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
        for rep in range(args.reps):
            for variant in variants if rep % 2 == 0 else variants[::-1]:  # alternate order: drift hits all alike
                r = run_w1(variant, paths, texts, train, work, args.steps, args.warmup)
                runs[variant].append(r)
                print(f"[w1] rep {rep} {variant}: {r}", flush=True)
        results["w1"] = {v: {"runs": rs, **{f"median_{k}": median([r[k] for r in rs]) for k in rs[0]}} for v, rs in runs.items()}
        write_results(args.out, results)  # each workload is saved as it ends
    if "w2" in workloads:
        pairs = w2_pairs(args.data, args.w2_pairs)
        runs = {v: [] for v in W2_VARIANTS}
        for rep in range(args.reps):
            for variant in W2_VARIANTS if rep % 2 == 0 else W2_VARIANTS[::-1]:
                r = (w2_st if variant == "st" else w2_pd)(paths, minilm, pairs, work)
                runs[variant].append(r)
                print(f"[w2] rep {rep} {variant}: {r}", flush=True)
        results["w2"] = {v: {"runs": rs, **{f"median_{k}": median([r[k] for r in rs]) for k in rs[0]}} for v, rs in runs.items()}
        results["w2_pairs"] = len(pairs)
        write_results(args.out, results)
    if "overhead" in workloads:
        pair = ["pd_grouped", "pd_grouped_noops"]
        runs = {v: [] for v in pair}
        for rep in range(args.overhead_reps):
            for variant in pair if rep % 2 == 0 else pair[::-1]:
                runs[variant].append(run_w1(variant, paths, texts, train, work, args.steps, args.warmup))
            print(f"[overhead] rep {rep}: {[runs[v][-1]['samples_per_s'] for v in pair]}", flush=True)
        ratios = [b["samples_per_s"] / a["samples_per_s"] for a, b in zip(*runs.values())]
        results["overhead"] = {"runs": runs, "ratios": ratios, "median_ratio": median(ratios)}
        write_results(args.out, results)
    if "hooks" in workloads:
        reps = [hook_overhead(paths, train, work, args.hook_calls) for _ in range(args.reps)]
        results["hooks"] = {k: median([r[k] for r in reps]) for k in reps[0]}
        print(f"[hooks] {results['hooks']}", flush=True)
        write_results(args.out, results)
    if "memory" in workloads:
        mem: dict[str, Any] = {}
        children = [f"w1:{v}" for v in W1_VARIANTS if v != "pd_grouped_noops"] + [f"w2:{v}" for v in W2_VARIANTS]
        for child in children:
            cmd = [sys.executable, __file__, "--memory-child", child, "--data", str(args.data), "--teacher", str(minilm),
                   "--work", str(work / "memory"), "--threads", str(args.threads), "--steps", str(args.steps),
                   "--warmup", str(args.warmup), "--w2-pairs", str(args.w2_pairs)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=Path(__file__).parent)
            if proc.returncode:
                raise SystemExit(f"memory run {child} failed:\n{proc.stderr[-3000:]}")
            mem[child] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"[memory] {child}: {mem[child]}", flush=True)
        results["memory"] = mem
    results["total_s"] = round(time.perf_counter() - begin, 1)
    write_results(args.out, results)


def write_results(out: Path, results: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    name = out / "speed.json"
    previous = json.loads(name.read_text(encoding="utf-8")) if name.is_file() else {}
    merged = {**previous, **results}  # a run of some workloads keeps the others' last results
    if "w1" in results and "w1" in previous:  # and a run of some W1 variants the others' last results
        merged["w1"] = {**previous["w1"], **results["w1"]}
    done = [w for w in ("w1", "w2", "overhead", "hooks", "memory") if w in results]
    merged["commands"] = {**previous.get("commands", {}), **{w: results["command"] for w in done}}
    name.write_text(json.dumps(merged, indent=2) + "\n", encoding="utf-8")
    parts = []
    w1 = merged.get("w1")
    if w1:
        base = w1["hand"]["median_samples_per_s"]
        names = {"hand": "hand-written loop, pad 64 (baseline)", "textbrewer": "TextBrewer GeneralDistiller, pad 64",
                 "hand_fused": "hand-written loop, pad 64, fused AdamW", "pd": "polydistill, pad 64", "hand_grouped": "hand-written loop, length-grouped",
                 "pd_grouped": "polydistill, length-grouped", "pd_grouped_cache": "polydistill, length-grouped, cache cold (epoch 1)",
                 "pd_grouped_noops": "polydistill, length-grouped, 5 no-op plugins",
                 "pd_grouped_trim": "polydistill, length-grouped, trimmed vocabulary"}
        rows = []
        for v, r in w1.items():
            rows.append([names[v], f"{r['median_samples_per_s']:.1f}", f"{r['median_samples_per_s'] / base:.2f}×",
                         ", ".join(f"{x['samples_per_s']:.1f}" for x in r["runs"])])
            if "median_warm_samples_per_s" in r:
                rows.append(["polydistill, length-grouped, cache warm (epoch 2)", f"{r['median_warm_samples_per_s']:.1f}",
                             f"{r['median_warm_samples_per_s'] / base:.2f}×", ", ".join(f"{x['warm_samples_per_s']:.1f}" for x in r["runs"])])
        parts.append("### W1: logit KD step throughput\n\n" + table(["variant", "samples/s (median)", "vs hand loop", "runs"], rows))
        share = [x["teacher_share"] for x in w1["hand"]["runs"]]
        notes = [f"Teacher forward share of a hand-loop step, pad 64: {median(share):.2f}."]
        if "hand_grouped" in w1:
            notes.append(f"Length-grouped: {median([x['teacher_share'] for x in w1['hand_grouped']['runs']]):.2f}.")
        notes.append(f"Real tokens in a batch padded to 64: {merged['w1_real_token_share_pad64']:.2f}.")
        if "pd_grouped_trim" in w1 and "pd_grouped" in w1:
            t = w1["pd_grouped_trim"]["runs"][0]
            pairs = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(w1["pd_grouped_trim"]["runs"], w1["pd_grouped"]["runs"])]
            notes.append(f"Trimmed vocabulary: {t['vocabulary']:,} tokens, {t['parameters'] / 1e6:.1f}M parameters "
                         f"(untrimmed {t['parameters_untrimmed'] / 1e6:.1f}M); trimmed / untrimmed length-grouped samples/s per "
                         f"repetition: {', '.join(f'{r:.2f}×' for r in pairs)}.")
        parts.append(" ".join(notes))
    w2 = merged.get("w2")
    if w2:
        base = w2["st"]["median_samples_per_s"]
        rows = [[{"st": "sentence-transformers MSELoss", "pd": "polydistill"}[v], f"{r['median_seconds']:.1f}",
                 f"{r['median_samples_per_s']:.1f}", f"{r['median_samples_per_s'] / base:.2f}×"] for v, r in w2.items()]
        parts.append(f"### W2: embedding distillation, {merged.get('w2_pairs')} pairs, both sides\n\n"
                     + table(["variant", "wall s (median)", "sentences/s", "vs sentence-transformers"], rows))
    overhead = merged.get("overhead")
    if overhead:
        r = overhead["ratios"]
        parts.append(f"### Five no-op plugins, step level\n\n{len(r)} interleaved pairs of length-grouped runs: samples/s with 5 no-op "
                     f"plugins / without, median {overhead['median_ratio']:.3f} (range {min(r):.3f}–{max(r):.3f}).")
    hooks = merged.get("hooks")
    if hooks:
        extra = hooks["kd + 5 no-ops"] - hooks["kd only"]
        parts.append(f"### Plugin machinery\n\nHook dispatch per step: kd only {hooks['kd only'] * 1e6:.0f} µs, "
                     f"with 5 no-op plugins {hooks['kd + 5 no-ops'] * 1e6:.0f} µs (+{extra * 1e6:.0f} µs).")
    memory = merged.get("memory")
    if memory:
        rows = [[k, f"{v['peak_rss_mib']:.0f}"] for k, v in memory.items()]
        parts.append("### W3: peak RSS, each variant in its own process\n\n" + table(["variant", "peak RSS MiB"], rows))
    m = merged["machine"]
    parts.append(f"Machine: {m['cores']} cores, {m['threads']} torch threads, Python {m['python']}, torch {m['torch']}, "
                 f"transformers {m['transformers']}, polydistill {m['polydistill']}"
                 + (f", TextBrewer {m['textbrewer']}, sentence-transformers {m['sentence_transformers']}" if "textbrewer" in m else "")
                 + ".")
    by_command: dict[str, list[str]] = {}
    for workload, command in merged["commands"].items():
        by_command.setdefault(command, []).append(workload)
    parts.append("Commands: " + "; ".join(f"`{c}` ({', '.join(ws)})" for c, ws in by_command.items()) + ".")
    (out / "speed.md").write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    print("\n\n".join(parts))


if __name__ == "__main__":
    main()
