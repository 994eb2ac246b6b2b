"""Plugin ``synonym``: WordNet (or table) synonym replacement; WordNet read from local files only."""

from __future__ import annotations

import io
import os
import warnings
from typing import Any, Literal

import torch
from pydantic import Field

from polydistill_plugins.augment.base import Lookup, _Augment, _WordSettings, language_code, read_word_table, replace_words


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
