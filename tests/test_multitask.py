"""Multi-task runs: one student encoder, a head per task, each task with its teachers, data and plugins."""

from __future__ import annotations

import json
import shutil
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file

import polydistill
from polydistill import load_config
from polydistill.errors import ConfigError
from polydistill.multitask import MultiTaskConfig, MultiTaskOptions, task_at, task_probabilities
from polydistill.testing import with_fields


def multitask_config(models, data, out, **fields):
    parallel = {"path": str(data["parallel"]), "columns": {"text": "de", "source": "en", "lang": "lang"}}
    cfg = {
        "student": {"from_teacher": {"teacher": "clf", "layers": [0, 2]}},
        "training": {"max_steps": 12, "learning_rate": 1e-3, "progress": False, "log_every": 2, "seed": 3, "checkpoint_every": 4},
        "data": {"batch_size": 4},
        "output_dir": str(out),
        "plugins": {"kd": True},
        "tasks": {
            "topics": {"task": "sequence_classification", "mode": "parallel",
                       "teachers": [{"model": str(models["teacher"]), "name": "clf"}],
                       "data": {"train": parallel, "eval": {"path": str(data["eval"]), "columns": {"label": "label", "lang": "lang"}}}},
            "tags": {"task": "token_classification", "teachers": [{"model": str(models["tagger"]), "name": "tagger"}],
                     "data": {"train": {"path": str(data["tokens"]), "columns": {"text": "words", "lang": "lang"}},
                              "eval": {"path": str(data["tokens"]), "columns": {"text": "words", "label": "tags", "lang": "lang"}}}},
            "embed": {"task": "embedding", "mode": "parallel", "teachers": [{"model": str(models["embed"]), "name": "emb"}],
                      "data": {"train": parallel, "eval": parallel}, "plugins": {"kd": {"normalize": True}}},
        },
    }
    return with_fields(cfg, **fields)


# ---------------------------------------------------------------------------- config


def test_each_task_is_a_complete_config_over_the_top_level_defaults(models, data, tmp_path):
    cfg = load_config(multitask_config(models, data, tmp_path / "run", data__max_length=64,
                                       tasks__tags__data__batch_size=2, plugins={"kd": {"temperature": 3.0}}))
    assert isinstance(cfg, MultiTaskConfig) and list(cfg.tasks) == ["topics", "tags", "embed"]
    topics, tags, embed = cfg.tasks.values()
    assert (topics.task, topics.mode, tags.mode, embed.task) == ("sequence_classification", "parallel", "same", "embedding")
    assert tags.data.batch_size == 2 and topics.data.batch_size == 4 and tags.data.max_length == 64
    assert embed.plugins["kd"] == {"temperature": 3.0, "normalize": True}  # merged option by option
    assert topics.plugins["kd"] == {"temperature": 3.0}
    assert cfg.builder == "topics"  # holds student.from_teacher's teacher
    # a resolved multi-task config is a runnable multi-task config
    again = load_config(cfg.resolved_dict())
    assert {n: c.resolved_dict() for n, c in again.tasks.items()} == {n: c.resolved_dict() for n, c in cfg.tasks.items()}


@pytest.mark.parametrize("change, message", [
    ({"tasks__tags__data__train": {"path": "x.jsonl", "columns": {"text": "words"}}}, None),
    ({"tasks__tags__mode": "sideways"}, "tasks.tags.mode"),
    ({"tasks__tags__task": "tagging"}, r"tasks.tags: 1 invalid option:\n  task: unknown task"),
    ({"tasks__embed__training": {"epochs": 2}}, "tasks.embed.training: one run has one training"),
    ({"tasks__topics__weight": 0}, "tasks.topics.weight"),
    ({"multitask": {"sampling": "random"}}, "multitask.sampling"),
    ({"student": {"from_teacher": {"teacher": "nobody", "layers": [0]}}}, "is not a teacher of any task"),
    ({"tasks__bad.name": {"task": "embedding"}}, "tasks.bad.name: a task name is letters"),
    ({"taskz": {}}, "taskz: unknown option; did you mean"),
])
def test_config_errors_name_the_task_and_field(models, data, tmp_path, change, message):
    cfg = multitask_config(models, data, tmp_path / "run", **change)
    if message is None:  # a missing file is found before any model loads, and named with its task
        with pytest.raises(ConfigError, match=r"tasks\.tags.*x\.jsonl"):
            polydistill.train(cfg)
        return
    with pytest.raises(ConfigError, match=message):
        load_config(cfg)


