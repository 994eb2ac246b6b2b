"""Loading teachers and students, building a student from a teacher, and forward passes."""

from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from polydistill.batch import ModelOutputs
from polydistill.errors import ConfigError
from polydistill.tasks import Task, get_task

def load_model(
    name_or_path: str,
    task: str | Task,
    labels: list[str] | None = None,
    revision: str | None = None,
    role: str = "model",
    require_head: bool = False,
) -> nn.Module:
    """Load a model for ``task`` from a hub id or local directory with transformers' Auto classes.

    ``require_head``: fail when the task's head is not in the checkpoint (teachers).
    """
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file loading bars would bury the run's own output
    task = get_task(task)
    kwargs: dict[str, Any] = task.label_config(labels)
    if revision:
        kwargs["revision"] = revision
    from polydistill.preflight import looks_local

    if looks_local(name_or_path) and not Path(name_or_path).expanduser().exists():
        raise ConfigError(f"{role}: no such model directory: {name_or_path}")  # a path, never a hub id
    kwargs.update(hub_options(name_or_path))
    _check_head(name_or_path, task, labels, revision, role, require_head)
    try:
        model, info = task.model_class().from_pretrained(name_or_path, output_loading_info=True, **kwargs)
    except (OSError, ValueError) as exc:
        if kwargs.get("local_files_only"):
            raise _offline_error(name_or_path, role) from None
        hint = "" if Path(name_or_path).exists() else " (not a local directory; as a hub id it needs network access or the local HF cache)"
        raise ConfigError(f"{role}: cannot load '{name_or_path}'{hint}: {_first_line(exc)}") from None
    except RuntimeError as exc:
        if labels and "mismatched" in str(exc):  # the checkpoint's head has another number of labels
            from transformers import AutoConfig

            own = AutoConfig.from_pretrained(name_or_path, revision=revision)
            names = [own.id2label[i] for i in sorted(own.id2label)]
            raise ConfigError(
                f"{role}: '{name_or_path}' has a head for {own.num_labels} labels {names}, but this run has {len(labels)} "
                f"{labels}; use a model with the run's labels, one without a {task.name} head, or student.from_teacher"
            ) from None
        raise
    if require_head and task.head:
        missing = sorted(k for k in info.get("missing_keys", ()) if "pooler" not in k)
        if missing:
            raise ConfigError(
                f"{role}: '{name_or_path}' has no trained {task.name} head (not in the checkpoint: {', '.join(missing[:4])}); "
                "a teacher with a random head teaches noise. Fine-tune it first: a config with no teachers does that."
            )
    return model


_HUB_REACHABLE: dict[str, bool] = {}


def hub_options(name_or_path: str) -> dict[str, Any]:
    """``from_pretrained`` options for a hub id: ``local_files_only`` when the hub cannot be reached (checked once per
    process, 2 s at most), so an offline run reads the local HF cache at once instead of retrying for a minute."""
    import os

    if Path(name_or_path).expanduser().exists() or os.environ.get("HF_HUB_OFFLINE", "").strip() not in ("", "0"):
        return {}
    from huggingface_hub import constants

    endpoint = constants.ENDPOINT
    if endpoint not in _HUB_REACHABLE:
        import socket
        from urllib.parse import urlparse

        url = urlparse(endpoint)
        try:
            socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=2).close()
            _HUB_REACHABLE[endpoint] = True
        except OSError:
            _HUB_REACHABLE[endpoint] = False
    return {} if _HUB_REACHABLE[endpoint] else {"local_files_only": True}


def _offline_error(name_or_path: str, role: str) -> ConfigError:
    from huggingface_hub import constants

    return ConfigError(f"{role}: '{name_or_path}' is not a local folder, the hub ({constants.ENDPOINT}) cannot be reached, and "
                       f"it is not in the local Hugging Face cache ({constants.HF_HUB_CACHE}); give a local model folder, or "
                       "download it once where there is network (HF_HUB_OFFLINE=1 then reads the cache without trying the network)")


