"""Regularising the student: dropout rates (plugin ``dropout``) and L2 penalties (plugin ``l2``).

``dropout`` sets the student's dropout rates by role in ``setup``:

- ``hidden``: every ``nn.Dropout`` of the encoder that is not an attention
  dropout (embeddings, attention output, feed-forward output);
- ``attention``: the dropout on attention probabilities, found as the
  ``nn.Dropout`` whose parent module holds the query/key/value projections
  (``query``/``key``/``value``, ``q_proj``/``k_proj``/``v_proj``, ``q_lin``/...,
  ``q``/``k``/``v``) or whose class name ends in ``Attention``;
- ``classifier``: every ``nn.Dropout`` outside ``model.base_model`` (the
  task head).

It sets ``module.p`` on each module and the matching config fields
(``hidden_dropout_prob``/``dropout``, ``attention_probs_dropout_prob``/
``attention_dropout``, ``classifier_dropout``/``seq_classif_dropout``), so
the saved student's ``config.json`` records the rates it was trained with.

``l2`` returns penalties from ``regularize`` (logged as ``reg/<name>``):

- ``l2``   = weight/2 · Σ ‖w‖² over the selected parameters;
- ``l2_sp`` = sp_alpha/2 · Σ ‖w − w0‖² over selected parameters that had
  pretrained values (w0: the student's weights when the run started;
  L2-SP, Li et al. 2018, "Explicit inductive bias for transfer learning with
  convolutional networks");
- ``l2_sp_new`` = sp_beta/2 · Σ ‖w‖² over selected parameters that are new
  (by default the task head of a ``student.model`` student).

w0 is recorded in ``setup`` and saved with every checkpoint, so a resumed run
anchors to the weights the run started from, not to the resumed ones.
"""

from __future__ import annotations

import fnmatch
import math
import re
from typing import Any

import torch
from pydantic import Field, field_validator, model_validator
from torch import nn

import polydistill
from polydistill import ConfigError, PluginSettings, hookimpl

# --------------------------------------------------------------------------- dropout

ROLES = ("hidden", "attention", "classifier")

#: Config fields that hold each role's rate, in the spellings transformers' model families use.
CONFIG_FIELDS: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_dropout_prob", "hidden_dropout", "dropout", "resid_pdrop", "embd_pdrop"),
    "attention": ("attention_probs_dropout_prob", "attention_dropout", "attn_pdrop"),
    "classifier": ("classifier_dropout", "seq_classif_dropout"),
}

_QKV = (("query", "key", "value"), ("q_proj", "k_proj", "v_proj"), ("q_lin", "k_lin", "v_lin"), ("q", "k", "v"))


class DropoutSettings(PluginSettings):
    hidden: float | None = Field(
        None, ge=0, lt=1,
        description="Dropout on hidden states (embeddings, attention output, feed-forward output); null leaves it as it is.",
    )
    attention: float | None = Field(None, ge=0, lt=1, description="Dropout on attention probabilities; null leaves it as it is.")
    classifier: float | None = Field(
        None, ge=0, lt=1,
        description="Dropout in the task head; null leaves it, except that a BERT-style head whose config says "
        "classifier_dropout: null follows `hidden` (as transformers does when it builds the model).",
    )

    @model_validator(mode="after")
    def _something(self) -> DropoutSettings:
        if self.hidden is None and self.attention is None and self.classifier is None:
            raise ValueError("set at least one of hidden, attention, classifier")
        return self


def _is_attention(parent: nn.Module) -> bool:
    names = {n for n, _ in parent.named_children()}
    if any(all(k in names for k in qkv) for qkv in _QKV):
        return True
    return type(parent).__name__.endswith("Attention")


def dropout_roles(model: nn.Module) -> dict[str, list[tuple[str, nn.Dropout]]]:
    """Every ``nn.Dropout`` of ``model`` by role: ``hidden``, ``attention`` or ``classifier``."""
    base = getattr(model, "base_model", model)
    in_base = {id(m) for m in base.modules()} if base is not model else None
    parents = {name: module for name, module in model.named_modules()}
    roles: dict[str, list[tuple[str, nn.Dropout]]] = {r: [] for r in ROLES}
    for name, module in model.named_modules():
        if not isinstance(module, nn.Dropout):
            continue
        parent = parents[name.rpartition(".")[0]]
        if in_base is not None and id(module) not in in_base:
            roles["classifier"].append((name, module))
        elif _is_attention(parent):
            roles["attention"].append((name, module))
        else:
            roles["hidden"].append((name, module))
    return roles


