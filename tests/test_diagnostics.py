"""Diagnostics read the model's own activations (sown), with the model's own q/k/v layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import tiny_model
from gptjax import diagnostics as diag_lib
from gptjax import model as model_lib


def _random_model(n_head=4, **kw):
    cfg = model_lib.ModelConfig(n_layer=2, n_head=n_head, n_embd=32, block_size=12, vocab_size=40, **kw)
    return cfg, model_lib.GPT(cfg, rngs=nnx.Rngs(3))


def _entropy_by_hand(model, tokens):
    """Mean attention entropy of block 0, from its weights alone: head h's q/k/v are the columns
    [h*3K, h*3K+K), [h*3K+K, h*3K+2K), [h*3K+2K, h*3K+3K) of the fused kernel (head-major)."""
    cfg = model.cfg
    K, H, T = cfg.head_dim, cfg.n_head, tokens.shape[1]
    x = model.wte(tokens) + model.wpe(jnp.arange(T))[None]
    h = np.asarray(model.blocks[0].ln_1(x), np.float64)
    W = np.asarray(model.blocks[0].attn.qkv.kernel[...], np.float64)
    ents = []
    for head in range(H):
        q = h @ W[:, head * 3 * K: head * 3 * K + K]
        k = h @ W[:, head * 3 * K + K: head * 3 * K + 2 * K]
        s = np.einsum("bqd,bkd->bqk", q, k) / np.sqrt(K)
        s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ents.append(-np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0), axis=-1))
    return float(np.mean(ents))


def test_attention_entropy_is_that_of_the_models_own_attention_with_several_heads():
    cfg, model = _random_model(n_head=4)
    # Larger random weights than at initialisation, so that heads differ visibly.
    for block in model.blocks:
        block.attn.qkv.kernel[...] = block.attn.qkv.kernel[...] * 25.0
    tokens = jax.random.randint(jax.random.key(1), (3, cfg.block_size), 0, cfg.vocab_size)
    stats = diag_lib.forward_stats(model, tokens)
    expected = _entropy_by_hand(model, tokens)
    uniform = float(np.mean(np.log(np.arange(1, cfg.block_size + 1))))
    assert abs(expected - uniform) > 0.05  # far from uniform: a wrong split would show
    assert stats["diag/attn_entropy/blocks.0"] == pytest.approx(expected, rel=1e-4)


def test_sown_probabilities_are_the_ones_the_model_attends_with():
    cfg, model = _random_model(n_head=2)
    tokens = jax.random.randint(jax.random.key(2), (2, cfg.block_size), 0, cfg.vocab_size)
    logits, sown = diag_lib.recorded_forward(model, tokens)
    np.testing.assert_array_equal(logits, model(tokens))  # recording changes nothing
    attn = model.blocks[0].attn
    x = model.blocks[0].ln_1(model.wte(tokens) + model.wpe(jnp.arange(cfg.block_size))[None])
    _, _, v = model_lib.split_qkv(attn.qkv(x), cfg.n_head)
    y = jnp.einsum("bhqk,bkhd->bqhd", sown[0]["attn"]["attn_probs"], v).reshape(x.shape)
    np.testing.assert_allclose(attn.proj(y), attn(x)[0], rtol=1e-5, atol=1e-6)
    assert model.blocks[0].record is False  # the model is back to not recording


def test_training_forward_sows_nothing():
    cfg, model = _random_model()
    model(jnp.zeros((1, cfg.block_size), jnp.int32))
    assert not nnx.state(model, nnx.Intermediate)
def test_dead_unit_fraction_on_a_constructed_layer():
    cfg, model = tiny_model(activation="relu", bias=True)
    F = 4 * cfg.n_embd
    # Layer 0: the first 40 hidden units get a bias no input can overcome (always 0 after ReLU),
    # the others one that keeps them always on.
    bias = np.full((F,), 1e4, np.float32)
    bias[:40] = -1e4
    model.blocks[0].mlp.fc.bias.value = jnp.asarray(bias)
    # Layer 1: zero weights, bias -1 on units 0..9 only, +1 elsewhere.
    model.blocks[1].mlp.fc.kernel.value = jnp.zeros_like(model.blocks[1].mlp.fc.kernel.value)
    model.blocks[1].mlp.fc.bias.value = jnp.where(jnp.arange(F) < 10, -1.0, 1.0)
    tokens = jax.random.randint(jax.random.key(0), (4, cfg.block_size), 0, cfg.vocab_size)
    stats = diag_lib.forward_stats(model, tokens)
    assert stats["diag/dead_frac/blocks.0"] == pytest.approx(40 / F)
    assert stats["diag/dead_frac/blocks.1"] == pytest.approx(10 / F)

    # A unit that fires at a single position of the batch is alive.
    h = np.zeros((2, 3, 4), np.float32)
    h[1, 2, 3] = 0.5
    assert float(diag_lib.dead_fraction(jnp.asarray(h))) == pytest.approx(3 / 4)


def test_attention_entropy_of_uniform_attention_is_log_of_the_context():
    cfg, model = tiny_model()
    for block in model.blocks:  # q = k = 0: every query attends uniformly to itself and all before
        block.attn.qkv.kernel.value = jnp.zeros_like(block.attn.qkv.kernel.value)
    tokens = jnp.zeros((2, cfg.block_size), jnp.int32)
    stats = diag_lib.forward_stats(model, tokens)
    expected = np.mean(np.log(np.arange(1, cfg.block_size + 1)))
    for i in range(cfg.n_layer):
        assert stats[f"diag/attn_entropy/blocks.{i}"] == pytest.approx(expected, rel=1e-5)
    assert "diag/dead_frac/blocks.0" not in stats  # GELU has no dead units to count
