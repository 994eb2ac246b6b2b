"""Text augmentation plugins: ``synonym``, ``back_translation`` and ``code_switch``.

All three change the raw text of some training samples in ``augment_batch``
and re-encode the batch with ``batch.replace_texts``, so the teachers read
(and the teacher-output cache is keyed by) the augmented text. They share
:class:`AugmentSettings`: a per-sample ``probability``, the ``side`` to change
(student text, teacher text, or both; in ``same`` mode the two are one text),
and a ``languages`` filter on the rows' language tags.

Language tags are compared by their ISO 639-3 code (:func:`language_code`:
``en``, ``eng``, ``en_US`` and ``eng_Latn`` are one language). ``synonym`` and
``code_switch`` change a text only when a resource serves its language (a
WordNet, or dictionaries from that language); other rows are left alone and
counted as ``NAME/skipped_rows``.

Randomness comes only from ``state.rng`` (seeded by the run's seed, the step
and the micro-batch), so a resumed run augments exactly as an uninterrupted
one; the global ``random``/numpy/torch generators are never used or advanced.

- ``synonym``: replaces words with WordNet synonyms (English, or another
  Open Multilingual Wordnet language) or with synonyms from a TSV table.
  WordNet is read with nltk's corpus reader from local files only (nltk's
  download functions are never called); see ``docs/plugins/synonym.md``.
- ``back_translation``: translates text into a pivot language and back with
  two Hugging Face seq2seq models; results are cached on disk, each entry
  with a checksum (a corrupt entry is dropped with a warning and recomputed).
- ``code_switch``: CoSDA-ML (Qin et al. 2020): replaces words with their
  translations from bilingual dictionaries into other languages.

Word replacement keeps a token-classification text's word count (each word
is replaced by exactly one word), so word labels stay aligned.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import re
import sqlite3
import warnings
import zlib
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field, field_validator

import polydistill
from polydistill import ConfigError, PluginSettings, hookimpl

Side = Literal["student", "teacher", "both"]

#: A word: letters, with inner apostrophes and hyphens ("don't", "self-driving" are one word each);
#: digits and "_" are not words.
WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")

#: Candidates for one word: groups of replacements (one group per language for code_switch).
Lookup = Callable[[str], Sequence[Sequence[str]]]

#: ISO 639-1 code -> ISO 639-3 code, for all 184 ISO 639-1 codes.
ISO_639_1 = dict(pair.split(":") for pair in (
    "aa:aar ab:abk ae:ave af:afr ak:aka am:amh an:arg ar:ara as:asm av:ava ay:aym az:aze ba:bak be:bel bg:bul "
    "bi:bis bm:bam bn:ben bo:bod br:bre bs:bos ca:cat ce:che ch:cha co:cos cr:cre cs:ces cu:chu cv:chv cy:cym "
    "da:dan de:deu dv:div dz:dzo ee:ewe el:ell en:eng eo:epo es:spa et:est eu:eus fa:fas ff:ful fi:fin fj:fij "
    "fo:fao fr:fra fy:fry ga:gle gd:gla gl:glg gn:grn gu:guj gv:glv ha:hau he:heb hi:hin ho:hmo hr:hrv ht:hat "
    "hu:hun hy:hye hz:her ia:ina id:ind ie:ile ig:ibo ii:iii ik:ipk io:ido is:isl it:ita iu:iku ja:jpn jv:jav "
    "ka:kat kg:kon ki:kik kj:kua kk:kaz kl:kal km:khm kn:kan ko:kor kr:kau ks:kas ku:kur kv:kom kw:cor ky:kir "
    "la:lat lb:ltz lg:lug li:lim ln:lin lo:lao lt:lit lu:lub lv:lav mg:mlg mh:mah mi:mri mk:mkd ml:mal mn:mon "
    "mr:mar ms:msa mt:mlt my:mya na:nau nb:nob nd:nde ne:nep ng:ndo nl:nld nn:nno no:nor nr:nbl nv:nav ny:nya "
    "oc:oci oj:oji om:orm or:ori os:oss pa:pan pi:pli pl:pol ps:pus pt:por qu:que rm:roh rn:run ro:ron ru:rus "
    "rw:kin sa:san sc:srd sd:snd se:sme sg:sag sh:hbs si:sin sk:slk sl:slv sm:smo sn:sna so:som sq:sqi sr:srp "
    "ss:ssw st:sot su:sun sv:swe sw:swa ta:tam te:tel tg:tgk th:tha ti:tir tk:tuk tl:tgl tn:tsn to:ton tr:tur "
    "ts:tso tt:tat tw:twi ty:tah ug:uig uk:ukr ur:urd uz:uzb ve:ven vi:vie vo:vol wa:wln wo:wol xh:xho yi:yid "
    "yo:yor za:zha zh:zho zu:zul "
    # withdrawn ISO 639-1 codes still found in locales (Java, Android)
    "iw:heb in:ind ji:yid jw:jav mo:ron"
).split())
#: ISO 639-2/B (bibliographic) codes that differ from ISO 639-3 (ger, fre, chi, ...).
ISO_639_2B = dict(pair.split(":") for pair in (
    "alb:sqi arm:hye baq:eus bur:mya chi:zho cze:ces dut:nld fre:fra geo:kat ger:deu gre:ell ice:isl mac:mkd "
    "mao:mri may:msa per:fas rum:ron slo:slk tib:bod wel:cym"
).split())


@functools.lru_cache(maxsize=4096)
def language_code(tag: Any) -> str:
    """The ISO 639-3 code of a language tag: its first subtag (before ``-``, ``_``, ``.`` or ``@``), lower case.

    Two-letter ISO 639-1 codes and ISO 639-2/B codes map to ISO 639-3
    (``de``, ``ger``, ``deu``, ``de_DE``, ``deu_Latn`` -> ``deu``); script
    and region subtags are ignored. Any other code is returned as it is
    (macrolanguages are not mapped to their members: ``ar`` is ``ara``, not
    ``arb``). An empty or missing tag is ``und``.
    """
    if not isinstance(tag, str) or not tag.strip():
        return "und"
    primary = re.split(r"[-_.@]", tag.strip(), maxsplit=1)[0].lower()
    if len(primary) == 2:
        return ISO_639_1.get(primary, primary)
    return ISO_639_2B.get(primary, primary)


class AugmentSettings(PluginSettings):
    """Options every augmentation plugin has."""

    probability: float = Field(0.5, ge=0, le=1, description="Chance that a training sample is augmented, drawn per sample and step.")
    side: Side = Field(
        "student",
        description="Which text to change: 'student', 'teacher' or 'both'. In mode 'same' teacher and student read one "
        "text, which 'student' and 'both' change ('teacher' is refused); in mode 'parallel' 'student' changes the "
        "target-language column (columns.text) and 'teacher' the source column.",
    )
    languages: list[str] | None = Field(
        None, description="Augment only rows whose language tag (columns.lang) names a listed language (tags are "
        "compared by ISO 639-3 code: en, eng and en_US are one language); default: every row.",
    )


class _Augment:
    """The common part: choosing samples, sides and languages; re-encoding; counting."""

    polydistill_api = polydistill.API_VERSION
    Settings = AugmentSettings
    #: Entry-point name, used in logs, errors and batch.meta.
    name = "augment"
    #: Distinguishes this plugin's random draws from another plugin's in the same step.
    salt = 0
    #: The option that says which languages the plugin's resources serve; None: every language is served.
    resource_option: str | None = None
    #: What a resource is called in messages.
    resource_name = "resource"

    def __init__(self, settings: AugmentSettings):
        self.settings = settings
        self.parallel = False
        self.counts: dict[str, int] = {"augmented": 0}
        self.wanted = None if settings.languages is None else {language_code(t) for t in settings.languages}
        self.warned: set[str] = set()

    def error(self, option: str, message: str) -> ConfigError:
        return ConfigError(f"plugins.{self.name}.{option}: {message}")

    # ---- what a subclass provides

    def prepare(self, state: Any) -> None:
        """Load resources (called from ``setup``); raise ``self.error`` for bad options."""

    def augment_texts(self, texts: list[Any], langs: list[str], side: str, generator: torch.Generator, state: Any) -> list[Any]:
        """Return the augmented version of each text (the same text when nothing changed)."""
        raise NotImplementedError

    def serves(self, lang: str) -> bool:
        """Whether a resource serves texts tagged ``lang``."""
        return True

    def resource_note(self, lang: str) -> str:
        """For messages: what resources there are, and how to apply one to ``lang`` on purpose."""
        return ""

    # ---- hooks

    @hookimpl
    def setup(self, state: Any) -> None:
        self.parallel = state.config.mode == "parallel"
        if not self.parallel and self.settings.side == "teacher":
            raise self.error(
                "side", "in mode 'same' the teacher and the student read one text; use 'student' (or 'both') to change it"
            )
        self.prepare(state)
        self.check_languages(state)

    def check_languages(self, state: Any) -> None:
        """Refuse, before any step, a configuration whose resources can never serve a text it is to change."""
        if self.resource_option is None:
            return
        s = self.settings
        sides = self.sides()
        if "teacher" in sides:
            lang = s.teacher_language
            if lang is None:
                raise self.error("teacher_language", f"side '{s.side}' changes the teachers' source column (columns.source), "
                                 "whose language the rows' tags do not give; set it, e.g. teacher_language: en")
            if not self.serves(lang):
                raise self.error("teacher_language", f"{self.missing(lang)}; {self.resource_note(lang)}")
        if "student" not in sides:
            return
        if s.languages is not None:
            unserved = [t for t in s.languages if not self.serves(t)]
            if len(unserved) == len(s.languages) and "teacher" not in sides:
                raise self.error("languages", f"{self.missing(unserved)}, so no row would ever be changed; "
                                 f"{self.resource_note(unserved[0])}")
            for t in unserved:
                self.warn_skipped(t, f"plugins.{self.name}.languages")
            return
        sources = state.config.data.train
        if sources and all(src.columns.lang is None for src in sources):  # every row's tag is known now
            tags = sorted({src.lang or "und" for src in sources})
            if not any(self.serves(t) for t in tags) and "teacher" not in sides:
                untagged = " (rows of a source without `lang` or `columns.lang` are tagged 'und')" if "und" in tags else ""
                raise self.error(self.resource_option, f"the training data's languages (data.train lang: {tags}){untagged}: "
                                 f"{self.missing(tags)}, so no row would ever be changed; {self.resource_note(tags[0])}")

    def missing(self, langs: str | list[str]) -> str:
        return f"no {self.resource_name} serves {langs!r}"

    def warn_skipped(self, lang: str, where: str) -> None:
        """Say once per tag that its rows are left alone (they are also counted in NAME/skipped_rows)."""
        if lang in self.warned:
            return
        self.warned.add(lang)
        warnings.warn(
            f"{where}: rows tagged {lang!r} are left alone: {self.missing(lang)} (counted in {self.name}/skipped_rows); "
            f"{self.resource_note(lang)}", polydistill.PolydistillWarning, stacklevel=3,
        )

    def text_language(self, side: str, tag: str) -> str:
        """The language of one side's text: the row's tag, or in mode 'parallel' ``teacher_language`` for the teacher."""
        if side == "teacher" and self.parallel and self.resource_option is not None:
            return self.settings.teacher_language
        return tag

    def sides(self) -> list[str]:
        if not self.parallel:
            return ["student"]
        return {"student": ["student"], "teacher": ["teacher"], "both": ["student", "teacher"]}[self.settings.side]

    def rng(self, state: Any) -> torch.Generator:
        """This micro-batch's generator (state.rng keys on epoch, micro-batch and process)."""
        return state.rng(self.salt)

    def choose(self, batch: Any, generator: torch.Generator) -> list[int]:
        """Rows to augment: one uniform draw per row (all rows, so the choice of one row does not depend on others)."""
        draws = torch.rand(len(batch), generator=generator).tolist()
        return [i for i, u in enumerate(draws) if u < self.settings.probability and self.listed(batch.langs[i])]

    def listed(self, lang: str) -> bool:
        """Whether ``languages`` (by ISO 639-3 code) lets rows tagged ``lang`` be augmented."""
        return self.wanted is None or language_code(lang) in self.wanted

    @hookimpl
    def augment_batch(self, batch: Any, state: Any) -> Any:
        if len(batch) == 0 or self.settings.probability == 0:
            return None
        sides = self.sides()
        served = [self.serves(lang) for lang in batch.langs]
        if "student" in sides:
            skipped = [lang for lang, ok in zip(batch.langs, served) if not ok and self.listed(lang)]
            if self.resource_option is not None:
                self.counts["skipped_rows"] += len(skipped)
            for lang in dict.fromkeys(skipped):
                self.warn_skipped(lang, f"plugins.{self.name}")
        generator = self.rng(state)
        rows = self.choose(batch, generator)
        if not rows:
            return None
        texts = {"student": list(batch.texts), "teacher": list(batch.teacher_texts)}
        changed: set[int] = set()
        for side in sides:
            # the teacher's language (teacher_language) was checked in setup; each row's own language is checked here
            mine = [i for i in rows if served[i]] if side == "student" else rows
            langs = [self.text_language(side, batch.langs[i]) for i in mine]
            new = self.augment_texts([texts[side][i] for i in mine], langs, side, generator, state)
            for i, text in zip(mine, new):
                if text != texts[side][i]:
                    texts[side][i] = text
                    changed.add(i)
        if not changed:
            return None
        self.counts["augmented"] += len(changed)
        augmented = {**batch.meta.get("augmented", {}), self.name: sorted(changed)}
        if not self.parallel:
            return batch.replace_texts(texts=texts["student"], augmented=augmented)
        return batch.replace_texts(
            texts=texts["student"] if "student" in sides else None,
            teacher_texts=texts["teacher"] if "teacher" in sides else None,
            augmented=augmented,
        )

    @hookimpl
    def on_step_end(self, state: Any, logs: dict[str, float]) -> None:
        for key, value in self.counts.items():
            logs[f"{self.name}/{key}"] = float(value)
            self.counts[key] = 0


