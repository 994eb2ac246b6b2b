"""Data: batch planning, sharded loading, reading every source format, streaming, and the collator."""

from __future__ import annotations

import csv
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

import polydistill
from polydistill import models as M
from polydistill.data import Collator, Loader, StreamLoader, load_sources, make_loader, plan_batches

from conftest import LABELS, PAIRS, write_jsonl

TAGS = ["O", "B-FOOD", "I-FOOD"]


def _config(train, **data) -> polydistill.Config:
    return polydistill.load_config({
        "task": "sequence_classification",
        "labels": LABELS,
        "student": {"model": "unused"},
        "data": {"train": train, **data},
    })


def _load(train) -> object:
    cfg = _config(train)
    return load_sources(cfg.data.train, cfg)


@pytest.fixture(scope="module")
def tok(models):
    return M.load_tokenizer(str(models["teacher"]))


@pytest.fixture(scope="module")
def other_tok(models):
    return M.load_tokenizer(str(models["other_tok"]))


# --------------------------------------------------------------------------- plan_batches


def _real_fraction(lengths: np.ndarray, plan: list[np.ndarray]) -> float:
    return float(lengths.sum() / sum(int(lengths[b].max()) * len(b) for b in plan))


@pytest.mark.parametrize("group", [False, True])
@pytest.mark.parametrize("shuffle", [False, True])
def test_plan_covers_every_index_exactly_once(group, shuffle):
    lengths = np.random.default_rng(0).integers(1, 60, size=103)
    plan = plan_batches(lengths, len(lengths), 8, seed=5, shuffle=shuffle, group=group)
    flat = np.concatenate(plan)
    assert sorted(flat.tolist()) == list(range(103))
    assert [len(b) for b in plan].count(8) == 12 and sorted(len(b) for b in plan)[0] == 103 - 12 * 8


def test_plan_is_deterministic_per_seed_and_changes_between_epochs():
    lengths = np.random.default_rng(1).integers(1, 60, size=200)
    for group in (False, True):
        a = plan_batches(lengths, 200, 8, seed=7, shuffle=True, group=group)
        b = plan_batches(lengths, 200, 8, seed=7, shuffle=True, group=group)
        c = plan_batches(lengths, 200, 8, seed=8, shuffle=True, group=group)
        assert [x.tolist() for x in a] == [x.tolist() for x in b]
        assert np.concatenate(a).tolist() != np.concatenate(c).tolist()
    # without shuffling the order is the natural one
    assert np.concatenate(plan_batches(None, 20, 6, seed=3, shuffle=False, group=False)).tolist() == list(range(20))


def test_length_grouping_cuts_padding_on_long_tailed_lengths():
    # Measured: without grouping ~0.30 of the padded tokens are real, with grouping ~0.87 (about 2.9x).
    lengths = np.clip(np.random.default_rng(0).lognormal(3.0, 0.8, size=5000).astype(int), 2, 512)
    for seed in (1, 2):
        plain = _real_fraction(lengths, plan_batches(lengths, len(lengths), 16, seed, shuffle=True, group=False))
        grouped = _real_fraction(lengths, plan_batches(lengths, len(lengths), 16, seed, shuffle=True, group=True))
        assert grouped >= 2.0 * plain
        assert grouped >= 0.8


def test_grouped_batches_are_not_ordered_by_length():
    """Grouping sorts inside mega-batches but the batch order stays shuffled."""
    lengths = np.random.default_rng(2).integers(1, 100, size=4000)
    plan = plan_batches(lengths, 4000, 16, seed=0, shuffle=True, group=True, megabatch=5)
    maxima = [int(lengths[b].max()) for b in plan]
    assert maxima != sorted(maxima, reverse=True) and maxima != sorted(maxima)


# --------------------------------------------------------------------------- Loader


@pytest.fixture(scope="module")
def dataset():
    import datasets

    texts = [de for _, de, _ in PAIRS] + [en for en, _, _ in PAIRS] + ["ja", "das team"]
    return datasets.Dataset.from_dict({"text": texts, "lang": ["xx"] * len(texts)})


