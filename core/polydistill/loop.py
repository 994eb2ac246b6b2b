"""The training loop: one step and the run around it, saving included.

Reading order: ``Trainer.__init__`` (the run's parts, built by ``polydistill.build``;
the state plugins see is ``polydistill.state.TrainState``), ``Trainer.fit`` (epochs,
logging, evaluation, checkpoints, the saved student) and ``Trainer.step`` (the hook
points of one step; teachers run through ``polydistill.teachers``, tasks differ in
``polydistill.tasks``). The loop has no device code: accelerate places models and batches.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import send_to_device, set_seed
from torch import nn

from polydistill import checkpoint as ckpt
from polydistill import build
from polydistill import preflight
from polydistill.cache import fingerprint
from polydistill.batch import Batch
from polydistill.config import RESUMABLE_FIELDS, Config, changed_fields, flat_fields, load_config, without_fields
from polydistill.errors import CheckpointError, ConfigError, DataError, PluginError, warn
from polydistill.evaluation import evaluate_model
from polydistill.plugins import PluginHost
from polydistill.state import TrainState
from polydistill.tasks import get_task
from polydistill.teachers import TeacherRunner


class Trainer:
    """Builds a run from a config and trains it."""

    def __init__(self, config: Config | dict | str, plugins: Iterable[tuple[str, Any]] = (), output_dir: str | None = None):
        self.config = config = load_config(config)
        if not isinstance(config, Config):
            raise ConfigError("config: a config with `tasks` is a multi-task run: train it with polydistill.train "
                              "(or polydistill.multitask.trainer.MultiTaskTrainer)")
        preflight.check(config, plugins, output_dir=output_dir)  # every input problem at once, before any model loads
        tc = config.training
        self.output_dir = Path(output_dir or config.output_dir)
        self.accelerator = self._start(config, self.output_dir)
        self.host = PluginHost.from_config(config.plugins, plugins)

        teachers, teacher_toks, student, student_tok, labels = build.models(config)

        acc = self.accelerator
        data = build.pipeline(config, student, student_tok, teacher_toks, labels, acc.num_processes, acc.process_index)
        self.train_data, self.eval_data, self.vocabulary = data.train, data.eval, data.vocabulary
        self.collator, self.loader, student_tok = data.collator, data.loader, data.student_tokenizer

        same = [tok is None and config.mode == "same" for tok in self.collator.teacher_tokenizers]
        self.state = state = TrainState(
            config=config, accelerator=acc, student=student, teachers=teachers, teacher_names=config.teacher_names(),
            student_tokenizer=student_tok, teacher_tokenizers=teacher_toks, labels=labels, plugins=self.host,
            output_dir=self.output_dir, same_tokens=same,
        )
        state.total_steps = build.total_steps(config.training, self.loader)
        warmup = tc.warmup_steps or int(tc.warmup_ratio * state.total_steps)
        if warmup >= state.total_steps:
            warn(f"training.warmup_steps: the warm-up ({warmup} steps) is as long as the run ({state.total_steps} steps), "
                 "so it never trains at training.learning_rate")

        # Plugin modules join the student's optimizer; then everything is placed.
        state.modules, own = build.plugin_modules(self.host, state)
        # after the plugins declared themselves: a cross-tokenizer term lets per-token tasks learn from other tokens
        get_task(config.task).check_teachers(config.teacher_names(), [s or state.cross_tokenizer is not None for s in same])
        # Plugin modules are called outside the student's forward, so DDP must not wrap
        # them: they are placed, their gradients averaged in step(), their weights
        # checkpointed by the core. Teachers are placed, not prepared, so checkpoints
        # do not carry frozen copies of them.
        self.plugin_modules = nn.ModuleDict({k.replace(".", "__"): m for k, m in state.modules.items()}).to(acc.device)
        state.optimizer = build.optimizer(tc, student, self.plugin_modules, own)
        state.student, state.optimizer = acc.prepare(student, state.optimizer)
        # a sharded teacher is fingerprinted whole, first: every process (and a built store) keys entries alike
        fingerprints = [fingerprint(t) for t in teachers] if config.cache.enabled and tc.shard_teachers else None
        state.teachers = build.place_teachers(acc, teachers, tc)
        state.scheduler = build.scheduler(tc, state.optimizer, state.total_steps)
        state.teacher_runner = self.runner = TeacherRunner.for_state(state, fingerprints)
        self._evaluated_at = self._checkpointed_at = -1
        self._group_skipped = False  # a micro-batch of this accumulation group had a non-finite loss
        self.host.run("setup", state=state)
        if state.need_attentions:  # models load with SDPA where they can (faster), which returns no attention maps
            for model in [state.unwrapped_student(), *state.teachers]:
                if model.config._attn_implementation != "eager":
                    model.set_attn_implementation("eager")

    @staticmethod
    def _start(config: Any, output_dir: Path) -> Accelerator:
        """Threads and seed as the config says, and the run's accelerator."""
        tc = config.training
        if tc.num_threads:
            torch.set_num_threads(tc.num_threads)
        set_seed(tc.seed)
        build.fresh_accelerate_state()
        # Gradient accumulation is done by the loop, so that an epoch's last, smaller
        # group still ends in an optimizer step and resumes stay step-aligned.
        return Accelerator(
            mixed_precision=tc.mixed_precision,
            log_with=config.trackers or None,
            project_dir=str(output_dir),
            **build.engine_plugins(tc, config.resolve_path),
        )

    # ------------------------------------------------------------------ one step

    def step(self, batch: Batch, group_size: int = 1, sync: bool = True) -> dict[str, float]:
        """One micro-step through every hook point; the optimizer steps when ``sync``.

        ``group_size`` is the number of micro-batches whose gradients add up to
        one optimizer step (gradient accumulation); each loss is divided by it.
        """
        state, host, acc = self.state, self.host, self.accelerator
        batch = host.run("augment_batch", batch=batch, state=state)
        if not batch.student_inputs:
            raise PluginError("data.train is empty and no plugin generated this batch in augment_batch (e.g. gan_data)", hook="augment_batch")
        teacher_out = self.runner.outputs(batch)
        student_out = state.forward_student(batch)
        terms = host.run("loss_terms", batch=batch, student_out=student_out, teacher_out=teacher_out, state=state)
        if not terms:
            raise PluginError("no plugin returned a loss term: enable 'kd' (the standard terms) or another loss plugin, "
                              "and give at least one of its terms a weight above 0 (a term of weight 0 is not computed)")
        regs = host.run("regularize", taken=terms, student=state.unwrapped_student(), state=state)
        loss = self._total_loss(terms, regs)
        self._check_finite(loss, terms, regs)
        with contextlib.nullcontext() if sync else acc.no_sync(state.student):
            acc.backward(loss / group_size)
        if sync:
            self._update()
        logs = {f"loss/{k}": float(v.detach()) for k, v in terms.items()}
        logs.update({f"reg/{k}": float(v.detach()) for k, v in regs.items()})
        logs["loss"] = float(loss.detach())
        return logs

    def _total_loss(self, terms: dict[str, torch.Tensor], regs: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss one micro-step backpropagates: its loss terms plus its regularization terms."""
        return sum(terms.values()) + sum(regs.values())

    def _check_finite(self, loss: torch.Tensor, terms: dict[str, torch.Tensor], regs: dict[str, torch.Tensor]) -> None:
        """Raise :class:`NonFiniteLoss` naming each non-finite term and its plugin; every process agrees."""
        state, acc = self.state, self.accelerator
        bad = not bool(torch.isfinite(loss).all())
        if acc.num_processes > 1:  # all processes must skip (or stop) together, or DDP's backward hangs
            bad = bool(acc.reduce(torch.tensor([float(bad)], device=state.device), reduction="sum").item())
        if not bad:
            return
        where = f"step {state.step + 1} (epoch {state.epoch}, batch {state.batch_in_epoch})"
        named = [(k, v) for k, v in {**terms, **regs}.items()]
        culprits = [k for k, v in named if not bool(torch.isfinite(v).all())]
        if not culprits and bool(torch.isfinite(loss).all()):
            raise NonFiniteLoss(f"non-finite loss on another process at {where}", None)
        parts = [f"'{k}' = {_scalar(v)} from plugin '{self.host.owner(k) or '?'}'" for k, v in named if k in culprits]
        others = ", ".join(f"{k}: {_scalar(v)}" for k, v in named if k not in culprits)
        msg = f"non-finite loss at {where}: {'; '.join(parts) or f'the sum is {_scalar(loss)}'}"
        raise NonFiniteLoss(msg + (f" (other terms: {others})" if others else ""), self.host.owner(culprits[0]) if culprits else None)

    def _update(self) -> None:
        """The optimizer step closing an accumulation group, or none when the group had a skipped micro-batch."""
        state, acc = self.state, self.accelerator
        if self._group_skipped:
            self._group_skipped = False
            state.optimizer.zero_grad(set_to_none=True)
            return
        if acc.num_processes > 1:  # plugin modules are not inside DDP's forward
            for p in self.plugin_modules.parameters():
                if p.grad is not None:
                    p.grad = acc.reduce(p.grad, reduction="mean")
        groups = state.optimizer.param_groups
        if self.config.training.max_grad_norm:  # accelerate unscales fp16 gradients here, once per step
            params = [p for g in groups if "max_grad_norm" not in g for p in g["params"]]
            acc.clip_grad_norm_(params, self.config.training.max_grad_norm)
        own = {g["module"]: g["max_grad_norm"] for g in groups if g.get("max_grad_norm")}
        if own and not self.config.training.max_grad_norm:
            acc.unscale_gradients()
        for key, norm in own.items():  # plugin modules are not DDP-wrapped: plain torch clipping
            torch.nn.utils.clip_grad_norm_(list(self.plugin_modules[key].parameters()), norm)
        state.optimizer.step()
        if not acc.optimizer_step_was_skipped:
            state.scheduler.step()
        state.optimizer.zero_grad(set_to_none=True)

    # ------------------------------------------------------------------ the run

    def fit(self, resume: str | Path | None = None, overwrite: bool = False) -> dict[str, Any]:
        """Train to the end (or until interrupted, after a checkpoint), save the student, evaluate it.

        Returns the final metrics. The student and a last checkpoint are saved
        before the final evaluation and ``on_train_end``, so a failure there
        loses no training. ``overwrite`` deletes a previous run in the output
        directory (without it, and without ``resume``, such a run is an error).
        """
        state, acc, tc = self.state, self.accelerator, self.config.training
        if resume is not None:
            source = Path(resume)
            source = source.parent.parent if ckpt.is_checkpoint(source) else source
            if source.resolve() != self.output_dir.resolve():  # a run forked from another run's checkpoint
                self._claim_output_dir(overwrite)
            self.resume(resume)
        else:
            self._claim_output_dir(overwrite)
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            ckpt.dump_json(self.output_dir / "config.json", self.config.resolved_dict())
            ckpt.dump_json(self.output_dir / "plugins.json", self.plugin_versions())
            if resume is not None:  # rows logged after the checkpoint are logged again as the steps rerun
                ckpt.write_atomic(self.output_dir / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in state.history))
            if self.vocabulary is not None:
                self.vocabulary.save(self.output_dir / "vocabulary")
        if self.vocabulary is not None:
            acc.print(self.vocabulary.summary() + "\n" + self.vocabulary.markdown())
        if self.config.trackers:
            # trackers take scalars: other values (lists, empty mappings) as JSON text
            acc.init_trackers(self.config.project_name, config={
                k: v if isinstance(v, (int, float, str, bool)) or v is None else json.dumps(v)
                for k, v in flat_fields(self.config.to_dict()).items()})
        stop = _StopFlag()
        self._pending: list[dict[str, float]] = []
        self._metrics: dict[str, Any] = {}
        self._bar = _progress(tc.progress and acc.is_local_main_process, state.total_steps, state.step)
        self._start = time.perf_counter()
        try:
            with stop:
                self._train(stop)
        finally:
            self._bar.close()
        state = self.state
        # Training is done: keep it before anything that may still fail.
        if self._checkpointed_at != state.step:
            self.save_checkpoint()
        student_dir = self.save_student()
        for line in self._cache_summaries():
            acc.print(line)
        try:
            metrics = self._metrics
            if self._evaluated_at != state.step:
                metrics = self.evaluate()
            self._train_end(metrics)
            self.save_results(metrics)
            if self.config.trackers:
                acc.end_training()
        except Exception as exc:
            exc.add_note(f"training had finished: the student is saved in {student_dir} and its last checkpoint in "
                         f"{self.output_dir / 'checkpoints'}; only what comes after training failed")
            raise
        return metrics

    def _train(self, stop: _StopFlag) -> None:
        """Epochs until the last step; on a stop request, checkpoint and raise :class:`Interrupted`."""
        state, tc = self.state, self.config.training
        epochs = tc.epochs if not tc.max_steps else sys.maxsize
        while state.step < state.total_steps and state.epoch < epochs:
            self._run_epoch(stop)
            if stop.requested:
                self._interrupted()

    def _interrupted(self) -> None:
        if self._checkpointed_at != self.state.step:
            self.save_checkpoint()
        raise Interrupted(ckpt.latest(self.output_dir / "checkpoints"))

    def save_student(self) -> Path:
        from polydistill import api

        return api.save_student(self)

    def save_results(self, metrics: dict[str, Any]) -> None:
        from polydistill import api

        api.save_results(self, metrics)

    def _cache_summaries(self) -> list[str]:
        line = self.runner.summary()
        return [] if line is None else [line]

    def _train_end(self, metrics: dict[str, Any]) -> None:
        self.host.run("on_train_end", state=self.state, metrics=metrics)

    def plugin_versions(self) -> dict[str, str | None]:
        """The enabled plugins and their package versions (plugins.json)."""
        return self.host.versions()

    #: What a run leaves in its output directory; `overwrite` deletes these.
    RUN_FILES = ("checkpoints", "student", "vocabulary", "config.json", "plugins.json", "metrics.json", "metrics.jsonl",
                 "results.md", "results.png")

    def _claim_output_dir(self, overwrite: bool) -> None:
        """Refuse to mix a new run into a directory that holds one, or delete that run (``overwrite``)."""
        import shutil

        out = self.output_dir
        found = [name for name in self.RUN_FILES if (out / name).exists()]
        if found and not overwrite:
            raise ConfigError(
                f"output_dir: {out} holds a run already ({', '.join(found)}); continue it with --resume "
                "(resume= in Python), start afresh with --overwrite (overwrite=True; deletes that run), or choose another --output-dir"
            )
        self.accelerator.wait_for_everyone()
        if found and self.accelerator.is_main_process:
            for name in found:
                path = out / name
                shutil.rmtree(path) if path.is_dir() else path.unlink()
        self.accelerator.wait_for_everyone()

    def _run_epoch(self, stop: _StopFlag) -> None:
        """Steps of the current epoch from where it stands; returns at its end, at the last step, or on a stop.

        A failure mid-epoch first checkpoints the last completed step (:meth:`_keep_last_good_state`).
        """
        state, tc = self.state, self.config.training
        accum = tc.gradient_accumulation_steps
        micro: list[dict[str, float]] = []
        # A whole accumulation group is read before its first step, so the last, smaller
        # group of an epoch divides by its own size, streamed data included.
        batches = self.loader.iterate(state.epoch, skip=state.batch_in_epoch)
        start = state.batch_in_epoch
        try:
            for group in _groups(batches, accum - state.batch_in_epoch % accum, accum):
                if self._run_group(group, micro, stop):
                    return
        except Exception as exc:
            self._keep_last_good_state(exc)
            raise
        if state.batch_in_epoch == start == 0:  # an epoch with no batch would repeat forever
            raise DataError("data.train: an epoch gave no batches (the streamed sources yield no rows: check their "
                            "filter, limit and files)")
        state.epoch += 1
        state.batch_in_epoch = 0
        if not tc.eval_every:
            self._metrics = self.evaluate()
        if not tc.checkpoint_every:
            self.save_checkpoint()

    def _run_group(self, group: list[Batch], micro: list[dict[str, float]], stop: _StopFlag) -> bool:
        """One accumulation group and its optimizer step, logs, evaluation and checkpoint; True when the run is to stop."""
        state, tc = self.state, self.config.training
        accum = tc.gradient_accumulation_steps
        group_start = state.batch_in_epoch - state.batch_in_epoch % accum
        group_size = state.batch_in_epoch - group_start + len(group)
        lr = state.scheduler.get_last_lr()[0]  # the rate this step trains at (the scheduler moves on after it)
        for j, batch in enumerate(group):
            sync = j == len(group) - 1
            try:
                micro.append(self.step(send_to_device(batch, state.device), group_size, sync))
            except NonFiniteLoss as exc:
                self._skip_or_stop(exc, group_start)
                if sync:
                    self._update()
            state.batch_in_epoch += 1
        state.step += 1
        keys = dict.fromkeys(k for m in micro for k in m)
        logs = {k: float(np.mean([m[k] for m in micro if k in m])) for k in keys}
        micro.clear()
        logs["lr"] = lr
        self.host.run("on_step_end", state=state, logs=logs)
        self._log(logs)
        if tc.eval_every and state.step % tc.eval_every == 0:
            self._metrics = self.evaluate()
        if tc.checkpoint_every and state.step % tc.checkpoint_every == 0:
            self.save_checkpoint()
        return state.step >= state.total_steps or stop.requested

    def _keep_last_good_state(self, exc: Exception) -> None:
        """Before a failure mid-epoch (a bad row, a plugin error) leaves the loop: checkpoint the last completed step."""
        state, acc = self.state, self.accelerator
        accum = self.config.training.gradient_accumulation_steps
        # with several processes a checkpoint needs all of them, and the others are not here
        if acc.num_processes > 1 or state.step == 0 or self._checkpointed_at == state.step:
            return
        state.batch_in_epoch -= state.batch_in_epoch % accum  # the group that failed is rerun on resume
        self._group_skipped = False
        state.optimizer.zero_grad(set_to_none=True)
        path = self.save_checkpoint()
        exc.add_note(f"checkpoint {path} holds the last good state (step {state.step}); fix the cause and continue "
                     "with --resume")

    def _skip_or_stop(self, exc: NonFiniteLoss, group_start: int) -> None:
        """training.nonfinite: skip this micro-batch (its group makes no optimizer step), or checkpoint and stop."""
        state, tc = self.state, self.config.training
        if tc.nonfinite == "skip" and state.skipped_batches < tc.max_skipped_batches:
            state.skipped_batches += 1
            self._group_skipped = True
            warn(f"{exc}; batch skipped, no optimizer step ({state.skipped_batches} of at most {tc.max_skipped_batches})")
            return
        # The last good state is the one before this accumulation group.
        state.batch_in_epoch = group_start
        self._group_skipped = False
        state.optimizer.zero_grad(set_to_none=True)
        if self._checkpointed_at != state.step:
            saved = f"checkpoint {self.save_checkpoint()}"
        else:
            saved = f"the checkpoint of step {state.step}"
        why = (f"more than training.max_skipped_batches={tc.max_skipped_batches} batches had a non-finite loss"
               if tc.nonfinite == "skip" else "set training.nonfinite: skip to skip such batches")
        raise PluginError(f"{exc}. Training stopped ({why}); {saved} holds the last good state, "
                          "resume from it with --resume once the cause is fixed", plugin=exc.plugin, hook="loss_terms") from None

    def evaluate(self) -> dict[str, Any]:
        """Evaluate the student on data.eval; the result is logged and handed to plugins."""
        state = self.state
        self._evaluated_at = state.step
        if self.eval_data is None:
            return {}
        metrics = self._evaluate_task()
        self._record({"step": state.step, "epoch": state.epoch, **eval_fields(metrics)})
        self.accelerator.print(f"eval step {state.step}: {eval_line(metrics, self.state.task_def.primary_metric)}")
        return metrics

    def _evaluate_task(self) -> dict[str, Any]:
        """The student's metrics on the task's eval data, with what plugins add in ``on_evaluate``."""
        state, config = self.state, self.state.config
        dc = config.data
        compare = state.task_def.compares_with_teacher and state.teachers and state.same_tokens[0]
        metrics = evaluate_model(
            state.unwrapped_student(), state.student_tokenizer, self.eval_data, config.task, state.labels,
            dc.max_length, dc.eval_batch_size or 2 * dc.batch_size, config.pooling, state.device,
            config.generation.model_dump(), config.training.progress and self.accelerator.is_local_main_process,
            reference=state.teachers[0] if compare else None, doc_stride=dc.doc_stride,
        )
        extra = self.host.run("on_evaluate", state=state, metrics=metrics)
        if extra:
            metrics["plugins"] = extra
        return metrics

    def save_checkpoint(self) -> Path:
        self._checkpointed_at = self.state.step
        return ckpt.save(self.accelerator, self.output_dir / "checkpoints", self.state.step, self._checkpoint_extra(),
                         self.config.training.keep_checkpoints)

    def _checkpoint_extra(self) -> dict[str, Any]:
        """What a checkpoint holds besides the accelerator's state (models, optimizer, RNG)."""
        state = self.state
        return {
            "step": state.step,
            "epoch": state.epoch,
            "batch_in_epoch": state.batch_in_epoch,
            "skipped_batches": state.skipped_batches,
            "scheduler": state.scheduler.state_dict(),
            "plugins": self.host.run("state_dict", state=state),
            "plugin_modules": self.plugin_modules.state_dict(),
            "history": state.history,
            # what the run computes, checked on resume (where it writes may change, so is not kept)
            "config": without_fields(self.config.resolved_dict(), RESUMABLE_FIELDS),
            # datasets' fingerprint of the loaded training data (its files' content and dates; None when streamed)
            "data_fingerprint": getattr(self.train_data, "_fingerprint", None),
        }

    def resume(self, path: str | Path) -> None:
        """Restore models, optimizer, scheduler, RNG, progress and plugin states.

        From a run directory, a torn or corrupt checkpoint is skipped with a warning
        in favour of the one before it; a checkpoint named directly must be intact.
        """
        tried = ckpt.candidates(Path(path))
        if not tried:
            raise ConfigError(f"--resume: no checkpoint found in {path} (looked for checkpoints/latest)")
        explicit = ckpt.is_checkpoint(Path(path))
        for candidate in tried:
            problem = ckpt.verify(candidate)
            if problem is None:
                try:
                    self._load_checkpoint(candidate)
                    return
                except ConfigError:  # the checkpoint is fine; the config does not match it
                    raise
                except Exception as exc:  # a checkpoint without a manifest can still be torn
                    problem = f"cannot be loaded: {type(exc).__name__}: {exc}"
            if explicit:
                raise CheckpointError(f"--resume: checkpoint {candidate} {problem}")
            warn(f"skipping checkpoint {candidate}: {problem}")
        raise CheckpointError(f"--resume: every checkpoint in {path} is torn or corrupt ({', '.join(c.name for c in tried)}); "
                              "start the run afresh without --resume")

    def _check_resumed_config(self, found: Path, saved: dict[str, Any] | None) -> None:
        """Refuse a resume whose config changes what the checkpoint's run computes, naming each field."""
        if saved is None:  # a checkpoint from before configs were stored in it: the run's config.json
            path = found.parent.parent / "config.json"
            if not path.is_file():
                return
            saved = json.loads(path.read_text(encoding="utf-8"))
        diff = changed_fields(saved, self.config.resolved_dict(), RESUMABLE_FIELDS)
        # Continuing a run past its end (more steps or epochs) is what --resume is also for.
        diff = [(k, a, b) for k, a, b in diff
                if not (k in EXTENDABLE_FIELDS and isinstance(a, int) and isinstance(b, int) and b >= a)]
        if diff:
            shown = "; ".join(f"{k}: {'(not set)' if a is None else repr(a)} -> {'(not set)' if b is None else repr(b)}" for k, a, b in diff)
            raise ConfigError(
                f"--resume: the config differs from the one checkpoint {found} was trained with ({shown}). A resumed run "
                f"must compute what it started computing; only {', '.join(RESUMABLE_FIELDS)} may change, and "
                f"{' and '.join(EXTENDABLE_FIELDS)} may grow. Put the fields back, or start a new run (another --output-dir, or --overwrite)"
            )

    def _load_checkpoint(self, found: Path) -> None:
        extra = ckpt.load_extra(found)
        self._check_resumed_config(found, extra.get("config"))
        self.accelerator.load_state(str(found))
        self._restore(extra, found)
        self._checkpointed_at = self.state.step
        self.accelerator.print(f"resumed from {found} at step {self.state.step}")

    def _check_data(self, then: str | None, found: Path, where: str = "the training data") -> None:
        now = getattr(self.train_data, "_fingerprint", None)
        if then is not None and now is not None and then != now:
            warn(f"--resume: {where} changed since checkpoint {found} was written (its files were modified); "
                 "the run continues on the data as it is now, which is not an exact continuation")

    def _restore(self, extra: dict[str, Any], found: Path) -> None:
        """Progress, schedule, plugin modules and states from a checkpoint's ``extra``."""
        state = self.state
        self._check_data(extra.get("data_fingerprint"), found)
        state.step, state.epoch, state.batch_in_epoch = extra["step"], extra["epoch"], extra["batch_in_epoch"]
        state.skipped_batches = extra.get("skipped_batches", 0)
        state.scheduler.load_state_dict(extra["scheduler"])
        self.plugin_modules.load_state_dict(extra["plugin_modules"])
        state.history = list(extra.get("history", []))
        self.host.run("load_state_dict", state=state, saved=extra.get("plugins", {}))

    def _log(self, logs: dict[str, float]) -> None:
        """Advance the bar; every ``log_every`` steps record the mean of each value since the last record."""
        state, tc = self.state, self.config.training
        self._bar.update(1)
        self._pending.append(logs)
        if state.step % tc.log_every and state.step != state.total_steps:
            return
        keys = dict.fromkeys(k for row in self._pending for k in row)
        mean: dict[str, Any] = {}
        for k in keys:  # ints are this step's counts: summed; floats averaged
            values = [row[k] for row in self._pending if k in row]
            counts = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
            mean[k] = int(sum(values)) if counts else float(np.mean(values))
        mean["lr"] = logs["lr"]
        if state.skipped_batches:
            mean["skipped_batches"] = state.skipped_batches  # a running total, not a per-step count
        self._pending.clear()
        self._bar.set_postfix(self._bar_fields(mean), refresh=False)
        self._record({"step": state.step, "epoch": state.epoch, "elapsed_s": round(time.perf_counter() - self._start, 3), **mean})

    def _bar_fields(self, mean: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows of one log record."""
        return {k.split("/")[-1]: f"{v:.4g}" for k, v in mean.items() if k != "lr"}

    def _record(self, row: dict[str, Any]) -> None:
        row = ckpt.tidy(row)
        self.state.history.append(row)
        acc = self.accelerator
        if acc.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        if self.config.trackers:
            acc.log({k: v for k, v in row.items() if isinstance(v, (int, float))}, step=self.state.step)


def eval_fields(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """An evaluation as the flat ``eval/...`` fields of a metrics.jsonl row (``prefix``: a task's ``name/``)."""
    flat = {f"eval/{prefix}{k}": v for k, v in metrics["average"].items()}
    flat.update({f"eval/{lang}/{prefix}{k}": v for lang, m in metrics["per_language"].items() for k, v in m.items()})
    flat.update({f"eval/plugins/{prefix}{k}": v for k, v in metrics.get("plugins", {}).items()})
    return flat


def eval_line(metrics: dict[str, Any], first: str) -> str:
    """The averages, the primary metric ``first`` with each language's value."""
    per = metrics["per_language"]

    def shown(k: str, v: float) -> str:
        langs = ", ".join(f"{lang} {m[k]:.4f}" for lang, m in sorted(per.items()) if k in m) if k == first else ""
        return f"{k} {v:.4f}" + (f" ({langs})" if langs else "")

    return ", ".join(shown(k, v) for k, v in metrics["average"].items())


#: Fields a resumed run may raise, to train a run on past its end (the LR schedule is then
#: recomputed for the new length from the step it resumes at).
EXTENDABLE_FIELDS = ("training.max_steps", "training.epochs")


class Interrupted(KeyboardInterrupt):
    """Training stopped on request (Ctrl-C, SIGTERM) after writing ``checkpoint``."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(f"interrupted; checkpoint {checkpoint}")
        self.checkpoint = checkpoint


class NonFiniteLoss(Exception):
    """A loss term of this micro-batch is NaN or infinite; the loop skips the batch or stops (training.nonfinite)."""

    def __init__(self, message: str, plugin: str | None):
        super().__init__(message)
        self.plugin = plugin


def _scalar(value: torch.Tensor) -> str:
    v = value.detach().float()
    if v.numel() == 1:
        return f"{v.item():.4g}"
    bad = int((~torch.isfinite(v)).sum())
    return f"{bad} of {v.numel()} values non-finite" if bad else f"mean {v.mean().item():.4g}"


def _groups(items: Iterable[Any], first: int, size: int) -> Iterable[list[Any]]:
    """Lists of ``size`` items (the first of ``first``), the last one shorter when the items end."""
    it, n = iter(items), first
    while group := list(itertools.islice(it, n)):
        yield group
        n = size


class _StopFlag:
    """First Ctrl-C (or SIGTERM) asks the loop to checkpoint and stop after the current step; a second Ctrl-C aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._old: Any = None

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            if signum == signal.SIGTERM:  # schedulers and parents repeat SIGTERM; only a person's second Ctrl-C aborts
                return
            raise KeyboardInterrupt
        self.requested = True
        print("\ninterrupt: finishing this step and writing a checkpoint (Ctrl-C again to abort)", file=sys.stderr)

    def __enter__(self) -> _StopFlag:
        self._old = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread: no handlers
                break
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _NoBar:
    def update(self, n: int = 1) -> None: ...
    def set_postfix(self, *a: Any, **k: Any) -> None: ...
    def close(self) -> None: ...


def _progress(enabled: bool, total: int, initial: int, desc: str = "train", unit: str = "step") -> Any:
    """A tqdm bar, or one that shows nothing."""
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True)
