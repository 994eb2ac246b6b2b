"""Reading datasets, encoding batches for every model, and length-aware batching."""

from __future__ import annotations

import itertools
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from polydistill.batch import Batch
from polydistill.config import Config, DataSource
from polydistill.errors import ConfigError, DataError
from polydistill.preflight import DATA_SUFFIXES, FORMATS, looks_local
from polydistill.tasks import Task, get_task

#: Attribute of a streamed dataset: its local files, scanned for the bad line when a read fails.
STREAMED_FILES = "_polydistill_files"


def _describe(source: DataSource) -> str:
    return source.path if source.path is not None else ", ".join(f"{k}={v}" for k, v in (source.aligned or {}).items())


def _decode_line(raw: bytes, path: str, n: int) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"data: {path} line {n}: not UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                        "convert the file to UTF-8") from None


def _aligned_rows(files: dict[str, str]) -> Iterator[dict[str, str]]:
    # Read as bytes and decode line by line, so an undecodable byte is reported with its line.
    handles = {col: open(path, "rb") for col, path in files.items()}
    try:
        for n, lines in enumerate(itertools.zip_longest(*handles.values()), start=1):
            if any(line is None for line in lines):
                short = [col for col, line in zip(handles, lines) if line is None]
                longer = [col for col in handles if col not in short]
                raise DataError(
                    f"data: aligned files differ in length: {', '.join(files[c] for c in short)} end(s) after line {n - 1}, "
                    f"{', '.join(files[c] for c in longer)} go(es) on; each line must be the translation of the same line"
                )
            yield {col: _decode_line(line, files[col], n).rstrip("\n").rstrip("\r") for col, line in zip(handles, lines)}
    finally:
        for h in handles.values():
            h.close()


def _check_utf8(path: str) -> None:
    """Raise a DataError naming the first line of ``path`` that is not UTF-8 (pyarrow reads such bytes without complaint)."""
    import codecs

    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 24), b""):
                decoder.decode(block)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        message = _explain_read_error(path, "text")
        raise DataError(message or f"data: {path} is not UTF-8") from None


def _explain_read_error(path: str, fmt: str) -> str | None:
    """The first line of ``path`` that is not UTF-8 (or, for jsonl, not JSON), as a message; None if none is."""
    try:
        with open(path, "rb") as f:
            for n, raw in enumerate(f, start=1):
                try:
                    line = _decode_line(raw, path, n)
                except DataError as exc:
                    return str(exc)
                if (fmt == "jsonl" or path.endswith(".jsonl")) and line.strip():
                    try:
                        json.loads(line)
                    except ValueError as exc:
                        return f"data: {path} line {n}: not valid JSON ({exc})"
    except OSError:
        return None
    return None


