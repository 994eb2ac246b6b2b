"""l2: plain L2 and L2-SP penalties equal a hand computation, start at 0, hold the student back, and resume exactly."""

from __future__ import annotations

import shutil
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

import polydistill
from polydistill import load_config, models as M
from polydistill_plugins.regularize import L2

from conftest import LABELS, StopAt, parallel_config

TASK = "sequence_classification"


def unit(models, data, tmp_path, student=None, **options):
    """An L2 plugin set up on a tiny BERT, outside a run."""
    model = M.load_model(str(models["teacher2"]), TASK)
    cfg = load_config(parallel_config(models, data, tmp_path, **({"student": student} if student else {})))
    plugin = L2(L2.Settings(**options))
    state = SimpleNamespace(config=cfg, unwrapped_student=lambda: model)
    plugin.setup(state)
    return plugin, model, state


def squares(model, keep) -> torch.Tensor:
    return sum(p.detach().pow(2).sum() for n, p in model.named_parameters() if keep(n))


def is_bias_or_layernorm(name: str) -> bool:  # BERT's names, written out by hand
    return name.endswith(".bias") or ".LayerNorm." in name


def test_plain_l2_equals_a_hand_computation(models, data, tmp_path):
    plugin, model, state = unit(models, data, tmp_path, weight=0.5)
    got = plugin.regularize(model, state)
    assert set(got) == {"l2"}
    torch.testing.assert_close(got["l2"].detach(), 0.25 * squares(model, lambda n: not is_bias_or_layernorm(n)))
    assert any(is_bias_or_layernorm(n) for n, _ in model.named_parameters())
    assert not any(is_bias_or_layernorm(n) for n in plugin.selected)  # excluded by default

    plugin, model, state = unit(models, data, tmp_path, weight=0.5, include_bias_and_norm=True)
    torch.testing.assert_close(plugin.regularize(model, state)["l2"].detach(), 0.25 * squares(model, lambda n: True))

    plugin, model, state = unit(models, data, tmp_path, weight=2.0, params=["bert.encoder.layer.0.*"], exclude=["re:attention\\.self"],
                                include_bias_and_norm=True)
    keep = lambda n: n.startswith("bert.encoder.layer.0.") and "attention.self" not in n  # noqa: E731
    torch.testing.assert_close(plugin.regularize(model, state)["l2"].detach(), 1.0 * squares(model, keep))


def test_l2_sp_anchors_pretrained_weights_and_shrinks_new_ones(models, data, tmp_path):
    # student.model: the head (outside model.base_model) counts as new by default
    plugin, model, state = unit(models, data, tmp_path, student={"model": str(models["teacher2"])}, sp_alpha=0.4, sp_beta=0.6)
    assert plugin.new == ["classifier.weight"]
    assert "bert.encoder.layer.0.attention.self.query.weight" in plugin.shared and "classifier.weight" not in plugin.initial
    got = plugin.regularize(model, state)
    assert float(got["l2_sp"].detach()) == 0.0
    torch.testing.assert_close(got["l2_sp_new"].detach(), 0.3 * model.classifier.weight.detach().pow(2).sum())
    with torch.no_grad():
        model.bert.encoder.layer[1].output.dense.weight.add_(0.5)  # every entry moved by 0.5
        model.bert.encoder.layer[1].output.dense.bias.add_(0.5)  # a bias: not penalised
    n = model.bert.encoder.layer[1].output.dense.weight.numel()
    torch.testing.assert_close(float(plugin.regularize(model, state)["l2_sp"].detach()), 0.2 * n * 0.25)

    # student.from_teacher: the head is copied from the teacher, so nothing is new; new_params overrides
    plugin, _, _ = unit(models, data, tmp_path, sp_alpha=0.4)
    assert plugin.new == []
    plugin, _, _ = unit(models, data, tmp_path, sp_alpha=0.4, new_params=["re:^classifier"], include_bias_and_norm=True)
    assert plugin.new == ["classifier.weight", "classifier.bias"]


