"""The run configuration: pydantic models, file loading, overrides and readable errors."""

from __future__ import annotations

import difflib
import json
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator

from polydistill.errors import ConfigError

if typing.TYPE_CHECKING:
    from polydistill.multitask import MultiTaskConfig

#: Fields that change where a run writes and what it shows, never what it computes: a
#: study's fingerprint leaves them out (changing the list changes every fingerprint).
RUNTIME_FIELDS = (
    "output_dir", "training.progress", "training.checkpoint_every", "training.keep_checkpoints",
    "training.log_every", "training.num_threads", "trackers", "project_name",
)
#: What a resumed run may change: the runtime fields and where the teacher cache lives.
RESUMABLE_FIELDS = (*RUNTIME_FIELDS, "cache.dir", "cache.backend", "training.shard_teachers", "training.teacher_deepspeed_config")


class PluginSettings(BaseModel):
    """Base class for a plugin's settings model: unknown options are errors."""

    model_config = ConfigDict(extra="forbid")


class StrictModel(BaseModel):
    """A settings model whose unknown fields are errors (the config sections, a study file)."""

    model_config = ConfigDict(extra="forbid")


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, (dict, BaseModel)) else value


class TeacherConfig(StrictModel):
    """One teacher: a hub id or local path loaded with transformers' Auto classes."""

    model: str = Field(description="Hub id or local directory, loaded with transformers' Auto class for the task.")
    name: str | None = Field(None, description="Name used in logs, by `student.from_teacher.teacher` and by plugins (`state.teacher_names`). Names must be unique; set `name` when two teachers' folders share a name.")
    tokenizer: str | None = Field(None, description='Tokenizer hub id or path. Must be a fast tokenizer.')
    revision: str | None = Field(None, description='Hub revision (branch, tag or commit) of the model.')
    languages: list[str] | None = Field(None, description='Languages this teacher is strong in; not used by the core, read by teacher-selection plugins.')


