"""The adaptive_temperature plugin: schedules, per-sample (entropy, flsw, cwsm) and learned (CTKD) temperatures, flsw/cwsm weights."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import polydistill
from polydistill import ConfigError, hookimpl
from polydistill_plugins.adaptive_temperature import (
    AdaptiveTemperature,
    GlobalTemperature,
    Settings,
    reverse_gradient,
)
from polydistill_plugins.kd import kl_divergence

from conftest import StopAt, parallel_config

NAME = "adaptive_temperature"
TEMP = f"{NAME}/temperature"


def plugin(**options) -> AdaptiveTemperature:
    return AdaptiveTemperature(Settings(**options))


def run(models, data, tmp_path, options, plugins=(), **extra):
    cfg = parallel_config(models, data, tmp_path, plugins={NAME: options}, **extra)
    return polydistill.train(cfg, plugins=list(plugins))


def steps_of(result, key):
    return [row[key] for row in result.history if "loss" in row]


def tiny_batch(n: int) -> polydistill.Batch:
    enc = {"input_ids": torch.zeros(n, 2, dtype=torch.long)}
    return polydistill.Batch(texts=["x"] * n, teacher_texts=["x"] * n, langs=["de"] * n, student_inputs=enc, teacher_inputs=[enc])


def handed_off(p: AdaptiveTemperature, student_logits, teacher_logits, step: int = 0, meta=None, word_mask=None):
    """What kd would receive: (temperature, sample_weights) resolved from the batch's loss hints."""
    batch = tiny_batch(len(student_logits))
    batch.meta.update(meta or {})
    out = p.augment_batch(batch, SimpleNamespace(step=step))
    s = polydistill.ModelOutputs(logits=student_logits, word_mask=word_mask)
    t = polydistill.ModelOutputs(logits=teacher_logits, word_mask=word_mask)
    hints = out.loss_hints()
    assert hints.temperature_by == NAME
    temperature = hints.resolve_temperature(s, t, None)
    weights = hints.resolve_weights(s, t, len(student_logits)) if hints.weights else None
    return temperature, weights


# ---------------------------------------------------------------- schedules


def test_schedule_values_at_given_steps():
    # linear 4 -> 1, two warm-up steps held at 4, end reached at step steps-1 = 7: slope 3/5 per step
    linear = plugin(schedule="linear", start=4.0, end=1.0, warmup_steps=2, steps=8)
    assert [linear.temperature_at(i) for i in range(10)] == pytest.approx([4, 4, 4, 3.4, 2.8, 2.2, 1.6, 1.0, 1.0, 1.0])
    # cosine: T = end + (start - end)(1 + cos(pi p))/2, p = (step - 2)/5
    cosine = plugin(schedule="cosine", start=4.0, end=1.0, warmup_steps=2, steps=8)
    expected = [4, 4, 4, 3.7135255, 2.9635255, 2.0364745, 1.2864745, 1.0, 1.0]
    assert [cosine.temperature_at(i) for i in range(9)] == pytest.approx(expected, abs=1e-7)
    # the schedule can also rise, and constant ignores end
    assert [plugin(schedule="linear", start=1.0, end=3.0, steps=3).temperature_at(i) for i in range(3)] == [1.0, 2.0, 3.0]
    assert plugin(schedule="constant", start=3.0, end=1.0, steps=5).temperature_at(4) == 3.0


def test_lambda_follows_a_cosine_curriculum_from_min_to_max():
    p = plugin(learnable="global", lambda_min=0.2, lambda_max=1.0, lambda_steps=5)
    assert [p.lambda_at(i) for i in range(6)] == pytest.approx(
        [0.2, 0.2 + 0.8 * (1 - math.cos(math.pi / 4)) / 2, 0.6, 0.2 + 0.8 * (1 + math.cos(math.pi / 4)) / 2, 1.0, 1.0]
    )


