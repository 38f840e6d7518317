"""Decoding: KV-cache decoding is exact, chunked equals one-shot, token choice respects top-k/top-p."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from gptjax import config as config_lib
from gptjax import decode
from gptjax import model as model_lib

V = 50


def tiny_cfg():
    c = config_lib.base_config().model
    c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size = 2, 2, 32, 16, V
    return c


@pytest.fixture(scope="module")
def tiny():
    cfg = tiny_cfg()
    graphdef, state = nnx.split(model_lib.GPT(cfg, rngs=nnx.Rngs(0)))
    # Larger weights than the 0.02 init, so that the output depends on the input:
    # greedy decoding of a fresh model would otherwise repeat one token.
    params = jax.tree.map(lambda a: a * 20 if a.ndim == 2 else a, nnx.to_pure_dict(state))
    return cfg, nnx.merge(graphdef, params), graphdef, params


def chunked(graphdef, params, window, P, key, s, n_new, chunk, use_cache=True):
    """The new tokens of a generation made by `advance` in chunks of `chunk` steps."""
    state = decode.start(graphdef, params, window, P, key, s, use_cache=use_cache)
    got, made = [], 0
    while made < n_new:
        state, new = decode.advance(graphdef, params, state, s, n_steps=chunk, use_cache=use_cache)
        k = int(state["length"]) - P - made
        got.append(np.asarray(new)[:, :k])
        made += k
        if k == 0 or bool(np.all(np.asarray(state["done"]))):
            break
    return np.concatenate(got, axis=1)


# ----------------------------------------------------------------------------- exactness of the cache

def test_cached_decode_logits_equal_a_full_forward_pass_at_every_position(tiny):
    cfg, model, _, _ = tiny
    T = cfg.block_size
    seq = jnp.asarray(np.random.default_rng(0).integers(0, V, size=(2, T)), jnp.int32)
    full = model(seq)  # [2, T, V]
    P = 5
    cache = model_lib.init_cache(cfg, 2, T)
    logits, cache = model(seq[:, :P], cache=cache, pos=0)
    got = [logits]
    for t in range(P, T):
        logits, cache = model(seq[:, t:t + 1], cache=cache, pos=t)
        got.append(logits)
    np.testing.assert_allclose(np.concatenate(got, axis=1), full, atol=1e-5, rtol=1e-5)


def test_decode_state_logits_match_recomputation_past_block_size(tiny):
    """Chunks of one step: after every token the next-token logits equal a fresh forward over the last window."""
    cfg, model, graphdef, params = tiny
    block, P, n_new = cfg.block_size, 6, 2 * cfg.block_size
    prompt = list(range(1, P + 1))
    window, s = decode.request(prompt, 1, block, n_new, temperature=1.0, top_k=0, top_p=1.0)
    state = decode.start(graphdef, params, window, P, jax.random.key(3), s)
    forward = jax.jit(lambda p, w: nnx.merge(graphdef, p)(w))
    text = list(prompt)
    for _ in range(n_new):
        state, new = decode.advance(graphdef, params, state, s, n_steps=1)
        text.append(int(new[0, 0]))
        assert int(state["length"]) == len(text)
        ref = forward(params, jnp.asarray([text[-block:]], jnp.int32))[:, -1]
        np.testing.assert_allclose(state["logits"], ref, atol=1e-5, rtol=1e-5)
    assert len(text) == P + n_new > block


def test_greedy_with_the_cache_equals_greedy_by_recomputation_beyond_block_size(tiny):
    cfg, _, graphdef, params = tiny
    P, n_new = 4, 3 * cfg.block_size
    window, s = decode.request([7, 3, 9, 1], 2, cfg.block_size, n_new, temperature=0.0, top_k=0, top_p=1.0)
    out = {}
    for use_cache in (True, False):
        new, count = decode.generate(graphdef, params, window, P, jax.random.key(0), s, n_new=n_new,
                                     use_cache=use_cache)
        assert int(count) == n_new
        out[use_cache] = np.asarray(new)
    np.testing.assert_array_equal(out[True], out[False])
    assert len(set(out[True][0].tolist())) > 1  # not a degenerate constant sequence


@pytest.mark.parametrize("use_cache", [True, False])
def test_chunked_generation_draws_the_tokens_of_one_shot_generation(tiny, use_cache):
    cfg, _, graphdef, params = tiny
    P, n_new = 3, 3 * cfg.block_size + 5
    window, s = decode.request([5, 1, 8], 2, cfg.block_size, n_new, temperature=1.0, top_k=0, top_p=1.0)
    one_shot, _ = decode.generate(graphdef, params, window, P, jax.random.key(7), s, n_new=n_new,
                                  use_cache=use_cache)
    for chunk in (1, 7, 16):
        got = chunked(graphdef, params, window, P, jax.random.key(7), s, n_new, chunk, use_cache)
        np.testing.assert_array_equal(got, np.asarray(one_shot))


def test_same_seed_same_tokens_and_another_seed_differs(tiny):
    cfg, _, graphdef, params = tiny
    P, n_new = 4, 3 * cfg.block_size
    window, s = decode.request([7, 3, 9, 1], 2, cfg.block_size, n_new, temperature=1.0, top_k=0, top_p=1.0)
    run = lambda seed: np.asarray(decode.generate(graphdef, params, window, P, jax.random.key(seed), s,
                                                  n_new=n_new)[0])
    a, b, c = run(5), run(5), run(6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # the samples of a batch are independent draws


def test_end_of_text_stops_generation_early(tiny):
    cfg, _, graphdef, params = tiny
    P, n_new = 2, 40
    window, s = decode.request([1, 2], 1, cfg.block_size, n_new, 1.0, 0, 1.0)
    free, _ = decode.generate(graphdef, params, window, P, jax.random.key(1), s, n_new=n_new)
    eot = int(free[0, 3])  # the 4th sampled token becomes "end of text"
    window, s = decode.request([1, 2], 1, cfg.block_size, n_new, 1.0, 0, 1.0, eot=eot)
    _, count = decode.generate(graphdef, params, window, P, jax.random.key(1), s, n_new=n_new)
    first = int(np.argmax(np.asarray(free[0]) == eot))
    assert int(count) == first + 1 < n_new


def test_stop_ids_end_generation_where_they_first_appear_past_the_window(tiny):
    cfg, _, graphdef, params = tiny
    P, n_new, prompt = 3, 3 * cfg.block_size, [4, 4, 2]
    window, s = decode.request(prompt, 1, cfg.block_size, n_new, 0.0, 0, 1.0)
    free = np.asarray(decode.generate(graphdef, params, window, P, jax.random.key(0), s, n_new=n_new)[0][0])
    stop = free[2 * cfg.block_size - 2: 2 * cfg.block_size + 1]
    first_end = next(i for i in range(2, n_new) if (free[i - 2:i + 1] == stop).all())
    window, s = decode.request(prompt, 1, cfg.block_size, n_new, 0.0, 0, 1.0, stop_ids=stop)
    got = chunked(graphdef, params, window, P, jax.random.key(0), s, n_new, chunk=5)
    np.testing.assert_array_equal(got[0], free[: first_end + 1])


def test_generate_ids_returns_the_prompt_and_the_new_tokens(tiny):
    cfg, _, graphdef, params = tiny
    prompt = np.arange(1, 2 * cfg.block_size)  # longer than the window: its last block_size ids are kept
    ids = decode.generate_ids(graphdef, params, prompt, seed=0, max_new_tokens=20)
    assert len(ids) == cfg.block_size + 20
    np.testing.assert_array_equal(ids[: cfg.block_size], prompt[-cfg.block_size:])


def test_a_prompt_longer_than_the_window_is_refused_by_request():
    with pytest.raises(ValueError, match="1 to 16 ids"):
        decode.request(list(range(17)), 1, 16, 5, 1.0, 0, 1.0)


# ----------------------------------------------------------------------------- choosing a token

N_DRAWS = 256
_draw = jax.jit(jax.vmap(
    lambda key, logits, t, k, p: decode.sample_token(logits[None], key, t, k, p)[0],
    in_axes=(0, None, None, None, None)))


def draws(logits, temperature, top_k, top_p, seed):
    keys = jax.random.split(jax.random.key(seed), N_DRAWS)
    return np.asarray(_draw(keys, jnp.asarray(logits, jnp.float32), jnp.float32(temperature),
                            jnp.int32(top_k), jnp.float32(top_p)))


# XLA on CPU flushes subnormal floats to zero, so 1e-45 and 0 tie there; real logits are never subnormal.
LOGITS = arrays(np.float32, 12, elements=st.floats(-4, 4, width=32, allow_subnormal=False))


@settings(max_examples=40, deadline=None)
@given(logits=LOGITS, k=st.integers(1, 12), temperature=st.floats(0.3, 3.0), seed=st.integers(0, 2**16))
def test_top_k_never_samples_outside_the_k_largest(logits, k, temperature, seed):
    kth = np.sort(logits)[::-1][k - 1]
    assert (logits[draws(logits, temperature, k, 1.0, seed)] >= kth).all()


def nucleus_floor(logits, temperature, top_p):
    """Smallest probability inside the smallest set of top tokens whose mass reaches top_p."""
    z = logits.astype(np.float64) / temperature
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    ordered = np.sort(probs)[::-1]
    # float32 rounding inside the sampler may admit a token exactly at the boundary
    n = min(int(np.searchsorted(np.cumsum(ordered), min(top_p + 1e-5, 1.0))) + 1, len(probs))
    return probs, ordered[n - 1]


@settings(max_examples=40, deadline=None)
@given(logits=LOGITS, top_p=st.floats(0.01, 1.0), temperature=st.floats(0.3, 3.0), seed=st.integers(0, 2**16))
def test_top_p_never_samples_outside_the_nucleus(logits, top_p, temperature, seed):
    probs, floor = nucleus_floor(logits, temperature, top_p)
    got = draws(logits, temperature, 0, top_p, seed)
    assert (probs[got] >= floor * (1 - 1e-4)).all()


def test_top_p_keeps_exactly_the_nucleus():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    assert set(draws(logits, 1.0, 0, 0.45, 0)) == {0}
    assert set(draws(logits, 1.0, 0, 0.7, 0)) == {0, 1}
    assert set(draws(logits, 1.0, 0, 0.9, 0)) == {0, 1, 2}
    assert set(draws(logits, 1.0, 2, 0.9, 0)) == {0, 1}  # top-k first, then the nucleus
    assert draws(logits, 0.0, 0, 1.0, 0).tolist() == [0] * N_DRAWS  # temperature 0: greedy