def apply_dropout(model: nn.Module, hidden: float | None = None, attention: float | None = None,
                  classifier: float | None = None, plugin: str = "dropout") -> dict[str, float]:
    """Set the rates of ``model``'s dropout modules and config fields by role; returns the rates applied.

    A role given a rate but without any dropout module in ``model`` is a
    ``ConfigError`` naming ``plugins.<plugin>.<role>``.
    """
    config = getattr(model, "config", None)
    fields = set(config.to_dict()) if config is not None and hasattr(config, "to_dict") else set()
    wanted = {"hidden": hidden, "attention": attention, "classifier": classifier}
    if classifier is None and hidden is not None and "classifier_dropout" in fields and config.classifier_dropout is None:
        wanted["classifier"] = hidden  # transformers builds such a head with the hidden rate; keep save/load consistent
    roles = dropout_roles(model)
    applied: dict[str, float] = {}
    for role, rate in wanted.items():
        if rate is None:
            continue
        modules = roles[role]
        if not modules:
            if role == "classifier" and wanted["classifier"] is not classifier:
                continue  # only implied by `hidden`, and there is no head
            found = ", ".join(f"{n} ({r})" for r in ROLES for n, _ in roles[r]) or "none"
            why = " (the model has no task head)" if role == "classifier" and getattr(model, "base_model", model) is model else ""
            raise ConfigError(
                f"plugins.{plugin}.{role}: found no {role} dropout in {type(model).__name__}{why}; "
                f"nn.Dropout modules found: {found}"
            )
        for _, module in modules:
            module.p = float(rate)
        for key in CONFIG_FIELDS[role]:
            if key in fields:
                setattr(config, key, float(rate))
        applied[role] = float(rate)
    return applied


class Dropout:
    """Set the student's hidden, attention and classifier dropout rates."""

    polydistill_api = polydistill.API_VERSION
    Settings = DropoutSettings

    def __init__(self, settings: DropoutSettings):
        self.settings = settings
        self.applied: dict[str, float] = {}

    @hookimpl
    def setup(self, state: Any) -> None:
        s = self.settings
        self.applied = apply_dropout(state.unwrapped_student(), s.hidden, s.attention, s.classifier)

    @hookimpl
    def on_step_end(self, state: Any, logs: dict[str, float]) -> None:
        for role, rate in self.applied.items():
            logs[f"dropout/{role}"] = rate


# --------------------------------------------------------------------------- L2


def _check_pattern(value: str) -> str:
    if value.startswith("re:"):
        try:
            re.compile(value[3:])
        except re.error as exc:
            raise ValueError(f"{value!r} is not a valid regular expression: {exc}") from None
    return value


def matches(name: str, pattern: str) -> bool:
    """``re:...`` patterns are searched in the name; others are globs matched against the whole name."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def is_bias_or_norm(name: str, param: torch.Tensor) -> bool:
    """Biases, norm weights and other vectors: the core optimizer's no-weight-decay rule."""
    return param.ndim < 2 or "norm" in name.lower()


class L2Settings(PluginSettings):
    weight: float = Field(0.0, ge=0, description="λ of `l2` = λ/2 · Σ‖w‖² over the selected parameters; 0 switches the term off.")
    sp_alpha: float = Field(
        0.0, ge=0, description="α of `l2_sp` = α/2 · Σ‖w − w0‖² over selected parameters with pretrained values (L2-SP); 0 switches it off."
    )
    sp_beta: float = Field(0.0, ge=0, description="β of `l2_sp_new` = β/2 · Σ‖w‖² over selected new parameters (L2-SP); 0 switches it off.")
    params: list[str] = Field(
        default_factory=lambda: ["*"],
        description="Parameters to penalise: globs over names from student.named_parameters() (e.g. 'bert.encoder.*'), "
        "or regular expressions written 're:...'. Default: all.",
    )
    exclude: list[str] = Field(default_factory=list, description="Patterns of parameters to leave out, after `params`.")
    include_bias_and_norm: bool = Field(
        False, description="Also penalise biases and norm weights (parameters with fewer than 2 dimensions or 'norm' in the name)."
    )
    new_params: list[str] | None = Field(
        None,
        description="Patterns of the new parameters (no pretrained value) for `l2_sp_new`; the others are anchored to w0. "
        "Default: the task head (outside model.base_model) when the student comes from student.model, none for "
        "student.from_teacher (its head is copied from the teacher).",
    )

    _patterns = field_validator("params", "exclude", "new_params")(
        classmethod(lambda cls, v: [_check_pattern(p) for p in v] if v is not None else v)
    )

    @model_validator(mode="after")
    def _something(self) -> L2Settings:
        if not (self.weight or self.sp_alpha or self.sp_beta):
            raise ValueError("set weight, sp_alpha or sp_beta above 0 (every term is off)")
        return self