def test_a_task_switched_off_is_left_out(models, data, tmp_path):
    cfg = load_config(multitask_config(models, data, tmp_path / "run", tasks__tags__enabled=False))
    assert list(cfg.tasks) == ["topics", "embed"]
    with pytest.raises(ConfigError, match="every task is switched off"):
        load_config(multitask_config(models, data, tmp_path / "run", **{f"tasks__{n}__enabled": False for n in ("topics", "tags", "embed")}))


# ---------------------------------------------------------------------------- sampling


def test_sampling_probabilities_follow_sizes_and_temperature():
    sizes = {"big": 90, "small": 10}
    prop = task_probabilities(MultiTaskOptions(sampling="proportional"), sizes)
    temp = task_probabilities(MultiTaskOptions(sampling="temperature", temperature=2.0), sizes)
    assert prop == pytest.approx({"big": 0.9, "small": 0.1})
    assert temp == pytest.approx({"big": 0.75, "small": 0.25})  # sqrt(90) : sqrt(10) = 3 : 1
    assert task_probabilities(MultiTaskOptions(sampling="round_robin"), sizes) == {"big": 0.5, "small": 0.5}


def test_task_draws_are_a_function_of_seed_and_step():
    opts, names = MultiTaskOptions(sampling="temperature"), ["big", "small"]
    p = task_probabilities(opts, {"big": 90, "small": 10})
    draws = [task_at(s, names, p, opts, seed=1) for s in range(4000)]
    assert draws == [task_at(s, names, p, opts, seed=1) for s in range(4000)]
    assert draws != [task_at(s, names, p, opts, seed=2) for s in range(4000)]
    assert Counter(draws)["small"] / 4000 == pytest.approx(0.25, abs=0.03)
    rr = MultiTaskOptions(sampling="round_robin")
    assert [task_at(s, names, p, rr, seed=1) for s in range(4)] == ["big", "small", "big", "small"]


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def trained(tiny_models, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("multitask") / "run"
    return polydistill.train(multitask_config(tiny_models, tiny_data, out, multitask={"sampling": "round_robin"}))


def test_one_encoder_is_trained_by_every_task(trained):
    rows = [r for r in trained.history if "loss" in r]
    steps = Counter()
    for r in rows:
        steps.update({k.split("/")[0]: v for k, v in r.items() if k.endswith("/steps")})
    assert steps == {"topics": 4, "tags": 4, "embed": 4}  # round robin over 12 steps, counted as ints
    assert any("topics/loss/kl" in r for r in rows) and any("embed/loss/mse" in r for r in rows)
    assert any("topics/kd/temperature" in r for r in rows)  # a task's plugin logs carry its name
    m = trained.metrics
    assert set(m["tasks"]) == {"topics", "tags", "embed"}
    assert m["average"]["topics/accuracy"] == m["tasks"]["topics"]["average"]["accuracy"]
    assert set(m["per_language"]) == {"de", "en"} and "tags/token_accuracy" in m["per_language"]["de"]
    out = trained.output_dir
    text = (out / "results.md").read_text()
    assert "## topics (sequence_classification)" in text and "## embed (embedding)" in text
    assert (out / "results-tags.png").read_bytes()[:4] == b"\x89PNG"
    # every head sits on the same encoder weights
    enc = load_file(out / "student" / "encoder" / "model.safetensors")
    topics = load_file(out / "student" / "topics" / "model.safetensors")
    tags = load_file(out / "student" / "tags" / "model.safetensors")
    for name, value in enc.items():
        if name.startswith(("embeddings.", "encoder.")):
            assert torch.equal(topics[f"bert.{name}"], value) and torch.equal(tags[f"bert.{name}"], value)


def test_each_head_loads_with_transformers_and_scores_as_in_the_run(trained, tiny_data):
    from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

    student = trained.output_dir / "student"
    assert isinstance(AutoModelForSequenceClassification.from_pretrained(student / "topics"), torch.nn.Module)
    tagger = AutoModelForTokenClassification.from_pretrained(student / "tags")
    assert tagger.config.id2label == {0: "O", 1: "B-FOOD", 2: "I-FOOD"}  # the tagging teacher's tags
    readme = (student / "README.md").read_text()
    assert "AutoModelForTokenClassification" in readme and 'SentenceTransformer("PATH/TO/student/encoder")' in readme
    results = polydistill.evaluate(trained.output_dir)
    assert results["student"]["average"] == pytest.approx(trained.metrics["average"])


def test_the_encoder_alone_is_a_sentence_transformers_model(trained):
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(trained.output_dir / "student" / "encoder"), device="cpu")
    vectors = model.encode(["the soup is hot", "die suppe ist heiss"])
    assert vectors.shape == (2, 32)
    assert (trained.output_dir / "student" / "encoder" / "2_Normalize").is_dir()  # the embed task normalised


