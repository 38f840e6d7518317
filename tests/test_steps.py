"""steps.py: the optimizer switch (AdamW / Muon), train state, compiled steps.

The 8-device Muon test runs inside test_sharding.py::test_eight_device_tests
(conftest.eight_devices).
"""


import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import eight_devices, outer, small_config
from gptjax import config as config_lib
from gptjax import sharding
from gptjax import steps

def step_config(**overrides):
    c = config_lib.base_config()
    m, t = c.model, c.train
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size = 2, 4, 32, 16, 50
    t.batch_size, t.steps, t.warmup_steps, t.lr, t.grad_clip = 8, 20, 2, 3e-3, 1.0
    for key, value in overrides.items():
        section, name = key.split(".")
        c[section][name] = value
    return c


def batch(seed=0, B=8, T=16, V=50):
    tokens = np.random.default_rng(seed).integers(0, V, size=(B, T + 1))
    return jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32)


def losses_of(cfg, mesh, n=6):
    setup = steps.init_train_state(cfg, mesh)
    step = steps.make_train_step(setup, cfg)
    state, out = setup.state, []
    for i in range(n):
        x, y = (jax.device_put(a, setup.batch_sh) for a in batch(i % 2))
        state, metrics = step(state, x, y)
        out.append(float(metrics["loss"]))
    return out, state


def one_device_mesh():
    return sharding.make_mesh(config_lib.base_config().mesh, jax.devices()[:1])


SWITCHES = {
    "muon": {"train.optimizer": "muon", "train.muon_lr": 0.05},
    "rope": {"model.position": "rope"},
    "rmsnorm": {"model.norm": "rmsnorm"},
    "relu2": {"model.activation": "relu2"},
    "qk_norm": {"model.qk_norm": True},
    "softcap": {"model.logit_softcap": 15.0},
    "zero_init_proj": {"model.zero_init_proj": True},
}


@outer
@pytest.mark.parametrize("name", list(SWITCHES))
def test_each_switch_trains(name):
    cfg = step_config(**SWITCHES[name])
    config_lib.validate(cfg)
    losses, _ = losses_of(cfg, one_device_mesh(), n=12)
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[1] - 0.1, losses  # two batches, alternating: the loss falls on both


def test_muon_updates_the_blocks_matrices_and_adamw_the_rest():
    params = steps.init_params(step_config().model, 0)
    labels = jax.tree_util.tree_map_with_path(lambda p, _: steps.is_hidden_matrix(p), params)
    blocks = labels["blocks"][0]
    assert blocks["attn"]["qkv"]["kernel"] and blocks["attn"]["proj"]["kernel"]
    assert blocks["mlp"]["fc"]["kernel"] and blocks["mlp"]["proj"]["kernel"]
    assert not labels["wte"]["embedding"] and not labels["wpe"]["embedding"]
    assert not blocks["ln_1"]["scale"] and not labels["ln_f"]["scale"]

    # One Muon step moves a matrix by an orthogonalised update: all its singular values alike.
    cfg = step_config(**{"train.optimizer": "muon", "train.warmup_steps": 0, "train.grad_clip": 0.0,
                         "train.weight_decay": 0.0})
    _, state = losses_of(cfg, one_device_mesh(), n=1)
    before = steps.init_params(cfg.model, cfg.train.seed)
    delta = np.asarray(state["params"]["blocks"][0]["mlp"]["proj"]["kernel"]
                       - before["blocks"][0]["mlp"]["proj"]["kernel"])
    s = np.linalg.svd(delta, compute_uv=False)
    # Newton-Schulz leaves them within ~[0.5, 1.5] of each other (AdamW's update is far from that);
    # the last is ~0: the next LayerNorm removes the mean over features, so the gradient has no such part.
    assert s[-2] > 0.3 * s[0] and s[-1] < 1e-3 * s[0], s
    # AdamW moves each embedding entry by about lr in the first step.
    d_wte = np.abs(np.asarray(state["params"]["wte"]["embedding"] - before["wte"]["embedding"]))
    np.testing.assert_allclose(np.median(d_wte[d_wte > 0]), cfg.train.lr, rtol=0.3)


