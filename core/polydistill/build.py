"""Building a run's parts from its config: models and labels, plugin modules, optimizer, schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterable

import torch
from torch import nn

from polydistill import models as M
from polydistill.batch import Trainable
from polydistill.config import Config, TrainingConfig
from polydistill.data import Collator, load_sources, make_loader
from polydistill.errors import ConfigError, PluginError
from polydistill.tasks import get_task


def models(config: Config, encoder: tuple[nn.Module, Any] | None = None) -> tuple[list[nn.Module], list[Any], nn.Module, Any, list[str] | None]:
    """Teachers (frozen, eval) and their tokenizers, the student and its tokenizer, and the run's labels.

    Teachers load first (a student may be cut from one); the labels are the
    config's, else the first teacher's, else the student's named ones.
    ``encoder``: a multi-task run's shared student and tokenizer; the student is then the task's head on its encoder.
    """
    task = get_task(config.task)
    teachers, teacher_toks = [], []
    for i, t in enumerate(config.teachers):
        role = f"teachers[{i}]"
        teachers.append(M.load_model(t.model, task, None, t.revision, role, require_head=True).eval())
        teacher_toks.append(M.load_tokenizer(t.tokenizer or t.model, role, None if t.tokenizer else t.revision, task))
    labels = config.labels or (M.model_labels(teachers[0]) if teachers and task.named_labels else None)
    if encoder is not None:
        if task.named_labels and not labels:
            raise ConfigError("labels: give the label names (no teacher names them, and the shared student's head is another task's)")
        student, student_tok = M.head_on(encoder[0], task, labels).train(), task.prepare_tokenizer(encoder[1], "student")
    else:
        student, student_tok = _student(config, teachers, teacher_toks, labels)
    if task.named_labels and not labels:
        labels = M.model_labels(student, named_only=True)
        if not labels:
            raise ConfigError("labels: give the label names (neither a teacher nor the student model names them)")
    for name, t in zip(config.teacher_names(), teachers):
        if task.named_labels:
            own = M.model_labels(t, named_only=True)
            if t.config.num_labels != len(labels or []) or (own and own != labels):
                raise ConfigError(
                    f"labels: {labels} do not match teacher '{name}' ({own or t.config.num_labels}); "
                    "labels are matched by position, so give them in the teacher's order (or leave `labels` out)"
                )
        t.requires_grad_(False)
    return teachers, teacher_toks, student, student_tok, labels


def _student(config: Config, teachers: list[nn.Module], teacher_toks: list[Any], labels: list[str] | None) -> tuple[nn.Module, Any]:
    sc = config.student
    if sc.from_teacher is not None:
        ref = sc.from_teacher.teacher
        idx = ref if isinstance(ref, int) else config.teacher_names().index(ref)
        student = M.student_from_teacher(teachers[idx], sc.from_teacher.layers, config.task, labels, sc.from_teacher.decoder_layers)
    elif sc.config is not None:
        base = sc.config["base"]
        overrides = {k: v for k, v in sc.config.items() if k != "base"}
        student = M.student_from_config(base, overrides, config.task, labels)
    else:
        student = M.load_model(sc.model, config.task, labels, role="student.model")
    if sc.from_teacher is not None and not sc.tokenizer:
        tok = teacher_toks[idx]
    else:
        path, revision, role = M.student_tokenizer_source(config)
        tok = M.load_tokenizer(path, role, revision, config.task)
    return student.train(), tok


@dataclass
class Pipeline:
    """A run's data: loaded sources, the student's own vocabulary (None: kept), its tokenizer, the collator, the batches."""

    train: Any
    eval: Any
    vocabulary: Any
    student_tokenizer: Any
    collator: Collator
    loader: Any


def pipeline(config: Config, student: nn.Module, student_tok: Any, teacher_toks: list[Any], labels: list[str] | None,
             num_shards: int = 1, shard: int = 0) -> Pipeline:
    """Data, then the student's own vocabulary (learned from the training text), then batching (one shard of them)."""
    from polydistill import vocabulary as V

    dc = config.data
    train = load_sources(dc.train, config, labels) if dc.train else None
    evaluation = load_sources(dc.eval, config, labels) if dc.eval else None
    if evaluation is not None and not hasattr(evaluation, "__len__"):
        raise ConfigError("data.eval: evaluation sources cannot be streamed")
    vocabulary = None
    if V.active(config.student.vocabulary):
        vocabulary = V.build_vocabulary(config, student, student_tok, train, evaluation)
        student_tok = vocabulary.tokenizer
    if train is not None:  # e.g. long question-answering contexts become windows
        train = get_task(config.task).prepare_data(train, student_tok, dc.max_length, dc.doc_stride)
    collator = Collator(config.task, student_tok, teacher_toks, dc.max_length, dc.padding, labels, config.mode == "parallel")
    loader = make_loader(train, collator, dc.batch_size, config.training.seed, dc.shuffle, dc.length_grouping,
                         dc.stream_buffer, num_shards, shard)
    return Pipeline(train, evaluation, vocabulary, student_tok, collator, loader)


def plugin_modules(host: Any, state: Any) -> tuple[dict[str, nn.Module], dict[str, Trainable]]:
    """The modules plugins return from ``trainable_modules`` (as ``plugin.name``), and those with their own settings."""
    modules: dict[str, nn.Module] = {}
    own: dict[str, Trainable] = {}  # keyed as in the ModuleDict: "plugin__name"
    for plugin, mods in host.run("trainable_modules", state=state).items():
        for name, module in mods.items():
            key = f"{plugin}.{name}"
            if isinstance(module, Trainable):
                own[key.replace(".", "__")], module = module, module.module
            if not isinstance(module, nn.Module):
                raise PluginError(f"trainable_modules returned {type(module).__name__} for '{name}'; expected a torch "
                                  "nn.Module or polydistill.Trainable", plugin=plugin, hook="trainable_modules")
            modules[key] = module
    return modules, own


