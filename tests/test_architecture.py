"""The architecture's promises: tasks as modules behind an entry point, no task-name branches outside
them, no import circles, the teacher runner and typed loss hints as public API."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import polydistill
from polydistill import ConfigError, LossHints, ModelOutputs, PluginError, hookimpl
from polydistill.tasks import get_task, task_names

from conftest import parallel_config
from test_plugins import install_fake_distribution, site  # noqa: F401  (site: the fixture a fake distribution goes into)

ROOT = Path(__file__).resolve().parents[1]
CORE = ROOT / "core" / "polydistill"

TOY_TASK = """
    from collections import defaultdict

    import torch
    import torch.nn.functional as F

    from polydistill import Task


    class MaxPooled(Task):
        '''Sentence vectors by max pooling, scored by the cosine of each text with its translation.'''

        name = "max_pooled"
        description = "max-pooled sentence embeddings"
        auto_class = "AutoModel"
        output_field = "embeddings"
        primary_metric = "cosine"
        eval_column = "source"
        eval_column_why = "the cosine is taken between each text and its translation"

        def read_outputs(self, out, result, words, pooling):
            keep = result.mask.unsqueeze(-1).bool()
            result.embeddings = out.last_hidden_state.masked_fill(~keep, -1e4).max(1).values

        def evaluate(self, predict, dataset, labels, max_length):
            def embed(ds):
                rows = {}
                for batch, out in predict(ds):
                    rows.update(zip(batch.meta["index"], out.embeddings.float().cpu()))
                return torch.stack([rows[i] for i in range(len(ds))])

            cos = F.cosine_similarity(embed(dataset), embed(dataset.rename_columns({"text": "_t", "source": "text"})))
            per = defaultdict(list)
            for value, lang in zip(cos.tolist(), dataset["lang"]):
                per[lang].append(value)
            return {"per_language": {lang: {"cosine": sum(v) / len(v)} for lang, v in sorted(per.items())}}


    class Misnamed(MaxPooled):
        name = "another_name"


    class NotATask:
        name = "not_a_task"
"""


@pytest.fixture
def toy_task(site):
    install_fake_distribution(site, "fakeplug-task", "fakeplug_task", TOY_TASK, {
        "max_pooled": "fakeplug_task:MaxPooled", "misnamed": "fakeplug_task:Misnamed", "not_a_task": "fakeplug_task:NotATask",
    }, groups=("polydistill.tasks",))
    from polydistill import tasks

    yield
    for name in ("max_pooled", "misnamed", "not_a_task"):
        tasks._loaded.pop(name, None)


def test_a_package_adds_a_task_through_the_entry_point_and_it_trains_and_evaluates(toy_task, models, data, tmp_path):
    assert {"sequence_classification", "token_classification", "embedding", "max_pooled"} <= set(task_names())
    cfg = parallel_config(models, data, tmp_path, "embedding", training__max_steps=4)
    cfg["task"] = "max_pooled"
    result = polydistill.train(cfg)
    assert "loss/mse" in result.history[0]  # kd's default for a task with embeddings and a teacher
    assert set(result.metrics["per_language"]["de"]) == {"cosine"}
    assert result.metrics["average"]["cosine"] == pytest.approx(result.metrics["per_language"]["de"]["cosine"])
    # evaluation says which column the task needs, in the task's words
    cfg["data"]["eval"] = {"path": cfg["data"]["eval"]["path"], "columns": {"text": "de", "lang": "lang"}}
    with pytest.raises(ConfigError, match=r"data\.eval\[0\]\.columns\.source: the cosine is taken between each text and its translation"):
        polydistill.train({**cfg, "output_dir": str(tmp_path / "other")})


def test_unknown_and_broken_tasks_are_config_errors(toy_task, models, data, tmp_path):
    with pytest.raises(ConfigError, match=r"task: unknown task \(did you mean 'embedding'\?\); installed tasks: .*max_pooled.* \(got 'embeding'\)"):
        polydistill.train({**parallel_config(models, data, tmp_path, "embedding"), "task": "embeding"})
    with pytest.raises(ConfigError, match=r"entry point 'misnamed' \(fakeplug_task:Misnamed\) names a task whose name is 'another_name'"):
        get_task("misnamed")
    with pytest.raises(ConfigError, match=r"'not_a_task' \(fakeplug_task:NotATask\) is not a polydistill.tasks.Task subclass"):
        get_task("not_a_task")


_NAMES = ("sequence_classification", "token_classification", "embedding", "causal_lm", "seq2seq")


def _task_name_comparisons(path: Path) -> list[str]:
    """Places in ``path`` that compare a task to a built-in task's name (``task == "embedding"``, ``state.task in (...)``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if not isinstance(node, ast.Compare):
            continue
        for side in [node.left, *node.comparators]:
            values = side.elts if isinstance(side, (ast.Tuple, ast.List, ast.Set)) else [side]
            if any(isinstance(v, ast.Constant) and v.value in _NAMES for v in values) and "task" in ast.unparse(node):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_code_outside_the_task_modules_compares_task_names():
    files = [p for p in CORE.rglob("*.py") if "tasks" not in p.relative_to(CORE).parts]
    files += list((ROOT / "plugins" / "polydistill_plugins").rglob("*.py"))
    found = [hit for p in files for hit in _task_name_comparisons(p)]
    assert not found, "ask the task object (polydistill.get_task / state.task_def) instead:\n" + "\n".join(found)
    # the check sees such a comparison: the R-Drop contrib plugin, written for API 1.1, still makes one
    assert _task_name_comparisons(ROOT / "contrib" / "polydistill-rdrop" / "src" / "polydistill_rdrop" / "__init__.py")


