"""Shared fixtures: the tiny models and dataset of polydistill.testing, under the names these tests use."""

from __future__ import annotations

import sys

import pytest
import torch

# polydistill.testing is also a pytest plugin (pytest_plugins below). Without its pytest11
# entry point installed, registering it before the import keeps pytest from warning that
# the plugin was imported too early; with it, pytest has loaded it already.
if "polydistill.testing" not in sys.modules:
    pytest.register_assert_rewrite("polydistill.testing")

from polydistill.testing import LABELS, PAIRS, TEXTS, StopAt, tiny_config, write_jsonl  # noqa: E402,F401  (imported by tests)

# The fixtures; a no-op where the pytest11 entry point already loaded them.
pytest_plugins = ["polydistill.testing"]

# Tiny models run fastest on one thread; more only add scheduling overhead (and
# fight over the cores with anything else running).
torch.set_num_threads(1)

#: The parallel sequence-classification run most tests start from.
parallel_config = tiny_config


@pytest.fixture(scope="session")
def models(tiny_models):
    return tiny_models


@pytest.fixture(scope="session")
def data(tiny_data):
    return tiny_data


@pytest.fixture(scope="session")
def trained_teacher(tiny_trained_teacher):
    return tiny_trained_teacher
