"""`python -m gptjax.plan --config configs/openwebtext.py:gpt2 --devices 8 --mesh fsdp=8`

Proves a big run before anyone pays for it, from a CPU:

- `export_steps` lowers the real train and eval steps, built exactly as a
  run builds them, for TPU or CUDA with `jax.export` (no such device needed).
- `memory_plan` compiles the train step for N virtual CPU devices from
  abstract inputs (`jax.ShapeDtypeStruct`: nothing is allocated) and reports
  what XLA's own memory analysis of the sharded program says one device
  needs, next to the figure added up by hand from the partition rules.

The virtual devices exist only if XLA_FLAGS says so before JAX starts; the
command line sets it from --devices.
"""

from __future__ import annotations

import json
import math
import os
import sys

from absl import app, flags

_CONFIG_FILE = "configs/openwebtext.py"
PLATFORM_BACKENDS = {"tpu": "tpu", "cuda": "gpu", "rocm": "gpu", "cpu": "cpu"}


def cudnn_attention_lowers() -> bool:
    """Whether cuDNN's fused attention can be lowered for CUDA here.

    JAX checks the installed cuDNN when it lowers that kernel, so on a
    machine without one (any CPU-only host) a CUDA program that uses it
    cannot be exported, though it lowers on the GPU itself.
    """
    import jax
    import jax.numpy as jnp

    q = jax.ShapeDtypeStruct((1, 8, 1, 8), jnp.bfloat16)
    f = jax.jit(lambda q: jax.nn.dot_product_attention(q, q, q, is_causal=True, implementation="cudnn"))
    try:
        f.trace(q).lower(lowering_platforms=("cuda",))
    except Exception:  # noqa: BLE001 - any failure means: not here
        return False
    return True


def for_platform(cfg, platform: str):
    """`cfg` with the `auto` implementation choices resolved for `platform` (not for this machine).

    On a GPU, `auto` attention is cuDNN's fused kernel where it applies; where
    cuDNN cannot be lowered (exporting from a host without it), the CUDA
    program uses XLA's `dot_product_attention` instead, which always lowers.
    """
    from gptjax import kernels

    backend = PLATFORM_BACKENDS[platform]
    m = cfg.model
    with cfg.unlocked():
        auto = m.attention == "auto"
        m.attention = kernels.resolve_attention(m.attention, m.dtype, m.n_embd // m.n_head, backend)
        if auto and m.attention == "cudnn" and not cudnn_attention_lowers():
            m.attention = "dot_product"
        m.matmul = kernels.resolve_matmul(m.matmul, backend)
    return cfg


def abstract_batch(setup, batch_size: int, block_size: int):
    import jax
    import jax.numpy as jnp

    return jax.ShapeDtypeStruct((batch_size, block_size), jnp.int32, sharding=setup.batch_sh)


def export_steps(cfg, mesh, platform: str) -> dict:
    """{"train": Exported, "eval": Exported} of the run's steps, lowered for `platform`."""
    from jax import export

    from gptjax import steps

    cfg = for_platform(cfg, platform)
    setup = steps.init_train_state(cfg, mesh, abstract=True)
    x = abstract_batch(setup, cfg.train.batch_size, cfg.model.block_size)
    train = steps.make_train_step(setup, cfg)
    evaluate = steps.make_eval_step(setup)
    return {
        "train": export.export(train, platforms=[platform])(setup.state, x, x),
        "eval": export.export(evaluate, platforms=[platform])(setup.state["params"], x, x),
    }


def shard_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (the largest shard of each leaf)."""
    import jax

    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def hand_bytes(setup) -> dict:
    """Per-device bytes added up from the partition rules: weights, their gradients, Adam's two moments."""
    params = shard_bytes(setup.state["params"])
    return {"params": params, "grads": params, "optimizer": 2 * params, "total": 4 * params}


def memory_plan(cfg, platform: str = "tpu", devices=None) -> dict:
    """Compile the train step of `cfg` on the CPU devices and report XLA's per-device memory analysis."""
    import time

    from gptjax import params as params_lib
    from gptjax import sharding, steps

    cfg = for_platform(cfg, platform)
    mesh = sharding.make_mesh(cfg.mesh, devices)
    sharding.check_batch(cfg.train.batch_size, mesh)
    sharding.check_model(cfg.model, mesh)
    setup = steps.init_train_state(cfg, mesh, abstract=True)
    x = abstract_batch(setup, cfg.train.batch_size, cfg.model.block_size)
    t0 = time.perf_counter()
    compiled = steps.make_train_step(setup, cfg).lower(setup.state, x, x).compile()
    compile_s = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    hand = hand_bytes(setup)
    m = cfg.model
    out = {
        "model": {"n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "block_size": m.block_size,
                  "vocab_size": m.vocab_size, "dtype": m.dtype, "remat": m.remat,
                  "params": params_lib.count_params(setup.state["params"])},
        "platform_choices": {"platform": platform, "attention": m.attention, "matmul": m.matmul},
        "mesh": dict(mesh.shape), "batch_size": cfg.train.batch_size, "compile_s": round(compile_s, 2),
        "compiled": {
            "params": shard_bytes(setup.state["params"]),
            "optimizer": shard_bytes(setup.state["opt_state"]),
            "batch": 2 * shard_bytes(x),
            "arguments": mem.argument_size_in_bytes,
            "outputs_not_aliased": mem.output_size_in_bytes - mem.alias_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
        },
        "hand": hand,
    }
    c = out["compiled"]
    c["total"] = c["arguments"] + c["outputs_not_aliased"] + c["temporaries"]
    return out


def fits(plan: dict, device_bytes: float) -> bool:
    return plan["compiled"]["total"] <= device_bytes


def format_plan(p: dict) -> list[str]:
    gib = lambda b: f"{b / 2**30:8.2f} GiB"
    c, h, m = p["compiled"], p["hand"], p["model"]
    mesh = " x ".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1) or "1 device"
    return [
        f"model: {m['params']:,} parameters ({m['n_layer']} layers, {m['n_embd']} wide, context {m['block_size']}), "
        f"{m['dtype']}, remat {'on' if m['remat'] else 'off'}; mesh {mesh}; global batch {p['batch_size']}; "
        f"choices for {p['platform_choices']['platform']}: attention {p['platform_choices']['attention']}, "
        f"matmul {p['platform_choices']['matmul']}; compiled in {p['compile_s']} s",
        "per device         compiled (XLA)       by hand (rules)",
        f"  parameters      {gib(c['params'])}         {gib(h['params'])}",
        f"  optimizer       {gib(c['optimizer'])}         {gib(h['optimizer'])}",
        f"  gradients       (in temporaries)     {gib(h['grads'])}",
        f"  batch           {gib(c['batch'])}",
        f"  temporaries     {gib(c['temporaries'])}   (gradients, activations, gathered weights)",
        f"  total           {gib(c['total'])}         {gib(h['total'])} (no activations)",
    ]


