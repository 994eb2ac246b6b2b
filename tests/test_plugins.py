"""Plugin discovery, validation, combining rules and the architecture's promises."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import polydistill
from polydistill import PluginError, hookimpl, hookspecs
from polydistill.plugins import installed_plugins

from conftest import parallel_config

ROOT = Path(__file__).resolve().parents[1]


def install_fake_distribution(site: Path, dist: str, module: str, source: str, entry_points: dict[str, str], groups=("polydistill.plugins",)) -> None:
    """Write a module and a *.dist-info with entry points into ``site``: what pip leaves behind."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-1.2.3.dist-info"  # normalised, as pip names it: the stem up to '-' is the name
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.2.3\n")
    lines = []
    for group in groups:
        lines.append(f"[{group}]")
        lines += [f"{name} = {target}" for name, target in entry_points.items()]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    importlib.invalidate_caches()
    yield path
    for name in [m for m in sys.modules if m.startswith("fakeplug")]:
        del sys.modules[name]


SCALE_PLUGIN = """
    import torch
    import polydistill
    from polydistill import PluginSettings, hookimpl

    class Settings(PluginSettings):
        weight: float = 1.0

    class Zero:
        '''Adds a constant-zero loss term, to prove it ran.'''
        polydistill_api = "1.0"
        Settings = Settings

        def __init__(self, settings):
            self.settings = settings
            self.calls = 0

        @hookimpl
        def loss_terms(self, batch, student_out, teacher_out, state):
            self.calls += 1
            return {"zero": student_out.logits.sum() * 0.0 * self.settings.weight}
"""


def test_entry_point_discovery_finds_an_installed_plugin(site, models, data, tmp_path):
    install_fake_distribution(site, "fakeplug-zero", "fakeplug_zero", SCALE_PLUGIN, {"zero": "fakeplug_zero:Zero"})
    found = installed_plugins()
    assert found["zero"].distribution == "fakeplug-zero" and found["zero"].version == "1.2.3"
    assert not found["zero"].default and found["kd"].default
    result = polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=2, plugins={"zero": {"weight": 2.0}}))
    assert "loss/zero" in result.history[0]
    assert result.plugins == {"kd": polydistill.__version__, "zero": "1.2.3"}


def test_plugins_command_lists_installed_plugins(site, capsys):
    install_fake_distribution(site, "fakeplug-zero", "fakeplug_zero", SCALE_PLUGIN, {"zero": "fakeplug_zero:Zero"})
    from polydistill.cli import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "kd 0.1.0 (enabled by default)" in out
    assert "zero 1.2.3  [fakeplug-zero]" in out and "hooks: loss_terms" in out


def test_a_plugin_that_fails_to_import_only_breaks_runs_that_enable_it(site, models, data, tmp_path, capsys):
    install_fake_distribution(site, "fakeplug-broken", "fakeplug_broken", "import no_such_module_xyz\n", {"broken": "fakeplug_broken:X"})
    polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=1))  # not enabled: fine
    with pytest.raises(PluginError, match=r"plugin 'broken' \(fakeplug_broken:X\) failed to import: ModuleNotFoundError"):
        polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=1, plugins={"broken": {}}))
    from polydistill.cli import main

    assert main(["plugins"]) == 0
    assert "BROKEN" in capsys.readouterr().out


def test_incompatible_api_version_is_a_clear_error(site, models, data, tmp_path):
    src = SCALE_PLUGIN.replace('polydistill_api = "1.0"', 'polydistill_api = "2.0"')
    install_fake_distribution(site, "fakeplug-future", "fakeplug_future", src, {"future": "fakeplug_future:Zero"})
    with pytest.raises(PluginError, match="plugin 'future' needs polydistill plugin API 2.0"):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"future": {}}))


def test_default_plugin_can_be_switched_off(models, data, tmp_path):
    with pytest.raises(PluginError, match="no plugin returned a loss term"):
        polydistill.train(parallel_config(models, data, tmp_path, plugins={"kd": False}))


class Misspelled:
    @hookimpl
    def loss_term(self, batch, state):  # not a hook
        return {}


def test_misspelled_hook_fails_check_pending(models, data, tmp_path):
    with pytest.raises(PluginError, match="plugin 'typo'.*loss_term"):
        polydistill.train(parallel_config(models, data, tmp_path), plugins=[("typo", Misspelled())])


class Explodes:
    @hookimpl
    def regularize(self, student, state):
        raise RuntimeError("boom")


def test_exception_in_a_hook_names_plugin_and_hook(models, data, tmp_path):
    with pytest.raises(PluginError) as info:
        polydistill.train(parallel_config(models, data, tmp_path), plugins=[("bomb", Explodes())])
    assert str(info.value) == "plugin 'bomb' failed in hook 'regularize': RuntimeError: boom"
    assert info.value.plugin == "bomb" and info.value.hook == "regularize"
    assert isinstance(info.value.__cause__, RuntimeError)