class FromTeacher(StrictModel):
    """Build the student from a teacher by keeping some of its layers (DistilBERT-style)."""

    teacher: str | int = Field(0, description='Teacher `name`, or index in `teachers`.')
    layers: list[int] = Field(description='Teacher transformer blocks to keep, **0-based**, in order: student block `i` is a copy of teacher block `layers[i]`. Embeddings, pooler and head are copied. E.g. `[0, 2, 4]` from a 6-layer teacher. For an encoder-decoder teacher (seq2seq), the encoder\'s blocks.')
    decoder_layers: list[int] | None = Field(None, description="Encoder-decoder teachers (seq2seq): the decoder blocks to keep, 0-based, in order. Default: all of them (a shallower decoder decodes faster: e.g. `[0]`).")

    @field_validator("layers", "decoder_layers")
    @classmethod
    def _layers(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("keep at least one layer")
        if any(i < 0 for i in v):
            raise ValueError("layer indices must be >= 0")
        return v


class VocabularyConfig(StrictModel):
    """The student's own vocabulary, built from the training text before training and saved with the student."""

    method: Literal["keep", "trim", "extend", "new"] = Field(
        "keep",
        description="`keep`: the student's tokenizer as it is. `trim`: keep only the tokens the training text uses, plus "
        "`keep` and (with `keep_characters`) every single-character token, so text is tokenized exactly as before. "
        "`extend`: add tokens learned from the training text of `languages` to the tokenizer. `new`: a fresh "
        "`model` tokenizer of `size` tokens learned from the training text of every language and (with "
        "`include_source`) the source side. Token rows the old vocabulary has are kept; the others start from `init`.",
    )
    model: Literal["wordpiece", "unigram", "bpe"] = Field("wordpiece", description="Tokenizer model of `method: new`. `extend` keeps the old tokenizer's model.")
    size: int | None = Field(
        None, ge=1,
        description="`new`: the vocabulary size (default 16000). `extend`: at most this many tokens are added (default 8000), "
        "the most frequent first.",
    )
    languages: list[str] | None = Field(
        None, description="Language tags (as in the data) whose training rows the vocabulary is learned or counted from; default: every language."
    )
    include_source: bool = Field(True, description="`new`: learn from the teachers' side (`columns.source`) of parallel data too.")
    sample: int | None = Field(None, ge=1, description="Use at most this many training rows per language (sampled with `seed`); default: all rows.")
    min_frequency: int = Field(2, ge=1, description="`extend` and `new` (WordPiece, BPE; Unigram prunes by likelihood instead): a token must occur this often in the sampled text to be learned.")
    keep: list[str] = Field(default_factory=list, description="`trim`: tokens kept even when the training text does not use them (special tokens always are).")
    keep_characters: bool = Field(
        True, description="`trim`: keep every single-character token (letters, digits, punctuation), so unseen words split into characters instead of `[UNK]`."
    )
    trim_unused: bool = Field(False, description="`extend`: afterwards drop the old tokens the training text does not use (as `trim` does). Options of other methods are ignored, so a study can vary `method` alone.")
    transliterate: Literal["none", "anyascii"] = Field(
        "none",
        description="Write the student's text in Latin script (anyascii) before tokenizing. Built into the saved tokenizer's "
        "normalizer, so `AutoTokenizer` reads text as the student was trained. Covers every 128-code-point block of a "
        "character in the training text (only the characters seen for CJK and Hangul syllables).",
    )
    init: Literal["auto", "random", "fvt", "parallel"] = Field(
        "auto",
        description="Rows of tokens the old vocabulary lacks. `auto`: `parallel` in mode `parallel`, else `fvt` (on recipe 1, "
        "random and FVT rows scored below the teacher's vocabulary after an epoch; aligned rows far above it). "
        "`random`: N(0, the model's initializer_range). `fvt`: the mean of "
        "the rows of the old tokenizer's pieces of the token (Gee et al. 2022). `parallel`: a weighted mean of the rows of "
        "the source tokens the token translates to, by IBM Model 1 alignment of the parallel training pairs "
        "(target side with the new tokenizer, source side with the old); tokens seen fewer than `min_alignments` times fall back to `fvt`.",
    )
    min_alignments: int = Field(3, ge=1, description="`init: parallel`: pairs a token must occur in for its aligned row; rarer tokens use `fvt`.")
    top_k: int = Field(8, ge=1, description="`init: parallel`: source tokens mixed into each row, by alignment probability.")
    seed: int | None = Field(None, description="Seed of `sample` and random rows; default `training.seed`.")


class StudentConfig(StrictModel):
    """The student: exactly one of `model`, `from_teacher` or `config`."""

    model: str | None = Field(None, description='Hub id or local directory of a pretrained student, loaded for the task with `labels`; a checkpoint without a classification head gets a randomly initialised one.')
    from_teacher: FromTeacher | None = Field(None, description="Initialise from a subset of a teacher's layers (DistilBERT-style).")
    config: dict[str, Any] | None = Field(
        None,
        description='A randomly initialised model: `base` (hub id or path whose config is the starting point) plus config fields to change, e.g. `{base: bert-base-multilingual-cased, num_hidden_layers: 4}`. A field the base config does not have is an error that suggests the closest field.',
    )
    tokenizer: str | None = Field(None, description="Tokenizer hub id or path; defaults to `model`'s, the teacher's (`from_teacher`) or `config.base`'s. Must be a fast tokenizer.")
    vocabulary: VocabularyConfig = Field(default_factory=VocabularyConfig, description="The student's own vocabulary: trimmed, extended or new, with the initialisation of new token rows (the Student vocabularies page of the docs).")

    @model_validator(mode="after")
    def _exactly_one(self) -> StudentConfig:
        given = [k for k in ("model", "from_teacher", "config") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of model, from_teacher, config (got {given or 'none'})")
        if self.config is not None and "base" not in self.config:
            raise ValueError("config needs a `base` (hub id or path of the model whose config to start from)")
        return self


class Columns(StrictModel):
    """Which dataset columns hold what."""

    text: str = Field("text", description='Column with the text the student reads. For token classification each value is a list of words. With `aligned`, one of the `aligned` keys.')
    source: str | None = Field(None, description='Column the teachers read in `parallel` mode (source language); required on every training source in that mode. For embedding evaluation, the other side of each pair.')
    label: str | None = Field(None, description='Gold label: a class name from `labels` or an integer id; for token tasks a list of tags (names or ids), one per word.')
    lang: str | None = Field(None, description="Column holding each row's language tag; else the source's `lang`.")
    target: str | None = Field(None, description='Generative tasks: the text the model learns to produce: the translation (`seq2seq`), or the response to the prompt in `text` (`causal_lm`, whose loss is then on the response only). `question_answering`: the answer (a string, a list of acceptable strings, or SQuAD\'s `{text: [...], answer_start: [...]}`).')
    context: str | None = Field(None, description='`question_answering`: the passage the answer is in (`text` holds the question).')


class DataSource(StrictModel):
    """One dataset: a local file, aligned plain-text files, or a hub dataset id."""

    path: str | None = Field(None, description='A file (`.jsonl`, `.json`, `.csv`, `.tsv`, `.parquet`) or a Hugging Face hub dataset id.')
    aligned: dict[str, str] | None = Field(
        None,
        description='Line-aligned plain-text files, one sentence a line, each read into the named column, e.g. `{en: tatoeba.deu-eng.eng, de: tatoeba.deu-eng.deu}`. Files of different lengths are an error.',
    )
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "hub"] = Field("auto", description='File format. `auto` goes by the extension; a path with another extension is a hub id (an existing local file with an unknown extension is an error asking for `format`).')
    name: str | None = Field(None, description='Hub dataset configuration name (e.g. a language of a multilingual dataset).')
    split: str = Field("train", description='Split of a hub dataset. Local files are read whole.')
    lang: str | None = Field(None, description='Language tag for every row, when there is no `columns.lang`.')
    columns: Columns = Field(default_factory=Columns, description='Which columns hold what.')
    filter: dict[str, Any] | None = Field(None, description='Keep only rows whose columns equal these values, e.g. `{split: train}`.')
    limit: int | None = Field(None, ge=1, description='Read at most this many rows (after `filter`): the first ones.')
    sample: int | None = Field(None, ge=1, description='Read this many rows (after `filter`) drawn at random without replacement, seeded by `sample_seed`, kept in file order (all rows when there are fewer); instead of `limit`. Not for streamed sources.')
    sample_seed: int = Field(0, ge=0, description='Seed of `sample` (the same seed draws the same rows, whatever training.seed is).')
    streaming: bool = Field(False, description='Stream rows instead of loading them (corpora larger than memory). Needs `training.max_steps`; training sources only.')

    @model_validator(mode="after")
    def _one_input(self) -> DataSource:
        if (self.path is None) == (self.aligned is None):
            raise ValueError("give exactly one of path, aligned")
        if self.sample is not None and self.limit is not None:
            raise ValueError("give one of limit (the first N rows) and sample (N rows drawn at random), not both")
        if self.sample is not None and self.streaming:
            raise ValueError("sample: a streamed source's length is not known; use limit (its first N rows), or load it "
                             "without streaming")
        return self


class DataConfig(StrictModel):
    """Training and evaluation data, tokenization and batching."""

    train: list[DataSource] = Field(
        default_factory=list,
        description='Training data; several sources are concatenated (all streamed or none). May be empty (`[]`) only for data-free runs whose batches a plugin generates (e.g. `gan_data`); `training.max_steps` is then required, and a step whose batch no plugin filled is an error.',
    )
    eval: list[DataSource] = Field(default_factory=list, description='Evaluation data; metrics are reported per language. Cannot be streamed.')
    max_length: int = Field(128, ge=2, description='Truncate each text to this many tokens.')
    doc_stride: int = Field(32, ge=0, description='`question_answering`: a context longer than `max_length` is cut into windows that share this many tokens with their neighbour; below `max_length / 2`.')
    batch_size: int = Field(32, ge=1, description='Training batch size per device (per micro-batch with gradient accumulation).')
    eval_batch_size: int | None = Field(None, ge=1, description='Evaluation batch size.')
    length_grouping: bool = Field(True, description='Group texts of similar length into batches (less padding): indices are shuffled, cut into mega-batches of 50 batches, sorted by length within each, and the batch order is shuffled.')
    padding: Literal["longest", "max_length"] = Field("longest", description='Pad to the longest text in the batch, or always to `max_length`.')
    shuffle: bool = Field(True, description='Shuffle training batches each epoch (seeded by `training.seed` and the epoch).')
    stream_buffer: int = Field(10000, ge=1, description='Rows read at a time for shuffling and length grouping when streaming.')

    _as_list = field_validator("train", "eval", mode="before")(classmethod(lambda cls, v: _as_list(v)))


class TrainingConfig(StrictModel):
    """Optimisation, schedule, precision, logging and checkpoints."""

    epochs: int = Field(1, ge=1, description='Passes over the training data; ignored when `max_steps` is set.')
    max_steps: int | None = Field(None, ge=1, description='Stop after this many optimizer steps. Required when training data is streamed.')
    learning_rate: float = Field(5e-5, gt=0, description='Peak learning rate (student and plugin modules).')
    weight_decay: float = Field(0.01, ge=0, description='Weight decay; not applied to biases and normalisation weights.')
    optimizer: Literal["adamw", "adam", "sgd"] = Field("adamw", description='Optimizer; `sgd` uses momentum 0.9.')
    betas: tuple[float, float] = Field((0.9, 0.999), description='Adam/AdamW betas.')
    fused_optimizer: bool | None = Field(
        None,
        description="Update all parameters in one fused kernel (torch's fused=True; several times faster than the "
        "per-tensor loop on CPU). Default: on wherever torch provides it for the optimizer and device.",
    )
    scheduler: Literal["constant", "linear", "cosine"] = Field("linear", description='Learning-rate schedule after warm-up (`linear` and `cosine` decay to 0 at the last step).')
    warmup_steps: int = Field(0, ge=0, description='Linear warm-up steps.')
    warmup_ratio: float = Field(0.0, ge=0, le=1, description='Warm-up as a fraction of all steps; used when `warmup_steps` is 0.')
    gradient_accumulation_steps: int = Field(1, ge=1, description='Micro-batches per optimizer step.')
    max_grad_norm: float | None = Field(1.0, gt=0, description='Clip the gradient norm (student and plugin modules that share its optimizer settings) at this value (> 0); `null` disables.')
    mixed_precision: Literal["no", "fp16", "bf16"] = Field("no", description='Mixed precision through accelerate.')
    seed: int = Field(42, ge=0, lt=2**32, description='Seed for initialisation, batch order and `state.rng()` (0 to 2³²-1).')
    num_threads: int | None = Field(None, ge=1, description='torch CPU threads.')
    log_every: int = Field(10, ge=1, description='Write loss terms, `lr` and plugin log entries to `metrics.jsonl` (and the trackers) every N steps and at the last step.')
    eval_every: int | None = Field(None, ge=1, description='Evaluate on `data.eval` every N steps. The student is also evaluated at the end.')
    checkpoint_every: int | None = Field(None, ge=1, description='Write a checkpoint every N steps. One is also written at the end and on interrupt.')
    keep_checkpoints: int = Field(
        2, ge=1, description="Keep only the newest N checkpoints (2 or more lets a resume fall back past a corrupt one)."
    )
    nonfinite: Literal["stop", "skip"] = Field(
        "stop",
        description="On a NaN/inf loss term: stop (checkpoint the last good state and fail, naming the term and "
        "its plugin) or skip the batch (no optimizer step) up to max_skipped_batches times.",
    )
    max_skipped_batches: int = Field(10, ge=0, description="With nonfinite: skip, stop once more batches than this were skipped.")
    progress: bool = Field(True, description='Show a progress bar.')
    shard_teachers: bool = Field(False, description="Under FSDP or DeepSpeed (`accelerate launch --config_file` one of docs/examples/accelerate/), shard the frozen teachers over the processes too, for teachers that do not fit one device: FSDP with the launch's FSDP settings, DeepSpeed with `teacher_deepspeed_config` (e.g. ZeRO-3 inference). Off: every process holds each teacher whole. See docs/scale.md.")
    teacher_deepspeed_config: str | None = Field(None, description="DeepSpeed config file (JSON) for the teachers when `shard_teachers` runs under DeepSpeed, beside the student's own from the launch: docs/examples/accelerate/ds_zero3_teacher.json shards them with ZeRO-3 for inference.")


class GenerationConfig(StrictModel):
    """How generative tasks decode when they are evaluated (seq2seq)."""

    num_beams: int = Field(4, ge=1, description='Beam width of evaluation decoding (1: greedy).')
    max_new_tokens: int = Field(128, ge=1, description='Most tokens generated per text.')
    bleu_tokenize: Literal["13a", "intl", "zh", "char", "none"] = Field("13a", description="sacrebleu's BLEU tokenizer (its signature is reported with the scores): 13a is sacrebleu's default; zh or char for languages written without spaces.")


class CacheConfig(StrictModel):
    """Teacher-output cache: teacher logits/embeddings stored on disk by input text."""

    enabled: bool = Field(False, description='Use the cache.')
    backend: Literal["sqlite", "datasets"] = Field("sqlite", description="`sqlite`: one SQLite file that the run fills as it trains (the default, for one machine). `datasets`: read-only sharded Arrow files in the `datasets` format, built beforehand in parallel by `polydistill teacher-outputs build CONFIG` (for large corpora, several processes or nodes, and stores shared by runs on several machines); texts the store does not hold (augmented, new) are computed each time. See docs/scale.md.")
    dir: str | None = Field(None, description='`sqlite`: the directory of the file `teacher-outputs.sqlite` (default: ~/.cache/polydistill/teacher-outputs). `datasets`: the store\'s directory, local or on shared storage (required).')
    dtype: Literal["float16", "float32"] = Field("float32", description='Storage precision.')
    top_k: int | None = Field(None, ge=1, description="Tasks whose teacher outputs are distributions over a vocabulary (causal_lm, seq2seq) are cached only with this: each target token keeps top_k tokens with their log-probabilities (`top_k_method`), and the rest of the mass is spread evenly over the other tokens when read back. Other tasks ignore it.")
    top_k_method: Literal["top", "sample"] = Field("top", description="Which tokens `top_k` keeps: `top`, the most likely ones (biased: the tail's shape is lost); `sample`, top_k draws from the teacher's distribution (seeded), kept as their frequencies: an unbiased estimate of the distribution, so forward KL at temperature 1 has an unbiased gradient (see docs/tasks.md).")

    @model_validator(mode="after")
    def _store_needs_dir(self) -> CacheConfig:
        if self.enabled and self.backend == "datasets" and not self.dir:
            raise ValueError("cache.dir: backend 'datasets' reads the store built by `polydistill teacher-outputs build`; "
                             "give its directory")
        return self


class Config(StrictModel):
    """A polydistill run."""

    task: str = Field(description='What the models do: an installed task (entry-point group `polydistill.tasks`). Built in: `sequence_classification` (one label per text), `token_classification` (one tag per word; texts are lists of words), `embedding` (pooled sentence embeddings; the model is loaded with `AutoModel`), `causal_lm` (next tokens of a decoder-only LM), `seq2seq` (text to text, e.g. translation), `question_answering` (extractive answer spans; docs/tasks.md).')
    mode: Literal["same", "parallel"] = Field(
        "same", description='`same`: teacher and student read the same text. `parallel`: the teacher reads `columns.source`, the student `columns.text`.'
    )
    labels: list[str] | None = Field(None, description="Label names for classification tasks; their order gives the class ids. Default: the first teacher's `id2label`; without a teacher, the student model's `id2label` when it names its labels (not transformers' `LABEL_0`, `LABEL_1`, ... defaults), else required. Its length must match every teacher's number of labels. When given with a teacher that names its labels, it must equal the teacher's list in the same order (labels are matched by position; a different order is an error). Not used for `embedding`.")
    pooling: Literal["mean", "cls"] = Field("mean", description='How token states become a sentence embedding (embedding task): mean over non-padding tokens, or the first token.')
    teachers: list[TeacherConfig] = Field(default_factory=list, description='Teachers; a single mapping is accepted as a list of one. None means plain fine-tuning.')
    student: StudentConfig = Field(description="The model being trained.")
    data: DataConfig = Field(description="Training and evaluation data, tokenization, batching.")
    training: TrainingConfig = Field(default_factory=TrainingConfig, description='Optimisation, schedule, precision, logging, checkpoints.')
    plugins: dict[str, Any] = Field(
        default_factory=dict,
        description='Plugins to enable, in order. See [plugins](#plugins).',
    )
    cache: CacheConfig = Field(default_factory=CacheConfig, description='Teacher-output cache.')
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description='Decoding for the evaluation of generative tasks.')
    output_dir: str = Field("runs/polydistill", description='The run directory; `polydistill train --output-dir` overrides it.')
    trackers: list[Literal["tensorboard", "wandb", "mlflow", "comet_ml", "aim", "clearml", "dvclive"]] = Field(
        default_factory=list, description="Experiment trackers, through accelerate (logging directory: `output_dir`). The tracker's package must be installed (`pip install polydistill[tracking]` adds tensorboard)."
    )
    project_name: str = Field("polydistill", description='Project name given to the trackers.')

    _base_dir: Path = PrivateAttr(default_factory=Path.cwd)

    _teachers_list = field_validator("teachers", mode="before")(classmethod(lambda cls, v: _as_list(v)))

    @field_validator("task")
    @classmethod
    def _known_task(cls, v: str) -> str:
        from polydistill.tasks import get_task

        try:
            get_task(v)
        except ConfigError as exc:
            raise ValueError(str(exc).removeprefix("task: ").replace(f"unknown task {v!r}", "unknown task")) from None
        return v

    @field_validator("labels")
    @classmethod
    def _unique_labels(cls, v: list[str] | None) -> list[str] | None:
        if v is not None:
            twice = sorted({x for x in v if v.count(x) > 1})
            if twice:
                raise ValueError(f"label names must be unique; {twice} appear more than once")
        return v

    @model_validator(mode="after")
    def _consistent(self, info: ValidationInfo) -> Config:
        if not self.data.train and not self.training.max_steps:
            raise ValueError(
                "data.train is empty: give a training source, or training.max_steps for a run whose batches "
                "a plugin generates (data-free distillation)"
            )
        from polydistill.tasks import get_task

        task = get_task(self.task)
        if self.mode == "parallel" and task.parallel_refusal:
            raise ValueError(f"mode 'parallel' does not work for {self.task}: {task.parallel_refusal}")
        if self.mode == "parallel":
            missing = [i for i, s in enumerate(self.data.train) if s.columns.source is None]
            if missing:
                raise ValueError(f"mode 'parallel' needs data.train[{missing[0]}].columns.source (the column the teacher reads)")
        vocab = self.student.vocabulary
        if vocab.init == "parallel" and vocab.method in ("extend", "new") and self.mode != "parallel":
            raise ValueError("student.vocabulary.init 'parallel' learns from parallel pairs: it needs mode 'parallel' (or init 'fvt')")
        if vocab.method != "keep" or vocab.transliterate != "none":
            if not self.data.train:
                raise ValueError("student.vocabulary is built from data.train, which is empty")
            if any(s.streaming for s in self.data.train) and vocab.sample is None:
                raise ValueError("student.vocabulary.sample: required with streamed training data (rows read per language)")
        # one task of a multi-task run: the shared student may be cut from another task's teacher
        shared = bool(info.context and info.context.get("shared_student"))
        if self.student.from_teacher is not None and not shared:
            ref = self.student.from_teacher.teacher
            names = self.teacher_names()
            if isinstance(ref, int) and not 0 <= ref < len(names):
                raise ValueError(f"student.from_teacher.teacher={ref} but there are {len(names)} teachers")
            if isinstance(ref, str) and ref not in names:
                raise ValueError(f"student.from_teacher.teacher={ref!r} is not one of the teachers {names}")
        names = self.teacher_names()
        if len(set(names)) != len(names):
            raise ValueError(f"teacher names must be unique, got {names}; set `name` on each teacher")
        return self

    def teacher_names(self) -> list[str]:
        return [t.name or Path(t.model.rstrip("/")).name for t in self.teachers]

    def resolve_path(self, value: str) -> str:
        """A relative path is read relative to the config file when it exists there.

        The core's own path fields are resolved once, when the config is loaded;
        plugins resolve the paths in their settings with this.
        """
        p = Path(value).expanduser()
        if p.is_absolute():
            return str(p)
        candidate = self._base_dir / p
        return str(candidate) if candidate.exists() else value

    def _resolve_paths(self) -> None:
        """Resolve every model, tokenizer and data path once (see :meth:`resolve_path`): lower layers read the fields."""
        for t in self.teachers:
            t.model = self.resolve_path(t.model)
            t.tokenizer = self.resolve_path(t.tokenizer) if t.tokenizer else t.tokenizer
        sc = self.student
        sc.model = self.resolve_path(sc.model) if sc.model else sc.model
        sc.tokenizer = self.resolve_path(sc.tokenizer) if sc.tokenizer else sc.tokenizer
        if sc.config is not None and isinstance(sc.config.get("base"), str):
            sc.config["base"] = self.resolve_path(sc.config["base"])
        for source in [*self.data.train, *self.data.eval]:
            source.path = self.resolve_path(source.path) if source.path is not None else None
            if source.aligned is not None:
                source.aligned = {k: self.resolve_path(v) for k, v in source.aligned.items()}

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def resolved_dict(self) -> dict[str, Any]:
        """The config as a dict with every local path made absolute, so it works from any folder."""
        data = self.to_dict()

        def fix(value: str | None) -> str | None:
            if value is None:
                return None
            path = Path(self.resolve_path(value))
            return str(path.resolve()) if path.exists() else value

        for section in [*data["teachers"], data["student"]]:
            for key in ("model", "tokenizer"):
                section[key] = fix(section.get(key))
        if data["student"].get("config"):
            data["student"]["config"]["base"] = fix(data["student"]["config"]["base"])
        for source in [*data["data"]["train"], *data["data"]["eval"]]:
            source["path"] = fix(source["path"])
            if source["aligned"]:
                source["aligned"] = {k: fix(v) for k, v in source["aligned"].items()}
        return data


