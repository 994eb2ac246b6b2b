"""dropout: the student's dropout rates by role, in every module, in the saved config, and their effect."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import polydistill
from polydistill import hookimpl, models as M
from polydistill_plugins.regularize import apply_dropout, dropout_roles

from conftest import PAIRS, parallel_config


class Keep:
    """Keeps the run's student at the end of training."""

    @hookimpl
    def on_train_end(self, state):
        self.student = state.unwrapped_student()
        self.tokenizer = state.student_tokenizer


def bert_role(name: str) -> str:
    """Which rate a BERT module must have, written out by hand from BERT's module names."""
    if name == "dropout":
        return "classifier"
    if name.endswith("attention.self.dropout"):
        return "attention"
    assert name.startswith("bert.") and name.endswith("dropout"), name
    return "hidden"


def rates(model: nn.Module) -> dict[str, float]:
    return {name: m.p for name, m in model.named_modules() if isinstance(m, nn.Dropout)}


def test_every_dropout_module_gets_its_roles_rate_and_the_saved_config_records_it(models, data, tmp_path):
    wanted = {"hidden": 0.3, "attention": 0.05, "classifier": 0.45}
    keep = Keep()
    result = polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=2, plugins={"dropout": wanted}),
                               plugins=[("keep", keep)])
    found = rates(keep.student)
    assert len(found) == 1 + 1 + 2 * 3  # head, embeddings, and 3 per layer in 2 layers
    assert found == {name: wanted[bert_role(name)] for name in found}
    assert {k: result.history[0][f"dropout/{k}"] for k in wanted} == wanted
    saved = json.loads((result.student_dir / "config.json").read_text())
    assert (saved["hidden_dropout_prob"], saved["attention_probs_dropout_prob"], saved["classifier_dropout"]) == (0.3, 0.05, 0.45)
    reloaded = M.load_model(str(result.student_dir), "sequence_classification")
    assert rates(reloaded) == found


def test_zero_dropout_makes_training_mode_deterministic(models, data, tmp_path):
    """The effect: with every rate 0 two forward passes in training mode agree; with BERT's default 0.1 they do not."""
    texts = [de for _, de, _ in PAIRS]

    def two_passes(plugins):
        keep = Keep()
        polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=1, plugins=plugins), plugins=[("keep", keep)],
                          overwrite=True)
        student = keep.student.train()
        enc = keep.tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            return student(**enc).logits, student(**enc).logits

    a, b = two_passes({"dropout": {"hidden": 0.0, "attention": 0.0, "classifier": 0.0}})
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    a, b = two_passes({})
    assert not torch.equal(a, b)


def test_hidden_alone_leaves_attention_and_a_following_head_follows(models):
    model = M.load_model(str(models["teacher2"]), "sequence_classification")
    assert model.config.classifier_dropout is None  # the head follows hidden_dropout_prob in transformers
    applied = apply_dropout(model, hidden=0.25)
    assert applied == {"hidden": 0.25, "classifier": 0.25}
    for name, p in rates(model).items():
        assert p == (0.1 if bert_role(name) == "attention" else 0.25), name
    assert model.config.hidden_dropout_prob == 0.25 and model.config.attention_probs_dropout_prob == 0.1


def test_a_generic_transformers_model_distilbert():
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    model = DistilBertForSequenceClassification(DistilBertConfig(
        vocab_size=50, dim=16, n_layers=2, n_heads=2, hidden_dim=32, max_position_embeddings=32, num_labels=3))
    roles = {role: sorted(name for name, _ in found) for role, found in dropout_roles(model).items()}
    assert roles == {
        "classifier": ["dropout"],
        "attention": [f"distilbert.transformer.layer.{i}.attention.dropout" for i in range(2)],
        "hidden": ["distilbert.embeddings.dropout"] + [f"distilbert.transformer.layer.{i}.ffn.dropout" for i in range(2)],
    }
    apply_dropout(model, hidden=0.2, attention=0.3, classifier=0.4)
    want = {"classifier": 0.4, "attention": 0.3, "hidden": 0.2}
    assert all(m.p == want[role] for role, found in dropout_roles(model).items() for _, m in found)
    c = model.config
    assert (c.dropout, c.attention_dropout, c.seq_classif_dropout) == (0.2, 0.3, 0.4)


def test_a_role_the_architecture_lacks_is_an_error(models):
    encoder = M.load_model(str(models["embed"]), "embedding")  # no task head
    with pytest.raises(polydistill.ConfigError, match=r"plugins\.dropout\.classifier: found no classifier dropout in BertModel \(the model has no task head\)"):
        apply_dropout(encoder, classifier=0.2)

    class NoAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1))

    with pytest.raises(polydistill.ConfigError, match=r"plugins\.dropout\.attention: found no attention dropout .* body\.1 \(hidden\)"):
        apply_dropout(NoAttention(), attention=0.2)


@pytest.mark.parametrize(("options", "message"), [
    ({}, r"plugins\.dropout: set at least one of hidden, attention, classifier"),
    ({"hidden": 1.0}, r"plugins\.dropout\.hidden: Input should be less than 1"),
    ({"hiden": 0.2}, r"plugins\.dropout\.hiden: unknown option; did you mean 'hidden'\?"),
])
def test_settings_errors_name_the_option(models, data, tmp_path, options, message):
    with pytest.raises(polydistill.ConfigError, match=message):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"dropout": options}))
