"""R-Drop, tested with the fixtures polydistill.testing provides (no conftest needed)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from polydistill import ConfigError
from polydistill.testing import installed_plugins
# Skipped, with this reason, where the package is not installed (CI installs it first).
symmetric_kl = pytest.importorskip("polydistill_rdrop", reason="pip install ./contrib/polydistill-rdrop").symmetric_kl


def test_installed_through_the_entry_point():
    assert installed_plugins()["rdrop"].distribution == "polydistill-rdrop"


def test_symmetric_kl_is_symmetric_zero_on_equal_inputs_and_honours_the_mask():
    p, q = torch.randn(3, 5, 4), torch.randn(3, 5, 4)
    assert symmetric_kl(p, p).item() == pytest.approx(0.0, abs=1e-6)
    assert symmetric_kl(p, q).item() == pytest.approx(symmetric_kl(q, p).item(), rel=1e-6)
    first = (F.softmax(p[0, 0], -1) * (F.log_softmax(p[0, 0], -1) - F.log_softmax(q[0, 0], -1))).sum()
    second = (F.softmax(q[0, 0], -1) * (F.log_softmax(q[0, 0], -1) - F.log_softmax(p[0, 0], -1))).sum()
    mask = torch.zeros(3, 5, dtype=torch.bool)
    mask[0, 0] = True
    assert symmetric_kl(p, q, mask).item() == pytest.approx(0.5 * (first + second).item(), rel=1e-5)


@pytest.mark.parametrize("task", ["sequence_classification", "token_classification", "embedding"])
def test_the_term_is_logged_every_step_for_each_task(run_plugin, task):
    run = run_plugin("rdrop", {"alpha": 1.0}, steps=2, task=task)
    values = run.term("rdrop")
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)


def test_alpha_scales_the_term(run_plugin):
    # same seed, same dropout masks: the term is linear in alpha
    one = run_plugin("rdrop", {"alpha": 1.0}, steps=1).term("rdrop")[0]
    three = run_plugin("rdrop", {"alpha": 3.0}, steps=1).term("rdrop")[0]
    assert three == pytest.approx(3 * one, rel=1e-4)


def test_warmup_steps_skip_the_second_pass(run_plugin):
    run = run_plugin("rdrop", {"warmup_steps": 2}, steps=3)
    assert run.term("rdrop")[:2] == [None, None] and run.term("rdrop")[2] > 0


def test_a_student_without_dropout_is_refused(run_plugin):
    no_dropout = {"dropout": {"hidden": 0.0, "attention": 0.0, "classifier": 0.0}}
    with pytest.raises(ConfigError, match="plugins.rdrop: the student has no active dropout"):
        run_plugin("rdrop", {}, plugins=no_dropout)


@pytest.mark.parametrize(("options", "message"), [
    ({"alpha": 0}, r"plugins\.rdrop\.alpha: Input should be greater than 0"),
    ({"aplha": 1}, r"plugins\.rdrop\.aplha: unknown option; did you mean 'alpha'\?"),
])
def test_bad_options_name_the_plugin_and_option(run_plugin, options, message):
    with pytest.raises(ConfigError, match=message):
        run_plugin("rdrop", options)
