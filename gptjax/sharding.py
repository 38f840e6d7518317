"""Device mesh, partition rules, multi-host start, and host batches -> global arrays.

The model annotates every parameter with logical axis names; `RULES` maps
those names to mesh axes in one place, and `param_spec` adds FSDP on top:

  tensor  Megatron-style: attention heads (the fused qkv output, the rows of
          the output projection) and the MLP hidden dimension are split, so
          each device computes whole heads and a slice of the MLP.
  fsdp    every parameter (and, through `opt_state_shardings`, its Adam
          moments) is split along its largest dimension not already split,
          which fsdp divides; it is gathered for compute (`compute_layout`):
          the whole tree before the forward pass, or with stacked blocks
          one layer at a time inside the scan.
  data    replicas; the batch is split over data x fsdp.

The train step is one `jax.jit` with these shardings as in/out shardings; the
same code runs on 1 device, 8 TPU cores, or a multi-host pod.
"""

from __future__ import annotations

import math
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.errors import UserError
from gptjax.params import is_per_layer

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (None: replicated). FSDP is not a rule of
# its own: `param_spec` puts it on whichever dimension is largest.
RULES = {
    "embed": None,
    "vocab": None,
    "heads": "tensor",
    "qkv": "tensor",
    "mlp": "tensor",
    "layers": None,  # the stacked blocks' leading axis (model.scan_layers): every device runs every layer
}


# ----------------------------------------------------------------------------- mesh

def mesh_shape(mesh_cfg, n_devices: int, devices=None) -> tuple[int, int, int]:
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UserError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes must be positive or -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise UserError(
                f"mesh axes multiply to {known}, which does not divide the {n_devices} devices "
                f"({describe_devices(devices)})."
            )
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise UserError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but there are {n_devices} ({describe_devices(devices)}); set one axis to -1 to use the rest."
        )
    return tuple(sizes)


def describe_devices(devices=None) -> str:
    devices = devices or jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{len(devices)} x {'/'.join(kinds)} on {jax.process_count()} process(es)"


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    """The (data, fsdp, tensor) mesh over `devices` (default: all devices of all processes).

    `jax.make_mesh` orders the devices by the hardware's topology (on TPU,
    tensor groups on neighbouring chips); the axes are Auto, so XLA
    propagates shardings between the ones we pin.
    """
    devices = list(devices or jax.devices())
    shape = mesh_shape(mesh_cfg, len(devices), devices)
    return jax.make_mesh(shape, MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES),
                         devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(batch_size: int, mesh: Mesh) -> None:
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise UserError(
            f"train.batch_size ({batch_size}) must be divisible by the data-parallel size "
            f"mesh.data x mesh.fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']} = {dp}; "
            f"use e.g. --config.train.batch_size={max(1, round(batch_size / dp)) * dp}."
        )


def check_model(model_cfg, mesh: Mesh) -> None:
    """Tensor parallelism splits whole heads: n_head must divide evenly."""
    t = mesh.shape["tensor"]
    if model_cfg.n_head % t:
        raise UserError(
            f"model.n_head ({model_cfg.n_head}) must be divisible by mesh.tensor ({t}): "
            "tensor parallelism gives each device whole attention heads."
        )


# ----------------------------------------------------------------------------- parameters

def logical_to_spec(axes) -> P:
    return P(*(RULES.get(a) if a is not None else None for a in axes))


def param_spec(axes, shape, mesh: Mesh) -> P:
    """Mesh axes of one parameter: tensor from RULES, then fsdp on its largest free dimension."""
    spec = []
    for name, size in zip(axes, shape):
        axis = RULES.get(name) if name is not None else None
        if axis is not None and (mesh.shape[axis] == 1 or size % mesh.shape[axis]):
            axis = None  # a size-1 axis splits nothing; keep the spec plain
        spec.append(axis)
    n = mesh.shape["fsdp"]
    if n > 1:
        free = [i for i, (a, name) in enumerate(zip(spec, axes))
                if a is None and name != "layers" and shape[i] % n == 0]
        if free:  # too small to split (e.g. a 65-token vocabulary by 8): stays replicated
            spec[max(free, key=lambda i: shape[i])] = "fsdp"
    return P(*spec)


