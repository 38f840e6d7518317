"""The GPT decoder, in Flax NNX.

GPT -> Block x n_layer -> (CausalSelfAttention, MLP), pre-LayerNorm, as in
GPT-2 and nanoGPT. Switches (all off by default, which is GPT-2) swap in the
pieces of the modded-nanogpt recipe: rotary positions (`position="rope"`),
RMSNorm (`norm="rmsnorm"`), ReLU^2 (`activation="relu2"`), RMS-normalised
queries and keys (`qk_norm`), tanh soft-capped logits (`logit_softcap`) and
zero-initialised residual projections (`zero_init_proj`).

Every parameter carries `logical_axes` metadata (names such as "embed",
"heads", "mlp", "vocab"); `gptjax/sharding.py` maps those names to mesh axes,
so the model itself knows nothing about devices.

Shapes in names: B batch, T positions, D n_embd, H n_head, K head size
(D / H), F the MLP's hidden width (4 D), V vocabulary.

Calling the model:
  logits = model(tokens_BxT)                                  # training / eval
  logits, cache = model(tokens_BxS, cache=cache, pos=p)       # cached decoding
`cache` holds the keys and values of every layer (see `init_cache`); the call
writes positions p..p+S-1 and attends to everything before them.
`logits_at=i` (may be traced) returns only position i's logits, [B, 1, V].
`gather_layer` (scan_layers with FSDP; see `sharding.compute_layout`) maps
each layer's weights to their compute layout inside the scanned body.
Dropout takes an explicit `dropout_key`, so the train step is a pure function
of (state, batch, step).

Diagnostics: after `model.set_attributes(record=True)`, a forward pass under
`nnx.capture(model, nnx.Intermediate)` sows, per block, the attention
probabilities it used (`attn_probs`), the MLP's hidden activations
(`mlp_hidden`) and the block's output (`out`). With `record=False` (always,
in training) nothing is sown.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx, traverse_util

from jax.ad_checkpoint import checkpoint_name

from gptjax import kernels

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The `model` section of a run config, typed and frozen (hashable: graphdefs are static jit args)."""

    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    vocab_size: int
    dropout: float = 0.0
    bias: bool = False  # biases in Dense layers and LayerNorms
    qkv_bias: bool = False  # biases in the query/key/value projection
    tie_embeddings: bool = True  # output projection = token embedding^T
    activation: str = "gelu"
    dtype: str = "float32"  # compute dtype
    param_dtype: str = "float32"  # master weights
    attention: str = "auto"  # kernels.resolve_attention
    matmul: str = "auto"  # kernels.resolve_matmul
    remat: bool = False
    scan_layers: bool = False  # blocks as one stacked Block run under a scan (see GPT)
    scan_unroll: int = 1  # scan_layers: blocks per scan iteration (the compiled body holds this many)
    position: str = "learned"  # learned (a wpe table) | rope (rotary q/k, no wpe)
    rope_base: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    qk_norm: bool = False  # RMSNorm of each head's q and k before attention
    logit_softcap: float = 0.0  # logits = c * tanh(logits / c); 0: off
    zero_init_proj: bool = False  # residual output projections start at zero

    @classmethod
    def of(cls, section) -> "ModelConfig":
        """From a config's `model` section (ConfigDict or dict); keys this class does not know are ignored."""
        if isinstance(section, cls):
            return section
        d = section.to_dict() if hasattr(section, "to_dict") else dict(section)
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head


def _normal(std: float):
    return nnx.initializers.normal(stddev=std)


