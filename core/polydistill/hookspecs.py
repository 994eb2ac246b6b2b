"""The hook points of the polydistill training loop.

A plugin implements any subset of these functions, decorated with
``@polydistill.hookimpl``, using any subset of the documented argument names.
``state`` is always the run's :class:`polydistill.TrainState`.

Order of one training step (see ``docs/hooks.md``)::

    augment_batch -> select_teachers -> teacher_outputs -> (student forward)
    -> loss_terms -> regularize -> (backward, optimizer step) -> on_step_end

Run lifecycle::

    trainable_modules -> (optimizer built) -> setup -> [load_state_dict on resume]
    -> steps ... on_evaluate ... state_dict (at each checkpoint) ... -> last state_dict -> final on_evaluate -> on_train_end

No result depends on the order in which plugins were registered: hooks whose
results are combined are documented as order-free, ``augment_batch`` follows the
order of the ``plugins`` section of the config, and a hook that takes a single
answer fails when two plugins answer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import pluggy

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from polydistill.batch import Batch, ModelOutputs, Trainable
    from polydistill.state import TrainState

PROJECT = "polydistill"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: Hooks in the order a step or a run calls them; docs and tests read this list.
STEP_HOOKS = (
    "augment_batch",
    "select_teachers",
    "teacher_outputs",
    "loss_terms",
    "regularize",
    "on_step_end",
)
LIFECYCLE_HOOKS = (
    "trainable_modules",
    "setup",
    "load_state_dict",
    "on_evaluate",
    "state_dict",
    "on_train_end",
)

#: How each hook's answers combine; ``PluginHost.run`` applies the rule, so call sites
#: never choose one. Each hook's docstring says it on its "Combining:" line (a test
#: checks the line against this table, through ``COMBINING_PHRASES``).
COMBINING = {
    "trainable_modules": "per_plugin",
    "setup": "each",
    "augment_batch": "chain",
    "select_teachers": "single",
    "teacher_outputs": "single",
    "loss_terms": "merged",
    "regularize": "merged",
    "on_step_end": "each",
    "on_evaluate": "merged",
    "state_dict": "per_plugin",
    "load_state_dict": "own_state",
    "on_train_end": "each",
}
#: What the "Combining:" line of a hook with each rule says.
COMBINING_PHRASES = {
    "chain": "chained in the order plugins are listed",  # each gets the previous one's batch
    "single": "at most one plugin may return a value",  # two answers are an error naming both
    "merged": "a name returned",  # the union of the dicts; a key returned twice is an error
    "each": "every implementation runs",  # results ignored
    "per_plugin": "under the plugin's name",  # {plugin: result}
    "own_state": "only for plugins that saved a state",  # each plugin gets its own saved state back
}


@hookspec
def trainable_modules(state: TrainState) -> dict[str, torch.nn.Module | Trainable] | None:
    """Return extra modules whose parameters the student's optimizer trains.

    Called once, after the teachers and student are loaded and before the
    optimizer is built; ``state.optimizer`` is still None. Use it for learned
    projections, a learnable temperature, and the like. It is also the place
    to set ``state.need_hidden_states`` / ``state.need_attentions`` when the
    plugin needs per-layer outputs (``kd`` does).

    The core places the modules on the run's device, adds their parameters to
    the optimizer (with the student's weight-decay rules), and saves and
    restores their weights with each checkpoint, so the plugin does not also
    return them from ``state_dict``. A value that is neither a module nor a
    ``Trainable`` is an error. A bare module shares the student's learning
    rate, weight decay and gradient clipping. A module wrapped in
    ``polydistill.Trainable(module, learning_rate=..., weight_decay=...,
    max_grad_norm=...)`` (API 1.2) gets a parameter group of its own: its
    learning rate and weight decay (None: the student's), and its gradient
    norm clipped on its own at ``max_grad_norm`` (None: not clipped), never
    together with the student's. The LR schedule (warm-up, decay) scales every
    group alike. A learnable temperature needs this: at a transformer's
    learning rate (2e-5) it moves by hundredths over a whole run.

    Combining: every plugin's dict is collected, each module under the plugin's
    name (``"kd.projections"``, also its key in ``state.modules``), so names
    are unique. Return None for none.
    """


@hookspec
def setup(state: TrainState) -> None:
    """Prepare the plugin for a run; models and optimizer are ready.

    Called once per run, after ``trainable_modules`` and after the optimizer and
    LR scheduler are built and placed by accelerate, before the first step and
    before a resumed run's ``load_state_dict``. ``state.student``,
    ``state.teachers``, ``state.optimizer``, ``state.scheduler``,
    ``state.accelerator`` and ``state.config`` are set. A plugin may change
    the student in place (dropout rates, say), record initial weights, or
    build its own optimizer (``gan_data`` does, for its generator).

    Combining: every implementation runs; return values are ignored.
    """


@hookspec
def augment_batch(batch: Batch, state: TrainState) -> Batch | None:
    """Return a changed copy of ``batch``, or None to leave it as it is.

    Called at the start of every training step (each micro-batch of one, with
    gradient accumulation), before any forward pass; not called during
    evaluation. The batch carries raw texts (``batch.texts``,
    ``batch.teacher_texts``) and the encodings;
    ``batch.replace_texts(texts=..., teacher_texts=..., **meta)`` returns a
    copy re-encoded for every model, so teacher outputs are recomputed (or
    read from the cache under the new text) for augmented inputs. In ``same``
    mode, changing ``texts`` alone changes what the teachers read too. For
    changes that need no re-encoding, return ``dataclasses.replace(batch,
    ...)``. Use ``state.rng(salt)`` for randomness so that a resumed run makes
    the same choices.

    A run with ``data.train: []`` (and ``training.max_steps``) passes empty
    placeholder batches: ``len(batch) == 0``, ``batch.meta["placeholder"]`` is
    True and ``batch.meta["batch_size"]`` says how many examples to make. A
    plugin that generates data (data-free distillation, ``gan_data``) returns
    a full ``Batch`` there; a placeholder that no plugin filled is an error.

    Combining: chained in the order plugins are listed in the config's
    ``plugins`` section (default plugins it does not name come first, by
    name; plugin objects passed to ``polydistill.train(plugins=...)`` that it
    does not name come last); each implementation receives the previous one's
    result, and None passes the batch on unchanged.
    """


@hookspec
def select_teachers(batch: Batch, teachers: list[Any], state: TrainState) -> torch.Tensor | None:
    """Return how much each teacher counts for this batch, or None.

    Called in every training step after ``augment_batch``, before any
    teacher runs. ``teachers`` is the list of teacher models
    (``state.teacher_names`` has their config names, same order). Return a tensor of shape
    ``(num_teachers,)`` (one weight per teacher for the whole batch) or
    ``(batch_size, num_teachers)`` (per sample). Rows should sum to 1; the
    core does not renormalise. A weight of exactly 0 for the whole batch lets
    the core skip that teacher's forward pass.

    Combining: at most one plugin may return a value (two answers are an
    error naming both plugins). Core default when all return None: every
    teacher, equal weight. Not called when the run has no teacher.
    """


@hookspec
def teacher_outputs(
    batch: Batch, teachers: list[Any], weights: torch.Tensor, state: TrainState
) -> ModelOutputs | None:
    """Return the fused teacher outputs for ``batch``, or None.

    Called once per step, after ``select_teachers`` (``weights`` is its
    result or the core default), under ``torch.no_grad`` unless the plugin
    enables grad itself. Return a :class:`polydistill.ModelOutputs`. The
    same ``batch`` object goes on to ``loss_terms``, so loss hints this hook
    (or ``select_teachers``) adds (``batch.hints = batch.hints.add(...)``)
    reach the loss terms.

    Combining: at most one plugin may return a value (two answers are an
    error naming both plugins). Core default when all return None: each
    teacher with non-zero weight runs (or its logits/embeddings are read from
    the teacher-output cache), and logits and embeddings are averaged with
    the weights; ``extra["teachers"]`` lists the indices of those teachers.
    Hidden states and attentions come from the first teacher
    (``teachers[0]``), which runs whenever a plugin needs them, even at
    weight 0; with per-sample weights, ``layer_mask`` marks the samples it
    teaches. Not called when the run has no teacher.
    """


@hookspec
def loss_terms(
    batch: Batch, student_out: ModelOutputs, teacher_out: ModelOutputs | None, state: TrainState
) -> dict[str, torch.Tensor] | None:
    """Return named scalar loss terms for this step, or None.

    Called in every training step, after the student's forward pass.
    ``student_out`` is the student's outputs; ``teacher_out`` the fused
    teacher outputs, or None when the run has no teacher (plain fine-tuning).
    A plugin returns its terms already multiplied by the weights in its own
    settings; the core sums all terms into the loss and logs each one
    separately as ``loss/<name>``. A step in which no plugin returns a term
    is an error (enable ``kd``, the standard terms, or another loss plugin).

    Combining: every plugin's dict is collected; a name returned by two
    plugins is an error.
    """


@hookspec
def regularize(student: torch.nn.Module, state: TrainState) -> dict[str, torch.Tensor] | None:
    """Return named scalar penalties on the student's weights, or None.

    Called after ``loss_terms`` in every training step. ``student`` is the
    student unwrapped from accelerate's wrappers. Terms are already weighted
    by the plugin, added to the loss, and logged as ``reg/<name>``.

    Combining: every plugin's dict is collected; a name returned twice (here
    or in ``loss_terms``) is an error.
    """


@hookspec
def on_step_end(state: TrainState, logs: dict[str, float]) -> None:
    """Observe the end of an optimizer step.

    Called once per optimizer step, after the optimizer and LR scheduler
    stepped (``state.step`` is the number of finished steps). ``logs`` holds
    this step's ``loss/<name>`` and ``reg/<name>`` terms and ``loss`` (each
    averaged over the step's gradient-accumulation micro-batches) and
    ``lr``; a plugin may add entries (``logs["temperature"] = 2.0``), which
    are logged with them. A record (every ``training.log_every`` steps) holds
    the mean of each float since the previous record, and the sum of each
    ``int``: give a count for this step as an int (``logs["augmented"] = 8``).

    Combining: every implementation runs, in no guaranteed order.
    """


@hookspec
def on_evaluate(state: TrainState, metrics: dict[str, Any]) -> dict[str, float] | None:
    """Observe evaluation results and optionally add metrics.

    Called after each evaluation of the student on ``data.eval``: every
    ``training.eval_every`` steps (or after each epoch when it is 0), and
    once at the end unless the last step was just evaluated. Never called
    when ``data.eval`` is not configured. ``metrics`` is
    ``{"per_language": {lang: {name: value}}, "average": {...}, "num_examples": n}``.
    Return extra scalar metrics (``{"gen_loss": 0.3}``) or None.

    Combining: every dict is merged into ``metrics["plugins"]`` (logged as
    ``eval/plugins/<name>``); a name returned twice is an error.
    """


@hookspec
def state_dict(state: TrainState) -> dict[str, Any] | None:
    """Return this plugin's resumable state, or None if it has none.

    Called each time a checkpoint is written: every
    ``training.checkpoint_every`` steps (or after each epoch when it is 0),
    once at the end, and when the run is interrupted (Ctrl-C or SIGTERM).
    Return what the plugin needs to continue (step counters, running
    statistics, its own optimizer's state). The value must be picklable by
    ``torch.save`` (tensors, numbers, strings, lists, dicts). Weights of
    modules returned by ``trainable_modules`` are saved by the core.

    Combining: called per plugin; each result is stored under the plugin's
    name and handed back only to that plugin's ``load_state_dict``.
    """


@hookspec
def load_state_dict(state: TrainState, plugin_state: dict[str, Any]) -> None:
    """Restore what ``state_dict`` returned when the checkpoint was written.

    Called on resume (``polydistill train CONFIG --resume``), after
    ``setup``; ``plugin_state`` is exactly what this plugin's ``state_dict``
    returned when the checkpoint was written.

    Combining: called per plugin, only for plugins that saved a state.
    """


@hookspec
def on_train_end(state: TrainState, metrics: dict[str, Any]) -> None:
    """Observe the end of training.

    Called once after the last step, the last checkpoint, the saving of the
    student's weights (to ``OUTPUT_DIR/student``) and the final evaluation
    (``metrics`` is that evaluation's result, empty without ``data.eval``),
    before ``metrics.json`` and the model card are written; not called when
    a run is interrupted. Use it to write plugin reports into
    ``state.output_dir``; a failure here loses no training, the student and
    the checkpoint are on disk already.

    Combining: every implementation runs, in no guaranteed order.
    """