def generative_config(models, data, out, student):
    """topics (classification) first, then a causal LM task, on one GPT-2 student."""
    text = {"path": str(data["eval"]), "columns": {"text": "text", "lang": "lang"}}
    return {
        "student": student,
        "training": {"max_steps": 8, "learning_rate": 1e-3, "progress": False, "log_every": 2, "seed": 3},
        "data": {"batch_size": 4}, "output_dir": str(out), "plugins": {"kd": True},
        "tasks": {
            "topics": {"task": "sequence_classification", "mode": "parallel",
                       "teachers": [{"model": str(models["teacher"]), "name": "clf"}],
                       "data": {"train": {"path": str(data["parallel"]), "columns": {"text": "de", "source": "en", "lang": "lang"}},
                                "eval": {"path": str(data["eval"]), "columns": {"label": "label", "lang": "lang"}}}},
            "lm": {"task": "causal_lm", "mode": "same", "teachers": [{"model": str(models["lm"]), "name": "lm"}],
                   "data": {"train": text, "eval": text}},
        },
    }


def test_a_language_model_head_beside_a_classifier_keeps_its_output_layer_tied(models, data, tmp_path):
    from transformers import AutoModelForCausalLM

    # the student is built for topics (the first task); the LM head is added on its encoder, and its output
    # layer must be the shared input embeddings (GPT-2 ties them), not a new random matrix
    result = polydistill.train(generative_config(models, data, tmp_path / "run", {"model": str(models["lm"])}))
    # the student starts as the LM teacher itself, so it agrees with it (a random output layer: ~0.3)
    assert result.metrics["average"]["lm/teacher_agreement"] > 0.8
    lm = AutoModelForCausalLM.from_pretrained(result.output_dir / "student" / "lm")
    assert lm.lm_head.weight.data_ptr() == lm.transformer.wte.weight.data_ptr()
    again = polydistill.evaluate(result.output_dir)["student"]["average"]
    assert again["lm/perplexity"] == pytest.approx(result.metrics["average"]["lm/perplexity"], rel=1e-5)