def param_shardings(axes_tree, mesh: Mesh, shapes=None):
    """NamedSharding for every parameter, from its logical axis names and shape.

    `shapes` is a matching tree of arrays or ShapeDtypeStructs; FSDP needs it
    to find each parameter's largest dimension.
    """
    is_axes = lambda x: isinstance(x, tuple)
    if shapes is None:
        if mesh.shape["fsdp"] > 1:
            raise ValueError("param_shardings needs the parameter shapes when mesh.fsdp > 1")
        return jax.tree.map(lambda axes: NamedSharding(mesh, logical_to_spec(axes)), axes_tree, is_leaf=is_axes)
    return jax.tree.map(
        lambda axes, x: NamedSharding(mesh, param_spec(axes, x.shape, mesh)), axes_tree, shapes, is_leaf=is_axes
    )


def compute_shardings(params_sh):
    """The layout the forward and backward passes use: FSDP shards gathered, tensor shards kept.

    Gathering the weights explicitly (ZeRO-3) keeps activations split over
    the batch; left to itself, XLA's propagation would instead split
    activations the way the stored weights are split and then replicate them
    to fix the mismatch, using several times the memory of plain data
    parallelism. Gradients of the gathered weights are reduce-scattered back
    to the stored layout by the optimizer update.
    """
    return jax.tree.map(lambda s: NamedSharding(s.mesh, P(*(None if a == "fsdp" else a for a in s.spec))),
                        params_sh)


def compute_layout(params_sh):
    """How the forward and backward passes see the weights: (tree shardings, per-layer gather or None).

    Unrolled blocks (or no FSDP): the whole tree is constrained to
    `compute_shardings` before the forward pass, so every weight is gathered
    at once. Stacked blocks (`model.scan_layers`) under FSDP stay in their
    stored, sharded layout; the returned function, which the scanned body
    applies to one layer's slice, gathers that layer just before its block
    runs (and, inside the block's checkpoint, again in the backward pass),
    and its transpose reduce-scatters that layer's gradient inside the loop.
    A device then holds one layer's full weights at a time instead of the
    whole model's (ZeRO-3).
    """
    gathered = compute_shardings(params_sh)
    blocks = params_sh.get("blocks") if isinstance(params_sh, dict) else None
    if not isinstance(blocks, dict) or is_per_layer(blocks) or jax.tree.leaves(blocks)[0].mesh.shape["fsdp"] == 1:
        return gathered, None  # unrolled blocks, or nothing to gather
    assert all(s.spec[:1] in ((), (None,)) for s in jax.tree.leaves(blocks)), "the layer axis is never split"
    layer_stored = jax.tree.map(lambda s: NamedSharding(s.mesh, P(*s.spec[1:])), blocks)
    layer_gathered = compute_shardings(layer_stored)

    def gather_layer(layer_params):
        layer_params = jax.lax.with_sharding_constraint(layer_params, layer_stored)
        return jax.lax.with_sharding_constraint(layer_params, layer_gathered)

    return {**gathered, "blocks": blocks}, gather_layer


def opt_state_shardings(tx, abstract_params, params_sh, mesh: Mesh):
    """Optimizer state laid out like the parameters; scalars such as the step count replicated.

    A state leaf whose key path ends in a parameter's path, with that
    parameter's shape, takes its sharding (Adam's mu and nu, Muon's momentum,
    also inside `optax.partition`, whose per-group states hold only their
    group's parameters); anything else is replicated.
    """
    names = lambda path: tuple(str(k) for k in path)
    by_path = {names(path): (sh, shape.shape) for (path, sh), shape in zip(
        jax.tree_util.tree_leaves_with_path(params_sh, is_leaf=lambda x: isinstance(x, NamedSharding)),
        jax.tree.leaves(abstract_params))}

    def leaf_sharding(path, leaf):
        path = names(path)
        for i in range(len(path)):
            sh, shape = by_path.get(path[i:], (None, None))
            if sh is not None and shape == leaf.shape:
                return sh
        return replicated(mesh)

    return jax.tree_util.tree_map_with_path(leaf_sharding, jax.eval_shape(tx.init, abstract_params))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