def load_source(source: DataSource, task: str, base_dir: Path) -> Any:
    """Load one source as a ``datasets`` Dataset (or IterableDataset when streaming)."""
    import datasets

    datasets.disable_progress_bars()
    where = _describe(source)
    # datasets logs its own version of a read error; ours names the file and line
    quiet = logging.getLogger("datasets")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        if source.aligned is not None:
            files = dict(source.aligned)
            for col, path in files.items():
                if not Path(path).is_file():
                    raise DataError(f"data: aligned file for column '{col}' not found: {path}")
                if Path(path).stat().st_size == 0:
                    raise DataError(f"data: aligned file for column '{col}' is empty: {path}")
            if source.streaming:
                ds = datasets.IterableDataset.from_generator(_aligned_rows, gen_kwargs={"files": files})
            else:
                rows = list(_aligned_rows(files))
                ds = datasets.Dataset.from_dict({col: [r[col] for r in rows] for col in files})
        else:
            path = source.path
            fmt = source.format
            if fmt == "auto":
                fmt = FORMATS.get(Path(path).suffix.lower(), "hub")
                if fmt == "hub" and Path(path).is_file():
                    raise DataError(f"data: cannot tell the format of {path}; set `format` (jsonl, csv, tsv, parquet)")
            local = Path(path).suffix.lower() in DATA_SUFFIXES or looks_local(source.path, base_dir)
            if fmt != "hub" and Path(path).is_dir():  # datasets reads a folder as a dataset repository (format hub)
                raise DataError(f"data: {path} is a directory; format {fmt} reads one file")
            if (fmt != "hub" or local) and not Path(path).exists():
                raise DataError(f"data: file not found: {path}" + (" (a local path, so it is not looked up on the hub)" if fmt == "hub" else ""))
            if fmt != "hub" and Path(path).is_file() and Path(path).stat().st_size == 0:
                raise DataError(f"data: file is empty: {path}")
            if fmt == "hub":
                ds = datasets.load_dataset(path, source.name, split=source.split, streaming=source.streaming)
            else:
                if fmt != "parquet" and not source.streaming:
                    _check_utf8(path)
                builder = {"jsonl": "json", "tsv": "csv"}.get(fmt, fmt)
                kwargs: dict[str, Any] = {"delimiter": "\t", "quoting": 3} if fmt == "tsv" else {}
                if fmt in ("csv", "tsv"):
                    kwargs["encoding"] = "utf-8-sig"  # a byte-order mark would otherwise start the first column's name
                ds = datasets.load_dataset(builder, data_files={"train": path}, split="train", streaming=source.streaming, **kwargs)
    except DataError:
        raise
    except Exception as exc:
        local = source.path
        explained = _explain_read_error(local, fmt) if local and Path(local).is_file() else None
        if explained:
            raise DataError(explained) from None
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        cause = exc.__cause__ or exc.__context__  # datasets wraps the reader's own error
        why = str(cause).strip().splitlines()[0] if cause is not None and str(cause).strip() else ""
        raise DataError(f"data: cannot read {where}: {type(exc).__name__}: {first}"
                        + (f" ({type(cause).__name__}: {why})" if why else "")) from None
    finally:
        quiet.setLevel(level)
    ds = normalise(ds, source, where)
    if not source.streaming and len(ds) == 0:
        raise DataError(f"data {where}: no rows{' left after `filter`' if source.filter else ''}")
    if not source.streaming:
        check_values(ds, source, task, where)
    if source.streaming:
        local = list(files.values()) if source.aligned is not None else ([path] if fmt != "hub" else [])
        setattr(ds, STREAMED_FILES, local)
    return ds


def load_data(source: DataSource | dict[str, Any], config: Config, labels: list[str] | None = None) -> Any:
    """One data source, read and checked as the run's own data: columns renamed to text/source/label/lang.

    ``source`` is a :class:`~polydistill.config.DataSource` or its mapping
    (``{"path": ..., "columns": {...}, "limit": ...}``); relative paths resolve
    like the config's. Plugins read their own data files through this (API 1.2).
    """
    from pydantic import ValidationError

    from polydistill.config import format_validation_error

    if isinstance(source, dict):
        try:
            source = DataSource.model_validate(source)
        except ValidationError as exc:
            raise ConfigError(format_validation_error(exc, DataSource, "data source")) from None
    # a plugin's paths are its own settings': resolved here as the config's own were when it loaded
    source = source.model_copy(update={
        "path": config.resolve_path(source.path) if source.path is not None else None,
        "aligned": {k: config.resolve_path(v) for k, v in source.aligned.items()} if source.aligned is not None else None,
    })
    return load_sources([source], config, labels)


def check_values(ds: Any, source: DataSource, task: str, where: str) -> None:
    """The mapped columns of an in-memory dataset hold what the task reads: text (or, for token
    tasks, lists of words) and language tags as strings, no nulls, as many tags as words."""
    cols = source.columns
    spec = get_task(task)
    words = spec.text_is_words
    roles = {"text": cols.text, "source": cols.source, "lang": cols.lang, "target": cols.target, "context": cols.context}
    for role, column in roles.items():
        if column is None or role not in ds.column_names:
            continue
        listed = words and role in ("text", "source")
        expect = "a list of words (strings)" if listed else "a string"
        for n, value in enumerate(ds[role]):
            if listed:
                good = isinstance(value, (list, tuple)) and all(isinstance(w, str) for w in value)
            elif role == "target":
                expect = spec.target_error(value) or ""
                good = not expect
            else:
                good = isinstance(value, str)
            if not good:
                shown = "null" if value is None else f"{type(value).__name__} {value!r}"[:80]
                raise DataError(f"data {where}: row {n + 1}: column '{column}' (columns.{role}) is {shown}; expected {expect}")
    if words and cols.label is not None and "label" in ds.column_names:
        for n, (text, tags) in enumerate(zip(ds["text"], ds["label"])):
            if tags is None or len(tags) != len(text):
                got = "null" if tags is None else f"{len(tags)} tags"
                raise DataError(f"data {where}: row {n + 1}: {len(text)} words (columns.text '{cols.text}') but {got} "
                                f"(columns.label '{cols.label}'); each word needs one tag")


