"""The GPT decoder, in Flax NNX.

GPT -> Block x n_layer -> (CausalSelfAttention, MLP), pre-LayerNorm, as in
GPT-2 and nanoGPT. Every parameter carries `logical_axes` metadata (names such
as "embed", "heads", "mlp", "vocab"); `gptjax/sharding.py` maps those names to
mesh axes, so the model itself knows nothing about devices.

Calling the model:
  logits = model(tokens_BxT)                                  # training / eval
  logits, cache = model(tokens_BxS, cache=cache, pos=p)       # cached decoding
`cache` holds the keys and values of every layer (see `init_cache`); the call
writes positions p..p+S-1 and attends to everything before them.
`logits_at=i` (may be traced) returns only position i's logits, [B, 1, V].
Dropout takes an explicit `dropout_key`, so the train step is a pure function
of (state, batch, step).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


def dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _subkey(key, i: int):
    return None if key is None else jax.random.fold_in(key, i)


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


def _linear_kwargs(cfg) -> dict:
    """Constructor arguments every Dense layer shares: dtypes and the matmul formulation."""
    kwargs = {"dtype": DTYPES[cfg.dtype], "param_dtype": DTYPES[cfg.param_dtype]}
    if resolve_matmul(cfg.matmul) == "tokens":
        kwargs["dot_general"] = tokens_dot_general
    return kwargs


def causal_attention(q, k, v, impl: str):
    """Softmax(q k^T / sqrt(d) + causal mask) v for [B, T, H, D] inputs."""
    if impl in ("dot_product", "cudnn"):
        return jax.nn.dot_product_attention(
            q, k, v, is_causal=True, implementation="cudnn" if impl == "cudnn" else None
        )
    T = q.shape[1]
    mask = jnp.tril(jnp.ones((T, T), dtype=bool))
    return _masked_attention(q, k, v, mask)


def _masked_attention(q, k, v, mask_QxK):
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) * scale
    scores = jnp.where(mask_QxK, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v)


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        D, H = cfg.n_embd, cfg.n_head
        self.n_head, self.head_dim = H, D // H
        self.dropout_rate = cfg.dropout
        self.impl = resolve_attention(cfg.attention, cfg.dtype, self.head_dim)
        self.qkv = nnx.Linear(
            D, 3 * D, use_bias=cfg.qkv_bias, **_linear_kwargs(cfg), rngs=rngs,
            kernel_init=_normal(0.02), kernel_metadata={"logical_axes": ("embed", "qkv")},
            bias_metadata={"logical_axes": ("qkv",)},
        )
        # GPT-2: residual projections scaled by 1/sqrt(2 * n_layer).
        self.proj = nnx.Linear(
            D, D, use_bias=cfg.bias, **_linear_kwargs(cfg), rngs=rngs,
            kernel_init=_normal(0.02 / math.sqrt(2 * cfg.n_layer)),
            kernel_metadata={"logical_axes": ("heads", "embed")},
            bias_metadata={"logical_axes": ("embed",)},
        )

    def __call__(self, x_BxTxD, *, cache=None, pos=None, dropout_key=None):
        B, T, D = x_BxTxD.shape
        # Columns are head-major (head, q|k|v, head_dim): an even split of the
        # 3D outputs over the tensor axis hands each device whole heads.
        qkv = self.qkv(x_BxTxD).reshape(B, T, self.n_head, 3, self.head_dim)
        q, k, v = qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]
        if cache is None:
            y = causal_attention(q, k, v, self.impl)
        else:
            k_all = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, pos, 0, 0))
            v_all = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, pos, 0, 0))
            cache = {"k": k_all, "v": v_all}
            q_pos = pos + jnp.arange(T)
            mask = jnp.arange(k_all.shape[1])[None, :] <= q_pos[:, None]
            y = _masked_attention(q, k_all.astype(q.dtype), v_all.astype(q.dtype), mask)
        y = self.proj(y.reshape(B, T, D))
        return dropout(y, self.dropout_rate, dropout_key), cache


class MLP(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        D = cfg.n_embd
        self.fc = nnx.Linear(
            D, 4 * D, use_bias=cfg.bias, **_linear_kwargs(cfg), rngs=rngs,
            kernel_init=_normal(0.02), kernel_metadata={"logical_axes": ("embed", "mlp")},
            bias_metadata={"logical_axes": ("mlp",)},
        )
        self.proj = nnx.Linear(
            4 * D, D, use_bias=cfg.bias, **_linear_kwargs(cfg), rngs=rngs,
            kernel_init=_normal(0.02 / math.sqrt(2 * cfg.n_layer)),
            kernel_metadata={"logical_axes": ("mlp", "embed")},
            bias_metadata={"logical_axes": ("embed",)},
        )
        self.activation = cfg.activation
        self.dropout_rate = cfg.dropout

    def hidden(self, x_BxTxD):
        h = self.fc(x_BxTxD)
        # gelu: exact (erf), as nanoGPT's nn.GELU; gelu_tanh: GPT-2's tanh approximation ("gelu_new").
        return jax.nn.relu(h) if self.activation == "relu" else jax.nn.gelu(h, approximate=self.activation == "gelu_tanh")

    def __call__(self, x_BxTxD, *, dropout_key=None):
        return dropout(self.proj(self.hidden(x_BxTxD)), self.dropout_rate, dropout_key)


def _layer_norm(cfg, rngs):
    return nnx.LayerNorm(
        cfg.n_embd, epsilon=1e-5, use_bias=cfg.bias, dtype=DTYPES[cfg.dtype],
        param_dtype=DTYPES[cfg.param_dtype], rngs=rngs,
        scale_metadata={"logical_axes": ("embed",)}, bias_metadata={"logical_axes": ("embed",)},
    )


class Block(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, *, cache=None, pos=None, dropout_key=None, taps=None):
        attn_in = self.ln_1(x)
        a, cache = self.attn(attn_in, cache=cache, pos=pos, dropout_key=_subkey(dropout_key, 0))
        x = x + a
        mlp_in = self.ln_2(x)
        x = x + self.mlp(mlp_in, dropout_key=_subkey(dropout_key, 1))
        if taps is not None:  # diagnostics only; nothing is traced when taps is None
            taps.append({"attn_in": attn_in, "mlp_in": mlp_in, "out": x})
        return x, cache


def _block_forward(block, x, dropout_key):
    return block(x, dropout_key=dropout_key)[0]


class GPT(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        """`cfg` is the `model` section of the run config, with vocab_size set."""
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = ml_collections.FrozenConfigDict(cfg)  # hashable: graphdefs can be static jit args
        dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        self.wte = nnx.Embed(
            cfg.vocab_size, cfg.n_embd, dtype=dtype, param_dtype=pdtype, rngs=rngs,
            embedding_init=_normal(0.02), embedding_metadata={"logical_axes": ("vocab", "embed")},
        )
        self.wpe = nnx.Embed(
            cfg.block_size, cfg.n_embd, dtype=dtype, param_dtype=pdtype, rngs=rngs,
            embedding_init=_normal(0.02), embedding_metadata={"logical_axes": (None, "embed")},
        )
        self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = nnx.Linear(
                cfg.n_embd, cfg.vocab_size, use_bias=False, **_linear_kwargs(cfg), rngs=rngs,
                kernel_init=_normal(0.02), kernel_metadata={"logical_axes": ("embed", "vocab")},
            )

    def __call__(self, tokens_BxT, *, cache=None, pos=0, dropout_key=None, taps=None, logits_at=None):
        """`taps`: a list that gets, per block, its attention and MLP inputs and its output."""
        B, T = tokens_BxT.shape
        positions = pos + jnp.arange(T)
        x = self.wte(tokens_BxT) + self.wpe(positions)[None]
        x = dropout(x, self.cfg.dropout, _subkey(dropout_key, self.cfg.n_layer))
        new_cache = [] if cache is not None else None
        for i, block in enumerate(self.blocks):
            layer_cache = None if cache is None else cache[i]
            if self.cfg.remat and cache is None and taps is None:
                # Keep only each block's input for the backward pass; recompute the rest.
                x = nnx.remat(_block_forward)(block, x, _subkey(dropout_key, i))
                continue
            x, layer_cache = block(x, cache=layer_cache, pos=pos, dropout_key=_subkey(dropout_key, i), taps=taps)
            if cache is not None:
                new_cache.append(layer_cache)
        x = self.ln_f(x)
        if logits_at is not None:  # decoding needs one position's logits: skip the vocab projection elsewhere
            x = jax.lax.dynamic_slice_in_dim(x, logits_at, 1, axis=1)
        logits = self.wte.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        logits = logits.astype(jnp.float32)
        return logits if cache is None else (logits, new_cache)


def init_cache(cfg, batch_size: int, max_len: int | None = None, dtype=None):
    """Zeroed keys/values for every layer: [B, max_len, n_head, head_dim] each."""
    max_len = max_len or cfg.block_size
    dtype = dtype or DTYPES[cfg.dtype]
    shape = (batch_size, max_len, cfg.n_head, cfg.n_embd // cfg.n_head)
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layer)]


def param_counts(params) -> dict[str, int]:
    """Parameters per top-level module ("blocks.0", "wte", ...) from a pure dict."""
    counts: dict[str, int] = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
        name = ".".join(keys[:2]) if keys[0] == "blocks" else keys[0]
        counts[name] = counts.get(name, 0) + int(leaf.size)
    return counts


def count_params(params, exclude_embeddings: bool = False) -> int:
    counts = param_counts(params)
    total = sum(counts.values())
    if exclude_embeddings:
        total -= counts.get("wte", 0) + counts.get("wpe", 0)
    return total


def logical_axes(model: nnx.Module):
    """Pure-dict tree of each parameter's logical axis names (None = replicated)."""
    _, state = nnx.split(model)

    def axes(v):
        names = v.get_metadata().get("logical_axes") if hasattr(v, "get_metadata") else None
        return tuple(names) if names is not None else (None,) * v.value.ndim

    return nnx.to_pure_dict(jax.tree.map(axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable)))
