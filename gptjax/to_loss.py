"""Time to a loss: train from scratch until validation loss (or bits per byte) reaches a target.

    python -m gptjax.to_loss --to_loss 1.90 --config configs/tiny.py:modern
    python -m gptjax.to_loss --to_loss 1.30 --metric bpb --config configs/tinystories.py:tiny

Prints one JSON line. `wall_s` runs from the start of compilation to the end
of the first evaluation that reaches the target: compilation (`compile_s`),
training steps (`train_s`) and the evaluations on the way (`eval_s`) are also
reported separately, so `wall_s = compile_s + train_s + eval_s`. Data
preparation (tokenizing, cached after the first run) is not counted. The
persistent compilation cache is off, so every run pays its compilation.

The steps, batches and evaluation batches are the trainer's: the same config
gives the same losses as `python -m gptjax.train`, only evaluated more often
(every `--eval_every` steps, over `train.eval_steps` batches unless
`--eval_steps` says otherwise). With `--full` the run goes on to train.steps
and also reports the final evaluation and the whole curve (step, loss, bits
per byte and wall time of every evaluation).
"""

from __future__ import annotations

import json
import math
import sys
import time

import jax
import numpy as np

from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import sharding
from gptjax import steps as steps_lib
from gptjax.eval import bits_per_byte

METRICS = ("loss", "bpb")


class _EvalSet:
    """The trainer's fixed validation batches, and the bytes their targets spell."""

    def __init__(self, batches, n_tokens: int, n_bytes: int):
        self.batches, self.n_tokens, self.n_bytes = batches, n_tokens, n_bytes

    @classmethod
    def build(cls, cfg, val_ids, token_bytes, mesh, eval_steps: int) -> "_EvalSet":
        t, block = cfg.train, cfg.model.block_size
        batches, n_bytes = [], 0
        for i in range(eval_steps):
            x, y = data_lib.get_batch(val_ids, block, t.batch_size, t.seed, i, data_lib.EVAL_VAL_STREAM)
            n_bytes += int(token_bytes[y].sum())
            batches.append((sharding.to_global(x, mesh), sharding.to_global(y, mesh)))
        return cls(batches, eval_steps * t.batch_size * block, n_bytes)


def _train_batches(cfg, ids, step: int, k: int, mesh):
    """Batches of steps step..step+k-1, as the trainer draws them ([B, T], or [k, B, T] for k > 1)."""
    t, block = cfg.train, cfg.model.block_size
    if k == 1:
        return tuple(sharding.to_global(a, mesh, t.batch_size)
                     for a in data_lib.get_batch(ids, block, t.batch_size, t.seed, step, data_lib.TRAIN_STREAM))
    xy = [data_lib.get_batch(ids, block, t.batch_size, t.seed, s, data_lib.TRAIN_STREAM) for s in range(step, step + k)]
    return tuple(sharding.to_global(np.stack(a), mesh, t.batch_size, stacked=True) for a in zip(*xy))


