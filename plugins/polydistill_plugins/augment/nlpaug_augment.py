"""``nlpaug``: any nlpaug augmenter (or several in sequence), deterministic per step, never downloading.

nlpaug's augmenters draw from Python's ``random`` and NumPy's global generator.
Each text is augmented with both seeded from this micro-batch's ``state.rng``
and restored afterwards, so a run's other randomness is untouched and a resumed
run augments exactly as an uninterrupted one. An augmenter that would download
(a model by hub name, nltk data that is not installed) is refused in ``setup``
with the option that takes a local path.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import random
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from polydistill import ConfigError
from polydistill_plugins.augment.base import AugmentSettings, _Augment

#: nlpaug options that name a model or a resource file: each must be a local path here.
PATH_OPTIONS = ("model_path", "from_model_name", "to_model_name", "dict_path", "model_dir", "src_model_path")
#: Augmenters whose default resource is nltk data, by the option that selects the resource.
NLTK_SOURCES = {"SynonymAug": ("aug_src", "wordnet"), "AntonymAug": (None, "wordnet")}


class AugmenterSpec(BaseModel):
    """One augmenter: its class path and constructor arguments."""

    model_config = ConfigDict(extra="forbid")
    augmenter: str = Field(description="Class path, e.g. nlpaug.augmenter.char.KeyboardAug (or `char.KeyboardAug`).")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments of its constructor, e.g. {aug_char_p: 0.1}.")


class NlpaugSettings(AugmentSettings):
    """An nlpaug augmenter, or ``augmenters`` applied in sequence."""

    augmenter: str | None = Field(None, description="Class path of one augmenter, e.g. nlpaug.augmenter.char.KeyboardAug; "
                                  "the `nlpaug.augmenter.` prefix may be left out.")
    args: dict[str, Any] = Field(default_factory=dict, description="Constructor arguments of `augmenter`.")
    augmenters: list[AugmenterSpec] | None = Field(None, description="Several augmenters, applied to a text in this order "
                                                    "(each {augmenter, args}); instead of `augmenter`.")

    @model_validator(mode="after")
    def _one(self) -> NlpaugSettings:
        if (self.augmenter is None) == (self.augmenters is None):
            raise ValueError("give `augmenter` (with `args`) or `augmenters` (a list), not both or neither")
        if self.augmenters is not None and not self.augmenters:
            raise ValueError("augmenters: give at least one")
        if self.augmenters is not None and self.args:
            raise ValueError("args: goes with `augmenter`; give each of `augmenters` its own args")
        return self

    def specs(self) -> list[AugmenterSpec]:
        return self.augmenters or [AugmenterSpec(augmenter=self.augmenter or "", args=self.args)]


class NlpaugAugment(_Augment):
    """Augments training text with nlpaug augmenters (character noise, word operations, spelling, local models)."""

    Settings = NlpaugSettings
    name = "nlpaug"
    salt = 4

    def __init__(self, settings: NlpaugSettings):
        super().__init__(settings)
        self.augmenters: list[Any] = []

    def prepare(self, state: Any) -> None:
        if state.task_def.text_is_words:
            raise self.error("augmenter", f"task {state.task}'s texts are word lists with one label per word; nlpaug "
                             "augmenters change words and their number (use synonym or code_switch, which keep it)")
        try:
            from nlpaug.base_augmenter import Augmenter
        except ImportError:
            raise self.error("augmenter", "nlpaug is not installed (pip install 'polydistill[nlpaug]')") from None
        self.augmenters = []
        for i, spec in enumerate(self.settings.specs()):
            where = "augmenter" if self.settings.augmenters is None else f"augmenters[{i}]"
            cls = _load_class(spec.augmenter, where, self.name)
            if not (isinstance(cls, type) and issubclass(cls, Augmenter)):
                raise self.error(where, f"{spec.augmenter} is not an nlpaug augmenter class")
            _refuse_downloads(cls.__name__, spec.args, where, self.name, state)
            with _offline():
                try:
                    self.augmenters.append(cls(**spec.args))
                except Exception as exc:  # nlpaug raises plain exceptions for bad arguments
                    raise self.error(where, f"{cls.__name__}({_show_args(spec.args)}) failed: {type(exc).__name__}: {exc}") from None

    def augment_texts(self, texts: list[Any], langs: list[str], side: str, generator: torch.Generator, state: Any) -> list[Any]:
        seeds = torch.randint(0, 2**31 - 1, (len(texts),), generator=generator).tolist()
        out = []
        for text, seed in zip(texts, seeds):
            with _seeded(seed):
                for aug in self.augmenters:
                    result = aug.augment(text)
                    text = result[0] if isinstance(result, list) and result else (result if isinstance(result, str) else text)
            out.append(text)
        return out


def _load_class(path: str, where: str, plugin: str) -> Any:
    short = path.split(".")[0] in ("char", "word", "sentence", "audio", "spectrogram")
    full = f"nlpaug.augmenter.{path}" if short else path
    module, _, name = full.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        raise ConfigError(f"plugins.{plugin}.{where}: no class {path!r} (e.g. nlpaug.augmenter.char.KeyboardAug, "
                          "nlpaug.augmenter.word.RandomWordAug)") from None


def _refuse_downloads(cls: str, args: dict[str, Any], where: str, plugin: str, state: Any) -> None:
    for option in PATH_OPTIONS:
        value = args.get(option)
        if isinstance(value, str) and not Path(state.config.resolve_path(value)).expanduser().exists():
            raise ConfigError(f"plugins.{plugin}.{where}.args.{option}: {value!r} is not a local path; polydistill never lets "
                              f"an augmenter download, so give {option} as a folder or file on this machine")
    if cls in NLTK_SOURCES:
        option, source = NLTK_SOURCES[cls]
        if option is None or args.get(option, source) == source:
            import nltk

            try:
                nltk.data.find(f"corpora/{source}")
            except LookupError:
                raise ConfigError(f"plugins.{plugin}.{where}: {cls} reads nltk's {source} data, which is not installed and "
                                  "would be downloaded; install it locally (nltk.data.path), or use polydistill's `synonym` "
                                  "plugin, which reads WordNet's own files") from None


def _show_args(args: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in args.items())


@contextlib.contextmanager
def _offline() -> Iterator[None]:
    """Hugging Face loads inside nlpaug read local files only while an augmenter is built."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update({k: "1" for k in saved})
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Python's and NumPy's global generators seeded for one text, then put back as they were."""
    py, npy = random.getstate(), np.random.get_state()
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        random.setstate(py)
        np.random.set_state(npy)
