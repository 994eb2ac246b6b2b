"""Property tests: whatever a config file, dict or --set holds, loading it gives a Config or a ConfigError.

A Config loads back from its own dict form unchanged. A ConfigError names what is at fault: the file,
the --set item, or, for each invalid option, a field path that is in the document (or a required field
missing from a mapping that is in it); after a change to a valid config, a field that the change touched.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st

from polydistill import ConfigError
from polydistill.config import Config, apply_overrides, load_config
from polydistill.plugins import load_plugin_object, validate_settings

BASE = {
    "task": "sequence_classification",
    "mode": "parallel",
    "teachers": [{"model": "t"}],
    "student": {"from_teacher": {"layers": [0]}},
    "data": {"train": {"path": "x.jsonl", "columns": {"text": "de", "source": "en"}}},
}

# Field names the config knows, so random documents reach deep into the models, plus strangers.
NAMES = sorted({"task", "mode", "labels", "pooling", "teachers", "student", "data", "training", "plugins", "cache",
                "output_dir", "trackers", "model", "name", "tokenizer", "from_teacher", "layers", "teacher", "config",
                "base", "train", "eval", "path", "aligned", "columns", "text", "source", "label", "lang", "filter",
                "limit", "streaming", "batch_size", "max_length", "epochs", "max_steps", "learning_rate", "betas",
                "seed", "nonfinite", "max_skipped_batches", "kd", "enabled", "dir", "dtype", "$schema", "x", "0"})

# Dates, bytes and sets are what YAML's !!timestamp, !!binary and !!set tags (and Python callers) produce.
scalars = (st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats() | st.text(max_size=12) | st.sampled_from(NAMES)
           | st.dates() | st.binary(max_size=4) | st.frozensets(st.integers(0, 3), max_size=2))
keys = st.sampled_from(NAMES) | st.text(max_size=8)
documents = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=6), max_leaves=30)
# Overrides: a dotted path of known names and indices, '=', and YAML-ish text.
paths = st.lists(st.sampled_from(NAMES) | st.integers(0, 3).map(str) | st.text(max_size=5), min_size=1, max_size=5).map(".".join)
values = st.sampled_from(["", "1", "-1", "1e-3", "true", "null", "[1, 2]", "{a: 1}", "[", "{", ": :", "'x", "!!python/object:os.system ls",
                          ".inf", ".nan", "*a", "&a 1", "stop", "skip", "embedding", "2e400"]) | st.text(max_size=12)
overrides = st.lists(st.tuples(paths, st.sampled_from(["=", "", "=="]), values).map("".join), max_size=4)

FAST = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])

MISSING = ": required option is missing"
# What pydantic adds to a location inside a union (`int | str`) or at a mapping's key.
TAG = re.compile(r"(str|int|float|bool|none|\[key\]|[a-z-]+\[.*\])")
PLAIN = (type(None), bool, int, float, str)


def _shown(prefix: str, part) -> str:
    """A location as polydistill.config writes it: list items as [i], mapping keys as .key."""
    return prefix + (f"[{part}]" if isinstance(part, int) else (f".{part}" if prefix else str(part)))


def _nodes(doc, path=(), shown="", item=False):
    """Every (path, shown path, value) of a document, the document itself first.

    A mapping is also reachable as item [0]: a single mapping is accepted where a list is expected.
    """
    yield path, shown, doc
    if isinstance(doc, dict):
        for key, value in doc.items():
            yield from _nodes(value, path + (key,), _shown(shown, key))
        if path and not item:
            yield from _nodes(doc, path + (0,), _shown(shown, 0), item=True)
    elif isinstance(doc, (list, tuple)):
        for i, value in enumerate(doc):
            yield from _nodes(value, path + (i,), _shown(shown, i))


def _located(line: str, doc) -> tuple | None:
    """The path of ``doc`` that an error line names, () for a rule across fields, None for neither."""
    assert line.startswith("  "), line
    body = line[2:]
    if body.startswith("(top level): "):  # a rule across fields names them in its text
        text = body.removeprefix("(top level): ")
        return () if any(name.rstrip("s") in text for name in Config.model_fields) else None
    for path, shown, value in _nodes(doc):
        if body.endswith(MISSING):
            where = body.removesuffix(MISSING)
            if isinstance(value, dict) and where.startswith(_shown(shown, "")):
                name = where.removeprefix(_shown(shown, ""))
                if re.fullmatch(r"[a-z_]+", name) and name not in value:
                    return path + (name,)
            if isinstance(value, (list, tuple)) and any(where == _shown(shown, i) for i in range(len(value), len(value) + 3)):
                return path + (len(value),)
        elif path and body.startswith(f"{shown}: "):
            return path
        elif path and body.startswith(f"{shown}.") and TAG.fullmatch(body.removeprefix(f"{shown}.").partition(": ")[0]):
            return path
    return None


def _assert_names_the_fields(message: str, doc, origin: str, changed=None) -> None:
    """Each line of a validation error names a field of ``doc``; with ``changed``, one related to a change."""
    header, *fragments = message.split("\n")
    located = []  # (line, path); a key with a newline in it spans fragments
    for fragment in fragments:
        if located and (located[-1][1] is None or not fragment.startswith("  ")):
            line = f"{located.pop()[0]}\n{fragment}"
        else:
            line = fragment
        located.append((line, _located(line, doc)))
    assert header == f"{origin}: {len(located)} invalid option{'s' if len(located) != 1 else ''}:", message
    assert located, message
    for line, path in located:
        assert path is not None, f"{line!r} names no field of the document {doc!r}"
        if changed is not None and path:  # the rest of the document is valid: the fault is in what changed
            path = tuple(map(str, path))
            assert any(path[: len(c)] == c or c[: len(path)] == path for c in changed), f"{line!r} is not about {changed}"


def _not_plain(doc, shown=""):
    """Shown paths of the values in a dict that are not plain (JSON) data."""
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in _not_plain(v, _shown(shown, k))]
    if isinstance(doc, list):
        return [p for i, v in enumerate(doc) for p in _not_plain(v, _shown(shown, i))]
    return [] if isinstance(doc, PLAIN) else [shown]


def _assert_is_a_loadable_config(config, data) -> None:
    assert isinstance(config, Config), type(config)
    assert config.task == data["task"]
    # what a run writes to config.json loads back as the same config (compared as JSON text: NaN equals NaN)
    again = load_config(config.to_dict())
    assert json.dumps(again.model_dump(mode="json")) == json.dumps(config.model_dump(mode="json"))


def _check_dict(doc: dict, changed=None) -> None:
    """Load a dict: a Config that is the document, or a ConfigError that names the fault."""
    try:
        config = load_config(doc)
    except ConfigError as exc:
        message = str(exc)
        bad = _not_plain(doc)
        if bad:  # refused before validation; must still say which value it cannot take
            assert message.startswith("config: "), message
            assert any(re.search(rf"(?<![\w.\[]){re.escape(p)}(?![\w.\[])", message) for p in bad), (
                f"{message!r} does not name the value that is not plain data: one of {bad}")
        else:
            _assert_names_the_fields(message, doc, "config", changed)
    else:
        assert not _not_plain(doc)
        _assert_is_a_loadable_config(config, doc)


def _check_file(path) -> None:
    """Load a file: a Config, or a ConfigError that names the file (and the fields, for a mapping)."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: "), message
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as decode:
            line = raw[: decode.start].count(b"\n") + 1
            assert message.startswith(f"{path}: line {line} is not UTF-8"), message
            return
        try:
            doc = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError):
            assert "not valid " in message, message
            return
        if not isinstance(doc, dict):
            assert message == f"{path}: the top level must be a mapping of options, got {type(doc).__name__}"
        else:
            doc.pop("$schema", None)
            _assert_names_the_fields(message, doc, str(path))
    else:
        data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        _assert_is_a_loadable_config(config, data)


