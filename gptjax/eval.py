"""`python -m gptjax.eval --workdir DIR [--quantize int8] [--step N]`

Validation loss, perplexity and bits per byte of a checkpoint over the whole
validation split (cut into consecutive block_size windows, every token scored
once). With `--quantize int8` the float model and its int8 version are scored
on the same windows, so the cost of quantization is one command away.
"""

from __future__ import annotations

import json
import math
import sys

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import quantize as quantize_lib
from gptjax import sharding
from gptjax.errors import UserError, exit_with
from gptjax import steps as steps_lib
from gptjax.steps import make_eval_sum_step
from gptjax import workdir as workdir_lib
from gptjax.workdir import load_run


# ----------------------------------------------------------------------------- loss -> perplexity, bits per byte

def perplexity(mean_loss: float) -> float:
    """exp(loss); capped where a float64 exp would overflow (a diverged model's loss)."""
    return math.exp(min(mean_loss, 700.0))


def bits_per_byte(mean_loss: float, n_tokens: int, n_bytes: int) -> float:
    """Nats per token -> bits per UTF-8 byte of the text those tokens spell.

    Comparable across tokenizers: a char model and a BPE model of the same
    text are charged for the same bytes.
    """
    return mean_loss * n_tokens / (math.log(2) * max(1, n_bytes))


# ----------------------------------------------------------------------------- the full-split pass

def full_split_loss(loss_sum_step, params, x_NxT, y_NxT, batch_size: int, to_device=jnp.asarray) -> float:
    """Mean loss per token over all windows, batch_size windows per call.

    The last batch is padded with copies of its first window weighted 0, so
    every call has one shape and compiles once.
    """
    n_windows = len(x_NxT)
    total = 0.0
    for start in range(0, n_windows, batch_size):
        rows = np.arange(start, min(start + batch_size, n_windows))
        w = np.zeros((batch_size,), np.float32)
        w[: len(rows)] = 1.0
        rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
        total += float(loss_sum_step(params, to_device(x_NxT[rows]), to_device(y_NxT[rows]), to_device(w)))
    return total / max(1, y_NxT.size)



# ----------------------------------------------------------------------------- the trainer's evaluation

class Evaluator:
    """The trainer's evaluation: loss, perplexity and bits per byte on fixed sampled batches of each
    split, and on the whole validation split (`full`). The same batches at every evaluation:
    comparable numbers. `data` is the run's `trainer.RunData`."""

    def __init__(self, cfg, setup, data):
        self.cfg, self.setup, self.data = cfg, setup, data
        self.step = steps_lib.make_eval_step(setup)
        self.sum_step = steps_lib.make_eval_sum_step(setup.graphdef, setup.params_sh, setup.batch_sh,
                                                     setup.scalar_sh)
        m, t = cfg.model, cfg.train
        self.batches = {}
        for split, ids, stream in (("train", data.train_ids, data_lib.EVAL_TRAIN_STREAM),
                                   ("val", data.val_ids, data_lib.EVAL_VAL_STREAM)):
            batches, n_bytes = [], 0
            for i in range(t.eval_steps):
                x, y = data_lib.get_batch(ids, m.block_size, t.batch_size, t.seed, i, stream)
                n_bytes += int(data.token_bytes[y].sum())
                batches.append((sharding.to_global(x, setup.mesh), sharding.to_global(y, setup.mesh)))
            self.batches[split] = (batches, n_bytes, t.eval_steps * t.batch_size * m.block_size)

    def __call__(self, params, full: bool = False) -> dict:
        out = {}
        for split, (batches, n_bytes, n_tokens) in self.batches.items():
            loss = float(np.mean(jax.device_get([self.step(params, x, y) for x, y in batches])))
            out.update({f"{split}_loss": loss, f"{split}_ppl": perplexity(loss),
                        f"{split}_bpb": bits_per_byte(loss, n_tokens, n_bytes)})
        if full:
            x, y = data_lib.eval_windows(np.asarray(self.data.val_ids), self.cfg.model.block_size)
            n_bytes = int(self.data.token_bytes[y].sum())
            loss = full_split_loss(self.sum_step, params, x, y, self.cfg.train.batch_size,
                                   to_device=lambda a: sharding.to_global(a, self.setup.mesh))
            out.update({"val_full_loss": loss, "val_full_ppl": perplexity(loss),
                        "val_full_bpb": bits_per_byte(loss, y.size, n_bytes), "val_full_tokens": int(y.size)})
        return out


# ----------------------------------------------------------------------------- a saved run