@pytest.mark.slow  # trains two Muon runs
def test_more_newton_schulz_steps_give_a_more_orthogonal_update():
    spread = {}
    for ns in (1, 5):
        cfg = step_config(**{"train.optimizer": "muon", "train.warmup_steps": 0, "train.grad_clip": 0.0,
                             "train.weight_decay": 0.0, "train.muon_ns_steps": ns})
        _, state = losses_of(cfg, one_device_mesh(), n=1)
        delta = np.asarray(state["params"]["blocks"][0]["attn"]["qkv"]["kernel"]
                           - steps.init_params(cfg.model, cfg.train.seed)["blocks"][0]["attn"]["qkv"]["kernel"])
        s = np.linalg.svd(delta, compute_uv=False)
        spread[ns] = s[-2] / s[0]  # 1 for an orthogonal update (s[-1] ~ 0: see the test above)
    assert spread[1] < 0.5 * spread[5] and spread[5] > 0.3, spread


def test_the_default_optimizer_is_unchanged_adamw():
    cfg = step_config()
    tx, _ = steps.make_optimizer(cfg.train)
    params = steps.init_params(cfg.model, 0)
    # clip + adamw: no partition, so checkpoints of earlier runs keep their optimizer-state layout.
    state = jax.eval_shape(tx.init, params)
    assert type(state[1][0]).__name__ == "ScaleByAdamState"


def test_muon_state_is_laid_out_like_the_parameters():
    cfg = step_config(**{"train.optimizer": "muon"})
    setup = steps.init_train_state(cfg, one_device_mesh(), abstract=True)
    shapes = [x.shape for x in jax.tree.leaves(setup.state["opt_state"])]
    assert (32, 96) in shapes and (50, 32) in shapes  # Muon's momentum of qkv, Adam's moments of wte


# ----------------------------------------------------------------------------- checkpoints, meshes

