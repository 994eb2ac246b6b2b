"""The causal_lm task: next-token targets, the divergences of kd's kl term, distillation, evaluation, resume."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import polydistill
from polydistill import ConfigError
from polydistill import models as M
from polydistill.tasks import get_task
from polydistill_plugins.kd import divergences, kl_divergence, uld_distance

from conftest import PAIRS, TEXTS, tiny_config

TASK = "causal_lm"


def lm_config(models, data, tmp_path, **overrides):
    return tiny_config(models, data, tmp_path, TASK, **overrides)


# --------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("side", ["right", "left"])
def test_targets_are_each_texts_next_tokens_with_either_padding(models, side):
    tok = M.load_tokenizer(str(models["lm"]), task=TASK)
    tok.padding_side = side
    texts = ["the soup is hot", "bread"]
    inputs, positions, labels = get_task(TASK).encode(tok, texts, 32, "longest")
    for i, text in enumerate(texts):
        ids = tok(text)["input_ids"]  # [CLS] ... [SEP] with this tokenizer
        keep = positions[i] >= 0
        assert labels[i][keep].tolist() == ids[1:]  # every token after the first is a target
        assert inputs["input_ids"][i][positions[i][keep]].tolist() == ids[:-1]  # read at the token before it
        assert (labels[i][~keep] == -100).all()


@pytest.mark.parametrize("side", ["right", "left"])
def test_with_a_target_only_the_response_is_learned(models, side):
    tok = M.load_tokenizer(str(models["lm"]), task=TASK)
    tok.padding_side = side
    prompts, answers = ["the soup is hot", "bread"], ["die suppe ist heiß", "brot"]
    inputs, positions, labels = get_task(TASK).encode(tok, prompts, 32, "longest", answers)
    for i, (prompt, answer) in enumerate(zip(prompts, answers)):
        p = tok(prompt)["input_ids"]
        a = tok(answer, add_special_tokens=False)["input_ids"]
        keep = positions[i] >= 0
        assert labels[i][keep].tolist() == a  # the response's tokens, not the prompt's
        ids = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
        assert ids == p + a  # prompt, then response (this tokenizer has no end-of-text token)
        assert inputs["input_ids"][i][positions[i][keep]].tolist() == (p + a)[len(p) - 1 : -1]
    # truncated: a prompt as long as max_length leaves no response to learn
    _, positions, labels = get_task(TASK).encode(tok, ["the soup is hot and the bread is fresh"], 4, "longest", ["brot"])
    assert positions.numel() == 0 or (labels == -100).all()


def test_prompt_response_rows_train_through_columns_target(models, data, tmp_path):
    cfg = lm_config(models, data, tmp_path, training__max_steps=3)
    cfg["data"] = {"train": {"path": str(data["parallel"]), "columns": {"text": "en", "target": "de", "lang": "lang"}},
                   "eval": {"path": str(data["parallel"]), "columns": {"text": "en", "target": "de", "lang": "lang"}}, "batch_size": 4}
    result = polydistill.train(cfg)
    assert result.metrics["tokens"]["de"] == sum(len(M.load_tokenizer(str(models["lm"]))(de, add_special_tokens=False)["input_ids"])
                                                 for _, de, _ in PAIRS)


def test_a_tokenizer_without_padding_gets_its_end_of_text_token(models):
    tok = M.load_tokenizer(str(models["lm"]))
    tok.pad_token, tok.eos_token = None, "[SEP]"
    assert get_task(TASK).prepare_tokenizer(tok, "teachers[0]").pad_token == "[SEP]"
    tok.pad_token, tok.eos_token = None, None
    with pytest.raises(ConfigError, match=r"teachers\[0\]: the tokenizer has neither a padding nor an end-of-text token"):
        get_task(TASK).prepare_tokenizer(tok, "teachers[0]")


# --------------------------------------------------------------------------- divergences


def _probs(logits, t):
    return F.softmax(logits / t, dim=-1)


def _kl(p, q):
    return (p * (p.log() - q.log())).sum(-1)


@pytest.mark.parametrize("divergence", ["forward", "reverse", "skew_forward", "skew_reverse", "jsd"])
def test_each_divergence_matches_its_definition(divergence):
    torch.manual_seed(0)
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    T, alpha, beta = 2.0, 0.3, 0.6
    p, q = _probs(t, T), _probs(s, T)  # teacher p, student q
    expected = {
        "forward": _kl(p, q),
        "reverse": _kl(q, p),
        "skew_forward": _kl(p, alpha * p + (1 - alpha) * q),
        "skew_reverse": _kl(q, (1 - alpha) * p + alpha * q),
        "jsd": beta * _kl(p, beta * p + (1 - beta) * q) + (1 - beta) * _kl(q, beta * p + (1 - beta) * q),
    }[divergence]
    got = divergences(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), divergence, skew=alpha, beta=beta)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # the kl term: T² times the mean over the valid tokens, weighted by sample
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.bool)
    w = torch.tensor([1.0, 2.0, 0.5])
    term = kl_divergence(s, t, T, mask, w, divergence, alpha, beta)
    per = expected * T**2 * mask * w[:, None]
    assert term.item() == pytest.approx((per.sum() / (mask * w[:, None]).sum()).item(), rel=1e-5)


def test_divergences_are_zero_for_equal_distributions_and_jsd_is_bounded():
    x = torch.randn(4, 9)
    for name in ("forward", "reverse", "skew_forward", "skew_reverse", "jsd"):
        assert divergences(F.log_softmax(x, -1), F.log_softmax(x, -1), name).abs().max().item() < 1e-6
    far = divergences(F.log_softmax(torch.tensor([[50.0, 0.0]]), -1), F.log_softmax(torch.tensor([[0.0, 50.0]]), -1), "jsd", beta=0.5)
    assert far.item() <= math.log(2) + 1e-6  # the JSD is at most log 2


# --------------------------------------------------------------------------- training


def _eval_rows(data):
    import json

    return [(r["text"], r["lang"]) for r in map(json.loads, data["eval"].read_text().splitlines())]


def _agreement(student_dir, teacher_dir, texts):
    """Fraction of next tokens where the student's most likely token is the teacher's, and the mean KL(teacher || student)."""
    tok = M.load_tokenizer(str(teacher_dir), task=TASK)
    task = get_task(TASK)
    inputs, positions, labels = task.encode(tok, texts, 64, "longest")
    outs = []
    for path in (student_dir, teacher_dir):
        model = M.load_model(str(path), TASK).eval()
        with torch.no_grad():
            outs.append(M.forward(model, inputs, task, positions))
    keep = outs[0].word_mask
    s, t = outs[0].logits[keep], outs[1].logits[keep]
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return float((s.argmax(-1) == t.argmax(-1)).float().mean()), float(kl)


@pytest.fixture(scope="module")
def trained_lm(models, data, tmp_path_factory):
    """The tiny LM fine-tuned on the en/de sentences (no teacher: kd's ce on the next tokens)."""
    out = tmp_path_factory.mktemp("trained-lm")
    cfg = lm_config(models, data, out, training__epochs=15, training__learning_rate=3e-3, teachers=[])
    cfg["student"] = {"model": str(models["lm"])}
    return polydistill.train(cfg).student_dir


@pytest.mark.parametrize("divergence", ["forward", "reverse", "jsd"])
def test_distilled_student_agrees_more_with_its_teacher(models, data, trained_lm, tmp_path, divergence):
    cfg = lm_config(models, data, tmp_path, training__epochs=10, training__learning_rate=3e-3,
                    plugins={"kd": {"temperature": 1.0, "divergence": divergence}})
    cfg["teachers"] = [{"model": str(trained_lm), "name": "teacher"}]
    cfg["student"] = {"config": {"base": str(models["lm"]), "n_layer": 2}}  # a fresh 2-layer GPT-2
    before = polydistill.train({**cfg, "training": {**cfg["training"], "max_steps": 1, "learning_rate": 1e-9},
                                "output_dir": str(tmp_path / "before")})
    result = polydistill.train(cfg)
    agree_before, kl_before = _agreement(before.student_dir, trained_lm, TEXTS)
    agree_after, kl_after = _agreement(result.student_dir, trained_lm, TEXTS)
    assert kl_after < 0.5 * kl_before, (kl_before, kl_after)
    assert agree_after > agree_before
    de = result.metrics["per_language"]["de"]
    assert set(de) == {"next_token_accuracy", "perplexity", "nll", "teacher_agreement"}
    assert de["perplexity"] == pytest.approx(math.exp(de["nll"]))
    assert de["teacher_agreement"] == pytest.approx(_agreement(result.student_dir, trained_lm, [t for t, lang in _eval_rows(data) if lang == "de"])[0])
    assert de["teacher_agreement"] > before.metrics["per_language"]["de"]["teacher_agreement"]
    assert result.metrics["tokens"]["de"] > 0


def test_without_a_teacher_the_language_model_is_fine_tuned_on_its_next_tokens(trained_lm):
    """The fixture's run is the fine-tuning under test: its next-token loss falls."""
    history = [r for r in _history(trained_lm) if "loss/ce" in r]
    assert history[-1]["loss/ce"] < 0.7 * history[0]["loss/ce"]


def _history(student_dir):
    import json

    return [json.loads(line) for line in (student_dir.parent / "metrics.jsonl").read_text().splitlines()]


def test_refusals_name_the_field(models, data, tmp_path):
    from polydistill.tiny import build_tiny_model, train_tokenizer

    other = build_tiny_model(tmp_path / "other", TEXTS, task=TASK, tokenizer=train_tokenizer(TEXTS, vocab_size=120, lowercase=False))
    cfg = lm_config(models, data, tmp_path, training__max_steps=1)
    with pytest.raises(ConfigError, match=r"teachers: causal_lm distils per-token distributions over one vocabulary, but other "
                                          r"reads other tokens than the student.*or a cross-tokenizer term \(plugins.kd.uld\)"):
        polydistill.train({**cfg, "teachers": [{"model": str(other), "name": "other"}], "student": {"model": str(models["lm"])}})
    with pytest.raises(ConfigError, match=r"mode 'parallel' does not work for causal_lm"):
        polydistill.train({**cfg, "mode": "parallel"})
    with pytest.raises(ConfigError, match=r"plugins\.kd\.skew: Input should be less than 1"):
        polydistill.train({**cfg, "plugins": {"kd": {"skew": 1.0}}})


def test_uld_is_the_l1_distance_of_sorted_probabilities_paired_by_position():
    student = torch.tensor([[[2.0, 0.0, 1.0], [0.0, 0.0, 0.0], [5.0, 1.0, 0.0]]])  # 3 positions, 3 tokens
    teacher = torch.tensor([[[0.0, 3.0], [1.0, 1.0]]])  # 2 positions, 2 tokens
    s_mask = torch.tensor([[True, True, True]])
    t_mask = torch.tensor([[True, False]])  # the teacher's second position is padding
    by_hand = 0.0
    p = torch.softmax(student[0, 0], -1).sort(descending=True).values
    q = torch.softmax(teacher[0, 0], -1).sort(descending=True).values
    by_hand = float((p - torch.cat([q, torch.zeros(1)])).abs().sum())  # the smaller vocabulary padded with 0
    assert float(uld_distance(student, teacher, 1.0, s_mask, t_mask)) == pytest.approx(by_hand)
    both = torch.tensor([[True, True]])
    p2 = torch.softmax(student[0, 1], -1).sort(descending=True).values
    second = float((p2 - torch.tensor([0.5, 0.5, 0.0])).abs().sum())
    assert float(uld_distance(student, teacher, 1.0, s_mask, both)) == pytest.approx((by_hand + second) / 2)
    # a permutation of the vocabulary changes nothing: only the sorted probabilities count
    assert float(uld_distance(student[..., [2, 0, 1]], teacher.flip(-1), 1.0)) == pytest.approx(float(uld_distance(student, teacher, 1.0)))
    assert float(uld_distance(teacher, teacher, 2.0)) == 0.0


def test_a_teacher_with_another_tokenizer_teaches_through_uld(models, data, tmp_path):
    from polydistill.tiny import build_tiny_model, train_tokenizer

    other = build_tiny_model(tmp_path / "other", TEXTS, task=TASK, tokenizer=train_tokenizer(TEXTS, vocab_size=120, lowercase=False))
    fine = lm_config(models, data, tmp_path / "t", training__epochs=15, training__learning_rate=3e-3, teachers=[])
    fine["student"] = {"model": str(other)}
    teacher = polydistill.train(fine).student_dir  # a trained teacher with its own vocabulary
    cfg = lm_config(models, data, tmp_path / "s", training__epochs=8, training__learning_rate=3e-3,
                    teachers=[{"model": str(teacher), "name": "other"}], plugins={"kd": {"uld": 1.0, "ce": 1.0, "temperature": 1.0}})
    cfg["student"] = {"model": str(models["lm"])}
    result = polydistill.train(cfg)
    history = [r for r in _history(result.student_dir) if "loss/uld" in r]
    assert "loss/kl" not in history[0]  # kl's default is off with uld
    assert history[-1]["loss/uld"] < 0.7 * history[0]["loss/uld"]
    with pytest.raises(ConfigError, match=r"plugins.kd.kl: other reads other tokens than the student"):
        polydistill.train({**cfg, "plugins": {"kd": {"uld": 1.0, "kl": 1.0}}})
    with pytest.raises(ConfigError, match=r"plugins.kd.uld: other reads other tokens .* cannot be fused"):
        polydistill.train({**cfg, "teachers": [*cfg["teachers"], {"model": str(models["lm"]), "name": "lm"}]})
    cls = tiny_config(models, data, tmp_path / "c", plugins={"kd": {"uld": 1.0}})
    with pytest.raises(ConfigError, match=r"plugins.kd.uld: the cross-tokenizer term compares distributions over two vocabularies"):
        polydistill.train(cls)


class Forwards:
    """Counts the first teacher's forward passes per epoch."""

    def __init__(self) -> None:
        self.per_epoch: dict[int, int] = {}

    @polydistill.hookimpl
    def setup(self, state):
        state.teachers[0].register_forward_hook(lambda *a: self.per_epoch.__setitem__(state.epoch, self.per_epoch.get(state.epoch, 0) + 1))


@pytest.mark.parametrize("task", ["causal_lm", "seq2seq"])
def test_top_k_teacher_outputs_are_cached_and_read_back(models, data, tmp_path, task):
    """With top_k as large as the vocabulary the cached run trains as the uncached one; later epochs run no teacher."""
    vocab = M.load_model(str(models["lm" if task == "causal_lm" else "mt"]), task).get_output_embeddings().weight.shape[0]
    fields = dict(training__epochs=2, data__shuffle=False, data__eval=[])  # no evaluation: its teacher passes do not count
    plain = polydistill.train(tiny_config(models, data, tmp_path / "plain", task, **fields))
    forwards = Forwards()
    cached = polydistill.train(tiny_config(models, data, tmp_path / "cached", task, **fields,
                                           cache={"enabled": True, "dir": str(tmp_path / "cache"), "top_k": vocab}),
                               plugins=[("forwards", forwards)])
    assert set(forwards.per_epoch) == {0}  # epoch 1 reads every output back
    kl = [r["loss/kl"] for r in plain.history if "loss/kl" in r]
    assert [r["loss/kl"] for r in cached.history if "loss/kl" in r] == pytest.approx(kl, rel=1e-4, abs=1e-6)


def test_a_top_k_row_keeps_the_top_k_and_spreads_the_rest(models):
    from polydistill.tasks.base import _spread

    torch.manual_seed(0)
    logits = torch.randn(1, 3, 11)
    out = polydistill.ModelOutputs(logits=logits, word_mask=torch.ones(1, 3, dtype=torch.bool))
    (row,) = get_task(TASK).cache_rows(out, top_k=4)
    assert row.shape == (3, 8)
    dense = torch.from_numpy(_spread(row, 11))
    p, q = torch.softmax(logits[0], -1), dense.exp()
    top = p.topk(4, -1)
    torch.testing.assert_close(q.gather(-1, top.indices), top.values)  # the kept probabilities, exactly
    torch.testing.assert_close(q.sum(-1), torch.ones(3))  # a distribution
    rest = torch.ones_like(p, dtype=torch.bool).scatter(-1, top.indices, False)
    torch.testing.assert_close(q[rest].view(3, 7), ((1 - top.values.sum(-1, keepdim=True)) / 7).expand(3, 7))


def test_sampled_rows_are_an_unbiased_estimate_of_the_teachers_distribution():
    from polydistill.tasks.base import _spread

    torch.manual_seed(0)
    logits = torch.randn(11).mul(2).expand(1, 20000, 11)  # one distribution at 20000 positions
    out = polydistill.ModelOutputs(logits=logits, word_mask=torch.ones(1, 20000, dtype=torch.bool))
    p = torch.softmax(logits[0, 0], -1)
    means = {}
    for sample in (False, True):
        (row,) = get_task(TASK).cache_rows(out, top_k=4, sample=sample)
        q = torch.from_numpy(_spread(row, 11)).exp()
        torch.testing.assert_close(q.sum(-1), torch.ones(20000))
        means[sample] = q.mean(0)
    # 4 draws per position: each one's frequencies, averaged over positions, come back to p
    error = {k: float((m - p).abs().sum()) for k, m in means.items()}  # twice the total variation distance
    assert error[True] < 0.01 and error[True] < 0.5 * error[False], error  # the most likely 4 and an even tail do not
    (row,) = get_task(TASK).cache_rows(out, top_k=4, sample=True)
    assert set(np.unique(np.exp(row[:, 4:]).round(6))) <= {0.0, 0.25, 0.5, 0.75, 1.0}  # frequencies of 4 draws


def test_sampled_teacher_outputs_train_from_the_cache(models, data, tmp_path):
    fields = dict(training__epochs=2, data__eval=[])
    forwards = Forwards()
    cfg = lm_config(models, data, tmp_path / "sampled", **fields, plugins={"kd": {"temperature": 1.0}},
                    cache={"enabled": True, "dir": str(tmp_path / "cache"), "top_k": 8, "top_k_method": "sample"})
    result = polydistill.train(cfg, plugins=[("forwards", forwards)])
    assert set(forwards.per_epoch) == {0}
    assert all(math.isfinite(r["loss/kl"]) for r in result.history if "loss/kl" in r)
    again = Forwards()  # the top-k entries are another key: a top run computes its own
    polydistill.train(lm_config(models, data, tmp_path / "top", **fields,
                                cache={"enabled": True, "dir": str(tmp_path / "cache"), "top_k": 8}), plugins=[("forwards", again)])
    assert set(again.per_epoch) == {0}
    cfg["output_dir"], cfg["plugins"] = str(tmp_path / "reverse"), {"kd": {"temperature": 1.0, "divergence": "reverse"}}
    with pytest.warns(polydistill.PolydistillWarning, match=r"plugins.kd: cache.top_k_method 'sample' .* forward KL at temperature 1 only"):
        polydistill.train({**cfg, "training": {**cfg["training"], "max_steps": 1}})


def test_the_cache_is_not_used_and_says_why(models, data, tmp_path, capsys):
    cfg = lm_config(models, data, tmp_path, training__max_steps=2, cache={"enabled": True, "dir": str(tmp_path / "cache")})
    polydistill.train(cfg)
    assert "cache.enabled: teacher outputs of causal_lm are a vocabulary-sized distribution per token" in capsys.readouterr().out
    assert not (tmp_path / "cache").exists()
