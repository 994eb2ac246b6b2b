import numpy as np
import pytest
import torch

from polydistill.metrics import (
    average_over_languages,
    classification_metrics,
    retrieval_accuracy,
    token_metrics,
)


# ---------------------------------------------------------------- classification


def test_classification_hand_computed_with_label_only_in_predictions():
    preds = [0, 1, 1, 2, 0]
    refs = [0, 1, 0, 1, 0]
    out = classification_metrics(preds, refs)
    assert out["accuracy"] == pytest.approx(3 / 5)
    # label 0: P=2/2, R=2/3 -> F1=0.8; label 1: P=1/2, R=1/2 -> 0.5;
    # label 2 (predicted only): F1=0.  Macro = 1.3 / 3.
    assert out["macro_f1"] == pytest.approx(1.3 / 3)


def test_classification_label_only_in_references_counts_as_zero():
    out = classification_metrics([0, 0, 0], [0, 0, 1])
    assert out["accuracy"] == pytest.approx(2 / 3)
    # label 0: P=2/3, R=1 -> 0.8; label 1: 0.
    assert out["macro_f1"] == pytest.approx(0.4)


def test_classification_perfect():
    assert classification_metrics([2, 1, 0], [2, 1, 0]) == {"accuracy": 1.0, "macro_f1": 1.0}


def test_classification_errors():
    with pytest.raises(ValueError, match="empty"):
        classification_metrics([], [])
    with pytest.raises(ValueError, match="2 predictions but 3 references"):
        classification_metrics([0, 1], [0, 1, 1])
    with pytest.raises(ValueError, match="outside"):
        classification_metrics([0, 3], [0, 1], num_labels=3)


# ---------------------------------------------------------------- token tagging


def test_entity_precision_recall_hand_computed():
    refs = [["B-PER", "I-PER", "O", "B-LOC", "O", "O"]]
    preds = [["B-PER", "I-PER", "O", "B-ORG", "O", "B-LOC"]]
    out = token_metrics(preds, refs)
    # gold: PER[0:1], LOC[3]; predicted: PER[0:1], ORG[3], LOC[5] -> 1 correct.
    assert out["entity_precision"] == pytest.approx(1 / 3)
    assert out["entity_recall"] == pytest.approx(1 / 2)
    assert out["entity_f1"] == pytest.approx(0.4)
    assert out["token_accuracy"] == pytest.approx(4 / 6)
    # tags: B-PER 1, I-PER 1, O (P=2/2, R=2/3 -> 0.8), B-LOC (no TP -> 0), B-ORG 0.
    assert out["token_macro_f1"] == pytest.approx((1 + 1 + 0.8 + 0 + 0) / 5)


def test_i_after_o_starts_entity():
    refs = [["O", "B-PER", "I-PER", "O"]]
    preds = [["O", "I-PER", "I-PER", "O"]]
    out = token_metrics(preds, refs)
    assert out["token_accuracy"] == pytest.approx(3 / 4)
    assert out["entity_precision"] == 1.0
    assert out["entity_recall"] == 1.0
    assert out["entity_f1"] == 1.0


def test_i_after_different_type_starts_entity():
    refs = [["B-PER", "B-LOC"]]
    preds = [["B-PER", "I-LOC"]]
    out = token_metrics(preds, refs)
    assert out["entity_f1"] == 1.0
    # but a merged span is not the same as two spans
    out = token_metrics([["B-PER", "I-PER"]], refs)
    assert out["entity_precision"] == 0.0
    assert out["entity_recall"] == 0.0
    assert out["entity_f1"] == 0.0


def test_entities_do_not_cross_sentence_boundaries():
    refs = [["O", "B-PER"], ["B-PER", "O"]]
    preds = [["O", "B-PER"], ["I-PER", "O"]]
    out = token_metrics(preds, refs)
    assert out["entity_precision"] == 1.0
    assert out["entity_recall"] == 1.0


def test_non_bio_tags_have_no_entity_scores():
    refs = [["NOUN", "VERB", "NOUN"], ["DET"]]
    preds = [["NOUN", "NOUN", "NOUN"], ["DET"]]
    out = token_metrics(preds, refs)
    assert set(out) == {"token_accuracy", "token_macro_f1"}
    assert out["token_accuracy"] == pytest.approx(3 / 4)
    # NOUN: P=2/3, R=1 -> 0.8; VERB: 0; DET: 1.
    assert out["token_macro_f1"] == pytest.approx(1.8 / 3)