# ----------------------------------------------------------------------------- batches

def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """For [k, B, ...] stacks of k batches: the batch axis (second) is split."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def process_rows(mesh: Mesh, global_batch: int) -> np.ndarray:
    """Rows of the global batch that live on this process's devices, in the
    order `jax.make_array_from_process_local_data` expects them."""
    index_map = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    spans = sorted({idx[0].indices(global_batch)[:2] for idx in index_map.values()})
    return np.concatenate([np.arange(a, b) for a, b in spans])


def to_global(batch_np: np.ndarray, mesh: Mesh, global_batch: int | None = None, stacked: bool = False) -> jax.Array:
    """A global array split over the batch axes, from this process's rows.

    `batch_np` holds the rows `process_rows` names (each process loads only
    its share), or the whole global batch (then this process keeps its rows).
    `stacked`: a [k, B, ...] stack of k batches, split along its second axis.
    """
    axis = 1 if stacked else 0
    global_batch = global_batch or batch_np.shape[axis]
    if batch_np.shape[axis] == global_batch and jax.process_count() > 1:
        batch_np = np.take(batch_np, process_rows(mesh, global_batch), axis=axis)
    global_shape = list(batch_np.shape)
    global_shape[axis] = global_batch
    sh = stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh)
    return jax.make_array_from_process_local_data(sh, batch_np, tuple(global_shape))


# ----------------------------------------------------------------------------- multi-host

def _cluster_is_multiprocess() -> bool:
    """A launcher that started several processes of this run (SLURM, Open MPI, a TPU pod)."""
    env = os.environ
    for key in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if key in env and env[key].isdigit() and int(env[key]) > 1:
            return True
    return "," in env.get("TPU_WORKER_HOSTNAMES", "") or int(env.get("MEGASCALE_NUM_SLICES", "1") or 1) > 1


def initialize_distributed(mode: str = "auto", coordinator_address: str | None = None,
                           num_processes: int | None = None, process_id: int | None = None) -> bool:
    """Start `jax.distributed` when the run spans several processes; True if it did.

    mode "auto": with the three explicit flags, or when a SLURM / Open MPI /
    TPU-pod launcher started several processes (JAX then reads the rest from
    the environment); "on": always (let JAX detect the cluster); "off": never.
    Must run before anything touches a device.
    """
    explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
                "--process_id": process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if given and len(given) < 3:
        missing = [k for k in explicit if k not in given]
        raise UserError(
            f"{', '.join(given)} given without {', '.join(missing)}: a multi-process run needs all three "
            "(or none, on a TPU pod or under SLURM, where they are detected)."
        )
    if given:
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise UserError(f"--process_id must be in [0, --num_processes={num_processes}), got {process_id}.")
        if ":" not in coordinator_address:
            raise UserError(f"--coordinator_address must be HOST:PORT (of process 0), got {coordinator_address!r}.")
    if mode == "off" or (mode == "auto" and not given and not _cluster_is_multiprocess()):
        if given:
            raise UserError("--distributed=off contradicts --coordinator_address/--num_processes/--process_id.")
        return False
    # CPU-only processes exchange collectives over gloo (TPU and GPU use their own fabric).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id)
    except (ValueError, RuntimeError) as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(
            f"could not start jax.distributed ({first_line}); outside a TPU pod or SLURM/MPI job give "
            "--coordinator_address, --num_processes and --process_id, or use --distributed=off."
        ) from None
    return True


def is_main_process() -> bool:
    return jax.process_index() == 0


def sync(name: str) -> None:
    """Barrier across processes (a no-op in a single-process run)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