def test_sharded_loader_shards_are_disjoint_and_equally_long(dataset, tok):
    col = Collator("embedding", tok, [tok], 32)
    for epoch in (0, 1):
        shards = [Loader(dataset, col, 3, seed=4, shuffle=True, group=True, num_shards=2, shard=s) for s in (0, 1)]
        seen = []
        for loader in shards:
            batches = list(loader.iterate(epoch))
            assert len(batches) == len(loader) == len(loader.batches(epoch)) == len(dataset) // 3 // 2
            idx = [i for b in batches for i in b.meta["index"]]
            assert all(b.texts == [dataset[i]["text"] for i in b.meta["index"]] for b in batches)
            seen.append(idx)
        assert not set(seen[0]) & set(seen[1])
        assert len(set(seen[0]) | set(seen[1])) == len(seen[0]) + len(seen[1])


def test_loader_epochs_are_seeded(dataset, tok):
    col = Collator("embedding", tok, [tok], 32)
    a = Loader(dataset, col, 4, seed=1, shuffle=True, group=True)
    b = Loader(dataset, col, 4, seed=1, shuffle=True, group=True)
    plans = [[x.tolist() for x in a.batches(e)] for e in range(3)]
    assert plans[1] == [x.tolist() for x in b.batches(1)]
    assert plans[0] != plans[1] and plans[1] != plans[2]
    assert [x.tolist() for x in Loader(dataset, col, 4, seed=2, shuffle=True, group=True).batches(0)] != plans[0]


def test_loader_skip_yields_the_batches_after_the_first_k(dataset, tok):
    col = Collator("embedding", tok, [tok], 32)
    loader = Loader(dataset, col, 4, seed=1, shuffle=True, group=True)
    full = [b.meta["index"] for b in loader.iterate(2)]
    assert len(full) == len(loader) == 7
    for k in (0, 1, 5, 7):
        assert [b.meta["index"] for b in loader.iterate(2, skip=k)] == full[k:]
    assert sorted(i for b in full for i in b) == list(range(len(dataset)))


# --------------------------------------------------------------------------- loading files

ROWS = [
    {"text": 'er sagte "hallo" zu mir', "label": "food", "lang": "de", "split": "train"},
    {"text": '"anfang mit anführungszeichen', "label": "sports", "lang": "de", "split": "test"},
    {"text": "it's a 'single' quote", "label": "weather", "lang": "en", "split": "train"},
    {"text": "comma, inside", "label": "food", "lang": "en", "split": "train"},
]


def _write(path: Path, fmt: str) -> Path:
    if fmt == "jsonl":
        write_jsonl(path, ROWS)
    elif fmt == "csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(ROWS[0]))
            w.writeheader()
            w.writerows(ROWS)
    elif fmt == "tsv":  # written by hand: quotes are plain characters in a TSV
        lines = ["\t".join(ROWS[0])] + ["\t".join(r.values()) for r in ROWS]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    elif fmt == "parquet":
        import pandas as pd

        pd.DataFrame(ROWS).to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "tsv", "parquet"])
def test_load_each_file_format(tmp_path, fmt):
    path = _write(tmp_path / f"rows.{fmt}", fmt)
    ds = _load({"path": str(path), "columns": {"label": "label", "lang": "lang"}})
    assert sorted(ds.column_names) == ["label", "lang", "text"]
    assert list(ds["text"]) == [r["text"] for r in ROWS]
    assert list(ds["label"]) == [r["label"] for r in ROWS]
    assert list(ds["lang"]) == [r["lang"] for r in ROWS]


def test_tsv_keeps_quote_characters(tmp_path):
    path = _write(tmp_path / "rows.tsv", "tsv")
    ds = _load({"path": str(path)})
    assert ds[0]["text"] == 'er sagte "hallo" zu mir'
    assert ds[1]["text"] == '"anfang mit anführungszeichen'


def test_explicit_format_overrides_extension(tmp_path):
    path = _write(tmp_path / "rows.txt", "tsv")
    ds = _load({"path": str(path), "format": "tsv"})
    assert list(ds["text"]) == [r["text"] for r in ROWS]
    with pytest.raises(polydistill.DataError, match="format"):
        _load({"path": str(path)})


def test_aligned_plain_text_files(tmp_path):
    (tmp_path / "x.en").write_text("\n".join(en for en, _, _ in PAIRS) + "\n", encoding="utf-8")
    (tmp_path / "x.de").write_text("\r\n".join(de for _, de, _ in PAIRS) + "\r\n", encoding="utf-8")
    ds = _load({"aligned": {"en": str(tmp_path / "x.en"), "de": str(tmp_path / "x.de")},
                "columns": {"text": "de", "source": "en"}, "lang": "de"})
    assert sorted(ds.column_names) == ["lang", "source", "text"]
    assert list(ds["text"]) == [de for _, de, _ in PAIRS]
    assert list(ds["source"]) == [en for en, _, _ in PAIRS]
    assert list(ds["lang"]) == ["de"] * len(PAIRS)


