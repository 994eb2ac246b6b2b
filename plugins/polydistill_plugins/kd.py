"""The standard knowledge-distillation loss terms (plugin ``kd``, enabled by default).

Terms, each with its own weight (0 switches a term off):

- ``kl``: KL(teacher || student) on logits softened by a temperature, times T²
  (Hinton et al. 2015), per sample, per word, or per target token of a language
  model; ``divergence`` chooses reverse KL, skew KL / skew reverse KL (DistiLLM)
  or the generalized Jensen-Shannon divergence (GKD) instead. The batch's loss hints (``batch.loss_hints()``, set
  by other plugins with ``batch.with_hints``): a temperature replaces the
  configured one for that step (a number, a ``(B,)`` tensor, possibly with
  gradients, or a callable of the step's outputs); sample weights weight
  samples in every term, ``ce``, ``hidden`` and ``attention`` included.
  The teacher terms leave out the samples the
  teacher outputs' ``sample_mask`` says no teacher teaches (``ce`` keeps
  them), and the per-layer terms the samples ``layer_mask`` says the
  per-layer outputs do not teach.
- ``ce``: cross-entropy with the gold labels.
- ``mse`` / ``cosine``: pooled embedding matching (Reimers & Gurevych 2020);
  a learned linear projection maps the student's width to the teacher's when
  they differ.
- ``hidden``: MSE between hidden states of mapped layers (TinyBERT/DistilBERT
  style), with learned projections when widths differ.
- ``attention``: MSE between attention maps of mapped layers (heads averaged
  when their counts differ).
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

import polydistill
from polydistill import ConfigError, PluginSettings, hookimpl


class Settings(PluginSettings):
    kl: float | None = Field(None, ge=0, description="Weight of the KL term; default 1 for classification tasks with a teacher (0 when `uld` is set), else 0.")
    temperature: float = Field(2.0, gt=0, description="Softmax temperature of the KL term.")
    divergence: Literal["forward", "reverse", "skew_forward", "skew_reverse", "jsd"] = Field(
        "forward",
        description="What the `kl` term measures between the teacher's distribution p and the student's q (both at "
        "`temperature`, times T²): forward KL(p||q) (Hinton et al.); reverse KL(q||p), mode-seeking; skew_forward "
        "KL(p || skew·p + (1-skew)·q) and skew_reverse KL(q || (1-skew)·p + skew·q) (DistiLLM, Ko et al. 2024); jsd, the "
        "generalized Jensen-Shannon divergence jsd_beta·KL(p||m) + (1-jsd_beta)·KL(q||m), m = jsd_beta·p + "
        "(1-jsd_beta)·q (GKD, Agarwal et al. 2024).",
    )
    skew: float = Field(0.1, gt=0, lt=1, description="α of skew_forward / skew_reverse: the share of the distribution the divergence is taken from in the mixture (DistiLLM's default 0.1).")
    jsd_beta: float = Field(0.5, gt=0, lt=1, description="β of jsd: the teacher's share of the mixture and the weight of KL(p||m); near 0 it behaves like forward KL, near 1 like reverse KL (each scaled down).")
    uld: float = Field(0.0, ge=0, description="Weight of the cross-tokenizer term (ULD, Boizard et al. 2024): the L1 distance between the teacher's and the student's token probabilities, each sorted, at `temperature`, at the n-th target token of each (positions paired in order, up to the shorter); needs no shared vocabulary, so the teacher may have another tokenizer (causal_lm, seq2seq).")
    ce: float | None = Field(None, ge=0, description="Weight of hard-label cross-entropy; default 1 without a teacher, else 0.")
    mse: float | None = Field(None, ge=0, description="Weight of embedding MSE; default 1 for the embedding task, else 0.")
    cosine: float = Field(0.0, ge=0, description="Weight of embedding cosine loss (1 - cos).")
    normalize: bool = Field(
        False, description="L2-normalise both pooled embeddings before `mse`, as sentence-transformers models that end in a Normalize module do."
    )
    hidden: float = Field(0.0, ge=0, description="Weight of hidden-state MSE over mapped layers.")
    attention: float = Field(0.0, ge=0, description="Weight of attention-map MSE over mapped layers.")
    layer_map: dict[int, int] | None = Field(
        None,
        description="Student layer -> teacher layer for hidden/attention matching (1-based blocks; 0 is the "
        "embedding output for hidden states). Default: each student block i to teacher block round(i*T/S).",
    )

    @model_validator(mode="after")
    def _non_negative_map(self) -> Settings:
        if self.layer_map and any(k < 0 or v < 0 for k, v in self.layer_map.items()):
            raise ValueError("layer_map indices must be >= 0")
        return self


def kl_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: Any, mask: torch.Tensor | None = None,
                  weights: torch.Tensor | None = None, divergence: str = "forward", skew: float = 0.1, beta: float = 0.5) -> torch.Tensor:
    """Mean over samples (and valid words or tokens) of T² · D(softmax(t/T), softmax(s/T)); D is ``divergence``
    (see ``Settings.divergence``): forward KL(teacher || student) by default."""
    t = torch.as_tensor(temperature, dtype=student_logits.dtype, device=student_logits.device)
    shape = [-1] + [1] * (student_logits.dim() - 1) if t.dim() else []
    t = t.view(shape) if shape else t
    s_log = F.log_softmax(student_logits / t, dim=-1)
    t_log = F.log_softmax(teacher_logits.to(student_logits.dtype) / t, dim=-1)
    per = divergences(s_log, t_log, divergence, skew, beta) * (t.squeeze(-1) ** 2 if t.dim() else t**2)
    return _reduce(per, mask, weights)


def divergences(s_log: torch.Tensor, t_log: torch.Tensor, divergence: str = "forward", skew: float = 0.1, beta: float = 0.5) -> torch.Tensor:
    """``divergence`` between the teacher's and the student's distributions, given as log-probabilities over the last axis."""

    def kl(target: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:  # KL(exp(target) || exp(log_q))
        return F.kl_div(log_q, target, log_target=True, reduction="none").sum(-1)

    def mixture(a: torch.Tensor, share: float, b: torch.Tensor) -> torch.Tensor:  # log(share·exp(a) + (1-share)·exp(b))
        return torch.logaddexp(a + math.log(share), b + math.log1p(-share))

    if divergence == "forward":
        return kl(t_log, s_log)
    if divergence == "reverse":
        return kl(s_log, t_log)
    if divergence == "skew_forward":
        return kl(t_log, mixture(t_log, skew, s_log))
    if divergence == "skew_reverse":
        return kl(s_log, mixture(s_log, skew, t_log))
    if divergence == "jsd":
        m = mixture(t_log, beta, s_log)
        return beta * kl(t_log, m) + (1 - beta) * kl(s_log, m)
    raise ValueError(f"unknown divergence {divergence!r}")


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: Any = 1.0,
                 student_mask: torch.Tensor | None = None, teacher_mask: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> torch.Tensor:
    """ULD (Boizard et al. 2024): mean over paired positions of sum_i |p_(i) - q_(i)|, the teacher's and the
    student's probabilities at ``temperature`` sorted in decreasing order (the shorter vocabulary padded with 0).

    ``(B, Ws, Vs)`` and ``(B, Wt, Vt)``: position n of one is paired with position n of the other, up to the
    shorter of the two in each row (masks mark each row's valid positions, a prefix).
    """
    t = torch.as_tensor(temperature, dtype=student_logits.dtype, device=student_logits.device)
    t = t.view(-1, 1, 1) if t.dim() else t
    width = min(student_logits.size(1), teacher_logits.size(1))
    s_p = F.softmax(student_logits[:, :width] / t, dim=-1).sort(dim=-1, descending=True).values
    t_p = F.softmax(teacher_logits[:, :width].to(student_logits.dtype) / t, dim=-1).sort(dim=-1, descending=True).values
    vocab = max(s_p.size(-1), t_p.size(-1))
    s_p, t_p = F.pad(s_p, (0, vocab - s_p.size(-1))), F.pad(t_p, (0, vocab - t_p.size(-1)))
    per = (s_p - t_p).abs().sum(-1)
    mask = torch.ones(per.shape, dtype=torch.bool, device=per.device)
    for m in (student_mask, teacher_mask):
        if m is not None:
            mask = mask & m[:, :width].to(per.device)
    return _reduce(per, mask, weights)


def _reduce(per: torch.Tensor, mask: torch.Tensor | None, weights: torch.Tensor | None) -> torch.Tensor:
    """Average per-sample (B,) or per-word (B, W) values, honouring a word mask and sample weights."""
    w = torch.ones_like(per)
    if mask is not None:
        w = w * mask.to(per.dtype)
    if weights is not None:
        w = w * weights.to(per.device, per.dtype).view(-1, *[1] * (per.dim() - 1))
    return (per * w).sum() / w.sum().clamp(min=1e-9)


def default_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    return {i: round(i * teacher_layers / student_layers) for i in range(1, student_layers + 1)}


class StandardKD:
    """KL, CE, embedding MSE/cosine, hidden-state and attention matching."""

    polydistill_api = polydistill.API_VERSION
    Settings = Settings

    def __init__(self, settings: Settings):
        self.settings = settings
        self.weights: dict[str, float] = {}
        self.layer_map: dict[int, int] = {}
        self.projections = nn.ModuleDict()
        self.used_temperatures: list[float] = []

    def _resolve(self, state: Any) -> None:
        s, task, has_teacher = self.settings, state.task_def, bool(state.teachers)
        classify, embed = task.class_logits, task.output_field == "embeddings"
        self.weights = {
            "kl": s.kl if s.kl is not None else float(classify and has_teacher and not s.uld),
            "uld": s.uld,
            "ce": s.ce if s.ce is not None else float(classify and not has_teacher),
            "mse": s.mse if s.mse is not None else float(embed and has_teacher),
            "cosine": s.cosine,
            "hidden": s.hidden,
            "attention": s.attention,
        }
        teacher_terms = ("kl", "uld", "mse", "cosine", "hidden", "attention")
        if not has_teacher and not classify:
            raise ConfigError(f"teachers: the {task.name} task has no gold labels to learn from, only a teacher's outputs; "
                              "give at least one teacher")
        if not has_teacher:
            bad = [k for k in teacher_terms if self.weights[k]]
            if bad:
                raise ConfigError(f"plugins.kd.{bad[0]}: this term needs a teacher, and the run has none")
        if not classify and (self.weights["kl"] or self.weights["ce"]):
            raise ConfigError(f"plugins.kd.{'kl' if self.weights['kl'] else 'ce'}: the {task.name} task has no class logits; use mse or cosine")
        if not embed and (self.weights["mse"] or self.weights["cosine"]):
            raise ConfigError(f"plugins.kd.{'mse' if self.weights['mse'] else 'cosine'}: embedding terms need a task "
                              f"with sentence embeddings (task: embedding), not {task.name}")
        cc = state.config.cache
        sampled = has_teacher and task.cache_needs_top_k and cc.enabled and cc.top_k and cc.top_k_method == "sample"
        if sampled and (self.weights["kl"] or self.weights["uld"]) and (s.divergence != "forward" or s.temperature != 1 or self.weights["uld"]):
            warnings.warn("plugins.kd: cache.top_k_method 'sample' gives an unbiased estimate of the teacher's distribution "
                          "for forward KL at temperature 1 only; with divergence "
                          f"{s.divergence!r}, temperature {s.temperature}{' and uld' if self.weights['uld'] else ''} the cached "
                          "estimate is biased (see docs/tasks.md); use top_k_method 'top'", polydistill.PolydistillWarning, stacklevel=2)
        if self.weights["uld"] and not task.cache_needs_top_k:
            raise ConfigError(f"plugins.kd.uld: the cross-tokenizer term compares distributions over two vocabularies, which "
                              f"the {task.name} task's outputs are not (causal_lm and seq2seq's are)")
        if embed and s.normalize and (self.weights["mse"] or self.weights["cosine"]):
            state.normalized_embeddings = "kd"  # the student learned normalised vectors: its saved model normalises too
        if self.weights["uld"]:
            state.cross_tokenizer = "kd"
            other = [n for n, same in zip(state.teacher_names, state.same_tokens) if not same]
            if other and len(state.teachers) > 1:
                raise ConfigError(f"plugins.kd.uld: {', '.join(other)} reads other tokens than the student, and outputs over "
                                  "different vocabularies cannot be fused into one; distil from that teacher alone")
            if self.weights["kl"] and other:
                raise ConfigError(f"plugins.kd.kl: {', '.join(other)} reads other tokens than the student, so their "
                                  "distributions are over another vocabulary; use uld alone with such a teacher (kl: 0)")
        for k in ("hidden", "attention"):
            if self.weights[k] and not all(state.same_tokens[:1]):
                raise ConfigError(
                    f"plugins.kd.{k}: matching per-token states needs the first teacher to read the student's exact tokens "
                    "(mode 'same' and the same tokenizer, so no student.vocabulary)"
                )

    @hookimpl
    def trainable_modules(self, state: Any) -> dict[str, nn.Module] | None:
        self._resolve(state)
        w = self.weights
        state.need_hidden_states = state.need_hidden_states or bool(w["hidden"])
        state.need_attentions = state.need_attentions or bool(w["attention"])
        if not state.teachers:
            return None
        teacher, student = state.teachers[0], state.student
        t_width, s_width = teacher.config.hidden_size, student.config.hidden_size
        if w["hidden"] or w["attention"]:
            n_s, n_t = student.config.num_hidden_layers, teacher.config.num_hidden_layers
            self.layer_map = dict(self.settings.layer_map or default_layer_map(n_s, n_t))
            bad = {k: v for k, v in self.layer_map.items() if k > n_s or v > n_t}
            if bad:
                raise ConfigError(f"plugins.kd.layer_map: {bad} out of range (student has {n_s} layers, teacher {n_t})")
        if s_width != t_width:
            if w["mse"] or w["cosine"]:
                self.projections["embedding"] = nn.Linear(s_width, t_width)
            if w["hidden"]:
                for k in self.layer_map:
                    self.projections[f"hidden_{k}"] = nn.Linear(s_width, t_width)
        return {"projections": self.projections} if len(self.projections) else None

    @hookimpl
    def loss_terms(self, batch: Any, student_out: Any, teacher_out: Any, state: Any) -> dict[str, torch.Tensor]:
        w, terms = self.weights, {}
        hints = batch.loss_hints()
        weights = hints.resolve_weights(student_out, teacher_out, len(batch))
        if w["ce"]:
            if batch.labels is None:
                raise ConfigError("plugins.kd.ce: the training data has no labels (columns.label)")
            logits, labels = student_out.logits, batch.labels
            per = F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100, reduction="none")
            terms["ce"] = w["ce"] * _reduce(per.view(labels.shape), labels != -100, weights)
        if teacher_out is None:
            return terms
        if teacher_out.sample_mask is not None:  # samples no teacher teaches: in ce above, not in the teacher terms
            keep = teacher_out.sample_mask.to(torch.float32)
            weights = keep if weights is None else torch.as_tensor(weights, device=keep.device) * keep
        if w["kl"]:
            mask = student_out.word_mask
            if mask is not None and teacher_out.word_mask is not None:
                mask = mask & teacher_out.word_mask
            temperature = hints.resolve_temperature(student_out, teacher_out, self.settings.temperature)
            self.used_temperatures.append(float(torch.as_tensor(temperature, dtype=torch.float32).detach().mean()))
            s = self.settings
            terms["kl"] = w["kl"] * kl_divergence(student_out.logits, teacher_out.logits, temperature, mask, weights,
                                                  s.divergence, s.skew, s.jsd_beta)
        if w.get("uld"):
            temperature = hints.resolve_temperature(student_out, teacher_out, self.settings.temperature)
            terms["uld"] = w["uld"] * uld_distance(student_out.logits, teacher_out.logits, temperature,
                                                   student_out.word_mask, teacher_out.word_mask, weights)
        if w["mse"] or w["cosine"]:
            s_emb = student_out.embeddings
            if "embedding" in self.projections:
                s_emb = self.projections["embedding"](s_emb)
            t_emb = teacher_out.embeddings.to(s_emb.dtype)
            if self.settings.normalize:
                s_emb, t_emb = F.normalize(s_emb, dim=-1), F.normalize(t_emb, dim=-1)
            if w["mse"]:
                terms["mse"] = w["mse"] * _reduce(((s_emb - t_emb) ** 2).mean(-1), None, weights)
            if w["cosine"]:
                terms["cosine"] = w["cosine"] * _reduce(1 - F.cosine_similarity(s_emb, t_emb, dim=-1), None, weights)
        if w["hidden"] or w["attention"]:
            # per-layer outputs are one teacher's: samples it does not teach (layer_mask) weigh 0
            layer_weights = weights
            if teacher_out.layer_mask is not None:
                keep = teacher_out.layer_mask.to(student_out.mask.device, torch.float32)
                layer_weights = keep if weights is None else torch.as_tensor(weights, device=keep.device) * keep
            tokens = student_out.mask.float()
            if layer_weights is not None:
                tokens = tokens * torch.as_tensor(layer_weights, device=tokens.device, dtype=tokens.dtype).view(-1, 1)
        if w["hidden"]:
            mask = tokens.unsqueeze(-1).to(student_out.hidden_states[0].dtype)
            total = 0.0
            for s_layer, t_layer in self.layer_map.items():
                h = student_out.hidden_states[s_layer]
                if f"hidden_{s_layer}" in self.projections:
                    h = self.projections[f"hidden_{s_layer}"](h)
                diff = (h - teacher_out.hidden_states[t_layer].to(h.dtype)) ** 2 * mask
                total = total + diff.sum() / (mask.sum() * h.size(-1)).clamp(min=1e-9)
            terms["hidden"] = w["hidden"] * total / len(self.layer_map)
        if w["attention"]:
            mask = tokens.to(student_out.attentions[0].dtype)
            valid = student_out.mask.to(mask.dtype)
            rows = mask[:, None, :, None] * valid[:, None, None, :]
            total = 0.0
            for s_layer, t_layer in self.layer_map.items():
                if s_layer == 0 or t_layer == 0:
                    continue
                a_s = student_out.attentions[s_layer - 1]
                a_t = teacher_out.attentions[t_layer - 1].to(a_s.dtype)
                if a_s.size(1) != a_t.size(1):
                    a_s, a_t = a_s.mean(1, keepdim=True), a_t.mean(1, keepdim=True)
                diff = ((a_s - a_t) ** 2) * rows
                total = total + diff.sum() / (rows.sum() * a_s.size(1)).clamp(min=1e-9)
            terms["attention"] = w["attention"] * total / max(1, sum(1 for k, v in self.layer_map.items() if k and v))
        return terms

    @hookimpl
    def on_step_end(self, state: Any, logs: dict[str, float]) -> None:
        if self.weights.get("kl") and self.used_temperatures:
            # the mean over this step's micro-batches, like the loss terms
            logs["kd/temperature"] = sum(self.used_temperatures) / len(self.used_temperatures)
            self.used_temperatures.clear()
