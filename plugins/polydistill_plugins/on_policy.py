"""On-policy distillation (plugin ``on_policy``; GKD, Agarwal et al. 2024).

With probability ``rate`` (λ) a step's targets are sampled from the student itself
(from its current weights, in eval mode, at ``temperature``), and the loss terms
then compare teacher and student along the student's own outputs: the student
learns from the teacher where its own generations go, not only along references
(or the teacher's decodings with ``sequence_kd``). GKD pairs this with the
generalized JSD: ``kd: {divergence: jsd, jsd_beta: 0.5}``. The draw and the
sampling are seeded by the run's seed and the step's position, so a run and its
resumed continuation sample the same targets. Logs ``on_policy/sampled`` (share
of micro-batches with sampled targets) and ``on_policy/sample_s`` (seconds spent
sampling).
"""

from __future__ import annotations

import time
from typing import Any

import torch
from pydantic import Field

from polydistill import ConfigError, PluginSettings, hookimpl

NAME = "on_policy"
_SALT_DRAW, _SALT_SAMPLE = 0x0417, 0x0418


class Settings(PluginSettings):
    rate: float = Field(0.5, ge=0, le=1, description="λ: the share of micro-batches whose targets the student samples (0: none, 1: all).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature of the student's generations.")
    max_new_tokens: int = Field(128, ge=1, description="Longest sampled target, in tokens.")


class OnPolicy:
    """Replace a step's targets, with probability ``rate``, by the student's own samples."""

    polydistill_api = "1.2"
    Settings = Settings

    def __init__(self, settings: Settings):
        self.settings = settings
        self._logs: list[tuple[float, float]] = []

    @hookimpl
    def setup(self, state: Any) -> None:
        if state.task_def.generation_inputs({}) is None:
            raise ConfigError(f"plugins.{NAME}: task {state.task} has no targets a model samples from its inputs "
                              "(on-policy distillation needs a generative task such as seq2seq)")

    @hookimpl
    def augment_batch(self, batch: Any, state: Any) -> Any:
        if batch.targets is None or not len(batch):
            return None
        s = self.settings
        draw = float(torch.rand((), generator=state.rng(_SALT_DRAW)))
        if draw >= s.rate:
            self._logs.append((0.0, 0.0))
            return None
        start = time.perf_counter()
        student, tok = state.unwrapped_student(), state.student_tokenizer
        inputs = state.task_def.generation_inputs(batch.student_inputs)
        seed = int(torch.randint(0, 2**31 - 1, (), generator=state.rng(_SALT_SAMPLE)))
        devices = [state.device.index or 0] if state.device.type == "cuda" else []
        was_training = student.training
        student.eval()
        try:  # generate draws from torch's global generator: seed it here and leave it as it was
            with torch.random.fork_rng(devices=devices), torch.no_grad(), state.accelerator.autocast():
                torch.manual_seed(seed)
                out = student.generate(**inputs, do_sample=True, temperature=s.temperature, top_k=0,
                                       max_new_tokens=s.max_new_tokens)
        finally:
            student.train(was_training)
        targets = tok.batch_decode(out, skip_special_tokens=True)
        self._logs.append((1.0, time.perf_counter() - start))
        return batch.replace_texts(targets=targets)

    @hookimpl
    def on_step_end(self, state: Any, logs: dict[str, float]) -> None:
        if self._logs:
            logs[f"{NAME}/sampled"] = sum(a for a, _ in self._logs) / len(self._logs)
            logs[f"{NAME}/sample_s"] = sum(b for _, b in self._logs)
        self._logs = []