def test_the_kl_term_uses_the_scheduled_temperature_and_the_log_shows_it(models, data, tmp_path):
    # 12 rows / batch 4 = 3 steps; by default the schedule spans the run: 3, 2, 1
    result = run(models, data, tmp_path, {"schedule": "linear", "start": 3.0, "end": 1.0})
    assert steps_of(result, TEMP) == [3.0, 2.0, 1.0]
    assert steps_of(result, "kd/temperature") == steps_of(result, TEMP)


@pytest.mark.parametrize(
    "options",
    # beta 20: the tiny models' logits nearly agree, so flsw values spread little
    [{"per_sample": "entropy", "start": 4.0}, {"per_sample": "flsw", "start": 4.0, "beta": 20.0},
     {"per_sample": "cwsm", "start": 4.0}, {"learnable": "instance", "lambda_min": 1.0}],
    ids=["entropy", "flsw", "cwsm", "instance"],
)
def test_logged_temperature_is_the_one_kd_used(models, data, tmp_path, options):
    result = run(models, data, tmp_path, options)
    ours, kds = steps_of(result, TEMP), steps_of(result, "kd/temperature")
    assert ours == pytest.approx(kds, rel=1e-6, abs=0)
    if "per_sample" in options:  # per sample: the batch's temperatures differ
        assert all(lo < hi for lo, hi in zip(steps_of(result, f"{NAME}/temperature_min"), steps_of(result, f"{NAME}/temperature_max")))
    if "learnable" in options:  # it is learned: it moves
        assert len(set(ours)) > 1
        assert steps_of(result, f"{NAME}/lambda") == [1.0, 1.0, 1.0]


def test_a_constant_schedule_at_kds_temperature_changes_nothing(models, data, tmp_path):
    plain = polydistill.train(parallel_config(models, data, tmp_path / "a", training__max_steps=2))
    ours = run(models, data, tmp_path / "b", {}, training__max_steps=2)
    assert steps_of(ours, TEMP) == [2.0, 2.0]  # start defaults to kd's temperature
    assert steps_of(ours, "loss") == steps_of(plain, "loss")


# ---------------------------------------------------------------- per-sample temperature from teacher confidence


def test_entropy_temperature_is_higher_for_confident_teachers_and_bounded():
    p = plugin(per_sample="entropy", start=2.0, scale_confident=1.5, scale_uncertain=0.5, min_temperature=1.0, max_temperature=10.0)
    teacher = torch.tensor([[0.0, 0.0, 0.0], [40.0, 0.0, 0.0], [math.log(2), 0.0, 0.0]])
    t, _ = handed_off(p, torch.zeros(3, 3), teacher)
    # uniform: h = 1 -> 2 * 0.5 = 1; one-hot: h = 0 -> 2 * 1.5 = 3; p = (1/2, 1/4, 1/4): h = 1.5 ln2 / ln3
    h = 1.5 * math.log(2) / math.log(3)
    assert t.tolist() == pytest.approx([1.0, 3.0, 2.0 * (1.5 - h)], abs=1e-5)
    # the bounds clip it: base 8 on a confident teacher would be 12
    clipped, _ = handed_off(plugin(per_sample="entropy", start=8.0), torch.zeros(2, 3), teacher[:2])
    assert clipped.tolist() == pytest.approx([4.0, 10.0])


# ---------------------------------------------------------------- flsw / cwsm: TextBrewer's temperatures and sample weights


STUDENT = torch.tensor([[1.0, 0.0, 0.0], [math.log(2), 0.0, 0.0], [math.log(6), 0.0, 0.0]])
TEACHER = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]])


