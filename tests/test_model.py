import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from gptjax import config as config_lib
from gptjax import model as model_lib


def tiny_model_cfg(**kw):
    c = config_lib.base_config().model
    c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size = 2, 2, 32, 16, 50
    for k, v in kw.items():
        c[k] = v
    return c


def test_causality_future_tokens_do_not_change_past_logits():
    cfg = tiny_model_cfg()
    model = model_lib.GPT(cfg, rngs=nnx.Rngs(0))
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, size=(2, cfg.block_size))
    t = 7
    x2 = x.copy()
    x2[:, t + 1:] = rng.integers(0, cfg.vocab_size, size=(2, cfg.block_size - t - 1))
    l1, l2 = model(jnp.asarray(x)), model(jnp.asarray(x2))
    np.testing.assert_allclose(l1[:, : t + 1], l2[:, : t + 1], atol=1e-6)
    assert not np.allclose(l1[:, t + 1:], l2[:, t + 1:])


def test_causality_holds_for_every_attention_implementation():
    x = jnp.asarray(np.random.default_rng(1).integers(0, 50, size=(1, 16)))
    outs = []
    for impl in ("xla", "dot_product"):
        model = model_lib.GPT(tiny_model_cfg(attention=impl), rngs=nnx.Rngs(0))
        outs.append(model(x))
    np.testing.assert_allclose(outs[0], outs[1], atol=1e-5)


def test_gpt2_initialisation_scales_residual_projections():
    cfg = tiny_model_cfg(n_layer=8, n_embd=256, n_head=4)
    model = model_lib.GPT(cfg, rngs=nnx.Rngs(0))
    std_fc = float(jnp.std(model.blocks[0].mlp.fc.kernel[...]))
    std_proj = float(jnp.std(model.blocks[0].mlp.proj.kernel[...]))
    assert abs(std_fc - 0.02) < 0.002
    assert abs(std_proj - 0.02 / np.sqrt(16)) < 0.001


def test_tied_and_untied_parameter_counts():
    tied = nnx.to_pure_dict(nnx.state(model_lib.GPT(tiny_model_cfg(), rngs=nnx.Rngs(0))))
    untied = nnx.to_pure_dict(nnx.state(model_lib.GPT(tiny_model_cfg(tie_embeddings=False), rngs=nnx.Rngs(0))))
    assert model_lib.count_params(untied) - model_lib.count_params(tied) == 50 * 32
    total = sum(x.size for x in jax.tree.leaves(tied))
    assert model_lib.count_params(tied) == total
    assert model_lib.count_params(tied, exclude_embeddings=True) == total - 50 * 32 - 16 * 32


def test_biases_are_optional():
    with_bias = nnx.to_pure_dict(nnx.state(model_lib.GPT(tiny_model_cfg(bias=True, qkv_bias=True), rngs=nnx.Rngs(0))))
    no_bias = nnx.to_pure_dict(nnx.state(model_lib.GPT(tiny_model_cfg(), rngs=nnx.Rngs(0))))
    assert "bias" in with_bias["blocks"][0]["attn"]["qkv"]
    assert "bias" not in no_bias["blocks"][0]["attn"]["qkv"]
    assert "bias" not in no_bias["ln_f"]


def test_tiny_model_overfits_one_batch():
    cfg = tiny_model_cfg(activation="relu")
    model = model_lib.GPT(cfg, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    params = nnx.to_pure_dict(state)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, size=(4, cfg.block_size + 1)))
    x, y = tokens[:, :-1], tokens[:, 1:]
    tx = optax.adam(3e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p)(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, g = jax.value_and_grad(loss_fn)(params)
        upd, opt = tx.update(g, opt, params)
        return optax.apply_updates(params, upd), opt, loss

    for _ in range(300):
        params, opt, loss = step(params, opt)
    assert float(loss) < 0.05, float(loss)


def test_dropout_is_active_only_with_a_key():
    cfg = tiny_model_cfg(dropout=0.5)
    model = model_lib.GPT(cfg, rngs=nnx.Rngs(0))
    x = jnp.zeros((1, 16), jnp.int32)
    np.testing.assert_array_equal(model(x), model(x))
    a = model(x, dropout_key=jax.random.key(0))
    b = model(x, dropout_key=jax.random.key(1))
    assert not np.allclose(a, b)