@FAST
@given(st.dictionaries(keys, documents, max_size=6))
@example({"task": "embedding", "data": {"train": {"path": b"x.jsonl"}}, "student": {"model": "s"}})
@example({"task": "embedding", "data": {"batch_size": "many"}, "student": {"model": "s"}})
@example({"teachers": {"x": 1}})
@example({"training": {"betas": [1]}})
def test_any_document_is_a_config_or_a_config_error(doc):
    _check_dict(doc)


@FAST
@given(st.dictionaries(st.sampled_from(sorted(BASE) + ["training", "plugins", "cache", "labels"]), documents, max_size=4))
@example({})
@example({"training": {"epochs": 0}})
@example({"student": {"from_teacher": {"teacher": []}}})
@example({"cache": {"dir": 3}})
@example({"cache": {"dir": b"cache"}})
def test_any_change_to_a_valid_config_is_a_config_or_a_config_error(changes):
    _check_dict({**BASE, **changes}, changed=[(k,) for k in changes])


@FAST
@given(overrides)
@example(["training.epochs=[", "task.name=x"])
@example(["data.train.0.columns.text=de"])
@example(["teachers.5.model=x"])
@example(["plugins.kd=false", "plugins.kd.temperature=2"])
@example(["=1"])
@example(["training.learning_rate=2e400"])
@example(["training.epochs=0", "training.seed=1"])
def test_any_override_is_a_config_or_a_config_error(sets):
    try:
        config = load_config(BASE, list(sets))
    except ConfigError as exc:
        message = str(exc)
        if message.startswith("--set "):
            # the first item that cannot be applied is the one named
            data = copy.deepcopy(BASE)
            for item in sets:
                try:
                    apply_overrides(data, [item])
                except ConfigError:
                    break
            else:
                pytest.fail(f"every --set item applies, yet: {message}")
            key = item.partition("=")[0]
            assert message.startswith((f"--set {item!r}: ", f"--set {key}: ")), (item, message)
        else:
            data = apply_overrides(copy.deepcopy(BASE), list(sets))
            changed = [tuple(item.partition("=")[0].strip().split(".")) for item in sets]
            _assert_names_the_fields(message, data, "config", changed)
    else:
        _assert_is_a_loadable_config(config, BASE)


@FAST
@given(st.text(max_size=200) | documents.map(yaml.dump))
@example("task: [unclosed\n")
@example("\x00\x01")
@example("a: !!python/object/apply:os.system ['true']\n")
@example("- 1\n- 2\n")
@example("&a [*a]")
@example("task: embedding\nstudent: {model: s}\ndata: {train: {path: x, limit: -1}}\nwhat: 1\n")
def test_any_yaml_file_is_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    _check_file(path)


@FAST
@given(st.binary(max_size=200))
@example(b"\xff\xfe{")
@example(b'{"task": "embedding", "student": {"model": "s"}, "data": {"train": {"path": "x"}}, "cache": {"dtype": 1}}')
def test_any_bytes_as_a_json_file_are_a_config_or_a_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("json") / "c.json"
    path.write_bytes(raw)
    _check_file(path)


@pytest.mark.parametrize("plugin", ["kd", "adaptive_temperature", "multi_teacher", "gan_data", "dropout", "l2"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=documents)
def test_any_plugin_section_validates_or_is_a_config_error(plugin, options):
    obj = load_plugin_object(plugin)
    try:
        validate_settings(plugin, obj, options)
    except ConfigError as exc:
        assert f"plugins.{plugin}" in str(exc) or f"plugin '{plugin}'" in str(exc)