@pytest.mark.parametrize(("options", "message"), [
    ({}, r"plugins\.l2: set weight, sp_alpha or sp_beta above 0"),
    ({"weight": 0.1, "params": ["re:("]}, r"plugins\.l2\.params: .*not a valid regular expression"),
    ({"weight": 0.1, "params": ["encoder.*"]}, r"plugins\.l2\.params: pattern 'encoder\.\*' matches no parameter of the student; names look like: bert\.embeddings"),
    ({"weight": -1}, r"plugins\.l2\.weight: Input should be greater than or equal to 0"),
    ({"sp_beta": 0.1}, r"plugins\.l2\.sp_beta: no selected parameter is new"),  # from_teacher: the head is not new
])
def test_errors_name_the_option(models, data, tmp_path, options, message):
    with pytest.raises(polydistill.ConfigError, match=message):
        polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=1, plugins={"l2": options}))


def _distance(student_dir, initial) -> float:
    final = load_file(str(student_dir / "model.safetensors"))
    return sum(float((final[k] - v).pow(2).sum()) for k, v in initial.items()) ** 0.5


def test_l2_sp_is_zero_at_the_start_and_keeps_the_student_near_its_initial_weights(models, data, tmp_path):
    teacher = M.load_model(str(models["teacher"]), TASK)
    initial = {k: v.clone() for k, v in M.student_from_teacher(teacher, [0, 2], TASK, LABELS).state_dict().items()
               if k.endswith(".weight") and ".LayerNorm." not in k}
    free = polydistill.train(parallel_config(models, data, tmp_path / "free", training__epochs=4))
    held = polydistill.train(parallel_config(models, data, tmp_path / "held", training__epochs=4, plugins={"l2": {"sp_alpha": 1.0}}))
    sp = [r["reg/l2_sp"] for r in held.history if "reg/l2_sp" in r]
    assert sp[0] == 0.0 and min(sp[1:]) > 0
    # the logged distance is the one in the saved student, and it is smaller than without the penalty
    d_free, d_held = _distance(free.student_dir, initial), _distance(held.student_dir, initial)
    print(f"||w - w0||: without L2-SP {d_free:.4f}, with sp_alpha=1 {d_held:.4f}")
    last = [r for r in held.history if "l2/sp_distance" in r][-1]
    assert last["l2/sp_distance"] == pytest.approx((last["reg/l2_sp"] * 2) ** 0.5, rel=1e-5)
    assert d_held < 0.6 * d_free



def test_resume_anchors_to_the_original_initial_weights(models, data, tmp_path):
    """Even when the student's source changes before the resume, w0 comes from the checkpoint."""
    source = tmp_path / "student_model"
    shutil.copytree(models["teacher2"], source)
    original = load_file(str(source / "model.safetensors"))
    options = {"sp_alpha": 1.0, "sp_beta": 0.1}
    overrides = dict(training__epochs=3, data__batch_size=3, student={"model": str(source)}, plugins={"l2": options})
    straight = polydistill.train(parallel_config(models, data, tmp_path / "a", **overrides), plugins=[("l2", L2(L2.Settings(**options)))])

    cfg = parallel_config(models, data, tmp_path / "b", **overrides)
    with pytest.raises(KeyboardInterrupt):
        polydistill.train(cfg, plugins=[("l2", L2(L2.Settings(**options))), ("stop", StopAt(5))])
    save_file({k: v + 0.1 for k, v in original.items()}, str(source / "model.safetensors"))  # the source moved on
    plugin = L2(L2.Settings(**options))
    resumed = polydistill.train(cfg, resume=tmp_path / "b" / "run", plugins=[("l2", plugin)])

    for name, w0 in plugin.initial.items():
        torch.testing.assert_close(w0.cpu(), original[name], rtol=0, atol=0, msg=name)
    a = load_file(str(straight.output_dir / "student" / "model.safetensors"))
    b = load_file(str(resumed.output_dir / "student" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    reg = lambda h: [(r["step"], r["reg/l2_sp"], r["reg/l2_sp_new"]) for r in h if "reg/l2_sp" in r]  # noqa: E731
    assert reg(straight.history) == reg(resumed.history)
