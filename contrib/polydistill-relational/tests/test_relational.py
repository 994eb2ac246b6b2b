"""Relational KD, tested with the fixtures polydistill.testing provides (no conftest needed)."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from polydistill import ConfigError, ModelOutputs, PluginError, hookimpl
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


# --------------------------------------------------------------------------- sample weights


def _brute_force(student, teacher, w, beta=1.0):
    """The weighted losses by explicit sums over pairs and triplets (pair w_i w_j, triplet w_i w_j w_k)."""
    n = len(w)

    def dist(x):
        return [[float((x[i] - x[j]).norm()) for j in range(n)] for i in range(n)]

    def normed(d):
        total = sum(w[i] * w[j] * d[i][j] for i in range(n) for j in range(n) if i != j)
        norm = sum(w[i] * w[j] for i in range(n) for j in range(n) if i != j)
        return [[d[i][j] * norm / total for j in range(n)] for i in range(n)]

    def huber(a, b):
        return 0.5 * (a - b) ** 2 / beta if abs(a - b) < beta else abs(a - b) - 0.5 * beta

    ds, dt = normed(dist(student)), normed(dist(teacher))
    distance = sum(w[i] * w[j] * huber(ds[i][j], dt[i][j]) for i in range(n) for j in range(n)) / sum(w) ** 2

    def cos(x, i, j, k):
        if i == j or k == j:
            return 0.0
        a, b = x[i] - x[j], x[k] - x[j]
        return float(a @ b / (a.norm() * b.norm()))

    angle = sum(w[i] * w[j] * w[k] * huber(cos(student, i, j, k), cos(teacher, i, j, k))
                for i in range(n) for j in range(n) for k in range(n)) / sum(w) ** 3
    return distance, angle


def test_positive_weights_weight_each_pair_and_triplet_by_the_product_of_its_rows_weights():
    torch.manual_seed(1)
    student, teacher = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    w = [2.0, 1.0, 0.5, 3.0, 1.0]
    distance, angle = _brute_force(student, teacher, w, beta=0.3)
    weights = torch.tensor(w, dtype=torch.float64)
    assert distance_loss(student, teacher, 0.3, weights).item() == pytest.approx(distance, rel=1e-9)
    assert angle_loss(student, teacher, 0.3, weights).item() == pytest.approx(angle, rel=1e-9)
    # weights of 1 (or any one constant) are the paper's loss: the plain mean over N² pairs and N³ triplets
    plain = _brute_force(student, teacher, [1.0] * 5, beta=0.3)
    for constant in (None, torch.full((5,), 4.0, dtype=torch.float64)):
        assert distance_loss(student, teacher, 0.3, constant).item() == pytest.approx(plain[0], rel=1e-9)
        assert angle_loss(student, teacher, 0.3, constant).item() == pytest.approx(plain[1], rel=1e-9)
    assert distance != pytest.approx(plain[0]) and angle != pytest.approx(plain[1])


def _outputs(**fields):
    return ModelOutputs(**fields)


def _terms(options, task, student_out, teacher_out, sample_weights=None, seed=0):
    plugin = relational.Relational(relational.Settings(**options))
    batch = SimpleNamespace(meta={} if sample_weights is None else {"sample_weights": sample_weights})
    state = SimpleNamespace(task=task, rng=lambda salt=0: torch.Generator().manual_seed(seed * 1000 + salt))
    return plugin.loss_terms(batch=batch, student_out=student_out, teacher_out=teacher_out, state=state)


def test_rows_of_weight_zero_are_not_points_and_callables_are_resolved_like_kd():
    """multi_teacher's untaught samples: zero fused logits and sample weight 0 (a tensor, or a callable)."""
    torch.manual_seed(2)
    student, teacher = torch.randn(6, 3), torch.randn(6, 3)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    teacher = teacher * keep[:, None]  # what multi_teacher fuses for a sample no teacher teaches
    s_out, t_out = _outputs(logits=student), _outputs(logits=teacher)
    rows = keep.bool()
    expected = {"rkd_distance": distance_loss(student[rows], teacher[rows]), "rkd_angle": 2 * angle_loss(student[rows], teacher[rows])}
    calls = []

    def weights(so, to):
        calls.append((so, to))
        return keep

    for given in (keep, weights):
        terms = _terms({}, "sequence_classification", s_out, t_out, given)
        for name, value in expected.items():
            assert terms[name].item() == pytest.approx(value.item(), rel=1e-5), (given, name)
    assert len(calls) == 1 and calls[0][0] is s_out and calls[0][1] is t_out
    # the untaught rows would have changed both terms
    unweighted = _terms({}, "sequence_classification", s_out, t_out)
    assert all(abs(unweighted[k].item() - v.item()) > 1e-3 for k, v in expected.items())
    # positive weights reach the loss; a weight per sample multiplies each pair/triplet
    w = torch.tensor([2.0, 0.0, 1.0, 0.5, 0.0, 3.0])
    terms = _terms({}, "sequence_classification", s_out, t_out, w)
    assert terms["rkd_distance"].item() == pytest.approx(distance_loss(student[rows], teacher[rows], weights=w[rows]).item(), rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(2 * angle_loss(student[rows], teacher[rows], weights=w[rows]).item(), rel=1e-5)
    assert abs(terms["rkd_distance"].item() - expected["rkd_distance"].item()) > 1e-4


def test_too_few_weighted_rows_add_zero_with_a_gradient_path():
    student = torch.randn(4, 3, requires_grad=True)
    terms = _terms({}, "sequence_classification", _outputs(logits=student), _outputs(logits=torch.randn(4, 3)),
                   torch.tensor([0.0, 1.0, 0.0, 0.0]))
    assert terms["rkd_distance"].item() == 0.0 and terms["rkd_angle"].item() == 0.0
    (terms["rkd_distance"] + terms["rkd_angle"]).backward()
    assert torch.equal(student.grad, torch.zeros(4, 3))


@pytest.mark.parametrize(("weights", "message"), [
    (torch.ones(5), r"one weight per sample, shape \(4,\); got shape \(5,\)"),
    (torch.tensor([1.0, -1.0, 1.0, 1.0]), r"must be finite and >= 0"),
])
def test_unusable_sample_weights_are_an_error_naming_the_plugin(weights, message):
    out = _outputs(logits=torch.randn(4, 3))
    with pytest.raises(PluginError, match=r'plugins\.relational: batch\.meta\["sample_weights"\] .*' + message):
        _terms({}, "sequence_classification", out, out, weights)


def test_samples_multi_teacher_leaves_untaught_are_not_points_in_a_run(run_plugin, tiny_models, tiny_data):
    """English rows are taught, German ones are not (unmapped: skip): the terms are those of the English rows."""
    seen = []

    class Record:
        @hookimpl
        def loss_terms(self, batch, student_out, teacher_out, state):
            seen.append((list(batch.langs), student_out.logits.detach().clone(), teacher_out.logits.detach().clone()))

    run = run_plugin("relational", {}, steps=2, mode="same", extra=[("record", Record())],
                     teachers=[{"model": str(tiny_models["teacher"]), "name": "english", "languages": ["en"]}],
                     data__train={"path": str(tiny_data["eval"]), "columns": {"label": "label", "lang": "lang"}},
                     data__batch_size=24, plugins={"multi_teacher": {"unmapped": "skip"}})
    assert len(seen) == 2
    for (langs, student, teacher), distance, angle in zip(seen, run.term("rkd_distance"), run.term("rkd_angle")):
        english = torch.tensor([lang == "en" for lang in langs])
        assert 0 < int(english.sum()) < len(langs)
        assert teacher[~english].abs().sum() == 0  # untaught: zero fused logits
        assert distance == pytest.approx(distance_loss(student[english], teacher[english]).item(), rel=1e-4)
        assert angle == pytest.approx(2 * angle_loss(student[english], teacher[english]).item(), rel=1e-4)
        assert abs(distance - distance_loss(student, teacher).item()) > 1e-3  # all rows would differ


# --------------------------------------------------------------------------- token tasks: per sentence, capped


def _token_outputs(sentences, words, classes, lengths=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = lengths or [words] * sentences
    width = max(lengths) + 2  # two padding columns
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    student = torch.randn(sentences, width, classes, generator=g).requires_grad_()
    teacher = torch.randn(sentences, width, classes, generator=g)
    return _outputs(logits=student, word_mask=mask), _outputs(logits=teacher, word_mask=mask.clone())


def test_token_relations_are_per_sentence_by_default_and_over_the_batch_with_scope_batch():
    s_out, t_out = _token_outputs(4, 5, 3, lengths=[5, 4, 2, 6])
    mask, s, t = s_out.word_mask, s_out.logits.detach(), t_out.logits
    w = torch.tensor([1.0, 2.0, 1.0, 0.5])
    per = [(distance_loss(s[b][mask[b]], t[b][mask[b]]), angle_loss(s[b][mask[b]], t[b][mask[b]]) if mask[b].sum() >= 3 else None)
           for b in range(4)]
    # each sentence's loss counts with its sample weight; a 2-word sentence has no triplet
    distance = sum(w[b] * per[b][0] for b in range(4)) / w.sum()
    angle = sum(w[b] * per[b][1] for b in range(4) if per[b][1] is not None) / (w.sum() - w[2])
    terms = _terms({}, "token_classification", s_out, t_out, w)
    assert terms["rkd_distance"].item() == pytest.approx(distance.item(), rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(2 * angle.item(), rel=1e-5)
    # scope: batch relates every word of the batch, each weighing its sentence's weight
    words = w[:, None].expand_as(mask)[mask]
    terms = _terms({"scope": "batch"}, "token_classification", s_out, t_out, w)
    assert terms["rkd_distance"].item() == pytest.approx(distance_loss(s[mask], t[mask], weights=words).item(), rel=1e-5)
    assert terms["rkd_angle"].item() == pytest.approx(2 * angle_loss(s[mask], t[mask], weights=words).item(), rel=1e-5)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operation produces; refuses (before a larger one) past ``limit`` elements."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.largest = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
                if t.numel() > self.limit:
                    raise MemoryError(f"{func} built a tensor of {t.numel():,} elements (limit {self.limit:,})")
        return out


@pytest.mark.parametrize(("options", "bound"), [({}, 64 * 30**3), ({"scope": "batch", "max_rows": 100}, 100**3)])
def test_a_batch_of_64_sentences_of_30_words_stays_far_below_the_memory_of_all_triplets(options, bound):
    """All 1920 words as one set would build 1920³ angles (7e9 floats, ~28 GB) per angle tensor."""
    s_out, t_out = _token_outputs(64, 30, 9)
    with _LargestTensor(limit=4_000_000) as probe:  # 16 MB of float32: far below 28 GB
        terms = _terms(options, "token_classification", s_out, t_out)
        (terms["rkd_distance"] + terms["rkd_angle"]).backward()
    assert probe.largest <= bound
    assert all(math.isfinite(v.item()) and v.item() > 0 for v in terms.values())
    assert torch.isfinite(s_out.logits.grad).all() and s_out.logits.grad.abs().sum() > 0


def test_max_rows_draws_a_seeded_subset_of_the_weighted_rows():
    torch.manual_seed(3)
    student, teacher = torch.randn(1, 40, 4), torch.randn(1, 40, 4)
    weights = torch.ones(1, 40)
    weights[0, :10] = 0  # never drawn
    student[0, :, 0] = torch.arange(40.0)  # each row says which it is

    def draw(seed):
        s, t, w = relational.subsample(student, teacher, weights, 8, torch.Generator().manual_seed(seed))
        rows = s[0, :, 0].long().tolist()
        assert t.shape == (1, 8, 4) and torch.equal(t[0], teacher[0, rows]) and torch.equal(w, torch.ones(1, 8))
        return rows

    first = draw(0)
    assert len(set(first)) == 8 and min(first) >= 10 and first == sorted(first)
    assert draw(0) == first and draw(1) != first
    # through the hook: the draw comes from state.rng, the same for the same step
    s_out, t_out = _outputs(logits=student[0]), _outputs(logits=teacher[0])
    w = weights[0]
    a, b = (_terms({"max_rows": 8}, "sequence_classification", s_out, t_out, w, seed=0) for _ in range(2))
    c = _terms({"max_rows": 8}, "sequence_classification", s_out, t_out, w, seed=1)
    assert a["rkd_angle"].item() == b["rkd_angle"].item() != c["rkd_angle"].item()


def test_a_token_run_with_scope_batch_and_max_rows_repeats_exactly(run_plugin):
    runs = [run_plugin("relational", {"scope": "batch", "max_rows": 5}, task="token_classification") for _ in range(2)]
    every = run_plugin("relational", {"scope": "batch"}, task="token_classification")  # ~20 words a batch
    for term in ("rkd_distance", "rkd_angle"):
        assert runs[0].term(term) == runs[1].term(term) and all(math.isfinite(v) and v > 0 for v in runs[0].term(term))
        assert runs[0].term(term)[0] != pytest.approx(every.term(term)[0])  # 5 of the words, not all


def test_scope_on_a_sentence_level_task_is_an_error_naming_the_option(run_plugin):
    with pytest.raises(ConfigError, match=r"plugins\.relational\.scope: only token_classification"):
        run_plugin("relational", {"scope": "batch"})