def test_flsw_and_cwsm_temperatures_follow_textbrewers_formula():
    # TextBrewer: tau_i = T + beta (mean w - w_i), unnormalised w, then clamped to the bounds here.
    # flsw, gamma 2: cos = 1, 0, -1 -> w = 0, 1, 4, mean 5/3
    t, w = handed_off(plugin(per_sample="flsw", start=4.0, beta=1.0), STUDENT, TEACHER)
    assert t.tolist() == pytest.approx([4 + 5 / 3, 4 + 2 / 3, 4 - 7 / 3]) and w is None and not t.requires_grad
    # beta 2: 7.33, 5.33, -0.67 -> clamped into [1, 6]
    t, _ = handed_off(plugin(per_sample="flsw", start=4.0, beta=2.0, max_temperature=6.0), STUDENT, TEACHER)
    assert t.tolist() == pytest.approx([6.0, 4 + 4 / 3, 1.0])
    # cwsm: w = 1 / (max softmax(student) + 0.001), student max probabilities e/(e+2), 1/2, 3/4
    raw = [1 / (p + 1e-3) for p in (math.e / (math.e + 2), 0.5, 0.75)]
    t, _ = handed_off(plugin(per_sample="cwsm", start=2.0, beta=0.5), STUDENT, TEACHER)
    assert t.tolist() == pytest.approx([2 + 0.5 * (sum(raw) / 3 - r) for r in raw])
    # it follows the schedule: base 3 at step 1 of linear 4 -> 2 over 3 steps
    t, _ = handed_off(plugin(per_sample="flsw", schedule="linear", start=4.0, end=2.0, steps=3), STUDENT, TEACHER, step=1)
    assert t.tolist() == pytest.approx([3 + 5 / 3, 3 + 2 / 3, 1.0])


def test_flsw_temperature_per_word_averages_over_valid_words_only():
    # token task: w per word, mean over the batch's valid words, per-word temperatures averaged per sample.
    # gamma 1: sample 0 words w = 0, 1; sample 1 word w = 2 and a padding word (w = 2) that must not count
    student = torch.stack([STUDENT[:2], STUDENT[[2, 2]]])
    teacher = torch.stack([TEACHER[:2], TEACHER[[2, 2]]])
    mask = torch.tensor([[True, True], [True, False]])
    t, _ = handed_off(plugin(per_sample="flsw", flsw_gamma=1.0, start=4.0), student, teacher, word_mask=mask)
    # mean w = 1: word temperatures 5, 4 | 3 -> 4.5 and 3 (counting the padding word: mean 5/4, 4.75 and 3.25)
    assert t.tolist() == pytest.approx([4.5, 3.0])


@pytest.mark.parametrize("old", ["flsw", "cwsm"])
def test_the_old_weighting_names_are_refused_with_both_new_spellings(models, data, tmp_path, old):
    with pytest.raises(ConfigError) as info:
        run(models, data, tmp_path, {"weighting": old})
    message = str(info.value)
    assert f"plugins.{NAME}.weighting: {old} now names TextBrewer's per-sample temperature, not a loss weight" in message
    assert f"weighting: {old}_weight" in message and f"per_sample: {old} (and beta)" in message


def test_flsw_weights_hand_computed():
    # cosine(student, teacher) = 1, 0, -1 -> (1 - cos)^2 = 0, 1, 4; mean 5/3 -> 0, 0.6, 2.4
    _, w = handed_off(plugin(weighting="flsw_weight", flsw_gamma=2.0), STUDENT, TEACHER)
    assert w.tolist() == pytest.approx([0.0, 0.6, 2.4])
    assert not w.requires_grad and w.mean().item() == pytest.approx(1.0)
    # gamma 1: 0, 1, 2 -> mean 1 already; strength 0.5 halves the distance to uniform
    _, w = handed_off(plugin(weighting="flsw_weight", flsw_gamma=1.0, weighting_strength=0.5), STUDENT, TEACHER)
    assert w.tolist() == pytest.approx([0.5, 1.0, 1.5])


