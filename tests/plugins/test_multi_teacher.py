"""multi_teacher: fusion weights follow teacher quality, language routing, selective distillation, errors, resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import polydistill
from polydistill import hookimpl, models as M

from conftest import PAIRS, StopAt, write_jsonl

TASK = "sequence_classification"


def two_teachers(trained_teacher, models, **languages):
    """The trained teacher ('good') and a random one ('bad': near-uniform outputs, same labels)."""
    return [
        {"model": str(trained_teacher), "name": "good", **({"languages": languages["good"]} if "good" in languages else {})},
        {"model": str(models["teacher2"]), "name": "bad", **({"languages": languages["bad"]} if "bad" in languages else {})},
    ]


def same_mode_config(models, data, tmp_path, teachers, **plugins):
    """Mode 'same' on the 24 labelled en/de rows (each teacher reads the sample's own text)."""
    return {
        "task": TASK,
        "teachers": teachers,
        "student": {"from_teacher": {"teacher": "bad", "layers": [0, 1]}},
        "data": {"train": {"path": str(data["eval"]), "columns": {"label": "label", "lang": "lang"}}, "batch_size": 8},
        "training": {"max_steps": 3, "learning_rate": 1e-3, "progress": False, "log_every": 1, "seed": 0},
        "plugins": plugins,
        "output_dir": str(tmp_path / "run"),
    }


class Seen:
    """Records, per step, the languages, the fused teacher outputs (and their layer_mask) and kd's sample weights."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        sw = batch.meta.get("sample_weights")
        self.rows.append({
            "texts": list(batch.texts), "langs": list(batch.langs), "logits": teacher_out.logits.detach().cpu(),
            "weights": teacher_out.extra["weights"].cpu(), "ran": list(teacher_out.extra["teachers"]),
            "sample_weights": None if sw is None else torch.as_tensor(sw).cpu(),
            "layer_mask": None if teacher_out.layer_mask is None else teacher_out.layer_mask.cpu(),
            "sample_mask": None if teacher_out.sample_mask is None else teacher_out.sample_mask.cpu(),
            "per_layer": teacher_out.hidden_states is not None,
        })


def teacher_logits(path, texts):
    model = M.load_model(str(path), TASK).eval()
    tok = M.load_tokenizer(str(path))
    with torch.no_grad():
        return torch.cat([model(**tok([t], return_tensors="pt")).logits for t in texts])


# --------------------------------------------------------------------------- fusion


def _kl_to(teacher_path, student_dir):
    """Mean KL(teacher || student) at temperature 1 over the English rows, and how often their classes agree."""
    student = M.load_model(str(student_dir), TASK).eval()
    stok, ttok = M.load_tokenizer(str(student_dir)), M.load_tokenizer(str(teacher_path))
    teacher = M.load_model(str(teacher_path), TASK).eval()
    english = [en for en, _, _ in PAIRS]
    with torch.no_grad():
        s = student(**stok(english, return_tensors="pt", padding=True)).logits
        t = teacher(**ttok(english, return_tensors="pt", padding=True)).logits
    agree = float((s.argmax(-1) == t.argmax(-1)).float().mean())
    return float(F.kl_div(s.log_softmax(-1), t.log_softmax(-1), log_target=True, reduction="batchmean")), agree


def test_dynamic_fusion_trusts_the_trained_teacher_and_the_student_follows_it(models, data, trained_teacher, tmp_path):
    """'bad' (random) gives near-uniform outputs: averaging halves the trained teacher's logits, so the student
    learns a blurred copy; confidence/correctness weighting gives 'good' ~3/4 of the weight and a sharper target."""
    results = {}
    for fusion in ("mean", "confidence", "correctness"):
        cfg = same_mode_config(models, data, tmp_path / fusion, two_teachers(trained_teacher, models),
                               kd={"temperature": 1.0}, multi_teacher={"fusion": fusion})
        cfg["student"] = {"from_teacher": {"teacher": "good", "layers": [0, 2]}}
        cfg["data"]["train"]["filter"] = {"lang": "en"}
        cfg["data"]["batch_size"] = 4
        cfg["training"] = {**cfg["training"], "max_steps": None, "epochs": 5, "learning_rate": 3e-3}
        result = polydistill.train(cfg)
        good = [r["multi_teacher/weight/good"] for r in result.history if "multi_teacher/weight/good" in r]
        results[fusion] = (sum(good) / len(good), *_kl_to(trained_teacher, result.student_dir))
    print({k: tuple(round(x, 4) for x in v) for k, v in results.items()})
    assert results["mean"][0] == pytest.approx(0.5)
    for fusion in ("confidence", "correctness"):
        weight, kl, agree = results[fusion]
        assert weight > 0.7, fusion  # the trained teacher gets most of the weight
        assert kl < 0.5 * results["mean"][1], fusion  # and the student ends closer to it than with plain averaging
        assert agree >= results["mean"][2], fusion


def test_fixed_weights_are_renormalised_per_sample(models, data, trained_teacher, tmp_path):
    seen = Seen()
    cfg = same_mode_config(models, data, tmp_path, two_teachers(trained_teacher, models),
                           multi_teacher={"fusion": "weights", "weights": {"good": 3.0, "bad": 1.0}})
    polydistill.train(cfg, plugins=[("seen", seen)])
    w = torch.cat([r["weights"] for r in seen.rows])
    torch.testing.assert_close(w, torch.tensor([[0.75, 0.25]]).expand_as(w))
    row = seen.rows[0]
    expected = 0.75 * teacher_logits(trained_teacher, row["texts"]) + 0.25 * teacher_logits(models["teacher2"], row["texts"])
    torch.testing.assert_close(row["logits"], expected, atol=1e-5, rtol=1e-4)


class Forwards:
    """Counts each teacher's forward passes per epoch."""

    def __init__(self) -> None:
        self.counts: dict[tuple[int, int], int] = {}

    @hookimpl
    def setup(self, state):
        for i, t in enumerate(state.teachers):
            t.register_forward_hook(lambda *a, i=i: self._count(state, i))

    def _count(self, state, i):
        key = (state.epoch, i)
        self.counts[key] = self.counts.get(key, 0) + 1


def test_the_teachers_run_through_the_teacher_cache(models, data, trained_teacher, tmp_path):
    """Epoch 2 reads every teacher's outputs from the cache; the fused outputs are those of epoch 1."""
    seen, forwards = Seen(), Forwards()
    cfg = same_mode_config(models, data, tmp_path, two_teachers(trained_teacher, models, good=["en"], bad=["de"]),
                           multi_teacher={"fusion": "weights", "weights": {"good": 3.0, "bad": 1.0}, "select": "all"})
    cfg["training"] = {**cfg["training"], "max_steps": None, "epochs": 2}
    cfg["data"]["shuffle"] = False
    cfg["cache"] = {"enabled": True, "dir": str(tmp_path / "cache")}
    polydistill.train(cfg, plugins=[("seen", seen), ("forwards", forwards)])
    assert forwards.counts == {(0, 0): 3, (0, 1): 3}  # 24 rows, batches of 8: three per epoch, none in the second
    first, second = seen.rows[:3], seen.rows[3:]
    for a, b in zip(first, second):
        assert a["texts"] == b["texts"]
        torch.testing.assert_close(a["logits"], b["logits"], atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- language routing


def test_each_sample_is_taught_by_its_languages_teacher(models, data, trained_teacher, tmp_path):
    seen = Seen()
    cfg = same_mode_config(models, data, tmp_path, two_teachers(trained_teacher, models, good=["en"], bad=["de"]),
                           multi_teacher={})  # select: auto -> language, from the teachers' `languages`
    result = polydistill.train(cfg, plugins=[("seen", seen)])
    good = teacher_logits(trained_teacher, [t for r in seen.rows for t in r["texts"]])
    bad = teacher_logits(models["teacher2"], [t for r in seen.rows for t in r["texts"]])
    langs = [lang for r in seen.rows for lang in r["langs"]]
    weights = torch.cat([r["weights"] for r in seen.rows])
    fused = torch.cat([r["logits"] for r in seen.rows])
    assert {"en", "de"} <= set(langs)
    for j, lang in enumerate(langs):
        used = [0] if lang == "en" else [1]
        assert weights[j].nonzero().flatten().tolist() == used, (j, lang)
        torch.testing.assert_close(fused[j], (good if lang == "en" else bad)[j], atol=1e-5, rtol=1e-4)
    assert json.loads((result.output_dir / "multi_teacher.json").read_text())["languages"] == {"en": ["good"], "de": ["bad"]}


def test_languages_option_overrides_and_unmapped_languages(models, data, trained_teacher, tmp_path):
    teachers = two_teachers(trained_teacher, models, good=["de"], bad=["en"])  # overridden by the option below
    seen = Seen()
    cfg = same_mode_config(models, data, tmp_path / "skip", teachers, multi_teacher={"languages": {"en": ["good"]}, "unmapped": "skip"})
    result = polydistill.train(cfg, plugins=[("seen", seen)])
    for r in seen.rows:
        for j, lang in enumerate(r["langs"]):
            expected = [1.0, 0.0] if lang == "en" else [0.0, 0.0]
            assert r["weights"][j].tolist() == expected
            # a German sample has no teacher: kd leaves it out of the teacher terms (not of ce)
            assert r["sample_mask"] is not None and bool(r["sample_mask"][j]) == (lang == "en")
            assert r["sample_weights"] is None
    untaught = [row["multi_teacher/untaught"] for row in result.history if "multi_teacher/untaught" in row]
    share_de = [sum(lang == "de" for lang in r["langs"]) / len(r["langs"]) for r in seen.rows]
    assert untaught == pytest.approx(share_de)

    cfg = same_mode_config(models, data, tmp_path / "error", teachers, multi_teacher={"languages": {"en": ["good"]}, "unmapped": "error"})
    with pytest.raises(polydistill.DataError, match=r"plugins\.multi_teacher\.languages: language 'de' .* has no teacher"):
        polydistill.train(cfg)


@pytest.mark.parametrize(("options", "teaches"), [
    ({}, lambda lang: lang == "en"),  # 'good' (teacher 0) teaches English; German is routed to 'bad'
    ({"languages": {"en": ["good"]}, "unmapped": "skip"}, lambda lang: lang == "en"),  # German: no teacher
    ({"select": "all", "fusion": "weights", "weights": {"good": 0.0, "bad": 1.0}}, lambda lang: False),
    ({"select": "all"}, lambda lang: True),
])
def test_per_layer_outputs_are_marked_for_the_samples_the_first_teacher_teaches(models, data, trained_teacher, tmp_path,
                                                                                 options, teaches):
    """Hidden states and attentions are teacher 0's: layer_mask keeps kd's per-layer terms to its samples."""
    seen = Seen()
    cfg = same_mode_config(models, data, tmp_path, two_teachers(trained_teacher, models, good=["en"], bad=["de"]),
                           kd={"hidden": 1.0, "attention": 1.0}, multi_teacher=options)
    polydistill.train(cfg, plugins=[("seen", seen)])
    langs = [lang for r in seen.rows for lang in r["langs"]]
    assert {"en", "de"} <= set(langs)
    for r in seen.rows:
        assert r["per_layer"] and r["layer_mask"] is not None and r["layer_mask"].dtype == torch.bool
        assert r["layer_mask"].tolist() == [teaches(lang) for lang in r["langs"]]


def test_kd_per_layer_terms_skip_samples_routed_to_other_teachers(models, data, trained_teacher, tmp_path):
    """German rows only, routed to 'bad': teacher 0's hidden states and attentions teach none of them."""
    history = {}
    for lang in ("de", "en"):
        cfg = same_mode_config(models, data, tmp_path / lang, two_teachers(trained_teacher, models, good=["en"], bad=["de"]),
                               kd={"hidden": 1.0, "attention": 1.0}, multi_teacher={})
        cfg["data"]["train"]["filter"] = {"lang": lang}
        history[lang] = [r for r in polydistill.train(cfg).history if "loss/hidden" in r]
    assert history["de"] and all(r["loss/hidden"] == 0 and r["loss/attention"] == 0 for r in history["de"])
    assert all(r["loss/hidden"] > 0 and r["loss/attention"] > 0 for r in history["en"])


# --------------------------------------------------------------------------- selective distillation


def test_selective_distillation_switches_off_a_teacher_the_student_beats(models, data, trained_teacher, tmp_path):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"text": en, "label": label, "lang": "en"} for en, _, label in PAIRS])
    seen = Seen()
    cfg = same_mode_config(models, data, tmp_path, two_teachers(trained_teacher, models),
                           multi_teacher={"selective": True, "heldout": str(heldout), "check_every": 2})
    cfg["student"] = {"model": str(trained_teacher)}  # as good as 'good', far better than 'bad' (on English)
    cfg["data"]["train"]["filter"] = {"lang": "en"}
    cfg["data"]["batch_size"] = 4
    result = polydistill.train(cfg, plugins=[("seen", seen)])
    first = result.history[0]
    assert first["multi_teacher/heldout/en/student"] == 1.0
    assert first["multi_teacher/heldout/en/bad"] < 0.5
    assert first["multi_teacher/active/en/bad"] == 0.0  # the student beats it: switched off
    assert first["multi_teacher/active/en/good"] == 1.0  # a tie keeps the teacher on
    # checks at steps 0 and 2 (logged with steps 1 and 3)
    assert [r["step"] for r in result.history if "multi_teacher/heldout/en/student" in r] == [1, 3]
    for r in seen.rows:  # 'bad' never taught after the check
        assert r["ran"] == [0] and r["weights"][:, 1].abs().sum() == 0
    report = json.loads((result.output_dir / "multi_teacher.json").read_text())["selective"]
    assert report["decisions"][:2] == [
        {"step": 0, "lang": "en", "teacher": "good", "teaches": True, "student": 1.0, "teacher_score": 1.0},
        {"step": 0, "lang": "en", "teacher": "bad", "teaches": False, "student": 1.0, "teacher_score": report["teacher_scores"]["bad"]["en"]},
    ]