def test_aligned_files_of_different_length_name_the_short_file(tmp_path):
    (tmp_path / "long.en").write_text("one\ntwo\nthree\n", encoding="utf-8")
    (tmp_path / "short.de").write_text("eins\nzwei\n", encoding="utf-8")
    with pytest.raises(polydistill.DataError, match=r"short\.de") as err:
        _load({"aligned": {"en": str(tmp_path / "long.en"), "de": str(tmp_path / "short.de")},
               "columns": {"text": "de", "source": "en"}})
    assert "short.de end(s) after line 2" in str(err.value) and str(err.value).index("short.de") < str(err.value).index("long.en")


def test_missing_aligned_file_is_named(tmp_path):
    (tmp_path / "a.en").write_text("one\n", encoding="utf-8")
    with pytest.raises(polydistill.DataError, match=r"nope\.de"):
        _load({"aligned": {"en": str(tmp_path / "a.en"), "de": str(tmp_path / "nope.de")}, "columns": {"text": "de"}})


def test_missing_column_names_it_and_lists_the_columns(tmp_path):
    path = _write(tmp_path / "rows.jsonl", "jsonl")
    with pytest.raises(polydistill.DataError) as err:
        _load({"path": str(path), "columns": {"label": "category"}})
    msg = str(err.value)
    assert "'category'" in msg and "columns.label" in msg
    for col in ("text", "label", "lang", "split"):
        assert col in msg.split("columns are:")[1]


def test_missing_file_is_named(tmp_path):
    with pytest.raises(polydistill.DataError, match=r"missing\.jsonl"):
        _load({"path": str(tmp_path / "missing.jsonl")})


def test_filter_and_limit(tmp_path):
    path = _write(tmp_path / "rows.jsonl", "jsonl")
    ds = _load({"path": str(path), "filter": {"split": "train"}, "columns": {"lang": "lang"}})
    assert list(ds["text"]) == [r["text"] for r in ROWS if r["split"] == "train"]
    ds = _load({"path": str(path), "filter": {"split": "train", "lang": "en"}, "limit": 1})
    assert list(ds["text"]) == [ROWS[2]["text"]]
    ds = _load({"path": str(path), "limit": 2})
    assert list(ds["text"]) == [r["text"] for r in ROWS[:2]]
    with pytest.raises(polydistill.DataError, match="'splitt'"):
        _load({"path": str(path), "filter": {"splitt": "train"}})


def test_lang_comes_from_the_source_without_a_lang_column(tmp_path):
    path = _write(tmp_path / "rows.jsonl", "jsonl")
    assert list(_load({"path": str(path), "lang": "sw"})["lang"]) == ["sw"] * len(ROWS)
    assert list(_load({"path": str(path)})["lang"]) == ["und"] * len(ROWS)
    # a lang column, when mapped, wins over the constant
    assert list(_load({"path": str(path), "lang": "sw", "columns": {"lang": "lang"}})["lang"]) == [r["lang"] for r in ROWS]


@pytest.mark.parametrize("streaming", [False, True])
def test_sources_of_different_formats_are_concatenated(tmp_path, streaming):
    # json gives `string` columns, csv/tsv/parquet `large_string`: they must still combine
    a = _write(tmp_path / "a.jsonl", "jsonl")
    b = _write(tmp_path / "b.tsv", "tsv")
    c = _write(tmp_path / "c.parquet", "parquet")
    ds = _load([{"path": str(a), "lang": "x", "streaming": streaming},
                {"path": str(b), "lang": "y", "streaming": streaming},
                {"path": str(c), "streaming": streaming, "columns": {"lang": "lang"}}])
    rows = list(ds)
    assert [r["text"] for r in rows] == [r["text"] for r in ROWS] * 3
    assert [r["lang"] for r in rows] == ["x"] * len(ROWS) + ["y"] * len(ROWS) + [r["lang"] for r in ROWS]