@outer
def test_a_muon_run_stopped_and_resumed_continues_bitwise(text_file, tmp_path):
    from gptjax.trainer import build as Run

    def cfg(workdir):
        return small_config(text_file, workdir, **{"train.optimizer": "muon", "train.steps": 12,
                                                   "train.checkpoint_every": 100, "train.steps_per_call": 1})

    straight = Run(cfg(tmp_path / "a"), str(tmp_path / "a"), quiet=True)
    straight.train()
    first = Run(cfg(tmp_path / "b"), str(tmp_path / "b"), quiet=True)
    first.train(stop_at=5)
    resumed = Run(cfg(tmp_path / "b"), str(tmp_path / "b"), quiet=True)
    assert resumed.resumed_from == 5
    resumed.train()
    for a, b in zip(jax.tree.leaves(straight.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    mu = [x for p, x in jax.tree_util.tree_leaves_with_path(resumed.state["opt_state"])
          if "mu" in jax.tree_util.keystr(p)]
    assert mu and any(np.any(np.asarray(x)) for x in mu)  # the momentum was restored, not re-zeroed


@eight_devices
@pytest.mark.parametrize("mesh", [(8, 1, 1), (2, 2, 2), (1, 4, 2)])
def test_muon_on_a_sharded_mesh_gives_the_one_device_losses(mesh):
    cfg = step_config(**{"train.optimizer": "muon", "model.n_embd": 64})
    want, _ = losses_of(cfg, one_device_mesh())
    c = step_config(**{"train.optimizer": "muon", "model.n_embd": 64})
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    m = sharding.make_mesh(c.mesh, jax.devices())
    got, state = losses_of(c, m)
    np.testing.assert_allclose(got, want, atol=1e-4)
    kernel = state["params"]["blocks"][0]["mlp"]["fc"]["kernel"]
    assert len({tuple(s.data.shape) for s in kernel.addressable_shards}) == 1
    if mesh[1] * mesh[2] > 1:
        assert kernel.addressable_shards[0].data.size < kernel.size  # really split
        mu = [x for p, x in jax.tree_util.tree_leaves_with_path(state["opt_state"])
              if "mu" in jax.tree_util.keystr(p) and x.shape == kernel.shape]
        assert mu and all(x.sharding == kernel.sharding for x in mu)


@eight_devices
@pytest.mark.parametrize("mesh", [(1, 8, 1), (2, 2, 2)])
def test_scanned_blocks_under_fsdp_gather_one_layer_at_a_time(mesh, monkeypatch):
    overrides = {"model.n_embd": 64, "model.n_layer": 4}
    want, _ = losses_of(step_config(**overrides), one_device_mesh())  # unrolled, one device
    c = step_config(**overrides, **{"model.scan_layers": True})
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    m = sharding.make_mesh(c.mesh, jax.devices())
    got, state = losses_of(c, m)
    np.testing.assert_allclose(got, want, atol=1e-4)
    kernel = state["params"]["blocks"]["mlp"]["fc"]["kernel"]  # [L, D, 4D], stored split, layer axis whole
    assert kernel.sharding.spec[0] is None and "fsdp" in kernel.sharding.spec
    assert kernel.addressable_shards[0].data.shape[0] == 4

    def compiled():
        setup = steps.init_train_state(c, m, abstract=True)
        x = jax.ShapeDtypeStruct((8, 16), jnp.int32, sharding=setup.batch_sh)
        return steps.make_train_step(setup, c).lower(setup.state, x, x).compile()

    # Only weights travel: every all-gather yields one layer's (or a non-block) weight, and no
    # activation is gathered, permuted or all-reduced. Left to XLA's propagation, the stacked
    # weights' split would spread to the activations, which then move between devices.
    def compute_shape(a, stacked):  # one device's share of a weight, FSDP gathered, tensor split kept
        spec, shape = (tuple(a.sharding.spec)[1:], a.shape[1:]) if stacked else (tuple(a.sharding.spec), a.shape)
        return tuple(NamedSharding(m, P(*(None if s == "fsdp" else s for s in spec))).shard_shape(shape))

    params = state["params"]
    weight_shapes = {compute_shape(a, k == "blocks") for k, v in params.items() for a in jax.tree.leaves(v)}
    per_layer = compiled()
    hlo = per_layer.as_text()
    gathered = {tuple(int(d) for d in dims.split(",") if d)
                for dims in re.findall(r"= f32\[([\d,]*)\]\S* all-gather\(", hlo)}
    assert gathered and gathered <= weight_shapes, gathered - weight_shapes
    assert "collective-permute" not in hlo and "all-to-all" not in hlo

    if mesh == (1, 8, 1):
        # Gathering the whole tree before the forward pass (the unrolled model's way) holds every
        # layer's full weights and gradients at once: far more temporaries than one layer at a time.
        monkeypatch.setattr(sharding, "compute_layout",
                            lambda params_sh: (sharding.compute_shardings(params_sh), None))
        whole_tree = compiled().memory_analysis().temp_size_in_bytes
        weights = 4 * 12 * 64 * 64 * 4  # the float32 blocks, unsplit
        assert whole_tree - per_layer.memory_analysis().temp_size_in_bytes > weights


def test_switching_the_optimizer_on_resume_is_refused():
    from gptjax.errors import UserError

    saved = step_config().to_dict()
    new = step_config(**{"train.optimizer": "muon"}).to_dict()
    with pytest.raises(UserError, match=r"refusing to resume.*train\.optimizer: 'adamw' -> 'muon'"):
        config_lib.check_resume_config(saved, new, True, "w")
    assert config_lib.check_resume_config(saved, step_config(**{"train.muon_lr": 0.01}).to_dict(), True, "w")
