"""Several teachers: routing by language, selective distillation and fusion (plugin ``multi_teacher``).

The core loads the teachers listed in ``teachers`` (per-language teachers,
different architectures or sizes, different tokenizers); this plugin decides
which of them teach each sample and how their outputs are combined.

``select_teachers`` builds per-sample weights ``(B, n_teachers)``:

- language routing: a sample tagged ``de`` is taught only by the teachers of
  ``de`` (from the ``languages`` option, or from each teacher's ``languages``
  in the core config); a language with no teacher follows ``unmapped``;
- selective distillation (Tan et al. 2019, "Multilingual neural machine
  translation with knowledge distillation"): every ``check_every`` steps the
  student and each teacher are scored per language on a held-out file
  (``polydistill.evaluate_model``); a teacher stops teaching a language while
  the student beats it there by more than ``margin``, and starts again when
  the student falls back.

``teacher_outputs`` runs each teacher that has a non-zero weight on its own
encoding with ``state.run_teacher`` (through the teacher-output cache when it
is on) and weighs the teachers' logits (or pooled embeddings) per sample,
fused by the core's ``state.fuse_teacher_outputs``: ``mean``, fixed ``weights``,
``confidence`` / ``entropy`` of each teacher's distribution, ``correctness``
(the probability each teacher gives the gold label), or a learned ``gate``.
Sequence-level outputs only: hidden states and attentions are those of the
first teacher, never fused, and refused when teachers read different tokens;
``layer_mask`` on the fused outputs marks the samples the first teacher teaches
(the only ones its per-layer outputs may teach).

The gate is a small MLP (from ``trainable_modules``, so the core trains,
places and checkpoints it) over the teachers' log-probabilities. With
``gate_objective: labels`` (default) the fused logits handed to the loss are
detached from the gate and the gate is trained by an extra loss term
``gate_ce``, the cross-entropy of the fused logits with the gold labels: it
learns to trust the teachers that are right. With ``student_kl`` the fused
logits keep the gate's graph, so the gate is trained by the same KD loss as
the student, i.e. it moves the teacher mixture towards what the student
already predicts; that signal says nothing about which teacher is right (see
``docs/plugins/multi_teacher.md``).
"""

from __future__ import annotations

import json
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

import polydistill
from polydistill import ConfigError, DataError, PluginSettings, hookimpl

NAME = "multi_teacher"


def _err(option: str, message: str) -> ConfigError:
    return ConfigError(f"plugins.{NAME}.{option}: {message}")


class HeldOut(PluginSettings):
    """A held-out file for selective distillation."""

    path: str = Field(description="jsonl/json/csv/tsv/parquet file with a text, a label and a language column.")
    text: str = Field("text", description="Column the student reads (and the teachers, unless `source` is set).")
    source: str | None = Field(None, description="Column the teachers read (the source-language side in mode 'parallel').")
    label: str = Field("label", description="Gold label column (class name or id); not needed for the embedding task.")
    lang: str = Field("lang", description="Language tag column; decisions are made per language.")
    limit: int | None = Field(None, ge=1, description="Read at most this many rows.")