# --------------------------------------------------------------------------- loading


def flat_fields(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config dict as ``{"a.b.c": value}``; an empty mapping is a value."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(flat_fields(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def without_fields(d: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    """A copy of the nested config dict ``d`` without the dotted ``fields``."""
    data = json.loads(json.dumps(d))
    for key in fields:
        *parents, last = key.split(".")
        node = data
        for p in parents:
            node = node.get(p, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node.pop(last, None)
    return data


def changed_fields(old: dict[str, Any], new: dict[str, Any], ignore: tuple[str, ...] = RUNTIME_FIELDS) -> list[tuple[str, Any, Any]]:
    """(field, old value, new value) of every field two config dicts disagree on, but ``ignore``."""
    a, b = flat_fields(old), flat_fields(new)

    def parent(k: str, flat: dict[str, Any]) -> bool:  # an empty mapping on one side, its fields on the other
        return any(other.startswith(k + ".") for other in flat)

    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b))
            if a.get(k) != b.get(k) and not any(k == f or k.startswith(f + ".") for f in ignore)
            and not (a.get(k) == {} and parent(k, b)) and not (b.get(k) == {} and parent(k, a))]


def _not_plain(value: Any, where: str = "", seen: frozenset[int] = frozenset()) -> str | None:
    """The dotted path of the first value JSON cannot hold (bytes, a set, a date, a cycle), or None."""
    if isinstance(value, (str, int, float, bool)) or value is None:
        return None
    if id(value) in seen:
        return where or "(top level)"
    seen = seen | {id(value)}
    if isinstance(value, dict):
        for k, v in value.items():
            key = f"{where}.{k}" if where else str(k)
            if not isinstance(k, (str, int, float, bool)) and k is not None:
                return key
            found = _not_plain(v, key, seen)
            if found:
                return found
        return None
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _not_plain(v, f"{where}[{i}]", seen)
            if found:
                return found
        return None
    return where or "(top level)"


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON file into a dict, with errors that name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{p}: line {line} is not UTF-8 (byte 0x{raw[exc.start]:02x}); save the file as UTF-8") from None
    try:
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        for mark in (getattr(exc, "context_mark", None), getattr(exc, "problem_mark", None)):
            if mark is not None:  # YAML read from a string calls it "<unicode string>"
                mark.name = str(p)
        raise ConfigError(f"{p}: not valid {'JSON' if p.suffix == '.json' else 'YAML'}: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of options, got {type(data).__name__}")
    return data


def apply_overrides(data: dict[str, Any], overrides: list[str], origin: str = "--set") -> dict[str, Any]:
    """Apply ``a.b.c=value`` overrides (value parsed as YAML) to a nested dict, in place; errors start with ``origin``."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"{origin} {item!r}: expected KEY=VALUE, e.g. training.learning_rate=3e-5")
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"{origin} {item!r}: value is not valid YAML: {exc}") from None
        set_path(data, key, value, origin)
    return data