class Answer:
    def __init__(self, weights):
        self.weights = weights
        self.seen = []
        self.texts = []

    @hookimpl
    def select_teachers(self, batch, teachers, state):
        return torch.tensor(self.weights, device=state.device)

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        self.seen.append(teacher_out.logits.detach().clone())
        self.texts.append(list(batch.teacher_texts))


def test_two_answers_to_a_single_answer_hook_are_an_error(models, data, tmp_path):
    with pytest.raises(PluginError, match="plugins a and b both answered 'select_teachers'"):
        polydistill.train(parallel_config(models, data, tmp_path), plugins=[("a", Answer([1.0])), ("b", Answer([1.0]))])


def test_select_teachers_weights_fuse_teachers_and_skip_zero_weight(models, data, tmp_path):
    teachers = [{"model": str(models["teacher"]), "name": "t1"}, {"model": str(models["teacher2"]), "name": "t2"}]
    only_second = Answer([0.0, 1.0])
    calls = {"t1": 0}

    class Count:
        @hookimpl
        def setup(self, state):
            state.teachers[0].register_forward_hook(lambda *a: calls.__setitem__("t1", calls["t1"] + 1))

    cfg = parallel_config(models, data, tmp_path, teachers=teachers, training__max_steps=1, data__batch_size=12, data__shuffle=False)
    cfg["student"] = {"from_teacher": {"teacher": "t2", "layers": [0]}}
    polydistill.train(cfg, plugins=[("sel", only_second), ("count", Count())])
    assert calls["t1"] == 0
    t2 = polydistill.models.load_model(str(models["teacher2"]), "sequence_classification").eval()
    tok = polydistill.models.load_tokenizer(str(models["teacher2"]))
    from conftest import PAIRS

    # length grouping orders the batch by length: the rows follow the texts the teachers read
    texts = only_second.texts[0]
    assert sorted(texts) == sorted(en for en, _, _ in PAIRS)
    with torch.no_grad():
        expected = t2(**tok(texts, return_tensors="pt", padding=True)).logits
    got = only_second.seen[0]
    assert got.shape == expected.shape == (len(PAIRS), 3)
    atol = 1e-6  # the untrained teacher's rows differ by ~1e-4: rows out of order do not pass
    assert not torch.allclose(expected.flip(0), expected, atol=atol, rtol=0)
    for row, (g, e) in enumerate(zip(got, expected)):
        torch.testing.assert_close(g, e, atol=atol, rtol=0, msg=lambda m, row=row: f"row {row} ({texts[row]!r}): {m}")


class DupTerm:
    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        return {"kl": student_out.logits.sum() * 0}


def test_duplicate_loss_term_names_are_an_error(models, data, tmp_path):
    with pytest.raises(PluginError, match="plugins '(kd' and 'dup|dup' and 'kd)' both return a term named 'kl'"):
        polydistill.train(parallel_config(models, data, tmp_path), plugins=[("dup", DupTerm())])


class Tag:
    def __init__(self, tag):
        self.tag = tag
        self.log: list[str] = []

    @hookimpl
    def augment_batch(self, batch, state):
        state.meta_log.append(self.tag)
        return batch.replace_texts(texts=[t + f" {self.tag}" for t in batch.texts])

    @hookimpl
    def setup(self, state):
        state.meta_log = []


class SeeTexts:
    def __init__(self):
        self.texts = []

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        self.texts.extend(batch.texts)


def test_augment_batch_is_chained_in_config_order(models, data, tmp_path):
    see = SeeTexts()
    cfg = parallel_config(models, data, tmp_path, training__max_steps=1, plugins={"second": {}, "first": {}})
    # registered in the opposite order of the config: the config order must win
    polydistill.train(cfg, plugins=[("first", Tag("A")), ("second", Tag("B")), ("see", see)])
    assert see.texts and all(t.endswith(" B A") for t in see.texts)


def test_trace_switch_prints_every_hook_call(models, data, tmp_path, monkeypatch, capfd):
    monkeypatch.setenv("POLYDISTILL_TRACE", "1")
    polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=1))
    err = capfd.readouterr().err
    for hook in ("trainable_modules", "setup", "loss_terms", "on_step_end", "on_evaluate", "on_train_end"):
        assert f"[polydistill trace] {hook} [hook]" in err, hook
    assert "[polydistill trace] finish loss_terms -->" in err
    assert "TrainState(" not in err  # argument dumps are left out


def test_core_never_imports_first_party_plugins():
    for path in (ROOT / "core" / "polydistill").rglob("*.py"):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] == "polydistill_plugins" for n in names), path


