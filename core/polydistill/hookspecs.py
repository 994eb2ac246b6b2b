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
    projections, a learnable temperature, and the like.

    The core places the modules on the run's device, adds their parameters to
    the optimizer, and saves and restores their weights with each checkpoint,
    so the plugin does not also return them from ``state_dict``. A bare module
    shares the student's learning rate, weight decay and gradient clipping; a
    module wrapped in ``polydistill.Trainable(module, learning_rate=...,
    weight_decay=..., max_grad_norm=...)`` gets its own parameter group and is
    clipped on its own (a learned temperature moves little at a transformer's
    learning rate). The LR schedule scales every group alike.

    Combining: every plugin's dict is collected, each module under the plugin's
    name (``"kd.projection"``), so names are unique. Return None for none.
    """


@hookspec
def setup(state: TrainState) -> None:
    """Prepare the plugin for a run; models and optimizer are ready.

    Called once per run, after ``trainable_modules`` and after the optimizer and
    LR scheduler are built and placed by accelerate, before the first step and
    before a resumed run's ``load_state_dict``. ``state.student``,
    ``state.teachers``, ``state.optimizer``, ``state.accelerator`` and
    ``state.config`` are set. A plugin may change the student in place (dropout
    rates, say), record initial weights, or build its own optimizer.

    Combining: every implementation runs; return values are ignored.
    """


@hookspec
def augment_batch(batch: Batch, state: TrainState) -> Batch | None:
    """Return a changed copy of ``batch``, or None to leave it as it is.

    Called at the start of every training step, before any forward pass. The
    batch carries raw texts (``batch.texts``, ``batch.teacher_texts``) and the
    encodings; ``batch.replace_texts(...)`` re-encodes changed texts for every
    model, so teacher outputs are recomputed (or read from the cache under the
    new text) for augmented inputs. Use ``state.rng()`` for randomness so that
    a resumed run makes the same choices.

    Combining: chained in the order plugins are listed in the config's
    ``plugins`` section; each implementation receives the previous one's
    result. Not called during evaluation.
    """


@hookspec
def select_teachers(batch: Batch, teachers: list[Any], state: TrainState) -> torch.Tensor | None:
    """Return how much each teacher counts for this batch, or None.

    Called in every training step after ``augment_batch``, before any
    teacher runs. ``teachers`` is the list of teacher models (``state.teacher_names`` has
    their config names, same order). Return a tensor of shape
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
    same ``batch`` object goes on to ``loss_terms``, so entries this hook (or
    ``select_teachers``) puts in ``batch.meta`` reach the loss terms.

    Combining: at most one plugin may return a value (two answers are an
    error naming both plugins). Core default when all return None: each
    teacher with non-zero weight runs (or its logits/embeddings are read from
    the teacher-output cache), and logits and embeddings are averaged with
    the weights; hidden states and attentions come from the first teacher.
    Not called when the run has no teacher.
    """


@hookspec
def loss_terms(
    batch: Batch, student_out: ModelOutputs, teacher_out: ModelOutputs | None, state: TrainState
) -> dict[str, torch.Tensor] | None:
    """Return named scalar loss terms for this step, or None.

    Called after the student's forward pass. ``teacher_out`` is None when the
    run has no teacher (plain fine-tuning). A plugin returns its terms already
    multiplied by the weights in its own settings; the core sums all terms
    into the loss and logs each one separately as ``loss/<name>``.

    Combining: every plugin's dict is collected; a name returned by two
    plugins is an error.
    """


@hookspec
def regularize(student: torch.nn.Module, state: TrainState) -> dict[str, torch.Tensor] | None:
    """Return named scalar penalties on the student's weights, or None.

    Called after ``loss_terms`` in every training step. Terms are already
    weighted by the plugin, added to the loss, and logged as ``reg/<name>``.

    Combining: every plugin's dict is collected; a name returned twice (here
    or in ``loss_terms``) is an error.
    """


@hookspec
def on_step_end(state: TrainState, logs: dict[str, float]) -> None:
    """Observe the end of an optimizer step.

    Called after the optimizer and LR scheduler stepped (``state.step`` is
    the number of finished steps). ``logs`` holds this step's loss terms and
    learning rate; a plugin may add entries (``logs["temperature"] = 2.0``),
    which are logged with them.

    Combining: every implementation runs, in no guaranteed order.
    """


@hookspec
def on_evaluate(state: TrainState, metrics: dict[str, Any]) -> dict[str, float] | None:
    """Observe evaluation results and optionally add metrics.

    Called after each evaluation with ``metrics`` as
    ``{"per_language": {lang: {name: value}}, "average": {...}}``.
    Return extra scalar metrics (``{"gen_loss": 0.3}``) or None.

    Combining: every dict is merged into ``metrics["plugins"]``; a name
    returned twice is an error.
    """


@hookspec
def state_dict(state: TrainState) -> dict[str, Any] | None:
    """Return this plugin's resumable state, or None if it has none.

    Called when a checkpoint is written. The value must be picklable by
    ``torch.save`` (tensors, numbers, strings, lists, dicts). Weights of
    modules returned by ``trainable_modules`` are saved by the core.

    Combining: called per plugin; each result is stored under the plugin's
    name and handed back only to that plugin's ``load_state_dict``.
    """


@hookspec
def load_state_dict(state: TrainState, plugin_state: dict[str, Any]) -> None:
    """Restore what ``state_dict`` returned when the checkpoint was written.

    Called on resume, after ``setup``, with this plugin's own saved state.

    Combining: called per plugin, only for plugins that saved a state.
    """


@hookspec
def on_train_end(state: TrainState, metrics: dict[str, Any]) -> None:
    """Observe the end of training.

    Called once after the last step, the last checkpoint, the saving of the
    student's weights and the final evaluation (``metrics`` is that
    evaluation's result, empty when there was none), before ``metrics.json``
    and the model card are written. Use it to write plugin reports into
    ``state.output_dir``; a failure here loses no training.

    Combining: every implementation runs, in no guaranteed order.
    """
