"""`python -m gptjax.train --config configs/tiny.py [--config.KEY=VALUE ...] [--workdir DIR]`

Builds the tokenizer and token arrays, initialises the model (or resumes from
the newest checkpoint in the workdir), and runs one `jax.jit`-compiled train
step per batch, evaluating, logging and checkpointing on the way.
"""

from __future__ import annotations

import math
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging
from flax import nnx
from ml_collections import config_flags

from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import diagnostics as diag_lib
from gptjax import metrics as metrics_lib
from gptjax import model as model_lib
from gptjax import runtime
from gptjax import sharding
from gptjax import steps as steps_lib
from gptjax import faults
from gptjax.checkpoint import Checkpointer, CheckpointWriteError, abstract_like
from gptjax.config import check_resume_config
from gptjax.errors import UserError, exit_with
from gptjax.metrics import MetricsLog, bits_per_byte, flops_per_token, peak_flops

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config file (optionally FILE:SIZE).")
# allow_override: gptjax.sample defines --workdir too, and a notebook imports both modules.
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default: the config's workdir.", allow_override=True)
# Multi-process runs (see README "Scaling out"): all three, or none on a TPU pod / under SLURM.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Start jax.distributed: auto = with the flags above or under a multi-process "
                                 "SLURM / MPI / TPU-pod launch; on = always (JAX detects the cluster).")
_QUIET = flags.DEFINE_bool("quiet", False, "Print nothing but errors.")


# ----------------------------------------------------------------------------- data

def prepare_data(cfg, workdir: str, log=print):
    """Tokenizer (restored from the workdir when there is one) and memory-mapped id arrays."""
    # Process 0 builds and writes the tokenizer and token caches; the others then find them.
    if not sharding.is_main_process():
        sharding.sync("gptjax: data prepared")
    p = data_lib.prepare(cfg, workdir, log=log)
    if sharding.is_main_process():
        sharding.sync("gptjax: data prepared")
    data_lib.check_length(p.train_ids, cfg.model.block_size, "training")
    data_lib.check_length(p.val_ids, cfg.model.block_size, "validation")
    return p.tokenizer, p.train_ids, p.val_ids


def make_eval_sum_step(graphdef, params_sh, batch_sh, scalar_sh):
    """Summed loss over the rows whose weight is 1 (the padding rows of a last batch weigh 0)."""
    gathered = sharding.compute_shardings(params_sh)

    def eval_sum(params, x, y, w):
        logits = nnx.merge(graphdef, jax.lax.with_sharding_constraint(params, gathered))(x)
        losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), y)
        return (losses.sum(axis=-1) * w).sum()

    return jax.jit(eval_sum, in_shardings=(params_sh, batch_sh, batch_sh, batch_sh), out_shardings=scalar_sh)


# ----------------------------------------------------------------------------- model + optimizer

def abstract_model(model_cfg):
    return nnx.eval_shape(lambda: model_lib.GPT(model_cfg, rngs=nnx.Rngs(0)))


def init_params(model_cfg, seed: int, shardings=None):
    def init():
        return nnx.to_pure_dict(nnx.state(model_lib.GPT(model_cfg, rngs=nnx.Rngs(seed))))

    return jax.jit(init, out_shardings=shardings)()