def _module_imports(path: Path, package: str) -> set[str]:
    """polydistill modules ``path`` imports when it is imported (not inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    out: set[str] = set()

    def visit(body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name.startswith(package))
            elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith(package) and not node.level:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)
                visit(node.orelse)
    visit(tree.body)
    return out


def test_the_core_has_no_import_circles():
    modules = {}
    for path in CORE.rglob("*.py"):
        rel = path.relative_to(CORE.parent).with_suffix("")
        name = ".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)
        modules[name] = path
    graph = {name: {m for m in _module_imports(path, "polydistill") if m in modules and m != name} for name, path in modules.items()}
    # importing a submodule imports its package first; the package's own imports are its edges
    state: dict[str, int] = {}
    cycles = []

    def walk(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(trail[trail.index(nxt):] + [nxt]) if nxt in trail else f"{node} -> {nxt}")
            elif nxt not in state:
                walk(nxt, trail + [nxt])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            walk(name, [name])
    assert not cycles, "import circles (move the shared part into a leaf module):\n" + "\n".join(cycles)
    assert "polydistill.loop" not in graph["polydistill.hookspecs"] and "polydistill.loop" not in graph["polydistill.state"]


# ------------------------------------------------------------------ loss hints


def test_loss_hints_combine_one_temperature_and_multiplied_weights():
    s, t = ModelOutputs(logits=torch.zeros(3, 2)), ModelOutputs(logits=torch.zeros(3, 2))
    hints = LossHints().add("a", temperature=2.0).add("b", sample_weights=torch.tensor([1.0, 2.0, 0.0]))
    hints = hints.add("c", sample_weights=lambda so, to: torch.tensor([3.0, 0.5, 1.0]))
    assert hints.resolve_temperature(s, t, 1.0) == 2.0 and LossHints().resolve_temperature(s, t, 1.0) == 1.0
    assert hints.resolve_weights(s, t, 3).tolist() == [3.0, 1.0, 0.0]
    assert LossHints().resolve_weights(s, t, 3) is None
    with pytest.raises(PluginError, match=r"the KD temperature is set twice: by 'a' and by 'c'"):
        hints.add("c", temperature=1.0)
    with pytest.raises(PluginError, match=r"sample weights set by 'd' must hold one weight per sample, shape \(3,\); got shape \(2,\)"):
        LossHints().add("d", sample_weights=torch.ones(2)).resolve_weights(s, t, 3)
    with pytest.raises(PluginError, match=r"sample weights set by 'd' must be finite and >= 0"):
        LossHints().add("d", sample_weights=torch.tensor([1.0, -1.0, 1.0])).resolve_weights(s, t, 3)


def test_api_1_1_meta_keys_are_read_as_hints_and_a_second_temperature_is_refused():
    enc = {"input_ids": torch.zeros(2, 2, dtype=torch.long)}
    batch = polydistill.Batch(texts=["x", "y"], teacher_texts=["x", "y"], langs=["de", "de"], student_inputs=enc,
                              teacher_inputs=[enc], meta={"temperature": 3.0, "sample_weights": torch.tensor([2.0, 1.0])})
    batch = batch.with_hints("mine", sample_weights=torch.tensor([0.5, 0.5]))
    hints = batch.loss_hints()
    assert hints.temperature == 3.0 and hints.temperature_by == "batch.meta"
    assert hints.resolve_weights(None, None, 2).tolist() == [1.0, 0.5]
    with pytest.raises(PluginError, match=r"set twice: by 'batch.meta' and by 'mine'"):
        batch.with_hints("mine", temperature=1.0)


class Sharpen:
    """An API 1.2 plugin: a per-sample temperature and weights through the typed hints."""

    def __init__(self) -> None:
        self.used: list[float] = []

    @hookimpl
    def augment_batch(self, batch, state):
        weights = torch.tensor([0.0] + [1.0] * (len(batch) - 1))
        return batch.with_hints("sharpen", temperature=0.5, sample_weights=weights)

    @hookimpl
    def loss_terms(self, batch, student_out, teacher_out, state):
        from polydistill_plugins.kd import kl_divergence

        w = batch.loss_hints().resolve_weights(student_out, teacher_out, len(batch))
        self.used.append(float(kl_divergence(student_out.logits.detach(), teacher_out.logits, 0.5, None, w)))
        return None


def test_kd_follows_typed_loss_hints(models, data, tmp_path):
    sharpen = Sharpen()
    result = polydistill.train(parallel_config(models, data, tmp_path, training__max_steps=2), plugins=[("sharpen", sharpen)])
    assert [r["loss/kl"] for r in result.history[:2]] == pytest.approx(sharpen.used, rel=1e-6)
    assert result.history[0]["kd/temperature"] == 0.5


# ------------------------------------------------------------------ the teacher runner


class RunTeachers:
    """Answers teacher_outputs through the public runner: each teacher through the cache, fused by the core."""

    def __init__(self) -> None:
        self.forwards = 0

    @hookimpl
    def setup(self, state):
        state.teachers[0].register_forward_hook(lambda *a: setattr(self, "forwards", self.forwards + 1))

    @hookimpl
    def teacher_outputs(self, batch, teachers, weights, state):
        outs = {i: state.run_teacher(i, batch) for i in range(len(teachers))}
        return state.fuse_teacher_outputs(outs, weights, batch)


def test_a_plugin_runs_teachers_through_the_cache_and_fuses_like_the_core(models, data, tmp_path):
    runner = RunTeachers()
    cfg = parallel_config(models, data, tmp_path, training__epochs=2, cache={"enabled": True, "dir": str(tmp_path / "cache")})
    mine = polydistill.train(cfg, plugins=[("runner", runner)])
    batches = len([r for r in mine.history if "loss" in r]) // 2
    assert runner.forwards == batches  # the second epoch reads every output from the cache
    core = polydistill.train({**cfg, "output_dir": str(tmp_path / "core")})
    assert [r["loss/kl"] for r in mine.history if "loss/kl" in r] == pytest.approx(
        [r["loss/kl"] for r in core.history if "loss/kl" in r], rel=1e-6)


# ------------------------------------------------------------------ paths


def test_paths_are_resolved_once_when_the_config_loads(models, data, tmp_path, monkeypatch):
    """Relative paths are read from the config file's folder; lower layers get them resolved; a plugin's
    own data file (load_data) resolves the same way."""
    import shutil

    import yaml

    folder = tmp_path / "project"
    (folder / "models").mkdir(parents=True)
    shutil.copytree(models["teacher"], folder / "models" / "teacher")
    shutil.copy(data["parallel"], folder / "pairs.jsonl")
    cfg = parallel_config(models, data, tmp_path)
    cfg["teachers"] = [{"model": "models/teacher", "name": "teacher"}]
    cfg["data"] = {"train": {"path": "pairs.jsonl", "columns": {"text": "de", "source": "en", "lang": "lang"}}}
    (folder / "run.yaml").write_text(yaml.safe_dump(cfg))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    config = polydistill.load_config(folder / "run.yaml")
    assert config.teachers[0].model == str(folder / "models" / "teacher")
    assert config.data.train[0].path == str(folder / "pairs.jsonl")
    assert config.teachers[0].tokenizer is None and config.output_dir == cfg["output_dir"]
    own = polydistill.load_data({"path": "pairs.jsonl", "columns": {"text": "de", "lang": "lang"}}, config)
    assert len(own) == len(polydistill.load_data(config.data.train[0], config))