def set_path(data: dict[str, Any], key: str, value: Any, origin: str = "--set") -> None:
    """Set the field at dotted path ``key`` (list items by index) in a nested dict, creating mappings on the way.

    Unknown field names are left for validation, which names them with a suggestion.
    """
    node: Any = data
    parts = key.strip().split(".")
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"{origin} {key}: {'.'.join(parts[:i]) or 'value'} is a list of {len(node)}; '{part}' is not an index in it")
            part = int(part)
        elif not isinstance(node, dict):
            raise ConfigError(f"{origin} {key}: {'.'.join(parts[:i])} is not a mapping")
        if last:
            node[part] = value
        else:
            child = node[part] if isinstance(node, list) else node.get(part)
            if not (child is None or isinstance(child, (bool, dict, list))):
                # None (absent) and true/false (a plugin switched on with defaults, or off) become mappings; a value does not
                raise ConfigError(f"{origin} {key}: {'.'.join(parts[: i + 1])} is {child!r}, not a mapping")
            if not isinstance(child, (dict, list)):
                child = node[part] = {}
            elif isinstance(child, dict) and parts[i + 1].isdigit():
                child = node[part] = [child]  # a single mapping given for a list field
            node = child


def load_config(
    source: str | Path | dict[str, Any] | Config,
    overrides: list[str] | None = None,
    base_dir: str | Path | None = None,
    origin: str | None = None,
) -> Config | MultiTaskConfig:
    """Load and validate a config from a YAML/JSON file, a dict or a Config.

    Relative paths resolve against the config file's folder, or ``base_dir`` for a
    dict (default: the working directory). ``origin`` names the source in errors.
    A config with ``tasks`` is a :class:`~polydistill.multitask.MultiTaskConfig`.
    """
    from polydistill.multitask import MultiTaskConfig

    if isinstance(source, MultiTaskConfig):
        if not overrides:
            return source
        base_dir = base_dir if base_dir is not None else source.base_dir
        source = source.raw
    if isinstance(source, Config):
        if not overrides:
            return source
        base_dir = base_dir if base_dir is not None else source._base_dir
        source = source.to_dict()
    if isinstance(source, dict):
        try:  # deep copy; overrides must not touch the caller's dict
            data = json.loads(json.dumps(source))
        except (TypeError, ValueError) as exc:  # bytes, sets, dates, circular references
            where = _not_plain(source)
            raise ConfigError(f"{origin or 'config'}: {where + ': ' if where else ''}values must be plain data "
                              f"(strings, numbers, lists, mappings): {exc}") from None
        base_dir = Path(base_dir).resolve() if base_dir is not None else Path.cwd()
        origin = origin or "config"
    else:
        data = read_config_file(source)
        base_dir = Path(source).resolve().parent
        origin = origin or str(source)
    apply_overrides(data, list(overrides or []))
    data.pop("$schema", None)
    if "tasks" in data:  # several tasks share one student
        from polydistill.multitask import compose

        return compose(data, base_dir, origin)
    try:
        config = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, Config, origin)) from None
    config._base_dir = base_dir
    config._resolve_paths()
    return config