def test_first_party_and_contrib_plugins_import_only_the_public_api():
    public = set(polydistill.__all__)
    sources = [*(ROOT / "plugins" / "polydistill_plugins").rglob("*.py"), *(ROOT / "contrib").glob("*/src/**/*.py")]
    assert len(sources) > len(list((ROOT / "plugins" / "polydistill_plugins").rglob("*.py")))
    for path in sources:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("polydistill") and not (node.module or "").startswith("polydistill_plugins"):
                assert node.module == "polydistill", f"{path.name} imports {node.module}"
                assert {a.name for a in node.names} <= public, path


def test_import_polydistill_is_cheap():
    code = "import sys, polydistill; print(sorted(m for m in ('nlpaug', 'torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


@pytest.mark.parametrize(("declared", "message"), [
    ("1.99", r"plugin 'future' needs polydistill plugin API 1\.99, but this polydistill provides 1\.\d+; upgrade polydistill"),
    ("0.9", r"plugin 'future' needs polydistill plugin API 0\.9, .*install a version of the plugin made for API 1\.x"),
    ("one", r"plugin 'future' declares polydistill_api = 'one'; expected 'MAJOR\.MINOR'"),
])
def test_api_versions_compare_major_and_minor(site, declared, message):
    src = SCALE_PLUGIN.replace('polydistill_api = "1.0"', f'polydistill_api = "{declared}"')
    install_fake_distribution(site, "fakeplug-future", "fakeplug_future", src, {"future": "fakeplug_future:Zero"})
    from polydistill.plugins import load_plugin_object

    with pytest.raises(PluginError, match=message):
        load_plugin_object("future")


def test_plugin_objects_given_directly_are_checked_too(models, data, tmp_path):
    class Future:
        polydistill_api = "7.0"

    with pytest.raises(PluginError, match="plugin 'future' needs polydistill plugin API 7.0"):
        polydistill.train(parallel_config(models, data, tmp_path), plugins=[("future", Future)])


def test_settings_that_are_not_a_pydantic_model_are_an_error(site):
    src = SCALE_PLUGIN.replace("Settings = Settings", "Settings = dict")
    install_fake_distribution(site, "fakeplug-odd", "fakeplug_odd", src, {"odd": "fakeplug_odd:Zero"})
    from polydistill.plugins import load_plugin_object

    with pytest.raises(PluginError, match="plugin 'odd': its Settings is not a pydantic model"):
        load_plugin_object("odd")


def test_a_name_registered_by_two_distributions_names_both(site):
    install_fake_distribution(site, "fakeplug-one", "fakeplug_one", SCALE_PLUGIN, {"same": "fakeplug_one:Zero"})
    install_fake_distribution(site, "fakeplug-two", "fakeplug_two", SCALE_PLUGIN, {"same": "fakeplug_two:Zero"})
    from polydistill.plugins import load_plugin_object

    with pytest.raises(PluginError, match=r"plugin name 'same' is registered twice: .*fakeplug-(one|two).* and .*fakeplug-(one|two)"):
        load_plugin_object("same")


def test_hook_recorder_of_polydistill_testing_implements_every_hook():
    from polydistill.testing import HookRecorder

    implemented = {name for name in vars(HookRecorder) if hasattr(getattr(HookRecorder, name), "polydistill_impl")}
    assert implemented == set(hookspecs.STEP_HOOKS + hookspecs.LIFECYCLE_HOOKS)


def test_importing_the_pytest_plugin_is_cheap():
    # polydistill.testing loads in every pytest session of an environment with polydistill
    code = "import sys, polydistill.testing; print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_each_hook_s_combining_rule_is_data_and_its_docstring_says_it():
    """One table (hookspecs.COMBINING) drives PluginHost.run; every hook's "Combining:" line states its rule."""
    from polydistill import hookspecs

    hooks = set(hookspecs.STEP_HOOKS) | set(hookspecs.LIFECYCLE_HOOKS)
    assert set(hookspecs.COMBINING) == hooks
    assert set(hookspecs.COMBINING.values()) <= set(hookspecs.COMBINING_PHRASES)
    for hook, rule in hookspecs.COMBINING.items():
        doc = " ".join(getattr(hookspecs, hook).__doc__.split())
        assert "Combining: " in doc, hook
        line = doc.split("Combining: ", 1)[1]
        assert hookspecs.COMBINING_PHRASES[rule] in line, f"{hook}: rule {rule!r} but the docstring says: {line[:120]}"
        others = [r for r in hookspecs.COMBINING_PHRASES if r != rule and hookspecs.COMBINING_PHRASES[r] in line]
        assert not others, f"{hook}: the docstring also reads as {others}"


def test_call_sites_do_not_choose_a_combining_rule():
    import re

    loop = (ROOT / "core" / "polydistill" / "loop.py").read_text(encoding="utf-8")
    assert not re.findall(r"host\.(single|merged|call|per_plugin|augment_batch|load_states)\(", loop)