def loss_fn(graphdef, params, x, y, dropout_key=None):
    logits = nnx.merge(graphdef, params)(x, dropout_key=dropout_key)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def make_train_step(graphdef, tx, seed: int, dropout: float, state_sh, batch_sh, scalar_sh,
                    grad_accum: int = 1, steps_per_call: int = 1):
    """One compiled call: `steps_per_call` optimizer steps, each over `grad_accum` micro-batches.

    With steps_per_call = 1 the call takes x, y of shape [B, T] and returns
    scalar metrics; with k > 1 it takes [k, B, T] (k consecutive batches) and
    returns metrics of shape [k], one entry per step, so logging sees every
    step. Micro-batch i holds rows i, i+A, i+2A, ... of the batch: each device
    keeps its own rows, and equal-size micro-batches make the mean of their
    mean losses equal the full batch's mean loss.
    """
    base_key = jax.random.key(seed)
    gathered = sharding.compute_shardings(state_sh["params"])  # FSDP: weights gathered for compute

    def grads_of(params, x, y, key):
        compute = lambda p: loss_fn(graphdef, jax.lax.with_sharding_constraint(p, gathered), x, y, key)
        return jax.value_and_grad(compute)(params)

    def accumulated(params, x, y, key):
        B, T = x.shape
        micro = lambda a: a.reshape(B // grad_accum, grad_accum, T).swapaxes(0, 1)

        def body(carry, i_xy):
            i, mx, my = i_xy
            loss, grads = grads_of(params, mx, my, None if key is None else jax.random.fold_in(key, i))
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro(x), micro(y)))
        return jax.tree.map(lambda g: g / grad_accum, (loss, grads))

    def one_step(state, x, y):
        key = jax.random.fold_in(base_key, state["step"]) if dropout > 0 else None
        if grad_accum > 1:
            loss, grads = accumulated(state["params"], x, y, key)
        else:
            loss, grads = grads_of(state["params"], x, y, key)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        new_state = {"params": params, "opt_state": opt_state, "step": state["step"] + 1}
        grad_norm = optax.tree.norm(grads)
        new_state, finite = faults.skip_nonfinite(state, new_state, loss, grad_norm)
        return new_state, {"loss": loss, "grad_norm": grad_norm, "finite": finite}

    def train_step(state, x, y):
        if steps_per_call == 1:
            return one_step(state, x, y)
        return jax.lax.scan(lambda s, xy: one_step(s, *xy), state, (x, y))

    return jax.jit(
        train_step,
        in_shardings=(state_sh, batch_sh, batch_sh),
        out_shardings=(state_sh, scalar_sh),
        donate_argnums=0,
    )


def _shown(path: str) -> str:
    """A path as the finish block prints it: relative to the current folder when inside it."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel


def encode_sample_prompt(tokenizer, prompt: str, block_size: int) -> np.ndarray:
    from gptjax import sample as sample_lib  # imported on use: it defines the sample command's flags

    return sample_lib.encode_prompt(tokenizer, prompt, block_size)


def generate_tokens(graphdef, params, prompt_ids: np.ndarray, seed: int, max_new_tokens: int,
                    vocab_size: int) -> np.ndarray:
    """Prompt + `max_new_tokens` sampled ids (temperature 0.8, top-k 200) by gptjax.sample's generator."""
    from gptjax import sample as sample_lib

    return sample_lib.generate_ids(graphdef, params, prompt_ids, seed, max_new_tokens,
                                   temperature=0.8, top_k=min(200, vocab_size))


def make_eval_step(graphdef, params_sh, batch_sh, scalar_sh):
    gathered = sharding.compute_shardings(params_sh)
    return jax.jit(
        lambda params, x, y: loss_fn(graphdef, jax.lax.with_sharding_constraint(params, gathered), x, y),
        in_shardings=(params_sh, batch_sh, batch_sh),
        out_shardings=scalar_sh,
    )


# ----------------------------------------------------------------------------- the run