def test_two_translation_directions_are_two_tasks_of_one_student(models, data, tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    result = polydistill.train({
        "student": {"from_teacher": {"teacher": "ende", "layers": [0], "decoder_layers": [0]}},
        "training": {"max_steps": 4, "learning_rate": 1e-3, "progress": False, "seed": 3},
        "task": "seq2seq", "mode": "same", "data": {"batch_size": 4}, "output_dir": str(tmp_path / "run"),
        "tasks": {direction: {"teachers": [{"model": str(models["mt"]), "name": direction}],
                              "data": {"train": (d := {"path": str(data["parallel"]), "columns": {"text": src, "target": tgt, "lang": "lang"}}),
                                       "eval": d}}
                  for direction, src, tgt in [("ende", "en", "de"), ("deen", "de", "en")]},
    })
    assert {"ende/bleu", "deen/bleu"} <= set(result.metrics["average"])
    for direction in ("ende", "deen"):
        model = AutoModelForSeq2SeqLM.from_pretrained(result.output_dir / "student" / direction)
        assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    assert polydistill.evaluate(result.output_dir)["student"]["average"] == pytest.approx(result.metrics["average"])


def test_a_task_the_architecture_has_no_model_for_is_named(models, data, tmp_path):
    # transformers has no Marian sequence classifier
    cfg = generative_config(models, data, tmp_path / "run", {"from_teacher": {"teacher": "mt", "layers": [0], "decoder_layers": [0]}})
    pairs = {"path": str(data["parallel"]), "columns": {"text": "en", "target": "de"}}
    cfg["tasks"] = {"topics": cfg["tasks"]["topics"], "translate": {
        "task": "seq2seq", "mode": "same", "teachers": [{"model": str(models["mt"]), "name": "mt"}],
        "data": {"train": pairs, "eval": pairs}}}
    with pytest.raises(ConfigError, match=r"tasks\.topics: sequence_classification: the shared student is a MarianMTModel, "
                                          r"and transformers has no AutoModelForSequenceClassification for model_type 'marian'"):
        polydistill.train(cfg)


def test_a_resumed_run_trains_the_same_weights(models, data, tmp_path):
    cfg = multitask_config(models, data, tmp_path / "a", multitask={"sampling": "temperature", "weighting": "uncertainty"})
    whole = polydistill.train(cfg)
    shutil.copytree(tmp_path / "a" / "checkpoints" / "checkpoint-8", tmp_path / "ckpt")
    resumed = polydistill.train(multitask_config(models, data, tmp_path / "b", multitask={"sampling": "temperature", "weighting": "uncertainty"}),
                                resume=tmp_path / "ckpt")
    for folder in ("topics", "tags", "embed", "encoder"):
        a = load_file(whole.output_dir / "student" / folder / "model.safetensors")
        b = load_file(resumed.output_dir / "student" / folder / "model.safetensors")
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), folder
    assert whole.metrics == resumed.metrics
    weights = [r[k] for r in whole.history for k in r if k.endswith("/weight")]
    assert weights and any(w != 1.0 for w in weights)  # uncertainty weights are learned


def test_uncertainty_weights_move_towards_one_over_each_tasks_loss(models, data, tmp_path):
    # s_t minimises exp(-s_t)·L + s_t at exp(-s_t) = 1/L: a task whose loss is below 1 gains weight, one above
    # loses it. They learn at multitask.weight_learning_rate, not at the student's rate (1e-3 here, which
    # would keep every weight within 1 ± 0.015 in 12 steps).
    result = polydistill.train(multitask_config(models, data, tmp_path / "a", multitask={
        "sampling": "round_robin", "weighting": "uncertainty", "weight_learning_rate": 0.1}))
    checked = 0
    for task in ("topics", "tags", "embed"):
        # the task's unweighted loss: the sum of its terms (<task>/loss itself is weighted: exp(-s)·L + s)
        losses = [sum(v for k, v in r.items() if k.startswith(f"{task}/loss/")) for r in result.history if f"{task}/loss" in r]
        weight = [r[f"{task}/weight"] for r in result.history if f"{task}/weight" in r][-1]
        if min(losses) > 1.2:
            assert weight < 0.9, (task, losses, weight)
            checked += 1
        elif max(losses) < 0.8:
            assert weight > 1.1, (task, losses, weight)
            checked += 1
    assert checked >= 2


