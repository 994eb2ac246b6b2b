"""Adversarially generated training inputs (plugin ``gan_data``).

A small generator turns noise into sequences of token distributions over the
vocabulary that teacher and student share, sampled with Gumbel-softmax (one-hot
with ``hard``). Each distribution is multiplied with a model's input
word-embedding matrix to give ``inputs_embeds``, so generated "sentences" reach
teacher and student without ever being text. The generator is trained to *maximise* the teacher-student
discrepancy on what it generates, the student to minimise it: data-free
adversarial distillation (Fang et al. 2019, "Data-free adversarial
distillation"; for text with soft/Gumbel-softmax tokens, Ma et al. 2020,
"Adversarial self-supervised data-free distillation for text classification").
As in Fang et al., both players play ONE loss: by default (``discrepancy: kd``)
the generator ascends exactly the loss the student descends on generated inputs
(data-free: kd's ``kl`` term, with kd's weight and temperature; mixed: this
plugin's own term, at kd's temperature). An explicitly different
``discrepancy`` is allowed, with a warning naming both objectives.

Two modes, chosen by the data:

- **data-free** (``data.train: []`` with ``training.max_steps``): the core hands
  ``augment_batch`` empty placeholder batches; this plugin returns a whole
  generated batch and the normal loss plugins (``kd``'s ``kl`` by default)
  train the student on it.
- **mixed** (real training data): real batches go through unchanged, and
  ``loss_terms`` adds ``gan_data`` = ``weight`` x discrepancy on a separately
  generated batch of ``ratio`` x batch-size samples.

In both modes the generator takes ``generator_steps`` updates with its own
optimizer and LR schedule at the start of every optimizer step (in
``augment_batch``, on the first micro-batch of a step). With one-hot tokens its
gradient is a REINFORCE estimate by default (or straight-through). Gumbel noise
is drawn from generators seeded by ``state.rng`` (not
``torch.nn.functional.gumbel_softmax``, which draws from the global RNG), so a
resumed run generates the same samples. See ``docs/plugins/gan_data.md``.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

import polydistill
from polydistill import Batch, ConfigError, PluginSettings, hookimpl

NAME = "gan_data"
_SALT_GENERATOR_STEP = 0x6A4E_0001
_SALT_SAMPLES = 0x6A4E_0002
_SALT_INIT = 0x6A4E_0003


class Settings(PluginSettings):
    architecture: Literal["mlp", "transformer"] = Field(
        "mlp",
        description="Generator body: 'mlp' (noise plus a learned position vector through a per-position MLP) or "
        "'transformer' (a small transformer encoder over those vectors, so positions see each other).",
    )
    noise_dim: int = Field(64, ge=1, description="Size of the noise vector z drawn per generated sample.")
    hidden_size: int = Field(128, ge=8, description="Width of the generator.")
    num_layers: int = Field(2, ge=1, description="Hidden layers of the MLP, or transformer blocks.")
    length: int = Field(16, ge=1, description="Generated tokens per sample (special tokens not counted).")
    add_special_tokens: bool = Field(
        True, description="Put each model's [CLS]-like token before and its [SEP]-like token after the generated tokens."
    )
    tau: float = Field(1.0, gt=0, description="Gumbel-softmax temperature of the generated token distributions.")
    hard: bool = Field(
        True,
        description="Models read sampled one-hot tokens (real token embeddings); false: soft mixtures of embeddings "
        "(Gumbel-softmax outputs), which give the generator an exact gradient but are inputs no tokenizer produces.",
    )
    estimator: Literal["reinforce", "straight_through"] = Field(
        "reinforce",
        description="With hard: true, how the generator's gradient is estimated: 'reinforce' (score function: "
        "log-probability of each sampled sequence times its discrepancy above the batch mean; unbiased, no backward "
        "pass through the models) or 'straight_through' (the soft distribution's gradient; biased).",
    )
    discrepancy: Literal["kd", "kl", "l1"] = Field(
        "kd",
        description="What the generator maximises: 'kd' = the loss the student minimises on generated inputs, so both "
        "play one loss (Fang et al. 2019): data-free, kd's kl term with plugins.kd.kl as weight and "
        "plugins.kd.temperature; mixed, this plugin's term, T² · KL(teacher || student) at plugins.kd.temperature. "
        "'kl' = T² · KL at kl_temperature; 'l1' = mean absolute difference of the logits. In data-free runs "
        "'kl'/'l1' warn when they differ from the student's kd loss; in mixed mode the student's gan_data term uses "
        "the same discrepancy.",
    )
    kl_temperature: float | None = Field(
        None, gt=0, description="Softmax temperature T of discrepancy 'kl' (default 1.0); only with discrepancy: kl."
    )
    generator_steps: int = Field(1, ge=0, description="Generator updates per student optimizer step (0 freezes it).")
    learning_rate: float = Field(1e-3, gt=0, description="Generator learning rate (Adam).")
    betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas of the generator's optimizer.")
    scheduler: Literal["constant", "linear", "cosine"] = Field(
        "constant", description="Generator LR schedule over training.max_steps x generator_steps updates."
    )
    warmup_steps: int = Field(0, ge=0, description="Generator LR warm-up, in generator updates.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the generator's gradient norm; null disables.")
    diversity: float = Field(
        1.0,
        ge=0,
        description="Weight of a bonus for diverse tokens in the generator's objective: the entropy of the batch's "
        "mean token distribution over its maximum, in [0, 1] (guards against the generator collapsing onto a few "
        "tokens).",
    )
    batch_size: int | None = Field(None, ge=1, description="Samples per generator update; default: data.batch_size.")
    ratio: float = Field(
        0.5, gt=0, description="Mixed mode: generated samples per real sample in the extra loss term's batch."
    )
    weight: float = Field(1.0, ge=0, description="Mixed mode: weight of the 'gan_data' loss term.")
    lang: str = Field("gen", description="Language tag of generated samples.")

    @field_validator("kl_temperature")
    @classmethod
    def _kl_only(cls, value: float | None, info: ValidationInfo) -> float | None:
        kind = info.data.get("discrepancy")
        if value is not None and kind is not None and kind != "kl":
            raise ValueError(
                f"is the temperature of discrepancy 'kl' and unused with discrepancy {kind!r}"
                + (" (which takes plugins.kd.temperature)" if kind == "kd" else "")
                + "; set discrepancy: kl to give the generator its own KL temperature, or drop kl_temperature"
            )
        return value


class Generator(nn.Module):
    """Noise ``(N, noise_dim)`` -> token logits ``(N, length, vocab)``."""

    def __init__(self, s: Settings, vocab_size: int):
        super().__init__()
        h = s.hidden_size
        self.architecture = s.architecture
        self.noise = nn.Linear(s.noise_dim, h)
        self.position = nn.Parameter(torch.randn(s.length, h) * 0.02)
        if s.architecture == "mlp":
            self.body = nn.Sequential(*[m for _ in range(s.num_layers) for m in (nn.GELU(), nn.LayerNorm(h), nn.Linear(h, h))])
        else:
            heads = next(n for n in (4, 2, 1) if h % n == 0)
            layer = nn.TransformerEncoderLayer(h, heads, 2 * h, dropout=0.0, activation="gelu", batch_first=True, norm_first=True)
            self.body = nn.TransformerEncoder(layer, s.num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(h)
        self.out = nn.Linear(h, vocab_size)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.noise(z)[:, None, :] + self.position[None]
        return self.out(F.gelu(self.norm(self.body(x))))


def gumbel_softmax(logits: torch.Tensor, tau: float, hard: bool, generator: torch.Generator) -> torch.Tensor:
    """``torch.nn.functional.gumbel_softmax`` with noise from ``generator`` (the global RNG stays untouched)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    gumbels = -torch.log(-torch.log(u.clamp(1e-10, 1.0 - 1e-7)))
    soft = F.softmax((logits + gumbels) / tau, dim=-1)
    if not hard:
        return soft
    one_hot = F.one_hot(soft.argmax(-1), soft.size(-1)).to(soft.dtype)
    return one_hot - soft.detach() + soft