def parse_mesh(text: str) -> dict:
    """"fsdp=8" or "data=2,fsdp=2,tensor=2" -> mesh sizes (axes not named: 1)."""
    from gptjax import sharding
    from gptjax.errors import UserError

    sizes = {a: 1 for a in sharding.MESH_AXES}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in sizes or not value.isdigit() or int(value) < 1:
            raise UserError(f"--mesh takes AXIS=SIZE[,AXIS=SIZE] with axes {', '.join(sharding.MESH_AXES)}; "
                            f"got {text!r}.")
        sizes[name] = int(value)
    return sizes


def _define_flags():
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", _CONFIG_FILE, "Run config file (optionally FILE:SIZE).")
    flags.DEFINE_integer("devices", 8, "Virtual CPU devices to compile for (the run's device count).")
    flags.DEFINE_string("mesh", None, "AXIS=SIZE[,...], e.g. fsdp=8 or data=2,fsdp=2,tensor=2; "
                        "default: the config's mesh.")
    flags.DEFINE_enum("platform", "tpu", list(PLATFORM_BACKENDS), "Whose automatic implementation choices to use.")
    flags.DEFINE_integer("vocab_size", 0, "Vocabulary when the config takes it from its tokenizer "
                         "(default: GPT-2's 50257 for gpt2 tokenizers).")
    flags.DEFINE_boolean("json", False, "Print one JSON object instead of the table.")


def main(argv):
    from gptjax.errors import UserError, exit_with

    FLAGS = flags.FLAGS
    try:
        if len(argv) > 1:
            raise UserError(f"unexpected arguments {argv[1:]}; config keys go as --config.SECTION.KEY=VALUE.")
        if FLAGS.devices < 1:
            raise UserError(f"--devices must be >= 1, got {FLAGS.devices}.")
        cfg = FLAGS.config
        from gptjax import config as config_lib

        config_lib.validate(cfg)
        with cfg.unlocked():
            if FLAGS.mesh:
                for axis, size in parse_mesh(FLAGS.mesh).items():
                    cfg.mesh[axis] = size
            if not cfg.model.vocab_size:
                cfg.model.vocab_size = FLAGS.vocab_size or (50257 if cfg.data.tokenizer == "gpt2" else
                                                            cfg.data.vocab_size or 256)
        import jax

        out = memory_plan(cfg, FLAGS.platform, jax.devices()[:FLAGS.devices])
        print(json.dumps(out) if FLAGS.json else "\n".join(format_plan(out)), flush=True)
    except UserError as e:
        exit_with(e)


def run_main():
    # Before JAX starts: the virtual devices, on the CPU only.
    n = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--devices=")), None)
    if n is None and "--devices" in sys.argv[:-1]:
        n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={n or 8}").strip()
    from gptjax import config as config_lib

    config_lib.find_config_files(sys.argv, default=_CONFIG_FILE)
    _define_flags()
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))


if __name__ == "__main__":
    run_main()