def _check_head(name_or_path: str, task: Task, labels: list[str] | None, revision: str | None, role: str, require_head: bool) -> None:
    """Refuse a checkpoint whose head is for another task, or names other labels than the run's in the same slots."""
    if not task.head:
        return
    from transformers import AutoConfig

    from polydistill.tasks import task_names

    try:
        own = AutoConfig.from_pretrained(name_or_path, **({"revision": revision} if revision else {}), **hub_options(name_or_path))
    except (OSError, ValueError):
        return  # loading the model says what is wrong
    archs = list(getattr(own, "architectures", None) or [])
    heads = [h for h in (get_task(n).head for n in task_names()) if h and h != task.head]
    other = [a for a in archs if any(a.endswith(h) for h in heads)]
    if require_head and other and not any(a.endswith(task.head) for a in archs):
        raise ConfigError(f"{role}: '{name_or_path}' is a {other[0]} checkpoint, its head is not for {task.name}; "
                          f"give a model trained for {task.name}")
    id2label = getattr(own, "id2label", None) or {}
    names = [id2label[i] for i in sorted(id2label)]
    named = bool(names) and names != [f"LABEL_{i}" for i in range(len(names))]
    if labels and named and len(names) == len(labels) and names != labels:
        how = "in another order" if sorted(names) == sorted(labels) else "other labels"
        raise ConfigError(
            f"{role}: '{name_or_path}' has a head for {names} ({how} than this run's {labels}); labels are matched by "
            "position, so its head would be used for the wrong labels. Give `labels` in the model's order, use a model "
            "without a head for them, or student.from_teacher"
        )


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_tokenizer(name_or_path: str, role: str = "tokenizer", revision: str | None = None, task: str | Task | None = None) -> Any:
    """A fast tokenizer by hub id or path; with ``task``, as the task needs it (``Task.prepare_tokenizer``)."""
    from transformers import AutoTokenizer

    offline = hub_options(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, **({"revision": revision} if revision else {}), **offline)
    except (OSError, ValueError) as exc:
        if offline:
            raise _offline_error(name_or_path, role) from None
        raise ConfigError(f"{role}: cannot load tokenizer '{name_or_path}': {exc}") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"{role}: '{name_or_path}' has no fast tokenizer; polydistill needs one for word alignment")
    return get_task(task).prepare_tokenizer(tok, role) if task is not None else tok


def student_tokenizer_source(config: Any) -> tuple[str, str | None, str]:
    """(path or hub id, revision, role for errors) of the tokenizer the student starts from."""
    sc = config.student
    if sc.tokenizer:
        return sc.tokenizer, None, "student.tokenizer"
    if sc.from_teacher is not None:
        ref = sc.from_teacher.teacher
        idx = ref if isinstance(ref, int) else config.teacher_names().index(ref)
        t = config.teachers[idx]
        return t.tokenizer or t.model, None if t.tokenizer else t.revision, f"teachers[{idx}]"
    return sc.config["base"] if sc.config is not None else sc.model, None, "student.tokenizer"


def model_labels(model: nn.Module, named_only: bool = False) -> list[str] | None:
    """The model's label names in id order; with ``named_only``, None for transformers' LABEL_i defaults."""
    id2label = getattr(model.config, "id2label", None) or {}
    if not id2label:
        return None
    names = [id2label[i] for i in sorted(id2label)]
    if named_only and names == [f"LABEL_{i}" for i in range(len(names))]:
        return None
    return names


def _layer_list(model: nn.Module) -> nn.ModuleList:
    """The encoder's list of transformer blocks (the ModuleList as long as num_hidden_layers)."""
    n = model.config.num_hidden_layers
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ConfigError(f"cannot find the {n} transformer layers of {type(model).__name__} to copy from")


def _stacks(model: nn.Module) -> list[nn.ModuleList]:
    """The model's stacks of transformer blocks: the encoder's, and an encoder-decoder's decoder's."""
    if not getattr(model.config, "is_encoder_decoder", False):
        return [_layer_list(model)]
    stacks = []
    for part in (model.get_encoder(), model.get_decoder()):
        stack = next((m for _, m in part.named_modules() if isinstance(m, nn.ModuleList)), None)  # the outermost list
        if stack is None:
            raise ConfigError(f"cannot find the transformer layers of {type(part).__name__} to copy from")
        stacks.append(stack)
    return stacks


def student_from_teacher(teacher: nn.Module, layers: list[int], task: str | Task, labels: list[str] | None,
                         decoder_layers: list[int] | None = None) -> nn.Module:
    """A student with the teacher's architecture keeping only ``layers`` (DistilBERT-style init).

    Embeddings, pooler and head are copied; block ``i`` of the student is
    teacher block ``layers[i]``. For an encoder-decoder teacher ``layers`` are
    the encoder's and ``decoder_layers`` the decoder's (default: all of them).
    """
    stacks = _stacks(teacher)
    if decoder_layers is not None and len(stacks) == 1:
        raise ConfigError("student.from_teacher.decoder_layers: the teacher has no decoder (only encoder-decoder teachers do)")
    keep = [layers] if len(stacks) == 1 else [layers, decoder_layers if decoder_layers is not None else list(range(len(stacks[1])))]
    for field, stack, picked in zip(("layers", "decoder_layers"), stacks, keep):
        bad = [i for i in picked if not 0 <= i < len(stack)]
        if bad:
            raise ConfigError(f"student.from_teacher.{field}: {bad} out of range, the teacher has {len(stack)} layers "
                              f"(0..{len(stack) - 1})")
    task = get_task(task)
    config = copy.deepcopy(teacher.config)
    config.num_hidden_layers = len(layers)  # the encoder's (Bart, Marian and T5 map it to their own name)
    if len(stacks) == 2:
        key = next(k for k in ("decoder_layers", "num_decoder_layers") if k in config.to_dict())
        setattr(config, key, len(keep[1]))
    for key, value in task.label_config(labels).items():
        setattr(config, key, value)
    student = task.model_class().from_config(config)
    source = teacher.state_dict()
    target = student.state_dict()
    skip = {id(t) for stack in stacks for t in [*stack.parameters(), *stack.buffers()]}
    skip_names = {k for k, v in teacher.state_dict(keep_vars=True).items() if id(v) in skip}
    shared = {k: v for k, v in source.items() if k not in skip_names and k in target and target[k].shape == v.shape}
    target.update(shared)
    student.load_state_dict(target)
    for teacher_stack, student_stack, picked in zip(stacks, _stacks(student), keep):
        for i, j in enumerate(picked):
            wanted = student_stack[i].state_dict()
            state = {k: v for k, v in teacher_stack[j].state_dict().items() if k in wanted}
            for k in wanted.keys() - state.keys():  # T5's relative position bias lives in each stack's first block only
                donor = next((b.state_dict()[k] for b in teacher_stack if k in b.state_dict()), None)
                if donor is None:
                    raise ConfigError(f"student.from_teacher: block {i} of the student needs {k}, which no teacher block has")
                state[k] = donor
            student_stack[i].load_state_dict(state)
    return student


