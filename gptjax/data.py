"""Text sources -> token id arrays -> batches.

Data flows one way: a source gives train and validation text, a tokenizer
turns it into ids, and `get_batch` cuts random windows out of the ids. The
windows of a step depend only on (seed, step), so a resumed run sees exactly
the batches an uninterrupted one would.
"""

from __future__ import annotations

import hashlib
import os
import urllib.error
import urllib.request

import numpy as np

from gptjax.errors import UserError

DATA_DIR_ENV = "GPTJAX_DATA_DIR"

TINYSHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
TINYSHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"

# Streams keep the train sampler, the train-loss estimate and the validation
# estimate from ever drawing the same random numbers.
TRAIN_STREAM, EVAL_TRAIN_STREAM, EVAL_VAL_STREAM = 0, 1, 2


def cache_dir() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "gptjax")


def read_text_file(path: str) -> str:
    if not os.path.exists(path):
        raise UserError(f"data file {path} does not exist; check data.path (or {DATA_DIR_ENV}).")
    if os.path.isdir(path):
        raise UserError(f"data.path {path} is a folder; give a text file.")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"data file {path} is not UTF-8 text ({e.reason} at byte {e.start}).") from None
    if not text.strip():
        raise UserError(f"data file {path} is empty; give a file with text in it.")
    return text


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_verified(url: str, dest: str, sha256: str, hint: str) -> str:
    """Download `url` once to `dest`, checking its sha256; reuse it afterwards."""
    if os.path.exists(dest) and _sha256(dest) == sha256:
        return dest
    os.makedirs(os.path.dirname(dest), exist_ok=True)
    tmp = f"{dest}.part{os.getpid()}"
    try:
        with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)
    except (urllib.error.URLError, OSError) as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise UserError(f"could not download {url} ({getattr(e, 'reason', e)}). {hint}") from None
    got = _sha256(tmp)
    if got != sha256:
        os.remove(tmp)
        raise UserError(f"download of {url} has sha256 {got}, expected {sha256}; try again later. {hint}")
    os.replace(tmp, dest)
    return dest


def tinyshakespeare_path() -> str:
    data_dir = os.environ.get(DATA_DIR_ENV)
    if data_dir:
        local = os.path.join(data_dir, "tinyshakespeare", "input.txt")
        if os.path.exists(local):
            return local
    hint = (
        f"To work offline, set {DATA_DIR_ENV} to a folder holding tinyshakespeare/input.txt, "
        "or point --config.data.path at a local text file."
    )
    return download_verified(
        TINYSHAKESPEARE_URL,
        os.path.join(cache_dir(), "tinyshakespeare", "input.txt"),
        TINYSHAKESPEARE_SHA256,
        hint,
    )


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    n = int(len(text) * (1.0 - val_fraction))
    return text[:n], text[n:]


def load_splits(data_cfg) -> tuple[str, str]:
    """(train_text, val_text) for the configured source."""
    if data_cfg.path:
        return split_text(read_text_file(data_cfg.path), data_cfg.val_fraction)
    if data_cfg.dataset == "tinyshakespeare":
        return split_text(read_text_file(tinyshakespeare_path()), data_cfg.val_fraction)
    raise UserError(
        f"unknown dataset {data_cfg.dataset!r}; known: tinyshakespeare "
        "(or set --config.data.path to a local text file)."
    )


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
