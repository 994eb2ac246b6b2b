"""What caching a generative teacher's top-k log-probabilities costs in disk and in accuracy.

Trains the tiny GPT-2 of polydistill.testing on its sentences (the teacher), cuts a 2-layer
student from it, and for k in --k compares the distribution the cache gives back (the top-k
log-probabilities, the rest of the mass spread evenly) with the teacher's own, per next token:
KL(teacher || top-k), the mass top-k keeps, and how much kd's forward and reverse KL terms
between teacher and student change. Disk is per token: 2k float32 (ids and log-probabilities)
against V float32 dense. The vocabulary here is tiny (a few hundred tokens), so the numbers
show the method's behaviour, not a large LM's; rerun with --teacher on a real LM directory.

    python tests/benchmarks/topk_cache.py [--teacher DIR] [--k 1 4 16 64]

Writes docs/benchmarks/topk_cache.{json,md}.
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
    parser.add_argument("--k", type=int, nargs="+", default=[1, 4, 16, 64])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "topk_cache")
    args = parser.parse_args()

    import polydistill
    from polydistill import models as M
    from polydistill.tasks import get_task
    from polydistill.tasks.base import _spread
    from polydistill.testing import TEXTS, build_tiny_models, tiny_config, write_tiny_data

    torch.set_num_threads(2)
    scratch = Path(tempfile.mkdtemp())
    (scratch / "data").mkdir()
    models, data = build_tiny_models(scratch / "models"), write_tiny_data(scratch / "data")
    teacher_dir = args.teacher
    if teacher_dir is None:
        cfg = tiny_config(models, data, scratch / "teacher", "causal_lm", teachers=[], training__epochs=80,
                          training__learning_rate=1e-2, training__warmup_ratio=0.0)
        cfg["student"] = {"config": {"base": str(models["lm"]), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}}
        teacher_dir = polydistill.train(cfg).student_dir
    task = get_task("causal_lm")
    teacher = M.load_model(str(teacher_dir), task).eval()
    student = M.student_from_teacher(teacher, [0, 1], task, None).eval()
    tok = M.load_tokenizer(str(teacher_dir), task=task)
    inputs, positions, _ = task.encode(tok, TEXTS, 64, "longest")
    with torch.no_grad():
        t_out = M.forward(teacher, inputs, task, positions)
        s_out = M.forward(student, inputs, task, positions)
    keep = t_out.word_mask
    t_log = F.log_softmax(t_out.logits[keep], -1)
    s_log = F.log_softmax(s_out.logits[keep], -1)
    vocab = t_log.size(-1)

    def kl(a: torch.Tensor, b: torch.Tensor) -> float:  # mean over tokens of KL(exp(a) || exp(b))
        return float(F.kl_div(b, a, log_target=True, reduction="none").sum(-1).mean())

    forward, reverse = kl(t_log, s_log), kl(s_log, t_log)
    rows = []
    for k in sorted(set(min(k, vocab) for k in args.k) | {vocab}):
        (row,) = task.cache_rows(polydistill.ModelOutputs(logits=t_out.logits[keep][None], word_mask=torch.ones(1, keep.sum(), dtype=torch.bool)), top_k=k)
        approx = torch.from_numpy(_spread(row, vocab))
        rows.append({
            "k": k, "bytes_per_token": 8 * k, "dense_bytes_per_token": 4 * vocab,
            "kept_mass": float(t_log.exp().topk(k, -1).values.sum(-1).mean()),
            "kl_teacher_to_topk": kl(t_log, approx),
            "forward_kl_term": kl(approx, s_log), "forward_kl_term_rel_error": kl(approx, s_log) / forward - 1,
            "reverse_kl_term": kl(s_log, approx), "reverse_kl_term_rel_error": kl(s_log, approx) / reverse - 1,
        })
    result = {"teacher": str(args.teacher or "tiny GPT-2 (polydistill.testing), trained 80 epochs on its sentences"), "vocab": vocab,
              "tokens": int(keep.sum()), "forward_kl_dense": forward, "reverse_kl_dense": reverse, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1))
    lines = [f"Teacher: {result['teacher']}; vocabulary {vocab}; {result['tokens']} next tokens; "
             f"dense forward KL(teacher || student) {forward:.4f}, reverse {reverse:.4f}.", "",
             "| k | disk per token (dense) | mass kept | KL(teacher ‖ cached) | forward KL term (error) | reverse KL term (error) |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['k']} | {r['bytes_per_token']} B ({r['dense_bytes_per_token']} B) | {r['kept_mass']:.3f} | "
                     f"{r['kl_teacher_to_topk']:.4f} | {r['forward_kl_term']:.4f} ({100 * r['forward_kl_term_rel_error']:+.1f}%) | "
                     f"{r['reverse_kl_term']:.4f} ({100 * r['reverse_kl_term_rel_error']:+.1f}%) |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
