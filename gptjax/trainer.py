"""The training loop: resume, evaluate, sample, save and stop.

`build(cfg, workdir)` does every check that can fail (config, mesh, batch,
resume guard, data) before it writes anything into the workdir, then writes
the resolved config and the tokenizer, creates the train state and restores
the newest checkpoint. `Trainer.train()` runs the loop; what people see and
keep of the run (console lines, metrics.jsonl and its sinks, loss.png,
samples.txt) goes through a `report.Reporter`.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import diagnostics as diag_lib
from gptjax import faults
from gptjax import console as console_lib
from gptjax import logs as logs_lib
from gptjax import sharding
from gptjax import steps as steps_lib
from gptjax import params as params_lib
from gptjax import decode as decode_lib
from gptjax import eval as eval_lib
from gptjax import init_from as init_from_lib
from gptjax import workdir as workdir_lib
from gptjax.report import Reporter
from gptjax.checkpoint import Checkpointer, CheckpointWriteError, abstract_like
from gptjax.errors import UserError
from gptjax.flops import flops_per_token, is_estimate, peak_flops
from gptjax.workdir import Workdir


@dataclasses.dataclass
class RunData:
    """The tokenizer and token arrays of a run."""

    source: str  # for the start-up block
    tokenizer: object
    train_ids: np.ndarray
    val_ids: np.ndarray
    token_bytes: np.ndarray  # UTF-8 bytes each token id spells: bits per byte
    data_id: dict  # what the tokenizer was built from (saved beside it in the workdir)


class Trainer:
    """Runs the loop over a built train state; see `build`."""

    def __init__(self, cfg, setup: steps_lib.TrainSetup, data: RunData, ckpt: Checkpointer, report: Reporter,
                 resumed_from: int | None, config_changes: list[str], sample_prompt: np.ndarray | None,
                 lock=None):
        t, m = cfg.train, cfg.model
        self.cfg, self.setup, self.data, self.ckpt, self.report = cfg, setup, data, ckpt, report
        self.state = setup.state
        self.resumed_from = resumed_from  # the step of the checkpoint restored; None: a fresh start
        self.start = resumed_from or 0
        self.config_changes = config_changes
        self.sample_prompt = sample_prompt
        self.evaluate = eval_lib.Evaluator(cfg, setup, data)
        self.batch_rows = sharding.process_rows(setup.mesh, t.batch_size)  # this process's share
        self.tokens_per_step = t.batch_size * m.block_size
        counts = params_lib.param_counts(self.state["params"])
        self.flops_per_token = flops_per_token(m, sum(counts.values()), counts.get("wpe", 0))
        self.peak_flops, self.peak_source = peak_flops(list(setup.mesh.devices.flat))
        self.nonfinite = faults.NonFiniteGuard(t.max_bad_steps)
        self.signals = faults.StopSignals()
        # Compiled only when asked for: diagnostics off costs nothing per step.
        self.diagnostics = diag_lib.make_diagnostics_step(setup.graphdef, setup.tx) if t.diagnostics_every else None
        self._step_fns: dict = {}  # steps per call -> compiled train step
        self.lock = lock  # workdir.TrainLock, released when the run closes

    # ------------------------------------------------------------------------- steps and batches

    def step_fn(self, k: int):
        """The compiled train step that runs k optimizer steps per call."""
        if k not in self._step_fns:
            self._step_fns[k] = steps_lib.make_train_step(self.setup, self.cfg, steps_per_call=k)
        return self._step_fns[k]

    def steps_in_call(self, step: int, stop_at: int | None = None) -> int:
        """train.steps_per_call, or 1 where a whole call would run past a log, eval, save or sample point."""
        t = self.cfg.train
        k = t.steps_per_call
        if k == 1:
            return 1
        ends = [t.steps] + ([stop_at] if stop_at is not None and stop_at > step else [])
        ends += [(step // every + 1) * every
                 for every in (t.log_every, t.eval_every, t.checkpoint_every, t.diagnostics_every, t.sample_every)
                 if every]
        return k if step + k <= min(ends) else 1

    def batch(self, ids, step: int, stream: int = data_lib.TRAIN_STREAM):
        """The global [B, T] batch of `step` from `ids` (this process loads only its rows)."""
        m, t = self.cfg.model, self.cfg.train
        x, y = data_lib.get_batch(ids, m.block_size, t.batch_size, t.seed, step, stream, rows=self.batch_rows)
        return sharding.to_global(x, self.setup.mesh, t.batch_size), sharding.to_global(y, self.setup.mesh, t.batch_size)

    def train_batches(self, step: int, k: int):
        """The batches of steps step..step+k-1: [B, T] for k = 1, else stacked [k, B, T]."""
        if k == 1:
            return self.batch(self.data.train_ids, step)
        m, t = self.cfg.model, self.cfg.train
        xy = [data_lib.get_batch(self.data.train_ids, m.block_size, t.batch_size, t.seed, s, data_lib.TRAIN_STREAM,
                                 rows=self.batch_rows) for s in range(step, step + k)]
        return tuple(sharding.to_global(np.stack(a), self.setup.mesh, t.batch_size, stacked=True) for a in zip(*xy))

    # ------------------------------------------------------------------------- the loop

    def train(self, stop_at: int | None = None) -> dict:
        """Train to train.steps (or stop early after step `stop_at`, saving there).

        Raises faults.TrainingStopped (with its exit status) on a signal, a
        preemption notice, too many non-finite steps, or a failed checkpoint write.
        """
        with self.signals:
            try:
                return self._loop(stop_at)
            except faults.TrainingStopped as e:
                raise e if e.code == faults.EXIT_PREEMPTED else self._stopped_early(e) from None

    def _loop(self, stop_at: int | None) -> dict:
        t = self.cfg.train
        self._announce()
        if self.start >= t.steps:
            self.report.say(f"nothing to do: already at step {self.start} of train.steps={t.steps}")
            self.close()
            return {"step": self.start}
        self.report.console.start(self.start, t.steps, t.log_every)
        last = self._evaluate(0) if self.start == 0 else {}
        window = LogWindow(self)
        t0 = time.perf_counter()
        step, n = self.start, self.steps_in_call(self.start, stop_at)
        batch = self.train_batches(step, n)
        while step < t.steps:
            self.state, out = self.step_fn(n)(self.state, *batch)
            done = step + n
            n_next = self.steps_in_call(done, stop_at)
            batch = self.train_batches(done, n_next) if done < t.steps else None  # prepared while the step runs
            self.nonfinite.record(step, out["finite"])
            window.add(n, out)
            val_loss = self._after_call(done, window, batch, last)
            if done % t.checkpoint_every == 0 or done == t.steps or done == stop_at:
                self.save(done, val_loss)
            if done == stop_at:
                break
            if done < t.steps:
                self._check_stop(done, val_loss)
            step, n = done, n_next
        self.nonfinite.check()
        self.close()
        wall = time.perf_counter() - t0
        self.report.finish(done - self.start, wall)
        return {"step": done, "wall_s": wall, **last}

    def _after_call(self, done: int, window: "LogWindow", batch, last: dict) -> float | None:
        """Logging, evaluation, diagnostics and samples due after step `done`; returns its val loss if evaluated."""
        t = self.cfg.train
        if done % t.log_every == 0 or done == t.steps:
            last.update(window.flush(done))
        val_loss = None
        if done % t.eval_every == 0 or done == t.steps:
            last.update(self._evaluate(done))
            val_loss = last["val_loss"]
            window.restart()  # eval time is not training throughput
        if t.diagnostics_every and done % t.diagnostics_every == 0:
            x, y = batch if batch is not None else self.batch(self.data.train_ids, done)
            if x.ndim == 3:  # a stack of the next call's batches: the first is the next step's
                x, y = x[0], y[0]
            stats = jax.device_get(self.diagnostics(self.state, x, y))
            self.report.record({"step": done, **{k: float(v) for k, v in stats.items()}})
        if t.sample_every and done % t.sample_every == 0:
            self.report.sample(done, self.generate_sample(t.seed + done))
            window.restart()
        return val_loss

    def _evaluate(self, step: int) -> dict:
        """Evaluate, report, and return the evaluation's record (its names as in metrics.jsonl)."""
        t = self.cfg.train
        ev = self.evaluate(self.state["params"], full=t.eval_full and step >= t.steps)
        if "val_full_loss" in ev:
            self.report.say(f"full validation pass: {ev['val_full_tokens']:,} tokens, loss {ev['val_full_loss']:.4f}, "
                            f"bits per byte {ev['val_full_bpb']:.4f}")
        self.report.evaluation(step, ev)
        return logs_lib.eval_record(step, ev)

    def generate_sample(self, seed: int) -> str:
        """A short sample from the fixed prompt with the current weights (temperature 0.8, top-k 200)."""
        out = decode_lib.generate_ids(self.setup.graphdef, self.state["params"], self.sample_prompt, seed,
                                      self.cfg.train.sample_tokens, temperature=0.8,
                                      top_k=min(200, self.data.tokenizer.vocab_size))
        return self.data.tokenizer.decode(out)

    def _announce(self) -> None:
        self.report.describe(self.setup.mesh, self.data, self.state["params"])
        if self.resumed_from is not None:
            self.report.say(f"resumed from the checkpoint at step {self.start} in {self.ckpt.directory}")
        for change in self.config_changes:
            self.report.say(f"config change accepted on resume: {change}")

    # ------------------------------------------------------------------------- saving and stopping

    def save(self, step: int, val_loss: float | None = None, force: bool = False) -> None:
        self.nonfinite.check()  # never checkpoint past a run of bad steps that should have stopped it
        if self.nonfinite.in_a_row and not force:  # keep the newest checkpoint from before the bad streak
            self.report.say(f"step {step:>6} | no checkpoint: the last {self.nonfinite.in_a_row} update(s) were skipped")
            return
        try:
            self.ckpt.save(step, params_lib.unstack_layers(self.state["params"]),  # on disk: per layer
                           params_lib.unstack_layers(self.state["opt_state"]), {"step": step},
                           val_loss=val_loss, force=force)
        except CheckpointWriteError as e:
            raise faults.TrainingStopped(str(e), faults.EXIT_CHECKPOINT_WRITE) from None

    def close(self) -> None:
        """Wait for async checkpoint writes (a failed one stops the run with a clear message); close the reports."""
        try:
            self.ckpt.close()
        except CheckpointWriteError as e:
            raise faults.TrainingStopped(str(e), faults.EXIT_CHECKPOINT_WRITE) from None
        finally:
            if self.lock is not None:
                self.lock.release()  # the workdir is free again, however the run ends
        self.report.plot()
        self.report.close()

    def _stopped_early(self, err: faults.TrainingStopped) -> faults.TrainingStopped:
        """Finish what was saved and name the checkpoint a rerun resumes from."""
        try:
            self.close()
        except faults.TrainingStopped as write_err:
            return write_err
        kept = self.ckpt.latest_step()
        where = f"the newest checkpoint is at step {kept}" if kept is not None else "no checkpoint was written"
        return faults.TrainingStopped(f"{err} ({where} in {self.ckpt.directory})", err.code)

    def _check_stop(self, done: int, val_loss: float | None) -> None:
        """After step `done`: on a signal or preemption notice, save here and stop."""
        reason = self.signals.should_stop(done, self.cfg.train.log_every)
        if reason is None:
            return
        if self.ckpt.latest_step() != done:
            self.save(done, val_loss, force=True)
        self.close()
        raise faults.TrainingStopped(
            f"stopped by {reason} after step {done}; checkpoint saved at step {done} in {self.ckpt.directory}. "
            "Rerun the same command to resume.", faults.EXIT_PREEMPTED)


