"""Training diagnostics: dead units and attention entropy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import config as config_lib
from gptjax import diagnostics as diag_lib
from gptjax import model as model_lib


def tiny_model(**overrides):
    cfg = config_lib.base_config().model
    cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size = 2, 2, 32, 16, 34
    for k, v in overrides.items():
        cfg[k] = v
    return cfg, model_lib.GPT(cfg, rngs=nnx.Rngs(0))


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
