"""Batches: random training windows and consecutive evaluation windows cut from token ids.

The windows of a step depend only on (seed, stream, step), so a resumed run
sees exactly the batches an uninterrupted one would, in any process.
"""

from __future__ import annotations

import numpy as np

from gptjax.errors import UserError

# Streams keep the train sampler, the train-loss estimate and the validation
# estimate from ever drawing the same random numbers.
TRAIN_STREAM, EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 0, 1, 2


def check_length(ids: np.ndarray, block_size: int, what: str) -> None:
    if len(ids) < block_size + 1:
        raise UserError(
            f"the {what} split has {len(ids)} tokens, fewer than model.block_size+1 = {block_size + 1}; "
            "use more text or a smaller --config.model.block_size."
        )


def window_offsets(n_tokens: int, block_size: int, batch_size: int, seed: int, step: int, stream: int = TRAIN_STREAM):
    rng = np.random.default_rng([seed, stream, step])
    return rng.integers(0, n_tokens - block_size, size=batch_size)


def get_batch(ids: np.ndarray, block_size: int, batch_size: int, seed: int, step: int, stream: int = TRAIN_STREAM,
              rows=None):
    """Inputs and next-token targets, both int32 [batch_size, block_size].

    A pure function of its arguments: the batch at step k is the same in any
    process, which is what makes resume exact. `rows` (indices into the batch)
    cuts out only those windows: a process's share of the global batch.
    """
    offsets = window_offsets(len(ids), block_size, batch_size, seed, step, stream)
    if rows is not None:
        offsets = offsets[rows]
    windows = ids[offsets[:, None] + np.arange(block_size + 1)]
    windows = windows.astype(np.int32, copy=False)
    return windows[:, :-1], windows[:, 1:]


def eval_windows(ids: np.ndarray, block_size: int, max_windows: int = 0):
    """Inputs and targets [n, block_size] cut from consecutive, non-overlapping windows:
    one pass over a split, for exact evaluation."""
    n = (len(ids) - 1) // block_size
    if max_windows:
        n = min(n, max_windows)
    if n < 1:
        raise UserError(f"the validation split has {len(ids)} tokens, fewer than block_size+1 = {block_size + 1}.")
    span = np.asarray(ids[: n * block_size + 1]).astype(np.int32)
    return span[:-1].reshape(n, block_size), span[1:].reshape(n, block_size)
