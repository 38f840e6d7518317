"""int8 weight quantization for sampling and evaluation.

Every Dense kernel and Embed table is stored as symmetric int8 with one float
scale per output channel: w ~= q * s, q = round(w / s) in [-127, 127],
s = max|w| / 127 over the channel's inputs. The int8 weights are converted in
the matmul and the scale is applied to its output, so no float copy of a
weight is kept between calls. LayerNorm parameters and biases stay float.

    model = quantize_model(model)        # swaps nnx.Linear / nnx.Embed in place
    quantized_bytes(state) / float_bytes # ~0.26 for a small GPT

"Output channel" is a kernel column ([in, out] -> out scales) and an
embedding row ([vocab, embed] -> vocab scales): a row is what a lookup
returns and what the tied output projection produces one logit from.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax.config import QUANTIZE_SCHEMES, require_choice
from gptjax.errors import UserError


def quantize_int8(w, axis: int):
    """(q int8, scale float32) with w ~= q * scale; `axis` is reduced (the inputs).

    `scale` keeps `axis` with size 1 so that it broadcasts against `q`.
    """
    w = jnp.asarray(w, jnp.float32)
    amax = jnp.max(jnp.abs(w), axis=axis, keepdims=True)
    scale = jnp.where(amax > 0, amax / 127.0, 1.0)  # an all-zero channel stays zero
    q = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
    return q, scale


def dequantize(q, scale, dtype=jnp.float32):
    return q.astype(dtype) * scale.astype(dtype)


class QuantizedLinear(nnx.Module):
    """nnx.Linear with an int8 kernel [in, out] and float scales [1, out]."""

    def __init__(self, linear: nnx.Linear):
        q, scale = quantize_int8(linear.kernel[...], axis=0)
        self.kernel = nnx.Param(q)
        self.scale = nnx.Param(scale)
        self.bias = linear.bias
        self.dtype = linear.dtype or jnp.float32

    def __call__(self, x):
        x = x.astype(self.dtype)
        # (x @ q) * s == x @ (q * s): the scale is per output column.
        y = jnp.dot(x, self.kernel[...].astype(self.dtype)) * self.scale[...][0].astype(self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class QuantizedEmbed(nnx.Module):
    """nnx.Embed with an int8 table [vocab, embed] and float scales [vocab, 1]."""

    def __init__(self, embed: nnx.Embed):
        q, scale = quantize_int8(embed.embedding[...], axis=1)
        self.embedding = nnx.Param(q)
        self.scale = nnx.Param(scale)
        self.dtype = embed.dtype or jnp.float32

    def __call__(self, ids):
        rows = jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)
        return rows * jnp.take(self.scale[...], ids, axis=0).astype(self.dtype)

    def attend(self, x):
        """x @ table^T: the tied output projection; the row scales become logit scales."""
        x = x.astype(self.dtype)
        return jnp.dot(x, self.embedding[...].T.astype(self.dtype)) * self.scale[...][:, 0].astype(self.dtype)


def quantize_model(model: nnx.Module, scheme: str = "int8") -> nnx.Module:
    """Replace every nnx.Linear and nnx.Embed below `model` by its int8 version (in place)."""
    check_scheme(scheme)
    if scheme == "none":
        return model
    if getattr(getattr(model, "cfg", None), "scan_layers", False):
        raise UserError(f"{scheme} quantization needs the per-layer model, not model.scan_layers=True: build it "
                        "with scan_layers=False and params.unstack_layers(params) (gptjax.sample does).")
    _swap(model)
    return model


def _swap(module) -> None:
    children = list(enumerate(module)) if isinstance(module, nnx.List) else list(vars(module).items())
    for name, child in children:
        if isinstance(child, nnx.Linear):
            new = QuantizedLinear(child)
        elif isinstance(child, nnx.Embed):
            new = QuantizedEmbed(child)
        else:
            if isinstance(child, nnx.Module):
                _swap(child)
            continue
        if isinstance(module, nnx.List):
            module[name] = new
        else:
            setattr(module, name, new)


def check_scheme(scheme: str) -> None:
    require_choice("--quantize", scheme, QUANTIZE_SCHEMES)


def tree_bytes(tree) -> int:
    """Bytes of every array in a pytree (of arrays or ShapeDtypeStructs)."""
    return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def describe_bytes(before: int, after: int) -> str:
    return (f"parameters {before / 2**20:.2f} MiB float -> {after / 2**20:.2f} MiB quantized "
            f"({100 * after / before:.1f}%)")
