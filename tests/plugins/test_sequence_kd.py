"""sequence_kd: the teacher's decodings replace the targets, are cached across epochs and runs, and the
interpolated variant picks the hypothesis closest to the reference."""

from __future__ import annotations

import json

import pytest
import torch
from sacrebleu.metrics import CHRF

import polydistill
from polydistill import ConfigError, hookimpl
from polydistill import models as M
from polydistill.tasks import get_task

from conftest import PAIRS, tiny_config

TASK = "seq2seq"


class Targets:
    """Records the targets each loss step trains on."""

    def __init__(self) -> None:
        self.seen: list[tuple[list[str], list[str]]] = []

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        self.seen.append((list(batch.teacher_texts), list(batch.targets)))
        return None


def _config(models, data, tmp_path, **options):
    cfg = tiny_config(models, data, tmp_path, TASK, training__epochs=2, data__shuffle=False,
                      generation={"num_beams": 1, "max_new_tokens": 6},
                      cache={"enabled": False, "dir": str(tmp_path / "cache")},
                      plugins={"sequence_kd": {"num_beams": 2, "max_new_tokens": 6, **options}, "kd": {"ce": 1.0, "kl": 0.0}})
    cfg["data"]["eval"] = []
    return cfg


def _decode(model_dir, sources, num_beams=2, n=1, max_new_tokens=6):
    tok = M.load_tokenizer(str(model_dir), task=TASK)
    model = M.load_model(str(model_dir), TASK).eval()
    enc = get_task(TASK).generation_inputs(dict(tok(sources, return_tensors="pt", padding=True, truncation=True, max_length=128)))
    with torch.no_grad():
        out = model.generate(**enc, num_beams=num_beams, num_return_sequences=n, max_new_tokens=max_new_tokens, do_sample=False)
    return tok.batch_decode(out, skip_special_tokens=True)


def _history(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_targets_are_the_teachers_decodings_decoded_once_and_reused_by_the_next_run(models, data, tmp_path):
    targets = Targets()
    cfg = _config(models, data, tmp_path / "a")
    result = polydistill.train(cfg, plugins=[("targets", targets)])
    sources = [s for src, _ in targets.seen for s in src]
    trained_on = [t for _, tgt in targets.seen for t in tgt]
    expected = dict(zip([en for en, _, _ in PAIRS], _decode(models["mt"], [en for en, _, _ in PAIRS])))
    assert trained_on == [expected[s] for s in sources]
    steps = [r for r in result.history if "sequence_kd/decoded" in r]
    per_epoch = len(steps) // 2
    assert sum(r["sequence_kd/decoded"] for r in steps[:per_epoch]) == len(PAIRS)  # every source once
    assert sum(r["sequence_kd/decoded"] for r in steps[per_epoch:]) == 0  # the second epoch reads them back
    # another run with the same teacher and settings decodes nothing
    again = polydistill.train({**cfg, "output_dir": str(tmp_path / "b" / "run")})
    assert sum(r.get("sequence_kd/decoded", 0) for r in again.history) == 0
    assert sum(r.get("sequence_kd/decode_s", 0) for r in steps[:per_epoch]) > 0


def test_closest_picks_the_hypothesis_nearest_the_reference(models, data, tmp_path):
    targets = Targets()
    polydistill.train(_config(models, data, tmp_path, choose="closest", n_best=2, cache=False), plugins=[("targets", targets)])
    chrf = CHRF()
    refs = {en: de for en, de, _ in PAIRS}
    for sources, chosen in targets.seen[:2]:
        hyps = _decode(models["mt"], sources, num_beams=2, n=2)
        for j, (src, got) in enumerate(zip(sources, chosen)):
            pair = hyps[2 * j : 2 * j + 2]
            scores = [chrf.sentence_score(h, [refs[src]]).score for h in pair]
            assert got == pair[int(scores[1] > scores[0])]


def test_refusals_name_the_option(models, data, tmp_path):
    with pytest.raises(ConfigError, match=r"plugins\.sequence_kd: task sequence_classification has no targets a teacher decodes"):
        polydistill.train(tiny_config(models, data, tmp_path, training__max_steps=1, plugins={"sequence_kd": {}}))
    with pytest.raises(ConfigError, match=r"plugins\.sequence_kd\.teacher: no teacher named 'nope'; the teachers are: teacher"):
        polydistill.train(_config(models, data, tmp_path, teacher="nope"))
    with pytest.raises(ConfigError, match=r"n_best \(3\) cannot exceed num_beams \(2\)"):
        polydistill.train(_config(models, data, tmp_path, choose="closest", n_best=3))
