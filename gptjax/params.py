"""The parameter tree: its per-layer and stacked layouts, module names, counts and logical axes.

Pure functions of a params tree (arrays or ShapeDtypeStructs) or of a model;
no I/O. The model (`model.py`) defines what the tree holds; everything that
reports on it, lays it out or converts it comes here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

EMBEDDINGS = ("wte", "wpe")  # looked up, not multiplied (but a tied wte is also the output projection)


# ----------------------------------------------------------------------------- layouts
# Per-layer: tree["blocks"] = {0: block tree, 1: ...} (the unrolled model, and every checkpoint
# on disk). Stacked: tree["blocks"] = one block tree whose leaves have a leading [n_layer] axis
# (scan_layers). The functions convert every {"blocks": ...} found in a tree (params, Adam's
# moments inside an optimizer state, sown activations), leave other leaves alone, and return a
# tree already in the asked layout unchanged. Leaves may be arrays or ShapeDtypeStructs (restore
# targets: their NamedSharding loses or gains the replicated layer axis).

def is_per_layer(blocks) -> bool:
    return isinstance(blocks, dict) and bool(blocks) and all(isinstance(k, int) for k in blocks)


def _with_blocks(tree, convert):
    has_blocks = lambda x: isinstance(x, dict) and "blocks" in x
    return jax.tree.map(lambda x: {**x, "blocks": convert(x["blocks"])} if has_blocks(x) else x,
                        tree, is_leaf=has_blocks)


def _layer_of(x, i: int):
    if isinstance(x, jax.ShapeDtypeStruct):
        sh = x.sharding
        if isinstance(sh, jax.sharding.NamedSharding):
            sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(*tuple(sh.spec)[1:]))
        return jax.ShapeDtypeStruct(x.shape[1:], x.dtype, sharding=sh)
    return x[i]


def _stack(*xs):
    x = xs[0]
    if isinstance(x, jax.ShapeDtypeStruct):
        sh = x.sharding
        if isinstance(sh, jax.sharding.NamedSharding):
            sh = jax.sharding.NamedSharding(sh.mesh, jax.sharding.PartitionSpec(None, *tuple(sh.spec)))
        return jax.ShapeDtypeStruct((len(xs), *x.shape), x.dtype, sharding=sh)
    return jnp.stack(xs)


def stack_layers(tree):
    """Per-layer -> stacked layout (see above)."""
    def convert(blocks):
        if not is_per_layer(blocks):
            return blocks
        return jax.tree.map(_stack, *[blocks[i] for i in sorted(blocks)])

    return _with_blocks(tree, convert)


def unstack_layers(tree):
    """Stacked -> per-layer layout (see above)."""
    def convert(blocks):
        if is_per_layer(blocks):
            return blocks
        n = jax.tree.leaves(blocks)[0].shape[0]
        return {i: jax.tree.map(lambda x: _layer_of(x, i), blocks) for i in range(n)}

    return _with_blocks(tree, convert)


def module_name(path) -> str:
    """A parameter's module for reports: "blocks.3" inside block 3, else the top-level name ("wte", "ln_f")."""
    parts = jax.tree_util.keystr(tuple(path), simple=True, separator=".").split(".")
    return ".".join(parts[:2]) if parts[0] == "blocks" else parts[0]


def param_counts(params) -> dict[str, int]:
    """Parameters per module (`module_name`) of a params tree; a stacked block counts per layer."""
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = module_name(path)
        per_layer = [(name, int(leaf.size))]
        if name.startswith("blocks.") and not name[len("blocks."):].isdigit():  # stacked [n_layer, ...]
            n = leaf.shape[0]
            per_layer = [(f"blocks.{i}", int(leaf.size) // n) for i in range(n)]
        for key, size in per_layer:
            counts[key] = counts.get(key, 0) + size
    return counts


def count_params(params, exclude_embeddings: bool = False) -> int:
    counts = param_counts(params)
    total = sum(counts.values())
    if exclude_embeddings:
        total -= sum(counts.get(k, 0) for k in EMBEDDINGS)
    return total


def logical_axes(model: nnx.Module):
    """Pure-dict tree of each parameter's logical axis names (None = replicated)."""
    _, state = nnx.split(model)

    def axes(v):
        names = v.get_metadata().get("logical_axes")
        return tuple(names) if names is not None else (None,) * v.value.ndim

    return nnx.to_pure_dict(jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
