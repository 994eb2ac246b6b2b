"""The multi-task loop: one student encoder, a head per task, steps drawn between the tasks.

Each task is a part with what a single-task run has (its plugins, teachers and
their cache, loader, evaluation data and :class:`~polydistill.TrainState`); the
loop makes one part current for a step (:meth:`MultiTaskTrainer._use`) and runs
the single-task step on it, so every hook sees the task's own state. The step,
the optimizer, the schedule and the history are the run's.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from polydistill import build
from polydistill import checkpoint as ckpt
from polydistill import preflight
from polydistill.batch import Trainable
from polydistill.config import RESUMABLE_FIELDS, load_config, without_fields
from polydistill.errors import ConfigError, DataError, PolydistillError
from polydistill.loop import Trainer, eval_fields, eval_line
from polydistill.multitask import MultiTaskConfig, task_at, task_probabilities
from polydistill.plugins import PluginHost
from polydistill.state import TrainState
from polydistill.tasks import get_task
from polydistill.teachers import TeacherRunner


@dataclass
class TaskPart:
    """One task of the run: what the loop switches to when the task trains or is evaluated."""

    name: str
    config: Any
    host: PluginHost
    state: TrainState
    loader: Any
    train_data: Any
    eval_data: Any
    collator: Any
    runner: TeacherRunner | None = None


class TaskWeights(nn.Module):
    """How each task's loss counts: a fixed weight, or a learned one (uncertainty weighting, Kendall et al. 2018)."""

    def __init__(self, names: list[str], weights: dict[str, float], scheme: str):
        super().__init__()
        self.names, self.scheme = list(names), scheme
        start = torch.tensor([-math.log(weights[n]) for n in names])
        if scheme == "uncertainty":
            self.log_var = nn.Parameter(start)  # s_t: the loss becomes exp(-s_t)·L + s_t
        else:
            self.register_buffer("log_var", start)

    def forward(self, name: str, loss: torch.Tensor) -> torch.Tensor:
        s = self.log_var[self.names.index(name)]
        weighted = torch.exp(-s) * loss
        return weighted + s if self.scheme == "uncertainty" else weighted

    def weight(self, name: str) -> float:
        return float(torch.exp(-self.log_var[self.names.index(name)].detach()))


class Heads(nn.ModuleDict):
    """The tasks' models by task name. They share the encoder's tensors; ``state_dict`` names each tensor once
    (checkpoints hold the encoder once) and ``load_state_dict`` gives it back to every model that shares it."""

    def _aliases(self) -> list[list[str]]:
        names: dict[int, list[str]] = {}
        for name, t in [*self.named_parameters(remove_duplicate=False), *self.named_buffers(remove_duplicate=False)]:
            names.setdefault(id(t), []).append(name)
        return [group for group in names.values() if len(group) > 1]

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        full = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", "")
        for group in self._aliases():
            for name in group[1:]:
                full.pop(prefix + name, None)
        return full

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        state_dict = dict(state_dict)
        for first, *others in self._aliases():
            if first in state_dict:
                state_dict.update({name: state_dict[first] for name in others})
        return super().load_state_dict(state_dict, strict=strict, assign=assign)


@contextlib.contextmanager
def _in_task(name: str) -> Iterator[None]:
    """Errors while a task is built name it."""
    try:
        yield
    except ConfigError as exc:
        raise ConfigError(f"tasks.{name}: {exc}") from None
    except PolydistillError as exc:
        exc.add_note(f"(in task '{name}')")
        raise


