"""`python -m gptjax.sample --workdir DIR --prompt "ROMEO:"`

Restores a checkpoint and the tokenizer from a workdir and generates text.
The whole generation is one compiled function: a `jax.lax.fori_loop` over new
tokens, batched over samples.
"""

from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from flax import nnx

from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax.checkpoint import Checkpointer
from gptjax.errors import UserError, exit_with
from gptjax.tokenizers import load_tokenizer

flags.DEFINE_string("workdir", None, "Workdir of a training run.")
flags.DEFINE_string("prompt", "\n", "Text to continue.")
flags.DEFINE_integer("max_new_tokens", 500, "Tokens to generate per sample.")
flags.DEFINE_float("temperature", 0.8, "Softmax temperature; 0 = greedy.")
flags.DEFINE_integer("top_k", 200, "Sample among the k most likely tokens; 0 = all.")
flags.DEFINE_integer("num_samples", 1, "Independent samples.")
flags.DEFINE_integer("seed", 0, "Random seed.")
flags.DEFINE_integer("step", None, "Checkpoint step to load; default: the latest.")
FLAGS = flags.FLAGS


def sample_token(logits_BxV, key, temperature: float, top_k: int):
    """Greedy when temperature == 0; else softmax(logits / T) restricted to the top k."""
    if temperature == 0:
        return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    logits = logits_BxV / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "max_new_tokens", "temperature", "top_k"))
def generate(graphdef, params, prompt_BxP, key, *, max_new_tokens: int, temperature: float, top_k: int):
    """Prompt plus `max_new_tokens` sampled tokens, [B, P + max_new_tokens].

    Each step runs the model over the last `block_size` tokens (a window that
    slides once the text outgrows the context) and samples the next token.
    """
    model = nnx.merge(graphdef, params)
    block = model.cfg.block_size
    B, P = prompt_BxP.shape
    total = P + max_new_tokens
    seq = jnp.zeros((B, max(total, block)), jnp.int32).at[:, :P].set(prompt_BxP)

    def body(i, seq):
        length = P + i
        start = jnp.maximum(0, length - block)
        window = jax.lax.dynamic_slice(seq, (0, start), (B, block))
        # Positions past `length` hold zeros, which causal attention never sees.
        logits = model(window)[:, length - 1 - start]
        tok = sample_token(logits, jax.random.fold_in(key, i), temperature, top_k)
        return jax.lax.dynamic_update_slice(seq, tok[:, None], (0, length))

    seq = jax.lax.fori_loop(0, max_new_tokens, body, seq)
    return seq[:, :total]


def load_run(workdir: str, step: int | None = None):
    """(config, tokenizer, graphdef, params) of a workdir's checkpoint."""
    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        raise UserError(f"{workdir} has no config.json; is it a gptjax workdir? Train with --workdir {workdir}.")
    with open(path, encoding="utf-8") as f:
        cfg = config_lib.from_json(f.read())
    tokenizer = load_tokenizer(os.path.join(workdir, "tokenizer"))
    ckpt = Checkpointer(workdir, create=False, async_save=False)
    steps = ckpt.steps()
    if not steps:
        raise UserError(f"{workdir} has no checkpoint yet; train first with --workdir {workdir}.")
    step = steps[-1] if step is None else step
    if step not in steps:
        raise UserError(f"no checkpoint at step {step} in {workdir}; steps with checkpoints: {steps}.")
    abstract = nnx.eval_shape(lambda: model_lib.GPT(cfg.model, rngs=nnx.Rngs(0)))
    graphdef = nnx.graphdef(abstract)
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(
        lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device),
        nnx.to_pure_dict(nnx.state(abstract)),
    )
    params, _, _ = ckpt.restore(step, target)
    ckpt.close()
    return cfg, tokenizer, graphdef, params, step


def encode_prompt(tokenizer, prompt: str, block_size: int) -> np.ndarray:
    ids = tokenizer.encode(prompt) if prompt else np.zeros((0,), np.int32)
    if ids.size == 0:  # start from end-of-text, or a newline, or token 0
        if tokenizer.eot_id is not None:
            ids = np.array([tokenizer.eot_id], np.int32)
        else:
            try:
                ids = tokenizer.encode("\n")
            except UserError:
                ids = np.zeros((1,), np.int32)
    return ids[-block_size:]


def check_flags() -> None:
    if FLAGS.workdir is None:
        raise UserError("--workdir is required: the folder of a training run.")
    if FLAGS.temperature < 0:
        raise UserError(f"--temperature must be >= 0 (0 = greedy), got {FLAGS.temperature}.")
    if FLAGS.max_new_tokens < 1:
        raise UserError(f"--max_new_tokens must be >= 1, got {FLAGS.max_new_tokens}.")
    if FLAGS.num_samples < 1:
        raise UserError(f"--num_samples must be >= 1, got {FLAGS.num_samples}.")
    if FLAGS.top_k < 0:
        raise UserError(f"--top_k must be >= 0 (0 = no limit), got {FLAGS.top_k}.")


def main(argv):
    logging.set_verbosity(logging.WARNING)
    try:
        check_flags()
        cfg, tokenizer, graphdef, params, step = load_run(FLAGS.workdir, FLAGS.step)
        top_k = min(FLAGS.top_k, tokenizer.vocab_size)
        ids = encode_prompt(tokenizer, FLAGS.prompt, cfg.model.block_size)
        prompt = jnp.asarray(np.tile(ids[None], (FLAGS.num_samples, 1)))
        out = generate(graphdef, params, prompt, jax.random.key(FLAGS.seed),
                       max_new_tokens=FLAGS.max_new_tokens, temperature=float(FLAGS.temperature), top_k=top_k)
        out = np.asarray(jax.device_get(out))
        for i, row in enumerate(out):
            if FLAGS.num_samples > 1:
                print(f"--- sample {i + 1} (step {step}) ---")
            print(tokenizer.decode(row), flush=True)
    except UserError as e:
        exit_with(e)


if __name__ == "__main__":
    app.run(main)
