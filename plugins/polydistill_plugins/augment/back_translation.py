"""Plugin ``back_translation``: round trips through a pivot language with local seq2seq models, cached on disk."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import warnings
import zlib
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

import polydistill
from polydistill import PluginSettings, hookimpl

from polydistill_plugins.augment.base import AugmentSettings, _Augment

class TranslationModel(PluginSettings):
    """One direction of the round trip."""

    model: str = Field(description="Hub id or local folder of a seq2seq translation model (AutoModelForSeq2SeqLM).")
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit).")
    prefix: str = Field("", description="Text put before every input, e.g. '>>de<< ' for multi-target Marian models.")
    src_lang: str | None = Field(None, description="Sets tokenizer.src_lang (mBART, NLLB, M2M100), e.g. 'eng_Latn'.")
    tgt_lang: str | None = Field(
        None, description="A token forced as the first generated token (forced_bos_token_id; mBART, NLLB, M2M100), e.g. 'deu_Latn'."
    )


class BackTranslationSettings(AugmentSettings):
    forward: TranslationModel = Field(description="The model translating the text into the pivot language.")
    backward: TranslationModel = Field(description="The model translating the pivot text back.")
    num_beams: int = Field(1, ge=1, description="Beam size of both generations (1: greedy or sampling).")
    max_new_tokens: int = Field(128, ge=1, description="Longest generated translation, in tokens.")
    max_input_tokens: int = Field(256, ge=1, description="Inputs are truncated to this many tokens.")
    do_sample: bool = Field(False, description="Sample instead of greedy/beam search (seeded from the run's seed).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (with do_sample).")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling (with do_sample).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling (with do_sample).")
    batch_size: int = Field(32, ge=1, description="Texts per generate() call.")
    cache: bool = Field(True, description="Keep back-translations on disk so that no text is translated twice.")
    cache_dir: str | None = Field(None, description="Cache folder; default ~/.cache/polydistill/back-translation.")


def _model_identity(spec: TranslationModel, path: str) -> dict[str, Any]:
    """What identifies a model's outputs: a local folder's files (name, size, mtime), else the hub id and revision."""
    ident: dict[str, Any] = {"model": spec.model, "revision": spec.revision, "prefix": spec.prefix,
                             "src_lang": spec.src_lang, "tgt_lang": spec.tgt_lang}
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file())
        ident["files"] = [(str(f.relative_to(p)), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    return ident


class BackTranslation(_Augment):
    """Paraphrase samples by a round trip through a pivot language."""

    Settings = BackTranslationSettings
    name = "back_translation"
    salt = 2

    def __init__(self, settings: BackTranslationSettings):
        super().__init__(settings)
        self.settings: BackTranslationSettings = settings
        self.counts.update(translated=0, cache_hits=0)
        self.models: dict[str, tuple[Any, Any]] = {}
        self.generate_calls = 0
        self.db: sqlite3.Connection | None = None
        self.db_path: Path | None = None
        self.prefix = ""
        self.memory: dict[str, str] = {}

    def prepare(self, state: Any) -> None:
        s = self.settings
        if state.task_def.text_is_words:
            raise self.error("side", "back-translation changes the words of a sentence, so the word labels of "
                             f"{state.task} would no longer align; use synonym or code_switch instead")
        if self.parallel and s.side == "both":
            raise self.error("side", "in mode 'parallel' the two columns are in different languages and one model pair "
                             "translates one of them; choose 'student' or 'teacher'")
        self.paths = {k: state.config.resolve_path(getattr(s, k).model) for k in ("forward", "backward")}
        generation = {k: getattr(s, k) for k in ("num_beams", "max_new_tokens", "max_input_tokens", "do_sample")}
        if s.do_sample:
            generation.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p, seed=state.config.training.seed)
        key = {
            "forward": _model_identity(s.forward, self.paths["forward"]),
            "backward": _model_identity(s.backward, self.paths["backward"]),
            "generation": generation,
        }
        self.prefix = hashlib.sha1(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
        if s.cache:
            directory = Path(s.cache_dir).expanduser() if s.cache_dir else Path.home() / ".cache" / "polydistill" / "back-translation"
            directory.mkdir(parents=True, exist_ok=True)
            self.db_path = directory / "back-translation.sqlite"
            self.db = sqlite3.connect(self.db_path, timeout=60, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("CREATE TABLE IF NOT EXISTS translations (key TEXT PRIMARY KEY, pivot TEXT, result TEXT, crc INTEGER)")
            if "crc" not in [row[1] for row in self.db.execute("PRAGMA table_info(translations)")]:
                try:  # a cache written before entries had checksums: its entries are read without one
                    self.db.execute("ALTER TABLE translations ADD COLUMN crc INTEGER")
                except sqlite3.OperationalError:  # another run sharing the folder added it first
                    pass
            self.db.commit()
            self.db.text_factory = bytes  # decoded by `stored`: a corrupt byte may leave a text that is not UTF-8

    @hookimpl
    def on_train_end(self, state: Any) -> None:
        if self.db is not None:
            self.db.close()
            self.db = None

    def key(self, text: str) -> str:
        return hashlib.sha1((self.prefix + text).encode("utf-8")).hexdigest()

    @staticmethod
    def checksum(key: str, pivot: str, result: str) -> int:
        """CRC-32 of an entry's key and texts, so a changed byte or an entry under another key is detected."""
        return zlib.crc32("\0".join((key, pivot, result)).encode("utf-8"))

    def stored(self, key: str, pivot: Any, result: Any, crc: Any) -> str:
        """A cache entry's result; ValueError saying why it cannot be used. Entries without a checksum (written
        before there were checksums) are used when their result is text."""
        try:
            pivot, result = (v.decode("utf-8") if isinstance(v, bytes) else v for v in (pivot, result))
        except UnicodeDecodeError:
            raise ValueError("not UTF-8 text") from None
        if not isinstance(result, str):
            raise ValueError("the result is not text")
        if crc is not None and (not isinstance(pivot, str) or self.checksum(key, pivot, result) != crc):
            raise ValueError("checksum mismatch")
        return result

    def load(self, which: str, device: Any) -> tuple[Any, Any]:
        """Load a model and its tokenizer on first use (a run served from the cache loads none)."""
        if which not in self.models:
            from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

            spec: TranslationModel = getattr(self.settings, which)
            try:
                tok = AutoTokenizer.from_pretrained(self.paths[which], revision=spec.revision)
                model = AutoModelForSeq2SeqLM.from_pretrained(self.paths[which], revision=spec.revision)
            except Exception as exc:
                raise self.error(f"{which}.model", f"cannot load {spec.model!r} as a seq2seq model with its tokenizer: "
                                 f"{type(exc).__name__}: {exc}") from None
            if spec.src_lang is not None:
                tok.src_lang = spec.src_lang
            if spec.tgt_lang is not None and tok.convert_tokens_to_ids(spec.tgt_lang) in (None, tok.unk_token_id):
                raise self.error(f"{which}.tgt_lang", f"{spec.tgt_lang!r} is not a token of {spec.model!r}")
            self.models[which] = (model.to(device).eval(), tok)
        return self.models[which]

    def generate(self, which: str, texts: list[str], seed: int, device: Any) -> list[str]:
        """Translate ``texts`` in batches of ``batch_size``; sampling is seeded, and the global RNG restored."""
        s = self.settings
        spec: TranslationModel = getattr(s, which)
        model, tok = self.load(which, device)
        kwargs: dict[str, Any] = {"num_beams": s.num_beams, "max_new_tokens": s.max_new_tokens, "do_sample": s.do_sample}
        if s.do_sample:
            kwargs.update(temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)
        if spec.tgt_lang is not None:
            kwargs["forced_bos_token_id"] = tok.convert_tokens_to_ids(spec.tgt_lang)
        out: list[str] = []
        devices = [device] if torch.device(device).type == "cuda" else []
        for start in range(0, len(texts), s.batch_size):
            chunk = [spec.prefix + t for t in texts[start : start + s.batch_size]]
            enc = tok(chunk, return_tensors="pt", padding=True, truncation=True, max_length=s.max_input_tokens)
            enc = {k: v.to(device) for k, v in enc.items() if k in ("input_ids", "attention_mask")}
            with torch.no_grad(), torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed + start)
                ids = model.generate(**enc, **kwargs)
            self.generate_calls += 1
            out.extend(t.strip() for t in tok.batch_decode(ids, skip_special_tokens=True))
        return out

    def round_trip(self, texts: list[str], seed: int, device: Any) -> dict[str, str]:
        """Back-translations of the distinct ``texts``, from the cache where possible."""
        wanted = list(dict.fromkeys(texts))
        found: dict[str, str] = {}
        if self.db is not None:
            keys = {self.key(t): t for t in wanted}
            items = list(keys)
            corrupt: list[str] = []
            for start in range(0, len(items), 500):
                part = items[start : start + 500]
                rows = self.db.execute(
                    f"SELECT key, pivot, result, crc FROM translations WHERE key IN ({','.join('?' * len(part))})", part
                ).fetchall()
                for k, pivot, result, crc in rows:
                    k = k.decode("ascii")  # a hex digest, matched by the query
                    try:
                        found[keys[k]] = self.stored(k, pivot, result, crc)
                    except ValueError as exc:
                        corrupt.append(k)
                        warnings.warn(f"back-translation cache {self.db_path}: corrupt entry {k[:12]} ({exc}); dropped, "
                                      "the text is translated again", polydistill.PolydistillWarning, stacklevel=2)
            if corrupt:
                self.db.executemany("DELETE FROM translations WHERE key = ?", [(k,) for k in corrupt])
                self.db.commit()
        self.counts["cache_hits"] += len(found)
        missing = [t for t in wanted if t not in found]
        if missing:
            pivot = self.generate("forward", missing, seed, device)
            back = self.generate("backward", pivot, seed + 1, device)
            self.counts["translated"] += len(missing)
            found.update(zip(missing, back))
            if self.db is not None:
                entries = [(self.key(t), p, b) for t, p, b in zip(missing, pivot, back)]
                self.db.executemany(
                    "INSERT OR REPLACE INTO translations (key, pivot, result, crc) VALUES (?, ?, ?, ?)",
                    [(k, p, b, self.checksum(k, p, b)) for k, p, b in entries],
                )
                self.db.commit()
        return found

    def augment_texts(self, texts: list[Any], langs: list[str], side: str, generator: torch.Generator, state: Any) -> list[Any]:
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=generator))
        strings = [t for t in texts if isinstance(t, str)]
        result = self.round_trip(strings, seed, state.device) if strings else {}
        # an empty translation (the model gave up) leaves the sample as it was
        return [(result.get(t) or t) if isinstance(t, str) else t for t in texts]
