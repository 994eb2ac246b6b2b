"""``polydistill plugins new NAME``: a plugin package that installs and passes its tests as generated."""

from __future__ import annotations

import re
from importlib import resources
from pathlib import Path
from string import Template

from polydistill.version import API_VERSION
from polydistill.errors import PolydistillError

#: Generated file -> template in ``plugin_template/``; paths are templates too.
FILES = {
    "pyproject.toml": "pyproject.toml.tmpl",
    "README.md": "README.md.tmpl",
    "src/$module/__init__.py": "plugin.py.tmpl",
    "tests/test_$name.py": "test_plugin.py.tmpl",
}


def names(name: str) -> dict[str, str]:
    """The plugin's config name, distribution, module and class names for ``name``."""
    plugin = name.strip().lower().replace("-", "_")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", plugin):
        raise PolydistillError(f"plugin name {name!r}: use letters, digits, '_' or '-', starting with a letter")
    return {
        "name": plugin,
        "dist": "polydistill-" + plugin.replace("_", "-"),
        "module": "polydistill_" + plugin,
        "cls": "".join(part.capitalize() for part in plugin.split("_") if part),
        "api": API_VERSION,
    }


def new_plugin(name: str, directory: str | Path | None = None) -> Path:
    """Write a plugin package for ``name`` into ``directory`` (default ``./polydistill-NAME``); returns it."""
    values = names(name)
    target = Path(directory) if directory is not None else Path(f"polydistill-{name.strip()}")
    if target.exists() and any(target.iterdir()):
        raise PolydistillError(f"{target}: exists and is not empty; choose another --dir")
    values["dirname"] = target.name
    templates = resources.files("polydistill") / "plugin_template"
    for out, template in FILES.items():
        path = target / Template(out).substitute(values)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(Template(templates.joinpath(template).read_text(encoding="utf-8")).substitute(values), encoding="utf-8")
    return target