class MultiTaskTrainer(Trainer):
    """Builds a multi-task run (a config with ``tasks``) and trains it."""

    def __init__(self, config: MultiTaskConfig | dict | str, plugins: Iterable[tuple[str, Any]] = (), output_dir: str | None = None):
        self.config = config = load_config(config)
        if not isinstance(config, MultiTaskConfig):
            raise ConfigError("config: a multi-task run needs `tasks` (use polydistill.Trainer for one task)")
        plugins = list(plugins)
        for name, cfg in config.tasks.items():
            preflight.check(cfg, plugins, origin=f"tasks.{name}", output_dir=output_dir)
            vc = cfg.student.vocabulary
            if vc.method != "keep" or vc.transliterate != "none":
                raise ConfigError("student.vocabulary: a multi-task run keeps the student's vocabulary (method: keep); "
                                  "build one with a single-task run and start the multi-task student from it")
        tc = config.training
        self.output_dir = Path(output_dir or config.output_dir)
        self.accelerator = acc = self._start(config, self.output_dir)
        if acc.num_processes > 1:
            raise ConfigError("multi-task runs train on one process (each step trains one task's head, which DDP "
                              "cannot synchronise); launch it without torchrun / accelerate launch")
        self.vocabulary = None
        order = [config.builder] + [n for n in config.tasks if n != config.builder]
        parts: dict[str, TaskPart] = {}
        own: dict[str, Any] = {}
        encoder = None
        for name in order:
            cfg = config.tasks[name]
            with _in_task(name):
                host = PluginHost.from_config(cfg.plugins, plugins)
                teachers, teacher_toks, student, student_tok, labels = build.models(cfg, encoder)
                encoder = encoder or (student, student_tok)
                data = build.pipeline(cfg, student, student_tok, teacher_toks, labels)
                same = [tok is None and cfg.mode == "same" for tok in data.collator.teacher_tokenizers]
                state = TrainState(
                    config=cfg, accelerator=acc, student=student, teachers=teachers, teacher_names=cfg.teacher_names(),
                    student_tokenizer=data.student_tokenizer, teacher_tokenizers=teacher_toks, labels=labels, plugins=host,
                    output_dir=self.output_dir, same_tokens=same,
                )
                parts[name] = TaskPart(name, cfg, host, state, data.loader, data.train, data.eval, data.collator)
                state.modules, mine = build.plugin_modules(host, state)
                get_task(cfg.task).check_teachers(cfg.teacher_names(), [s or state.cross_tokenizer is not None for s in same])
                own.update({f"{name}__{k}": t for k, t in mine.items()})
        self.parts = {n: parts[n] for n in config.tasks}
        names = list(self.parts)

        self.sizes = {}
        for name, part in self.parts.items():
            try:
                self.sizes[name] = math.ceil(len(part.loader) / tc.gradient_accumulation_steps)
            except TypeError:
                if config.options.sampling != "round_robin" or not tc.max_steps:
                    raise ConfigError(f"tasks.{name}: its training data is streamed (no length): use multitask.sampling: "
                                      "round_robin with training.max_steps") from None
                self.sizes[name] = 1
        self.probabilities = task_probabilities(config.options, self.sizes)
        #: Optimizer steps of one pass's worth over every task's data (evaluation and checkpoints without *_every).
        self.steps_per_epoch = sum(self.sizes.values())
        total = tc.max_steps or self.steps_per_epoch * tc.epochs

        self.weighting = TaskWeights(names, config.weights, config.options.weighting)
        modules = {f"{n}__{k.replace('.', '__')}": m for n, p in self.parts.items() for k, m in p.state.modules.items()}
        modules["multitask__weights"] = self.weighting
        if config.options.weighting == "uncertainty":
            own["multitask__weights"] = Trainable(self.weighting, learning_rate=config.options.weight_learning_rate,
                                                  weight_decay=0.0)
        self.plugin_modules = nn.ModuleDict(modules).to(acc.device)
        heads = Heads({n: p.state.student for n, p in self.parts.items()})
        optimizer = build.optimizer(tc, heads, self.plugin_modules, own)
        self.heads, optimizer = acc.prepare(heads, optimizer)
        scheduler = build.scheduler(tc, optimizer, total)
        history: list[dict[str, Any]] = []
        for name, part in self.parts.items():
            state = part.state
            state.optimizer, state.scheduler, state.total_steps, state.history = optimizer, scheduler, total, history
            state.teachers = build.place_teachers(acc, state.teachers, tc)
            state.teacher_runner = part.runner = TeacherRunner.for_state(state)
            with _in_task(name):
                part.host.run("setup", state=state)
            if state.need_attentions:
                for model in [state.unwrapped_student(), *state.teachers]:
                    if model.config._attn_implementation != "eager":
                        model.set_attn_implementation("eager")
        self._evaluated_at = self._checkpointed_at = -1
        self._group_skipped = False
        self._iters: dict[str, Any] = {}
        self._use(names[0])

    # ------------------------------------------------------------------ the current task

    def _use(self, name: str) -> None:
        """Make task ``name`` the one the step, the hooks and the evaluation see; it takes the run's progress."""
        part = self.parts[name]
        before = getattr(self, "state", None)
        if before is not None and before is not part.state:
            part.state.step, part.state.skipped_batches = before.step, before.skipped_batches
        self.current, self.state, self.host, self.runner = name, part.state, part.host, part.runner
        self.loader, self.train_data, self.eval_data, self.collator = part.loader, part.train_data, part.eval_data, part.collator

    def _next_group(self, name: str) -> list[Any]:
        """Task ``name``'s next accumulation group; at the end of its data its next epoch begins."""
        part, accum = self.parts[name], self.config.training.gradient_accumulation_steps
        st = part.state
        while True:
            it = self._iters.get(name)
            if it is None:
                it = self._iters[name] = iter(part.loader.iterate(st.epoch, skip=st.batch_in_epoch))
            group = list(itertools.islice(it, accum - st.batch_in_epoch % accum))
            if group:
                return group
            if st.batch_in_epoch == 0:
                raise DataError(f"tasks.{name}: data.train: an epoch gave no batches (check its sources' filter and limit)")
            st.epoch, st.batch_in_epoch = st.epoch + 1, 0
            self._iters[name] = None

    # ------------------------------------------------------------------ steps

    def _train(self, stop: Any) -> None:
        """Steps until the last: each from the task :func:`~polydistill.multitask.task_at` draws for it."""
        tc, names = self.config.training, list(self.parts)
        micro: list[dict[str, float]] = []
        while self.state.step < self.state.total_steps:
            self._use(task_at(self.state.step, names, self.probabilities, self.config.options, tc.seed))
            try:
                done = self._run_group(self._next_group(self.current), micro, stop)
            except Exception as exc:
                self._keep_last_good_state(exc)
                raise
            step = self.state.step
            if step % self.steps_per_epoch == 0 or done:
                if not tc.eval_every and step % self.steps_per_epoch == 0:
                    self._metrics = self.evaluate()
                if not tc.checkpoint_every and self._checkpointed_at != step:
                    self.save_checkpoint()
            if done:
                break
        if stop.requested:
            self._interrupted()

    def step(self, batch: Any, group_size: int = 1, sync: bool = True) -> dict[str, float]:
        acc = self.accelerator
        # the heads are called one by one, not through the prepared ModuleDict's forward: autocast here
        with acc.autocast() if self.config.training.mixed_precision != "no" else contextlib.nullcontext():
            logs = super().step(batch, group_size, sync)
        out = {f"{self.current}/{k}": v for k, v in logs.items()}
        out["loss"] = logs["loss"]
        out[f"{self.current}/weight"] = self.weighting.weight(self.current)
        return out

    def _total_loss(self, terms: dict[str, torch.Tensor], regs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.weighting(self.current, super()._total_loss(terms, regs))

    def _log(self, logs: dict[str, float]) -> None:
        mine = f"{self.current}/"
        # what the task's plugins logged in on_step_end is the task's too
        logs = {k if k in ("loss", "lr") or k.startswith(mine) else mine + k: v for k, v in logs.items()}
        logs[f"{self.current}/steps"] = 1  # an int: summed over log_every, the steps each task trained
        super()._log(logs)

    def _bar_fields(self, mean: dict[str, Any]) -> dict[str, str]:
        # each task's own loss, by name: the tasks' terms share names (loss/kl), so the base bar would mix them
        fields = {"loss": f"{mean['loss']:.4g}"}
        fields.update({name: f"{mean[f'{name}/loss']:.4g}" for name in self.parts if f"{name}/loss" in mean})
        return fields

    # ------------------------------------------------------------------ evaluation

    def evaluate(self) -> dict[str, Any]:
        """Every task on its own eval data: ``tasks`` holds each task's metrics, ``average`` and ``per_language``
        name them ``<task>/<metric>``."""
        step, current = self.state.step, self.current
        self._evaluated_at = step
        per_task: dict[str, dict[str, Any]] = {}
        try:
            for name, part in self.parts.items():
                if part.eval_data is not None:
                    self._use(name)
                    per_task[name] = self._evaluate_task()
        finally:
            self._use(current)
        if not per_task:
            return {}
        row: dict[str, Any] = {"step": step}
        for name, m in per_task.items():
            row.update(eval_fields(m, f"{name}/"))
        self._record(row)
        for name, m in per_task.items():
            first = get_task(self.parts[name].config.task).primary_metric
            self.accelerator.print(f"eval step {step}: {name}: {eval_line(m, first)}")
        return combine(per_task)

    # ------------------------------------------------------------------ checkpoints

    def _checkpoint_extra(self) -> dict[str, Any]:
        state = self.state
        return {
            "step": state.step,
            "skipped_batches": state.skipped_batches,
            "scheduler": state.scheduler.state_dict(),
            "plugin_modules": self.plugin_modules.state_dict(),
            "history": state.history,
            "config": without_fields(self.config.resolved_dict(), RESUMABLE_FIELDS),
            "tasks": {name: {"epoch": p.state.epoch, "batch_in_epoch": p.state.batch_in_epoch,
                             "plugins": p.host.run("state_dict", state=p.state),
                             "data_fingerprint": getattr(p.train_data, "_fingerprint", None)}
                      for name, p in self.parts.items()},
        }

    def _restore(self, extra: dict[str, Any], found: Path) -> None:
        saved = extra.get("tasks")
        if not isinstance(saved, dict) or set(saved) != set(self.parts):
            raise ConfigError(f"--resume: checkpoint {found} is not of a multi-task run with the tasks {', '.join(self.parts)}")
        current = self.current
        self.state.scheduler.load_state_dict(extra["scheduler"])
        self.plugin_modules.load_state_dict(extra["plugin_modules"])
        self.state.history[:] = list(extra.get("history", []))  # one list, every task's state holds it
        for name, part in self.parts.items():
            self._use(name)
            self._check_data(saved[name].get("data_fingerprint"), found, f"the training data of task '{name}'")
            st = part.state
            st.step, st.skipped_batches = extra["step"], extra.get("skipped_batches", 0)
            st.epoch, st.batch_in_epoch = saved[name]["epoch"], saved[name]["batch_in_epoch"]
            part.host.run("load_state_dict", state=st, saved=saved[name].get("plugins", {}))
        self._iters = {}
        self._use(current)

    # ------------------------------------------------------------------ the end

    def _cache_summaries(self) -> list[str]:
        return [f"{name}: {line}" for name, p in self.parts.items() if p.runner and (line := p.runner.summary()) is not None]

    def _train_end(self, metrics: dict[str, Any]) -> None:
        for name, part in self.parts.items():
            part.host.run("on_train_end", state=part.state, metrics=metrics.get("tasks", {}).get(name, {}))

    def plugin_versions(self) -> dict[str, str | None]:
        versions: dict[str, str | None] = {}
        for part in self.parts.values():
            versions.update(part.host.versions())
        return versions

    def save_student(self) -> Path:
        """``student/encoder`` (the shared encoder, a sentence-transformers model) and ``student/<task>`` (the encoder
        with the task's head, loadable with transformers), each with its tokenizer and model card."""
        from polydistill import api

        student_dir = self.output_dir / "student"
        if self.accelerator.is_main_process:
            api.replace_dir(student_dir, lambda tmp: self._fill_student(tmp, {}))
            ckpt.dump_json(self.output_dir / "plugins.json", self.plugin_versions())
        return student_dir

    def _fill_student(self, root: Path, metrics: dict[str, Any]) -> None:
        from polydistill import api

        step, versions = self.state.step, self.plugin_versions()
        self.usage: dict[str, list[str]] = {}
        for name, part in self.parts.items():
            st = part.state
            st.unwrapped_student().save_pretrained(root / name, safe_serialization=True)
            st.student_tokenizer.save_pretrained(root / name)
            self.usage[name] = st.task_def.save_files(root / name, st)
            ckpt.write_atomic(root / name / "README.md", api.model_card(part.config, {}, versions, step, None, self.usage[name]))
        builder = self.parts[self.config.builder]
        embedding = next((p for p in self.parts.values() if not p.state.task_def.head), None)
        encoder = builder.state.unwrapped_student().base_model
        encoder.save_pretrained(root / "encoder", safe_serialization=True)
        builder.state.student_tokenizer.save_pretrained(root / "encoder")
        like = embedding.state if embedding is not None else SimpleNamespace(
            config=builder.config, normalized_embeddings=None, unwrapped_student=lambda: encoder)
        usage = get_task("embedding").save_files(root / "encoder", like)
        ckpt.write_atomic(root / "README.md", self._card(usage))

    def _card(self, encoder_usage: list[str]) -> str:
        lines = ["# Multi-task student distilled with polydistill", "",
                 f"One encoder trained by {len(self.parts)} tasks for {self.state.step} steps; each folder loads on its own.", "",
                 "| folder | task | load with |", "|---|---|---|"]
        for name, part in self.parts.items():
            task = part.state.task_def
            lines.append(f"| `{name}/` | {task.name} | `transformers.{task.auto_class}.from_pretrained(\"{name}\")` |")
        lines += ["| `encoder/` | the shared encoder (embedding) | `sentence_transformers.SentenceTransformer(\"encoder\")` |",
                  "", "## The encoder alone", "",
                  *(line.replace("PATH/TO/student", "PATH/TO/student/encoder") for line in encoder_usage), ""]
        return "\n".join(lines)

    def save_results(self, metrics: dict[str, Any]) -> None:
        """``metrics.json``, each task's model card with its evaluation, ``results.md`` with a table and a plot per task."""
        from polydistill import api
        from polydistill.report import plot_run

        if not self.accelerator.is_main_process:
            return
        out, step = self.output_dir, self.state.step
        ckpt.dump_json(out / "metrics.json", ckpt.tidy(metrics))
        versions = self.plugin_versions()
        usage = getattr(self, "usage", {})
        lines = [f"# {out.name}: the multi-task student after {step} steps", ""]
        for name, part in self.parts.items():
            m = metrics.get("tasks", {}).get(name, {})
            ckpt.write_atomic(out / "student" / name / "README.md",
                              api.model_card(part.config, m, versions, step, None, usage.get(name)))
            if not m.get("per_language"):
                continue
            metric = part.state.task_def.primary_metric
            png = f"results-{name}.png"
            ckpt.write_atomic(out / png, plot_run(m, metric, f"{name}: {metric} per language"))
            lines += [f"## {name} ({part.config.task})", "", *api.metrics_table(m), "", f"![{name}: {metric} per language]({png})", ""]
        ckpt.write_atomic(out / "results.md", "\n".join(lines))


def combine(per_task: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Several tasks' metrics as one run's: ``<task>/<metric>`` in ``average`` and ``per_language``, and ``tasks``."""
    average = {f"{n}/{k}": v for n, m in per_task.items() for k, v in m["average"].items()}
    per_language: dict[str, dict[str, Any]] = {}
    for n, m in per_task.items():
        for lang, values in m["per_language"].items():
            per_language.setdefault(lang, {}).update({f"{n}/{k}": v for k, v in values.items()})
    return {"average": average, "per_language": per_language, "tasks": per_task}