class Settings(PluginSettings):
    fusion: Literal["mean", "weights", "confidence", "entropy", "correctness", "gate"] = Field(
        "mean",
        description="How selected teachers' logits/embeddings are combined per sample: mean; fixed `weights`; "
        "confidence (max probability) or entropy of each teacher; correctness (probability of the gold label); "
        "gate (a learned MLP).",
    )
    weights: dict[str, float] | None = Field(
        None, description="Fixed weight per teacher name (fusion: weights); renormalised over each sample's selected teachers."
    )
    temperature: float = Field(
        1.0, gt=0,
        description="For confidence/entropy/correctness: weights = softmax(score / temperature) over the selected "
        "teachers, with score = log max-probability, -entropy, or log p(gold label). 1 makes weights proportional "
        "to confidence or p(gold); smaller values pick the best teacher more sharply.",
    )
    select: Literal["auto", "all", "language"] = Field(
        "auto",
        description="all: every teacher teaches every sample; language: route each sample to its language's teachers; "
        "auto: language when `languages` is given or any teacher lists its `languages`, else all.",
    )
    languages: dict[str, list[str]] | None = Field(
        None, description="Language tag -> names of the teachers for it; default: from each teacher's `languages` in the config."
    )
    unmapped: Literal["all", "skip", "error"] = Field(
        "all",
        description="A sample whose language has no teacher: taught by all teachers, skipped (no distillation "
        "for it), or an error.",
    )
    selective: bool = Field(False, description="Selective distillation (Tan et al. 2019): needs `heldout`.")
    heldout: HeldOut | None = Field(None, description="Held-out data for selective distillation (a path, or {path, text, source, label, lang}).")
    check_every: int = Field(100, ge=1, description="Steps between two held-out checks (the first is at step 0).")
    margin: float = Field(
        0.0, ge=0, description="A teacher stops teaching a language when student score > teacher score + margin there."
    )
    heldout_batch_size: int = Field(64, ge=1, description="Batch size of the held-out evaluation.")
    gate_hidden: int = Field(32, ge=1, description="Hidden width of the gate MLP.")
    gate_objective: Literal["labels", "student_kl"] = Field(
        "labels",
        description="What trains the gate: labels (an extra loss term `gate_ce`, CE of the fused logits with the gold "
        "labels; the KD terms see detached fused logits) or student_kl (the KD terms themselves, through the fused "
        "teacher outputs).",
    )
    gate_ce: float = Field(1.0, ge=0, description="Weight of the `gate_ce` term (gate_objective: labels).")

    @field_validator("heldout", mode="before")
    @classmethod
    def _path_only(cls, value: Any) -> Any:
        return {"path": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.fusion == "weights" and not self.weights:
            raise ValueError("fusion: weights needs `weights` ({teacher name: weight})")
        if self.weights is not None and self.fusion != "weights":
            raise ValueError(f"`weights` is only used with fusion: weights (fusion is {self.fusion!r})")
        if self.weights is not None:
            if any(w < 0 for w in self.weights.values()) or not sum(self.weights.values()) > 0:
                raise ValueError("weights must be >= 0 and not all 0")
        if self.selective and self.heldout is None:
            raise ValueError("selective: true needs `heldout` (a held-out file with text, label and lang columns)")
        if self.select == "all" and self.languages is not None:
            raise ValueError("`languages` is only used with select: language or auto (select is 'all')")
        return self


class Gate(nn.Module):
    """Per-sample teacher scores from the teachers' log-probabilities (or embeddings): a 1-hidden-layer MLP.

    The output layer starts at zero, so the gate starts as plain averaging.
    Parameters are initialised from ``generator`` (never the global RNG).
    """

    def __init__(self, in_features: int, hidden: int, n_teachers: int, generator: torch.Generator):
        super().__init__()
        self.hidden = nn.utils.skip_init(nn.Linear, in_features, hidden)
        self.out = nn.utils.skip_init(nn.Linear, hidden, n_teachers)
        bound = 1 / math.sqrt(in_features)
        with torch.no_grad():
            self.hidden.weight.copy_(torch.empty(hidden, in_features).uniform_(-bound, bound, generator=generator))
            self.hidden.bias.copy_(torch.empty(hidden).uniform_(-bound, bound, generator=generator))
            self.out.weight.zero_()
            self.out.bias.zero_()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.out(torch.tanh(self.hidden(features)))


class MultiTeacher:
    """Route samples to teachers by language, switch teachers off per language, and fuse their outputs."""

    polydistill_api = polydistill.API_VERSION
    Settings = Settings

    def __init__(self, settings: Settings):
        self.settings = settings
        self.names: list[str] = []
        self.route = False
        self.lang_map: dict[str, list[int]] = {}
        self.fixed: torch.Tensor | None = None
        self.gate: Gate | None = None
        # selective distillation
        self.active: dict[str, dict[str, bool]] = {}  # lang -> teacher -> teaches
        self.teacher_scores: dict[str, dict[str, float]] | None = None
        self.student_scores: dict[str, float] = {}
        self.last_check: int | None = None
        self.decisions: list[dict[str, Any]] = []
        self._heldout: tuple[Any, Any] | None = None
        # per-step logs
        self._weight_sum: torch.Tensor | None = None
        self._weight_count = 0
        self._samples = 0
        self._untaught = 0
        self._check_logs: dict[str, float] = {}
        self._gate_pending: tuple[torch.Tensor, torch.Tensor | None] | None = None

    # ------------------------------------------------------------------ setup

    @hookimpl
    def trainable_modules(self, state: Any) -> dict[str, nn.Module] | None:
        s, config = self.settings, state.config
        if not state.teachers:
            raise ConfigError(f"plugins.{NAME}: the run has no teachers; list them in `teachers`")
        self.names = list(state.teacher_names)
        n = len(self.names)
        known = ", ".join(self.names)
        if s.weights is not None:
            unknown = sorted(set(s.weights) - set(self.names))
            if unknown:
                raise _err("weights", f"unknown teacher(s) {', '.join(map(repr, unknown))}; the teachers are: {known}")
            missing = [t for t in self.names if t not in s.weights]
            if missing:
                raise _err("weights", f"give a weight for every teacher; missing: {', '.join(missing)}")
            self.fixed = torch.tensor([s.weights[t] for t in self.names], dtype=torch.float32)
        # language -> teachers
        if s.languages is not None:
            for lang, teachers in s.languages.items():
                unknown = [t for t in teachers if t not in self.names]
                if unknown:
                    raise _err(f"languages.{lang}", f"unknown teacher(s) {', '.join(map(repr, unknown))}; the teachers are: {known}")
                if not teachers:
                    raise _err(f"languages.{lang}", "lists no teacher")
            self.lang_map = {lang: [self.names.index(t) for t in ts] for lang, ts in s.languages.items()}
        else:
            for i, t in enumerate(config.teachers):
                for lang in t.languages or []:
                    self.lang_map.setdefault(lang, []).append(i)
        self.route = s.select == "language" or (s.select == "auto" and bool(self.lang_map))
        if s.select == "language" and not self.lang_map:
            raise _err("select", "select: language needs `languages`, or `languages` on the teachers in the config")
        # what the task allows
        task = state.task_def
        if not task.class_logits:
            if s.fusion in ("confidence", "entropy", "correctness"):
                raise _err("fusion", f"{s.fusion} needs class logits; the {task.name} task has none (use mean, weights or gate)")
            if s.fusion == "gate" and s.gate_objective == "labels":
                raise _err("gate_objective", f"labels needs class labels; for the {task.name} task use student_kl")
        if task.output_field == "embeddings":
            widths = {name: int(t.config.hidden_size) for name, t in zip(self.names, state.teachers)}
            if len(set(widths.values())) > 1:
                raise _err("fusion", f"teachers' embeddings have different sizes {widths}; they cannot be averaged")
        if s.fusion != "gate":
            return None
        if task.output_field != "embeddings" and not task.named_labels:
            raise _err("fusion", f"gate reads each teacher's distribution over the run's labels; the {task.name} task has none "
                       "(use mean, weights, confidence, entropy or correctness)")
        if task.output_field == "embeddings":
            features = sum(int(t.config.hidden_size) for t in state.teachers)
        else:
            features = n * len(state.labels)
        self.gate = Gate(features, s.gate_hidden, n, state.rng(salt=0x6A7E))
        return {"gate": self.gate}

    @hookimpl
    def setup(self, state: Any) -> None:
        s, config = self.settings, state.config
        if (state.need_hidden_states or state.need_attentions) and not all(state.same_tokens):
            other = [name for name, same in zip(self.names, state.same_tokens) if not same]
            raise _err(
                "fusion",
                "per-token terms (kd.hidden / kd.attention) cannot be used with teachers that read other tokens than the "
                f"student ({', '.join(other)}: another tokenizer or mode 'parallel'); fused teacher outputs are "
                "sequence-level (logits, embeddings). Switch the per-token terms off or use teachers that share the "
                "student's tokenizer in mode 'same'",
            )
        if s.fusion in ("correctness",) or (s.fusion == "gate" and s.gate_objective == "labels"):
            option = "fusion" if s.fusion == "correctness" else "gate_objective"
            unlabelled = [i for i, src in enumerate(config.data.train) if src.columns.label is None]
            if unlabelled or not config.data.train:
                raise _err(option, f"{'correctness' if option == 'fusion' else 'labels'} needs gold labels in the training data "
                           f"(data.train{f'[{unlabelled[0]}]' if unlabelled else ''}.columns.label)")
        if s.selective:
            self._heldout = self._load_heldout(state)

    def _load_heldout(self, state: Any) -> tuple[Any, Any]:
        """The held-out set as the student reads it and as the teachers read it (normalised columns)."""
        h = self.settings.heldout
        assert h is not None
        task = state.task_def
        pairs = task.eval_column == "source"  # scored on pairs (retrieval): both sides are the student's
        if pairs and h.source is None:
            raise _err("heldout.source", f"{task.eval_column_why}; give the column of the other side")
        columns = {"text": h.text, "source": h.source, "label": h.label if task.class_logits else None, "lang": h.lang}
        try:  # read and checked as the run's own data are (formats, columns, values)
            ds = polydistill.load_data({"path": h.path, "limit": h.limit, "columns": columns}, state.config, state.labels)
        except polydistill.DataError as exc:
            raise _err("heldout.path", str(exc).removeprefix("data: ")) from None
        if h.source is not None and not pairs:
            return ds.remove_columns("source"), ds.remove_columns("text").rename_column("source", "text")
        return ds, ds

    # ------------------------------------------------------------------ selective distillation

    def _score(self, state: Any, model: nn.Module, tokenizer: Any, dataset: Any) -> dict[str, float]:
        config = state.config
        result = polydistill.evaluate_model(
            model, tokenizer, dataset, state.task, state.labels, config.data.max_length,
            self.settings.heldout_batch_size, config.pooling, state.device,
        )
        metric = state.task_def.primary_metric
        return {lang: float(m[metric]) for lang, m in result["per_language"].items()}

    def _check(self, state: Any) -> None:
        """Score the student (and, once, the frozen teachers) per language and switch pairs on or off."""
        assert self._heldout is not None
        student_ds, teacher_ds = self._heldout
        if self.teacher_scores is None:
            self.teacher_scores = {
                name: self._score(state, t, tok, teacher_ds)
                for name, t, tok in zip(self.names, state.teachers, state.teacher_tokenizers)
            }
        self.student_scores = self._score(state, state.unwrapped_student(), state.student_tokenizer, student_ds)
        self.last_check = state.step
        margin = self.settings.margin
        for lang, student in sorted(self.student_scores.items()):
            row = self.active.setdefault(lang, {})
            self._check_logs[f"{NAME}/heldout/{lang}/student"] = student
            # with routing, only the teachers a language is routed to can teach it
            routed = self.lang_map.get(lang) if self.route else None
            for name in [self.names[i] for i in routed] if routed is not None else self.names:
                teacher = self.teacher_scores[name].get(lang)
                if teacher is None:
                    continue
                on = not student > teacher + margin
                if row.get(name) != on:
                    self.decisions.append({"step": state.step, "lang": lang, "teacher": name, "teaches": on,
                                           "student": student, "teacher_score": teacher})
                row[name] = on
                self._check_logs[f"{NAME}/heldout/{lang}/{name}"] = teacher
                self._check_logs[f"{NAME}/active/{lang}/{name}"] = float(on)

    # ------------------------------------------------------------------ hooks of a step

    @hookimpl
    def select_teachers(self, batch: Any, teachers: list[Any], state: Any) -> torch.Tensor | None:
        s = self.settings
        if not (self.route or s.selective):
            return None
        if s.selective and (self.last_check is None or state.step - self.last_check >= s.check_every):
            self._check(state)
        n, b = len(teachers), len(batch)
        weights = torch.ones(b, n)
        for row, lang in enumerate(batch.langs):
            if self.route:
                chosen = self.lang_map.get(lang)
                if chosen is None:
                    if s.unmapped == "error":
                        raise DataError(
                            f"plugins.{NAME}.languages: language {lang!r} in the training data has no teacher "
                            f"(known: {', '.join(sorted(self.lang_map))}); add it, or set plugins.{NAME}.unmapped: all or skip"
                        )
                    if s.unmapped == "skip":
                        weights[row] = 0
                else:
                    weights[row] = 0
                    weights[row, chosen] = 1
            if s.selective:
                for i, name in enumerate(self.names):
                    if not self.active.get(lang, {}).get(name, True):
                        weights[row, i] = 0
        total = weights.sum(1, keepdim=True)
        weights = torch.where(total > 0, weights / total.clamp(min=1e-12), torch.zeros_like(weights))
        return weights.to(state.device)

    def _dynamic_scores(self, values: list[torch.Tensor | None], batch: Any) -> torch.Tensor:
        """Per-teacher scores (..., n) for confidence, entropy or correctness, from logits (..., C)."""
        fusion, out = self.settings.fusion, []
        labels = batch.labels
        if fusion == "correctness" and labels is None:
            raise _err("fusion", "correctness needs gold labels, and this batch has none")
        for v in values:
            if v is None:
                out.append(None)
                continue
            logp = F.log_softmax(v, dim=-1)
            if fusion == "confidence":
                score = logp.max(-1).values
            elif fusion == "entropy":
                score = (logp.exp() * logp).sum(-1)  # -H
            else:
                gold = labels.clamp(min=0).unsqueeze(-1)
                score = logp.gather(-1, gold).squeeze(-1).masked_fill(labels < 0, 0.0)
            out.append(score)
        like = next(o for o in out if o is not None)
        return torch.stack([o if o is not None else torch.zeros_like(like) for o in out], dim=-1) / self.settings.temperature

    @hookimpl
    def teacher_outputs(self, batch: Any, teachers: list[Any], weights: torch.Tensor, state: Any) -> Any:
        s, task = self.settings, state.task_def
        n, b = len(teachers), len(batch)
        sel = (weights if weights.dim() == 2 else weights.expand(b, n)).float()
        ran = [i for i in range(n) if bool((sel[:, i] != 0).any())]
        per_layer = state.need_hidden_states or state.need_attentions
        # through the teacher-output cache; per-layer outputs are the first teacher's only
        outs = {i: state.run_teacher(i, batch, per_layer=per_layer and i == 0) for i in ran}
        first = outs[0] if 0 in outs else (state.run_teacher(0, batch, per_layer=True) if per_layer else None)
        field = task.output_field
        values: list[torch.Tensor | None] = [getattr(outs[i], field).float() if i in ran else None for i in range(n)]
        if task.word_level:  # word-level logits: every teacher has the same words
            width = batch.student_words.size(1)
            values = [v[:, :width] if v is not None else None for v in values]
        shape = next((v.shape for v in values if v is not None), None)
        # per-position prior: selection x fixed weights x "this teacher has this word"
        if task.word_level:
            prior = sel[:, None, :].expand(b, width, n).clone()
            for i in ran:
                prior[..., i] *= outs[i].word_mask[:, :width].float()
        else:
            prior = sel.clone()
        if self.fixed is not None:
            prior = prior * self.fixed.to(prior.device)
        taught = prior.sum(-1) > 0  # (B,) or (B, W)
        dim = shape[-1] if shape is not None else (int(teachers[0].config.hidden_size) if field == "embeddings" else len(state.labels))
        zeros = torch.zeros(prior.shape[:-1] + (dim,), device=prior.device)  # for teachers that did not run
        values = [v if v is not None else zeros for v in values]

        def combine(score: torch.Tensor | None) -> torch.Tensor:
            logits = torch.log(prior.clamp(min=1e-30)) + (score if score is not None else 0.0)
            logits = logits.masked_fill(prior == 0, float("-inf")).masked_fill(~taught.unsqueeze(-1), 0.0)
            return torch.softmax(logits, dim=-1) * taught.unsqueeze(-1).to(logits.dtype)

        def fuse(w: torch.Tensor) -> torch.Tensor:  # the core's fusion, with this plugin's weights
            if not ran:
                return zeros
            return getattr(state.fuse_teacher_outputs(outs, w, batch), field).float()

        gate_graph = None
        if s.fusion == "gate":
            assert self.gate is not None
            if field == "embeddings":
                feats = torch.cat([F.normalize(v, dim=-1) for v in values], dim=-1)
            else:
                feats = torch.cat([F.log_softmax(v, dim=-1) if i in ran else v for i, v in enumerate(values)], dim=-1)
            with torch.enable_grad():
                w = combine(self.gate(feats.detach()))
                fused_graph = fuse(w)
            fused = fused_graph if s.gate_objective == "student_kl" else fused_graph.detach()
            if s.gate_objective == "labels":
                gate_graph = fused_graph
            w = w.detach()
        elif s.fusion in ("confidence", "entropy", "correctness") and ran:
            w = combine(self._dynamic_scores([v if i in ran else None for i, v in enumerate(values)], batch))
            fused = fuse(w)
        else:
            w = combine(None)
            fused = fuse(w)
        self._gate_pending = (gate_graph, taught) if gate_graph is not None else None

        result = polydistill.ModelOutputs(extra={"teachers": ran, "weights": w, "teacher_names": list(self.names)})
        setattr(result, field, fused)
        if task.word_level:
            result.word_mask = taught
        if per_layer:
            assert first is not None
            result.hidden_states, result.attentions, result.mask = first.hidden_states, first.attentions, first.mask
            # per-layer outputs are the first teacher's: they teach only the samples it teaches (routing,
            # selective, a fixed weight of 0), so kd's hidden/attention terms leave out the others
            first_teaches = prior[..., 0] != 0
            result.layer_mask = first_teaches if first_teaches.dim() == 1 else first_teaches.any(-1)
        else:
            result.mask = outs[ran[0]].mask if ran else None
        # samples no teacher teaches get weight 0 in kd's terms
        sample_taught = taught if taught.dim() == 1 else taught.any(-1)
        if not bool(sample_taught.all()):  # kd leaves them out of the teacher terms, not out of ce
            result.sample_mask = sample_taught
        self._record(w, taught, sample_taught)
        return result

    def _record(self, w: torch.Tensor, taught: torch.Tensor, sample_taught: torch.Tensor) -> None:
        flat = w.detach().reshape(-1, w.size(-1))[taught.reshape(-1)]
        total = flat.sum(0).cpu()
        self._weight_sum = total if self._weight_sum is None else self._weight_sum + total
        self._weight_count += flat.size(0)
        self._samples += sample_taught.numel()
        self._untaught += int((~sample_taught).sum())

    @hookimpl
    def loss_terms(self, batch: Any, student_out: Any, teacher_out: Any, state: Any) -> dict[str, torch.Tensor] | None:
        pending, self._gate_pending = self._gate_pending, None
        if pending is None or not self.settings.gate_ce:
            return None
        fused, taught = pending
        if batch.labels is None:
            raise _err("gate_objective", "labels needs gold labels, and this batch has none (data.train columns.label)")
        labels = batch.labels.masked_fill(~taught, -100)
        if not bool((labels != -100).any()):
            return {"gate_ce": fused.sum() * 0.0}
        ce = F.cross_entropy(fused.reshape(-1, fused.size(-1)), labels.reshape(-1), ignore_index=-100)
        return {"gate_ce": self.settings.gate_ce * ce}

    @hookimpl
    def on_step_end(self, state: Any, logs: dict[str, float]) -> None:
        if self._weight_sum is not None and self._weight_count:
            mean = self._weight_sum / self._weight_count
            for name, value in zip(self.names, mean.tolist()):
                logs[f"{NAME}/weight/{name}"] = value
        if self._samples:
            logs[f"{NAME}/untaught"] = self._untaught / self._samples
        logs.update(self._check_logs)
        self._check_logs = {}
        self._weight_sum, self._weight_count, self._samples, self._untaught = None, 0, 0, 0

    # ------------------------------------------------------------------ checkpoints and report

    @hookimpl
    def state_dict(self, state: Any) -> dict[str, Any] | None:
        if not self.settings.selective:
            return None
        return {
            "active": self.active,
            "teacher_scores": self.teacher_scores,
            "student_scores": self.student_scores,
            "last_check": self.last_check,
            "decisions": self.decisions,
        }

    @hookimpl
    def load_state_dict(self, state: Any, plugin_state: dict[str, Any]) -> None:
        self.active = {lang: dict(row) for lang, row in plugin_state.get("active", {}).items()}
        self.teacher_scores = plugin_state.get("teacher_scores")
        self.student_scores = dict(plugin_state.get("student_scores") or {})
        self.last_check = plugin_state.get("last_check")
        self.decisions = list(plugin_state.get("decisions", []))

    @hookimpl
    def on_train_end(self, state: Any, metrics: dict[str, Any]) -> None:
        if not state.accelerator.is_main_process:
            return
        report = {
            "teachers": self.names,
            "fusion": self.settings.fusion,
            "languages": {lang: [self.names[i] for i in idx] for lang, idx in self.lang_map.items()} if self.route else None,
            "selective": {
                "teacher_scores": self.teacher_scores,
                "student_scores": self.student_scores,
                "active": self.active,
                "decisions": self.decisions,
            } if self.settings.selective else None,
        }
        state.output_dir.mkdir(parents=True, exist_ok=True)
        (state.output_dir / f"{NAME}.json").write_text(json.dumps(report, indent=2), encoding="utf-8")