class Run:
    """Everything a training run holds: data, compiled steps, state, outputs."""

    def __init__(self, cfg, workdir: str, quiet: bool = False, devices=None):
        """`devices`: the mesh's devices (default: every device of every process)."""
        config_lib.validate(cfg)
        self.cfg, self.workdir, self.quiet = cfg, workdir, quiet
        self.console = metrics_lib.Console(quiet=quiet, enabled=jax.process_index() == 0)
        os.makedirs(workdir, exist_ok=True)
        self.config_changes = self._check_config_against_workdir()  # before anything is written
        self.tokenizer, self.train_ids, self.val_ids = prepare_data(cfg, workdir, log=self.log)
        with cfg.unlocked():
            cfg.model.vocab_size = self.tokenizer.vocab_size
        self.sample_prompt = encode_sample_prompt(self.tokenizer, cfg.train.sample_prompt, cfg.model.block_size) \
            if cfg.train.sample_every else None  # a prompt the tokenizer cannot encode fails here, before training
        if sharding.is_main_process():
            with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
                f.write(config_lib.to_json(cfg))

        t = cfg.train
        self.mesh = sharding.make_mesh(cfg.mesh, devices)
        sharding.check_batch(t.batch_size, self.mesh)
        sharding.check_model(cfg.model, self.mesh)
        self.batch_rows = sharding.process_rows(self.mesh, t.batch_size)  # this process's share
        self.batch_sh = sharding.batch_sharding(self.mesh)
        self.scalar_sh = sharding.replicated(self.mesh)

        abstract = abstract_model(cfg.model)
        self.graphdef = nnx.graphdef(abstract)
        abstract_params = nnx.to_pure_dict(nnx.state(abstract))
        self.params_sh = sharding.param_shardings(model_lib.logical_axes(abstract), self.mesh, abstract_params)
        self.tx, self.schedule = steps_lib.make_optimizer(t)
        self.opt_sh = sharding.opt_state_shardings(self.tx, abstract_params, self.params_sh, self.mesh)

        params = init_params(cfg.model, t.seed, self.params_sh)
        opt_state = jax.jit(self.tx.init, out_shardings=self.opt_sh)(params)
        self.state = {"params": params, "opt_state": opt_state,
                      "step": jax.device_put(jnp.zeros((), jnp.int32), self.scalar_sh)}
        self.state_sh = {"params": self.params_sh, "opt_state": self.opt_sh, "step": self.scalar_sh}

        self.ckpt = Checkpointer(workdir, keep=t.keep_checkpoints)
        self.metrics = MetricsLog(workdir, enabled=jax.process_index() == 0, sinks=metrics_lib.make_sinks(
            cfg.log, workdir, cfg.to_dict(), say=self.log) if jax.process_index() == 0 else ())
        self.nonfinite = faults.NonFiniteGuard(t.max_bad_steps)
        self.signals = faults.StopSignals()
        self.resumed_from = self._maybe_restore()

        self._step_fns = {}  # steps per call -> compiled train step
        self.train_step = self.step_fn(1)
        self.eval_step = make_eval_step(self.graphdef, self.params_sh, self.batch_sh, self.scalar_sh)
        self.tokens_per_step = t.batch_size * cfg.model.block_size
        counts = model_lib.param_counts(self.state["params"])
        self.flops_per_token = flops_per_token(cfg.model, sum(counts.values()), counts.get("wpe", 0))
        self.peak_flops, self.peak_source = peak_flops(list(self.mesh.devices.flat))
        self._eval_batches = {}
        # Compiled only when asked for: diagnostics off costs nothing per step.
        self.diagnostics = diag_lib.make_diagnostics_step(self.graphdef, self.tx) if t.diagnostics_every else None

    def step_fn(self, k: int):
        """The compiled train step that runs k optimizer steps per call."""
        if k not in self._step_fns:
            t = self.cfg.train
            batch_sh = sharding.stacked_batch_sharding(self.mesh) if k > 1 else self.batch_sh
            self._step_fns[k] = make_train_step(
                self.graphdef, self.tx, t.seed, self.cfg.model.dropout, self.state_sh, batch_sh, self.scalar_sh,
                grad_accum=t.grad_accum, steps_per_call=k,
            )
        return self._step_fns[k]

    def steps_in_call(self, step: int, stop_at: int | None = None) -> int:
        """train.steps_per_call, or 1 where a whole call would run past a log, eval or save point."""
        t = self.cfg.train
        k = t.steps_per_call
        if k == 1:
            return 1
        ends = [t.steps] + ([stop_at] if stop_at is not None and stop_at > step else [])
        ends += [(step // every + 1) * every
                 for every in (t.log_every, t.eval_every, t.checkpoint_every, t.diagnostics_every, t.sample_every)
                 if every]
        return k if step + k <= min(ends) else 1

    def train_batches(self, step: int, k: int):
        """The batches of steps step..step+k-1: [B, T] for k = 1, else stacked [k, B, T]."""
        if k == 1:
            return self.batch(self.train_ids, step, data_lib.TRAIN_STREAM)
        m, t = self.cfg.model, self.cfg.train
        xy = [data_lib.get_batch(self.train_ids, m.block_size, t.batch_size, t.seed, s, data_lib.TRAIN_STREAM,
                                 rows=self.batch_rows)
              for s in range(step, step + k)]
        return tuple(sharding.to_global(np.stack(a), self.mesh, t.batch_size, stacked=True) for a in zip(*xy))

    def _check_config_against_workdir(self) -> list[str]:
        """Refuse (UserError, workdir untouched) a resume whose config changed what must not change."""
        path = os.path.join(self.workdir, "config.json")
        if not os.path.exists(path):
            return []
        with open(path, encoding="utf-8") as f:
            saved = config_lib.from_json(f.read()).to_dict()
        return check_resume_config(saved, self.cfg.to_dict(), self.cfg.train.allow_config_change, self.workdir)

    def _maybe_restore(self) -> int | None:
        """Restore the newest checkpoint that restores cleanly (broken newer ones are reported, moved aside)."""
        found = self.ckpt.restore_newest(
            abstract_like(self.state["params"], self.params_sh),
            abstract_like(self.state["opt_state"], self.opt_sh),
            log=lambda msg: print(msg, file=sys.stderr, flush=True) if jax.process_index() == 0 else None,
        )
        if found is None:
            self.metrics.truncate_after(-1)  # records of an earlier start that never reached a checkpoint
            return None
        step, params, opt_state, meta = found
        self.state = {"params": params, "opt_state": opt_state,
                      "step": jax.device_put(jnp.asarray(step, jnp.int32), self.scalar_sh)}
        self.metrics.truncate_after(step)
        return step

    def log(self, msg: str) -> None:
        self.console.say(msg)

    def describe(self) -> None:
        """The start-up block: devices, mesh, data, tokenizer, model table, plan."""
        m, t = self.cfg.model, self.cfg.train
        devices = jax.devices()
        listed = ", ".join(str(d) for d in devices[:4]) + (f", ... ({len(devices)} in all)" if len(devices) > 4 else "")
        self.log(f"devices: {sharding.describe_devices()}: {listed}")
        self.log(f"mesh: {dict(self.mesh.shape)}")
        self.log(f"data: {self.cfg.data.path or self.cfg.data.dataset}: train {len(self.train_ids):,} tokens, "
                 f"val {len(self.val_ids):,} tokens")
        self.log(f"tokenizer: {self.tokenizer.kind}, vocab {self.tokenizer.vocab_size:,}")
        self.log(f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, "
                 f"{m.activation}, {m.dtype} compute")
        for line in metrics_lib.model_summary(model_lib.param_counts(self.state["params"])):
            self.log(line)
        self.log(f"train: {t.steps:,} steps x {t.batch_size} sequences x {m.block_size} tokens = "
                 f"{self.tokens_per_step:,} tokens/step, {t.steps * self.tokens_per_step:,} in all "
                 f"({t.steps * self.tokens_per_step / max(len(self.train_ids), 1):.1f} epochs)")
        self.log(f"workdir: {os.path.abspath(self.workdir)}")

    # ------------------------------------------------------------------------- watching the run

    def diagnostics_due(self, step: int) -> bool:
        every = self.cfg.train.diagnostics_every
        return bool(every) and step % every == 0

    def diagnose(self, step: int, x, y) -> dict:
        """Per-layer diagnostics on the batch of `step`, before the step changes the state."""
        rec = {"step": step, **{k: float(v) for k, v in jax.device_get(self.diagnostics(self.state, x, y)).items()}}
        self.metrics.write(rec)
        return rec

    def generate_sample(self, seed: int) -> str:
        """A short sample from the fixed prompt with the current weights."""
        out = generate_tokens(self.graphdef, self.state["params"], self.sample_prompt, seed,
                              self.cfg.train.sample_tokens, self.tokenizer.vocab_size)
        return self.tokenizer.decode(out)

    def write_sample(self, step: int) -> str:
        text = self.generate_sample(self.cfg.train.seed + step)
        self.log(f"step {step:>6} | sample:\n{text}")
        if jax.process_index() == 0:
            with open(os.path.join(self.workdir, metrics_lib.SAMPLES_FILE), "a", encoding="utf-8") as f:
                f.write(f"--- step {step} ---\n{text}\n\n")
        return text

    def plot(self) -> None:
        """Redraw loss.png, unless metrics.jsonl has not changed since the last drawing."""
        if not self.metrics.enabled or not os.path.exists(self.metrics.path):
            return
        stat = os.stat(self.metrics.path)
        if (stat.st_size, stat.st_mtime_ns) != getattr(self, "_plotted", None):
            metrics_lib.save_loss_png(self.workdir, self.tokens_per_step)
            self._plotted = (stat.st_size, stat.st_mtime_ns)

    def after_eval(self, step: int, ev: dict) -> None:
        """The eval line and a fresh loss.png."""
        best = metrics_lib.best_val(metrics_lib.history(metrics_lib.read_metrics(self.metrics.path))) \
            if self.metrics.enabled else None
        mark = " (best)" if best is not None and best[0] == step else ""
        extra = f" = {ev['val_bpb']:.4f} bits/byte" if "val_bpb" in ev else ""
        self.log(f"step {step:>6} | eval: train {ev['train_loss']:.4f}, val {ev['val_loss']:.4f}{extra}{mark}")
        self.plot()

    def finish(self, start: int, done: int, wall: float) -> None:
        best = metrics_lib.best_val(metrics_lib.history(metrics_lib.read_metrics(self.metrics.path))) \
            if self.metrics.enabled and os.path.exists(self.metrics.path) else None
        self.log(f"done: {done - start} steps in {metrics_lib.format_duration(wall)} ({wall:.1f}s)"
                 + (f"; best val loss {best[1]:.4f} at step {best[0]}" if best else ""))
        self.log(f"  checkpoints  {_shown(self.ckpt.directory)}")
        self.log(f"  metrics      {_shown(self.metrics.path)}")
        self.log(f"  loss curve   {_shown(os.path.join(self.workdir, metrics_lib.LOSS_PNG))}")
        if self.cfg.log.tensorboard:
            self.log(f"  tensorboard  tensorboard --logdir {_shown(os.path.join(self.workdir, 'tensorboard'))}")
        if self.cfg.train.sample_every:
            self.log(f"  samples      {_shown(os.path.join(self.workdir, metrics_lib.SAMPLES_FILE))}")

    def batch(self, ids, step: int, stream: int):
        t = self.cfg.train
        x, y = data_lib.get_batch(ids, self.cfg.model.block_size, t.batch_size, t.seed, step, stream,
                                  rows=self.batch_rows)
        return sharding.to_global(x, self.mesh, t.batch_size), sharding.to_global(y, self.mesh, t.batch_size)

    def evaluate(self) -> dict:
        """Loss, perplexity and bits per byte on fixed sampled batches of each split.

        With train.eval_full, the last evaluation of a run also makes one pass
        over the whole validation split (val_full_*).
        """
        cfg, t = self.cfg, self.cfg.train
        if not hasattr(self, "_token_bytes"):
            self._token_bytes = self.tokenizer.token_bytes()
        out = {}
        for split, ids, stream in (("train", self.train_ids, data_lib.EVAL_TRAIN_STREAM),
                                   ("val", self.val_ids, data_lib.EVAL_VAL_STREAM)):
            if split not in self._eval_batches:  # the same batches at every eval: comparable numbers
                batches, n_bytes = [], 0
                for i in range(t.eval_steps):
                    x, y = data_lib.get_batch(ids, cfg.model.block_size, t.batch_size, t.seed, i, stream)
                    n_bytes += int(self._token_bytes[y].sum())
                    batches.append((sharding.to_global(x, self.mesh), sharding.to_global(y, self.mesh)))
                self._eval_batches[split] = (batches, n_bytes, t.eval_steps * t.batch_size * cfg.model.block_size)
            batches, n_bytes, n_tokens = self._eval_batches[split]
            losses = [self.eval_step(self.state["params"], x, y) for x, y in batches]
            loss = float(np.mean(jax.device_get(losses)))
            out[f"{split}_loss"] = loss
            out[f"{split}_ppl"] = math.exp(min(loss, 700.0))
            out[f"{split}_bpb"] = bits_per_byte(loss, n_tokens, n_bytes)
        if t.eval_full and int(jax.device_get(self.state["step"])) >= t.steps:
            out.update(self.evaluate_full())
        return out

    def evaluate_full(self) -> dict:
        """One pass over the validation split in consecutive block_size windows."""
        if not hasattr(self, "eval_sum_step"):
            self.eval_sum_step = make_eval_sum_step(self.graphdef, self.params_sh, self.batch_sh, self.scalar_sh)
        B = self.cfg.train.batch_size
        x_all, y_all = data_lib.eval_windows(np.asarray(self.val_ids), self.cfg.model.block_size)
        n_windows = len(x_all)
        n_bytes = int(self._token_bytes[y_all].sum())
        g = lambda a: sharding.to_global(a, self.mesh)
        total = 0.0
        for start in range(0, n_windows, B):
            rows = np.arange(start, min(start + B, n_windows))
            w = np.zeros((B,), np.float32)
            w[: len(rows)] = 1.0  # the last batch is padded with copies of its first row, weighted 0
            rows = np.concatenate([rows, np.full(B - len(rows), rows[0])])
            total += float(self.eval_sum_step(self.state["params"], g(x_all[rows]), g(y_all[rows]), g(w)))
        n_tokens = y_all.size
        loss = total / max(1, n_tokens)
        self.log(f"full validation pass: {n_tokens:,} tokens, loss {loss:.4f}, "
                 f"bits per byte {bits_per_byte(loss, n_tokens, n_bytes):.4f}")
        return {"val_full_loss": loss, "val_full_ppl": math.exp(min(loss, 700.0)),
                "val_full_bpb": bits_per_byte(loss, n_tokens, n_bytes), "val_full_tokens": n_tokens}

    def save(self, step: int, val_loss: float | None = None, force: bool = False) -> None:
        self.nonfinite.check()  # never checkpoint past a run of bad steps that should have stopped it
        if self.nonfinite.in_a_row and not force:  # keep the newest checkpoint from before the bad streak
            self.log(f"step {step:>6} | no checkpoint: the last {self.nonfinite.in_a_row} update(s) were skipped")
            return
        try:
            self.ckpt.save(step, self.state["params"], self.state["opt_state"], {"step": step},
                           val_loss=val_loss, force=force)
        except CheckpointWriteError as e:
            raise faults.TrainingStopped(str(e), faults.EXIT_CHECKPOINT_WRITE) from None

    def finish_saves(self) -> None:
        """Wait for async checkpoint writes; a failed one stops the run with a clear message."""
        try:
            self.ckpt.close()
        except CheckpointWriteError as e:
            raise faults.TrainingStopped(str(e), faults.EXIT_CHECKPOINT_WRITE) from None

    def stop_early(self, err: "faults.TrainingStopped") -> "faults.TrainingStopped":
        """Finish what was saved and name the checkpoint a rerun resumes from."""
        try:
            self.finish_saves()
        except faults.TrainingStopped as write_err:
            return write_err
        kept = self.ckpt.latest_step()
        where = f"the newest checkpoint is at step {kept}" if kept is not None else "no checkpoint was written"
        return faults.TrainingStopped(f"{err} ({where} in {self.ckpt.directory})", err.code)

    def check_stop(self, done: int, val_loss: float | None) -> None:
        """After step `done`: on a signal or preemption notice, save here and stop."""
        reason = self.signals.should_stop(done, self.cfg.train.log_every)
        if reason is None:
            return
        if self.ckpt.latest_step() != done:
            self.save(done, val_loss, force=True)
        self.finish_saves()
        raise faults.TrainingStopped(
            f"stopped by {reason} after step {done}; checkpoint saved at step {done} in {self.ckpt.directory}. "
            "Rerun the same command to resume.", faults.EXIT_PREEMPTED)

    def train(self, stop_at: int | None = None) -> dict:
        """Train to train.steps (or stop early after step `stop_at`, saving there).

        Raises faults.TrainingStopped (with its exit status) on a signal, a
        preemption notice, too many non-finite steps, or a failed checkpoint write.
        """
        with self.signals:
            try:
                return self._train_loop(stop_at)
            except faults.TrainingStopped as e:
                raise e if e.code == faults.EXIT_PREEMPTED else self.stop_early(e) from None

    def _train_loop(self, stop_at: int | None) -> dict:
        t = self.cfg.train
        self.describe()
        start = int(jax.device_get(self.state["step"]))
        if self.resumed_from is not None:
            self.log(f"resumed from the checkpoint at step {start} in {self.ckpt.directory}")
        for change in self.config_changes:
            self.log(f"config change accepted on resume: {change}")
        if start >= t.steps:
            self.log(f"nothing to do: already at step {start} of train.steps={t.steps}")
            self.finish_saves()
            self.metrics.close()
            return {"step": start}

        self.console.start(start, t.steps, t.log_every)
        if start == 0:
            ev = self.evaluate()
            self.metrics.write({"step": 0, **ev})
            self.after_eval(0, ev)
        best_val = float("inf")
        pending, window_start, window_steps = [], time.perf_counter(), 0
        t0 = time.perf_counter()
        n = self.steps_in_call(start, stop_at)
        next_batch = self.train_batches(start, n)
        last = {}
        step = done = start
        while step < t.steps:
            x, y = next_batch
            if n == 1 and self.diagnostics_due(step + 1):  # calls never straddle a diagnostics step
                self.diagnose(step + 1, x, y)
            self.state, out = self.step_fn(n)(self.state, x, y)
            done = step + n
            if done < t.steps:  # prepared while the step runs
                n_next = self.steps_in_call(done, stop_at)
                next_batch = self.train_batches(done, n_next)
            pending.append(out)
            self.nonfinite.record(step, out["finite"])
            window_steps += n
            val_loss = None
            self.console.advance(n)
            step, n = done, (n_next if done < t.steps else n)

            if done % t.log_every == 0 or done == t.steps:
                outs = jax.device_get(pending)
                elapsed = time.perf_counter() - window_start
                skipped = self.nonfinite.check()
                losses = np.concatenate([np.atleast_1d(o["loss"]) for o in outs])
                finite = np.concatenate([np.atleast_1d(o["finite"]) for o in outs])
                good = losses[finite.astype(bool)]  # skipped steps changed nothing
                loss = float(np.mean(good)) if good.size else float("nan")
                tokens_per_s = window_steps * self.tokens_per_step / elapsed
                rec = {"step": done, "train_loss": loss, "lr": float(self.schedule(done - 1)),
                       "grad_norm": float(np.atleast_1d(outs[-1]["grad_norm"])[-1]),
                       "tokens_per_s": tokens_per_s}
                if self.peak_flops:
                    rec["mfu"] = tokens_per_s * self.flops_per_token / self.peak_flops
                if self.nonfinite.total:
                    rec["skipped_steps"] = self.nonfinite.total
                if skipped:
                    self.log(f"step {done:>6} | skipped {skipped} update(s) with a NaN/Inf loss or gradient "
                             f"norm ({self.nonfinite.in_a_row} in a row, {self.nonfinite.total} in all)")
                self.metrics.write(rec)
                last = rec
                self.console.progress(done, rec)
                pending, window_start, window_steps = [], time.perf_counter(), 0

            if done % t.eval_every == 0 or done == t.steps:
                ev = self.evaluate()
                best_val = min(best_val, ev["val_loss"])
                val_loss = ev["val_loss"]
                self.metrics.write({"step": done, **ev})
                self.after_eval(done, ev)
                last.update(ev)
                window_start = time.perf_counter()  # eval time is not training throughput

            if t.sample_every and done % t.sample_every == 0:
                self.write_sample(done)
                window_start = time.perf_counter()

            if done % t.checkpoint_every == 0 or done == t.steps or done == stop_at:
                self.save(done, val_loss)
            if done == stop_at:
                break
            if done < t.steps:
                self.check_stop(done, val_loss)
        self.console.close()
        self.nonfinite.check()
        self.finish_saves()
        self.plot()
        self.metrics.close()
        wall = time.perf_counter() - t0
        self.finish(start, done, wall)
        return {"step": done, "wall_s": wall, "best_val_loss": best_val, **last}


def resolve_workdir(cfg, flag_value: str | None) -> str:
    workdir = flag_value or cfg.workdir
    with cfg.unlocked():
        cfg.workdir = workdir
    return workdir


def main(argv):
    if len(argv) > 1:
        exit_with(UserError(f"unexpected arguments {argv[1:]}; config keys go as --config.SECTION.KEY=VALUE."))
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cfg = _CONFIG.value
    runtime.configure(compilation_cache=bool(cfg.train.get("compilation_cache", True)))
    try:
        sharding.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
        workdir = resolve_workdir(cfg, _WORKDIR.value)
        Run(cfg, workdir, quiet=_QUIET.value).train()
    except UserError as e:
        exit_with(e)
    except faults.TrainingStopped as e:
        print(e if e.code == faults.EXIT_PREEMPTED else f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.code)


def run_main():
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))


if __name__ == "__main__":
    run_main()
