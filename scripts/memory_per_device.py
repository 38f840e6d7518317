"""Memory per device of a model under data parallelism, FSDP and tensor parallelism.

    python scripts/memory_per_device.py                  # GPT-2 124M on 8 devices
    python scripts/memory_per_device.py --devices 64 --compile

For each mesh it adds up, from the partition rules in gptjax/sharding.py, the
bytes one device holds of the float32 parameters, their gradients and Adam's
two moments. With --compile it also compiles the real train step for 8 (or
--devices) virtual CPU devices and prints what XLA reports: arguments (the
sharded train state and the batch) and temporaries (activations, gathered
weights, gradients), for a global batch of --batch_per_device x --devices
sequences of --block_size tokens (tensor parallelism gives each data-parallel
group more sequences, each split across the group's devices).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import types

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, default=8)
    p.add_argument("--n_layer", type=int, default=12)
    p.add_argument("--n_head", type=int, default=12)
    p.add_argument("--n_embd", type=int, default=768)
    p.add_argument("--block_size", type=int, default=1024)
    p.add_argument("--vocab_size", type=int, default=50257)
    p.add_argument("--batch_per_device", type=int, default=8)
    p.add_argument("--compile", action="store_true", help="also compile the train step and print XLA's figures")
    return p.parse_args()


def meshes(n: int):
    out = [("data parallel", (n, 1, 1)), ("FSDP", (1, n, 1))]
    if n >= 4:
        out.append(("data x FSDP", (2, n // 2, 1)))
        out.append(("FSDP x tensor", (1, n // 2, 2)))
    return out


def main():
    args = parse_args()
    if args.compile:  # virtual devices must exist before JAX starts
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + f" --xla_force_host_platform_device_count={args.devices}")
    import jax
    from flax import nnx

    from gptjax import config as config_lib
    from gptjax import model as model_lib
    from gptjax import sharding

    cfg = config_lib.base_config()
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd = args.n_layer, args.n_head, args.n_embd
    m.block_size, m.vocab_size = args.block_size, args.vocab_size
    abstract = nnx.eval_shape(lambda: model_lib.GPT(m, rngs=nnx.Rngs(0)))
    params = nnx.to_pure_dict(nnx.state(abstract))
    axes = model_lib.logical_axes(abstract)
    n_params = sum(math.prod(p.shape) for p in jax.tree.leaves(params))
    print(f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, vocab {m.vocab_size}, "
          f"block {m.block_size}: {n_params:,} parameters; {args.devices} devices")
    print(f"{'mesh':<16} {'data,fsdp,tensor':<17} {'params':>9} {'grads':>9} {'adam':>9} {'total':>9}   (MiB per device, float32)")

    is_axes = lambda x: isinstance(x, tuple)
    for name, shape in meshes(args.devices):
        mesh = types.SimpleNamespace(shape=dict(zip(sharding.MESH_AXES, shape)))

        def shard_elems(ax, p):
            spec = sharding.param_spec(ax, p.shape, mesh)
            return math.prod(d // (mesh.shape[a] if a else 1) for d, a in zip(p.shape, tuple(spec) + (None,) * 9))

        elems = sum(jax.tree.leaves(jax.tree.map(shard_elems, axes, params, is_leaf=is_axes)))
        mib = elems * 4 / 2**20
        print(f"{name:<16} {str(shape):<17} {mib:9.1f} {mib:9.1f} {2 * mib:9.1f} {4 * mib:9.1f}")

    if args.compile:
        compile_report(args, cfg, abstract, params, axes)


def compile_report(args, cfg, abstract, params, axes):
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from gptjax import sharding
    from gptjax.train import make_optimizer, make_train_step

    cfg.train.batch_size = args.batch_per_device * args.devices
    print(f"\nXLA (CPU backend) for one train step, global batch {cfg.train.batch_size} x {args.block_size} tokens "
          f"({args.batch_per_device} sequences per device under pure data parallelism or FSDP):")
    print(f"{'mesh':<16} {'arguments':>10} {'temporaries':>12} {'total':>10}   (MiB per device)")
    graphdef = nnx.graphdef(abstract)
    tx, _ = make_optimizer(cfg.train)
    for name, shape in meshes(args.devices):
        cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = shape
        mesh = sharding.make_mesh(cfg.mesh)
        params_sh = sharding.param_shardings(axes, mesh, params)
        opt_sh = sharding.opt_state_shardings(tx, params, params_sh, mesh)
        scalar_sh, batch_sh = sharding.replicated(mesh), sharding.batch_sharding(mesh)
        state_sh = {"params": params_sh, "opt_state": opt_sh, "step": scalar_sh}
        abstract_opt = jax.eval_shape(tx.init, params)
        state = {"params": params, "opt_state": abstract_opt, "step": jax.ShapeDtypeStruct((), jnp.int32)}
        state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)
        batch = jax.ShapeDtypeStruct((cfg.train.batch_size, args.block_size), jnp.int32, sharding=batch_sh)
        step = make_train_step(graphdef, tx, 0, 0.0, state_sh, batch_sh, scalar_sh)
        mem = step.lower(state, batch, batch).compile().memory_analysis()
        arg, tmp = mem.argument_size_in_bytes / 2**20, mem.temp_size_in_bytes / 2**20
        print(f"{name:<16} {arg:10.1f} {tmp:12.1f} {arg + tmp:10.1f}", flush=True)


if __name__ == "__main__":
    main()