class LogWindow:
    """The steps since the last train log record: their outputs (read at the log step only) and timing."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.pending: list = []
        self.steps = 0
        self.t0 = time.perf_counter()

    def add(self, n: int, out) -> None:
        self.pending.append(out)
        self.steps += n
        self.trainer.report.console.advance(n)

    def restart(self) -> None:
        self.t0 = time.perf_counter()

    def flush(self, done: int) -> dict:
        """Write the train record of step `done` (the one host sync of a log interval)."""
        tr = self.trainer
        outs = jax.device_get(self.pending)
        elapsed = time.perf_counter() - self.t0
        skipped = tr.nonfinite.check()
        losses = np.concatenate([np.atleast_1d(o["loss"]) for o in outs])
        finite = np.concatenate([np.atleast_1d(o["finite"]) for o in outs])
        good = losses[finite.astype(bool)]  # skipped steps changed nothing
        tokens_per_s = self.steps * tr.tokens_per_step / elapsed
        rec = {"step": done, "train_loss": float(np.mean(good)) if good.size else float("nan"),
               "lr": float(tr.setup.schedule(done - 1)),
               "grad_norm": float(np.atleast_1d(outs[-1]["grad_norm"])[-1]), "tokens_per_s": tokens_per_s}
        if tr.peak_flops:
            rec["mfu"] = tokens_per_s * tr.flops_per_token / tr.peak_flops
            if is_estimate(tr.peak_source):  # a measured CPU peak, not a datasheet figure
                rec["mfu_estimate"] = True
        if tr.nonfinite.total:
            rec["skipped_steps"] = tr.nonfinite.total
        if skipped:
            tr.report.say(f"step {done:>6} | skipped {skipped} update(s) with a NaN/Inf loss or gradient norm "
                          f"({tr.nonfinite.in_a_row} in a row, {tr.nonfinite.total} in all)")
        tr.report.record(rec)
        tr.report.console.progress(done, rec)
        self.pending, self.steps = [], 0
        self.restart()
        return rec


# ----------------------------------------------------------------------------- building a run

def build(cfg, workdir: str, quiet: bool = False, devices=None) -> Trainer:
    """A Trainer for `cfg` in `workdir`, resuming from its newest checkpoint when it has one.

    Every check that can fail (config, workdir, mesh, batch, resume guard,
    data, sample prompt) runs before anything is written into the workdir,
    so a failed start leaves nothing that blocks the corrected command. A
    workdir without checkpoints holds no run to protect: whatever an earlier
    failed start left there is overwritten. `devices`: the mesh's devices
    (default: every device of every process).
    """
    config_lib.validate(cfg)
    wd = Workdir(workdir)
    if os.path.exists(wd.root) and not os.path.isdir(wd.root):
        raise UserError(f"--workdir {workdir} is a file, not a folder; give the run a folder of its own.")
    main = jax.process_index() == 0
    lock = workdir_lib.TrainLock(wd)
    if main and os.path.isdir(wd.root):
        lock.acquire()  # a live trainer there: refuse before anything else
    try:
        return _build(cfg, wd, quiet, devices, main, lock)
    except BaseException:
        lock.release()
        raise


def _build(cfg, wd: Workdir, quiet: bool, devices, main: bool, lock) -> Trainer:
    # A fine-tune takes its model's shape and tokenizer first: the checks below see them.
    pretrained = init_from_lib.read(cfg.train.init_from) if cfg.train.init_from else None
    if pretrained is not None:
        init_from_lib.adopt(cfg, pretrained)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch(cfg.train.batch_size, mesh)
    sharding.check_model(cfg.model, mesh)
    changes = _check_resume(cfg, wd) if wd.has_checkpoints() else []
    console = console_lib.Console(quiet=quiet, enabled=main)
    data = prepare_data(cfg, wd, console.say, None if pretrained is None else pretrained.tokenizer)
    with cfg.unlocked():
        cfg.model.vocab_size = data.tokenizer.vocab_size
    # A prompt the tokenizer cannot encode fails here, before training.
    prompt = decode_lib.encode_prompt(data.tokenizer, cfg.train.sample_prompt, cfg.model.block_size) \
        if cfg.train.sample_every else None

    # Every check passed: from here on the workdir is written, by one trainer at a time.
    if main and lock.fd is None:
        lock.acquire()
    if main:
        workdir_lib.write_config(wd, cfg)
        workdir_lib.save_tokenizer(wd, data.tokenizer, data.data_id)
    params = None
    if pretrained is not None:
        params = init_from_lib.initial_params(pretrained, cfg.model, None)
        del pretrained  # its host copy of the weights
    setup = steps_lib.init_train_state(cfg, mesh, params=params)
    ckpt = Checkpointer(wd.checkpoints, keep=cfg.train.keep_checkpoints, broken_dir=wd.broken)
    log = logs_lib.MetricsLog(wd.metrics, enabled=main, sinks=logs_lib.make_sinks(
        cfg.log, cfg.to_dict(), wd.tensorboard, wd.root, say=console.say) if main else ())
    report = Reporter(cfg, wd, console, log, cfg.train.batch_size * cfg.model.block_size, main)
    start = _restore(cfg, ckpt, setup, log)
    return Trainer(cfg, setup, data, ckpt, report, start, changes, prompt, lock)


def _check_resume(cfg, wd: Workdir) -> list[str]:
    """Refuse (UserError, workdir untouched) a resume whose config changed what must not change."""
    if not os.path.exists(wd.config):
        return []
    saved = workdir_lib.read_config(wd).to_dict()
    return config_lib.check_resume_config(saved, cfg.to_dict(), cfg.train.allow_config_change, wd.root)


def prepare_data(cfg, wd: Workdir, log, tokenizer=None) -> RunData:
    """Tokenizer (the workdir's own when it has one) and memory-mapped id arrays; writes nothing in `wd`."""
    # Process 0 builds the tokenizer and token caches; the others then find them.
    if not sharding.is_main_process():
        sharding.sync("gptjax: data prepared")
    p = data_lib.prepare(cfg, *workdir_lib.kept_tokenizer(wd), log=log, tokenizer=tokenizer)
    if sharding.is_main_process():
        sharding.sync("gptjax: data prepared")
    data_lib.check_length(p.train_ids, cfg.model.block_size, "training")
    data_lib.check_length(p.val_ids, cfg.model.block_size, "validation")
    return RunData(cfg.data.path or cfg.data.dataset, p.tokenizer, p.train_ids, p.val_ids,
                   np.asarray(p.tokenizer.token_bytes()), p.data_id)


def _restore(cfg, ckpt: Checkpointer, setup: steps_lib.TrainSetup, log) -> int | None:
    """Restore the newest checkpoint that restores cleanly into `setup.state` (broken newer ones are
    reported and moved aside); returns its step, or None for a fresh start."""
    found = ckpt.restore_newest(  # checkpoints hold the per-layer layout, whatever model.scan_layers
        params_lib.unstack_layers(abstract_like(setup.state["params"], setup.params_sh)),
        params_lib.unstack_layers(abstract_like(setup.state["opt_state"], setup.state_sh["opt_state"])),
        log=lambda msg: print(msg, file=sys.stderr, flush=True) if jax.process_index() == 0 else None,
    )
    if found is None:
        log.truncate_after(-1)  # records of an earlier start that never reached a checkpoint
        return None
    step, params, opt_state, _ = found
    if cfg.model.scan_layers:
        params, opt_state = jax.device_put(params_lib.stack_layers((params, opt_state)),
                                           (setup.params_sh, setup.state_sh["opt_state"]))
    setup.state = {"params": params, "opt_state": opt_state,
                   "step": jax.device_put(jnp.asarray(step, jnp.int32), setup.scalar_sh)}
    log.truncate_after(step)
    return step