def check_labels(ds: Any, labels: list[str], task: str, where: str, column: str) -> None:
    """Every label of an in-memory dataset is a name in ``labels`` or an id below ``len(labels)``."""
    known = set(labels)
    row_labels = get_task(task).row_labels

    def ok(v: Any) -> bool:
        return v in known if isinstance(v, str) else isinstance(v, (int, np.integer)) and not isinstance(v, bool) and 0 <= v < len(labels)

    try:
        values = {v for row in ds["label"] for v in row_labels(row)}
    except TypeError:  # a column of mixed types (names and ids) cannot be a set's
        values = [v for row in ds["label"] for v in row_labels(row)]
    if all(ok(v) for v in values):
        return
    for n, row in enumerate(ds["label"]):
        bad = [v for v in row_labels(row) if not ok(v)]
        if bad:
            raise DataError(f"data {where}: row {n + 1}: label {bad[0]!r} (column '{column}') is not one of the labels "
                            f"{labels} (nor an id 0..{len(labels) - 1})")


def normalise(ds: Any, source: DataSource, where: str) -> Any:
    """Keep and rename the mapped columns to text/source/label/lang; apply filter, limit and sample."""
    cols = source.columns
    names = list(ds.column_names or [])
    wanted = {"text": cols.text, "source": cols.source, "label": cols.label, "lang": cols.lang, "target": cols.target,
              "context": cols.context}
    for role, col in wanted.items():
        if col is not None and names and col not in names:
            raise DataError(f"data {where}: column '{col}' (columns.{role}) not found; columns are: {', '.join(names)}")
    for key in (source.filter or {}):
        if names and key not in names:
            raise DataError(f"data {where}: filter column '{key}' not found; columns are: {', '.join(names)}")
    if source.filter:
        expected = dict(source.filter)
        ds = ds.filter(lambda row: all(row[k] == v for k, v in expected.items()))
    if source.limit is not None:
        ds = ds.take(source.limit) if source.streaming else ds.select(range(min(source.limit, len(ds))))
    if source.sample is not None and source.sample < len(ds):
        picked = np.random.default_rng(source.sample_seed).choice(len(ds), size=source.sample, replace=False)
        ds = ds.select(np.sort(picked).tolist())
    keep = {}
    copies = {}  # one column mapped to two roles (e.g. text and source) is read twice
    for role, col in wanted.items():
        if col is None:
            continue
        if col in keep:
            copies[role] = keep[col]
        else:
            keep[col] = role
    ds = ds.select_columns(list(keep))
    ds = ds.rename_columns({c: r for c, r in keep.items() if c != r}) if any(c != r for c, r in keep.items()) else ds
    if copies:
        ds = ds.map(lambda row: {role: row[src] for role, src in copies.items()})
    if "lang" not in keep.values():
        lang = source.lang or "und"
        if source.streaming:
            ds = ds.map(lambda row: {"lang": lang})
        else:
            ds = ds.add_column("lang", [lang] * len(ds))
    return ds


def _plain_strings(ds: Any) -> Any:
    """Cast ``large_string`` columns to ``string``: csv/tsv/parquet load text as the
    former and json/aligned files as the latter, and the two cannot be concatenated."""
    from datasets import Features, Value
    from datasets.features.features import _visit

    features = getattr(ds, "features", None)
    if not features:
        return ds
    plain = Features({k: _visit(v, lambda f: Value("string") if isinstance(f, Value) and f.dtype == "large_string" else None)
                      for k, v in features.items()})
    return ds if plain == features else ds.cast(plain)