def test_mixing_streaming_and_loaded_sources_is_an_error(tmp_path):
    a = _write(tmp_path / "a.jsonl", "jsonl")
    with pytest.raises(polydistill.DataError, match="streaming"):
        _load([{"path": str(a)}, {"path": str(a), "streaming": True}])


# --------------------------------------------------------------------------- streaming


def test_streaming_jsonl_covers_every_row_once(tmp_path, tok):
    texts = [f"{de} {i}" for i, (_, de, _) in enumerate(PAIRS * 3)]  # 36 distinct rows
    path = write_jsonl(tmp_path / "big.jsonl", [{"de": t, "n": i} for i, t in enumerate(texts)])
    cfg = _config({"path": str(path), "streaming": True, "columns": {"text": "de"}, "lang": "de"},
                  batch_size=4, stream_buffer=10)
    ds = load_sources(cfg.data.train, cfg)
    col = Collator("embedding", tok, [tok], 32)
    dc = cfg.data
    loader = make_loader(ds, col, dc.batch_size, 0, dc.shuffle, dc.length_grouping, dc.stream_buffer)
    assert isinstance(loader, StreamLoader)
    with pytest.raises(TypeError, match="max_steps"):
        len(loader)
    for epoch in (0, 1):
        batches = list(loader.iterate(epoch))
        seen = Counter(t for b in batches for t in b.texts)
        assert seen == Counter(texts)
        assert all(len(b) <= 4 for b in batches)
        assert all(b.langs == ["de"] * len(b) for b in batches)
    # skip drops exactly the first k batches
    assert [b.texts for b in loader.iterate(1, skip=3)] == [b.texts for b in loader.iterate(1)][3:]


# --------------------------------------------------------------------------- collator


def test_token_classification_first_subword_positions(models):
    tok = M.load_tokenizer(str(models["tagger"]))
    words = [["the", "thunderstorm", "soup"], ["schokolade", "is", "hot", "today", "mountainous"]]
    assert len(tok.tokenize("thunderstorm")) > 1 and len(tok.tokenize("mountainous")) > 1  # really split
    tags = [["O", "B-FOOD", "O"], ["B-FOOD", "I-FOOD", "O", "O", "B-FOOD"]]
    col = Collator("token_classification", tok, [tok], 32, labels=TAGS)
    batch = col({"text": words, "label": tags, "lang": ["en", "en"]})
    assert batch.student_words.shape == (2, 5) and batch.labels.shape == (2, 5)
    for i, ws in enumerate(words):
        pos = batch.student_words[i, : len(ws)].tolist()
        got = tok.convert_ids_to_tokens(batch.student_inputs["input_ids"][i, pos].tolist())
        assert got == [tok.tokenize(w)[0] for w in ws]
        assert batch.student_words[i, len(ws):].tolist() == [-1] * (5 - len(ws))
    assert batch.labels.tolist() == [[0, 1, 0, -100, -100], [1, 2, 0, 0, 1]]
    assert batch.teacher_words[0] is batch.student_words


def test_parallel_mode_encodes_teacher_and_student_apart(tok):
    col = Collator("sequence_classification", tok, [tok], 32, labels=LABELS, parallel=True)
    rows = {"text": [de for _, de, _ in PAIRS[:3]], "source": [en for en, _, _ in PAIRS[:3]],
            "label": [lab for *_, lab in PAIRS[:3]], "lang": ["de"] * 3}
    batch = col(rows)
    assert batch.teacher_inputs[0] is not batch.student_inputs
    assert batch.teacher_texts == rows["source"] and batch.texts == rows["text"]
    assert tok.batch_decode(batch.teacher_inputs[0]["input_ids"], skip_special_tokens=True) == rows["source"]
    assert tok.batch_decode(batch.student_inputs["input_ids"], skip_special_tokens=True) == rows["text"]
    assert batch.labels.tolist() == [0, 0, 0]


def test_same_mode_shares_the_encoding_only_with_the_same_tokenizer(tok, other_tok, models):
    rows = {"text": [en for en, _, _ in PAIRS[:3]], "lang": ["en"] * 3}
    tok(["warm up"], padding=True, truncation=True, max_length=8)  # leaves padding state in the backend
    same = Collator("embedding", tok, [tok, M.load_tokenizer(str(models["teacher2"]))], 32)(rows)
    assert same.teacher_inputs[0] is same.student_inputs
    assert same.teacher_inputs[1] is same.student_inputs  # an equal tokenizer loaded separately shares too
    mixed = Collator("embedding", other_tok, [tok], 32)(rows)
    assert mixed.teacher_inputs[0] is not mixed.student_inputs
    assert mixed.teacher_inputs[0]["input_ids"].tolist() == tok(rows["text"], padding=True)["input_ids"]
    assert mixed.student_inputs["input_ids"].tolist() == other_tok(rows["text"], padding=True)["input_ids"]