def test_token_length_mismatch_names_sentence():
    with pytest.raises(ValueError, match="sentence 1"):
        token_metrics([["O"], ["O", "O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="sentences"):
        token_metrics([["O"]], [["O"], ["O"]])
    with pytest.raises(ValueError, match="no tokens"):
        token_metrics([], [])


# ---------------------------------------------------------------- retrieval


def _toy_bitext():
    # s2 is deliberately closer to t1 than to its own translation t2.
    # s0 is scaled so that a dot-product (non-cosine) implementation fails.
    src = np.array([[3.0, 0.0], [0.0, 1.0], [0.1, 1.0]], dtype=np.float32)
    tgt = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)
    return src, tgt


def test_retrieval_toy_directions_differ():
    src, tgt = _toy_bitext()
    out = retrieval_accuracy(src, tgt)
    # src->tgt: s0->t0 ok, s1->t1 ok, s2->t1 wrong.
    assert out["src2tgt"] == pytest.approx(2 / 3)
    # tgt->src: t0->s0, t1->s1 (1.0 vs 0.995), t2->s2 (0.774 vs 0.707): all ok.
    assert out["tgt2src"] == pytest.approx(1.0)
    assert out["mean"] == pytest.approx(5 / 6)
    swapped = retrieval_accuracy(tgt, src)
    assert swapped["src2tgt"] == pytest.approx(1.0)
    assert swapped["tgt2src"] == pytest.approx(2 / 3)


def test_retrieval_accepts_torch_and_half():
    src, tgt = _toy_bitext()
    expected = retrieval_accuracy(src, tgt)
    assert retrieval_accuracy(torch.from_numpy(src), torch.from_numpy(tgt)) == expected
    assert retrieval_accuracy(src.astype(np.float16), tgt.astype(np.float16)) == expected
    assert retrieval_accuracy(torch.from_numpy(src).half(), tgt) == expected


def _brute_force(src, tgt):
    s = src / np.linalg.norm(src, axis=1, keepdims=True)
    t = tgt / np.linalg.norm(tgt, axis=1, keepdims=True)
    sims = s @ t.T
    idx = np.arange(len(s))
    return float(np.mean(sims.argmax(1) == idx)), float(np.mean(sims.argmax(0) == idx))


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1024])
def test_retrieval_chunking_matches_full_matrix(chunk_size):
    rng = np.random.default_rng(0)
    src = rng.normal(size=(200, 16)).astype(np.float32)
    tgt = (src + rng.normal(scale=1.2, size=src.shape)).astype(np.float32)
    exp_s2t, exp_t2s = _brute_force(src.astype(np.float64), tgt.astype(np.float64))
    assert 0.1 < exp_s2t < 0.95 and 0.1 < exp_t2s < 0.95  # non-trivial
    assert exp_s2t != exp_t2s
    out = retrieval_accuracy(src, tgt, chunk_size=chunk_size)
    assert out["src2tgt"] == pytest.approx(exp_s2t)
    assert out["tgt2src"] == pytest.approx(exp_t2s)
    assert out == retrieval_accuracy(src, tgt, chunk_size=3)


def test_retrieval_errors():
    with pytest.raises(ValueError, match="rows"):
        retrieval_accuracy(np.ones((3, 4)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="dims"):
        retrieval_accuracy(np.ones((3, 4)), np.ones((3, 5)))
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        retrieval_accuracy(np.ones(3), np.ones(3))
    with pytest.raises(ValueError, match="chunk_size"):
        retrieval_accuracy(np.ones((3, 4)), np.ones((3, 4)), chunk_size=0)


# ---------------------------------------------------------------- averaging


def test_average_over_languages_keeps_common_metrics():
    out = average_over_languages(
        {"en": {"acc": 0.8, "f1": 0.6}, "de": {"acc": 0.6}, "sw": {"acc": 0.4, "f1": 0.2}}
    )
    assert out == {"acc": pytest.approx(0.6)}
    with pytest.raises(ValueError):
        average_over_languages({})