def student_from_config(base: str, overrides: dict[str, Any], task: str | Task, labels: list[str] | None) -> nn.Module:
    """A randomly initialised model: ``base``'s config with ``overrides``."""
    from transformers import AutoConfig

    offline = hub_options(base)
    try:
        config = AutoConfig.from_pretrained(base, **offline)
    except (OSError, ValueError) as exc:
        if offline:
            raise _offline_error(base, "student.config.base") from None
        raise ConfigError(f"student.config.base: cannot load config '{base}': {exc}") from None
    fields = set(config.to_dict())
    for key in overrides:
        if key not in fields:
            close = difflib.get_close_matches(key, sorted(fields), n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise ConfigError(f"student.config.{key}: not a field of {type(config).__name__}{hint}")
    task = get_task(task)
    for key, value in {**overrides, **task.label_config(labels)}.items():
        setattr(config, key, value)
    return task.model_class().from_config(config)


def head_on(encoder: nn.Module, task: str | Task, labels: list[str] | None) -> nn.Module:
    """A model with ``task``'s head whose encoder modules are ``encoder``'s own (one encoder, trained by every task).

    The head is new (random); a part of the encoder that ``encoder`` lacks (e.g. the pooler of a
    token-classification model) is the new model's own.
    """
    task = get_task(task)
    shared = encoder.base_model
    config = copy.deepcopy(shared.config)
    config.architectures = None
    for key, value in task.label_config(labels).items():
        setattr(config, key, value)
    try:
        model = task.model_class().from_config(config)
    except ValueError:  # transformers has no model of this architecture for the task
        raise ConfigError(f"{task.name}: the shared student is a {type(encoder).__name__}, and transformers has no "
                          f"{task.auto_class} for model_type '{config.model_type}'") from None
    base = model.base_model
    if base is model:  # a task without a head (embedding) is the encoder itself
        if type(shared) is not type(model):
            raise ConfigError(f"{task.name}: the shared student's encoder is a {type(shared).__name__}, but {task.name} "
                              f"loads a {type(model).__name__}")
        return shared
    tied = [name for name, child in base.named_children() if isinstance(getattr(shared, name, None), nn.Module)]
    if not tied:
        raise ConfigError(f"{task.name}: a {type(model).__name__} shares no module with the student's "
                          f"{type(shared).__name__}; the tasks of a multi-task run need one architecture")
    for name in tied:
        setattr(base, name, getattr(shared, name))
    # an output layer tied to the input embeddings (a language model's) was tied to the new model's own
    model.tie_weights()
    return model


def hidden_size(model: nn.Module) -> int:
    return int(model.config.hidden_size)


def forward(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    task: str | Task,
    words: torch.Tensor | None = None,
    pooling: str = "mean",
    hidden_states: bool = False,
    attentions: bool = False,
) -> ModelOutputs:
    """Run ``model`` and return :class:`ModelOutputs` for ``task`` (a name or a :class:`~polydistill.tasks.Task`)."""
    task = get_task(task)
    out = model(
        **inputs,
        output_hidden_states=hidden_states or task.needs_hidden_states,
        output_attentions=attentions,
        return_dict=True,
    )
    result = ModelOutputs(
        hidden_states=tuple(out.hidden_states) if hidden_states and getattr(out, "hidden_states", None) is not None else None,
        attentions=tuple(out.attentions) if attentions and getattr(out, "attentions", None) is not None else None,
        mask=inputs.get("attention_mask"),
    )
    task.read_outputs(out, result, words, pooling)
    return result
