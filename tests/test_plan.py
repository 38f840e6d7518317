"""gptjax.plan: the sharded steps lower for TPU and CUDA, and the compiled memory plan adds up.

Tests marked `eight_devices` need 8 CPU devices: they run inside
test_sharding.py::test_eight_device_tests (conftest.eight_devices).
"""

import re
import subprocess
import sys

import jax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import ROOT, eight_devices, outer
from gptjax import config as config_lib
from gptjax import plan, sharding
from gptjax.errors import UserError

MESHES = {"data8": (8, 1, 1), "fsdp8": (1, 8, 1), "data2_fsdp2_tensor2": (2, 2, 2)}

# What the partition rules must give the weights of the small model below
# (D = 64: qkv [D, 3D], attention out [D, D], MLP in [D, 4D] and out [4D, D], wte [V=128, D]).
EXPECTED = {
    "data8": {"qkv": P(), "attn_proj": P(), "fc": P(), "mlp_proj": P(), "wte": P()},
    "fsdp8": {"qkv": P(None, "fsdp"), "attn_proj": P("fsdp", None), "fc": P(None, "fsdp"),
              "mlp_proj": P("fsdp", None), "wte": P("fsdp", None)},
    "data2_fsdp2_tensor2": {"qkv": P("fsdp", "tensor"), "attn_proj": P("tensor", "fsdp"),
                            "fc": P("fsdp", "tensor"), "mlp_proj": P("tensor", "fsdp"), "wte": P("fsdp", None)},
}
WEIGHTS = {"qkv": ("attn", "qkv"), "attn_proj": ("attn", "proj"), "fc": ("mlp", "fc"), "mlp_proj": ("mlp", "proj")}


def small_cfg(mesh=(1, 1, 1), dtype="float32"):
    c = config_lib.base_config()
    m = c.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size, m.dtype = 2, 4, 64, 32, 128, dtype
    c.train.batch_size = 8
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


def _param_shardings(exported, mesh, state):
    """The exported train step's shardings of the state's parameters, by parameter path."""
    shardings = exported.in_shardings_jax(mesh)
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]  # the step's arguments, flat
    assert len(leaves) == len(shardings) - 2  # + the two batches
    return {jax.tree_util.keystr(path[1:], simple=True, separator="."): shardings[i]
            for i, (path, _) in enumerate(leaves) if path[0] == jax.tree_util.DictKey("params")}


@eight_devices
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_sharded_steps_lower_for_tpu_and_cuda(mesh_name, dtype, platform):
    from gptjax import steps

    cfg = small_cfg(MESHES[mesh_name], dtype)
    mesh = sharding.make_mesh(cfg.mesh)
    exported = plan.export_steps(cfg, mesh, platform)
    assert exported["train"].platforms == (platform,) and exported["eval"].platforms == (platform,)
    assert exported["train"].nr_devices == 8
    state = steps.init_train_state(plan.for_platform(small_cfg(MESHES[mesh_name], dtype), platform), mesh,
                                   abstract=True).state
    got = _param_shardings(exported["train"], mesh, state)
    for name, spec in EXPECTED[mesh_name].items():
        path = "wte.embedding" if name == "wte" else f"blocks.0.{'.'.join(WEIGHTS[name])}.kernel"
        ndim = 2
        assert got[path].is_equivalent_to(NamedSharding(mesh, spec), ndim), (name, got[path].spec, spec)


