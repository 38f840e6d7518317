"""`python -m gptjax.bench --sample`: decode throughput as one JSON line.

The sampling benchmark times generation with and without the KV cache for a
randomly initialised GPT (6 layers, 6 heads, 384 wide by default, the size of
configs/shakespeare.py) at several context lengths. Decode speed is
(n - 1) / (time(n tokens) - time(1 token)): the prefill, dispatch and
compilation cancel out, leaving the per-token cost with a context that is
half full (prompt of context/2 tokens).
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from flax import nnx

from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import sample as sample_lib
from gptjax.errors import UserError, exit_with

flags.DEFINE_boolean("sample", False, "Benchmark decoding (tokens/s with and without the KV cache).")
flags.DEFINE_list("sample_contexts", ["256", "1024"], "Context lengths (model.block_size) to time.")
flags.DEFINE_integer("sample_layers", 6, "Layers of the benchmarked model.")
flags.DEFINE_integer("sample_width", 384, "Width (n_embd) of the benchmarked model; 64 per head.")
flags.DEFINE_integer("sample_vocab", 65, "Vocabulary size (65: Tiny Shakespeare characters).")
flags.DEFINE_integer("sample_tokens", 64, "Tokens decoded per timed run with the cache.")
flags.DEFINE_integer("sample_tokens_nocache", 16, "Tokens decoded per timed run without the cache.")
flags.DEFINE_integer("sample_repeats", 3, "Timed runs per setting; the fastest counts.")
FLAGS = flags.FLAGS


def _timed_generate(graphdef, params, block: int, vocab_size: int, n_new: int, use_cache: bool, repeats: int) -> float:
    """Seconds for the fastest of `repeats` generations of n_new tokens (compiled beforehand)."""
    prompt_len = block // 2
    tokens = np.zeros((1, block + n_new), np.int32)
    tokens[0, :prompt_len] = np.random.default_rng(0).integers(0, vocab_size, prompt_len)
    settings = {
        "temperature": jnp.float32(1.0), "top_k": jnp.int32(0), "top_p": jnp.float32(1.0), "eot": jnp.int32(-1),
        "stop_ids": jnp.zeros((0,), jnp.int32), "prompt_len": jnp.int32(prompt_len),
        "max_len": jnp.int32(prompt_len + n_new),
    }
    args = (graphdef, params, jnp.asarray(tokens), prompt_len, jax.random.key(0), settings)
    jax.block_until_ready(sample_lib.generate(*args, use_cache=use_cache))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(sample_lib.generate(*args, use_cache=use_cache))
        best = min(best, time.perf_counter() - t0)
    return best


def bench_sample(contexts=(256, 1024), n_layer: int = 6, n_embd: int = 384, vocab_size: int = 65,
                 n_tokens: int = 64, n_tokens_nocache: int = 16, repeats: int = 3) -> dict:
    """Decode tokens/s with and without the KV cache, per context length."""
    if n_embd % 64 or n_layer < 1 or min(contexts) < 4 or min(n_tokens, n_tokens_nocache) < 2 or repeats < 1:
        raise UserError("sample benchmark: need width a multiple of 64, >= 1 layer, contexts >= 4, "
                        ">= 2 tokens per run and >= 1 repeat.")
    results = []
    for block in contexts:
        cfg = config_lib.base_config().model
        cfg.n_layer, cfg.n_head, cfg.n_embd = n_layer, n_embd // 64, n_embd
        cfg.block_size, cfg.vocab_size = block, vocab_size
        graphdef, state = nnx.split(model_lib.GPT(cfg, rngs=nnx.Rngs(0)))
        params = nnx.to_pure_dict(state)
        row = {"context": block}
        for use_cache, n in ((True, n_tokens), (False, n_tokens_nocache)):
            n = min(n, block - block // 2)  # stay inside the window: the steady-state decode cost
            t_n = _timed_generate(graphdef, params, block, vocab_size, n, use_cache, repeats)
            t_1 = _timed_generate(graphdef, params, block, vocab_size, 1, use_cache, repeats)
            # None: the difference drowned in timing noise (too few tokens for this model).
            row["cache_tokens_per_s" if use_cache else "nocache_tokens_per_s"] = (
                (n - 1) / (t_n - t_1) if t_n > t_1 else None)
        if row["cache_tokens_per_s"] and row["nocache_tokens_per_s"]:
            row["speedup"] = row["cache_tokens_per_s"] / row["nocache_tokens_per_s"]
        results.append(row)
    return {
        "bench": "sample", "backend": jax.default_backend(), "devices": len(jax.devices()),
        "model": {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_embd // 64, "vocab_size": vocab_size,
                  "params": model_lib.count_params(params)},
        "batch": 1, "prompt": "context/2", "results": results,
    }


def main(argv):
    try:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments {argv[1:]}; flags go as --name=value.")
        if not FLAGS.sample:
            raise UserError("choose a benchmark: --sample times decoding with and without the KV cache.")
        contexts = [int(c) for c in FLAGS.sample_contexts]
        out = bench_sample(contexts, FLAGS.sample_layers, FLAGS.sample_width, FLAGS.sample_vocab,
                           FLAGS.sample_tokens, FLAGS.sample_tokens_nocache, FLAGS.sample_repeats)
        print(json.dumps(out), flush=True)
    except (UserError, ValueError) as e:
        exit_with(UserError(str(e)))


if __name__ == "__main__":
    app.run(main)