def test_selective_keeps_teachers_that_beat_the_student(models, data, trained_teacher, tmp_path):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"text": en, "label": label, "lang": "en"} for en, _, label in PAIRS])
    cfg = same_mode_config(models, data, tmp_path, two_teachers(trained_teacher, models),
                           multi_teacher={"selective": True, "heldout": {"path": str(heldout)}, "check_every": 10})
    result = polydistill.train(cfg)  # the student is cut from the random teacher: no better than either
    first = result.history[0]
    assert first["multi_teacher/active/en/good"] == 1.0 and first["multi_teacher/active/en/bad"] == 1.0


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"fusion": "weights", "weights": {"good": 1.0, "ugly": 1.0}}, r"plugins\.multi_teacher\.weights: unknown teacher\(s\) 'ugly'"),
        ({"languages": {"de": ["gut"]}}, r"plugins\.multi_teacher\.languages\.de: unknown teacher\(s\) 'gut'; the teachers are: good, bad"),
        ({"select": "language"}, r"plugins\.multi_teacher\.select: select: language needs `languages`"),
        ({"fusion": "weights"}, r"plugins\.multi_teacher: fusion: weights needs `weights`"),
        ({"selective": True}, r"plugins\.multi_teacher: selective: true needs `heldout`"),
        ({"selective": True, "heldout": "nowhere.jsonl"}, r"plugins\.multi_teacher\.heldout\.path: file not found"),
        ({"fusion": "softmax"}, r"plugins\.multi_teacher\.fusion: Input should be"),
    ],
)
def test_errors_name_the_option(models, data, trained_teacher, tmp_path, options, message):
    cfg = same_mode_config(models, data, tmp_path, two_teachers(trained_teacher, models), multi_teacher=options)
    with pytest.raises(polydistill.ConfigError, match=message):
        polydistill.train(cfg)