def dropout(x, rate: float, key):
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(key, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def _subkey(key, i: int):
    return None if key is None else jax.random.fold_in(key, i)


def _linear(cfg: ModelConfig, d_in: int, d_out: int, axes: tuple, *, rngs, use_bias: bool, std: float = 0.02,
            init=None):
    """A Dense layer with the run's dtypes, matmul formulation and logical axes."""
    kwargs = {"dtype": DTYPES[cfg.dtype], "param_dtype": DTYPES[cfg.param_dtype]}
    if kernels.resolve_matmul(cfg.matmul) == "tokens":
        kwargs["dot_general"] = kernels.tokens_dot_general
    return nnx.Linear(d_in, d_out, use_bias=use_bias, kernel_init=init or _normal(std), rngs=rngs,
                      kernel_metadata={"logical_axes": axes}, bias_metadata={"logical_axes": axes[1:]}, **kwargs)


def _residual_proj(cfg: ModelConfig, d_in: int, axes: tuple, *, rngs):
    """A projection back into the residual stream: GPT-2 scales its init by 1/sqrt(2 n_layer)."""
    init = nnx.initializers.zeros_init() if cfg.zero_init_proj else None
    return _linear(cfg, d_in, cfg.n_embd, axes, rngs=rngs, use_bias=cfg.bias,
                   std=0.02 / math.sqrt(2 * cfg.n_layer), init=init)


def _layer_norm(cfg: ModelConfig, rngs):
    """The block and final norm: LayerNorm (GPT-2) or RMSNorm (scale only, no mean, no bias)."""
    dtypes = {"dtype": DTYPES[cfg.dtype], "param_dtype": DTYPES[cfg.param_dtype]}
    if cfg.norm == "rmsnorm":
        return nnx.RMSNorm(cfg.n_embd, epsilon=1e-5, rngs=rngs, scale_metadata={"logical_axes": ("embed",)},
                           **dtypes)
    return nnx.LayerNorm(
        cfg.n_embd, epsilon=1e-5, use_bias=cfg.bias, rngs=rngs,
        scale_metadata={"logical_axes": ("embed",)}, bias_metadata={"logical_axes": ("embed",)}, **dtypes,
    )


def rope(x_BxTxHxK, positions_T, base: float):
    """Rotary position embedding: each (i, i + K/2) pair of q or k rotated by angle pos * base^(-2i/K).

    Rotating q and k by their own positions makes q.k depend on the distance
    between them only, so the KV cache stores rotated keys and a decode step
    rotates its query at its absolute position `pos`.
    """
    half = x_BxTxHxK.shape[-1] // 2
    freqs = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions_T.astype(jnp.float32)[:, None] * freqs[None]  # [T, K/2]
    cos, sin = jnp.cos(angles)[None, :, None], jnp.sin(angles)[None, :, None]
    x1, x2 = x_BxTxHxK[..., :half].astype(jnp.float32), x_BxTxHxK[..., half:].astype(jnp.float32)
    out = jnp.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)
    return out.astype(x_BxTxHxK.dtype)


