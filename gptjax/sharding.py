"""Device mesh, partition rules, and host batches -> global arrays.

The model annotates every parameter with logical axis names; `RULES` maps
those names to mesh axes in one place. The batch is split over the
data-parallel axes.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from gptjax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# logical axis name -> mesh axis (None: replicated).
RULES = {
    "embed": None,
    "vocab": None,
    "heads": "tensor",
    "qkv": "tensor",
    "mlp": "tensor",
}


def mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
    sizes = [int(mesh_cfg[a]) for a in MESH_AXES]
    if sizes.count(-1) > 1:
        raise UserError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
    if any(s == 0 or s < -1 for s in sizes):
        raise UserError(f"mesh sizes must be positive or -1, got data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}.")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if n_devices % known:
            raise UserError(f"mesh axes multiply to {known}, which does not divide the {n_devices} devices.")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise UserError(
            f"mesh data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} = {math.prod(sizes)} devices, "
            f"but there are {n_devices} ({describe_devices()}); set one axis to -1 to use the rest."
        )
    return tuple(sizes)


def describe_devices(devices=None) -> str:
    devices = devices or jax.devices()
    kinds = sorted({d.device_kind for d in devices})
    return f"{len(devices)} x {'/'.join(kinds)} on {jax.process_count()} process(es)"


def make_mesh(mesh_cfg, devices=None) -> Mesh:
    devices = devices or jax.devices()
    shape = mesh_shape(mesh_cfg, len(devices))
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def data_parallel_size(mesh: Mesh) -> int:
    return math.prod(mesh.shape[a] for a in BATCH_AXES)


def logical_to_spec(axes) -> P:
    return P(*(RULES.get(a) if a is not None else None for a in axes))


def param_shardings(axes_tree, mesh: Mesh):
    """NamedSharding for every parameter, from its logical axis names."""
    return jax.tree.map(
        lambda axes: NamedSharding(mesh, logical_to_spec(axes)),
        axes_tree,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P(BATCH_AXES))


def stacked_batch_sharding(mesh: Mesh) -> NamedSharding:
    """For [k, B, ...] stacks of k batches: the batch axis (second) is split."""
    return NamedSharding(mesh, P(None, BATCH_AXES))


def check_batch(batch_size: int, mesh: Mesh) -> None:
    dp = data_parallel_size(mesh)
    if batch_size % dp:
        raise UserError(
            f"train.batch_size ({batch_size}) must be divisible by the data-parallel size "
            f"mesh.data x mesh.fsdp = {dp}."
        )


def to_global(batch_np: np.ndarray, mesh: Mesh, stacked: bool = False) -> jax.Array:
    """Place a host batch (the whole global batch) on the mesh, split over the batch axes."""
    return jax.device_put(batch_np, stacked_batch_sharding(mesh) if stacked else batch_sharding(mesh))
