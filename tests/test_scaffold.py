"""`polydistill plugins new`: the generated package is registered by its pyproject and passes its own tests."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

import polydistill
import polydistill_plugins
from polydistill.cli import main


def test_plugins_new_writes_a_package_that_passes_its_own_tests(tmp_path, capsys):
    assert main(["plugins", "new", "demo-term", "--dir", str(tmp_path / "pkg")]) == 0
    assert "wrote the plugin 'demo_term'" in capsys.readouterr().out
    pkg = tmp_path / "pkg"
    assert (pkg / "src" / "polydistill_demo_term" / "__init__.py").is_file() and (pkg / "tests" / "test_demo_term.py").is_file()
    meta = tomllib.loads((pkg / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert meta["name"] == "polydistill-demo-term"

    # What `pip install ./pkg` leaves behind: the module on the path and a dist-info
    # holding the pyproject's entry points (pip itself is too slow for this suite).
    site = tmp_path / "site"
    info = site / "polydistill_demo_term-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    groups = "".join(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in eps.items()) for group, eps in meta["entry-points"].items())
    (info / "entry_points.txt").write_text(groups)

    paths = [site, pkg / "src", Path(polydistill.__file__).parents[1], Path(polydistill_plugins.__file__).parents[1]]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([*map(str, paths), os.environ.get("PYTHONPATH", "")])}
    # -p: the fixtures load even where polydistill's pytest11 entry point is not installed
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "polydistill.testing", "-p", "no:cacheprovider", str(pkg / "tests")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "5 passed" in out.stdout


def test_plugins_new_refuses_bad_names_and_non_empty_directories(tmp_path, capsys):
    assert main(["plugins", "new", "9lives", "--dir", str(tmp_path / "a")]) == 2
    assert "plugin name '9lives': use letters, digits" in capsys.readouterr().err
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "keep.txt").write_text("mine")
    assert main(["plugins", "new", "ok", "--dir", str(tmp_path / "b")]) == 2
    assert "exists and is not empty" in capsys.readouterr().err


def test_plugins_new_defaults_to_polydistill_name_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["plugins", "new", "mine"]) == 0
    pyproject = (tmp_path / "polydistill-mine" / "pyproject.toml").read_text(encoding="utf-8")
    assert 'mine = "polydistill_mine:Mine"' in pyproject


@pytest.mark.parametrize("name", ["my_term", "my-term"])
def test_names_give_valid_identifiers(name):
    from polydistill.scaffold import names

    assert names(name) == {"name": "my_term", "dist": "polydistill-my-term", "module": "polydistill_my_term",
                           "cls": "MyTerm", "api": polydistill.API_VERSION}