def test_cwsm_weights_hand_computed():
    # student max probabilities: e/(e+2), 1/2, 3/4 -> w = 1/(p + 0.001), divided by their mean
    raw = [1 / (math.e / (math.e + 2) + 1e-3), 1 / (0.5 + 1e-3), 1 / (0.75 + 1e-3)]
    _, w = handed_off(plugin(weighting="cwsm_weight"), STUDENT, TEACHER)
    assert w.tolist() == pytest.approx([r / (sum(raw) / 3) for r in raw])
    # from the teacher's confidence: max probabilities e/(e+2), e/(e+2), and for [-1, 0, 0]: 1/(2 + 1/e)
    pt = [math.e / (math.e + 2), math.e / (math.e + 2), 1 / (2 + 1 / math.e)]
    raw = [1 / (p + 1e-3) for p in pt]
    _, w = handed_off(plugin(weighting="cwsm_weight", cwsm_confidence="teacher"), STUDENT, TEACHER)
    assert w.tolist() == pytest.approx([r / (sum(raw) / 3) for r in raw])
    # weights another plugin already set are kept, multiplied in
    _, w2 = handed_off(plugin(weighting="cwsm_weight", cwsm_confidence="teacher"), STUDENT, TEACHER,
                       meta={"sample_weights": torch.tensor([1.0, 0.0, 2.0])})
    assert w2.tolist() == pytest.approx([w[0].item(), 0.0, 2 * w[2].item()])


class CheckWeightedKL:
    """Recomputes kd's KL term from the weights and temperature handed over as loss hints."""

    def __init__(self) -> None:
        self.expected: list[float] = []

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        w = batch.loss_hints().resolve_weights(student_out, teacher_out, len(batch))
        per = torch.stack([kl_divergence(student_out.logits[i : i + 1], teacher_out.logits[i : i + 1], 2.0) for i in range(len(batch))])
        self.expected.append(float((w * per.detach()).sum() / w.sum()))


def test_kd_weights_its_kl_term_with_the_flsw_weights(models, data, tmp_path):
    check = CheckWeightedKL()
    result = run(models, data, tmp_path, {"weighting": "flsw_weight"}, plugins=[("check", check)], training__max_steps=2)
    assert steps_of(result, "loss/kl") == pytest.approx(check.expected, rel=1e-5)
    plain = polydistill.train(parallel_config(models, data, tmp_path / "plain", training__max_steps=1))
    assert steps_of(plain, "loss/kl")[0] != pytest.approx(check.expected[0], rel=1e-3)  # the weights matter
    assert all(row[f"{NAME}/weight_std"] > 0 for row in result.history if "loss" in row)


# ---------------------------------------------------------------- learnable temperature (CTKD)


def test_gradient_reversal_flips_and_scales_the_temperature_gradient():
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 3, requires_grad=True), torch.randn(3, 3) * 3
    grads = {}
    for lam in (None, 1.0, 0.5):
        module = GlobalTemperature(1.0, 10.0, 2.0)
        student.grad = None
        t = module() if lam is None else reverse_gradient(module(), lam)
        kl_divergence(student, teacher, t).backward()
        grads[lam] = (module.raw.grad.item(), student.grad.clone())
    assert grads[None][0] != 0
    assert grads[1.0][0] == pytest.approx(-grads[None][0])
    assert grads[0.5][0] == pytest.approx(-0.5 * grads[None][0])
    # the student's own gradient is untouched
    torch.testing.assert_close(grads[1.0][1], grads[None][1])


def test_one_optimizer_step_moves_the_temperature_to_increase_the_kl():
    torch.manual_seed(0)
    student, teacher = torch.randn(4, 3), torch.randn(4, 3) * 3
    for reversed_, direction in ((True, 1), (False, -1)):
        module = GlobalTemperature(1.0, 10.0, 2.0)
        opt = torch.optim.SGD(module.parameters(), lr=0.5)
        before = kl_divergence(student, teacher, module())
        t = reverse_gradient(module(), 1.0) if reversed_ else module()
        kl_divergence(student, teacher, t).backward()
        opt.step()
        after = kl_divergence(student, teacher, module())
        assert direction * (after.item() - before.item()) > 0


