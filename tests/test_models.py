"""Models: students cut from teachers or built from a config, and the task-specific forward pass."""

from __future__ import annotations

import re

import pytest
import torch

import polydistill
from polydistill import models as M
from polydistill.data import Collator

from conftest import LABELS, parallel_config

SEQ = "sequence_classification"
BLOCK = re.compile(r"^(.*\.layer\.)(\d+)(\..*)$")


@pytest.fixture(scope="module")
def teacher(models):
    return M.load_model(str(models["teacher"]), SEQ).eval()


@pytest.mark.parametrize("layers", [[0, 2], [3, 1], [1]])
def test_student_from_teacher_copies_the_chosen_blocks(teacher, layers):
    student = M.student_from_teacher(teacher, layers, SEQ, LABELS)
    assert student.config.num_hidden_layers == len(layers) and len(student.bert.encoder.layer) == len(layers)
    t_params = teacher.state_dict()
    s_params = student.state_dict()
    blocks = 0
    for name, value in s_params.items():
        m = BLOCK.match(name)
        if m:  # student block i is teacher block layers[i]
            source = f"{m.group(1)}{layers[int(m.group(2))]}{m.group(3)}"
            blocks += 1
        else:  # embeddings, pooler, classifier
            source = name
        assert torch.equal(value, t_params[source]), f"{name} != teacher {source}"
    per_block = sum(1 for n in t_params if n.startswith("bert.encoder.layer.0."))
    assert blocks == per_block * len(layers)
    for part in ("bert.embeddings.word_embeddings.weight", "bert.pooler.dense.weight", "classifier.weight", "classifier.bias"):
        assert part in s_params
    # copies, not views: training the student leaves the teacher alone
    assert all(p.data_ptr() != q.data_ptr() for p in student.parameters() for q in teacher.parameters())
    assert M.model_labels(student) == LABELS


def test_student_from_teacher_gives_the_teachers_outputs_with_all_layers(teacher):
    student = M.student_from_teacher(teacher, [0, 1, 2, 3], SEQ, LABELS).eval()
    ids = torch.tensor([[2, 10, 11, 12, 3]])
    with torch.no_grad():
        torch.testing.assert_close(student(input_ids=ids).logits, teacher(input_ids=ids).logits)


@pytest.mark.parametrize("layers", [[0, 4], [7], [-1]])
def test_student_from_teacher_rejects_layers_out_of_range(teacher, layers):
    with pytest.raises(polydistill.ConfigError, match=r"student\.from_teacher\.layers") as err:
        M.student_from_teacher(teacher, layers, SEQ, LABELS)
    assert "4 layers" in str(err.value)


def test_layer_out_of_range_in_a_run_is_a_config_error(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, student={"from_teacher": {"layers": [0, 9]}})
    with pytest.raises(polydistill.ConfigError, match=r"student\.from_teacher\.layers"):
        polydistill.train(cfg)


def test_student_from_config_overrides_the_base_config(models, teacher):
    student = M.student_from_config(str(models["teacher"]), {"num_hidden_layers": 1}, SEQ, LABELS)
    assert student.config.num_hidden_layers == 1 and len(student.bert.encoder.layer) == 1
    assert student.config.hidden_size == teacher.config.hidden_size
    assert M.model_labels(student) == LABELS
    # randomly initialised, not the base's weights
    assert not torch.equal(student.bert.encoder.layer[0].attention.self.query.weight,
                           teacher.bert.encoder.layer[0].attention.self.query.weight)
    with torch.no_grad():
        assert student(input_ids=torch.tensor([[2, 10, 3]])).logits.shape == (1, len(LABELS))
    embed = M.student_from_config(str(models["teacher"]), {"num_hidden_layers": 1}, "embedding", None)
    assert type(embed).__name__ == "BertModel"


def test_student_from_config_rejects_unknown_fields_and_bad_bases(models, tmp_path):
    with pytest.raises(polydistill.ConfigError, match=r"student\.config\.num_hiden_layers"):
        M.student_from_config(str(models["teacher"]), {"num_hiden_layers": 1}, SEQ, LABELS)
    with pytest.raises(polydistill.ConfigError, match=r"student\.config\.base"):
        M.student_from_config(str(tmp_path / "no-such-model"), {}, SEQ, LABELS)


