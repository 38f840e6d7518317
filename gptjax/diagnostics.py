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

Activations are those the model itself sows in a recording forward pass
(`model.set_attributes(record=True)` under `nnx.capture`): the attention
entropy is that of the very probabilities the model attends with. They are
taken without dropout, so they describe the model itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gptjax import params as params_lib
from gptjax import steps

PREFIX = "diag/"


def group_norms(tree) -> dict:
    """L2 norm per module (`model.module_name`) of a params-shaped tree."""
    sq: dict = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params_lib.unstack_layers(tree)):
        name = params_lib.module_name(path)
        sq[name] = sq.get(name, 0.0) + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
    return {name: jnp.sqrt(s) for name, s in sq.items()}


def entropy(probs, axis: int = -1):
    """Entropy in nats of distributions along `axis` (0 log 0 = 0)."""
    return -jnp.sum(jax.scipy.special.xlogy(probs, probs), axis=axis)


def dead_fraction(hidden_BxTxF):
    """Fraction of units (last axis) that are exactly zero at every position of the batch."""
    dead = jnp.all(hidden_BxTxF <= 0, axis=tuple(range(hidden_BxTxF.ndim - 1)))
    return jnp.mean(dead.astype(jnp.float32))


def recorded_forward(model: nnx.Module, tokens_BxT):
    """(logits, {block index: its sown activations}) of one recording forward pass (see `model.py`)."""
    model.set_attributes(record=True)
    try:
        logits, sown = nnx.capture(model, nnx.Intermediate)(tokens_BxT)
    finally:
        model.set_attributes(record=False)
    sown = params_lib.unstack_layers(nnx.to_pure_dict(sown))["blocks"]  # scan_layers sows stacked
    return logits, {int(i): _first(tree) for i, tree in sown.items()}


def _first(tree):
    """sow keeps a tuple of every value sown under a name; each is sown once per pass."""
    return jax.tree.map(lambda t: t[0], tree, is_leaf=lambda x: isinstance(x, tuple))


def activation_stats(model_cfg, sown: dict) -> dict:
    """Per-block scalars from a recording forward pass's activations."""
    out = {}
    for i in sorted(sown):
        name, rec = f"blocks.{i}", sown[i]
        h = rec["out"].astype(jnp.float32)
        out[f"{PREFIX}act_mean/{name}"] = jnp.mean(h)
        out[f"{PREFIX}act_std/{name}"] = jnp.std(h)
        out[f"{PREFIX}attn_entropy/{name}"] = jnp.mean(entropy(rec["attn"]["attn_probs"]))
        if model_cfg.activation == "relu":
            out[f"{PREFIX}dead_frac/{name}"] = dead_fraction(rec["mlp"]["mlp_hidden"])
    return out


def forward_stats(model, tokens_BxT) -> dict:
    """Activation diagnostics of one forward pass (no gradients)."""
    _, sown = recorded_forward(model, tokens_BxT)
    return activation_stats(model.cfg, sown)


def make_diagnostics_step(graphdef, tx):
    """jit(state, x, y) -> {key: scalar}; reads the train state, never changes it."""

    def diagnostics(state, x, y):
        params = state["params"]

        def loss_and_sown(p):
            logits, sown = recorded_forward(nnx.merge(graphdef, p), x)
            return steps.token_losses(logits, y).mean(), sown

        (_, sown), grads = jax.value_and_grad(loss_and_sown, has_aux=True)(params)
        updates, _ = tx.update(grads, state["opt_state"], params)
        out = {}
        weight_norms, update_norms = group_norms(params), group_norms(updates)
        for name, g in group_norms(grads).items():
            out[f"{PREFIX}grad_norm/{name}"] = g
            out[f"{PREFIX}update_ratio/{name}"] = update_norms[name] / jnp.maximum(weight_norms[name], 1e-12)
        out.update(activation_stats(nnx.merge(graphdef, params).cfg, sown))
        return out

    return jax.jit(diagnostics)
