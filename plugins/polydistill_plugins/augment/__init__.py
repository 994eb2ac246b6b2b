"""Text augmentation plugins: ``synonym``, ``back_translation``, ``code_switch`` and ``nlpaug``.

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

from polydistill_plugins.augment.back_translation import BackTranslation, BackTranslationSettings, TranslationModel
from polydistill_plugins.augment.base import AugmentSettings, language_code, read_word_table, replace_words
from polydistill_plugins.augment.code_switch import CodeSwitch, CodeSwitchSettings
from polydistill_plugins.augment.nlpaug_augment import NlpaugAugment, NlpaugSettings
from polydistill_plugins.augment.synonym import SYSTEM_WORDNET_DIRS, SynonymAugment, SynonymSettings, load_wordnet

__all__ = [
    "AugmentSettings", "BackTranslation", "BackTranslationSettings", "CodeSwitch", "CodeSwitchSettings", "NlpaugAugment", "NlpaugSettings",
    "SYSTEM_WORDNET_DIRS", "SynonymAugment", "SynonymSettings", "TranslationModel", "language_code", "load_wordnet",
    "read_word_table", "replace_words",
]