def test_replace_texts_reencodes_for_every_model(tok, other_tok):
    rows = {"text": ["the soup is hot", "it rains"], "lang": ["en", "en"]}
    # same mode, one teacher sharing the student's tokenizer and one with its own
    batch = Collator("embedding", tok, [tok, other_tok], 32)(rows)
    new = batch.replace_texts(texts=["the wind is cold today", "snow"])
    assert new.texts == new.teacher_texts == ["the wind is cold today", "snow"]
    assert new.teacher_inputs[0] is new.student_inputs
    assert tok.batch_decode(new.student_inputs["input_ids"], skip_special_tokens=True) == new.texts
    assert new.teacher_inputs[1]["input_ids"].tolist() == other_tok(new.texts, padding=True)["input_ids"]
    assert batch.texts == rows["text"]  # the original batch is unchanged
    assert tok.batch_decode(batch.student_inputs["input_ids"], skip_special_tokens=True) == rows["text"]

    # parallel mode: only the teacher side changes
    pcol = Collator("embedding", tok, [tok], 32, parallel=True)
    pb = pcol({"text": ["die suppe", "es regnet"], "source": ["the soup", "it rains"], "lang": ["de", "de"]})
    changed = pb.replace_texts(teacher_texts=["the soup !", "it rains !"], tag=1)
    assert changed.texts == ["die suppe", "es regnet"]
    assert changed.teacher_texts == ["the soup !", "it rains !"]
    assert changed.teacher_inputs[0]["input_ids"].tolist() == tok(changed.teacher_texts, padding=True)["input_ids"]
    assert changed.teacher_inputs[0]["input_ids"].tolist() != pb.teacher_inputs[0]["input_ids"].tolist()
    assert torch.equal(changed.student_inputs["input_ids"], pb.student_inputs["input_ids"])
    assert changed.teacher_inputs[0] is not changed.student_inputs
    assert changed.meta["tag"] == 1
    with pytest.raises(ValueError):
        pb.replace_texts(texts=["only one"])


def test_unknown_label_is_a_data_error_naming_it(tok):
    col = Collator("sequence_classification", tok, [tok], 32, labels=LABELS)
    with pytest.raises(polydistill.DataError, match="'politics'"):
        col({"text": ["a", "b"], "label": ["food", "politics"], "lang": ["en", "en"]})
    tcol = Collator("token_classification", tok, [tok], 32, labels=TAGS)
    with pytest.raises(polydistill.DataError, match="'B-PER'"):
        tcol({"text": [["the", "soup"]], "label": [["O", "B-PER"]], "lang": ["en"]})


@pytest.mark.parametrize("shape", ["jsonl", "tsv", "aligned", "streamed"])
def test_one_column_can_be_both_text_and_source(tmp_path, shape):
    """The English rows of a parallel file feed both sides (the student reproduces the teacher on English)."""
    from polydistill import load_config
    from polydistill.data import load_sources

    (tmp_path / "pairs.tsv").write_text("en\tde\nhello world\thallo welt\ngood day\tguten tag\n")
    (tmp_path / "train.en").write_text("hello world\ngood day\n")
    (tmp_path / "same.jsonl").write_text('{"en": "hello world"}\n{"en": "good day"}\n')
    english = {"jsonl": {"path": str(tmp_path / "same.jsonl")}, "tsv": {"path": str(tmp_path / "pairs.tsv")},
               "aligned": {"aligned": {"en": str(tmp_path / "train.en")}},
               "streamed": {"path": str(tmp_path / "pairs.tsv"), "streaming": True}}[shape]
    german = {"path": str(tmp_path / "pairs.tsv"), "columns": {"text": "de", "source": "en"}, "lang": "de",
              "streaming": shape == "streamed"}
    cfg = load_config({"task": "embedding", "mode": "parallel", "student": {"model": "m"}, "training": {"max_steps": 2},
                       "data": {"train": [german, {**english, "columns": {"text": "en", "source": "en"}, "lang": "en"}]}})
    rows = list(load_sources(cfg.data.train, cfg))
    assert [(r["text"], r["source"], r["lang"]) for r in rows] == [
        ("hallo welt", "hello world", "de"), ("guten tag", "good day", "de"),
        ("hello world", "hello world", "en"), ("good day", "good day", "en")]