def time_to_loss(cfg, target: float, metric: str = "loss", eval_every: int = 25, eval_steps: int | None = None,
                 full: bool = False, log=None) -> dict:
    """Train `cfg` from scratch; the wall time, steps and tokens to the first eval with val `metric` <= target.

    `eval_every` is rounded up to a multiple of train.steps_per_call (the
    steps one compiled call runs; 25 -> 30 for configs/tiny.py's 10).
    Returns the record `main` prints.
    """
    config_lib.require_choice("--metric", metric, METRICS)
    config_lib.validate(cfg)
    t = cfg.train
    k = t.steps_per_call
    eval_every = -(-eval_every // k) * k
    eval_steps = eval_steps or t.eval_steps
    prepared = data_lib.prepare(cfg, None, log=log or (lambda _: None))
    with cfg.unlocked():
        cfg.model.vocab_size = prepared.tokenizer.vocab_size
    mesh = sharding.make_mesh(cfg.mesh)
    evals = _EvalSet.build(cfg, prepared.val_ids, prepared.tokenizer.token_bytes(), mesh, eval_steps)

    t0 = time.perf_counter()
    setup = steps_lib.init_train_state(cfg, mesh)
    x, y = _train_batches(cfg, prepared.train_ids, 0, k, mesh)
    train_step = steps_lib.make_train_step(setup, cfg, steps_per_call=k).lower(setup.state, x, y).compile()
    eval_step = steps_lib.make_eval_step(setup).lower(setup.state["params"], *evals.batches[0]).compile()
    jax.block_until_ready(setup.state)
    compile_s = time.perf_counter() - t0

    def evaluate(params):
        loss = float(np.mean(jax.device_get([eval_step(params, bx, by) for bx, by in evals.batches])))
        return {"val_loss": loss, "val_bpb": bits_per_byte(loss, evals.n_tokens, evals.n_bytes)}

    state, step, train_s, eval_s = setup.state, 0, 0.0, 0.0
    hit, last, curve = None, None, []
    while step < t.steps:
        t1 = time.perf_counter()
        state, out = train_step(state, x, y)
        step += k
        if step < t.steps:  # prepared while the step runs, as in the trainer
            x, y = _train_batches(cfg, prepared.train_ids, step, k, mesh)
        jax.block_until_ready(out)
        train_s += time.perf_counter() - t1
        if step % eval_every and step != t.steps:
            continue
        t2 = time.perf_counter()
        last = {"step": step, **evaluate(state["params"])}
        eval_s += time.perf_counter() - t2
        curve.append([step, round(last["val_loss"], 4), round(last["val_bpb"], 4),
                      round(compile_s + train_s + eval_s, 2)])
        if hit is None and last[f"val_{metric}"] <= target:
            hit = {"step": step, "tokens": step * t.batch_size * cfg.model.block_size,
                   "wall_s": compile_s + train_s + eval_s, "train_s": train_s, "eval_s": eval_s,
                   "val_loss": last["val_loss"], "val_bpb": last["val_bpb"]}
            if not full:
                break
        if not math.isfinite(last["val_loss"]):
            break

    rec = {"target": target, "metric": metric, "reached": hit is not None, "compile_s": compile_s,
           "eval_every": eval_every, "eval_steps": eval_steps, "seed": t.seed,
           **(hit or {"step": None, "tokens": None, "wall_s": None, "train_s": train_s, "eval_s": eval_s})}
    if full or hit is None:
        rec["final"] = last
        rec["curve"] = curve  # [step, val_loss, val_bpb, wall_s so far] at every evaluation
    if log:
        log("val loss curve: " + " ".join(f"{c[0]}:{c[1]}" for c in curve))
    return rec


def main(argv=None) -> None:
    from absl import app, flags
    from ml_collections import config_flags

    from gptjax import runtime

    config = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config file (optionally FILE:SIZE).")
    to_loss = flags.DEFINE_float("to_loss", None, "Target: validation loss (or bits per byte with --metric bpb).",
                                 required=True)
    metric = flags.DEFINE_enum("metric", "loss", list(METRICS), "What --to_loss compares with.")
    eval_every = flags.DEFINE_integer("eval_every", 25, "Evaluate every N steps (rounded up to a multiple of train.steps_per_call).")
    eval_steps = flags.DEFINE_integer("eval_steps", 0, "Validation batches per evaluation; 0: train.eval_steps.")
    full = flags.DEFINE_bool("full", False, "Train on to train.steps after reaching the target; report the end too.")
    verbose = flags.DEFINE_bool("verbose", False, "Also print the validation curve to stderr.")

    def run(argv):
        cfg = config.value
        runtime.configure(compilation_cache=False)  # every run pays its own compilation
        say = (lambda msg: print(msg, file=sys.stderr, flush=True)) if verbose.value else None
        rec = time_to_loss(cfg, to_loss.value, metric.value, eval_every.value, eval_steps.value or None,
                           full.value, log=say)
        print(json.dumps(rec), flush=True)

    app.run(run, argv=argv, flags_parser=lambda a: config_lib.parse_flags_or_exit(a, flags.FLAGS))


if __name__ == "__main__":
    main()
