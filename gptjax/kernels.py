"""Backend-specific pieces of the model, and how `auto` chooses between them.

- Attention: our own XLA formulation (`xla`, explicit probabilities, the
  CPU choice), `jax.nn.dot_product_attention` (`dot_product`, TPU), or its
  cuDNN fused kernel (`cudnn`, GPU with 16-bit inputs).
- Dense layers on CPU: `tokens_dot_general`, whose backward pass runs as
  plain 2-D matmuls over [tokens, features] (BENCHMARKS.md).

Shapes: B batch, T (or Q/K) positions, H heads, D head size.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name


def resolve_attention(impl: str, dtype: str, head_dim: int, backend: str | None = None) -> str:
    """The attention implementation `model.attention='auto'` stands for.

    GPU: cuDNN's fused flash attention, which needs 16-bit inputs and a head
    size that is a multiple of 8 up to 128; XLA's `dot_product_attention`
    otherwise. TPU: `dot_product_attention`. CPU: our own XLA formulation,
    which measured faster there than `dot_product_attention` (BENCHMARKS.md).
    """
    if impl != "auto":
        return impl
    backend = backend or jax.default_backend()
    if backend == "gpu":
        return "cudnn" if dtype == "bfloat16" and head_dim % 8 == 0 and head_dim <= 128 else "dot_product"
    return "dot_product" if backend == "tpu" else "xla"


def resolve_matmul(impl: str, backend: str | None = None) -> str:
    """The Dense-layer formulation `model.matmul='auto'` stands for: "tokens" on CPU, "xla" elsewhere."""
    if impl != "auto":
        return impl
    return "tokens" if (backend or jax.default_backend()) == "cpu" else "xla"


# ----------------------------------------------------------------------------- attention

def attention_probs(q_BxQxHxD, k_BxKxHxD, mask_QxK):
    """softmax(q k^T / sqrt(D)) over the keys the mask allows, in float32: [B, H, Q, K]."""
    scale = 1.0 / math.sqrt(q_BxQxHxD.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q_BxQxHxD, k_BxKxHxD).astype(jnp.float32) * scale
    scores = jnp.where(mask_QxK, scores, jnp.finfo(jnp.float32).min)
    # Named for the scanned blocks' checkpoint policy (model.SAVED_ACTIVATIONS); an identity otherwise.
    return jax.nn.softmax(checkpoint_name(scores, "attn_scores"), axis=-1)


def attend(probs_BxHxQxK, v_BxKxHxD):
    """The probability-weighted sum of values: [B, Q, H, D]."""
    return jnp.einsum("bhqk,bkhd->bqhd", probs_BxHxQxK.astype(v_BxKxHxD.dtype), v_BxKxHxD)


def causal_mask(T: int):
    return jnp.tril(jnp.ones((T, T), dtype=bool))


def causal_attention(q, k, v, impl: str):
    """Softmax(q k^T / sqrt(d) + causal mask) v for [B, T, H, D] inputs, by implementation `impl`."""
    if impl in ("dot_product", "cudnn"):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn" if impl == "cudnn" else None
        )
    return attend(attention_probs(q, k, causal_mask(q.shape[1])), v)


# ----------------------------------------------------------------------------- CPU matmul

@jax.custom_vjp
def _tokens_matmul(x, w):
    return jnp.dot(x, w)


def _tokens_matmul_fwd(x, w):
    return jnp.dot(x, w), (x, w)


def _tokens_matmul_bwd(res, g):
    # Both gradients as plain 2-D matmuls over [tokens, features]: dx = g w^T and
    # dw = x^T g. Autodiff reaches the same products through the [B, T, .]
    # shapes, for which XLA's CPU backend picks slower layouts (BENCHMARKS.md).
    x, w = res
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dx = jax.lax.dot_general(g2, w, (((1,), (1,)), ((), ())))
    dw = jax.lax.dot_general(x2, g2, (((0,), (0,)), ((), ())))
    return dx.reshape(x.shape).astype(x.dtype), dw.astype(w.dtype)


_tokens_matmul.defvjp(_tokens_matmul_fwd, _tokens_matmul_bwd)


def tokens_dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None,
                       out_sharding=None):
    """`jax.lax.dot_general` for nnx.Linear, with the backward pass of `_tokens_matmul`.

    Only a Dense layer's contraction (last input axis with the kernel's first,
    no batch axes, default precision) takes the hand-written backward pass;
    anything else goes to `jax.lax.dot_general` unchanged.
    """
    (lhs_c, rhs_c), (lhs_b, rhs_b) = dimension_numbers
    dense = (tuple(lhs_c) == (lhs.ndim - 1,) and tuple(rhs_c) == (0,) and rhs.ndim == 2
             and not lhs_b and not rhs_b and lhs.dtype == rhs.dtype)
    if dense and precision is None and preferred_element_type is None and out_sharding is None:
        return _tokens_matmul(lhs, rhs)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type, out_sharding=out_sharding)
