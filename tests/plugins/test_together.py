"""Every first-party plugin enabled at once, by entry-point name, in one run."""

from __future__ import annotations

import pytest
import torch

import polydistill
from polydistill import hookimpl

from conftest import parallel_config


class FusionProbe:
    """Records, at each step, the fused teacher outputs the loss terms see and what the teachers themselves give."""

    def __init__(self):
        self.steps: dict[int, list[dict[str, torch.Tensor]]] = {}

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        with torch.no_grad():  # the teachers run again, on the very inputs they read in this step (eval mode: same outputs)
            own = [polydistill.forward(t, batch.teacher_inputs[i], state.task, batch.teacher_words[i], state.config.pooling).logits
                   for i, t in enumerate(state.teachers)]
        self.steps.setdefault(state.step + 1, []).append({
            "fused": teacher_out.logits.detach().clone(),
            "weights": teacher_out.extra["weights"].detach().clone(),
            "ran": list(teacher_out.extra["teachers"]),
            "teachers": torch.stack(own, dim=-2),  # (B, n_teachers, C)
        })


def test_all_plugins_together(models, data, tmp_path):
    syn = tmp_path / "synonyms.tsv"
    syn.write_text("suppe\teintopf\nbrot\tlaib\nspiel\tpartie\n", encoding="utf-8")
    dic = tmp_path / "en-de.txt"
    dic.write_text("soup suppe\nbread brot\nmatch spiel\nwind wind\nsnow schnee\n", encoding="utf-8")
    teachers = [{"model": str(models["teacher"]), "name": "t1"}, {"model": str(models["teacher2"]), "name": "t2"}]
    plugins = {
        "kd": {"kl": 1.0},
        "synonym": {"dictionary": str(syn), "probability": 1.0, "word_probability": 1.0},
        "code_switch": {"dictionaries": {"de": str(dic)}, "probability": 1.0, "side": "teacher", "teacher_language": "en"},
        "adaptive_temperature": {"schedule": "cosine", "start": 4.0, "end": 1.0},
        "dropout": {"hidden": 0.2, "attention": 0.0},
        "l2": {"sp_alpha": 0.01},
        "multi_teacher": {"fusion": "confidence"},
        "gan_data": {"ratio": 0.5, "length": 6},
    }
    cfg = parallel_config(models, data, tmp_path, teachers=teachers, plugins=plugins, training__epochs=2)
    cfg["student"] = {"from_teacher": {"teacher": "t1", "layers": [0, 2]}}
    probe = FusionProbe()
    result = polydistill.train(cfg, plugins=[("fusion_probe", probe)])
    steps = [r for r in result.history if "loss" in r]
    assert len(steps) == 6
    logged = set().union(*steps)
    for key in ("loss/kl", "loss/gan_data", "reg/l2_sp", "synonym/augmented", "code_switch/augmented",
                "adaptive_temperature/temperature", "kd/temperature"):
        assert key in logged, key
    # the scheduled temperature is the one kd used, from 4 down to 1
    temps = [r["kd/temperature"] for r in steps]
    assert temps[0] == 4.0 and temps[-1] == 1.0
    assert result.plugins.keys() == {"kd", *plugins, "fusion_probe"}

    # confidence fusion acted: per sample, each teacher weighs softmax(log max-probability / temperature 1),
    # i.e. in proportion to its confidence, and the teacher output the student learns from is that mixture
    assert sorted(probe.steps) == [r["step"] for r in steps]
    departure = 0.0
    for row in steps:
        for seen in probe.steps[row["step"]]:
            assert seen["ran"] == [0, 1]
            confidence = seen["teachers"].softmax(-1).max(-1).values  # (B, 2)
            expected = confidence / confidence.sum(-1, keepdim=True)
            torch.testing.assert_close(seen["weights"], expected, atol=1e-6, rtol=0)
            mixture = (seen["weights"].unsqueeze(-1) * seen["teachers"]).sum(-2)
            torch.testing.assert_close(seen["fused"], mixture, atol=1e-6, rtol=0)
            departure = max(departure, float((expected - 0.5).abs().max()))
        # the weights multi_teacher logs are the step's mean weights
        weights = torch.cat([seen["weights"] for seen in probe.steps[row["step"]]])
        for i, name in enumerate(["t1", "t2"]):
            assert row[f"multi_teacher/weight/{name}"] == pytest.approx(float(weights[:, i].mean()), abs=1e-6)
    assert departure > 1e-4  # not the plain average (0.5 each): a mean fusion fails the weight check above