@eight_devices
@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("platform", ["tpu", "cuda"])
def test_scanned_steps_lower_with_the_layer_axis_replicated(mesh_name, platform):
    from gptjax import steps

    cfg = small_cfg(MESHES[mesh_name], "bfloat16")
    cfg.model.scan_layers = True
    mesh = sharding.make_mesh(cfg.mesh)
    exported = plan.export_steps(cfg, mesh, platform)
    assert exported["train"].platforms == (platform,) and exported["train"].nr_devices == 8
    if MESHES[mesh_name][1] > 1:  # FSDP: one layer's qkv kernel [D, 3D] constrained to its gathered layout
        constraints = re.findall(r"sdy.sharding_constraint %\S+ <@mesh, (\[[^\]]*\])> : tensor<64x192xf32>",
                                 exported["train"].mlir_module())
        assert constraints and any("fsdp" not in c for c in constraints), constraints
    state = steps.init_train_state(cfg, mesh, abstract=True).state  # cfg: resolved for TPU by export_steps
    got = _param_shardings(exported["train"], mesh, state)
    assert "blocks.0.attn.qkv.kernel" not in got
    for name, spec in EXPECTED[mesh_name].items():
        if name != "wte":  # stacked [n_layer, ...]: the same rule behind an unsplit layer axis
            path = f"blocks.{'.'.join(WEIGHTS[name])}.kernel"
            assert got[path].is_equivalent_to(NamedSharding(mesh, P(None, *spec)), 3), (name, got[path].spec)


@eight_devices
def test_automatic_choices_lower_where_explicit_ones_cannot():
    from gptjax import kernels

    mesh = sharding.make_mesh(small_cfg(MESHES["data8"]).mesh)
    # On a GPU, auto attention is cuDNN's fused kernel (bfloat16, head size 16) ...
    assert kernels.resolve_attention("auto", "bfloat16", 16, backend="gpu") == "cudnn"
    # ... which JAX lowers only where cuDNN is installed: not on this CPU host, so an
    # explicit cudnn choice cannot be exported for CUDA here, nor for TPU anywhere.
    assert not plan.cudnn_attention_lowers()
    for platform in ("cuda", "tpu"):
        forced = small_cfg(MESHES["data8"], "bfloat16")
        forced.model.attention = "cudnn"
        with pytest.raises(Exception, match="(?i)cudnn|cuda|gpu"):
            plan.export_steps(forced, mesh, platform)
    # The automatic choices lower: XLA's dot_product_attention and XLA matmuls on both.
    cuda = plan.for_platform(small_cfg(MESHES["data8"], "bfloat16"), "cuda")
    tpu = plan.for_platform(small_cfg(MESHES["data8"], "bfloat16"), "tpu")
    assert (cuda.model.attention, cuda.model.matmul) == ("dot_product", "xla")
    assert (tpu.model.attention, tpu.model.matmul) == ("dot_product", "xla")
    for platform in ("cuda", "tpu"):
        assert plan.export_steps(small_cfg(MESHES["data8"], "bfloat16"), mesh, platform)["train"].platforms == (platform,)


@eight_devices
def test_memory_plan_counts_the_sharded_state():
    cfg = small_cfg((1, 8, 1))
    out = plan.memory_plan(cfg, "tpu", jax.devices())
    c, h = out["compiled"], out["hand"]
    assert c["params"] == h["params"]
    assert 0 <= c["optimizer"] - h["optimizer"] <= 64  # Adam's moments, plus its step counters
    n = out["model"]["params"]
    assert n * 4 / 8 <= c["params"] <= n * 4 / 8 * 1.2  # float32 weights split 8 ways (small leaves replicated)
    assert c["arguments"] >= c["params"] + c["optimizer"] and c["temporaries"] > 0
    unsharded = plan.memory_plan(small_cfg((8, 1, 1)), "tpu", jax.devices())
    assert unsharded["compiled"]["params"] == n * 4


def test_parse_mesh():
    assert plan.parse_mesh("fsdp=8") == {"data": 1, "fsdp": 8, "tensor": 1}
    assert plan.parse_mesh("data=2,fsdp=2,tensor=2") == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(UserError, match="--mesh takes AXIS=SIZE"):
        plan.parse_mesh("fsdp8")


@outer
def test_plan_command_prints_the_table():
    proc = subprocess.run([sys.executable, "-m", "gptjax.plan", "--config", "configs/tiny.py", "--devices", "4",
                           "--mesh", "fsdp=4", "--config.model.vocab_size=65"], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mesh fsdp=4" in proc.stdout and "temporaries" in proc.stdout
