"""Decoding, pure and jit-compiled: prefill + KV-cache decode steps, top-k / top-p.

Generation is a small state machine:

  start:   one prefill pass over the prompt writes every layer's keys and
           values into a KV cache and gives the logits of the first new token;
  advance: a `jax.lax.while_loop` of decode steps, each sampling a token and
           feeding it to the model at the next cache position, until a chunk
           of `n_steps` tokens, `max_len`, an end-of-text token or the stop ids.

The device holds only what the next step needs: the last `block_size`
tokens (`window`), the last tokens of the length of the stop string (`tail`),
the KV cache and the chunk being written (`new` [B, n_steps]). The text itself
accumulates on the host, chunk by chunk, so memory does not grow with the
number of new tokens beyond the text, and one compiled `advance` serves a
generation of any length.

Learned position embeddings only exist for `block_size` positions, so once the
text fills the window the cache cannot simply roll: each further token
re-prefills the last `block_size - 1` tokens (together with the new one, in
one pass) at positions 0.., exactly the window that recomputation would see.
`use_cache=False` keeps the plain path, a full forward pass over the window
per token, for comparison.

Each token's key is `fold_in(key, position)`: chunked (streamed) and one-shot
generation draw the same tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptjax import model as model_lib
from gptjax.errors import UserError

# Positions are int32 on the device; this many new tokens leave room for any prompt.
MAX_NEW_TOKENS = 2**30


# ----------------------------------------------------------------------------- choosing a token

def filter_logits(logits_BxV, top_k, top_p):
    """-inf for every token outside the top k and outside the nucleus of mass top_p.

    top_k = 0 (or >= vocab) keeps all tokens; top_p = 1 keeps all. The nucleus
    is the smallest set of most likely tokens (among the top k) whose
    probability reaches top_p. Both may be traced: one compiled function
    serves every setting. Tokens tied with the last one kept are kept too.
    """
    V = logits_BxV.shape[-1]
    sorted_BxV = -jnp.sort(-logits_BxV, axis=-1)  # descending
    k = jnp.where((top_k > 0) & (top_k < V), top_k, V)
    ranks = jnp.arange(V)
    probs = jax.nn.softmax(jnp.where(ranks < k, sorted_BxV, -jnp.inf), axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    n_nucleus = jnp.sum(mass_before < top_p, axis=-1, keepdims=True)
    n_keep = jnp.where(top_p < 1.0, jnp.minimum(n_nucleus, k), k)
    threshold_Bx1 = jnp.take_along_axis(sorted_BxV, n_keep - 1, axis=-1)
    return jnp.where(logits_BxV < threshold_Bx1, -jnp.inf, logits_BxV)


def sample_token(logits_BxV, key, temperature, top_k=0, top_p=1.0):
    """Greedy when temperature == 0; else softmax(logits / T) within the top k and the nucleus."""
    greedy = jnp.argmax(logits_BxV, axis=-1)
    scaled = logits_BxV / jnp.maximum(temperature, 1e-6)
    sampled = jax.random.categorical(key, filter_logits(scaled, top_k, top_p), axis=-1)
    return jnp.where(temperature > 0, sampled, greedy).astype(jnp.int32)


# ----------------------------------------------------------------------------- the decode state machine
#
# state: window [B, block] (text[max(0, length - block):length], zeros after),
# tail [B, M] (the last M tokens; M = len(stop_ids)), length (tokens so far),
# logits [B, V] (the prediction for token `length`), cache + cache_len (cache
# position c holds token length - cache_len + c), done [B], key.
# settings: temperature, top_k, top_p, eot (-1: none), stop_ids [M] (M = 0:
# none), prompt_len, max_len (prompt_len + max_new_tokens).

def _push(window_BxT, tok_B, i):
    """The window after token i: written in place while it fits, else shifted left by one."""
    block = window_BxT.shape[1]
    placed = jax.lax.dynamic_update_slice(window_BxT, tok_B[:, None], (0, jnp.minimum(i, block - 1)))
    shifted = jnp.concatenate([window_BxT[:, 1:], tok_B[:, None]], axis=1)
    return jnp.where(i < block, placed, shifted)


def _prefill(model, window_BxT, prompt_len, use_cache: bool):
    # A fixed-size window (the prompt, then zeros that later steps overwrite): one
    # compiled prefill serves every prompt length.
    if not use_cache:
        return model(window_BxT, logits_at=prompt_len - 1)[:, 0], (), jnp.int32(0)
    block = model.cfg.block_size
    cache = model_lib.init_cache(model.cfg, window_BxT.shape[0], block)
    logits, cache = model(window_BxT, cache=cache, pos=0, logits_at=prompt_len - 1)
    return logits[:, 0], cache, jnp.asarray(prompt_len, jnp.int32)


def _feed(model, window_BxT, tok_B, i, cache, cache_len, mode: str):
    """Logits for token i + 1, given that token i (tok_B) was just pushed into the window.

    mode "recompute": a full forward pass over the window (no cache);
    "append": one decode step at cache position cache_len;
    "slide": the window is full, so re-prefill it (its last block-1 tokens plus the new one) at 0..block-1.
    """
    block = model.cfg.block_size
    if mode == "recompute":
        return model(window_BxT, logits_at=jnp.minimum(i, block - 1))[:, 0], cache, cache_len
    if mode == "append":
        logits, cache = model(tok_B[:, None], cache=cache, pos=cache_len)
        return logits[:, 0], cache, cache_len + 1
    logits, cache = model(window_BxT, cache=cache, pos=0, logits_at=block - 1)
    return logits[:, 0], cache, cache_len


def _start(model, window_BxT, prompt_len, key, settings, use_cache: bool):
    logits, cache, cache_len = _prefill(model, window_BxT, prompt_len, use_cache)
    B, M = window_BxT.shape[0], settings["stop_ids"].shape[0]
    return {"window": window_BxT, "tail": jnp.zeros((B, M), jnp.int32),
            "length": jnp.asarray(prompt_len, jnp.int32), "logits": logits, "cache": cache,
            "cache_len": cache_len, "done": jnp.zeros((B,), bool), "key": key}


def _advance(model, state, settings, n_steps: int, use_cache: bool):
    """(state, new [B, n_steps]): up to n_steps decode steps, stopping early at max_len or when every
    sample is done. new[:, :k] are the k tokens made (k = the change of state["length"]); zeros after."""
    s = settings
    M = s["stop_ids"].shape[0]
    B = state["window"].shape[0]
    block = model.cfg.block_size
    base = state["length"]
    limit = jnp.minimum(s["max_len"], base + n_steps)

    def body(carry, mode):
        st, new = carry
        i = st["length"]
        tok_B = sample_token(st["logits"], jax.random.fold_in(st["key"], i), s["temperature"], s["top_k"], s["top_p"])
        new = jax.lax.dynamic_update_slice(new, tok_B[:, None], (0, i - base))
        window = _push(st["window"], tok_B, i)
        hit = tok_B == s["eot"]
        tail = st["tail"]
        if M:  # the stop string's tokens end here (host code cuts the text exactly)
            tail = jnp.concatenate([tail[:, 1:], tok_B[:, None]], axis=1)
            hit |= jnp.all(tail == s["stop_ids"][None], axis=-1) & (i - M + 1 >= s["prompt_len"])
        logits, cache, cache_len = _feed(model, window, tok_B, i, st["cache"], st["cache_len"], mode)
        st = {**st, "window": window, "tail": tail, "length": i + 1, "logits": logits, "cache": cache,
              "cache_len": cache_len, "done": st["done"] | hit}
        return st, new

    def going(carry):
        st = carry[0]
        return (st["length"] < limit) & ~jnp.all(st["done"])

    carry = (state, jnp.zeros((B, n_steps), jnp.int32))
    if not use_cache:
        return jax.lax.while_loop(going, functools.partial(body, mode="recompute"), carry)
    # Two loops rather than a lax.cond per step: the cache fills, then (if the text goes on) slides.
    carry = jax.lax.while_loop(lambda c: going(c) & (c[0]["cache_len"] < block),
                               functools.partial(body, mode="append"), carry)
    return jax.lax.while_loop(going, functools.partial(body, mode="slide"), carry)


@functools.partial(jax.jit, static_argnames=("graphdef", "use_cache"))
def start(graphdef, params, window_BxT, prompt_len, key, settings, *, use_cache: bool = True):
    """Prefill: the generation state after the prompt (see the comment above)."""
    return _start(nnx.merge(graphdef, params), window_BxT, prompt_len, key, settings, use_cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_steps", "use_cache"), donate_argnames=("state",))
def advance(graphdef, params, state, settings, *, n_steps: int, use_cache: bool = True):
    """(state, new [B, n_steps]): one chunk of up to n_steps more tokens."""
    return _advance(nnx.merge(graphdef, params), state, settings, n_steps, use_cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "n_new", "use_cache"))
def generate(graphdef, params, window_BxT, prompt_len, key, settings, *, n_new: int, use_cache: bool = True):
    """A whole short generation, prefill and every decode step, as one compiled function.

    Returns (new [B, n_new], count): new[:, :count] are the tokens made (a
    sample that hit its stop goes on being filled while others run; the
    caller cuts). For long generations, call `advance` in chunks instead.
    """
    model = nnx.merge(graphdef, params)
    state = _start(model, window_BxT, prompt_len, key, settings, use_cache)
    state, new = _advance(model, state, settings, n_new, use_cache)
    return new, state["length"] - prompt_len


# ----------------------------------------------------------------------------- requests

def request(prompt_ids, num_samples: int, block: int, max_new_tokens: int, temperature: float, top_k: int,
            top_p: float, eot: int | None = None, stop_ids=()):
    """(window [num_samples, block] holding the prompt, settings) for `start` / `generate`.

    The prompt must hold 1 to `block` ids (`encode_prompt` makes one).
    """
    P = len(prompt_ids)
    if not 1 <= P <= block:
        raise ValueError(f"the prompt must hold 1 to {block} ids, got {P}")
    window = np.zeros((num_samples, block), np.int32)
    window[:, :P] = prompt_ids
    settings = {
        "temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k), "top_p": jnp.float32(top_p),
        "eot": jnp.int32(-1 if eot is None else eot), "stop_ids": jnp.asarray(stop_ids, jnp.int32).reshape(-1),
        "prompt_len": jnp.int32(P), "max_len": jnp.int32(P + max_new_tokens),
    }
    return jnp.asarray(window), settings


def encode_prompt(tokenizer, prompt: str, block_size: int) -> np.ndarray:
    """The prompt's last block_size ids; an empty prompt starts from end-of-text, a newline or token 0."""
    ids = tokenizer.encode(prompt) if prompt else np.zeros((0,), np.int32)
    if ids.size == 0:
        if tokenizer.eot_id is not None:
            ids = np.array([tokenizer.eot_id], np.int32)
        else:
            try:
                ids = tokenizer.encode("\n")
            except UserError:
                ids = np.zeros((1,), np.int32)
    return np.asarray(ids, np.int32)[-block_size:]


def generate_ids(graphdef, params, prompt_ids, seed: int, max_new_tokens: int, temperature: float = 0.8,
                 top_k: int = 0, top_p: float = 1.0, use_cache: bool = True) -> np.ndarray:
    """Prompt ids (at most block_size of them) + max_new_tokens sampled ids, for one sample."""
    block = nnx.merge(graphdef, params).cfg.block_size
    prompt_ids = np.asarray(prompt_ids, np.int32)[-block:]
    window, settings = request(prompt_ids, 1, block, max_new_tokens, temperature, top_k, top_p)
    new, _ = generate(graphdef, params, window, len(prompt_ids), jax.random.key(seed), settings,
                      n_new=max_new_tokens, use_cache=use_cache)
    return np.concatenate([prompt_ids, np.asarray(jax.device_get(new))[0]])
