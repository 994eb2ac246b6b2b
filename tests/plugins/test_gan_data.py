"""The gan_data plugin: adversarial generator, data-free and mixed distillation."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import polydistill
from polydistill import hookimpl
from polydistill_plugins.gan_data import _SALT_GENERATOR_STEP, GanData, Settings
from polydistill_plugins.kd import kl_divergence

from conftest import PAIRS, StopAt, parallel_config

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "examples" / "gan_data.yaml"

SENTENCES = [t for en, de, _ in PAIRS for t in (en, de)]


def data_free_config(teacher, student, tmp_path, steps, **training):
    return {
        "task": "sequence_classification",
        "teachers": [{"model": str(teacher), "name": "teacher"}],
        "student": student,
        "data": {"train": [], "batch_size": 16},
        "training": {"max_steps": steps, "learning_rate": 5e-3, "progress": False, "log_every": 1, "seed": 0, **training},
        "plugins": {"kd": {"temperature": 1.0}},
        "output_dir": str(tmp_path / "run"),
    }


def predictions(model, tokenizer):
    enc = tokenizer(SENTENCES, return_tensors="pt", padding=True)
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(**enc).logits.argmax(-1)
    model.train(was)
    return out


def gan(**options):
    """The plugin as run() receives it (the same object a config's `plugins: {gan_data: ...}` builds)."""
    return ("gan_data", GanData(Settings(**options)))


class Agreement:
    """Teacher-student agreement on the real PAIRS sentences, at setup and at the end."""

    def __init__(self):
        self.values, self.chance = [], None

    def measure(self, state):
        teacher = predictions(state.teachers[0], state.teacher_tokenizers[0])
        student = predictions(state.unwrapped_student(), state.student_tokenizer)
        self.values.append(float((teacher == student).float().mean()))
        # the best a constant student can do
        self.chance = float(torch.bincount(teacher).max()) / len(teacher)

    @hookimpl
    def setup(self, state):
        self.measure(state)

    @hookimpl
    def on_train_end(self, state):
        self.measure(state)


class GeneratorOnly:
    """At the end of a run: discrepancy on fixed noise before and after generator-only updates."""

    def __init__(self, gan, updates):
        self.gan, self.updates = gan, updates
        self.before = self.after = None
        self.student_unchanged = None

    def discrepancy(self, state):
        gan = self.gan
        gen = torch.Generator().manual_seed(123)
        with torch.no_grad():
            student = state.unwrapped_student()
            student.eval()
            tokens = gan.generate(256, gen, state.device)
            s, t = gan.logits(state, tokens, student)
            student.train()
        return float(gan.objective(s, t))  # the objective the generator ascends

    @hookimpl
    def on_train_end(self, state):
        weights = {k: v.clone() for k, v in state.unwrapped_student().state_dict().items()}
        self.before = self.discrepancy(state)
        for _ in range(self.updates):
            state.batch_in_epoch += 1  # fresh noise for each update (state.rng keys on the position)
            self.gan.generator_update(state, 16)
        self.after = self.discrepancy(state)
        self.student_unchanged = all(torch.equal(weights[k], v) for k, v in state.unwrapped_student().state_dict().items())


@pytest.mark.parametrize(
    "options",
    [
        {"hard": False},
        # l1 is not the student's kd loss: warned about (test_an_explicitly_different_generator_objective_...)
        pytest.param({"hard": False, "discrepancy": "l1"}, marks=pytest.mark.filterwarnings("ignore:plugins.gan_data.discrepancy")),
        {"hard": True, "estimator": "reinforce"},
    ],
    ids=["soft-kl", "soft-l1", "hard-reinforce"],
)
def test_generator_updates_raise_the_discrepancy_they_maximise(trained_teacher, tmp_path, options):
    # The student is a 1-layer cut of the teacher: it agrees with the teacher on real text, so the
    # generator has to search for disagreement. (hard + straight_through is biased; see the docs.)
    name, plugin = gan(length=8, diversity=0, learning_rate=1e-2, **options)
    probe = GeneratorOnly(plugin, updates=25)
    cfg = data_free_config(trained_teacher, {"from_teacher": {"layers": [0]}}, tmp_path, steps=1)
    polydistill.train(cfg, plugins=[(name, plugin), ("probe", probe)])
    print(f"{options}: discrepancy on 256 generated samples {probe.before:.3f} -> {probe.after:.3f} after 25 generator updates")
    assert probe.after > 1.4 * probe.before
    assert probe.student_unchanged  # the generator's updates leave the student alone


class OneLoss:
    """Both players' sides of the min-max game, each on its own batch.

    Listed before gan_data, its ``augment_batch`` runs just before the generator's update: it redraws the batch the
    generator is about to update on (same seeded noise, same generator weights, student in eval mode as there) and
    computes kd's kl term on it with kd's own function, weight and temperature. In ``loss_terms`` it keeps the
    student's and teachers' logits the step's kd loss was computed from.
    """

    def __init__(self, gan, weight, temperature):
        self.gan, self.weight, self.temperature = gan, weight, temperature
        self.generator_side, self.student_outputs = [], []

    @hookimpl
    def augment_batch(self, batch, state):
        gan, student = self.gan, state.unwrapped_student()
        was = student.training
        student.eval()
        with torch.no_grad():
            tokens = gan.generate(gan.batch_size(state), gan._seeded(state, _SALT_GENERATOR_STEP), state.device)
            s, t = gan.logits(state, tokens, student)
        student.train(was)
        self.generator_side.append(self.weight * float(kl_divergence(s, t, self.temperature)))
        return None

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        if batch.meta.get("generated"):
            self.student_outputs.append((student_out.logits.detach().clone(), teacher_out.logits.detach().clone()))
        return None


def gan_warnings(run):
    """The PolydistillWarnings about gan_data that ``run()`` issues."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run()
    ours = [w for w in caught if issubclass(w.category, polydistill.PolydistillWarning)]
    return [str(w.message) for w in ours if "plugins.gan_data" in str(w.message)]


@pytest.mark.parametrize("options", [{}, {"hard": False}], ids=["reinforce", "soft"])
def test_generator_ascends_exactly_the_kd_loss_the_student_descends(models, trained_teacher, tmp_path, options):
    # Fang et al. 2019: one loss, ascended by the generator and descended by the student. kd's temperature and
    # weight here are not gan_data's former generator objective (T² · KL at T = 1, weight 1), so a generator
    # objective of its own would show on both sides.
    name, plugin = gan(length=6, **options)
    probe = OneLoss(plugin, weight=0.7, temperature=3.0)
    # an untrained student with the teacher's tokenizer: the players disagree from the start
    cfg = data_free_config(trained_teacher, {"model": str(models["teacher2"])}, tmp_path, steps=3)
    cfg["plugins"] = {"kd": {"temperature": 3.0, "kl": 0.7}}
    result = None

    def run():
        nonlocal result
        result = polydistill.train(cfg, plugins=[("one_loss", probe), (name, plugin)])

    assert gan_warnings(run) == []  # tied by default: nothing to warn about
    rows = [r for r in result.history if "loss" in r]
    print(f"generator's objective {probe.generator_side}, student's kd loss {[r['loss/kl'] for r in rows]}")
    assert len(rows) == len(probe.generator_side) == len(probe.student_outputs) == 3
    # the generator's side: the objective it ascended (logged before each update) is kd's kl term on its batch
    assert [r["gan_data/discrepancy"] for r in rows] == pytest.approx(probe.generator_side, rel=1e-5)
    # the student's side: the generator's objective function on the step's outputs is the kd loss it descended
    student_side = [float(plugin.objective(s, t)) for s, t in probe.student_outputs]
    assert [r["loss/kl"] for r in rows] == pytest.approx(student_side, rel=1e-5)
    assert [r["loss"] for r in rows] == pytest.approx(student_side, rel=1e-5)  # and its whole loss


def test_an_explicitly_different_generator_objective_is_warned_about_naming_both(models, tmp_path):
    cfg = data_free_config(models["teacher"], {"from_teacher": {"layers": [0]}}, tmp_path, steps=1)
    cfg["plugins"] = {"kd": {"temperature": 3.0}}
    runs = iter(range(100))

    def train(cfg, **options):  # a run in a fresh output directory, to call later
        where = {**cfg, "output_dir": str(tmp_path / f"run{next(runs)}")}
        return lambda: polydistill.train(where, plugins=[gan(length=4, **options)])
    student = r"kd's kl term, T² · KL\(teacher \|\| student\) at plugins\.kd\.temperature = 3 \(plugins\.kd\.kl = 1\)"
    one_loss = r"data-free adversarial distillation \(Fang et al\. 2019\) plays one loss"

    (message,) = gan_warnings(train(cfg, discrepancy="l1"))
    assert re.match(r"plugins\.gan_data\.discrepancy: the generator ascends the mean absolute logit difference "
                    rf"\(plugins\.gan_data\.discrepancy: l1\), but on generated batches the student descends {student}; {one_loss}",
                    message), message
    (message,) = gan_warnings(train(cfg, discrepancy="kl"))  # kl_temperature's default 1, kd's 3
    assert re.match(r"plugins\.gan_data\.discrepancy: the generator ascends T² · KL\(teacher \|\| student\) at "
                    rf"plugins\.gan_data\.kl_temperature = 1, but on generated batches the student descends {student}",
                    message), message
    assert gan_warnings(train(cfg, discrepancy="kl", kl_temperature=3.0)) == []  # the same loss, chosen explicitly

    # kd terms the generator does not reproduce
    cfg["plugins"] = {"kd": {"temperature": 3.0, "hidden": 0.5}}
    (message,) = gan_warnings(train(cfg))
    assert re.match(rf"plugins\.gan_data\.discrepancy: on generated batches the student descends {student} \+ kd's hidden "
                    r"term \(plugins\.kd\.hidden = 0\.5\), and the generator ascends only kd's kl term; kd's hidden term",
                    message), message

    # a temperature chosen by another plugin, which the generator cannot follow
    cfg["plugins"] = {"kd": {"temperature": 3.0}, "adaptive_temperature": {"schedule": "linear", "end": 1.0}}
    (message,) = gan_warnings(train(cfg))
    assert message.startswith("plugins.gan_data.discrepancy: plugin 'adaptive_temperature' set the KD temperature on the generated "
                              "batches, so the student's kl term uses that temperature, while the generator ascends "
                              "T² · KL(teacher || student) at plugins.kd.temperature = 3"), message


def test_a_generator_objective_that_cannot_be_tied_is_refused(models, data, tmp_path):
    cfg = data_free_config(models["teacher"], {"from_teacher": {"layers": [0]}}, tmp_path, steps=1)
    with pytest.raises(polydistill.ConfigError, match=r"plugins\.gan_data\.discrepancy: 'kd' \(the default\) makes the "
                       r"generator ascend the loss the student descends \(kd's kl term\), but plugin kd is not enabled"):
        polydistill.train({**cfg, "plugins": {"kd": False}}, plugins=[gan()])
    with pytest.raises(polydistill.ConfigError, match=r"plugins\.gan_data\.discrepancy: 'kd' \(the default\) makes the "
                       r"generator ascend kd's kl term, but plugins\.kd\.kl is 0, so the student descends kd's hidden term"):
        polydistill.train({**cfg, "plugins": {"kd": {"kl": 0, "hidden": 1.0}}}, plugins=[gan()])
    with pytest.raises(polydistill.ConfigError, match=r"plugins\.gan_data\.kl_temperature: is the temperature of "
                       r"discrepancy 'kl' and unused with discrepancy 'kd' \(which takes plugins\.kd\.temperature\)"):
        polydistill.train({**cfg, "plugins": {"gan_data": {"kl_temperature": 2.0}}}, plugins=[gan()])
    mixed = parallel_config(models, data, tmp_path / "mixed", training__max_steps=1, plugins={"kd": False})
    with pytest.raises(polydistill.ConfigError, match=r"plugins\.gan_data\.discrepancy: 'kd' \(the default\) takes the "
                       r"temperature of kd's kl term \(plugins\.kd\.temperature\), but plugin kd is not enabled"):
        polydistill.train(mixed, plugins=[gan()])


def test_data_free_distillation_lifts_agreement_on_real_sentences(models, trained_teacher, tmp_path):
    # The student (an untrained 2-layer model with the teacher's tokenizer) never sees a real sentence.
    agreement = Agreement()
    cfg = data_free_config(trained_teacher, {"model": str(models["teacher2"])}, tmp_path, steps=300, log_every=60,
                           learning_rate=2e-3)
    cfg["data"]["batch_size"] = 32
    result = polydistill.train(cfg, plugins=[gan(length=8), ("agreement", agreement)])
    before, after = agreement.values
    print(f"agreement with the teacher on the {len(SENTENCES)} real sentences: {before:.3f} -> {after:.3f} "
          f"(best constant student: {agreement.chance:.3f})")
    assert before < agreement.chance
    assert after >= agreement.chance + 0.25 and after >= before + 0.5
    logged = [r for r in result.history if "loss" in r]
    assert len(logged) == 5
    assert all({"loss/kl", "gan_data/discrepancy", "gan_data/generator_loss", "gan_data/token_spread", "gan_data/lr"} <= r.keys()
               for r in logged)
    assert all(r["gan_data/generated"] == 32 * 60 for r in logged)  # data.batch_size per step: a count, summed over log_every
    assert (result.output_dir / "gan_data_samples.txt").read_text().count("\n") == 8


def test_mixed_mode_adds_a_generated_loss_term_and_logs(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=3)
    result = polydistill.train(cfg, plugins=[gan(ratio=0.5, length=6, discrepancy="l1")])
    rows = [r for r in result.history if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["loss/gan_data"] > 0 and r["loss/kl"] > 0  # the real batch is still distilled as before
        assert r["loss"] == pytest.approx(r["loss/gan_data"] + r["loss/kl"], rel=1e-5)
        assert r["gan_data/generated"] == 2  # ratio 0.5 of a batch of 4
        assert r["gan_data/discrepancy"] > 0

    # weight 0: the term disappears and the run's student loss is kd's alone
    cfg = parallel_config(models, data, tmp_path / "w0", training__max_steps=1)
    rows = [r for r in polydistill.train(cfg, plugins=[gan(weight=0)]).history if "loss" in r]
    assert "loss/gan_data" not in rows[0] and "gan_data/discrepancy" in rows[0]

    # the default discrepancy 'kd': the generator ascends, and the gan_data term is weight x, T² · KL at kd's
    # temperature (kd's kl weight belongs to the real batch's term, not to this one)
    cfg = parallel_config(models, data, tmp_path / "kd", training__max_steps=2, plugins={"kd": {"temperature": 3.0, "kl": 0.5}})
    name, plugin = gan(ratio=0.5, length=6)
    probe = OneLoss(plugin, weight=1.0, temperature=3.0)
    rows = [r for r in polydistill.train(cfg, plugins=[("one_loss", probe), (name, plugin)]).history if "loss" in r]
    assert [r["gan_data/discrepancy"] for r in rows] == pytest.approx(probe.generator_side, rel=1e-5)
    assert probe.student_outputs == []  # no generated batch: the real batch is the step's batch
    assert all(r["loss"] == pytest.approx(r["loss/gan_data"] + r["loss/kl"], rel=1e-5) for r in rows)


def test_token_classification_generates_one_word_per_token(models, tmp_path):
    seen = {}

    class Look:
        @hookimpl
        def loss_terms(self, batch, student_out, teacher_out):
            seen["words"], seen["logits"] = batch.student_words, student_out.logits
            return None

    cfg = data_free_config(models["tagger"], {"from_teacher": {"layers": [0]}}, tmp_path, steps=2)
    cfg["task"] = "token_classification"
    result = polydistill.train(cfg, plugins=[gan(length=5, architecture="transformer"), ("look", Look())])
    assert seen["words"].tolist() == [[1, 2, 3, 4, 5]] * 16  # after [CLS]
    assert tuple(seen["logits"].shape) == (16, 5, 3)
    assert all("loss/kl" in r and "gan_data/discrepancy" in r for r in result.history if "loss" in r)


def test_different_vocabularies_are_refused(models, data, tmp_path):
    cfg = parallel_config(models, data, tmp_path, training__max_steps=1)
    cfg["student"] = {"model": str(models["other_tok"])}
    with pytest.raises(polydistill.ConfigError, match=r"plugins\.gan_data: teacher 'teacher' and the student have different vocabularies"):
        polydistill.train(cfg, plugins=[gan()])


def test_bad_settings_and_impossible_runs_are_refused(models, tmp_path):
    cfg = data_free_config(models["teacher"], {"from_teacher": {"layers": [0]}}, tmp_path, steps=1)
    with pytest.raises(polydistill.ConfigError, match=r"plugins\.gan_data\.lenght"):
        polydistill.train({**cfg, "plugins": {"gan_data": {"lenght": 8}}}, plugins=[gan()])
    with pytest.raises(polydistill.ConfigError, match=r"plugins\.gan_data: data-free runs cannot use cache\.enabled"):
        polydistill.train({**cfg, "cache": {"enabled": True, "dir": str(tmp_path / "cache")}}, plugins=[gan()])
    with pytest.raises(polydistill.ConfigError, match=r"plugins\.gan_data\.length: 500 tokens"):
        polydistill.train(cfg, plugins=[gan(length=500)])


def test_example_config_is_valid():
    import yaml

    raw = yaml.safe_load(EXAMPLE.read_text())
    config = polydistill.load_config(raw)
    assert config.data.train == [] and config.training.max_steps
    Settings.model_validate(raw["plugins"]["gan_data"])



@pytest.mark.parametrize("options", [{}, {"hard": False, "scheduler": "linear"}], ids=["reinforce", "soft"])
def test_resume_continues_exactly(models, tmp_path, options):
    # dropout is on in the student, the generator takes 2 updates per student step
    def run(where, *extra, resume=None):
        cfg = data_free_config(models["teacher"], {"from_teacher": {"layers": [0, 1]}}, where, steps=6, checkpoint_every=3)
        cfg["data"]["batch_size"] = 4
        return polydistill.train(cfg, plugins=[gan(generator_steps=2, length=6, **options), *extra], resume=resume)

    straight = run(tmp_path / "a")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "b", ("stop", StopAt(2)))
    resumed = run(tmp_path / "b", resume=tmp_path / "b" / "run")

    a = load_file(str(straight.output_dir / "student" / "model.safetensors"))
    b = load_file(str(resumed.output_dir / "student" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)
    keys = ("loss", "gan_data/discrepancy", "gan_data/generator_loss", "gan_data/lr")
    tail = lambda h: [tuple(r[k] for k in keys) for r in h if "loss" in r][-4:]  # noqa: E731
    assert tail(straight.history) == tail(resumed.history)
    samples = [(r.output_dir / "gan_data_samples.txt").read_text() for r in (straight, resumed)]
    assert samples[0] == samples[1]  # the generators ended with the same weights