# --------------------------------------------------------------------------- errors


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    if typing.get_origin(annotation) in (Union, types.UnionType, list, tuple, dict) or typing.get_args(annotation):
        for arg in typing.get_args(annotation):
            found.extend(_models_in(arg))
    return found


def _model_at(root: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] | None = root
    for part in loc:
        if model is None:
            return None
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        models = _models_in(field.annotation)
        model = models[0] if models else None
    return model


def _path(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def format_validation_error(exc: ValidationError, model: type[BaseModel], origin: str, prefix: tuple[Any, ...] = ()) -> str:
    """Turn a pydantic ValidationError into lines naming each field, with suggestions."""
    lines = []
    for err in exc.errors():
        loc = tuple(err["loc"])
        where = _path(prefix + loc)
        if err["type"] == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            allowed = sorted(parent.model_fields) if parent else []
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else (f"; valid options: {', '.join(allowed)}" if allowed else "")
            lines.append(f"  {where}: unknown option{hint}")
        elif err["type"] == "missing":
            lines.append(f"  {where}: required option is missing")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            given = err.get("input")
            shown = "" if isinstance(given, (dict, list)) or given is None else f" (got {given!r})"
            lines.append(f"  {where}: {msg}{shown}")
    n = len(lines)
    return f"{origin}: {n} invalid option{'s' if n != 1 else ''}:\n" + "\n".join(lines)


def schema() -> dict[str, Any]:
    """JSON schema of the core config (plugin sections are validated by each plugin)."""
    return Config.model_json_schema()