def load_sources(sources: list[DataSource], config: Config, labels: list[str] | None = None) -> Any:
    """Load and concatenate sources (all streaming or none); with ``labels``, check every in-memory label."""
    import datasets

    loaded = [load_source(s, config.task, config._base_dir) for s in sources]
    if labels and get_task(config.task).named_labels:
        for s, ds in zip(sources, loaded):
            if s.columns.label is not None and not s.streaming:
                check_labels(ds, labels, config.task, _describe(s), s.columns.label)
    if len(loaded) == 1:
        return loaded[0]
    if len({s.streaming for s in sources}) > 1:
        raise DataError("data: mix of streaming and non-streaming sources; set `streaming` the same on all")
    try:
        combined = datasets.concatenate_datasets([_plain_strings(ds) for ds in loaded])
    except Exception as exc:
        raise DataError(f"data: sources cannot be combined (columns or types differ): {exc}") from None
    if sources[0].streaming:
        setattr(combined, STREAMED_FILES, [f for ds in loaded for f in getattr(ds, STREAMED_FILES, ())])
    return combined


# --------------------------------------------------------------------------- encoding


def tokenizer_spec(tokenizer: Any) -> dict[str, Any]:
    """What a fast tokenizer computes (its backend's JSON), without per-call settings."""
    # The backend keeps the truncation/padding of the last call; they are not part of the tokenizer.
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return spec


def same_tokenizer(a: Any, b: Any) -> bool:
    return a is b or tokenizer_spec(a) == tokenizer_spec(b)


class Collator:
    """Encode raw rows into a :class:`Batch` for the student and every teacher."""

    def __init__(
        self,
        task: str | Task,
        student_tokenizer: Any,
        teacher_tokenizers: list[Any],
        max_length: int,
        padding: str = "longest",
        labels: list[str] | None = None,
        parallel: bool = False,
    ):
        self.task = get_task(task)
        self.student_tokenizer = student_tokenizer
        # None: the teacher shares the student's tokenizer, so it can share the encoding.
        self.teacher_tokenizers = [None if same_tokenizer(t, student_tokenizer) else t for t in teacher_tokenizers]
        self.max_length = max_length
        self.padding = padding
        self.labels = labels
        self.label2id = {name: i for i, name in enumerate(labels or [])}
        self.parallel = parallel
        self.words = self.task.text_is_words
        self.pairs = self.task.reads_context

    def texts(self, rows: Any) -> list[Any]:
        """The texts of ``rows`` (a column mapping, or a dataset): (text, context) pairs for a task that reads both."""
        return list(zip(rows["text"], rows["context"])) if self.pairs else rows["text"]

    def __call__(self, rows: dict[str, list[Any]]) -> Batch:
        texts = self.texts(rows)
        teacher_texts = rows["source"] if self.parallel else texts
        labels = self.encode_labels(rows.get("label"), texts) if "label" in rows else None
        meta = {"index": rows["__index__"]} if "__index__" in rows else {}
        return self.encode(texts, teacher_texts, rows["lang"], labels, meta, rows.get("target"))

    def encode_labels(self, raw: list[Any] | None, texts: list[Any]) -> torch.Tensor | None:
        if raw is None:
            return None
        return self.task.encode_labels(raw, texts, self._label_id)

    def _label_id(self, value: Any) -> int:
        if isinstance(value, str) and value in self.label2id:
            return self.label2id[value]
        if isinstance(value, (int, np.integer)) and 0 <= int(value) < max(len(self.label2id), 1):
            return int(value)
        known = ", ".join(self.label2id) or "none"
        raise DataError(f"label {value!r} (column `label`) is not one of the labels: {known}")

    def _check_texts(self, texts: list[Any]) -> None:
        # Loaded data is checked when it loads (check_values); streamed rows are checked here.
        for text in texts:
            if self.pairs:
                good = isinstance(text, (list, tuple)) and len(text) == 2 and all(isinstance(t, str) for t in text)
            elif self.words:
                good = isinstance(text, (list, tuple)) and all(isinstance(w, str) for w in text)
            else:
                good = isinstance(text, str)
            if not good:
                shown = "null" if text is None else f"{type(text).__name__} {text!r}"[:80]
                expect = "a (question, context) pair of strings" if self.pairs else "a list of words (strings)" if self.words else "a string"
                raise DataError(f"data.train: a row's text (columns.text, or columns.source) is {shown}; expected {expect}")

    def _encode_one(self, tokenizer: Any, texts: list[Any], targets: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]:
        self._check_texts(texts)
        if targets is not None:
            for t in targets:
                expect = self.task.target_error(t)
                if expect:
                    raise DataError(f"data.train: a row's target (columns.target) is {'null' if t is None else type(t).__name__}; expected {expect}")
        return self.task.encode(tokenizer, texts, self.max_length, self.padding, targets)

    def encode(self, texts: list[Any], teacher_texts: list[Any], langs: list[str], labels: torch.Tensor | None, meta: dict[str, Any],
               targets: list[str] | None = None) -> Batch:
        student_inputs, student_words, from_text = self._encode_one(self.student_tokenizer, texts, targets)
        if from_text is not None:  # the task's labels come from the text (a language model's next tokens)
            labels = from_text
        teacher_inputs, teacher_words = [], []
        cache: dict[int, tuple[dict[str, torch.Tensor], torch.Tensor | None, torch.Tensor | None]] = {}
        for tok in self.teacher_tokenizers:
            if tok is None and teacher_texts is texts:
                teacher_inputs.append(student_inputs)
                teacher_words.append(student_words)
                continue
            key = id(tok)
            if key not in cache:
                cache[key] = self._encode_one(tok or self.student_tokenizer, teacher_texts, targets)
            teacher_inputs.append(cache[key][0])
            teacher_words.append(cache[key][1])
        if labels is not None and student_words is not None:
            if labels.size(1) != student_words.size(1):
                raise DataError("augmented token-task text changed the number of words; labels no longer align")
            # words cut off by max_length have no logits: their labels must not count
            labels = labels.masked_fill(student_words < 0, -100)
        return Batch(
            texts=texts,
            teacher_texts=teacher_texts,
            langs=list(langs),
            student_inputs=student_inputs,
            teacher_inputs=teacher_inputs,
            labels=labels,
            student_words=student_words,
            teacher_words=teacher_words,
            meta=meta,
            encoder=self.encode,
            targets=None if targets is None else list(targets),
        )

    def lengths(self, texts: list[Any], chunk: int = 4096) -> np.ndarray:
        """Token counts (after truncation) of ``texts`` under the student's tokenizer."""
        out = np.empty(len(texts), dtype=np.int32)
        for start in range(0, len(texts), chunk):
            part = list(texts[start : start + chunk])
            self._check_texts(part)
            ids = self.student_tokenizer(part, is_split_into_words=self.words, truncation=True, max_length=self.max_length)["input_ids"]
            out[start : start + len(part)] = [len(x) for x in ids]
        return out


