"""Property tests: whatever a config file, dict or --set holds, loading it gives a Config or a ConfigError."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings, strategies as st

from polydistill import ConfigError
from polydistill.config import Config, load_config
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


def _loads(source, sets=()):
    try:
        return load_config(source, list(sets))
    except ConfigError as exc:
        assert str(exc)  # a message for the user
        return None


@FAST
@given(documents)
def test_any_document_is_a_config_or_a_config_error(doc):
    result = _loads(doc) if isinstance(doc, dict) else None
    assert result is None or isinstance(result, Config)


@FAST
@given(st.dictionaries(st.sampled_from(sorted(BASE) + ["training", "plugins", "cache", "labels"]), documents, max_size=4))
def test_any_change_to_a_valid_config_is_a_config_or_a_config_error(changes):
    result = _loads({**BASE, **changes})
    assert result is None or isinstance(result, Config)


@FAST
@given(overrides)
@example(["training.epochs=[", "task.name=x"])
@example(["data.train.0.columns.text=de"])
@example(["teachers.5.model=x"])
@example(["plugins.kd=false", "plugins.kd.temperature=2"])
@example(["=1"])
@example(["training.learning_rate=2e400"])
def test_any_override_is_a_config_or_a_config_error(sets):
    result = _loads(BASE, sets)
    assert result is None or isinstance(result, Config)


@FAST
@given(st.text(max_size=200) | documents.map(yaml.dump))
@example("task: [unclosed\n")
@example("\x00\x01")
@example("a: !!python/object/apply:os.system ['true']\n")
@example("- 1\n- 2\n")
@example("&a [*a]")
def test_any_yaml_file_is_a_config_or_a_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    path.write_text(text, encoding="utf-8", errors="surrogateescape")
    result = _loads(path)
    assert result is None or isinstance(result, Config)


@FAST
@given(st.binary(max_size=200))
@example(b"\xff\xfe{")
def test_any_bytes_as_a_json_file_are_a_config_or_a_config_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("json") / "c.json"
    path.write_bytes(raw)
    result = _loads(path)
    assert result is None or isinstance(result, Config)


@pytest.mark.parametrize("plugin", ["kd", "adaptive_temperature", "multi_teacher", "gan_data", "dropout", "l2"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(options=documents)
def test_any_plugin_section_validates_or_is_a_config_error(plugin, options):
    obj = load_plugin_object(plugin)
    try:
        validate_settings(plugin, obj, options)
    except ConfigError as exc:
        assert f"plugins.{plugin}" in str(exc) or f"plugin '{plugin}'" in str(exc)
