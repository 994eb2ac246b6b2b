"""kd's terms honour per-sample weights and a teacher's layer_mask in every term."""

from __future__ import annotations

import pytest
import torch

from polydistill import Batch, ModelOutputs
from polydistill_plugins.kd import Settings, StandardKD


def _outputs(seed: int, mask: torch.Tensor, classes: int = 3) -> ModelOutputs:
    g = torch.Generator().manual_seed(seed)
    b, t = mask.shape
    hidden = tuple(torch.randn(b, t, 8, generator=g) for _ in range(3))
    attentions = tuple(torch.softmax(torch.randn(b, 2, t, t, generator=g), -1) for _ in range(2))
    return ModelOutputs(logits=torch.randn(b, classes, generator=g), hidden_states=hidden, attentions=attentions, mask=mask)


def _kd() -> StandardKD:
    kd = StandardKD(Settings(ce=1.0, kl=1.0, hidden=1.0, attention=1.0))
    kd.weights = {"kl": 1.0, "ce": 1.0, "mse": 0.0, "cosine": 0.0, "hidden": 1.0, "attention": 1.0}
    kd.layer_map = {1: 1, 2: 2}
    return kd


MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
LABELS = torch.tensor([0, 2, 1])


def _terms(rows: list[int], **meta) -> dict[str, torch.Tensor]:
    student, teacher = _outputs(0, MASK), _outputs(1, MASK)
    layer_mask = meta.pop("layer_mask", None)
    sample_mask = meta.pop("sample_mask", None)
    pick = torch.tensor(rows)

    def sub(o: ModelOutputs) -> ModelOutputs:
        return ModelOutputs(logits=o.logits[pick], hidden_states=tuple(h[pick] for h in o.hidden_states),
                            attentions=tuple(a[pick] for a in o.attentions), mask=o.mask[pick])

    s, t = sub(student), sub(teacher)
    t.layer_mask = None if layer_mask is None else layer_mask[pick]
    t.sample_mask = None if sample_mask is None else sample_mask[pick]
    if "sample_weights" in meta:
        meta["sample_weights"] = meta["sample_weights"][pick]
    batch = Batch(texts=[""] * len(rows), teacher_texts=[""] * len(rows), langs=["en"] * len(rows),
                  student_inputs={"attention_mask": s.mask}, teacher_inputs=[], labels=LABELS[pick], meta=meta)
    return _kd().loss_terms(batch, s, t, state=None)


@pytest.mark.parametrize("term", ["ce", "kl", "hidden", "attention"])
def test_a_zero_weight_sample_is_left_out_of_every_term(term):
    weighted = _terms([0, 1, 2], sample_weights=torch.tensor([1.0, 0.0, 1.0]))[term]
    alone = _terms([0, 2])[term]
    torch.testing.assert_close(weighted, alone)
    assert not torch.allclose(_terms([0, 1, 2])[term], alone)  # the sample left out does count without weights


@pytest.mark.parametrize("term", ["hidden", "attention"])
def test_per_layer_terms_skip_samples_the_teacher_layers_do_not_teach(term):
    routed = _terms([0, 1, 2], layer_mask=torch.tensor([True, True, False]))
    torch.testing.assert_close(routed[term], _terms([0, 1])[term])
    # logits terms are the fused teachers', which do teach sample 2
    torch.testing.assert_close(routed["kl"], _terms([0, 1, 2])["kl"])


def test_weights_scale_per_sample_ce():
    w = torch.tensor([2.0, 1.0, 0.5])
    per = torch.stack([_terms([i])["ce"] for i in range(3)])
    torch.testing.assert_close(_terms([0, 1, 2], sample_weights=w)["ce"], (w * per).sum() / w.sum())


def test_samples_no_teacher_teaches_keep_their_gold_label_term():
    """Selective distillation (Tan et al. 2019): a sample whose teachers are off still learns its gold label."""
    masked = _terms([0, 1, 2], sample_mask=torch.tensor([True, False, True]))
    for term in ("kl", "hidden", "attention"):
        torch.testing.assert_close(masked[term], _terms([0, 2])[term])
    torch.testing.assert_close(masked["ce"], _terms([0, 1, 2])["ce"])