def test_resume_refuses_another_task_set(models, data, tmp_path):
    polydistill.train(multitask_config(models, data, tmp_path / "a", training__max_steps=4))
    with pytest.raises(ConfigError, match="tasks.tags"):
        polydistill.train(multitask_config(models, data, tmp_path / "a", training__max_steps=4, tasks__tags__enabled=False),
                          resume=tmp_path / "a")


def test_a_study_adds_one_task_at_a_time(models, data, tmp_path):
    from polydistill.study import plan_study

    base = multitask_config(models, data, tmp_path / "run", training__max_steps=2)
    study = {"base": base, "axes": {"tasks": {"add_tasks": ["tags", "embed"]}}, "output_dir": str(tmp_path / "study")}
    path = tmp_path / "study.json"
    path.write_text(json.dumps(study))
    plan = plan_study(path)
    assert [c.name for c in plan.cells] == ["base", "+tags", "+embed"]
    enabled = [[n for n, s in r.config["tasks"].items() if s.get("enabled", True)] for r in plan.runs]
    assert enabled == [["topics"], ["topics", "tags"], ["topics", "embed"]]
    assert plan.metric == "topics/accuracy"


def test_the_run_report_has_a_loss_plot_per_task_and_metrics_per_task_and_language(trained, tmp_path):
    from polydistill.report import write_run_report

    report = write_run_report(trained.output_dir, tmp_path / "report")
    names = {p.name for p in report.files}
    assert {"losses_topics.png", "losses_tags.png", "losses_embed.png", "eval_topics_accuracy.png",
            "eval_tags_token_accuracy.png", "eval_embed_mean.png", "report.html"} <= names
    md = (tmp_path / "report" / "report.md").read_text()
    assert "### tags (token_classification)" in md and "| de |" in md


def test_the_progress_bar_shows_each_tasks_loss_by_task_name():
    from types import SimpleNamespace

    from polydistill.multitask.trainer import MultiTaskTrainer

    trainer = SimpleNamespace(parts={"topics": None, "tags": None, "embed": None})
    # both tasks log loss/kl; the base bar keyed by the last name part would keep one of them
    mean = {"loss": 0.5, "topics/loss": 0.25, "topics/loss/kl": 0.25, "tags/loss": 0.75, "tags/loss/kl": 0.75, "lr": 1e-4}
    assert MultiTaskTrainer._bar_fields(trainer, mean) == {"loss": "0.5", "topics": "0.25", "tags": "0.75"}


def test_cli_validates_a_multitask_config(models, data, tmp_path, capsys):
    from polydistill.cli import main

    path = tmp_path / "multi.json"
    path.write_text(json.dumps(multitask_config(models, data, tmp_path / "run")))
    assert main(["config", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "valid multi-task config" in out and "tags: token_classification, mode same" in out
    path.write_text(json.dumps(multitask_config(models, data, tmp_path / "run", tasks__tags__enabled=False)))
    assert main(["config", "validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "switched off: tags" in out and "tags: token_classification" not in out


def test_teacher_outputs_store_serves_every_task_exactly(models, data, tmp_path):
    from polydistill import store

    def cfg(out, **cache):
        return multitask_config(models, data, out, training__max_steps=6, training__checkpoint_every=None,
                                multitask={"sampling": "round_robin"}, cache=cache)

    plain = polydistill.train(cfg(tmp_path / "plain"))
    built = store.build(load_config(cfg(tmp_path / "x")), tmp_path / "store", progress=False)
    assert built.rows > 0 and len(built.built) >= 3  # each task's teacher
    stored = polydistill.train(cfg(tmp_path / "stored", enabled=True, backend="datasets", dir=str(tmp_path / "store")))
    for folder in ("topics", "tags", "embed"):
        a = load_file(plain.output_dir / "student" / folder / "model.safetensors")
        b = load_file(stored.output_dir / "student" / folder / "model.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), folder
