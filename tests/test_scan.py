"""model.scan_layers: the stacked, scanned blocks compute what the unrolled blocks compute.

The scanned model is built from the same seed as the unrolled one (its
weights are the unrolled weights, stacked), or from the unrolled model's
params through `stack_layers`; either way the logits, losses, gradients,
cached decoding and diagnostics must agree.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from gptjax import diagnostics as diag_lib
from gptjax import model as model_lib
from gptjax import params as params_lib
from gptjax import steps
from gptjax.errors import UserError

KW = dict(n_layer=3, n_head=4, n_embd=32, block_size=16, vocab_size=50)


def _pair(**kw):
    """(unrolled model, scanned model with the unrolled model's weights * 5, so layers differ visibly)."""
    per_layer = model_lib.GPT(model_lib.ModelConfig(**KW, **kw), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(per_layer)
    params = jax.tree.map(lambda p: p * 5.0 if p.ndim >= 2 else p, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    per_layer = nnx.merge(graphdef, state)
    scanned_def = nnx.graphdef(nnx.eval_shape(
        lambda: model_lib.GPT(model_lib.ModelConfig(**KW, **kw, scan_layers=True), rngs=nnx.Rngs(0))))
    return per_layer, nnx.merge(scanned_def, params_lib.stack_layers(params)), params


def _tokens(seed=0, B=2):
    return jax.random.randint(jax.random.key(seed), (B, KW["block_size"]), 0, KW["vocab_size"])


def test_same_seed_gives_the_unrolled_weights_stacked():
    a = nnx.to_pure_dict(nnx.state(model_lib.GPT(model_lib.ModelConfig(**KW), rngs=nnx.Rngs(7))))
    b = nnx.to_pure_dict(nnx.state(model_lib.GPT(model_lib.ModelConfig(**KW, scan_layers=True), rngs=nnx.Rngs(7))))
    assert b["blocks"]["attn"]["qkv"]["kernel"].shape == (3, 32, 96)
    jax.tree.map(np.testing.assert_array_equal, params_lib.stack_layers(a), b)
    assert not np.allclose(a["blocks"][0]["attn"]["qkv"]["kernel"], a["blocks"][1]["attn"]["qkv"]["kernel"])


@pytest.mark.parametrize("kw", [{}, {"remat": True}, {"dropout": 0.3}, {"dropout": 0.3, "remat": True},
                                {"scan_unroll": 2, "dropout": 0.3}])  # 2 blocks per iteration of 3 layers
def test_scan_gives_the_unrolled_logits_losses_and_gradients(kw):
    per_layer, scanned, params = _pair(**kw)
    x, y = _tokens(0), _tokens(1)
    key = jax.random.key(3) if kw.get("dropout") else None  # the same key per layer as unrolled
    np.testing.assert_allclose(scanned(x, dropout_key=key), per_layer(x, dropout_key=key), atol=1e-5)
    loss_grad = lambda m, p: jax.value_and_grad(steps.loss_fn, argnums=1)(nnx.graphdef(m), p, x, y, key)
    la, ga = loss_grad(per_layer, params)
    lb, gb = loss_grad(scanned, params_lib.stack_layers(params))
    np.testing.assert_allclose(lb, la, rtol=1e-6)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, atol=1e-5), params_lib.unstack_layers(gb), ga)


def _stacked_residuals(**kw):
    """Per-token float counts of what the forward scan of a training gradient stacks for the backward."""
    _, scanned, params = _pair(**kw)
    graphdef = nnx.graphdef(scanned)
    x, y = _tokens(0), _tokens(1)
    jaxpr = jax.make_jaxpr(jax.grad(lambda p: steps.loss_fn(graphdef, p, x, y)))(params_lib.stack_layers(params))
    forward = next(e for e in jaxpr.eqns if e.primitive.name == "scan")
    B, T = x.shape
    ys = forward.outvars[forward.params["num_carry"]:]
    assert all(v.aval.shape[:2] == (KW["n_layer"], B) for v in ys), [v.aval.shape for v in ys]
    return sorted(int(np.prod(v.aval.shape[2:])) // T for v in ys)


def test_scanned_training_stacks_only_the_saved_activations():
    # Left to autodiff, the scan stacks 20-odd intermediates per layer (LayerNorm and GELU pieces, a
    # copy of each weight); model.SAVED_ACTIVATIONS keeps the block input, q|k|v, the attention
    # scores, the attention output, the mid-block residual and the MLP pre-activation.
    D, H, T = KW["n_embd"], KW["n_head"], KW["block_size"]
    assert _stacked_residuals() == sorted([D, 3 * D, H * T, D, D, 4 * D])
    assert _stacked_residuals(remat=True) == [D]  # full remat: the block input alone


def test_scan_policy_keeps_cudnn_attention_residuals():
    # cuDNN's fused attention returns its own residuals; recomputing them would run the kernel twice.
    from jax._src.cudnn import fused_attention_stablehlo as cudnn

    assert model_lib._scan_policy(cudnn._dot_product_attention_fwd_p_wrapper)
    assert not model_lib._scan_policy(jax.lax.exp_p)


def test_scan_unroll_sets_the_blocks_per_iteration():
    for unroll in (1, 2):
        _, scanned, _ = _pair(scan_unroll=unroll)
        graphdef, state = nnx.split(scanned)
        jaxpr = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, _tokens(0))
        scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
        assert [(e.params["length"], e.params["unroll"]) for e in scans] == [(3, unroll)]


def test_scan_is_causal():
    _, scanned, _ = _pair()
    x = _tokens(0)
    x2 = x.at[:, 8:].set((x[:, 8:] + 1) % KW["vocab_size"])
    l1, l2 = scanned(x), scanned(x2)
    np.testing.assert_allclose(l1[:, :8], l2[:, :8], atol=1e-6)
    assert not np.allclose(l1[:, 8:], l2[:, 8:])


@pytest.mark.slow  # eager decoding, one compile per call
def test_cached_decoding_with_scan_equals_recomputation():
    per_layer, scanned, _ = _pair()
    x = _tokens(2)
    cache = model_lib.init_cache(scanned.cfg, 2)
    assert cache["k"].shape == (3, 2, KW["block_size"], 4, 8)  # stacked [n_layer, B, S, H, K]
    logits, cache = scanned(x[:, :5], cache=cache, pos=0)
    np.testing.assert_allclose(logits, scanned(x[:, :5]), atol=1e-5)
    for t in range(5, 9):
        logits, cache = scanned(x[:, t:t + 1], cache=cache, pos=t)
        np.testing.assert_allclose(logits[:, 0], per_layer(x[:, :t + 1])[:, t], atol=1e-5)


def test_decode_loop_with_scan_matches_the_unrolled_model():
    from gptjax import decode as decode_lib

    per_layer, scanned, params = _pair()
    prompt = np.asarray(_tokens(4, B=1)[0, :4])
    outs = [decode_lib.generate_ids(nnx.graphdef(m), p, prompt, 0, 6, temperature=1e-3)
            for m, p in ((per_layer, params), (scanned, params_lib.stack_layers(params)))]
    np.testing.assert_array_equal(outs[0], outs[1])


def test_diagnostics_with_scan_equal_the_unrolled_ones():
    per_layer, scanned, params = _pair(activation="relu")
    x = _tokens(5)
    a, b = diag_lib.forward_stats(per_layer, x), diag_lib.forward_stats(scanned, x)
    assert set(a) == set(b) and "diag/attn_entropy/blocks.2" in b
    for k in a:
        np.testing.assert_allclose(b[k], a[k], rtol=1e-4, atol=1e-6, err_msg=k)
    assert not nnx.state(scanned, nnx.Intermediate) and scanned.blocks.record is False
    tx = optax.adam(1e-3)
    step_a = diag_lib.make_diagnostics_step(nnx.graphdef(per_layer), tx)
    step_b = diag_lib.make_diagnostics_step(nnx.graphdef(scanned), tx)
    stacked = params_lib.stack_layers(params)
    da = step_a({"params": params, "opt_state": tx.init(params)}, x, x)
    db = step_b({"params": stacked, "opt_state": tx.init(stacked)}, x, x)
    assert set(da) == set(db) and "diag/grad_norm/blocks.1" in db
    for k in da:
        np.testing.assert_allclose(db[k], da[k], rtol=1e-4, atol=1e-6, err_msg=k)


def test_layout_round_trip_of_params_and_optimizer_state():
    _, _, params = _pair()
    tx = steps.make_optimizer(_train_cfg())[0]
    opt_state = tx.update(jax.tree.map(jnp.ones_like, params), tx.init(params), params)[1]  # non-zero moments
    stacked = params_lib.stack_layers((params, opt_state))
    assert jax.tree.structure(stacked[1]) == jax.tree.structure(tx.init(stacked[0]))  # a valid stacked state
    back = params_lib.unstack_layers(stacked)
    jax.tree.map(np.testing.assert_array_equal, back, (params, opt_state))
    assert params_lib.stack_layers(stacked) is not None
    jax.tree.map(np.testing.assert_array_equal, params_lib.stack_layers(stacked), stacked)  # already stacked: as is
    jax.tree.map(np.testing.assert_array_equal, params_lib.unstack_layers(back), back)


def test_layout_conversion_of_restore_targets_moves_the_sharding():
    mesh = jax.make_mesh((1,), ("fsdp",), devices=jax.devices()[:1])
    sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, None, "fsdp"))
    stacked = {"blocks": {"w": jax.ShapeDtypeStruct((3, 4, 8), jnp.float32, sharding=sh)}}
    per_layer = params_lib.unstack_layers(stacked)
    assert sorted(per_layer["blocks"]) == [0, 1, 2]
    assert per_layer["blocks"][1]["w"].shape == (4, 8)
    assert tuple(per_layer["blocks"][1]["w"].sharding.spec) == (None, "fsdp")
    again = params_lib.stack_layers(per_layer)["blocks"]["w"]
    assert again.shape == (3, 4, 8) and tuple(again.sharding.spec) == (None, None, "fsdp")