# --------------------------------------------------------------------------- word replacement


def _match_case(source: str, replacement: str) -> str:
    if len(source) > 1 and source.isupper():
        return replacement.upper()
    if source[:1].isupper():
        return replacement[:1].upper() + replacement[1:]
    return replacement


def replace_words(
    text: Any, lookup: Lookup, word_probability: float, generator: torch.Generator, min_words: int = 0
) -> tuple[Any, int]:
    """Replace each word that has candidates with probability ``word_probability``.

    ``text`` is a string (words are found with :data:`WORD`; everything between
    them is kept) or a list of words (token tasks: each element is replaced by
    one single-word candidate, so the word count stays). When fewer than
    ``min_words`` words were drawn, more are added in a random order until
    ``min_words`` (or every word with candidates) is replaced. A replaced word
    gets a candidate group, then a candidate in it, uniformly at random; its
    case pattern (Title, UPPER) is kept. Returns the new text and the number
    of replaced words. The draws per text are fixed (three uniforms per word
    with candidates, then a permutation when ``min_words`` is set), whatever
    the outcome, so later draws do not depend on earlier outcomes.
    """
    words = isinstance(text, (list, tuple))
    if words:
        spans = [(i, w) for i, w in enumerate(text) if isinstance(w, str) and WORD.fullmatch(w)]
    else:
        spans = [(m.span(), m.group()) for m in WORD.finditer(text)]
    eligible = []
    for where, word in spans:
        groups = [list(g) for g in lookup(word.lower())]
        if words:
            groups = [[c for c in g if " " not in c] for g in groups]
        groups = [g for g in groups if g]
        if groups:
            eligible.append((where, word, groups))
    if not eligible:
        return text, 0
    draws = torch.rand(len(eligible), 3, generator=generator).tolist()
    chosen = [u < word_probability for u, _, _ in draws]
    if min_words:
        for k in torch.randperm(len(eligible), generator=generator).tolist():
            if sum(chosen) >= min_words:
                break
            chosen[k] = True
    out = list(text) if words else []
    last, replaced = 0, 0
    for (where, word, groups), (_, v, w), pick in zip(eligible, draws, chosen):
        if not pick:
            continue
        group = groups[min(int(v * len(groups)), len(groups) - 1)]
        new = _match_case(word, group[min(int(w * len(group)), len(group) - 1)])
        replaced += 1
        if words:
            out[where] = new
        else:
            start, end = where
            out.append(text[last:start])
            out.append(new)
            last = end
    if words:
        return (type(text)(out) if isinstance(text, tuple) else out), replaced
    out.append(text[last:])
    return "".join(out), replaced