def discrepancy(kind: str, student: torch.Tensor, teacher: torch.Tensor, temperature: float, per_sample: bool = False) -> torch.Tensor:
    """Teacher-student disagreement on logits: the mean over samples (and positions), or ``(N,)`` per sample."""
    teacher = teacher.to(student.dtype)
    if kind == "l1":
        per = (student - teacher).abs().mean(-1)
    else:
        t = temperature
        s_log, t_log = F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1)
        per = F.kl_div(s_log, t_log, log_target=True, reduction="none").sum(-1) * t * t
    per = per.reshape(per.size(0), -1).mean(-1)
    return per if per_sample else per.mean()


def _vocab(tokenizer: Any) -> dict[str, int]:
    return dict(tokenizer.get_vocab())


class GanData:
    """Data-free / adversarial data generation: a generator trained against the student."""

    polydistill_api = polydistill.API_VERSION
    Settings = Settings

    def __init__(self, settings: Settings | None = None):
        self.settings = settings or Settings()
        self.generator: Generator | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: Any = None
        self.data_free = False
        self.vocab_size = 0
        self.updated_at = -1  # state.step of the last generator update (once per optimizer step)
        self._logs: dict[str, list[float]] = {}
        # the generator's objective, resolved in setup: scale · discrepancy(kind, ..., temperature)
        self.kind, self.temperature, self.scale = "kl", 1.0, 1.0
        self.kd_terms: dict[str, float] | None = None  # kd's weights as the student uses them (None: kd not enabled)
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ run set-up

    @hookimpl
    def setup(self, state: Any) -> None:
        s, config = self.settings, state.config
        if not state.task_def.named_labels:
            raise ConfigError(f"plugins.{NAME}: the {state.task} task is not supported (the discrepancy is computed on "
                              "class logits over the run's labels)")
        if not state.teachers:
            raise ConfigError(f"plugins.{NAME}: needs a teacher (the generator maximises teacher-student disagreement)")
        self.data_free = not config.data.train
        if self.data_free and config.cache.enabled:
            raise ConfigError(
                f"plugins.{NAME}: data-free runs cannot use cache.enabled (generated inputs have no text to key the "
                "teacher-output cache); set cache.enabled: false"
            )
        self.vocab_size = self._check_vocabularies(state)
        self.kind, self.temperature, self.scale = self._resolve_objective(state)
        self._warned = set()
        self.special = [self._specials(tok) for tok in [state.student_tokenizer, *state.teacher_tokenizers]]
        for model, name in zip([state.unwrapped_student(), *state.teachers], ["the student", *state.teacher_names]):
            limit = getattr(model.config, "max_position_embeddings", None)
            need = s.length + 2 * s.add_special_tokens
            if limit is not None and need > limit:
                raise ConfigError(f"plugins.{NAME}.length: {s.length} tokens (+ special tokens) exceed {name}'s {limit} positions")
        excluded = sorted({i for tok in [state.student_tokenizer, *state.teacher_tokenizers] for i in tok.all_special_ids})
        self.excluded = torch.tensor([i for i in excluded if i < self.vocab_size], dtype=torch.long)
        if len(self.excluded) >= self.vocab_size:
            raise ConfigError(f"plugins.{NAME}: the vocabulary has only special tokens")

        seed = hash((config.training.seed, _SALT_INIT)) & 0x7FFF_FFFF_FFFF_FFFF  # the same on every process
        with torch.random.fork_rng(devices=[]):  # parameter init without touching the global RNG
            torch.manual_seed(seed)
            self.generator = Generator(s, self.vocab_size).to(state.device)
        self.optimizer = torch.optim.Adam(self.generator.parameters(), lr=s.learning_rate, betas=s.betas)
        from transformers import get_scheduler

        name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[s.scheduler]
        total = max(1, state.total_steps * s.generator_steps)
        self.scheduler = get_scheduler(name, self.optimizer, num_warmup_steps=s.warmup_steps, num_training_steps=total)
        self.updated_at = -1
        self._logs = {}

    # ------------------------------------------------------------------ the one loss of both players

    def _resolve_objective(self, state: Any) -> tuple[str, float, float]:
        """``(kind, temperature, scale)`` of the objective the generator ascends, tied to the student's loss.

        Data-free, the student's loss on a generated batch is kd's: its ``kl`` term (weight ``plugins.kd.kl``,
        temperature ``plugins.kd.temperature``), plus ``hidden``/``attention`` when kd has them. Mixed, it is this
        plugin's own term, ``weight · discrepancy``. ``discrepancy: kd`` makes the generator ascend exactly that;
        an explicit 'kl'/'l1' that differs is kept, with a warning naming both objectives.
        """
        s = self.settings
        kd = state.settings("kd")
        if kd is not None and all(hasattr(kd, k) for k in ("kl", "temperature", "hidden", "attention")):
            # kd's own defaults for what gan_data allows (a teacher, a task with logits): kl 1
            self.kd_terms = {
                "kl": 1.0 if kd.kl is None else float(kd.kl),
                "hidden": float(kd.hidden),
                "attention": float(kd.attention),
            }
            kd_temperature = float(kd.temperature)
        else:
            self.kd_terms, kd_temperature = None, None
        if not self.data_free:  # mixed: the student's gan_data term uses this same discrepancy (times weight)
            if s.discrepancy != "kd":
                return s.discrepancy, s.kl_temperature or 1.0, 1.0
            if self.kd_terms is None:
                raise ConfigError(
                    f"plugins.{NAME}.discrepancy: 'kd' (the default) takes the temperature of kd's kl term "
                    "(plugins.kd.temperature), but plugin kd is not enabled; set plugins.gan_data.discrepancy to "
                    "'kl' (with kl_temperature) or 'l1'"
                )
            return "kl", kd_temperature, 1.0

        student = self._student_objective(kd_temperature)
        if s.discrepancy == "kd":
            if self.kd_terms is None:
                raise ConfigError(
                    f"plugins.{NAME}.discrepancy: 'kd' (the default) makes the generator ascend the loss the student "
                    "descends (kd's kl term), but plugin kd is not enabled, so gan_data does not know the student's "
                    "loss on generated batches; enable kd, or set plugins.gan_data.discrepancy to 'kl' or 'l1' to "
                    "choose the generator's objective yourself"
                )
            if not self.kd_terms["kl"]:
                raise ConfigError(
                    f"plugins.{NAME}.discrepancy: 'kd' (the default) makes the generator ascend kd's kl term, but "
                    f"plugins.kd.kl is 0, so the student descends {student} on generated batches, which the "
                    "generator cannot reproduce; set plugins.kd.kl > 0, or set plugins.gan_data.discrepancy to "
                    "'kl' or 'l1' to choose the generator's objective yourself"
                )
            kind, temperature, scale = "kl", kd_temperature, self.kd_terms["kl"]
            left_out = [k for k in ("hidden", "attention") if self.kd_terms[k]]
            if left_out:
                self._warn(
                    f"plugins.{NAME}.discrepancy: on generated batches the student descends {student}, and the "
                    f"generator ascends only kd's kl term; kd's {' and '.join(left_out)} "
                    f"term{'s' if len(left_out) > 1 else ''} (per-layer states) {'are' if len(left_out) > 1 else 'is'} "
                    "left out of the generator's objective, so the two players' losses differ by "
                    f"{'them' if len(left_out) > 1 else 'it'}"
                )
            return kind, temperature, scale

        kind, temperature = s.discrepancy, s.kl_temperature or 1.0
        generator = self._describe(kind, temperature, 1.0, own=True)
        if self.kd_terms is None:
            self._warn(
                f"plugins.{NAME}.discrepancy: the generator ascends {generator}, and plugin kd is not enabled, so "
                "gan_data cannot check that the student descends the same loss on generated batches; data-free "
                "adversarial distillation (Fang et al. 2019) plays one loss, ascended by the generator and "
                "descended by the student"
            )
        elif not (kind == "kl" and temperature == kd_temperature and self.kd_terms == {"kl": 1.0, "hidden": 0, "attention": 0}):
            self._warn(
                f"plugins.{NAME}.discrepancy: the generator ascends {generator}, but on generated batches the "
                f"student descends {student}; data-free adversarial distillation (Fang et al. 2019) plays one loss, "
                "ascended by the generator and descended by the student. Leave plugins.gan_data.discrepancy (and "
                "kl_temperature) unset to tie the generator to kd's loss"
            )
        return kind, temperature, 1.0

    @staticmethod
    def _describe(kind: str, temperature: float, weight: float, own: bool) -> str:
        if kind == "l1":
            return "the mean absolute logit difference (plugins.gan_data.discrepancy: l1)"
        where = "plugins.gan_data.kl_temperature" if own else "plugins.kd.temperature"
        times = "" if weight == 1 else f"{weight:g} · "
        return f"{times}T² · KL(teacher || student) at {where} = {temperature:g}"

    def _student_objective(self, kd_temperature: float | None) -> str:
        """The student's loss on generated batches in words (data-free mode)."""
        if self.kd_terms is None:
            return "the loss terms of the enabled plugins (kd is not enabled)"
        w = self.kd_terms
        parts = []
        if w["kl"]:
            parts.append(f"kd's kl term, {self._describe('kl', kd_temperature, w['kl'], own=False)} (plugins.kd.kl = {w['kl']:g})")
        parts += [f"kd's {k} term (plugins.kd.{k} = {w[k]:g})" for k in ("hidden", "attention") if w[k]]
        return " + ".join(parts) if parts else "none of kd's teacher terms (plugins.kd.kl, hidden and attention are 0)"

    def _warn(self, message: str) -> None:
        warnings.warn(message, polydistill.PolydistillWarning, stacklevel=2)

    def objective(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
        """The discrepancy the generator ascends (resolved in ``setup``; with ``discrepancy: kd`` in a data-free run
        it is kd's kl term: ``plugins.kd.kl · T² · KL`` at ``plugins.kd.temperature``). In mixed mode the student's
        ``gan_data`` term is ``weight`` times it."""
        return self.scale * discrepancy(self.kind, student_logits, teacher_logits, self.temperature, per_sample)

    def _check_generated_meta(self, batch: Batch) -> None:
        """Warn once when another plugin changes the student's kd loss on generated batches in a way the generator's
        objective cannot follow (a temperature or sample weights in the batch's loss hints)."""
        if self.kd_terms is None or not self.kd_terms["kl"]:
            return
        hints = batch.loss_hints()
        value = hints.temperature
        if value is not None and "temperature" not in self._warned:
            same = isinstance(value, (int, float)) and self.kind == "kl" and float(value) == self.temperature
            if not same:
                self._warned.add("temperature")
                self._warn(
                    f"plugins.{NAME}.discrepancy: plugin '{hints.temperature_by}' set the KD temperature on the generated "
                    f"batches, so the student's kl term uses that temperature, while the generator ascends "
                    f"{self._describe(self.kind, self.temperature, self.scale, own=self.settings.discrepancy != 'kd')}; "
                    "the two players' losses differ (the generator cannot follow a per-step, per-sample or learned "
                    "temperature)"
                )
        if hints.weights and "sample_weights" not in self._warned:
            self._warned.add("sample_weights")
            self._warn(
                f"plugins.{NAME}.discrepancy: plugin '{', '.join(hints.weights_by)}' set sample weights on the generated "
                "batches, so the student's kd terms weight samples, while the generator's objective weights them "
                "equally; the two players' losses differ"
            )

    def _check_vocabularies(self, state: Any) -> int:
        student_vocab = _vocab(state.student_tokenizer)
        for name, tok in zip(state.teacher_names, state.teacher_tokenizers):
            if tok is state.student_tokenizer:
                continue
            vocab = _vocab(tok)
            if vocab != student_vocab:
                differ = sorted(set(vocab.items()) ^ set(student_vocab.items()), key=lambda kv: kv[1])[:3]
                raise ConfigError(
                    f"plugins.{NAME}: teacher '{name}' and the student have different vocabularies "
                    f"({len(vocab)} vs {len(student_vocab)} tokens; e.g. {', '.join(f'{t!r}={i}' for t, i in differ)}). "
                    "Generated inputs are distributions over one shared vocabulary: use a student with the teacher's "
                    "tokenizer (e.g. student.from_teacher, with no student.vocabulary or its method 'keep')"
                )
        size = max(student_vocab.values()) + 1
        for name, model in zip(["the student", *state.teacher_names], [state.unwrapped_student(), *state.teachers]):
            rows = model.get_input_embeddings().weight.size(0)
            if rows < size:
                raise ConfigError(
                    f"plugins.{NAME}: {name}'s input embeddings have {rows} rows, fewer than the tokenizer's {size} ids"
                )
        return size

    def _specials(self, tok: Any) -> tuple[int, int] | None:
        if not self.settings.add_special_tokens:
            return None
        cls_id = tok.cls_token_id if tok.cls_token_id is not None else tok.bos_token_id
        sep_id = tok.sep_token_id if tok.sep_token_id is not None else tok.eos_token_id
        if cls_id is None or sep_id is None:
            raise ConfigError(
                f"plugins.{NAME}.add_special_tokens: the tokenizer {type(tok).__name__} has no cls/bos or sep/eos token; "
                "set add_special_tokens: false"
            )
        return int(cls_id), int(sep_id)

    # ------------------------------------------------------------------ generation

    def _seeded(self, state: Any, salt: int) -> torch.Generator:
        """A generator on the run's device, seeded from ``state.rng`` (so resumes draw the same noise)."""
        seed = int(torch.randint(0, 2**62, (1,), generator=state.rng(salt)))
        return torch.Generator(device=state.device).manual_seed(seed)

    def generate(self, n: int, gen: torch.Generator, device: torch.device, with_logits: bool = False) -> Any:
        """``(n, length, vocab)`` token distributions (with gradient to the generator), and the logits if asked."""
        z = torch.randn(n, self.settings.noise_dim, generator=gen, device=device)
        logits = self.generator(z).float()
        logits = logits.index_fill(-1, self.excluded.to(device), float("-inf"))
        tokens = gumbel_softmax(logits, self.settings.tau, self.settings.hard, gen)
        return (tokens, logits) if with_logits else tokens

    def encode(self, tokens: torch.Tensor, model: nn.Module, special: tuple[int, int] | None) -> dict[str, torch.Tensor]:
        """``inputs_embeds`` and ``attention_mask`` for ``model`` from token distributions."""
        weight = model.get_input_embeddings().weight
        if self.settings.hard and not tokens.requires_grad:
            embeds = F.embedding(tokens.argmax(-1), weight)  # one-hot rows: a plain lookup, same values and gradient
        else:
            embeds = tokens.to(weight.dtype) @ weight[: self.vocab_size]
        if special is not None:
            n = embeds.size(0)
            cls, sep = (weight[i].view(1, 1, -1).expand(n, 1, -1) for i in special)
            embeds = torch.cat([cls, embeds, sep], dim=1)
        mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return {"inputs_embeds": embeds, "attention_mask": mask}

    def _words(self, n: int, device: torch.device) -> torch.Tensor | None:
        """Token tasks: each generated token is a word."""
        offset = 1 if self.settings.add_special_tokens else 0
        return (torch.arange(self.settings.length, device=device) + offset).expand(n, -1).contiguous()

    def logits(self, state: Any, tokens: torch.Tensor, student: nn.Module, teacher_grad: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Student logits and the teachers' equal-weight mean logits on generated tokens.

        The teachers' graph is kept only with ``teacher_grad`` (the generator's update needs it).
        """
        task = state.task_def
        words = self._words(tokens.size(0), tokens.device) if task.word_level else None
        with state.accelerator.autocast():
            s_out = polydistill.forward(student, self.encode(tokens, student, self.special[0]), task, words)
            with torch.set_grad_enabled(teacher_grad and torch.is_grad_enabled()):
                t_logits = [
                    polydistill.forward(t, self.encode(tokens, t, sp), task, words).logits
                    for t, sp in zip(state.teachers, self.special[1:])
                ]
        return s_out.logits.float(), torch.stack(t_logits).float().mean(0)

    def batch_size(self, state: Any) -> int:
        return self.settings.batch_size or state.config.data.batch_size

    # ------------------------------------------------------------------ generator update

    def generator_update(self, state: Any, n: int) -> None:
        """``generator_steps`` updates of the generator towards more teacher-student disagreement."""
        s, acc = self.settings, state.accelerator
        student = state.unwrapped_student()
        was_training = student.training
        student.eval()  # no dropout noise in the generator's objective (nor global-RNG draws)
        gen = self._seeded(state, _SALT_GENERATOR_STEP)
        params = [p for p in self.generator.parameters() if p.requires_grad]
        self.generator.train()
        try:
            for _ in range(s.generator_steps):
                if s.hard and s.estimator == "reinforce":
                    tokens, logits = self.generate(n, gen, state.device, with_logits=True)
                    tokens = tokens.detach()
                    with torch.no_grad():
                        per = self.objective(*self.logits(state, tokens, student), per_sample=True)
                    log_probs = F.log_softmax(logits, -1)
                    chosen = log_probs.gather(-1, tokens.argmax(-1, keepdim=True)).squeeze(-1).sum(-1)  # log p(sample)
                    d = per.mean()
                    spread = self.spread(log_probs.exp(), samples=False)
                    # score-function estimate of grad E[discrepancy], batch mean as baseline
                    surrogate = ((per - d) * chosen).mean()
                    objective = d + s.diversity * spread
                    grads = torch.autograd.grad(-(surrogate + s.diversity * spread), params, allow_unused=True)
                else:
                    tokens = self.generate(n, gen, state.device)
                    s_logits, t_logits = self.logits(state, tokens, student, teacher_grad=True)
                    d = self.objective(s_logits, t_logits)
                    spread = self.spread(tokens, samples=s.hard)
                    objective = d + s.diversity * spread
                    grads = torch.autograd.grad(-objective, params, allow_unused=True)
                for p, g in zip(params, grads):
                    p.grad = torch.zeros_like(p) if g is None else g
                    if acc.num_processes > 1:  # each process drew its own noise; keep the generators identical
                        p.grad = acc.reduce(p.grad, reduction="mean")
                if s.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(params, s.max_grad_norm)
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._log("generator_loss", float(-objective.detach()))
                self._log("discrepancy", float(d.detach()))
                self._log("token_spread", float(self.spread(tokens.detach(), samples=s.hard)))  # of what the models read
        finally:
            student.train(was_training)

    def spread(self, tokens: torch.Tensor, samples: bool) -> torch.Tensor:
        """Entropy of the batch's mean token distribution over its maximum, in [0, 1]: 0 when every position holds
        the same token, 1 when the batch uses the allowed tokens evenly. For one-hot ``samples`` the maximum is
        capped by the number of positions (N x length tokens cannot be spread over more distinct tokens)."""
        mean = tokens.float().mean(dim=(0, 1))
        entropy = -(mean * mean.clamp(min=1e-12).log()).sum()
        allowed = self.vocab_size - len(self.excluded)
        if samples:
            allowed = min(allowed, tokens.size(0) * tokens.size(1))
        return entropy / math.log(max(2, allowed))

    def _log(self, key: str, value: float) -> None:
        self._logs.setdefault(key, []).append(value)

    def _maybe_update(self, state: Any, n: int) -> None:
        if self.settings.generator_steps and self.updated_at != state.step:
            self.generator_update(state, n)
            self.updated_at = state.step

    # ------------------------------------------------------------------ step hooks

    @hookimpl
    def augment_batch(self, batch: Batch, state: Any) -> Batch | None:
        placeholder = bool(batch.meta.get("placeholder")) and len(batch) == 0
        n = batch.meta["batch_size"] if placeholder else len(batch)
        self._maybe_update(state, self.batch_size(state))
        if not placeholder:
            return None
        with torch.no_grad():
            tokens = self.generate(n, self._seeded(state, _SALT_SAMPLES), state.device)
        student = state.unwrapped_student()
        words = self._words(n, state.device) if state.task_def.word_level else None
        texts = ["<generated>"] * n
        meta = {k: v for k, v in batch.meta.items() if k != "placeholder"}
        meta.update(generated=True, gan_data_tokens=tokens.argmax(-1))
        self._log("generated", float(n))
        return Batch(
            texts=texts,
            teacher_texts=texts,
            langs=[self.settings.lang] * n,
            student_inputs=self.encode(tokens, student, self.special[0]),
            teacher_inputs=[self.encode(tokens, t, sp) for t, sp in zip(state.teachers, self.special[1:])],
            labels=None,
            student_words=words,
            teacher_words=[words] * len(state.teachers),
            meta=meta,
            hints=batch.hints,  # hints plugins before this one set for the step carry over
        )

    @hookimpl
    def loss_terms(self, batch: Batch, state: Any) -> dict[str, torch.Tensor] | None:
        s = self.settings
        if batch.meta.get("generated"):
            self._check_generated_meta(batch)
            return None  # data-free: the generated batch already is the step's batch
        if not s.weight:
            return None
        n = max(1, round(s.ratio * len(batch)))
        with torch.no_grad():
            tokens = self.generate(n, self._seeded(state, _SALT_SAMPLES), state.device)
        s_logits, t_logits = self.logits(state, tokens, state.unwrapped_student())
        self._log("generated", float(n))
        return {NAME: s.weight * self.objective(s_logits, t_logits.detach())}  # scale is 1 in mixed mode

    @hookimpl
    def on_step_end(self, state: Any, logs: dict[str, float]) -> None:
        for key, values in self._logs.items():
            logs[f"{NAME}/{key}"] = float(sum(values) / len(values)) if key != "generated" else int(sum(values))
        if self.scheduler is not None:
            logs[f"{NAME}/lr"] = float(self.scheduler.get_last_lr()[0])
        self._logs = {}

    @hookimpl
    def on_train_end(self, state: Any) -> None:
        """Write eight generated samples (their sampled tokens, decoded) to ``OUTPUT_DIR/gan_data_samples.txt``."""
        if not state.accelerator.is_main_process or self.generator is None:
            return
        with torch.no_grad():
            tokens = self.generate(8, self._seeded(state, _SALT_SAMPLES - 1), state.device)
        ids = tokens.argmax(-1).tolist()
        state.output_dir.mkdir(parents=True, exist_ok=True)
        lines = [state.student_tokenizer.decode(row) for row in ids]
        (state.output_dir / "gan_data_samples.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")

    # ------------------------------------------------------------------ checkpoints

    @hookimpl
    def state_dict(self, state: Any) -> dict[str, Any]:
        return {
            "generator": self.generator.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "updated_at": self.updated_at,
        }

    @hookimpl
    def load_state_dict(self, state: Any, plugin_state: dict[str, Any]) -> None:
        self.generator.load_state_dict(plugin_state["generator"])
        self.optimizer.load_state_dict(plugin_state["optimizer"])
        self.scheduler.load_state_dict(plugin_state["scheduler"])
        self.updated_at = int(plugin_state["updated_at"])