def test_param_counts_report_each_layer():
    per_layer, scanned, _ = _pair(bias=True)
    a = params_lib.param_counts(nnx.to_pure_dict(nnx.state(per_layer)))
    b = params_lib.param_counts(nnx.to_pure_dict(nnx.state(scanned)))
    assert a == b and "blocks.2" in b and "blocks.3" not in b
    axes = params_lib.logical_axes(scanned)["blocks"]
    assert axes["attn"]["qkv"]["kernel"] == ("layers", "embed", "qkv")  # the layer axis: never split
    assert axes["ln_1"]["scale"] == ("layers", "embed")


def test_int8_quantization_of_a_scanned_model_is_one_clear_error():
    from gptjax import quantize as quantize_lib

    _, scanned, _ = _pair()
    with pytest.raises(UserError, match="per-layer model"):
        quantize_lib.quantize_model(scanned, "int8")


def _train_cfg():
    from gptjax import config as config_lib

    t = config_lib.base_config().train
    t.steps, t.warmup_steps, t.lr = 10, 2, 1e-2
    return t


@pytest.mark.slow  # trains both layouts end to end
def test_a_few_train_steps_with_scan_match_the_unrolled_run():
    from gptjax import config as config_lib
    from gptjax import sharding

    losses = {}
    for scan in (False, True):
        cfg = config_lib.base_config()
        m = cfg.model
        m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.scan_layers = 3, 4, 32, 16, 50, scan
        m.dropout = 0.1
        cfg.train.batch_size, cfg.train.steps, cfg.train.warmup_steps = 4, 5, 1
        mesh = sharding.make_mesh(cfg.mesh, jax.devices()[:1])
        setup = steps.init_train_state(cfg, mesh)
        step = steps.make_train_step(setup, cfg)
        state, out = setup.state, []
        for i in range(5):
            x = jax.random.randint(jax.random.key(i), (4, 16), 0, 50)
            state, metrics = step(state, x, (x + 1) % 50)
            out.append(float(metrics["loss"]))
        losses[scan] = out
        params = state["params"]
    assert losses[True][-1] < losses[True][0]
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-5)
    assert params["blocks"]["mlp"]["fc"]["kernel"].shape == (3, 32, 128)


