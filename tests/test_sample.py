"""Sampling: KV-cache decoding is exact, token choice respects top-k/top-p, the CLI and API behave."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import arrays

from conftest import run_cli
from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import sample as sample_lib
from gptjax.errors import UserError

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


def settings_for(prompt_len, max_new_tokens, temperature=0.0, top_k=0, top_p=1.0, eot=-1, stop_ids=()):
    return {
        "temperature": jnp.float32(temperature), "top_k": jnp.int32(top_k), "top_p": jnp.float32(top_p),
        "eot": jnp.int32(eot), "stop_ids": jnp.asarray(stop_ids, jnp.int32).reshape(-1),
        "prompt_len": jnp.int32(prompt_len), "max_len": jnp.int32(prompt_len + max_new_tokens),
    }


def prompt_buffer(prompt, batch, block, max_new_tokens):
    tokens = np.zeros((batch, block + max_new_tokens), np.int32)
    tokens[:, : len(prompt)] = prompt
    return jnp.asarray(tokens)


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
    """Chunks of one step: after every token the next-token logits equal a fresh forward over the window."""
    cfg, model, graphdef, params = tiny
    block, P, n_new = cfg.block_size, 6, 2 * cfg.block_size
    prompt = np.arange(1, P + 1)
    s = settings_for(P, n_new, temperature=1.0)
    state = sample_lib.start(graphdef, params, prompt_buffer(prompt, 1, block, n_new), P, jax.random.key(3))
    forward = jax.jit(lambda p, w: nnx.merge(graphdef, p)(w))
    for _ in range(n_new):
        state = sample_lib.advance(graphdef, params, state, s, n_steps=1)
        length = int(state["length"])
        start = max(0, length - block)
        window = state["tokens"][:, start:start + block]  # zeros after `length` cannot affect earlier logits
        ref = forward(params, window)[:, length - 1 - start]
        np.testing.assert_allclose(state["logits"], ref, atol=1e-5, rtol=1e-5)
    assert int(state["length"]) == P + n_new > block


def test_greedy_with_the_cache_equals_greedy_by_recomputation_beyond_block_size(tiny):
    cfg, _, graphdef, params = tiny
    P, n_new = 4, 3 * cfg.block_size
    tokens = prompt_buffer([7, 3, 9, 1], 2, cfg.block_size, n_new)
    s = settings_for(P, n_new)
    out = {}
    for use_cache in (True, False):
        seq, length = sample_lib.generate(graphdef, params, tokens, P, jax.random.key(0), s, use_cache=use_cache)
        assert int(length) == P + n_new
        out[use_cache] = np.asarray(seq[:, : P + n_new])
    np.testing.assert_array_equal(out[True], out[False])
    assert len(set(out[True][0, P:].tolist())) > 1  # not a degenerate constant sequence


def test_same_seed_same_tokens_and_another_seed_differs(tiny):
    cfg, _, graphdef, params = tiny
    P, n_new = 4, 3 * cfg.block_size
    tokens = prompt_buffer([7, 3, 9, 1], 2, cfg.block_size, n_new)
    s = settings_for(P, n_new, temperature=1.0)
    run = lambda seed: np.asarray(sample_lib.generate(graphdef, params, tokens, P, jax.random.key(seed), s)[0])
    a, b, c = run(5), run(5), run(6)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert not np.array_equal(a[0], a[1])  # the samples of a batch are independent draws


def test_end_of_text_stops_generation_early(tiny):
    cfg, _, graphdef, params = tiny
    P, n_new = 2, 40
    tokens = prompt_buffer([1, 2], 1, cfg.block_size, n_new)
    free, _ = sample_lib.generate(graphdef, params, tokens, P, jax.random.key(1), settings_for(P, n_new, 1.0))
    eot = int(free[0, P + 3])  # the 4th sampled token becomes "end of text"
    seq, length = sample_lib.generate(graphdef, params, tokens, P, jax.random.key(1),
                                      settings_for(P, n_new, 1.0, eot=eot))
    first = P + int(np.argmax(np.asarray(free[0, P:]) == eot))
    assert int(length) == first + 1 < P + n_new


# ----------------------------------------------------------------------------- choosing a token

N_DRAWS = 256
_draw = jax.jit(jax.vmap(
    lambda key, logits, t, k, p: sample_lib.sample_token(logits[None], key, t, k, p)[0],
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


# ----------------------------------------------------------------------------- a trained workdir: API and CLI

@pytest.fixture
def workdir(trained_workdir):
    return trained_workdir


@pytest.fixture(scope="module")
def gen(trained_workdir):
    return sample_lib.Generator.from_workdir(trained_workdir)


def test_api_generates_past_block_size_and_streams_the_same_text(gen):
    g = gen
    text = g.generate("First", max_new_tokens=40, seed=3)  # block_size is 16
    assert text.startswith("First") and len(text) == len("First") + 40
    assert "".join(g.stream("First", max_new_tokens=40, seed=3, chunk_size=7)) == text
    texts = g.samples("All", num_samples=3, max_new_tokens=20, seed=1)
    assert len(texts) == 3 and all(t.startswith("All") and len(t) == 23 for t in texts)


def test_stop_string_ends_the_text_before_it(gen):
    g = gen
    free = g.generate("First", max_new_tokens=60, temperature=0)
    stop = free[len("First") + 3: len("First") + 5]  # a string the greedy text will produce
    cut = g.generate("First", max_new_tokens=60, temperature=0, stop=stop)
    assert cut == free[: free.index(stop, len("First"))]
    assert "".join(g.stream("First", max_new_tokens=60, temperature=0, stop=stop, chunk_size=4)) == cut


@pytest.mark.parametrize("kwargs, needle", [
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"top_p": 0.0}, "top_p must be in (0, 1]"),
    ({"top_p": 1.5}, "top_p must be in (0, 1]"),
    ({"top_k": -1}, "top_k must be >= 0"),
    ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
])
def test_bad_sampling_settings_are_one_clear_error(gen, kwargs, needle):
    with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("]", r"\]")):
        gen.generate("First", **kwargs)


def test_top_k_above_the_vocabulary_is_clamped_with_a_warning(gen):
    g = gen
    vocab = g.tokenizer.vocab_size
    with pytest.warns(UserWarning, match=f"using top_k={vocab}"):
        a = g.generate("First", max_new_tokens=10, top_k=vocab + 100)
    assert a == g.generate("First", max_new_tokens=10, top_k=0)


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for n in needles:
        assert n in proc.stderr, proc.stderr


@pytest.mark.parametrize("flag, needle", [
    ("--top_p=1.01", "--top_p must be in (0, 1]"),
    ("--step=7", "no checkpoint at step 7"),
])
def test_cli_bad_input_is_one_clean_error(workdir, flag, needle):
    proc = run_cli("gptjax.sample", f"--workdir={workdir}", flag)
    assert_clean_error(proc, needle)
    if flag == "--step=7":
        assert "steps with checkpoints: [" in proc.stderr and "50, 60]" in proc.stderr


def test_cli_streams_stops_writes_output_and_quantizes(workdir, tmp_path):
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("First Citizen:\n", encoding="utf-8")
    out, qdir = tmp_path / "out.txt", tmp_path / "int8"
    proc = run_cli("gptjax.sample", f"--workdir={workdir}", f"--prompt_file={prompt}", "--max_new_tokens=50",
                   "--temperature=0", "--stop=\n\n", f"--output={out}", "--quantize=int8",
                   f"--save_quantized={qdir}", "--top_k=1000")
    assert proc.returncode == 0, proc.stderr
    assert "warning: --top_k=1000 is larger than the vocabulary" in proc.stderr
    assert "int8: parameters" in proc.stderr
    written = out.read_text(encoding="utf-8")
    assert proc.stdout == written and written.startswith("First Citizen:\n")
    assert "\n\n" not in written[len("First Citizen:\n"):-1]
    # the saved int8 folder samples like a workdir and gives the same text
    again = run_cli("gptjax.sample", f"--workdir={qdir}", f"--prompt_file={prompt}", "--max_new_tokens=50",
                    "--temperature=0", "--stop=\n\n")
    assert again.returncode == 0, again.stderr
    assert again.stdout == written
    assert os.path.exists(qdir / "quantization.json")