def total_steps(tc: TrainingConfig, loader: Any) -> int:
    """Optimizer steps of the run: ``max_steps``, or ``epochs`` of the loader's batches in accumulation groups."""
    if tc.max_steps:
        return tc.max_steps
    try:
        per_epoch = len(loader)
    except TypeError:
        raise ConfigError("training.max_steps: required when the training data is streamed") from None
    return math.ceil(per_epoch / tc.gradient_accumulation_steps) * tc.epochs


def optimizer(tc: TrainingConfig, student: nn.Module, extra: nn.ModuleDict, own: dict[str, Trainable]) -> torch.optim.Optimizer:
    """AdamW/Adam/SGD over the student and plugin modules; a ``Trainable`` gets groups of its own."""

    def split(named: Iterable[tuple[str, nn.Parameter]]) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        decay, no_decay = [], []
        for name, p in named:
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        return decay, no_decay

    shared = [(n, p) for n, p in extra.named_parameters() if n.split(".", 1)[0] not in own]
    decay, no_decay = split([*student.named_parameters(), *shared])
    groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    for key, t in own.items():
        # "max_grad_norm" in a group marks it as clipped on its own (see Trainer._update)
        mine = {"lr": t.learning_rate or tc.learning_rate, "max_grad_norm": t.max_grad_norm, "module": key}
        d, nd = split(extra[key].named_parameters())
        groups += [{"params": d, "weight_decay": tc.weight_decay if t.weight_decay is None else t.weight_decay, **mine},
                   {"params": nd, "weight_decay": 0.0, **mine}]
    groups = groups[:2] + [g for g in groups[2:] if g["params"]]
    if tc.optimizer == "sgd":
        cls, kwargs = torch.optim.SGD, {"lr": tc.learning_rate, "momentum": 0.9}
    else:
        cls = torch.optim.AdamW if tc.optimizer == "adamw" else torch.optim.Adam
        kwargs = {"lr": tc.learning_rate, "betas": tc.betas}
    if tc.fused_optimizer is False:
        return cls(groups, **kwargs)
    try:
        # The default per-tensor loop costs a quarter of a small student's CPU step.
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError) as exc:
        if tc.fused_optimizer:
            raise ConfigError(f"training.fused_optimizer: torch has no fused {tc.optimizer} here ({exc})") from None
        return cls(groups, **kwargs)


def scheduler(tc: TrainingConfig, optimizer: Any, total_steps: int) -> Any:
    """transformers' schedule for ``training.scheduler`` with its warm-up."""
    from transformers import get_scheduler

    warmup = tc.warmup_steps or int(tc.warmup_ratio * total_steps)
    name = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[tc.scheduler]
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def engine_plugins(tc: TrainingConfig, resolve: Any = lambda p: p) -> dict[str, Any]:
    """Accelerator arguments a sharded teacher needs: under DeepSpeed, a plugin of its own beside the student's."""
    import os

    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if not (tc.shard_teachers and deepspeed):
        return {}
    if not tc.teacher_deepspeed_config:
        raise ConfigError("training.teacher_deepspeed_config: shard_teachers under DeepSpeed needs the teachers' own DeepSpeed "
                          "config (e.g. docs/examples/accelerate/ds_zero3_teacher.json, ZeRO-3 inference)")
    from accelerate.utils import DeepSpeedPlugin

    # The launch's plugin (from its --config_file) trains the student; the first one is active.
    return {"deepspeed_plugins": {"student": DeepSpeedPlugin(), "teacher": DeepSpeedPlugin(hf_ds_config=resolve(tc.teacher_deepspeed_config))}}


def place_teachers(acc: Any, teachers: list[nn.Module], tc: TrainingConfig) -> list[nn.Module]:
    """Teachers on the run's device: whole on each process, or with ``shard_teachers`` sharded by FSDP or DeepSpeed."""
    from accelerate.utils import DistributedType

    from polydistill.errors import warn

    engine = acc.distributed_type
    if not tc.shard_teachers or engine not in (DistributedType.FSDP, DistributedType.DEEPSPEED):
        if tc.shard_teachers:
            warn("training.shard_teachers: the run is not under FSDP or DeepSpeed (launch it with `accelerate launch "
                 "--config_file docs/examples/accelerate/...`); each process holds the teachers whole")
        return [t.to(acc.device) for t in teachers]
    placed = []
    for t in teachers:
        before = list(acc._models)
        if engine == DistributedType.DEEPSPEED:
            acc.state.select_deepspeed_plugin("teacher")
            try:
                t = acc.prepare(t.eval())  # a DeepSpeed engine of the teacher's own config (ZeRO-3: sharded inference)
            finally:
                acc.state.select_deepspeed_plugin("student")
        elif acc.is_fsdp2:
            from accelerate.utils.fsdp_utils import fsdp2_prepare_model

            t = fsdp2_prepare_model(acc, t.eval())
        else:
            t = acc.prepare_model(t.eval())
        # Checkpoints hold what the run trains: a frozen teacher is loaded again from its source, not saved.
        acc._models[:] = before
        placed.append(t.eval())
    return placed


def fresh_accelerate_state() -> None:
    """Let each run in a process choose its own precision and accumulation.

    accelerate keeps them in process-wide singletons that refuse a second,
    different setting; sweeps and notebooks run several configs in one process.
    The distributed (partial) state is kept: it belongs to the launch.
    """
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()
