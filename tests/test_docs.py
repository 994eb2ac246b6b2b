"""The documentation covers the code: generated reference pages are current, every hook and option is documented."""

from __future__ import annotations

import ast
import difflib
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


def _hookspecs() -> dict[str, typing.Callable]:
    """Every function pluggy takes as a hook specification (the marker sets ``polydistill_spec``)."""
    marker = f"{hookspecs.PROJECT}_spec"
    return {name: f for name, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, marker)}


def test_hook_reference_shows_every_hookspec_with_its_real_signature():
    specs = _hookspecs()
    # the generator renders the hooks these lists name, so a hookspec missing from them would be missing from the page
    assert sorted(specs) == sorted(hookspecs.STEP_HOOKS + hookspecs.LIFECYCLE_HOOKS)
    sections = _sections((DOCS / "reference" / "hooks.md").read_text(encoding="utf-8"))
    for name, spec in specs.items():
        doc = inspect.getdoc(spec) or ""
        assert "Called" in doc and "Combining: " in doc, f"hookspec {name}'s docstring does not say when it is called and how answers combine"
        params = inspect.signature(spec).parameters.values()
        assert all(p.annotation is not p.empty and p.default is p.empty for p in params), f"hookspec {name}: annotate every argument, give none a default"
        assert name in sections, f"docs/reference/hooks.md has no section for hook {name}"
        # hookspecs.py has `from __future__ import annotations`: each annotation is its source text, which str() quotes
        real = f"def {name}{inspect.signature(spec)}".replace("'", "")
        ast.parse(real + ": ...")  # what the page shows is Python
        blocks = re.findall(r"^```python\n(.*?)^```", sections[name], flags=re.M | re.S)
        shown = [line for block in blocks for line in block.splitlines() if line.startswith("def ")]
        assert shown == [real], f"docs/reference/hooks.md shows {shown} for {name}; hookspecs.py has\n  {real}\nrun `python docs/gen_reference.py`"


def test_hook_reference_is_what_the_generator_writes_now():
    committed = (DOCS / "reference" / "hooks.md").read_text(encoding="utf-8")
    fresh = _generator().hooks_reference()
    diff = "".join(difflib.unified_diff(committed.splitlines(True), fresh.splitlines(True), "docs/reference/hooks.md", "generated", n=1))
    assert not diff, f"run `python docs/gen_reference.py`:\n{diff[:3000]}"


def test_every_hook_the_hooks_guide_names_exists():
    """docs/hooks.md names hooks in its order diagram, in links to the reference and in its examples' hookimpls."""
    specs = _hookspecs()
    text = (DOCS / "hooks.md").read_text(encoding="utf-8")
    # The order diagram: every word left of its comments that is not in (...) or a loop header is a hook, and every hook is there.
    diagram = re.search(r"\{#order\}\s*```text\n(.*?)^```", text, flags=re.M | re.S)
    assert diagram, "docs/hooks.md has no order diagram under its {#order} heading"
    in_diagram = set()
    for line in diagram.group(1).splitlines():
        steps = re.sub(r"\([^)]*\)", "", re.split(r"\s{2,}", line.strip())[0])
        if steps.endswith(":"):
            continue
        for word in re.findall(r"\w+", steps):
            assert word in specs, f"docs/hooks.md's order diagram names {word!r}, which is not a hook"
            in_diagram.add(word)
    assert in_diagram == set(specs), f"docs/hooks.md's order diagram leaves out {sorted(set(specs) - in_diagram)}"
    # Links to a hook's reference entry: the anchor is a hook, and a link text naming a hook names that one.
    for page in DOCS.rglob("*.md"):
        for label, anchor in re.findall(r"\[([^\]]*)\]\((?:\.\./)?reference/hooks\.md#([\w-]+)\)", page.read_text(encoding="utf-8")):
            where = page.relative_to(DOCS)
            assert anchor in specs, f"{where} links to reference/hooks.md#{anchor}, which is not a hook"
            named = label.strip("`")
            assert named not in specs or named == anchor, f"{where}: the link [{label}] goes to hook {anchor}"
    # The examples: each @polydistill.hookimpl method is a hook and asks only for that hook's arguments.
    examples = re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
    implemented = 0
    for block in examples:
        for node in ast.walk(ast.parse(block)):
            if isinstance(node, ast.FunctionDef) and any(ast.unparse(d).endswith("hookimpl") for d in node.decorator_list):
                assert node.name in specs, f"docs/hooks.md's example implements {node.name!r}, which is not a hook"
                wanted = [a.arg for a in node.args.args if a.arg != "self"]
                allowed = inspect.signature(specs[node.name]).parameters
                assert set(wanted) <= set(allowed), f"docs/hooks.md's {node.name} asks for {wanted}; the hook has {list(allowed)}"
                implemented += 1
    assert implemented, "docs/hooks.md's examples implement no hook"


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


def test_every_example_config_is_listed_on_the_examples_page():
    root = Path(__file__).resolve().parents[1] / "docs"
    page = (root / "examples.md").read_text(encoding="utf-8")
    files = sorted(str(p.relative_to(root / "examples")) for p in (root / "examples").rglob("*") if p.suffix in (".yaml", ".json"))
    missing = [f for f in files if f"(examples/{f})" not in page]
    assert not missing, f"docs/examples.md does not list {missing}"


def test_example_configs_have_no_repeated_keys():
    """YAML keeps the last of two equal keys silently: a repeated section would hide the first."""
    import yaml

    class Strict(yaml.SafeLoader):
        pass

    def mapping(loader, node, deep=False):
        keys = [loader.construct_object(k, deep=deep) for k, _ in node.value]
        repeated = {k for k in keys if keys.count(k) > 1}
        assert not repeated, f"line {node.start_mark.line + 1}: repeated keys {repeated}"
        return yaml.SafeLoader.construct_mapping(loader, node, deep)

    Strict.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    for path in sorted((Path(__file__).resolve().parents[1] / "docs" / "examples").rglob("*.yaml")):
        yaml.load(path.read_text(encoding="utf-8"), Loader=Strict)  # noqa: S506 (a SafeLoader subclass)
