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
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
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
    discrepancy: Literal["kl", "l1"] = Field(
        "kl",
        description="What the generator maximises (and, in mixed mode, the student minimises): 'kl' = T² · "
        "KL(teacher || student) at kl_temperature; 'l1' = mean absolute difference of the logits (Fang et al. 2019).",
    )
    kl_temperature: float = Field(1.0, gt=0, description="Softmax temperature T of the 'kl' discrepancy.")
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

    # ------------------------------------------------------------------ run set-up

    @hookimpl
    def setup(self, state: Any) -> None:
        s, config = self.settings, state.config
        if config.task == "embedding":
            raise ConfigError(f"plugins.{NAME}: the embedding task is not supported (the discrepancy is computed on logits)")
        if not state.teachers:
            raise ConfigError(f"plugins.{NAME}: needs a teacher (the generator maximises teacher-student disagreement)")
        self.data_free = not config.data.train
        if self.data_free and config.cache.enabled:
            raise ConfigError(
                f"plugins.{NAME}: data-free runs cannot use cache.enabled (generated inputs have no text to key the "
                "teacher-output cache); set cache.enabled: false"
            )
        self.vocab_size = self._check_vocabularies(state)
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
        task = state.task
        words = self._words(tokens.size(0), tokens.device) if task == "token_classification" else None
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
                        per = discrepancy(s.discrepancy, *self.logits(state, tokens, student), s.kl_temperature, per_sample=True)
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
                    d = discrepancy(s.discrepancy, s_logits, t_logits, s.kl_temperature)
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
        words = self._words(n, state.device) if state.task == "token_classification" else None
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
        )

    @hookimpl
    def loss_terms(self, batch: Batch, state: Any) -> dict[str, torch.Tensor] | None:
        s = self.settings
        if batch.meta.get("generated") or not s.weight:
            return None  # data-free: the generated batch already is the step's batch
        n = max(1, round(s.ratio * len(batch)))
        with torch.no_grad():
            tokens = self.generate(n, self._seeded(state, _SALT_SAMPLES), state.device)
        s_logits, t_logits = self.logits(state, tokens, state.unwrapped_student())
        self._log("generated", float(n))
        return {NAME: s.weight * discrepancy(s.discrepancy, s_logits, t_logits.detach(), s.kl_temperature)}

    @hookimpl
    def on_step_end(self, state: Any, logs: dict[str, float]) -> None:
        for key, values in self._logs.items():
            logs[f"{NAME}/{key}"] = float(sum(values) / len(values)) if key != "generated" else float(sum(values))
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



