"""What the augmentation plugins share: language tags, settings, row choice and re-encoding, word replacement."""

from __future__ import annotations

import functools
import re
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Sequence

import torch
from pydantic import Field

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
        if state.task_def.reads_context:
            raise ConfigError(f"plugins.{self.name}: task {state.task} reads each text with a passage whose answer "
                              "positions changed words would move; text augmentation cannot be used with it")
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
            logs[f"{self.name}/{key}"] = int(value)  # a count: the record sums it
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