def validation_ids(run, log) -> np.ndarray:
    """The validation split encoded with the run's own tokenizer (from the token cache when there)."""
    # A training workdir keeps its tokenizer; a --save_quantized folder has no checkpoints/,
    # so its data is prepared without one and must come out with the same tokenizer.
    prepared = data_lib.prepare(run.cfg, *workdir_lib.kept_tokenizer(workdir_lib.Workdir(run.workdir)), log=log)
    if prepared.tokenizer.fingerprint() != run.tokenizer.fingerprint():
        raise UserError(f"the data of {run.workdir}'s config now tokenizes differently from its saved tokenizer; "
                        "evaluate the training workdir instead.")
    return np.asarray(prepared.val_ids)


def evaluate(graphdef, params, x, y, n_bytes: int, batch_size: int = 32) -> dict:
    """val_loss (nats/token), perplexity and bits_per_byte over all windows."""
    step = make_eval_sum_step(graphdef)
    loss = full_split_loss(step, params, x, y, max(1, min(batch_size, len(x))))
    return {"val_loss": loss, "perplexity": perplexity(loss),
            "bits_per_byte": bits_per_byte(loss, int(y.size), n_bytes), "tokens": int(y.size), "bytes": int(n_bytes)}


def run_eval(workdir: str, step: int | None = None, quantize: str = "none", batch_size: int = 32,
             max_windows: int = 0) -> list[dict]:
    """One result per model: the checkpoint as stored, then (with quantize) its quantized version."""
    quantize_lib.check_scheme(quantize)
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}.")
    run = load_run(workdir, step)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    x, y = data_lib.eval_windows(validation_ids(run, log), run.cfg.model.block_size, max_windows)
    n_bytes = int(np.asarray(run.tokenizer.token_bytes())[y].sum())
    stored = "float" if run.quantized == "none" else run.quantized
    results = [{"model": stored, "step": run.step, "param_bytes": run.param_bytes,
                **evaluate(run.graphdef, run.params, x, y, n_bytes, batch_size)}]
    if quantize != "none" and run.quantized == "none":
        model = quantize_lib.quantize_model(nnx.merge(run.graphdef, run.params), quantize)
        graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
        results.append({"model": quantize, "step": run.step, "param_bytes": quantize_lib.tree_bytes(params),
                        **evaluate(graphdef, params, x, y, n_bytes, batch_size)})
    return results


def format_result(r: dict, base: dict | None = None) -> str:
    line = (f"{r['model']:>5} | step {r['step']} | val loss {r['val_loss']:.4f} | perplexity {r['perplexity']:.3f} | "
            f"bits/byte {r['bits_per_byte']:.4f} | params {r['param_bytes'] / 2**20:.2f} MiB")
    if base is not None:
        line += (f" ({100 * r['param_bytes'] / base['param_bytes']:.1f}% of {base['model']}; "
                 f"val loss {100 * (r['val_loss'] / base['val_loss'] - 1):+.2f}%)")
    return line


def define_flags() -> None:
    flags.DEFINE_string("workdir", None, "Workdir of a training run (or a --save_quantized folder).")
    flags.DEFINE_integer("step", None, "Checkpoint step; default: the latest.")
    flags.DEFINE_enum("quantize", "none", list(config_lib.QUANTIZE_SCHEMES), "Also score the model quantized this way.")
    flags.DEFINE_integer("batch_size", 32, "Windows per forward pass.")
    flags.DEFINE_integer("max_windows", 0, "Score only the first N windows of the split; 0 = all.")
    flags.DEFINE_boolean("json", False, "Print one JSON object per model instead of a table line.")


def main(argv):
    FLAGS = flags.FLAGS
    logging.set_verbosity(logging.ERROR)
    try:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments {argv[1:]}; flags go as --name=value.")
        if FLAGS.workdir is None:
            raise UserError("--workdir is required: the folder of a training run.")
        if FLAGS.max_windows < 0:
            raise UserError(f"--max_windows must be >= 0, got {FLAGS.max_windows}.")
        results = run_eval(FLAGS.workdir, FLAGS.step, FLAGS.quantize, FLAGS.batch_size, FLAGS.max_windows)
        for r in results:
            print(json.dumps(r) if FLAGS.json else format_result(r, results[0] if r is not results[0] else None))
        sys.stdout.flush()
    except UserError as e:
        exit_with(e)


def run_main() -> None:
    """The `gptjax-eval` console script."""
    define_flags()
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))


if __name__ == "__main__":
    run_main()