def test_unloadable_model_is_a_config_error_naming_the_role(tmp_path):
    with pytest.raises(polydistill.ConfigError, match=r"teachers\[1\]"):
        M.load_model(str(tmp_path), SEQ, role="teachers[1]")


# --------------------------------------------------------------------------- forward


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embedding_pooling_ignores_padding(models, pooling):
    model = M.load_model(str(models["embed"]), "embedding").eval()
    tok = M.load_tokenizer(str(models["embed"]))
    short, long = "the soup is hot", "the coach trains the players and the team won the match"
    alone = tok([short], return_tensors="pt")
    both = tok([short, long], return_tensors="pt", padding=True)
    assert both["attention_mask"][0].sum() < both["attention_mask"].size(1)  # the short one is padded
    with torch.no_grad():
        a = M.forward(model, dict(alone), "embedding", pooling=pooling).embeddings
        b = M.forward(model, dict(both), "embedding", pooling=pooling)
        raw = model(**both).last_hidden_state
    assert a.shape == (1, model.config.hidden_size) and b.embeddings.shape == (2, model.config.hidden_size)
    torch.testing.assert_close(b.embeddings[0], a[0], rtol=0, atol=1e-5)
    if pooling == "mean":
        # averaging over the pad positions too would give something else
        assert (raw[0].mean(0) - a[0]).abs().max() > 1e-3
    assert b.mask is both["attention_mask"] and b.hidden_states is None


def test_token_classification_forward_gives_word_level_logits(models):
    model = M.load_model(str(models["tagger"]), "token_classification").eval()
    tok = M.load_tokenizer(str(models["tagger"]))
    words = [["the", "thunderstorm", "soup"], ["schokolade", "is", "hot", "today", "mountainous"]]
    batch = Collator("token_classification", tok, [tok], 64)({"text": words, "lang": ["en", "en"]})
    with torch.no_grad():
        out = M.forward(model, batch.student_inputs, "token_classification", batch.student_words)
        raw = model(**batch.student_inputs).logits
    assert out.logits.shape == (2, 5, 3)
    assert out.word_mask.tolist() == [[True, True, True, False, False], [True] * 5]
    for i, ws in enumerate(words):
        for w in range(len(ws)):
            assert torch.equal(out.logits[i, w], raw[i, batch.student_words[i, w]])
    with pytest.raises(ValueError):
        M.forward(model, batch.student_inputs, "token_classification")


def test_sequence_forward_and_per_layer_outputs(teacher, models):
    tok = M.load_tokenizer(str(models["teacher"]))
    inputs = dict(tok(["the soup is hot", "it rains"], return_tensors="pt", padding=True))
    with torch.no_grad():
        out = M.forward(teacher, inputs, SEQ, hidden_states=True, attentions=True)
        plain = M.forward(teacher, inputs, SEQ)
    assert out.logits.shape == (2, len(LABELS)) and out.embeddings is None
    assert len(out.hidden_states) == teacher.config.num_hidden_layers + 1
    assert len(out.attentions) == teacher.config.num_hidden_layers
    assert plain.hidden_states is None and plain.attentions is None
    torch.testing.assert_close(out.logits, plain.logits)


def test_a_teacher_without_a_trained_head_is_refused(models, data, tmp_path):
    from conftest import parallel_config

    # the embedding model has an encoder but no classification head
    cfg = parallel_config(models, data, tmp_path, teachers=[{"model": str(models["embed"])}])
    with pytest.raises(polydistill.ConfigError, match=r"teachers\[0\]: .* has no trained sequence_classification head"):
        polydistill.train(cfg)


def test_a_hub_id_without_network_fails_at_once_with_the_fix(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from polydistill import models as PM

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setitem(PM._HUB_REACHABLE, constants.ENDPOINT, False)  # as the 2-second check finds it offline
    assert PM.hub_options("org/some-model") == {"local_files_only": True}
    with pytest.raises(polydistill.ConfigError, match=r"teachers\[0\]: 'org/some-model' is not a local folder, the hub .* cannot "
                       r"be reached, and it is not in the local Hugging Face cache .*HF_HUB_OFFLINE=1"):
        PM.load_model("org/some-model", "sequence_classification", role="teachers[0]")
    with pytest.raises(polydistill.ConfigError, match=r"student.model: 'org/some-model' is not a local folder"):
        PM.load_tokenizer("org/some-model", "student.model")
    assert PM.hub_options(str(tmp_path)) == {}  # a local folder never asks the network