def split_qkv(qkv_BxTx3D, n_head: int):
    """The fused projection's output -> q, k, v, each [B, T, H, K].

    Columns are head-major (head, q|k|v, head size): an even split of the 3D
    outputs over the tensor axis hands each device whole heads. Everything
    that reads q, k or v from the fused weights goes through this function.
    """
    B, T, three_D = qkv_BxTx3D.shape
    qkv = qkv_BxTx3D.reshape(B, T, n_head, 3, three_D // (3 * n_head))
    return qkv[:, :, :, 0], qkv[:, :, :, 1], qkv[:, :, :, 2]


class CausalSelfAttention(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D = cfg.n_embd
        self.n_head = cfg.n_head
        self.dropout_rate = cfg.dropout
        self.impl = kernels.resolve_attention(cfg.attention, cfg.dtype, cfg.head_dim)
        self.record = False
        self.rope_base = cfg.rope_base if cfg.position == "rope" else None
        self.qkv = _linear(cfg, D, 3 * D, ("embed", "qkv"), rngs=rngs, use_bias=cfg.qkv_bias)
        # Per-head scales over the head size: small, replicated on every device.
        qk_norm = lambda: nnx.RMSNorm(cfg.head_dim, epsilon=1e-5, dtype=DTYPES[cfg.dtype],
                                      param_dtype=DTYPES[cfg.param_dtype], rngs=rngs,
                                      scale_metadata={"logical_axes": (None,)})
        self.q_norm = qk_norm() if cfg.qk_norm else None
        self.k_norm = qk_norm() if cfg.qk_norm else None
        self.proj = _residual_proj(cfg, D, ("heads", "embed"), rngs=rngs)

    def __call__(self, x_BxTxD, *, cache=None, pos=None, dropout_key=None):
        B, T, D = x_BxTxD.shape
        q, k, v = split_qkv(checkpoint_name(self.qkv(x_BxTxD), "qkv"), self.n_head)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rope_base is not None:  # before the cache: it stores keys rotated at their positions
            positions = (0 if pos is None else pos) + jnp.arange(T)
            q, k = rope(q, positions, self.rope_base), rope(k, positions, self.rope_base)
        if cache is None and not self.record:
            y = checkpoint_name(kernels.causal_attention(q, k, v, self.impl), "attn_ctx")
        else:
            if cache is None:
                mask = kernels.causal_mask(T)
            else:
                k = jax.lax.dynamic_update_slice(cache["k"], k.astype(cache["k"].dtype), (0, pos, 0, 0))
                v = jax.lax.dynamic_update_slice(cache["v"], v.astype(cache["v"].dtype), (0, pos, 0, 0))
                cache = {"k": k, "v": v}
                mask = jnp.arange(k.shape[1])[None, :] <= (pos + jnp.arange(T))[:, None]
                k, v = k.astype(q.dtype), v.astype(q.dtype)
            probs = kernels.attention_probs(q, k, mask)
            if self.record:
                self.sow(nnx.Intermediate, "attn_probs", probs)
            y = kernels.attend(probs, v)
        y = self.proj(y.reshape(B, T, D))
        return dropout(y, self.dropout_rate, dropout_key), cache


# One function per `config.ACTIVATIONS` entry (a test checks the two agree).
ACTIVATION_FNS = {
    "gelu": lambda h: jax.nn.gelu(h, approximate=False),  # exact (erf), as nanoGPT's nn.GELU
    "gelu_tanh": lambda h: jax.nn.gelu(h, approximate=True),  # GPT-2's own ("gelu_new" in transformers)
    "relu": jax.nn.relu,
    "relu2": lambda h: jnp.square(jax.nn.relu(h)),  # ReLU^2 (Primer; modded-nanogpt)
}


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D = cfg.n_embd
        self.fc = _linear(cfg, D, 4 * D, ("embed", "mlp"), rngs=rngs, use_bias=cfg.bias)
        self.proj = _residual_proj(cfg, 4 * D, ("mlp", "embed"), rngs=rngs)
        self.activation = cfg.activation
        self.dropout_rate = cfg.dropout
        self.record = False

    def __call__(self, x_BxTxD, *, dropout_key=None):
        h_BxTxF = ACTIVATION_FNS[self.activation](checkpoint_name(self.fc(x_BxTxD), "mlp_pre"))
        if self.record:
            self.sow(nnx.Intermediate, "mlp_hidden", h_BxTxF)
        return dropout(self.proj(h_BxTxF), self.dropout_rate, dropout_key)


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.ln_1 = _layer_norm(cfg, rngs)
        self.attn = CausalSelfAttention(cfg, rngs=rngs)
        self.ln_2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs=rngs)
        self.record = False

    def __call__(self, x, *, cache=None, pos=None, dropout_key=None):
        a, cache = self.attn(self.ln_1(x), cache=cache, pos=pos, dropout_key=_subkey(dropout_key, 0))
        x = checkpoint_name(x + a, "resid_mid")
        x = x + self.mlp(self.ln_2(x), dropout_key=_subkey(dropout_key, 1))
        if self.record:
            self.sow(nnx.Intermediate, "out", x)
        return x, cache


def _block_forward(block, x, dropout_key):
    return block(x, dropout_key=dropout_key)[0]


# What a scanned block keeps for its backward pass, per layer (the `checkpoint_name`s above, ~12 D
# floats per token): its input (kept by the scan), the fused q|k|v projection, the masked attention
# scores, the attention output, the residual stream after attention and the MLP pre-activation.
# The norms, the activation function and the softmax are recomputed from these in the backward pass.
SAVED_ACTIVATIONS = ("qkv", "attn_scores", "attn_ctx", "resid_mid", "mlp_pre")


def _scan_policy(prim, *args, **params) -> bool:
    """`jax.checkpoint` policy of the scanned training block: the named activations, plus cuDNN's
    fused attention outputs (its own residuals: recomputing them would run the kernel twice)."""
    if prim.name.startswith("dot_product_attention_fwd"):
        return True
    return jax.checkpoint_policies.save_only_these_names(*SAVED_ACTIVATIONS)(prim, *args, **params)


def _stacked_blocks(cfg: ModelConfig, rngs: nnx.Rngs) -> Block:
    """One Block whose every parameter has a leading [n_layer] axis (logical name "layers": never split).

    The layers are built one by one from the same `rngs`, in the unrolled
    model's order, so the stacked weights equal the unrolled model's.
    """
    layers = [Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)]
    graphdef, state = nnx.split(layers[0])

    def stack(*vs):
        axes = vs[0].get_metadata().get("logical_axes") or (None,) * vs[0].value.ndim
        return vs[0].replace(jnp.stack([v.value for v in vs]), logical_axes=("layers", *axes))

    states = [state] + [nnx.state(b) for b in layers[1:]]
    return nnx.merge(graphdef, jax.tree.map(stack, *states, is_leaf=lambda x: isinstance(x, nnx.Variable)))


