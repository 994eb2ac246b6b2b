"""Plugin ``code_switch``: CoSDA-ML code-switching with bilingual dictionaries (Qin et al. 2020)."""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, field_validator

from polydistill_plugins.augment.base import _Augment, _WordSettings, language_code, read_word_table, replace_words


class CodeSwitchSettings(_WordSettings):
    dictionaries: dict[str, str] = Field(
        description="Target language -> bilingual dictionary file (MUSE style: one 'source_word target_word' pair "
        "per line, space- or tab-separated; a word may have several lines).",
    )
    dictionary_languages: list[str] = Field(
        ["en"], min_length=1, description="The language of the dictionaries' source words: only texts in a listed "
        "language are switched (tags compared by ISO 639-3 code). Default: English, as in MUSE's en-X dictionaries; "
        "list another language to switch its texts with these dictionaries on purpose.",
    )
    target_languages: list[str] | None = Field(
        None, description="Languages to switch into (keys of `dictionaries`); default all of them."
    )
    word_probability: float = Field(
        0.5, ge=0, le=1, description="Chance that each word found in a dictionary of a chosen sample is switched."
    )

    @field_validator("dictionaries")
    @classmethod
    def _not_empty(cls, value: dict[str, str]) -> dict[str, str]:
        if not value:
            raise ValueError("give at least one dictionary")
        return value


class CodeSwitch(_Augment):
    """CoSDA-ML code-switching: words replaced by dictionary translations into random other languages."""

    Settings = CodeSwitchSettings
    name = "code_switch"
    salt = 3
    resource_option = "dictionary_languages"
    resource_name = "dictionary"

    def __init__(self, settings: CodeSwitchSettings):
        super().__init__(settings)
        self.settings: CodeSwitchSettings = settings
        self.counts.update(words=0, skipped_rows=0)
        self.tables: dict[str, dict[str, list[str]]] = {}
        self.sources = {language_code(t) for t in settings.dictionary_languages}

    def serves(self, lang: str) -> bool:
        return language_code(lang) in self.sources

    def resource_note(self, lang: str) -> str:
        return (f"the dictionaries are from {self.settings.dictionary_languages} (dictionary_languages); add {lang!r} "
                "there to switch its texts with them on purpose")

    def prepare(self, state: Any) -> None:
        s = self.settings
        targets = s.target_languages if s.target_languages is not None else list(s.dictionaries)
        unknown = [t for t in targets if t not in s.dictionaries]
        if unknown:
            raise self.error("target_languages", f"{unknown} have no dictionary; `dictionaries` has {sorted(s.dictionaries)}")
        if not targets:
            raise self.error("target_languages", "give at least one language")
        self.tables = {
            lang: read_word_table(state.config.resolve_path(s.dictionaries[lang]), f"dictionaries.{lang}", self.name)
            for lang in targets
        }

    def lookup(self, word: str) -> list[list[str]]:
        return [table[word] for table in self.tables.values() if word in table]

    def augment_texts(self, texts: list[Any], langs: list[str], side: str, generator: torch.Generator, state: Any) -> list[Any]:
        out = []
        for text in texts:
            new, n = replace_words(text, self.lookup, self.settings.word_probability, generator, self.settings.min_words)
            self.counts["words"] += n
            out.append(new)
        return out