class L2:
    """Plain L2 and L2-SP penalties on chosen student parameters."""

    polydistill_api = polydistill.API_VERSION
    Settings = L2Settings

    def __init__(self, settings: L2Settings):
        self.settings = settings
        self.selected: list[str] = []
        self.shared: list[str] = []
        self.new: list[str] = []
        self.initial: dict[str, torch.Tensor] = {}
        self._logs: dict[str, float] = {}

    # ---- which parameters -------------------------------------------------

    def _select(self, state: Any, student: nn.Module) -> None:
        s = self.settings
        named = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        names = [n for n, _ in named]
        example = ", ".join(names[:3] + (["...", names[-1]] if len(names) > 3 else []))
        for option in ("params", "exclude", "new_params"):
            for pattern in getattr(s, option) or []:
                if not any(matches(n, pattern) for n in names):
                    raise ConfigError(f"plugins.l2.{option}: pattern {pattern!r} matches no parameter of the student; names look like: {example}")
        self.selected = [
            n for n, p in named
            if any(matches(n, pat) for pat in s.params)
            and not any(matches(n, pat) for pat in s.exclude)
            and (s.include_bias_and_norm or not is_bias_or_norm(n, p))
        ]
        if not self.selected:
            raise ConfigError("plugins.l2.params: no parameter left to penalise after `exclude` and the bias/norm rule")
        if s.new_params is not None:
            new = {n for n in self.selected if any(matches(n, pat) for pat in s.new_params)}
        elif state.config.student.from_teacher is None:
            base = getattr(student, "base_model", student)
            in_base = {id(p) for p in base.parameters()} if base is not student else None
            params = dict(named)
            new = {n for n in self.selected if in_base is not None and id(params[n]) not in in_base}
        else:
            new = set()
        self.new = [n for n in self.selected if n in new]
        self.shared = [n for n in self.selected if n not in new]
        if s.sp_beta and not self.new:
            raise ConfigError(
                "plugins.l2.sp_beta: no selected parameter is new (with student.from_teacher the head is copied from the "
                "teacher, so nothing is); name them with new_params, or leave sp_beta out"
            )
        if s.sp_alpha and state.config.student.config is not None:
            raise ConfigError(
                "plugins.l2.sp_alpha: the student is randomly initialised (student.config), so its starting weights are "
                "not pretrained; L2-SP anchors to pretrained weights. Use `weight` (plain L2) instead"
            )

    # ---- hooks ------------------------------------------------------------

    @hookimpl
    def setup(self, state: Any) -> None:
        student = state.unwrapped_student()
        self._select(state, student)
        params = dict(student.named_parameters())
        self.initial = {n: params[n].detach().clone() for n in self.shared} if self.settings.sp_alpha else {}

    @hookimpl
    def regularize(self, student: nn.Module, state: Any) -> dict[str, torch.Tensor]:
        s, terms = self.settings, {}
        params = dict(student.named_parameters())
        if s.weight:
            total = sum(params[n].float().pow(2).sum() for n in self.selected)
            terms["l2"] = s.weight / 2 * total
            self._logs["l2/norm"] = math.sqrt(float(total.detach()))
        if s.sp_alpha and self.shared:
            total = sum((params[n].float() - self.initial[n].float()).pow(2).sum() for n in self.shared)
            terms["l2_sp"] = s.sp_alpha / 2 * total
            self._logs["l2/sp_distance"] = math.sqrt(float(total.detach()))
        if s.sp_beta and self.new:
            total = sum(params[n].float().pow(2).sum() for n in self.new)
            terms["l2_sp_new"] = s.sp_beta / 2 * total
            self._logs["l2/new_norm"] = math.sqrt(float(total.detach()))
        return terms

    @hookimpl
    def on_step_end(self, state: Any, logs: dict[str, float]) -> None:
        logs.update(self._logs)

    @hookimpl
    def state_dict(self, state: Any) -> dict[str, Any] | None:
        if not self.initial:
            return None
        return {"initial": {n: t.cpu() for n, t in self.initial.items()}}

    @hookimpl
    def load_state_dict(self, state: Any, plugin_state: dict[str, Any]) -> None:
        saved = plugin_state.get("initial", {})
        if not self.settings.sp_alpha:
            return
        missing = [n for n in self.shared if n not in saved]
        if missing:
            raise ConfigError(
                f"plugins.l2.params: the checkpoint has no initial weights for {missing[:3]} (the parameter selection "
                "changed since the run started); resume with the run's original l2 settings"
            )
        self.initial = {n: saved[n].to(self.initial[n].device, self.initial[n].dtype) for n in self.shared}


__all__ = ["Dropout", "L2", "apply_dropout", "dropout_roles"]