@pytest.mark.slow  # trains, samples, exports and resumes a scanned run in-process
def test_a_scanned_run_samples_exports_and_resumes_unrolled(text_file, tmp_path):
    from conftest import load_params, small_config
    from gptjax import convert
    from gptjax.sample import Generator
    from gptjax.trainer import build
    from gptjax.workdir import load_run

    cfg = small_config(text_file, tmp_path / "run", **{"model.scan_layers": True, "train.steps": 4,
                                                       "train.checkpoint_every": 4, "train.eval_every": 4})
    build(cfg, cfg.workdir, quiet=True).train()
    saved, step = load_params(cfg.workdir)
    assert step == 4 and sorted(saved["blocks"]) == ["0", "1"]  # on disk: per layer

    run = load_run(cfg.workdir)  # the scanned model, stacked from the per-layer checkpoint
    assert run.params["blocks"]["mlp"]["fc"]["kernel"].shape[0] == 2
    out = Generator(run).samples("Fi", max_new_tokens=8, temperature=1e-3, seed=0)[0]
    assert out.startswith("Fi") and len(out) == 10

    convert.export_hf(cfg.workdir, str(tmp_path / "hf"), log=lambda *_: None)
    convert.import_hf(str(tmp_path / "hf"), str(tmp_path / "back"), log=lambda *_: None)
    back = load_run(str(tmp_path / "back"))
    per_layer = params_lib.unstack_layers(jax.device_get(run.params))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), per_layer,
                 jax.device_get(back.params))

    cfg.model.scan_layers, cfg.train.steps = False, 6  # scan_layers is a free key on resume
    cfg.train.allow_config_change = True  # for the longer schedule
    resumed = build(cfg, cfg.workdir, quiet=True)
    assert resumed.start == 4
    resumed.train()
    assert load_params(cfg.workdir)[1] == 6
