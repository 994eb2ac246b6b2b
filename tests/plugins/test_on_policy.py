"""on_policy: with probability λ a step's targets are the student's own samples, drawn deterministically and resumed exactly."""

from __future__ import annotations

import pytest

import polydistill
from polydistill import ConfigError, hookimpl
from polydistill.testing import assert_same_student, interrupted_and_resumed

from conftest import PAIRS, tiny_config

REFS = {de for _, de, _ in PAIRS}


class Targets:
    def __init__(self) -> None:
        self.seen: list[list[str]] = []

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        self.seen.append(list(batch.targets))
        return None


def _config(models, data, tmp_path, rate, **overrides):
    cfg = tiny_config(models, data, tmp_path, "seq2seq", training__epochs=2, generation={"num_beams": 1, "max_new_tokens": 4},
                      plugins={"on_policy": {"rate": rate, "max_new_tokens": 5}, "kd": {"divergence": "jsd"}}, **overrides)
    cfg["data"]["eval"] = []
    return cfg


@pytest.mark.parametrize("rate", [0.0, 0.5, 1.0])
def test_the_share_of_sampled_steps_follows_the_rate_and_repeats(models, data, tmp_path, rate):
    runs = []
    for name in ("a", "b"):
        targets = Targets()
        result = polydistill.train(_config(models, data, tmp_path / name, rate), plugins=[("targets", targets)])
        runs.append((targets.seen, [r["on_policy/sampled"] for r in result.history if "on_policy/sampled" in r]))
    assert runs[0] == runs[1]  # the same draws and the same samples
    seen, shares = runs[0]
    sampled = [any(t not in REFS for t in batch) for batch in seen]
    if rate == 0.0:
        assert not any(sampled) and not any(shares)
    elif rate == 1.0:
        assert all(sampled) and all(s == 1.0 for s in shares)
    else:
        assert 0 < sum(sampled) < len(sampled)


def test_resume_samples_what_the_straight_run_sampled(models, data, tmp_path):
    straight = polydistill.train(_config(models, data, tmp_path / "a", 0.5, data__batch_size=5))
    assert_same_student(straight, interrupted_and_resumed(_config(models, data, tmp_path / "b", 0.5, data__batch_size=5), 3))


def test_a_task_without_generated_targets_is_refused(models, data, tmp_path):
    with pytest.raises(ConfigError, match=r"plugins\.on_policy: task sequence_classification has no targets a model samples"):
        polydistill.train(tiny_config(models, data, tmp_path, training__max_steps=1, plugins={"on_policy": {}}))
