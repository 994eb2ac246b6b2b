"""The student's own vocabulary: trim, extend or replace its tokenizer, and initialise the new token rows.

Reading order: :func:`build_tokenizer` (the training text, then the new tokenizer
and which old token each new one is), :func:`build_vocabulary` (that, plus the
student's embedding rows), :func:`coverage` (tokens per word, ``[UNK]`` rate and
vocabulary share per language). Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import random
import unicodedata
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import nn

from polydistill.config import Config, VocabularyConfig
from polydistill.errors import ConfigError, DataError
from polydistill.tasks import get_task

#: Blocks too large to transliterate whole (CJK ideographs, Hangul syllables, Yi): only the characters seen are mapped.
_LARGE_BLOCKS = [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xA000, 0xA4CF), (0xAC00, 0xD7AF), (0xF900, 0xFAFF), (0x20000, 0x3FFFF)]
#: Ideographs stand for one syllable each: their Latin spelling becomes a word of its own, as BERT splits them.
_IDEOGRAPHS = [(0x3400, 0x4DBF), (0x4E00, 0x9FFF), (0xF900, 0xFAFF), (0x20000, 0x3FFFF)]
_METASPACE = "\u2581"
DEFAULT_SIZE = {"new": 16000, "extend": 8000}


def active(vc: VocabularyConfig) -> bool:
    """Whether the vocabulary section changes the student's tokenizer at all."""
    return vc.method != "keep" or vc.transliterate != "none"


# --------------------------------------------------------------------------- the training text


@dataclass
class Corpus:
    """The sampled training rows a vocabulary is built from (student side, and the teachers' side in parallel mode)."""

    texts: list[Any]
    langs: list[str]
    sources: list[Any] | None
    words: bool  # token classification: each text is a list of words

    def strings(self, which: Iterable[Any] | None = None) -> list[str]:
        items = self.texts if which is None else which
        return [" ".join(t) if self.words else t for t in items]

    def by_language(self) -> dict[str, list[int]]:
        groups: dict[str, list[int]] = defaultdict(list)
        for i, lang in enumerate(self.langs):
            groups[lang].append(i)
        return dict(sorted(groups.items()))


def read_corpus(dataset: Any, config: Config, seed: int) -> Corpus:
    """Up to ``sample`` rows per language of ``dataset`` (normalised columns), sampled with ``seed``."""
    vc = config.student.vocabulary
    words = get_task(config.task).text_is_words
    parallel = config.mode == "parallel"

    def text_of(text: Any, row: Any) -> Any:  # a question-answering row's words are also its context's
        return f"{text} {row['context']}" if get_task(config.task).reads_context else text

    if hasattr(dataset, "__len__"):
        texts, langs = list(dataset["text"]), list(dataset["lang"])
        if get_task(config.task).reads_context:
            texts = [text_of(t, {"context": c}) for t, c in zip(texts, dataset["context"])]
        sources = list(dataset["source"]) if parallel else None
    else:  # streamed: at most `sample` per language from the first 20x`sample` rows
        texts, langs, sources = [], [], [] if parallel else None
        for n, row in enumerate(dataset):
            if n >= 20 * (vc.sample or 1000):
                break
            texts.append(text_of(row["text"], row))
            langs.append(row["lang"])
            if sources is not None:
                sources.append(row["source"])
    groups: dict[str, list[int]] = defaultdict(list)
    for i, lang in enumerate(langs):
        groups[lang].append(i)
    if vc.languages:
        missing = [l for l in vc.languages if l not in groups]
        if missing:
            raise DataError(f"student.vocabulary.languages: no training rows in {missing}; the training data has {sorted(groups)}")
        groups = {l: groups[l] for l in vc.languages}
    rng = random.Random(seed)
    keep: list[int] = []
    for lang in sorted(groups):
        idx = groups[lang]
        keep += sorted(rng.sample(idx, vc.sample)) if vc.sample and len(idx) > vc.sample else idx
    keep.sort()
    if not keep:
        raise DataError("student.vocabulary: the training data has no rows to learn a vocabulary from")
    return Corpus([texts[i] for i in keep], [langs[i] for i in keep], [sources[i] for i in keep] if sources is not None else None, words)


# --------------------------------------------------------------------------- tokenizer JSON


def _spec(tokenizer: Any) -> dict[str, Any]:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec["truncation"] = spec["padding"] = None  # per-call settings, not part of the tokenizer
    return spec


def _backend(spec: dict[str, Any]) -> Any:
    from tokenizers import Tokenizer

    return Tokenizer.from_str(json.dumps(spec))


