"""Teacher outputs: running a teacher on a batch through the teacher-output cache, and the default fusion.

Plugins reach this through ``TrainState.run_teacher`` and
``TrainState.fuse_teacher_outputs`` (API 1.2); the loop's own teacher step
(``select_teachers`` -> ``teacher_outputs`` -> the default) is :meth:`TeacherRunner.outputs`.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from polydistill import models as M
from polydistill.batch import Batch, ModelOutputs
from polydistill.cache import TeacherCache, open_cache
from polydistill.errors import PluginError, warn
from polydistill.tasks import get_task

if TYPE_CHECKING:
    from polydistill.state import TrainState


class TeacherRunner:
    """The run's teachers, each with its cache (None: off), for one :class:`~polydistill.TrainState`."""

    def __init__(self, state: TrainState, caches: list[TeacherCache | None], top_k: int | None = None, sample: bool = False):
        self.state = state
        self.caches = caches
        self.task = get_task(state.config.task)
        self.top_k = top_k  # vocabulary-sized outputs are cached as top_k tokens with their log-probabilities
        self.sample = sample  # those tokens drawn from the distribution (else the most likely)
        self.widths = [_output_width(t) if top_k else None for t in state.teachers]

    @classmethod
    def for_state(cls, state: TrainState, fingerprints: list[str] | None = None) -> TeacherRunner:
        """A runner with the caches ``state.config.cache`` asks for (``fingerprints``: the teachers', if already known)."""
        cc, config = state.config.cache, state.config
        task = get_task(config.task)
        top_k = cc.top_k if task.cache_needs_top_k else None
        if cc.enabled and task.cache_needs_top_k and top_k is None:
            state.accelerator.print(f"cache.enabled: teacher outputs of {task.name} are a vocabulary-sized distribution per "
                                    "token; set cache.top_k to cache the top_k of each, else the teachers run every step")
        if not cc.enabled or (task.cache_needs_top_k and top_k is None):
            return cls(state, [None] * len(state.teachers))
        fps = fingerprints or [None] * len(state.teachers)
        return cls(state, [open_cache(config, state.accelerator.unwrap_model(t), tok, name, fp)
                           for t, tok, name, fp in zip(state.teachers, state.teacher_tokenizers, state.teacher_names, fps)],
                   top_k, bool(top_k) and cc.top_k_method == "sample")

    def summary(self) -> str | None:
        """One line on how many teacher outputs the caches gave and how many were computed; None without a cache."""
        caches = [c for c in self.caches if c is not None]
        if not caches:
            return None
        hits, misses = sum(c.hits for c in caches), sum(c.misses for c in caches)
        where = "the teacher-output store" if self.state.config.cache.backend == "datasets" else "the teacher-output cache"
        return (f"teacher outputs: {hits} of {hits + misses} read from {where}, {misses} computed"
                + (" (texts it does not hold: augmented or new)" if misses and self.state.config.cache.backend == "datasets" else ""))

    def outputs(self, batch: Batch) -> ModelOutputs | None:
        """select_teachers -> teacher_outputs, with the core defaults when no plugin answers."""
        state, host = self.state, self.state.plugins
        if not state.teachers:
            return None
        weights = host.run("select_teachers", batch=batch, teachers=state.teachers, state=state)
        if weights is None:
            weights = torch.full((len(state.teachers),), 1.0 / len(state.teachers), device=state.device)
        with torch.no_grad():
            fused = host.run("teacher_outputs", batch=batch, teachers=state.teachers, weights=weights, state=state)
            return fused if fused is not None else self.default_outputs(batch, weights)

    def default_outputs(self, batch: Batch, weights: torch.Tensor) -> ModelOutputs:
        """The fused final outputs of the teachers with non-zero weight; per-layer outputs of teacher 0."""
        state = self.state
        active = [i for i in range(len(state.teachers)) if bool((weights[..., i] != 0).any())]
        if not active:
            raise PluginError("select_teachers gave every teacher weight 0 for a batch", hook="select_teachers")
        per_layer = state.need_hidden_states or state.need_attentions
        outs = {i: self.run(i, batch, per_layer=per_layer and i == 0) for i in active}
        first = outs[0] if 0 in outs else (self.run(0, batch, per_layer=True) if per_layer else None)
        fused = self.fuse(outs, weights, batch)
        fused.mask = first.mask if first is not None else None
        if first is not None:
            fused.hidden_states, fused.attentions = first.hidden_states, first.attentions
            w0 = weights[..., 0]
            if w0.dim():  # per-layer outputs are teacher 0's: samples routed away from it must not learn them
                fused.layer_mask = (w0 != 0).reshape(len(batch), -1).any(-1)
        return fused

    def fuse(self, outs: dict[int, ModelOutputs], weights: torch.Tensor, batch: Batch) -> ModelOutputs:
        """The task's default fusion of the final outputs in ``outs`` (teacher index -> outputs).

        ``weights``: ``(n,)``, ``(B, n)`` or, for word-level tasks, ``(B, W, n)``;
        a weighted sum per sample (per word: over the teachers that have the
        word, renormalised). A sample with no weight is out of ``sample_mask``.
        Per-layer outputs are not fused. ``extra["teachers"]`` lists ``outs``' teachers.
        """
        if not outs:
            raise ValueError("fuse_teacher_outputs: no teacher outputs to fuse")
        fused = self.task.fuse(outs, weights, len(batch))
        fused.extra["teachers"] = list(outs)
        return fused

    def run(self, i: int, batch: Batch, per_layer: bool | None = None) -> ModelOutputs:
        """Teacher ``i``'s outputs for ``batch``; with the cache on, only texts it lacks are run.

        ``per_layer``: also its hidden states / attentions as plugins asked for
        them (default: when they did); those are never cached.
        """
        state, cache = self.state, self.caches[i]
        if per_layer is None:
            per_layer = state.need_hidden_states or state.need_attentions
        # Entries are keyed by text: inputs a plugin built without token ids (generated
        # embeddings) have no text that identifies them, so they bypass the cache.
        if cache is None or "input_ids" not in batch.teacher_inputs[i] or per_layer:
            return self._forward(i, batch.teacher_inputs[i], batch.teacher_words[i], per_layer)
        entries = self.entries(batch)
        found = cache.lookup(entries)
        words = batch.teacher_words[i]
        if words is not None:  # an entry must hold one row per word the teacher reads
            counts = (words >= 0).sum(1).tolist()
            for j, a in enumerate(found):
                if a is not None and len(a) != counts[j]:
                    warn(f"teacher cache {cache.path}: an entry holds {len(a)} words where the teacher reads {counts[j]}; recomputed")
                    found[j] = None
        keys = [json.dumps(e, ensure_ascii=False) for e in entries]  # hashable: word lists, text-target pairs
        # A text repeated in the batch (both sides of a parallel pair read the same
        # source) is run once.
        todo = list(dict.fromkeys(k for k, a in zip(keys, found) if a is None))
        if todo:
            first: dict[Any, int] = {}
            for j, k in enumerate(keys):
                first.setdefault(k, j)
            rows = [first[k] for k in todo]
            new = self.compute(i, batch, rows)
            cache.put_many([entries[j] for j in rows], new)
            computed = dict(zip(todo, new))
            found = [a if a is not None else computed[k] for k, a in zip(keys, found)]
        return self.task.from_cache(found, words, state.device, self.widths[i], self.top_k)

    @staticmethod
    def entries(batch: Batch) -> list[Any]:
        """What the cache keys each sample of ``batch`` by: the teacher's text, or with a target the text-target pair
        (a generative task's outputs depend on the target too: the teacher reads it, teacher-forced)."""
        return entries_of(batch.teacher_texts, batch.targets)

    def compute(self, i: int, batch: Batch, rows: list[int]) -> list[np.ndarray]:
        """Teacher ``i``'s cache rows for samples ``rows`` of ``batch``, run as a sub-batch of its own padding."""
        state = self.state
        index = torch.tensor(rows, device=state.device)
        inputs = {k: v.index_select(0, index) for k, v in batch.teacher_inputs[i].items()}
        words = batch.teacher_words[i]
        sub_words = None if words is None else words.index_select(0, index)
        if "attention_mask" in inputs:
            inputs, sub_words = self.task.trim_padding(inputs, sub_words)
        return self.task.cache_rows(self._forward(i, inputs, sub_words, False), self.top_k, sample=self.sample)

    def _forward(self, i: int, inputs: dict[str, torch.Tensor], words: torch.Tensor | None, per_layer: bool) -> ModelOutputs:
        state, config = self.state, self.state.config
        with state.accelerator.autocast():
            return M.forward(
                state.teachers[i], inputs, self.task, words, config.pooling,
                per_layer and state.need_hidden_states, per_layer and state.need_attentions,
            )


def entries_of(teacher_texts: list[Any], targets: list[Any] | None) -> list[Any]:
    """The cache entries of samples that the teachers read as ``teacher_texts`` (with ``targets``, generative tasks)."""
    return list(teacher_texts) if targets is None else [[t, g] for t, g in zip(teacher_texts, targets)]


def _output_width(model: Any) -> int:
    """How many classes (vocabulary entries) a teacher's logits have."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and getattr(head, "weight", None) is not None:
        return int(head.weight.shape[0])
    return int(model.config.vocab_size)
