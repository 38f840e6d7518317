"""int8 weight quantization: exact dequantization maths, every weight matrix covered, size and accuracy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gptjax import model as model_lib
from gptjax import quantize as q
from gptjax import decode
from gptjax.errors import UserError


from test_model import tiny_model_cfg as model_cfg


def test_int8_round_trip_error_is_at_most_half_a_step_per_channel():
    w = jax.random.normal(jax.random.key(0), (64, 24)) * jnp.linspace(0.01, 3.0, 24)  # very different columns
    w = w.at[:, 5].set(0.0)  # an all-zero channel
    qw, scale = q.quantize_int8(w, axis=0)
    assert qw.dtype == jnp.int8 and scale.shape == (1, 24)
    assert int(jnp.max(jnp.abs(qw.astype(jnp.int32)))) == 127
    err = jnp.abs(q.dequantize(qw, scale) - w)
    assert bool(jnp.all(err <= scale / 2 + 1e-7))
    assert bool(jnp.all(q.dequantize(qw, scale)[:, 5] == 0))


def test_every_dense_and_embedding_is_replaced_and_the_matmul_is_exact():
    cfg = model_cfg(tie_embeddings=False, bias=True)
    model = model_lib.GPT(cfg, rngs=nnx.Rngs(0))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 50, (2, 16)))
    ref = model(x)
    lin = model.blocks[0].mlp.fc
    h = jax.random.normal(jax.random.key(1), (3, 32))
    qmodel = q.quantize_model(model)
    kinds = {type(m) for _, m in nnx.iter_modules(qmodel)}
    assert nnx.Linear not in kinds and nnx.Embed not in kinds
    assert {q.QuantizedLinear, q.QuantizedEmbed} <= kinds
    qlin = qmodel.blocks[0].mlp.fc
    dense = q.dequantize(qlin.kernel[...], qlin.scale[...])
    np.testing.assert_allclose(qlin(h), h @ dense + lin.bias[...], atol=1e-5)
    out = qmodel(x)
    assert not np.allclose(out, ref, atol=1e-7)  # it really runs on the int8 weights
    np.testing.assert_allclose(out, ref, atol=0.02)


def test_int8_weights_are_at_most_30_percent_of_float32_on_the_tiny_shakespeare_shape():
    cfg = model_cfg(n_layer=4, n_head=4, n_embd=128, block_size=64, vocab_size=65)  # configs/tiny.py
    def build(scheme):
        abstract = nnx.eval_shape(lambda: q.quantize_model(model_lib.GPT(cfg, rngs=nnx.Rngs(0)), scheme))
        return q.tree_bytes(nnx.to_pure_dict(nnx.state(abstract)))
    before, after = build("none"), build("int8")
    assert after <= 0.30 * before, (after, before)
    assert after >= 0.25 * before  # 1 byte per weight + float scales and LayerNorms


def test_quantized_model_generates_with_the_cache_like_recomputation():
    cfg = model_cfg()
    model = q.quantize_model(model_lib.GPT(cfg, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    P, n_new = 3, 20
    window, s = decode.request([4, 8, 15], 1, cfg.block_size, n_new, temperature=0.0, top_k=0, top_p=1.0)
    a = decode.generate(graphdef, params, window, P, jax.random.key(0), s, n_new=n_new, use_cache=True)[0]
    b = decode.generate(graphdef, params, window, P, jax.random.key(0), s, n_new=n_new, use_cache=False)[0]
    np.testing.assert_array_equal(a, b)


def test_unknown_scheme_is_a_clear_error():
    with pytest.raises(UserError, match="--quantize must be one of none, int8"):
        q.check_scheme("int4")
