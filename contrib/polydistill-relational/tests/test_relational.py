"""Relational KD, tested with the fixtures polydistill.testing provides (no conftest needed)."""

from __future__ import annotations

import math

import pytest
import torch

from polydistill import ConfigError
from polydistill.testing import installed_plugins
# Skipped, with this reason, where the package is not installed (CI installs it first).
relational = pytest.importorskip("polydistill_relational", reason="pip install ./contrib/polydistill-relational")
angle_loss, distance_loss = relational.angle_loss, relational.distance_loss


def test_installed_through_the_entry_point():
    assert installed_plugins()["relational"].distribution == "polydistill-relational"


def test_relations_ignore_scale_rotation_translation_and_width():
    torch.manual_seed(0)
    teacher = torch.randn(6, 8)
    rotation, _ = torch.linalg.qr(torch.randn(8, 8))
    # the same geometry, scaled, rotated, shifted and embedded in a wider space
    student = torch.cat([3.0 * teacher @ rotation + 1.5, torch.zeros(6, 4)], dim=1)
    assert distance_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-5)
    assert angle_loss(student, teacher).item() == pytest.approx(0.0, abs=1e-5)
    other = torch.randn(6, 12)
    assert distance_loss(other, teacher).item() > 1e-3 and angle_loss(other, teacher).item() > 1e-3


def test_gradients_are_finite_for_identical_rows():
    student = torch.ones(4, 3, requires_grad=True)
    (distance_loss(student, torch.randn(4, 5)) + angle_loss(student, torch.randn(4, 5))).backward()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification", "embedding"])
def test_both_terms_are_logged_for_each_task(run_plugin, task):
    run = run_plugin("relational", {"distance": 1.0, "angle": 2.0}, task=task)
    for term in ("rkd_distance", "rkd_angle"):
        assert len(run.term(term)) == 2 and all(math.isfinite(v) for v in run.term(term))


def test_a_wider_student_learns_relations_without_a_projection(run_plugin, tiny_models):
    # embedding task, teacher width 32, student width 48, relational terms only
    run = run_plugin("relational", {"distance": 1.0, "angle": 1.0}, steps=12, task="embedding",
                     student={"model": str(tiny_models["wide"])}, plugins={"kd": False},
                     data__batch_size=12, data__shuffle=False, training__learning_rate=3e-3)
    assert run.trainer.state.modules == {}
    loss = [d + a for d, a in zip(run.term("rkd_distance"), run.term("rkd_angle"))]
    assert loss[-1] < 0.7 * loss[0]


def test_a_zero_weight_switches_its_term_off(run_plugin):
    run = run_plugin("relational", {"angle": 0}, steps=1)
    assert "loss/rkd_angle" not in run.steps[0] and "loss/rkd_distance" in run.steps[0]


def test_both_weights_zero_is_an_error_naming_the_plugin(run_plugin):
    with pytest.raises(ConfigError, match=r"plugins\.relational: .*distance and angle are both 0"):
        run_plugin("relational", {"distance": 0, "angle": 0})


def test_a_run_without_teacher_is_refused(run_plugin, tiny_models):
    with pytest.raises(ConfigError, match="plugins.relational: relational KD learns from a teacher"):
        run_plugin("relational", {}, teachers=[], mode="same", student={"model": str(tiny_models["teacher2"])},
                   data__train__columns={"text": "de", "label": "label", "lang": "lang"})