def _kind(spec: dict[str, Any]) -> str:
    kind = spec["model"]["type"]
    if kind not in ("WordPiece", "Unigram", "BPE"):
        raise ConfigError(f"student.vocabulary: the student's tokenizer model {kind!r} is not supported (WordPiece, Unigram, BPE are)")
    return kind


def _vocab_list(spec: dict[str, Any]) -> list[str]:
    """Tokens of the model in id order."""
    model = spec["model"]
    if model["type"] == "Unigram":
        return [piece for piece, _ in model["vocab"]]
    vocab = model["vocab"]
    out = [""] * (max(vocab.values()) + 1)
    for token, i in vocab.items():
        out[i] = token
    return out


def _walk(node: Any) -> Iterable[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _marker(spec: dict[str, Any]) -> tuple[str, str]:
    """How a token says where it sits in a word: ("prefix", "##") for WordPiece continuations,
    ("initial", "▁") for SentencePiece-style word starts, ("none", "") otherwise."""
    if spec["model"]["type"] == "WordPiece":
        return "prefix", spec["model"].get("continuing_subword_prefix") or "##"
    for node in _walk([spec.get("pre_tokenizer"), spec.get("normalizer")]):
        if node.get("type") == "Metaspace":
            return "initial", node.get("replacement", _METASPACE)
        if node.get("type") == "Prepend":
            return "initial", node.get("prepend", _METASPACE)
    if spec["model"].get("continuing_subword_prefix"):
        return "prefix", spec["model"]["continuing_subword_prefix"]
    return "none", ""


def _surface(token: str, marker: tuple[str, str]) -> tuple[str, bool]:
    """(the text a token stands for, whether it starts a word)."""
    how, mark = marker
    if how == "prefix":
        return (token[len(mark):], False) if token.startswith(mark) and len(token) > len(mark) else (token, True)
    if how == "initial":
        return (token[len(mark):], True) if token.startswith(mark) else (token, False)
    return token, True


def _reindex(spec: dict[str, Any], tokens: list[str], scores: dict[str, float] | None = None) -> dict[str, Any]:
    """``spec`` with the model's vocabulary replaced by ``tokens`` (new id = position) and every id that names a token updated."""
    spec = json.loads(json.dumps(spec))
    new_id = {t: i for i, t in enumerate(tokens)}
    model = spec["model"]
    if model["type"] == "Unigram":
        old_scores = dict((p, s) for p, s in model["vocab"])
        scores = {**old_scores, **(scores or {})}
        unk = _vocab_list({"model": model})[model["unk_id"]] if model.get("unk_id") is not None else None
        model["vocab"] = [[t, scores.get(t, 0.0)] for t in tokens]
        model["unk_id"] = new_id[unk] if unk is not None else None
    else:
        model["vocab"] = new_id
    for added in spec.get("added_tokens") or []:
        if added["content"] not in new_id:
            raise ConfigError(f"student.vocabulary: special token {added['content']!r} would be lost")
        added["id"] = new_id[added["content"]]
    for node in _walk(spec.get("post_processor")):
        for value in (node.get("special_tokens") or {}).values():
            if isinstance(value, dict) and "tokens" in value:
                value["ids"] = [new_id[t] for t in value["tokens"]]
        for key in ("sep", "cls"):
            if isinstance(node.get(key), list) and len(node[key]) == 2 and node[key][0] in new_id:
                node[key][1] = new_id[node[key][0]]
    return spec


def _wrap(spec: dict[str, Any], like: Any) -> Any:
    """A transformers fast tokenizer around ``spec`` with ``like``'s special tokens, length and input names."""
    from transformers import PreTrainedTokenizerFast

    kwargs = {k: str(getattr(like, k)) for k in ("unk_token", "cls_token", "sep_token", "pad_token", "mask_token", "bos_token", "eos_token")
              if getattr(like, k, None) is not None}
    return PreTrainedTokenizerFast(
        tokenizer_object=_backend(spec), model_max_length=like.model_max_length, padding_side=like.padding_side,
        model_input_names=list(like.model_input_names), **kwargs,
    )


def _specials(tokenizer: Any) -> list[str]:
    """The tokenizer's special tokens in id order."""
    tokens = {str(t) for t in tokenizer.all_special_tokens}
    return sorted(tokens, key=lambda t: tokenizer.convert_tokens_to_ids(t))


# --------------------------------------------------------------------------- transliteration


def _in(code: int, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= code <= hi for lo, hi in ranges)


def transliteration_rules(texts: Iterable[str]) -> list[tuple[str, str]]:
    """(character, Latin spelling) for every character anyascii changes, over the blocks of the characters in ``texts``."""
    try:
        from anyascii import anyascii
    except ImportError:
        raise ConfigError("student.vocabulary.transliterate: needs the anyascii package (pip install anyascii)") from None
    seen = {c for t in texts for c in t if ord(c) > 127}
    codes: set[int] = set()
    for c in seen:
        code = ord(c)
        if _in(code, _LARGE_BLOCKS):
            codes.add(code)
        else:
            codes.update(range(code & ~0x7F, (code & ~0x7F) + 0x80))
    rules = []
    for code in sorted(codes):
        c = chr(code)
        if unicodedata.category(c) in ("Cn", "Cs", "Co"):  # unassigned, surrogate, private use
            continue
        latin = anyascii(c)
        if latin != c:
            rules.append((c, f" {latin} " if _in(code, _IDEOGRAPHS) else latin))
    return rules


def _with_transliteration(spec: dict[str, Any], rules: list[tuple[str, str]]) -> dict[str, Any]:
    spec = json.loads(json.dumps(spec))
    replace = [{"type": "Replace", "pattern": {"String": c}, "content": latin} for c, latin in rules]
    old = spec.get("normalizer")
    spec["normalizer"] = {"type": "Sequence", "normalizers": replace + ([old] if old else [])}
    return spec


# --------------------------------------------------------------------------- building the tokenizer


@dataclass
class Plan:
    """A new student tokenizer and, per new id, the old id of the same token (None: a new token)."""

    tokenizer: Any
    old_tokenizer: Any
    old_ids: list[int | None]
    corpus: Corpus
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def new_tokens(self) -> list[int]:
        return [i for i, j in enumerate(self.old_ids) if j is None]


def _count(tokenizer: Any, texts: list[Any], words: bool) -> Counter:
    counts: Counter = Counter()
    for start in range(0, len(texts), 2048):
        part = list(texts[start : start + 2048])
        for ids in tokenizer(part, is_split_into_words=words, add_special_tokens=False)["input_ids"]:
            counts.update(ids)
    return counts


def _trim(spec: dict[str, Any], counts: Counter, vc: VocabularyConfig, specials: list[str]) -> tuple[dict[str, Any], int]:
    """Keep used tokens, specials, ``vc.keep`` and (``keep_characters``) single characters, in the old id order."""
    tokens = _vocab_list(spec)
    kind = spec["model"]["type"]
    if kind == "BPE":
        raise ConfigError("student.vocabulary: method 'trim' (or trim_unused) is not supported for BPE tokenizers; use method 'new'")
    marker = _marker(spec)
    unknown_keep = [t for t in vc.keep if t not in set(tokens)]
    if unknown_keep:
        raise ConfigError(f"student.vocabulary.keep: {unknown_keep[:5]} are not tokens of the student's tokenizer")
    wanted = set(specials) | set(vc.keep) | {tokens[i] for i in counts}
    if kind == "Unigram" and spec["model"].get("unk_id") is not None:
        wanted.add(tokens[spec["model"]["unk_id"]])
    if kind == "WordPiece":
        wanted.add(spec["model"]["unk_token"])
    if vc.keep_characters:
        wanted |= {t for t in tokens if len(_surface(t, marker)[0]) <= 1}
    kept = [t for t in tokens if t in wanted]
    return _reindex(spec, kept), len(tokens) - len(kept)


def _word_splitter(spec: dict[str, Any]) -> tuple[Any, Any]:
    """(the old way of cutting text into words, the same with "▁" before every word): new vocabularies learn where words start from the mark."""
    from tokenizers import pre_tokenizers as P

    old = _backend(spec).pre_tokenizer if spec.get("pre_tokenizer") else None
    if _marker(spec)[0] == "initial" and old is not None:
        return old, old
    base = old if old is not None else P.Sequence([P.WhitespaceSplit(), P.Punctuation(behavior="isolated")])
    return base, P.Sequence([base, P.Metaspace(replacement=_METASPACE, prepend_scheme="always")])


def _train(spec: dict[str, Any], texts: list[str], kind: str, size: int, vc: VocabularyConfig, specials: list[str], unk: str) -> dict[str, Any]:
    """The JSON of a ``kind`` tokenizer of at most ``size`` tokens trained on ``texts``, with ``spec``'s normalizer.

    Determinism: tokenizers' WordPiece trainer (and its BPE trainer with a continuation
    prefix) assigns tokens in hash order, so WordPiece is learned as word-start-marked
    BPE, which is deterministic, and converted; Unigram's equal scores are put in a fixed order.
    """
    from tokenizers import Tokenizer, decoders, models, trainers

    words, marked = _word_splitter(spec)
    if kind == "unigram":
        tok = Tokenizer(models.Unigram())
        trainer = trainers.UnigramTrainer(vocab_size=size, special_tokens=specials, unk_token=unk, show_progress=False)
    else:
        tok = Tokenizer(models.BPE(unk_token=unk))
        trainer = trainers.BpeTrainer(vocab_size=size, min_frequency=vc.min_frequency, special_tokens=specials, show_progress=False)
    if spec.get("normalizer"):
        tok.normalizer = _backend(spec).normalizer
    tok.pre_tokenizer = marked
    tok.decoder = decoders.Metaspace(replacement=_METASPACE, prepend_scheme="always")
    tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
    out = json.loads(tok.to_str())
    if kind == "unigram":
        pieces = out["model"]["vocab"]
        head = [p for p in pieces if p[0] in specials]
        rest = sorted(([p[0], round(p[1], 6)] for p in pieces if p[0] not in specials), key=lambda p: (-p[1], p[0]))
        # The trainer appends the characters it must keep with scores 1e-4 apart, in hash order: give them those
        # scores by code point instead.
        chars = [p for p in rest if len(p[0]) == 1]
        i = len(chars) - 1
        while i > 0 and abs(chars[i - 1][1] - chars[i][1] - 1e-4) < 1e-6:
            i -= 1
        for piece, c in zip(chars[i:], sorted(p[0] for p in chars[i:])):
            piece[0] = c
        rest.sort(key=lambda p: (-p[1], p[0]))
        out["model"]["vocab"] = head + rest
        out["model"]["unk_id"] = [p[0] for p in out["model"]["vocab"]].index(unk)
    elif kind == "wordpiece":
        tokens = _vocab_list(out)
        chars = sorted({c for t in tokens if t not in specials for c in t.replace(_METASPACE, "")})
        vocab = list(specials) + [f for c in chars for f in (c, "##" + c)]
        for t in tokens:
            if t in specials or t == _METASPACE:
                continue
            vocab.append(t[1:] if t.startswith(_METASPACE) else "##" + t)
        vocab = list(dict.fromkeys(vocab))
        vocab = vocab[: max(size, len(specials) + 2 * len(chars))]  # the alphabet always stays, so no word becomes [UNK]
        # Words of unsegmented scripts (Thai, Khmer) run long; the usual limit of 100 characters makes them [UNK].
        longest = spec["model"].get("max_input_chars_per_word") or 100
        wp = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token=unk, continuing_subword_prefix="##",
                                        max_input_chars_per_word=max(longest, 400)))
        wp.normalizer = tok.normalizer
        wp.pre_tokenizer = words
        wp.decoder = decoders.WordPiece(prefix="##")
        out = json.loads(wp.to_str())
    if _marker(spec)[0] == "initial" and kind != "wordpiece" and spec.get("decoder"):
        out["decoder"] = spec["decoder"]
    out["added_tokens"] = [a for a in out.get("added_tokens") or [] if a["content"] in specials]
    return out


