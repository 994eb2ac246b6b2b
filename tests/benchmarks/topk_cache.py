"""What caching a generative teacher's top_k tokens costs in disk and in accuracy, for each top_k_method.

For each k in --k and each method (`top`: the k most likely tokens; `sample`: k draws from the teacher's
distribution, kept as frequencies), the distribution the cache gives back (the rest of the mass spread
evenly) is compared with the teacher's own at every target token: the mass kept (top), KL(teacher ||
cached), the L1 distance ||p - p~|| (the error of the forward-KL gradient on the student's logits at
temperature 1, per token), and the cross-entropy term -sum p log q of forward KL(teacher || student) that
the student's gradient comes from (its error: top-k is biased, sampling is not), and the reverse KL term.
Disk is per token: 2k float32 (ids and log-probabilities) against V float32 dense.

Teachers:
- default: the tiny GPT-2 of polydistill.testing, trained here on its sentences (vocabulary ~270;
  shows the method's behaviour, not a large vocabulary's);
- --mt DIR: recipe 5's translation teacher and reference student (DIR = its --work folder,
  runs/benchmarks/recipe5), on --rows LASER Tatoeba test pairs: a real model trained on real data.

    python tests/benchmarks/topk_cache.py [--mt runs/benchmarks/recipe5] [--k 1 4 16 64]

Writes docs/benchmarks/topk_cache.{json,md} (with --mt: topk_cache_mt.{json,md}).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", type=Path, help="a causal LM directory (default: the tiny GPT-2, trained here)")
    parser.add_argument("--mt", type=Path, help="recipe 5's work folder: its translation teacher and reference-seed0 student")
    parser.add_argument("--rows", type=int, default=300, help="--mt: test pairs read (teacher-forced)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "topk_cache")
    args = parser.parse_args()
    if args.mt is not None and args.out == ROOT / "docs" / "benchmarks" / "topk_cache":
        args.out = ROOT / "docs" / "benchmarks" / "topk_cache_mt"

    import polydistill
    from polydistill import models as M
    from polydistill.tasks import get_task
    from polydistill.tasks.base import _spread
    from polydistill.testing import TEXTS, build_tiny_models, tiny_config, write_tiny_data

    torch.set_num_threads(args.threads)
    scratch = Path(tempfile.mkdtemp())
    (scratch / "data").mkdir()
    models, data = build_tiny_models(scratch / "models"), write_tiny_data(scratch / "data")
    if args.mt is not None:
        task = get_task("seq2seq")
        teacher_dir, student_dir = args.mt / "teacher" / "student", args.mt / "reference-seed0" / "student"
        teacher, student = M.load_model(str(teacher_dir), task).eval(), M.load_model(str(student_dir), task).eval()
        rows = [json.loads(line) for line in (args.mt / "test.jsonl").read_text(encoding="utf-8").splitlines()]
        rows = rows[:: max(1, len(rows) // args.rows)][: args.rows]  # every language's share
        texts, targets = [r["text"] for r in rows], [r["target"] for r in rows]
        described = f"recipe 5's translation teacher ({teacher_dir}) and reference student, {len(rows)} LASER Tatoeba test pairs"
    else:
        task = get_task("causal_lm")
        teacher_dir = args.teacher
        if teacher_dir is None:
            cfg = tiny_config(models, data, scratch / "teacher", "causal_lm", teachers=[], training__epochs=80,
                              training__learning_rate=1e-2, training__warmup_ratio=0.0)
            cfg["student"] = {"config": {"base": str(models["lm"]), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}
            teacher_dir = polydistill.train(cfg).student_dir
        teacher = M.load_model(str(teacher_dir), task).eval()
        student = M.student_from_teacher(teacher, [0, 1], task, None).eval()
        texts, targets = TEXTS, None
        described = str(args.teacher or "tiny GPT-2 (polydistill.testing), trained 80 epochs on its sentences")
    tok = M.load_tokenizer(str(teacher_dir), task=task)
    inputs, positions, _ = task.encode(tok, texts, 64, "longest", targets)
    with torch.no_grad():
        t_out = M.forward(teacher, inputs, task, positions)
        s_out = M.forward(student, inputs, task, positions)
    keep = t_out.word_mask
    t_log = F.log_softmax(t_out.logits[keep], -1)
    s_log = F.log_softmax(s_out.logits[keep], -1)
    vocab = t_log.size(-1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:  # mean over tokens of KL(exp(a) || exp(b))
        return float(F.kl_div(b, a, log_target=True, reduction="none").sum(-1).mean())

    def cross_entropy(p_log: torch.Tensor) -> float:  # -sum p log q of forward KL: what the student's gradient sees
        return float(-(p_log.exp() * s_log).sum(-1).mean())

    p = t_log.exp()
    forward, reverse, ce = kl(t_log, s_log), kl(s_log, t_log), cross_entropy(t_log)
    rows = []
    whole = polydistill.ModelOutputs(logits=t_out.logits[keep][None], word_mask=torch.ones(1, int(keep.sum()), dtype=torch.bool))
    for method in ("top", "sample"):
        for k in sorted(set(min(k, vocab) for k in args.k) | ({vocab} if method == "top" else set())):
            (row,) = task.cache_rows(whole, top_k=k, sample=method == "sample")
            approx = torch.from_numpy(_spread(row, vocab))
            rows.append({
                "method": method, "k": k, "bytes_per_token": 8 * k, "dense_bytes_per_token": 4 * vocab,
                "kept_mass": float(p.topk(k, -1).values.sum(-1).mean()) if method == "top" else None,
                "kl_teacher_to_cached": kl(t_log, approx), "l1_gradient_error": float((approx.exp() - p).abs().sum(-1).mean()),
                "cross_entropy_term": cross_entropy(approx), "cross_entropy_rel_error": cross_entropy(approx) / ce - 1,
                "reverse_kl_term": kl(s_log, approx), "reverse_kl_term_rel_error": kl(s_log, approx) / reverse - 1,
            })
    result = {"teacher": described, "vocab": vocab, "tokens": int(keep.sum()), "forward_kl_dense": forward,
              "cross_entropy_dense": ce, "reverse_kl_dense": reverse, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Teacher: {result['teacher']}; vocabulary {vocab}; {result['tokens']} target tokens; dense forward "
             f"KL(teacher || student) {forward:.4f} (its cross-entropy term {ce:.4f}), reverse {reverse:.4f}.", "",
             "| method | k | disk per token (dense) | mass kept | KL(teacher ‖ cached) | gradient L1 error | cross-entropy term (error) | reverse KL term (error) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        mass = "" if r["kept_mass"] is None else f"{r['kept_mass']:.3f}"
        lines.append(f"| {r['method']} | {r['k']} | {r['bytes_per_token']} B ({r['dense_bytes_per_token']} B) | {mass} | "
                     f"{r['kl_teacher_to_cached']:.4f} | {r['l1_gradient_error']:.4f} | {r['cross_entropy_term']:.4f} "
                     f"({100 * r['cross_entropy_rel_error']:+.1f}%) | {r['reverse_kl_term']:.4f} ({100 * r['reverse_kl_term_rel_error']:+.1f}%) |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