# --------------------------------------------------------------------------- batching


def plan_batches(
    lengths: np.ndarray | None,
    n: int,
    batch_size: int,
    seed: int,
    shuffle: bool,
    group: bool,
    megabatch: int = 50,
) -> list[np.ndarray]:
    """Index batches for one epoch; deterministic for a seed.

    With ``group``, indices are shuffled, cut into mega-batches of
    ``batch_size * megabatch``, each sorted by length and cut into batches,
    and the batch order shuffled: batches hold texts of similar length while
    the epoch stays random.
    """
    rng = np.random.default_rng(seed)
    order = rng.permutation(n) if shuffle else np.arange(n)
    if group and lengths is not None:
        if shuffle:
            size = batch_size * megabatch
            order = np.concatenate(
                [chunk[np.argsort(-lengths[chunk], kind="stable")] for chunk in np.array_split(order, max(1, math.ceil(n / size)))]
            ) if n else order
        else:
            order = np.argsort(-lengths, kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
    if shuffle and group and len(batches) > 1:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


class BatchSource:
    """What the loop reads batches from: :meth:`iterate`; ``len()`` is the number of batches per epoch, where known."""

    #: Why ``len()`` has no answer (a source whose epochs have a length overrides ``__len__``).
    no_length = "this batch source has no epoch length; set training.max_steps"

    def __len__(self) -> int:
        raise TypeError(self.no_length)

    def iterate(self, epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        """Batches of ``epoch``, leaving out the first ``skip`` (resume)."""
        raise NotImplementedError


class Loader(BatchSource):
    """Yields encoded batches of an in-memory dataset: one shard of a seeded epoch plan."""

    def __init__(
        self,
        dataset: Any,
        collator: Collator,
        batch_size: int,
        seed: int,
        shuffle: bool,
        group: bool,
        num_shards: int = 1,
        shard: int = 0,
    ):
        self.dataset = dataset
        self.collator = collator
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.num_shards = num_shards
        self.shard = shard
        self.lengths = collator.lengths(collator.texts(dataset)) if group else None
        self.group = group

    def batches(self, epoch: int) -> list[np.ndarray]:
        plan = plan_batches(self.lengths, len(self.dataset), self.batch_size, self.seed + epoch, self.shuffle, self.group)
        per_shard = len(plan) // self.num_shards if self.num_shards > 1 else len(plan)
        return plan[self.shard :: self.num_shards][:per_shard]

    def __len__(self) -> int:
        n = math.ceil(len(self.dataset) / self.batch_size)
        return n // self.num_shards if self.num_shards > 1 else n

    def iterate(self, epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        for idx in self.batches(epoch)[skip:]:
            rows = self.dataset[idx.tolist()] if len(idx) else {}
            rows["__index__"] = idx.tolist()
            yield self.collator(rows)

    def padding_stats(self, epoch: int = 0) -> float:
        """Fraction of real (non-pad) tokens in the epoch's batches."""
        if self.lengths is None:
            self.lengths = self.collator.lengths(self.collator.texts(self.dataset))
        real = padded = 0
        for idx in self.batches(epoch):
            ls = self.lengths[idx]
            real += int(ls.sum())
            width = self.collator.max_length if self.collator.padding == "max_length" else int(ls.max())
            padded += width * len(idx)
        return real / max(padded, 1)


class StreamLoader(BatchSource):
    """Yields encoded batches from a streamed dataset with memory bounded by ``buffer`` rows.

    Rows are read ``buffer`` at a time; each buffer is shuffled (seeded), sorted
    by length in mega-batches when grouping, and cut into batches.
    """

    no_length = "a streamed dataset has no length; set training.max_steps"

    def __init__(self, dataset: Any, collator: Collator, batch_size: int, seed: int, shuffle: bool, group: bool, buffer: int, num_shards: int = 1, shard: int = 0):
        self.dataset = dataset
        self.collator = collator
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.group = group
        self.buffer = max(buffer, batch_size)
        self.num_shards = num_shards
        self.shard = shard


    def iterate(self, epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        rows = iter(self.dataset)
        count = 0
        for part in itertools.count():
            try:
                chunk = list(itertools.islice(rows, self.buffer))
            except UnicodeDecodeError as exc:  # not checked up front: a stream is read once, as it trains
                for path in getattr(self.dataset, STREAMED_FILES, ()):  # name the line: scan the local files now
                    explained = _explain_read_error(path, "text")
                    if explained:
                        raise DataError(f"{explained} (streamed, after {count} batches)") from None
                raise DataError(f"data.train: a streamed source is not UTF-8 after {count} batches ({exc})") from None
            if not chunk:
                return
            texts = self.collator.texts({k: [r[k] for r in chunk] for k in ("text", "context") if k in chunk[0]})
            lengths = self.collator.lengths(texts) if self.group else None
            plan = plan_batches(lengths, len(chunk), self.batch_size, self.seed + 1000003 * epoch + part, self.shuffle, self.group)
            for b, idx in enumerate(plan):
                if b % self.num_shards != self.shard:
                    continue
                count += 1
                if count <= skip:
                    continue
                picked = [chunk[i] for i in idx]
                cols = {k: [r[k] for r in picked] for k in picked[0]}
                yield self.collator(cols)


class PlaceholderLoader(BatchSource):
    """Endless empty batches for runs without training data, for a plugin to fill in ``augment_batch``.

    Each batch has no texts and no inputs; ``batch.meta["batch_size"]`` says
    how many examples the generating plugin should make.
    """

    no_length = "a run without training data has no epoch length; set training.max_steps"

    def __init__(self, batch_size: int):
        self.batch_size = batch_size

    def iterate(self, epoch: int = 0, skip: int = 0) -> Iterator[Batch]:
        while True:
            yield Batch(texts=[], teacher_texts=[], langs=[], student_inputs={}, teacher_inputs=[],
                        meta={"batch_size": self.batch_size, "placeholder": True})


def make_loader(dataset: Any, collator: Collator, batch_size: int, seed: int, shuffle: bool, group: bool, buffer: int = 10000, num_shards: int = 1, shard: int = 0) -> BatchSource:
    import datasets

    if dataset is None:
        return PlaceholderLoader(batch_size)
    if isinstance(dataset, datasets.IterableDataset):
        return StreamLoader(dataset, collator, batch_size, seed, shuffle, group, buffer, num_shards, shard)
    return Loader(dataset, collator, batch_size, seed, shuffle, group, num_shards, shard)