def test_per_token_terms_with_teachers_on_other_tokens_are_refused(models, data, tmp_path):
    cfg = same_mode_config(models, data, tmp_path, [{"model": str(models["teacher"]), "name": "bad"},
                                                    {"model": str(models["other_tok"]), "name": "other"}],
                           kd={"hidden": 1.0}, multi_teacher={})
    with pytest.raises(polydistill.ConfigError, match=r"plugins\.multi_teacher\.fusion: per-token terms .* \(other: another tokenizer"):
        polydistill.train(cfg)


def test_teachers_with_different_tokenizers_each_read_their_own_encoding(models, data, tmp_path):
    seen = Seen()
    cfg = same_mode_config(models, data, tmp_path, [{"model": str(models["teacher"]), "name": "bad"},
                                                    {"model": str(models["other_tok"]), "name": "other"}], multi_teacher={})
    cfg["training"]["max_steps"] = 1
    polydistill.train(cfg, plugins=[("seen", seen)])
    texts = seen.rows[0]["texts"]
    expected = 0.5 * teacher_logits(models["teacher"], texts) + 0.5 * teacher_logits(models["other_tok"], texts)
    torch.testing.assert_close(seen.rows[0]["logits"], expected, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- gate and resume



def test_gate_learns_from_labels_and_resume_is_exact(models, data, trained_teacher, tmp_path):
    heldout = write_jsonl(tmp_path / "heldout.jsonl", [{"text": de, "label": label, "lang": "de"} for _, de, label in PAIRS])
    options = {"fusion": "gate", "selective": True, "heldout": str(heldout), "check_every": 4}

    def config(where):
        # English rows, where 'good' is always right: CE of the fused logits falls as the gate trusts 'good'
        cfg = same_mode_config(models, data, where, two_teachers(trained_teacher, models), multi_teacher=options)
        cfg["training"] = {**cfg["training"], "max_steps": None, "epochs": 4, "learning_rate": 1e-2}
        cfg["data"]["train"]["filter"] = {"lang": "en"}
        cfg["data"]["batch_size"] = 4
        return cfg

    straight = polydistill.train(config(tmp_path / "a"))
    cfg = config(tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        polydistill.train(cfg, plugins=[("stop", StopAt(6))])
    resumed = polydistill.train(cfg, resume=tmp_path / "b" / "run")

    a = load_file(str(straight.output_dir / "student" / "model.safetensors"))
    b = load_file(str(resumed.output_dir / "student" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)

    def plugin_rows(history):
        return [{k: v for k, v in r.items() if k.startswith(("multi_teacher/", "loss/", "step"))} for r in history if "loss" in r]

    assert plugin_rows(straight.history) == plugin_rows(resumed.history)
    # the gate is trained by gate_ce towards the teacher that gives the gold label more probability
    good = [r["multi_teacher/weight/good"] for r in straight.history if "multi_teacher/weight/good" in r]
    print("gate weight of 'good' by step:", [round(g, 3) for g in good])
    assert good[0] == pytest.approx(0.5) and good[-1] > good[0] + 0.02
    gate_ce = [r["loss/gate_ce"] for r in straight.history if "loss/gate_ce" in r]
    assert gate_ce[-1] < gate_ce[0]


def test_a_switched_off_teacher_comes_back_when_the_student_falls_behind(monkeypatch):
    """Tan et al.'s check is re-run every check_every steps; the decision follows the latest scores."""
    from types import SimpleNamespace

    from polydistill_plugins.multi_teacher import MultiTeacher

    plugin = MultiTeacher(MultiTeacher.Settings(selective=True, heldout="unused.jsonl", margin=0.05))
    plugin.names, plugin._heldout = ["t"], (None, None)
    student_scores = iter([0.9, 0.52, 0.4])
    monkeypatch.setattr(plugin, "_score", lambda state, model, tok, ds: (
        {"de": 0.5} if model == "teacher" else {"de": next(student_scores)}))
    state = SimpleNamespace(teachers=["teacher"], teacher_tokenizers=[None], student_tokenizer=None,
                            unwrapped_student=lambda: "student", step=0)
    for step in (0, 2, 4):
        state.step = step
        plugin._check(state)
    # 0.9 > 0.5 + 0.05: off; 0.52 is within the margin: back on; 0.4: stays on
    assert [(d["step"], d["teaches"]) for d in plugin.decisions] == [(0, False), (2, True)]
    assert plugin.active == {"de": {"t": True}}
