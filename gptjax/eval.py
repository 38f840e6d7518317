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
import optax
from absl import app, flags, logging
from flax import nnx

from gptjax import data as data_lib
from gptjax.data import eval_windows
from gptjax import quantize as quantize_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError, exit_with
from gptjax.sample import load_run


def bits_per_byte(mean_loss: float, n_tokens: int, n_bytes: int) -> float:
    """Nats per token -> bits per UTF-8 byte of the text those tokens spell.

    Comparable across tokenizers: a char model and a BPE model of the same
    text are charged for the same bytes.
    """
    return mean_loss * n_tokens / (math.log(2) * max(1, n_bytes))


def validation_ids(run, log) -> np.ndarray:
    """The validation split encoded with the run's own tokenizer (from the token cache when there)."""
    # A training workdir keeps its tokenizer; a --save_quantized folder has no checkpoints/,
    # so its data is prepared without one and must come out with the same tokenizer.
    prepared = data_lib.prepare(run.cfg, *workdir_lib.kept_tokenizer(workdir_lib.Workdir(run.workdir)), log=log)
    if prepared.tokenizer.fingerprint() != run.tokenizer.fingerprint():
        raise UserError(f"the data of {run.workdir}'s config now tokenizes differently from its saved tokenizer; "
                        "evaluate the training workdir instead.")
    return np.asarray(prepared.val_ids)


def make_loss_sum(graphdef):
    @jax.jit
    def loss_sum(params, x, y):
        logits = nnx.merge(graphdef, params)(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).astype(jnp.float32).sum()

    return loss_sum


def evaluate(graphdef, params, x, y, n_bytes: int, batch_size: int = 32) -> dict:
    """val_loss (nats/token), perplexity and bits_per_byte over all windows."""
    loss_sum = make_loss_sum(graphdef)
    total = 0.0
    for i in range(0, len(x), batch_size):
        total += float(loss_sum(params, jnp.asarray(x[i:i + batch_size]), jnp.asarray(y[i:i + batch_size])))
    loss = total / y.size
    return {"val_loss": loss, "perplexity": math.exp(min(loss, 700.0)),
            "bits_per_byte": bits_per_byte(loss, int(y.size), n_bytes), "tokens": int(y.size), "bytes": int(n_bytes)}


def run_eval(workdir: str, step: int | None = None, quantize: str = "none", batch_size: int = 32,
             max_windows: int = 0) -> list[dict]:
    """One result per model: the checkpoint as stored, then (with quantize) its quantized version."""
    quantize_lib.check_scheme(quantize)
    if batch_size < 1:
        raise UserError(f"--batch_size must be >= 1, got {batch_size}.")
    run = load_run(workdir, step)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    x, y = eval_windows(validation_ids(run, log), run.cfg.model.block_size, max_windows)
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
    flags.DEFINE_enum("quantize", "none", list(quantize_lib.SCHEMES), "Also score the model quantized this way.")
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


if __name__ == "__main__":
    define_flags()
    app.run(main)