class WatchTemperature:
    """Records the learned temperature before and after each optimizer step, and d KL / d T at the step's batch."""

    def __init__(self) -> None:
        self.rows: list[tuple[float, float, float]] = []
        self._pending: tuple[float, float] | None = None

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        temperature = state.modules[f"{NAME}.temperature"]().detach().clone().requires_grad_(True)
        kl_divergence(student_out.logits.detach(), teacher_out.logits, temperature).backward()
        self._pending = (temperature.item(), temperature.grad.item())

    @hookimpl
    def on_step_end(self, state, logs):
        before, slope = self._pending
        self.rows.append((before, state.modules[f"{NAME}.temperature"]().item(), slope))


def test_in_a_run_the_learned_temperature_climbs_the_kl(models, data, tmp_path):
    watch = WatchTemperature()
    # lambda 1 from the start, so the first step already trains T (Adam's first step moves it by temperature_lr in sign)
    result = run(models, data, tmp_path, {"learnable": "global", "lambda_min": 1.0}, plugins=[("watch", watch)],
                 training__max_steps=1)
    (before, after, slope), = watch.rows
    assert before == pytest.approx(2.0, abs=1e-5) and slope != 0
    assert math.copysign(1, after - before) == math.copysign(1, slope)  # gradient ascent on the KL
    assert steps_of(result, TEMP) == pytest.approx([before]) == steps_of(result, "kd/temperature")


def test_the_learned_temperature_moves_at_a_transformer_learning_rate(models, data, tmp_path):
    # student lr 2e-5 for 6 steps; the temperature trains at temperature_lr (default 0.05, CTKD's)
    def moved(options, name):
        watch = WatchTemperature()
        run(models, data, tmp_path / name, {"learnable": "global", "lambda_min": 1.0, **options}, plugins=[("watch", watch)],
            training__learning_rate=2e-5, training__epochs=2)
        return abs(watch.rows[-1][1] - 2.0)

    assert moved({}, "own") > 0.05
    assert moved({"temperature_lr": 2e-5}, "shared") < 1e-3  # at the student's rate, as before: it hardly moves


class OptimizerGroups:
    """Records the optimizer's parameter groups (without the tensors) once the run has built it."""

    def __init__(self) -> None:
        self.groups: list[dict] = []

    @hookimpl
    def setup(self, state):
        self.groups = [{k: v for k, v in g.items() if k != "params"} | {"size": sum(p.numel() for p in g["params"])}
                       for g in state.optimizer.param_groups]


def test_the_learned_temperature_has_its_own_optimizer_group(models, data, tmp_path):
    groups = OptimizerGroups()
    options = {"learnable": "instance", "mlp_hidden": 4, "temperature_lr": 0.3, "temperature_max_grad_norm": 0.5}
    run(models, data, tmp_path, options, plugins=[("groups", groups)], training__max_steps=1, training__weight_decay=0.1)
    mine = [g for g in groups.groups if g.get("module") == f"{NAME}__temperature"]
    # instance MLP with 3 labels: hidden 6x4 + 4, out 4 + 1 parameters, in a decay and a no-decay group
    assert sum(g["size"] for g in mine) == 6 * 4 + 4 + 4 + 1
    assert all(g["initial_lr"] == 0.3 and g["max_grad_norm"] == 0.5 and g["weight_decay"] == 0.0 for g in mine)
    student = [g for g in groups.groups if "module" not in g]
    assert student and all(g["initial_lr"] == 1e-3 for g in student)  # the student keeps training.learning_rate


# ---------------------------------------------------------------- resume