def read_word_table(path: str, option: str, plugin: str) -> dict[str, list[str]]:
    """``word<TAB>alt1<TAB>alt2...`` or MUSE-style ``word alt`` lines -> {word (lower case): [alternatives]}.

    A line with a tab is split on tabs (alternatives may contain spaces);
    otherwise on whitespace. Repeated words collect their alternatives in file
    order. Empty lines and lines starting with ``#`` are skipped.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"plugins.{plugin}.{option}: no such file: {path}")
    table: dict[str, list[str]] = {}
    with open(p, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n\r")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = [x.strip() for x in (line.split("\t") if "\t" in line else line.split())]
            parts = [x for x in parts if x]
            if len(parts) < 2:
                continue
            key = parts[0].lower()
            known = table.setdefault(key, [])
            known.extend(x for x in parts[1:] if x.lower() != key and x not in known)
    table = {k: v for k, v in table.items() if v}
    if not table:
        raise ConfigError(f"plugins.{plugin}.{option}: {path} has no 'word<TAB>alternative' lines")
    return table


class _WordSettings(AugmentSettings):
    word_probability: float = Field(
        0.3, ge=0, le=1, description="Chance that each word with candidates in a chosen sample is replaced."
    )
    min_words: int = Field(
        1, ge=0, description="At least this many words are replaced in a chosen sample (when it has that many words "
        "with candidates), so a chosen sample does change; 0: only word_probability decides.",
    )
    teacher_language: str | None = Field(
        None, description="Language tag of the teachers' source column in mode 'parallel' (the rows' tags give the "
        "student's language); required with side 'teacher' or 'both' when the resource is language-specific.",
    )


# --------------------------------------------------------------------------- synonym

#: Function words left alone by default: WordNet has noun senses for many of them (a -> angstrom, in -> inch).
ENGLISH_STOPWORDS = (
    "a an the and or but nor so yet if then than as of at by for with about against between into through during "
    "before after above below to from up down in out on off over under again further once here there when where why "
    "how all any both each few more most other some such no not only own same too very can will just should now "
    "i me my myself we our ours ourselves you your yours yourself yourselves he him his himself she her hers herself "
    "it its itself they them their theirs themselves what which who whom this that these those am is are was were "
    "be been being have has had having do does did doing would could might must shall may"
).split()

#: WordNet 3.0's lexicographer files, numbered 00-44 (the ``lexnames`` file of the WordNet database, see
#: lexnames(5WN)). Debian's wordnet-base package does not ship that file; nltk's reader needs it.
WORDNET_LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object noun.person "
    "noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape noun.state "
    "noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession verb.social "
    "verb.stative verb.weather adj.ppl"
).split()

#: Raw WordNet database folders tried after the nltk data paths (Debian/Ubuntu: apt-get install wordnet-base).
SYSTEM_WORDNET_DIRS = ["/usr/share/wordnet"]

WORDNET_INSTALL_HINT = (
    "install it with `apt-get install wordnet-base` (Debian/Ubuntu; gives /usr/share/wordnet, found by default), "
    "or on a machine with network `python -m nltk.downloader -d DIR wordnet omw-1.4` and set `nltk_data: DIR` "
    "(or the NLTK_DATA environment variable)"
)


#: Folders this module appended to nltk.data.path; not searched for runs that do not name them.
_AUTHORIZED: set[str] = set()


def _authorize(directory: str) -> None:
    """Let nltk read ``directory``: nltk >= 3.9 opens files only under its data paths (nltk.data.path)."""
    import nltk

    if directory not in nltk.data.path:
        nltk.data.path.append(directory)
        _AUTHORIZED.add(directory)


def _is_wordnet_db(directory: str) -> bool:
    return all(os.path.isfile(os.path.join(directory, f)) for f in ("index.noun", "data.noun", "index.adj", "data.adj"))


_READERS: dict[tuple[str, str], Any] = {}


def load_wordnet(root: Any, omw_root: Any = None) -> Any:
    """An nltk WordNet reader over ``root``: a folder, or an nltk path pointer (``nltk.data.find`` result).

    Works with nltk's own ``corpora/wordnet`` and with a plain WordNet 3.0
    database folder such as Debian's /usr/share/wordnet, which lacks the
    ``lexnames`` file (supplied here). ``omw_root`` is an Open Multilingual
    Wordnet folder (``corpora/omw-1.4``) for other languages. Readers are
    kept per process.
    """
    import nltk
    from nltk.corpus.reader import CorpusReader
    from nltk.corpus.reader.wordnet import WordNetCorpusReader

    categories = {"noun": 1, "verb": 2, "adj": 3, "adv": 4}
    lexnames = "".join(f"{i:02d}\t{name}\t{categories[name.split('.')[0]]}\n" for i, name in enumerate(WORDNET_LEXNAMES))

    class Reader(WordNetCorpusReader):
        def open(self, file: str) -> Any:
            try:
                return super().open(file)
            except (OSError, ValueError, KeyError):
                if file == "lexnames":  # not in every WordNet distribution; the same 45 names in all of 3.0
                    return io.StringIO(lexnames)
                raise

        def map_wn(self, version: str = "wordnet") -> Any:
            # OMW data is keyed by WordNet 3.0 offsets: nothing to map for a 3.0 database (nltk would
            # otherwise look for the nltk "wordnet" corpus and its index.sense to build an identity map).
            if self.get_version() == "3.0":
                return None
            return super().map_wn(version)

    def pointer(where: Any) -> Any:
        if type(where) is str or isinstance(where, os.PathLike):  # a plain folder; nltk's pointers are allowed already
            _authorize(os.fspath(where))
            return nltk.data.FileSystemPathPointer(os.fspath(where))
        return where

    key = (repr(pointer(root)), repr(pointer(omw_root)) if omw_root is not None else "")
    if key not in _READERS:
        omw = CorpusReader(pointer(omw_root), r".*/wn-data-.*\.tab", encoding="utf8") if omw_root is not None else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "multilingual functions are not available" without OMW
            reader = Reader(pointer(root), omw)
            if omw is not None:
                reader.add_omw()  # makes reader.langs() list the OMW languages
            _READERS[key] = reader
    return _READERS[key]


class SynonymSettings(_WordSettings):
    dictionary: str | None = Field(
        None,
        description="A synonym table (UTF-8 TSV: word<TAB>synonym1<TAB>synonym2 ...) used instead of WordNet.",
    )
    wordnet_lang: str | dict[str, str] | None = Field(
        None,
        description="Which WordNet serves which rows. Default: each row's own language's WordNet (English for English "
        "tags; an Open Multilingual Wordnet language when its data is found), other rows are left alone. A code "
        "('eng', 'fra', 'spa', ...): only that WordNet, for rows of its language. A mapping from language tags to codes "
        "({en: eng, es: spa}): exactly those languages, also on purpose across languages ({en: eng, sco: eng}).",
    )
    pos: list[Literal["n", "v", "a", "r"]] | None = Field(
        None, description="WordNet parts of speech to take synonyms from (n, v, a, r); default all."
    )
    nltk_data: str | list[str] | None = Field(
        None, description="Folder(s) holding nltk data (corpora/wordnet, corpora/omw-1.4), searched before NLTK_DATA and nltk's defaults."
    )
    wordnet_dir: str | None = Field(
        None, description="A plain WordNet 3.0 database folder (index.noun, data.noun, ...), e.g. /usr/share/wordnet; "
        "default: search nltk_data, NLTK_DATA, nltk's default paths, then /usr/share/wordnet.",
    )
    stopwords: list[str] | None = Field(
        None, description="Words never replaced (case-insensitive); default with WordNet: a list of English function "
        "words (WordNet has noun senses for a, in, it ...); with `dictionary`: none.",
    )


class SynonymAugment(_Augment):
    """Replace words with synonyms from WordNet or a synonym table."""

    Settings = SynonymSettings
    name = "synonym"
    salt = 1
    resource_name = "WordNet"

    def __init__(self, settings: SynonymSettings):
        super().__init__(settings)
        self.settings: SynonymSettings = settings
        self.counts.update(words=0, skipped_rows=0)
        self.table: dict[str, list[str]] | None = None
        self.wordnet: Any = None
        #: ISO 639-3 code -> the WordNet serving it (when wordnet_lang is not a mapping).
        self.wordnets: dict[str, str] = {}
        self._codes: dict[str, str | None] = {}
        self._candidates: dict[tuple[str, str], list[str]] = {}
        # the built-in English list guards WordNet lookups; a user's own table is used as written
        default = () if settings.dictionary is not None else ENGLISH_STOPWORDS
        self.stopwords = {w.lower() for w in (default if settings.stopwords is None else settings.stopwords)}

    @property
    def resource_option(self) -> str | None:  # type: ignore[override]
        # a synonym table has no language: it serves every row (`languages` restricts it)
        return None if self.settings.dictionary is not None else "wordnet_lang"

    def prepare(self, state: Any) -> None:
        s = self.settings
        if s.dictionary is not None:
            self.table = read_word_table(state.config.resolve_path(s.dictionary), "dictionary", self.name)
            return
        mapping = s.wordnet_lang if isinstance(s.wordnet_lang, dict) else None
        if mapping is not None:
            by_code: dict[str, dict[str, str]] = {}
            for tag, code in mapping.items():
                by_code.setdefault(language_code(tag), {})[tag] = code
            for iso, tags in by_code.items():
                if len(set(tags.values())) > 1:
                    raise self.error("wordnet_lang", f"{sorted(tags)} are tags of one language ({iso}) mapped to different "
                                     f"WordNets ({tags}); keep one")
            codes = set(mapping.values())
        else:
            codes = set() if s.wordnet_lang is None else {s.wordnet_lang}
        # by default OMW languages serve their own rows when the data is there; it is not required
        omw = "required" if codes - {"eng"} else "optional" if s.wordnet_lang is None else "no"
        self.wordnet = self.find_wordnet(state, omw)
        known = set(self.wordnet.langs())
        missing = sorted(codes - known)
        if missing:
            raise self.error("wordnet_lang", f"{missing} not in the Open Multilingual Wordnet data found; available: "
                             f"{', '.join(sorted(known))}")
        if mapping is None:
            for code in sorted(known) if s.wordnet_lang is None else [s.wordnet_lang]:
                iso = language_code(code)  # ita_iwn, a second Italian wordnet, serves Italian unless 'ita' does
                if code == iso or iso not in self.wordnets:
                    self.wordnets[iso] = code

    def find_wordnet(self, state: Any, omw: Literal["no", "optional", "required"] = "no") -> Any:
        """Locate WordNet (and OMW) on disk, never downloading; a clear ConfigError when absent."""
        import nltk

        s = self.settings
        given = [s.nltk_data] if isinstance(s.nltk_data, str) else list(s.nltk_data or [])
        given = [state.config.resolve_path(d) for d in given]
        for d in given:
            if not os.path.isdir(d):
                raise self.error("nltk_data", f"no such folder: {d}")
            _authorize(d)
        env = [d for d in os.environ.get("NLTK_DATA", "").split(os.pathsep) if d]
        search = list(dict.fromkeys(given + env + [str(p) for p in nltk.data.path if str(p) not in _AUTHORIZED]))

        def find(name: str) -> Any:
            """corpora/NAME as a folder or as NAME.zip (how nltk's downloader leaves it)."""
            for resource in (f"corpora/{name}", f"corpora/{name}.zip/{name}/"):
                try:
                    return nltk.data.find(resource, paths=search)
                except LookupError:
                    pass
            return None

        root = None
        if s.wordnet_dir is not None:
            root = state.config.resolve_path(s.wordnet_dir)
            if not _is_wordnet_db(root):
                raise self.error("wordnet_dir", f"{root} holds no WordNet database (index.noun, data.noun, ...); {WORDNET_INSTALL_HINT}")
        else:
            root = find("wordnet")
            if root is None:
                env = os.environ.get("WNSEARCHDIR")
                for d in ([env] if env else []) + SYSTEM_WORDNET_DIRS:
                    if _is_wordnet_db(d):
                        root = d
                        break
        if root is None:
            raise self.error("nltk_data", f"WordNet was not found (searched {', '.join(search + SYSTEM_WORDNET_DIRS)}); "
                             f"{WORDNET_INSTALL_HINT}; or give a synonym table with `dictionary`")
        omw_root = None
        if omw != "no":
            omw_root = find("omw-1.4") or find("omw-2.0") or find("omw")
            if omw_root is None and omw == "required":
                raise self.error("wordnet_lang", "languages other than 'eng' need the Open Multilingual Wordnet data "
                                 "(corpora/omw-1.4), not found; on a machine with network run `python -m nltk.downloader "
                                 "-d DIR omw-1.4` and set `nltk_data: DIR`")
        try:
            return load_wordnet(root, omw_root)
        except (OSError, ValueError, LookupError) as exc:
            raise self.error("wordnet_dir" if s.wordnet_dir else "nltk_data", f"cannot read WordNet at {root}: {exc}") from None

    def wordnet_code(self, lang: str) -> str | None:
        """The WordNet serving texts tagged ``lang``, or None: the exact tag in a mapping, else by ISO 639-3 code."""
        if lang not in self._codes:
            mapping = self.settings.wordnet_lang
            if isinstance(mapping, dict):
                code = mapping.get(lang)
                if code is None:
                    iso = language_code(lang)
                    code = next((c for tag, c in mapping.items() if language_code(tag) == iso), None)
            else:
                code = self.wordnets.get(language_code(lang))
            self._codes[lang] = code
        return self._codes[lang]

    def serves(self, lang: str) -> bool:
        return self.table is not None or self.wordnet_code(lang) is not None

    def resource_note(self, lang: str) -> str:
        mapping = self.settings.wordnet_lang
        if isinstance(mapping, dict):
            return f"wordnet_lang maps {sorted(mapping)}; add {lang!r} to it to use a WordNet for it on purpose"
        have = sorted(set(self.wordnets.values()))
        example = ", ".join([*(f"{c}: {c}" for c in have), f"{lang}: eng"])
        return (f"WordNets found: {', '.join(have)}; to use one for it on purpose, map it (a mapping lists every "
                f"language to augment), e.g. wordnet_lang: {{{example}}}")

    def synonyms(self, word: str, code: str) -> list[str]:
        """WordNet synonyms of ``word`` (lower case) in language ``code``, filtered and in a fixed order."""
        key = (word, code)
        if key in self._candidates:
            return self._candidates[key]
        found: list[str] = []
        if word not in self.stopwords and len(word) > 1:
            own = {word}
            if code == "eng":  # the word's own base forms are no synonyms (rains -> rain)
                own |= {self.wordnet.morphy(word, p) for p in "nvar"} - {None}
            pos_list = self.settings.pos or [None]
            for pos in pos_list:
                for synset in self.wordnet.synsets(word, pos=pos, lang=code):
                    names = synset.lemma_names() if code == "eng" else synset.lemma_names(lang=code)
                    for name in names:
                        cand = name.replace("_", " ")
                        low = cand.lower()
                        if low in own or cand in found or any(ch.isdigit() for ch in cand):
                            continue
                        if cand != low and word.islower():
                            continue  # a proper noun or abbreviation (won -> South Korean won, in -> IN)
                        found.append(cand)
        self._candidates[key] = found
        return found

    def augment_texts(self, texts: list[Any], langs: list[str], side: str, generator: torch.Generator, state: Any) -> list[Any]:
        out = []
        for text, lang in zip(texts, langs):
            if self.table is not None:
                table = self.table
                lookup: Lookup = lambda w: [table[w]] if w in table and w not in self.stopwords else []  # noqa: E731
            else:
                code = self.wordnet_code(lang)
                if code is None:
                    out.append(text)
                    continue
                lookup = lambda w, code=code: [self.synonyms(w, code)]  # noqa: E731
            new, n = replace_words(text, lookup, self.settings.word_probability, generator, self.settings.min_words)
            self.counts["words"] += n
            out.append(new)
        return out


# --------------------------------------------------------------------------- code_switch


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


# --------------------------------------------------------------------------- back_translation


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
        if state.task == "token_classification":
            raise self.error("side", "back-translation changes the words of a sentence, so word labels of "
                             "token_classification would no longer align; use synonym or code_switch instead")
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
