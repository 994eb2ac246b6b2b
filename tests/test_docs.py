"""The documentation covers the code: generated reference pages are current, every hook and option is documented."""

from __future__ import annotations

import importlib.util
import inspect
import re
import tomllib
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

from polydistill import hookspecs
from polydistill.config import Config

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def _generator():
    spec = importlib.util.spec_from_file_location("gen_reference", DOCS / "gen_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sections(text: str) -> dict[str, str]:
    """Section body by the explicit anchor of its heading ({#anchor})."""
    parts = re.split(r"^#+ .*\{#([\w-]+)\}\s*$", text, flags=re.M)
    return dict(zip(parts[1::2], parts[2::2]))


def _models(model: type[BaseModel]) -> list[type[BaseModel]]:
    found = [model]
    for field in model.model_fields.values():
        stack = [field.annotation]
        while stack:
            ann = stack.pop()
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                found += [m for m in _models(ann) if m not in found]
            stack += typing.get_args(ann)
    return found


def _first_party_settings() -> dict[str, type[BaseModel]]:
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["entry-points"]["polydistill.plugins"]
    out = {}
    for name, target in eps.items():
        module, _, attr = target.partition(":")
        out[name] = getattr(importlib.import_module(module), attr).Settings
    return out


def test_generated_reference_pages_are_up_to_date():
    stale = _generator().stale()
    assert not stale, f"run `python docs/gen_reference.py`: stale {[str(p.relative_to(ROOT)) for p in stale]}"


def test_every_hook_is_in_the_hook_reference_with_its_docstring():
    text = (DOCS / "reference" / "hooks.md").read_text(encoding="utf-8")
    sections = _sections(text)
    for name in hookspecs.STEP_HOOKS + hookspecs.LIFECYCLE_HOOKS:
        assert name in sections, f"no section for hook {name}"
        first = inspect.getdoc(getattr(hookspecs, name)).splitlines()[0].replace("``", "`")
        assert first in sections[name], name


def _assert_documented(sections: dict[str, str], model: type[BaseModel], anchor: str, where: str) -> None:
    assert anchor in sections, f"no section for {where} ({model.__name__})"
    for name, field in model.model_fields.items():
        assert field.description, f"{where}.{name} has no description"
        row = re.search(rf"^\| `{name}` \|.*\| (.+) \|$", sections[anchor], flags=re.M)
        assert row and row.group(1).strip(), f"{where}.{name} is not in the configuration reference"


def test_every_config_field_and_first_party_plugin_option_is_documented():
    sections = _sections((DOCS / "reference" / "config.md").read_text(encoding="utf-8"))
    for model in _models(Config):
        _assert_documented(sections, model, model.__name__.lower(), model.__name__)
    for plugin, settings in _first_party_settings().items():
        root, *nested = _models(settings)
        _assert_documented(sections, root, f"plugin-{plugin}", f"plugins.{plugin}")
        for model in nested:
            _assert_documented(sections, model, f"{plugin}-{model.__name__.lower()}", f"plugins.{plugin}")


def test_the_site_navigation_lists_every_page():
    nav = yaml.safe_load((ROOT / "mkdocs.yml").read_text(encoding="utf-8"))["nav"]

    def pages(entries):
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            yield from pages(value) if isinstance(value, list) else [value]

    listed = set(pages(nav))
    on_disk = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert listed <= on_disk, f"nav entries without a page: {sorted(listed - on_disk)}"
    assert on_disk == listed, f"pages missing from the nav: {sorted(on_disk - listed)}"


def test_ci_runs_the_readme_test_command_exactly():
    readme = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    command = readme[next(i for i, line in enumerate(readme) if line.startswith("# 2. ")) + 1]
    assert "python -m pytest" in command
    assert command in (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