class GPT(nnx.Module):
    def __init__(self, cfg, *, rngs: nnx.Rngs):
        """`cfg`: a ModelConfig, or the `model` section of a run config with vocab_size set."""
        cfg = ModelConfig.of(cfg)
        if cfg.vocab_size < 1:
            raise ValueError("model.vocab_size must be set (from the tokenizer) before building the model")
        self.cfg = cfg
        dtype, pdtype = DTYPES[cfg.dtype], DTYPES[cfg.param_dtype]
        self.wte = nnx.Embed(
            cfg.vocab_size, cfg.n_embd, dtype=dtype, param_dtype=pdtype, rngs=rngs,
            embedding_init=_normal(0.02), embedding_metadata={"logical_axes": ("vocab", "embed")},
        )
        self.wpe = nnx.Embed(
            cfg.block_size, cfg.n_embd, dtype=dtype, param_dtype=pdtype, rngs=rngs,
            embedding_init=_normal(0.02), embedding_metadata={"logical_axes": (None, "embed")},
        ) if cfg.position == "learned" else None  # rope: positions enter in the attention
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs)
        else:
            self.blocks = nnx.List([Block(cfg, rngs=rngs) for _ in range(cfg.n_layer)])
        self.ln_f = _layer_norm(cfg, rngs)
        if not cfg.tie_embeddings:
            self.lm_head = _linear(cfg, cfg.n_embd, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, use_bias=False)

    def __call__(self, tokens_BxT, *, cache=None, pos=0, dropout_key=None, logits_at=None, gather_layer=None):
        B, T = tokens_BxT.shape
        x = self.wte(tokens_BxT)
        if self.wpe is not None:
            x = x + self.wpe(pos + jnp.arange(T))[None]
        x = dropout(x, self.cfg.dropout, _subkey(dropout_key, self.cfg.n_layer))
        if self.cfg.scan_layers:
            x, new_cache = self._scan_blocks(x, cache, pos, dropout_key, gather_layer)
        else:
            x, new_cache = self._loop_blocks(x, cache, pos, dropout_key)
        x = self.ln_f(x)
        if logits_at is not None:  # decoding needs one position's logits: skip the vocab projection elsewhere
            x = jax.lax.dynamic_slice_in_dim(x, logits_at, 1, axis=1)
        logits = self.wte.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        logits = logits.astype(jnp.float32)
        if self.cfg.logit_softcap > 0:  # bounded logits: |logit| < cap
            logits = self.cfg.logit_softcap * jnp.tanh(logits / self.cfg.logit_softcap)
        return logits if cache is None else (logits, new_cache)

    def _loop_blocks(self, x, cache, pos, dropout_key):
        new_cache = [] if cache is not None else None
        for i, block in enumerate(self.blocks):
            if self.cfg.remat and cache is None and not block.record:
                # Keep only each block's input for the backward pass; recompute the rest.
                x = nnx.remat(_block_forward)(block, x, _subkey(dropout_key, i))
                continue
            x, layer_cache = block(x, cache=None if cache is None else cache[i], pos=pos,
                                   dropout_key=_subkey(dropout_key, i))
            if cache is not None:
                new_cache.append(layer_cache)
        return x, new_cache

    def _scan_blocks(self, x, cache, pos, dropout_key, gather_layer=None):
        """The stacked Block under `jax.lax.scan`: one compiled block whatever the depth.

        Layer i gets the unrolled model's dropout key and its slice of the
        stacked cache ([n_layer, B, S, H, K]). A recording pass sows each
        activation once, stacked along a leading layer axis. `gather_layer`
        (FSDP, `sharding.compute_layout`) maps one layer's params to the
        layout its block computes in.
        """
        graphdef, state = nnx.split(self.blocks)
        keys = None if dropout_key is None else jax.vmap(lambda i: jax.random.fold_in(dropout_key, i))(
            jnp.arange(self.cfg.n_layer))
        record = self.blocks.record

        def layer_block(state_i):
            if gather_layer is not None:
                nnx.replace_by_pure_dict(state_i, gather_layer(nnx.to_pure_dict(state_i)))
            return nnx.merge(graphdef, state_i)

        def train_block(state_i, x, key_i):
            return _block_forward(layer_block(state_i), x, key_i)

        def body(x, layer):
            state_i, cache_i, key_i = layer
            if cache is None and not record:
                # Training: full remat keeps only the block's input; otherwise the block keeps
                # SAVED_ACTIVATIONS. Left to itself, the scan stacks every intermediate autodiff
                # keeps (LayerNorm and GELU pieces, a second copy of each weight): 32 D floats per
                # token per layer at 128 wide, 4 heads, 64 positions, against 12 D with the policy,
                # and writing and reading those stacks costs more than recomputing what they hold.
                # The gather is inside the checkpoint: the backward pass gathers the layer again
                # rather than keeping every layer's gathered weights.
                remat = self.cfg.remat
                step = jax.checkpoint(train_block, policy=None if remat else _scan_policy, prevent_cse=remat)
                return step(state_i, x, key_i), (None, None)
            block = layer_block(state_i)
            if record:
                (x, cache_i), sown = nnx.capture(block, nnx.Intermediate)(x, cache=cache_i, pos=pos, dropout_key=key_i)
                return x, (cache_i, nnx.to_pure_dict(sown))
            x, cache_i = block(x, cache=cache_i, pos=pos, dropout_key=key_i)
            return x, (cache_i, None)

        x, (new_cache, sown) = jax.lax.scan(body, x, (state, cache, keys), unroll=self.cfg.scan_unroll)
        if record:
            for path, values in traverse_util.flatten_dict(sown).items():
                functools.reduce(getattr, path[:-1], self.blocks).sow(nnx.Intermediate, path[-1], values[0])
        return x, new_cache


def init_cache(cfg, batch_size: int, max_len: int | None = None, dtype=None):
    """Zeroed keys/values for every layer: a list of {"k", "v"} of [B, max_len, H, K] each, or with
    scan_layers one {"k", "v"} of [n_layer, B, max_len, H, K]."""
    max_len = max_len or cfg.block_size
    dtype = dtype or DTYPES[cfg.dtype]
    shape = (batch_size, max_len, cfg.n_head, cfg.n_embd // cfg.n_head)
    if getattr(cfg, "scan_layers", False):
        shape = (cfg.n_layer, *shape)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
    return [{"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(cfg.n_layer)]
