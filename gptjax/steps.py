"""Pure training and evaluation steps; here, the one loss."""

from __future__ import annotations

import jax.numpy as jnp
import optax


def token_losses(logits_BxTxV, targets_BxT):
    """Cross-entropy of each target token, in float32: [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV.astype(jnp.float32), targets_BxT)
