"""Sequence-level knowledge distillation (plugin ``sequence_kd``; Kim & Rush 2016).

The student learns to produce what the teacher produces: each training source is
decoded once by a teacher (beam search) and the teacher's translation replaces the
reference as the batch's target, for every loss term (``kd``'s ``ce`` then trains on
the teacher's output, its ``kl`` reads the teacher's distribution along it). With
``choose: closest`` the target is, of the teacher's ``n_best`` hypotheses, the one
closest to the reference by sentence chrF (Kim & Rush's interpolated variant).
Decoded targets are kept in the teacher-output cache's database (keyed by the
teacher's weights, tokenizer, the decoding settings, the source and, for
``closest``, the reference), so later epochs and later runs decode nothing.
Logs per step: ``sequence_kd/decoded`` (sources decoded in this step),
``sequence_kd/decode_s`` (seconds spent decoding) and ``sequence_kd/changed`` (share
of targets that differ from the reference).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field, model_validator

import polydistill
from polydistill import ConfigError, PluginSettings, hookimpl

NAME = "sequence_kd"


class Settings(PluginSettings):
    teacher: str | int = Field(0, description="The teacher that decodes: its name or index in `teachers`.")
    choose: Literal["beam", "closest"] = Field(
        "beam", description="beam: the teacher's best hypothesis (Seq-KD); closest: of its n_best hypotheses, the one "
        "with the highest sentence chrF against the reference (Seq-Inter).")
    num_beams: int = Field(5, ge=1, description="Beam width of the teacher's decoding (Kim & Rush used 5).")
    n_best: int = Field(5, ge=1, description="Hypotheses compared with the reference (choose: closest); at most num_beams.")
    max_new_tokens: int = Field(128, ge=1, description="Longest decoded target, in tokens.")
    cache: bool = Field(True, description="Keep decoded targets on disk (in cache.dir, or ~/.cache/polydistill/teacher-outputs).")

    @model_validator(mode="after")
    def _beams(self) -> Settings:
        if self.choose == "closest" and self.n_best > self.num_beams:
            raise ValueError(f"n_best ({self.n_best}) cannot exceed num_beams ({self.num_beams}): beam search returns at most that many")
        return self


class SequenceKD:
    """Replace each training target by the teacher's decoding of its source."""

    polydistill_api = "1.2"
    Settings = Settings

    def __init__(self, settings: Settings):
        self.settings = settings
        self.index = 0
        self.store: Any = None
        self._logs: list[tuple[int, float, float]] = []  # per micro-batch: decoded, seconds, share changed

    @hookimpl
    def setup(self, state: Any) -> None:
        s, task = self.settings, state.task_def
        if task.generation_inputs({}) is None:
            raise ConfigError(f"plugins.{NAME}: task {task.name} has no targets a teacher decodes from its inputs "
                              "(sequence-level KD needs a generative task such as seq2seq)")
        if not state.teachers:
            raise ConfigError(f"plugins.{NAME}: needs a teacher to decode the targets, and the run has none")
        names = list(state.teacher_names)
        if isinstance(s.teacher, str):
            if s.teacher not in names:
                raise ConfigError(f"plugins.{NAME}.teacher: no teacher named {s.teacher!r}; the teachers are: {', '.join(names)}")
            self.index = names.index(s.teacher)
        else:
            if not 0 <= s.teacher < len(names):
                raise ConfigError(f"plugins.{NAME}.teacher: index {s.teacher} out of range; the run has {len(names)} teacher(s)")
            self.index = s.teacher
        if not state.same_tokens[self.index]:
            raise ConfigError(f"plugins.{NAME}.teacher: '{names[self.index]}' reads other tokens than the student; its "
                              "decoding is re-encoded for the student, so it must share the student's tokenizer")
        cc = state.config.cache
        if s.cache:
            directory = Path(cc.dir).expanduser() if cc.dir else Path.home() / ".cache" / "polydistill" / "teacher-outputs"
            teacher = state.accelerator.unwrap_model(state.teachers[self.index])
            settings = {"kind": NAME, "choose": s.choose, "num_beams": s.num_beams, "n_best": s.n_best,
                        "max_new_tokens": s.max_new_tokens, "max_length": state.config.data.max_length}
            self.store = polydistill.TeacherCache(directory, polydistill.teacher_fingerprint(teacher),
                                                  {**settings, "tokenizer": polydistill.tokenizer_fingerprint(state.teacher_tokenizers[self.index])},
                                                  dtype="uint8")

    @hookimpl
    def augment_batch(self, batch: Any, state: Any) -> Any:
        if batch.targets is None or not len(batch):
            return None
        s = self.settings
        keys = [[src, ref] if s.choose == "closest" else src for src, ref in zip(batch.teacher_texts, batch.targets)]
        found = self.store.lookup(keys) if self.store is not None else [None] * len(batch)
        targets = [None if a is None else bytes(a).decode("utf-8") for a in found]
        todo = [i for i, t in enumerate(targets) if t is None]
        start = time.perf_counter()
        if todo:
            decoded = self._decode(batch, todo, state)
            for i, text in zip(todo, decoded):
                targets[i] = text
            if self.store is not None:
                self.store.put_many([keys[i] for i in todo], [np.frombuffer(t.encode("utf-8"), dtype=np.uint8) for t in decoded])
        changed = sum(t != r for t, r in zip(targets, batch.targets)) / len(batch)
        self._logs.append((len(todo), time.perf_counter() - start, changed))
        return batch.replace_texts(targets=targets)

    def _decode(self, batch: Any, rows: list[int], state: Any) -> list[str]:
        s, task = self.settings, state.task_def
        teacher, tok = state.teachers[self.index], state.teacher_tokenizers[self.index]
        pick = torch.tensor(rows, device=state.device)
        inputs = {k: v.index_select(0, pick) for k, v in task.generation_inputs(batch.teacher_inputs[self.index]).items()}
        n = s.n_best if s.choose == "closest" else 1
        with torch.no_grad(), state.accelerator.autocast():
            out = teacher.generate(**inputs, num_beams=s.num_beams, num_return_sequences=n, max_new_tokens=s.max_new_tokens,
                                   do_sample=False)
        texts = tok.batch_decode(out, skip_special_tokens=True)
        if n == 1:
            return texts
        from sacrebleu.metrics import CHRF

        chrf = CHRF()
        chosen = []
        for j, row in enumerate(rows):
            hyps = texts[j * n : (j + 1) * n]
            scores = [chrf.sentence_score(h, [batch.targets[row]]).score for h in hyps]
            chosen.append(hyps[int(np.argmax(scores))])  # ties: the higher-ranked beam
        return chosen

    @hookimpl
    def on_step_end(self, state: Any, logs: dict[str, float]) -> None:
        if self._logs:
            decoded, seconds, changed = zip(*self._logs)
            logs.update({f"{NAME}/decoded": float(sum(decoded)), f"{NAME}/decode_s": sum(seconds),
                         f"{NAME}/changed": sum(changed) / len(changed)})
        self._logs = []

    @hookimpl
    def on_train_end(self, state: Any, metrics: dict[str, Any]) -> None:
        if self.store is not None:
            self.store.close()