def _model_kind(spec: dict[str, Any]) -> str:
    return {"WordPiece": "wordpiece", "Unigram": "unigram", "BPE": "bpe"}[_kind(spec)]


def _extend(spec: dict[str, Any], texts: list[str], vc: VocabularyConfig, specials: list[str], unk: str) -> tuple[dict[str, Any], int]:
    """``spec`` with up to ``size`` of the most frequent tokens a tokenizer trained on ``texts`` has and ``spec`` lacks."""
    kind = _model_kind(spec)
    if kind == "bpe":
        raise ConfigError("student.vocabulary: method 'extend' is not supported for BPE tokenizers (their merges have an order); use method 'new'")
    size = vc.size or DEFAULT_SIZE["extend"]
    old = _vocab_list(spec)
    known = set(old)
    train_size = 2 * size + 1000
    for _ in range(3):  # until enough unknown tokens are learned, or the text has no more
        trained = _train(spec, texts, kind, train_size, vc, specials, unk)
        learned = _vocab_list(trained)
        fresh = [t for t in learned if t not in known]
        if len(fresh) >= size or len(learned) < train_size:
            break
        train_size *= 2
    fresh = fresh[:size]
    scores = None
    if kind == "unigram":
        trained_scores = dict((p, s) for p, s in trained["model"]["vocab"])
        old_scores = sorted(s for _, s in spec["model"]["vocab"])
        new_scores = sorted(trained_scores.values())
        shift = old_scores[len(old_scores) // 2] - new_scores[len(new_scores) // 2]  # the models' scores on one scale
        scores = {t: trained_scores[t] + shift for t in fresh}
    return _reindex(spec, old + fresh, scores), len(fresh)


def _new(spec: dict[str, Any], texts: list[str], vc: VocabularyConfig, specials: list[str], unk: str) -> dict[str, Any]:
    out = _train(spec, texts, vc.model, vc.size or DEFAULT_SIZE["new"], vc, specials, unk)
    # The old post-processor ([CLS] ... [SEP] and its kin) with the new ids of its tokens.
    out["post_processor"] = spec.get("post_processor")
    out["truncation"] = out["padding"] = None
    return _reindex(out, _vocab_list(out))


def build_tokenizer(config: Config, tokenizer: Any, dataset: Any, seed: int | None = None) -> Plan:
    """The student's new tokenizer as ``config.student.vocabulary`` says, learned from ``dataset`` (training rows)."""
    vc = config.student.vocabulary
    seed = vc.seed if vc.seed is not None else (seed if seed is not None else config.training.seed)
    corpus = read_corpus(dataset, config, seed)
    spec = _spec(tokenizer)
    kind = _kind(spec)
    specials = _specials(tokenizer)
    unk = str(tokenizer.unk_token) if tokenizer.unk_token is not None else "[UNK]"
    info: dict[str, Any] = {"method": vc.method, "old_size": len(tokenizer), "rows": len(corpus.texts),
                            "languages": {l: len(i) for l, i in corpus.by_language().items()}}
    learn_from = corpus.strings()
    if vc.method == "new" and vc.include_source and corpus.sources is not None:
        learn_from = learn_from + corpus.strings(corpus.sources)
    learn_from = list(dict.fromkeys(learn_from))  # a sentence counts once (parallel data repeats its source per language)
    if vc.transliterate == "anyascii":
        rules = transliteration_rules(learn_from)
        spec = _with_transliteration(spec, rules)
        info["transliterated_characters"] = len(rules)
    if vc.method == "trim":
        spec, info["removed"] = _trim(spec, _count(_wrap(spec, tokenizer), corpus.texts, corpus.words), vc, specials)
    elif vc.method == "extend":
        spec, info["added"] = _extend(spec, learn_from, vc, specials, unk)
        if vc.trim_unused:
            spec, info["removed"] = _trim(spec, _count(_wrap(spec, tokenizer), corpus.texts, corpus.words), vc, specials)
    elif vc.method == "new":
        spec = _new(spec, learn_from, vc, specials, unk)
        info["model"] = vc.model
    new_tok = _wrap(spec, tokenizer)
    old_ids = _match(spec, _spec(tokenizer), kind)
    info.update(new_size=len(new_tok), kept_rows=sum(i is not None for i in old_ids), new_rows=sum(i is None for i in old_ids))
    return Plan(new_tok, tokenizer, old_ids, corpus, info)


def _match(new: dict[str, Any], old: dict[str, Any], old_kind: str) -> list[int | None]:
    """Per new id, the old id of the same token: the same string under the same model, else the same text at the same place in a word."""
    new_tokens, old_tokens = _vocab_list(new), _vocab_list(old)
    exact = {t: i for i, t in enumerate(old_tokens)}
    specials = {a["content"]: a["id"] for a in old.get("added_tokens") or []}
    same_model = new["model"]["type"] == old_kind and _marker(new) == _marker(old)
    old_marker, new_marker = _marker(old), _marker(new)
    by_surface: dict[tuple[str, bool], int] = {}
    for i, t in enumerate(old_tokens):
        by_surface.setdefault(_surface(t, old_marker), i)
    out: list[int | None] = []
    for t in new_tokens:
        if t in specials:
            out.append(specials[t])
        elif same_model:
            out.append(exact.get(t))
        else:
            out.append(by_surface.get(_surface(t, new_marker)))
    return out


# --------------------------------------------------------------------------- embedding rows


def _fvt_pieces(plan: Plan) -> dict[int, list[int]]:
    """Per new token, the old tokenizer's pieces of its text (FVT, Gee et al. 2022)."""
    old_spec, new_spec = _spec(plan.old_tokenizer), _spec(plan.tokenizer)
    old_model = plan.old_tokenizer.backend_tokenizer.model
    old_marker, new_marker = _marker(old_spec), _marker(new_spec)
    old_vocab = plan.old_tokenizer.get_vocab()
    unk = plan.old_tokenizer.unk_token_id
    new_tokens = _vocab_list(new_spec)
    out: dict[int, list[int]] = {}
    for i in plan.new_tokens:
        text, initial = _surface(new_tokens[i], new_marker)
        if not text:
            out[i] = []
            continue
        how, mark = old_marker
        query = mark + text if how == "initial" and initial else text
        ids = [t.id for t in old_model.tokenize(query)]
        if how == "prefix" and not initial and ids:
            first = old_model.id_to_token(ids[0])
            ids[0] = old_vocab.get(mark + first, ids[0])
        if not ids or ids == [unk]:  # a word piece with a character the old vocabulary lacks: its known characters
            ids = [old_vocab[c] for c in text if c in old_vocab] or [old_vocab[mark + c] for c in text if mark + c in old_vocab]
        out[i] = [j for j in ids if j != unk]
    return out


def ibm_model1(pairs: list[tuple[list[int], list[int]]], target_size: int, iterations: int = 5) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """IBM Model 1 t(source | target) by EM over ``pairs`` of (target ids, source ids); target id ``target_size`` is NULL.

    Returns the (target, source) index pairs and their probabilities, one per co-occurring pair.
    """
    keys, groups = [], []
    group = 0
    for tgt, src in pairs:
        if not tgt or not src:
            continue
        t = torch.tensor(list(tgt) + [target_size], dtype=torch.long)
        s = torch.tensor(src, dtype=torch.long)
        # one row per (source position, target position incl. NULL)
        keys.append((t.unsqueeze(0) * (1 << 32) + s.unsqueeze(1)).reshape(-1))
        groups.append(torch.arange(group, group + len(s)).repeat_interleave(len(t)))
        group += len(s)
    if not keys:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty, torch.empty(0)
    key = torch.cat(keys)
    g = torch.cat(groups)
    unique, inverse = torch.unique(key, return_inverse=True)
    tgt_of = unique >> 32
    src_of = unique & ((1 << 32) - 1)
    _, tgt_index = torch.unique(tgt_of, return_inverse=True)
    prob = torch.ones(len(unique), dtype=torch.float64)
    for _ in range(iterations):
        p = prob[inverse]
        denom = torch.zeros(group, dtype=torch.float64).index_add_(0, g, p)
        share = p / denom[g]
        counts = torch.zeros(len(unique), dtype=torch.float64).index_add_(0, inverse, share)
        totals = torch.zeros(int(tgt_index.max()) + 1, dtype=torch.float64).index_add_(0, tgt_index, counts)
        prob = counts / totals[tgt_index]
    return tgt_of, src_of, prob


def _aligned_rows(plan: Plan, vc: VocabularyConfig, weight: torch.Tensor) -> tuple[dict[int, torch.Tensor], dict[str, Any]]:
    """Rows of new tokens from the parallel pairs: sum of t(s|x)·E[s] over the top-k source tokens s."""
    corpus = plan.corpus
    if corpus.sources is None:
        return {}, {"aligned": 0}
    pairs_text = [(t, s) for t, s in zip(corpus.texts, corpus.sources) if t != s]
    if not pairs_text:
        return {}, {"aligned": 0, "pairs": 0}
    words = corpus.words
    tgt_ids = plan.tokenizer([t for t, _ in pairs_text], is_split_into_words=words, add_special_tokens=False)["input_ids"]
    src_ids = plan.old_tokenizer([s for _, s in pairs_text], is_split_into_words=words, add_special_tokens=False)["input_ids"]
    special_old = set(plan.old_tokenizer.all_special_ids)
    pairs = [(t, [j for j in s if j not in special_old]) for t, s in zip(tgt_ids, src_ids)]
    size = len(plan.tokenizer)
    occurrences = Counter(i for t, _ in pairs for i in set(t))
    tgt_of, src_of, prob = ibm_model1(pairs, size)
    wanted = {i for i in plan.new_tokens if occurrences[i] >= vc.min_alignments}
    by_target: dict[int, list[tuple[float, int]]] = defaultdict(list)
    for t, s, p in zip(tgt_of.tolist(), src_of.tolist(), prob.tolist()):
        if t in wanted:
            by_target[t].append((p, s))
    rows = {}
    for t, cands in by_target.items():
        top = sorted(cands, key=lambda c: (-c[0], c[1]))[: vc.top_k]
        w = torch.tensor([p for p, _ in top], dtype=torch.float64)
        w = (w / w.sum()).to(weight.dtype)
        rows[t] = (w.unsqueeze(1) * weight[[s for _, s in top]]).sum(0)
    return rows, {"aligned": len(rows), "pairs": len(pairs)}


def init_method(config: Config) -> str:
    """``student.vocabulary.init`` with ``auto`` resolved: aligned rows where the run has parallel pairs."""
    init = config.student.vocabulary.init
    return ("parallel" if config.mode == "parallel" else "fvt") if init == "auto" else init


def initial_rows(plan: Plan, weight: torch.Tensor, vc: VocabularyConfig, std: float, seed: int,
                 init: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """The embedding matrix of the new vocabulary: kept tokens' old rows, new tokens' rows by ``init``."""
    weight = weight.detach().float().cpu()
    new = torch.empty(len(plan.old_ids), weight.size(1))
    gen = torch.Generator().manual_seed(seed)
    new.normal_(0.0, std, generator=gen)
    kept = [(i, j) for i, j in enumerate(plan.old_ids) if j is not None and j < len(weight)]
    if kept:
        new[[i for i, _ in kept]] = weight[[j for _, j in kept]]
    stats: dict[str, Any] = {"init": init, "random": 0, "fvt": 0}
    todo = [i for i in plan.new_tokens]
    if init == "parallel":
        rows, info = _aligned_rows(plan, vc, weight)
        stats.update(info)
        for i, row in rows.items():
            new[i] = row
        todo = [i for i in todo if i not in rows]
    if init in ("fvt", "parallel"):
        pieces = _fvt_pieces(plan)
        for i in todo:
            ids = [j for j in pieces.get(i, []) if j < len(weight)]
            if ids:
                new[i] = weight[ids].mean(0)
                stats["fvt"] += 1
            else:
                stats["random"] += 1
    else:
        stats["random"] = len(todo)
    return new.to(weight.dtype), stats


def apply_rows(model: nn.Module, rows: torch.Tensor, pad_token_id: int | None) -> None:
    """Give ``model`` the input embedding matrix ``rows`` (and the same rows to an output layer tied or not)."""
    old_in = model.get_input_embeddings()
    old_out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if old_out is not None and old_out.weight is not old_in.weight:
        raise ConfigError("student.vocabulary: the student has an untied output layer over the vocabulary; "
                          "remapping it is not supported")
    model.resize_token_embeddings(rows.size(0), mean_resizing=False)
    with torch.no_grad():
        model.get_input_embeddings().weight.copy_(rows.to(model.get_input_embeddings().weight.dtype))
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
        emb = model.get_input_embeddings()
        if getattr(emb, "padding_idx", None) is not None:
            emb.padding_idx = pad_token_id


# --------------------------------------------------------------------------- the whole step


@dataclass
class BuiltVocabulary:
    """The student's tokenizer after the vocabulary step, what was done, and the coverage before and after."""

    tokenizer: Any
    info: dict[str, Any]
    coverage: dict[str, dict[str, dict[str, float]]]
    #: Per new id, the old id whose row it kept (None: a new row).
    old_ids: list[int | None] = field(default_factory=list)

    def markdown(self) -> str:
        return coverage_table(self.coverage)

    def summary(self) -> str:
        i = self.info
        parts = [f"vocabulary: {i['method']}"]
        if i.get("transliterated_characters") is not None:
            parts.append(f"transliterated ({i['transliterated_characters']} characters)")
        parts.append(f"{i['old_size']} -> {i['new_size']} tokens ({i['kept_rows']} rows kept, {i['new_rows']} new")
        if i.get("init"):
            how = ", ".join(f"{k} {i[k]}" for k in ("aligned", "fvt", "random") if i.get(k))
            parts[-1] += f", init {i['init']}: {how or 'none needed'}"
        parts[-1] += ")"
        if i.get("parameters_before"):
            parts.append(f"student parameters {i['parameters_before']:,} -> {i['parameters_after']:,}")
        return "; ".join(parts)

    def save(self, directory: Path) -> None:
        from polydistill.checkpoint import dump_json, write_atomic

        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save_pretrained(directory / "tokenizer")
        dump_json(directory / "vocabulary.json", self.info)
        dump_json(directory / "coverage.json", self.coverage)
        write_atomic(directory / "coverage.md", self.summary() + "\n\n" + self.markdown() + "\n")


def build_vocabulary(config: Config, model: nn.Module | None, tokenizer: Any, dataset: Any,
                     eval_dataset: Any = None) -> BuiltVocabulary:
    """Build the student's vocabulary and, given ``model``, remap its embedding rows (in place)."""
    vc = config.student.vocabulary
    seed = vc.seed if vc.seed is not None else config.training.seed
    plan = build_tokenizer(config, tokenizer, dataset, seed)
    info = dict(plan.info)
    if model is not None:
        before = sum(p.numel() for p in model.parameters())
        weight = model.get_input_embeddings().weight
        std = float(getattr(model.config, "initializer_range", 0.02))
        rows, stats = initial_rows(plan, weight, vc, std, seed, init_method(config))
        apply_rows(model, rows, plan.tokenizer.pad_token_id)
        info.update(stats, parameters_before=before, parameters_after=sum(p.numel() for p in model.parameters()))
    cov = {"train": compare_coverage(plan.old_tokenizer, plan.tokenizer, plan.corpus)}
    if eval_dataset is not None and hasattr(eval_dataset, "__len__") and len(eval_dataset):
        held = Corpus(list(eval_dataset["text"]), list(eval_dataset["lang"]), None, plan.corpus.words)
        cov["eval"] = compare_coverage(plan.old_tokenizer, plan.tokenizer, held)
    return BuiltVocabulary(plan.tokenizer, info, cov, plan.old_ids)


# --------------------------------------------------------------------------- coverage


def coverage(tokenizer: Any, corpus: Corpus) -> dict[str, dict[str, float]]:
    """Per language (and ``all``): tokens per whitespace word, share of ``[UNK]`` tokens, share of the vocabulary used."""
    unk = tokenizer.unk_token_id
    size = len(tokenizer)
    out: dict[str, dict[str, float]] = {}
    everything: set[int] = set()
    totals = Counter()
    for lang, idx in corpus.by_language().items():
        texts = [corpus.texts[i] for i in idx]
        words = sum(len(t) if corpus.words else len(t.split()) for t in texts)
        counts = _count(tokenizer, texts, corpus.words)
        tokens = sum(counts.values())
        everything |= set(counts)
        totals.update(words=words, tokens=tokens, unk=counts.get(unk, 0))
        out[lang] = {"tokens_per_word": tokens / max(words, 1), "unk_rate": counts.get(unk, 0) / max(tokens, 1),
                     "vocab_used": len(counts) / size, "words": words}
    out["all"] = {"tokens_per_word": totals["tokens"] / max(totals["words"], 1), "unk_rate": totals["unk"] / max(totals["tokens"], 1),
                  "vocab_used": len(everything) / size, "words": totals["words"]}
    return out


def compare_coverage(before: Any, after: Any, corpus: Corpus) -> dict[str, dict[str, float]]:
    a, b = coverage(before, corpus), coverage(after, corpus)
    return {lang: {**{f"{k}_before": v for k, v in a[lang].items() if k != "words"},
                   **{f"{k}_after": v for k, v in b[lang].items() if k != "words"}, "words": a[lang]["words"]} for lang in a}


def coverage_table(cov: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = []
    for part, per in cov.items():
        title = "training text" if part == "train" else "evaluation text (held out)"
        lines += [f"Coverage of the {title}, before -> after:", "",
                  "| language | words | tokens/word | [UNK] tokens | vocabulary used |", "|---|---|---|---|---|"]
        for lang, m in per.items():
            lines.append(
                f"| {'**all**' if lang == 'all' else lang} | {int(m['words'])} | {m['tokens_per_word_before']:.2f} -> {m['tokens_per_word_after']:.2f} "
                f"| {m['unk_rate_before']:.1%} -> {m['unk_rate_after']:.1%} | {m['vocab_used_before']:.1%} -> {m['vocab_used_after']:.1%} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip()


def inspect(config: Config) -> BuiltVocabulary:
    """The vocabulary ``config`` builds (or, with none configured, the student's own) and its coverage, without a model or training."""
    from polydistill import models as M
    from polydistill.data import load_sources

    path, revision, role = M.student_tokenizer_source(config)
    tokenizer = M.load_tokenizer(path, role, revision)
    if not config.data.train:
        raise ConfigError("data.train: no training data to measure the vocabulary on")
    train = load_sources(config.data.train, config)
    held = load_sources(config.data.eval, config) if config.data.eval else None
    if active(config.student.vocabulary):
        return build_vocabulary(config, None, tokenizer, train, held)
    seed = config.training.seed
    corpus = read_corpus(train, config, seed)
    info = {"method": "keep", "old_size": len(tokenizer), "new_size": len(tokenizer), "kept_rows": len(tokenizer), "new_rows": 0,
            "rows": len(corpus.texts), "languages": {l: len(i) for l, i in corpus.by_language().items()}}
    cov = {"train": compare_coverage(tokenizer, tokenizer, corpus)}
    if held is not None and hasattr(held, "__len__"):
        cov["eval"] = compare_coverage(tokenizer, tokenizer, Corpus(list(held["text"]), list(held["lang"]), None, corpus.words))
    return BuiltVocabulary(tokenizer, info, cov, list(range(len(tokenizer))))
