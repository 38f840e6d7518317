"""Training diagnostics: what each layer's gradients, updates and activations look like.

One extra compiled function, run only every `train.diagnostics_every` steps
(never when it is 0), on the batch of the step about to run. It returns flat
scalars keyed `diag/<quantity>/<module>`, which go to metrics.jsonl and
TensorBoard like any other metric:

  grad_norm      L2 norm of the loss gradient per module (wte, wpe, blocks.i, ln_f, lm_head)
  update_ratio   |optimizer update| / |weights| per module: the step the optimizer is about to take
  act_mean/std   mean and std of each block's output (the residual stream)
  attn_entropy   mean entropy (nats) of each layer's attention distributions
  dead_frac      for ReLU MLPs: fraction of hidden units that are zero for every token of the batch

Activations are taken without dropout, so they describe the model itself.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax
from flax import nnx

PREFIX = "diag/"


def module_of(path) -> str:
    """"blocks.3" for a parameter inside block 3; the top-level name ("wte", "ln_f", ...) otherwise."""
    keys = [str(getattr(p, "key", getattr(p, "idx", p))) for p in path]
    return ".".join(keys[:2]) if keys[0] == "blocks" else keys[0]


def group_norms(tree) -> dict:
    """L2 norm per module of a params-shaped tree."""
    sq: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        name = module_of(path)
        sq[name] = sq.get(name, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return {name: jnp.sqrt(s) for name, s in sq.items()}


def attention_entropy(block, attn_in_BxTxD):
    """Mean entropy of the causal attention distributions of one block, over batch, heads and queries."""
    attn = block.attn
    B, T, _ = attn_in_BxTxD.shape
    qkv = attn.qkv(attn_in_BxTxD).reshape(B, T, 3, attn.n_head, attn.head_dim)
    q, k = qkv[:, :, 0].astype(jnp.float32), qkv[:, :, 1].astype(jnp.float32)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(attn.head_dim)
    mask = jnp.tril(jnp.ones((T, T), dtype=bool))
    probs = jax.nn.softmax(jnp.where(mask, scores, -jnp.inf), axis=-1)
    return jnp.mean(-jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=-1))


def dead_fraction(hidden_BxTxF):
    """Fraction of units (last axis) that are exactly zero at every position of the batch."""
    dead = jnp.all(hidden_BxTxF <= 0, axis=tuple(range(hidden_BxTxF.ndim - 1)))
    return jnp.mean(dead.astype(jnp.float32))


def activation_stats(model, taps) -> dict:
    """Per-block scalars from the tensors a forward pass with `taps=[]` recorded."""
    out = {}
    for i, (block, tap) in enumerate(zip(model.blocks, taps)):
        name = f"blocks.{i}"
        h = tap["out"].astype(jnp.float32)
        out[f"{PREFIX}act_mean/{name}"] = jnp.mean(h)
        out[f"{PREFIX}act_std/{name}"] = jnp.std(h)
        out[f"{PREFIX}attn_entropy/{name}"] = attention_entropy(block, tap["attn_in"])
        if block.mlp.activation == "relu":
            out[f"{PREFIX}dead_frac/{name}"] = dead_fraction(block.mlp.hidden(tap["mlp_in"]))
    return out


def forward_stats(model, tokens_BxT) -> dict:
    """Activation diagnostics of one forward pass (no gradients)."""
    taps = []
    model(tokens_BxT, taps=taps)
    return activation_stats(model, taps)


def make_diagnostics_step(graphdef, tx):
    """jit(state, x, y) -> {key: scalar}; reads the train state, never changes it."""

    def diagnostics(state, x, y):
        params = state["params"]

        def loss_fn(p):
            taps = []
            logits = nnx.merge(graphdef, p)(x, taps=taps)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), taps

        (_, taps), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, _ = tx.update(grads, state["opt_state"], params)
        out = {}
        weight_norms, update_norms = group_norms(params), group_norms(updates)
        for name, g in group_norms(grads).items():
            out[f"{PREFIX}grad_norm/{name}"] = g
            out[f"{PREFIX}update_ratio/{name}"] = update_norms[name] / jnp.maximum(weight_norms[name], 1e-12)
        out.update(activation_stats(nnx.merge(graphdef, params), taps))
        return out

    return jax.jit(diagnostics)
