"""Generate docs/reference/config.md and docs/reference/hooks.md from the code.

The configuration reference comes from the pydantic models in
``polydistill.config`` and the ``Settings`` of each first-party plugin (the
entry points in pyproject.toml); the hook reference from the hookspec
docstrings. Run ``python docs/gen_reference.py`` after changing either;
``--check`` exits 1 when the committed pages are stale. As an mkdocs hook
(``hooks:`` in mkdocs.yml) it stops a build whose pages are stale.
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
import sys
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import annotated_types
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]
OUT = {"config": ROOT / "docs" / "reference" / "config.md", "hooks": ROOT / "docs" / "reference" / "hooks.md"}
_SCALARS = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "null", Any: "any"}
_BOUNDS = {annotated_types.Ge: "≥", annotated_types.Gt: ">", annotated_types.Le: "≤", annotated_types.Lt: "<"}


def anchor(model: type[BaseModel], prefix: str = "") -> str:
    return (prefix + model.__name__).lower()


def type_text(annotation: Any, prefix: str = "") -> str:
    """A reader's rendering of a field's type, with links to the sections of nested models."""
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return f"[{annotation.__name__}](#{anchor(annotation, prefix)})"
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is Literal:
        return " \\| ".join(f"`{json.dumps(a)}`" for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(type_text(a, prefix) for a in args)
    if origin is list:
        return f"list of {type_text(args[0], prefix)}"
    if origin is tuple:
        return "[" + ", ".join(type_text(a, prefix) for a in args) + "]"
    if origin is dict:
        return f"mapping {type_text(args[0], prefix)} → {type_text(args[1], prefix)}"
    return f"`{annotation}`"


def bounds(field: Any) -> str:
    found = [f"{sign} {getattr(m, type(m).__name__.lower())}" for m in field.metadata for cls, sign in _BOUNDS.items() if isinstance(m, cls)]
    return f" ({', '.join(found)})" if found else ""


def default_text(field: Any) -> str:
    if field.is_required():
        return "required"
    value = field.default_factory() if field.default_factory is not None else field.default
    if isinstance(value, BaseModel):
        return "defaults"
    return f"`{json.dumps(value)}`"


def nested(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for a in typing.get_args(annotation) for m in nested(a)]


def model_sections(root: type[BaseModel], root_path: str, prefix: str = "", level: str = "##") -> list[str]:
    """One section per model reachable from ``root``, in first-seen order; nested models' paths in the title."""
    paths: dict[type[BaseModel], list[str]] = {root: [root_path]}
    queue = [root]
    while queue:
        model = queue.pop(0)
        for name, field in model.model_fields.items():
            for sub in nested(field.annotation):
                many = typing.get_origin(field.annotation) is list or any(typing.get_origin(a) is list for a in typing.get_args(field.annotation))
                path = f"{paths[model][0]}.{name}".lstrip(".") + ("[]" if many else "")
                if sub not in paths:
                    paths[sub] = []
                    queue.append(sub)
                paths[sub].append(path)
    out = []
    for model, where in paths.items():
        title = ", ".join(f"`{p}`" for p in where) if where != [""] else "Top level"
        out += [f"{level} {title} {{#{anchor(model, prefix)}}}", ""]
        doc = inspect.getdoc(model) if model.__doc__ else ""
        if doc and not doc.startswith(("Base class", "A base class")):
            out += [doc.split("\n\n")[0].replace("\n", " "), ""]
        out += ["| field | type | default | meaning |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            meaning = (field.description or "").replace("|", "\\|").replace("\n", " ")
            out.append(f"| `{name}` | {type_text(field.annotation, prefix)}{bounds(field)} | {default_text(field)} | {meaning} |")
        out.append("")
    return out


def first_party_plugins() -> dict[str, Any]:
    """Entry-point name -> plugin object, for the plugins pyproject.toml registers (not whatever is installed)."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["entry-points"]["polydistill.plugins"]
    found = {}
    for name, target in sorted(eps.items()):
        module, _, attr = target.partition(":")
        found[name] = getattr(importlib.import_module(module), attr)
    return found


def config_reference() -> str:
    from polydistill.config import Config

    out = [
        "# Configuration reference",
        "",
        "<!-- generated by docs/gen_reference.py from the pydantic models; do not edit -->",
        "",
        "Every option of a run config, generated from the pydantic models in",
        "`polydistill/config.py` and the settings model of each first-party plugin.",
        "Unknown options are errors at every level. How to write a config, overrides,",
        "paths and error messages: [Configuration](../configuration.md).",
        "",
    ]
    out += model_sections(Config, "")
    from polydistill.multitask import MultiTaskOptions, TaskSection

    out += ["## Multi-task runs {#multitask}", "",
            "A config with `tasks` trains one student for several tasks ([Multi-task distillation](../multitask.md)); "
            "its other sections are shared or are every task's defaults.", ""]
    out += model_sections(MultiTaskOptions, "multitask", prefix="multitask-", level="###")
    out += model_sections(TaskSection, "tasks.NAME", prefix="task-", level="###")
    out += ["## Plugins {#plugins}", "",
            "The options under `plugins.NAME` of each first-party plugin, validated by its `Settings` model.",
            "Installed third-party plugins document their own (`polydistill plugins` lists them).", ""]
    for name, obj in first_party_plugins().items():
        summary = (inspect.getdoc(obj) or "").split("\n")[0]
        out += [f"### `{name}` {{#plugin-{name}}}", "", f"{summary} See [{name}](../plugins/{name}.md).", ""]
        settings = getattr(obj, "Settings", None)
        if settings is None:
            out += ["No options.", ""]
            continue
        out += model_sections(settings, f"plugins.{name}", prefix=f"{name}-", level="####")[2:]
    return "\n".join(out).rstrip() + "\n"


def rst_to_md(text: str) -> str:
    """The few reST forms the docstrings use: ``code``, :role:`target` and ``::`` literal blocks."""
    text = re.sub(r":\w+:`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    out: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.rstrip().endswith("::"):
            out.append(line.rstrip()[:-1])
            i += 1
            block = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("    ")):
                block.append(lines[i][4:])
                i += 1
            while block and not block[0].strip():
                block.pop(0)
            while block and not block[-1].strip():
                block.pop()
            out += ["", "```text", *block, "```", ""]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)


def hook_signature(name: str, func: Any) -> str:
    """The ``def`` line the reference shows for a hook: ``inspect.signature`` as it is.

    hookspecs.py has ``from __future__ import annotations``, so the annotations
    are their source text, which ``str(signature)`` quotes; the quotes are dropped.
    """
    return f"def {name}{str(inspect.signature(func)).replace(chr(39), '')}"


def hooks_reference() -> str:
    from polydistill import hookspecs

    out = [
        "# Hook reference",
        "",
        "<!-- generated by docs/gen_reference.py from polydistill/hookspecs.py; do not edit -->",
        "",
        rst_to_md(inspect.getdoc(hookspecs) or ""),
        "",
        "Each hook below: its signature, when it is called, what it receives and returns, and",
        "how the answers of several plugins combine. How a step runs, the combining rules in",
        "general, the objects hooks receive (`Batch`, `ModelOutputs`, `TrainState`) and worked",
        "examples: [Hooks](../hooks.md).",
        "",
    ]
    for title, names in (("Step hooks", hookspecs.STEP_HOOKS), ("Lifecycle hooks", hookspecs.LIFECYCLE_HOOKS)):
        out += [f"## {title}", ""]
        for name in names:
            func = getattr(hookspecs, name)
            out += [f"### `{name}` {{#{name}}}", "", "```python", hook_signature(name, func), "```", "",
                    rst_to_md(inspect.getdoc(func) or ""), ""]
    return "\n".join(out).rstrip() + "\n"


def pages() -> dict[Path, str]:
    return {OUT["config"]: config_reference(), OUT["hooks"]: hooks_reference()}


def stale() -> list[Path]:
    return [path for path, text in pages().items() if not path.is_file() or path.read_text(encoding="utf-8") != text]


def on_pre_build(config: Any, **kwargs: Any) -> None:
    """mkdocs hook: refuse to build from stale reference pages."""
    from mkdocs.exceptions import PluginError

    old = stale()
    if old:
        raise PluginError(f"stale generated pages {', '.join(str(p.relative_to(ROOT)) for p in old)}: run python docs/gen_reference.py")


def main(argv: list[str]) -> int:
    if "--check" in argv:
        old = stale()
        for path in old:
            print(f"stale: {path.relative_to(ROOT)}", file=sys.stderr)
        return 1 if old else 0
    for path, text in pages().items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