def test_a_streamed_corpus_is_held_at_most_one_buffer_at_a_time(tmp_path, tok):
    """Memory of a streamed run is bounded by stream_buffer, not by the corpus: rows read minus rows
    handed out never exceeds the buffer (tests/benchmarks/reliability_memory.py measures RSS on 1M lines)."""
    import os

    n, buffer = 20_000, 1000
    with open(tmp_path / "c.en", "w") as en, open(tmp_path / "c.de", "w") as de:
        for i in range(n):
            a, b, _ = PAIRS[i % len(PAIRS)]
            en.write(f"{a} {i}\n")
            de.write(f"{b} {i}\n")
    cfg = polydistill.load_config({
        "task": "embedding", "mode": "parallel", "student": {"model": "x"}, "training": {"max_steps": 1},
        "data": {"train": {"aligned": {"en": str(tmp_path / "c.en"), "de": str(tmp_path / "c.de")},
                           "columns": {"text": "de", "source": "en"}, "streaming": True}},
    })

    class Counting:
        def __init__(self, ds):
            self.ds, self.read = ds, 0

        def __iter__(self):
            for row in self.ds:
                self.read += 1
                yield row

    rows = Counting(load_sources(cfg.data.train, cfg))
    loader = StreamLoader(rows, Collator("embedding", tok, [tok], 16, parallel=True), 64, 0, True, True, buffer)
    page = os.sysconf("SC_PAGE_SIZE") / 2**20
    rss = []
    seen, held = set(), []
    for batch in loader.iterate(0):
        seen.update(batch.texts)
        held.append(rows.read - len(seen))
        with open("/proc/self/statm") as f:
            rss.append(int(f.read().split()[1]) * page)
    assert len(seen) == n  # every line went through
    assert max(held) <= buffer
    assert max(rss) - rss[len(rss) // 10] < 25  # MiB: no growth with the lines read


def test_load_data_reads_a_plugin_s_file_as_the_run_s_data_are_read(data, tmp_path):
    import polydistill

    cfg = polydistill.load_config({"task": "sequence_classification", "student": {"model": "m"}, "data": {"train": {"path": str(data["eval"])}}})
    ds = polydistill.load_data({"path": str(data["eval"]), "columns": {"label": "label", "lang": "lang"}, "limit": 3}, cfg)
    assert ds.column_names == ["text", "label", "lang"] and len(ds) == 3
    with pytest.raises(polydistill.ConfigError, match=r"data source: 1 invalid option:\n  colums: unknown option; did you mean 'columns'\?"):
        polydistill.load_data({"path": str(data["eval"]), "colums": {}}, cfg)
    with pytest.raises(polydistill.DataError, match="column 'nope' .*not found"):
        polydistill.load_data({"path": str(data["eval"]), "columns": {"text": "nope"}}, cfg)


def test_sample_draws_seeded_rows_in_file_order(tmp_path):
    from polydistill.config import DataSource, load_config
    from polydistill.data import load_source

    path = write_jsonl(tmp_path / "rows.jsonl", [{"text": f"row {i}", "lang": "en"} for i in range(50)])
    cfg = load_config({"task": "sequence_classification", "student": {"model": "x"}, "labels": ["a"],
                       "data": {"train": {"path": str(path)}}})

    def rows(**kw):
        return load_source(DataSource(path=str(path), **kw), cfg.task, cfg._base_dir)["text"]

    first = rows(sample=10, sample_seed=1)
    assert len(first) == 10 and len(set(first)) == 10
    assert first == sorted(first, key=lambda t: int(t.split()[1]))  # file order
    assert rows(sample=10, sample_seed=1) == first and rows(sample=10, sample_seed=2) != first
    assert first != rows(limit=10)
    assert len(rows(sample=500)) == 50  # fewer rows than asked: all of them
    with pytest.raises(ValueError, match="one of limit .* and sample"):
        DataSource(path=str(path), sample=3, limit=3)
    with pytest.raises(ValueError, match="streamed source"):
        DataSource(path=str(path), sample=3, streaming=True)