@pytest.mark.parametrize(
    "options",
    [
        {"learnable": "instance", "lambda_min": 0.5, "weighting": "flsw_weight"},
        {"schedule": "cosine", "start": 4.0, "end": 1.0, "warmup_steps": 2, "per_sample": "entropy"},
    ],
    ids=["instance+flsw_weight", "cosine+entropy"],
)
def test_resume_after_interrupt_continues_exactly(models, data, tmp_path, options):
    overrides = dict(training__epochs=2, data__batch_size=3, training__learning_rate=0.02)  # 8 steps
    straight = run(models, data, tmp_path / "a", options, **overrides)
    cfg = parallel_config(models, data, tmp_path / "b", plugins={NAME: options}, **overrides)
    with pytest.raises(KeyboardInterrupt):
        polydistill.train(cfg, plugins=[("stop", StopAt(3))])
    resumed = polydistill.train(cfg, resume=tmp_path / "b" / "run")
    a, b = (load_file(str(r.output_dir / "student" / "model.safetensors")) for r in (straight, resumed))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    assert steps_of(straight, TEMP) == steps_of(resumed, TEMP)
    assert steps_of(straight, "loss") == steps_of(resumed, "loss")
    assert len(set(steps_of(straight, TEMP))) > 2  # the temperature really changed along the way


def test_a_resumed_run_keeps_the_schedule_it_started_with(models, data, tmp_path):
    options = {"schedule": "linear", "start": 3.0, "end": 1.0}
    first = run(models, data, tmp_path, options, training__max_steps=3)
    assert steps_of(first, TEMP) == [3.0, 2.0, 1.0]
    cfg = parallel_config(models, data, tmp_path, plugins={NAME: options}, training__max_steps=5)
    more = polydistill.train(cfg, resume=tmp_path / "run")
    assert steps_of(more, TEMP)[-2:] == [1.0, 1.0]  # held at end, not re-stretched over 5 steps


# ---------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "options, option, message",
    [
        ({"end": -1.0}, "end", "greater than 0"),
        ({"schedule": "exponential"}, "schedule", "'constant', 'linear' or 'cosine'"),
        ({"start": 20.0}, "start", "within [min_temperature, max_temperature]"),
        ({"min_temperature": 3.0, "max_temperature": 2.0}, "max_temperature", "greater than min_temperature"),
        ({"schedule": "linear", "steps": 5, "warmup_steps": 5}, "warmup_steps", "smaller than steps"),
        ({"learnable": "global", "schedule": "cosine"}, "learnable", "replaces the schedule"),
        ({"learnable": "instance", "per_sample": "entropy"}, "learnable", "replaces per_sample"),
        ({"weighting": "focal"}, "weighting", "'off', 'flsw_weight' or 'cwsm_weight'"),
        ({"per_sample": "focal"}, "per_sample", "'off', 'entropy', 'flsw' or 'cwsm'"),
        ({"beta": -1.0}, "beta", "greater than or equal to 0"),
        ({"learnable": "global", "per_sample": "flsw"}, "learnable", "replaces per_sample"),
        ({"temperature_lr": 0.0}, "temperature_lr", "greater than 0"),
        ({"temperature_max_grad_norm": -1.0}, "temperature_max_grad_norm", "greater than 0"),
        ({"lambda_min": 1.0, "lambda_max": 0.5}, "lambda_max", "at least lambda_min"),
        ({"temprature": 2.0}, "temprature", "unknown option"),
    ],
)
def test_invalid_options_name_the_option(models, data, tmp_path, options, option, message):
    with pytest.raises(ConfigError) as info:
        run(models, data, tmp_path, options)
    assert f"plugins.{NAME}.{option}" in str(info.value) and message in str(info.value)


def test_errors_found_when_the_run_is_known(models, data, tmp_path):
    with pytest.raises(ConfigError, match=rf"plugins\.{NAME}\.warmup_steps: 5 is not below the schedule's 3 steps"):
        run(models, data, tmp_path, {"schedule": "linear", "warmup_steps": 5})
    with pytest.raises(ConfigError, match=rf"plugins\.{NAME}\.start: kd's temperature 0.5 is outside"):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"kd": {"temperature": 0.5}, NAME: {}}))
