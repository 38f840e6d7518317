"""GPT-2's byte-level BPE (50257 ids), run by tiktoken.

The ranks come from `$GPTJAX_DATA_DIR/gpt2/r50k_base.tiktoken` when that file
is there (no network), else from tiktoken's own download and cache.
"""

from __future__ import annotations

import base64
import functools
import hashlib

import numpy as np

from gptjax import runtime
from gptjax.errors import UserError
from gptjax.tokenizers.base import EOT, write_meta

RANKS_FILE = ("gpt2", "r50k_base.tiktoken")  # under GPTJAX_DATA_DIR
# The hash tiktoken itself checks for this file: the same bytes it downloads.
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
EOT_ID = 50256


class GPT2Tokenizer:
    """tiktoken's GPT-2 encoding; literal `<|endoftext|>` in text stays text."""

    kind = "gpt2"

    def __init__(self, encoding):
        """`encoding`: a `tiktoken.Encoding` of GPT-2's BPE; `GPT2Tokenizer.load()` finds one."""
        self.enc = encoding

    @classmethod
    def load(cls) -> "GPT2Tokenizer":
        return cls(load_gpt2_encoding())

    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    @property
    def eot_id(self) -> int | None:
        return self.enc.eot_token

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self.enc.encode_ordinary(text), np.int32)

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        return [np.asarray(ids, np.int32) for ids in self.enc.encode_ordinary_batch(texts, num_threads=num_threads)]

    def decode(self, ids) -> str:
        return self.enc.decode(np.asarray(ids, np.int64).reshape(-1).tolist())

    def token_bytes(self) -> np.ndarray:
        sizes = np.array([len(self.enc.decode_single_token_bytes(i)) for i in range(self.enc.n_vocab)], np.int64)
        sizes[self.eot_id] = 0
        return sizes

    def mergeable_ranks(self) -> dict[bytes, int]:
        """Token bytes -> rank (= id) for every id but end-of-text: the BPE that merges are read from."""
        return {self.enc.decode_single_token_bytes(i): i for i in range(self.enc.n_vocab) if i != self.eot_id}

    def save(self, directory: str) -> None:
        write_meta(directory, {"kind": self.kind, "encoding": "gpt2"})

    def fingerprint(self) -> str:
        return f"gpt2:tiktoken-{self.enc.name}-{self.enc.n_vocab}"


def load_gpt2_encoding():
    """GPT-2's BPE as a `tiktoken.Encoding`, from the data folder's copy when there is one."""
    path = runtime.data_file(*RANKS_FILE)
    if path:
        return _encoding_from_file(path)
    import tiktoken

    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests' errors, ValueError, OSError ...
        raise UserError(
            f"could not load GPT-2's BPE ({type(e).__name__}): set {runtime.DATA_DIR_ENV} to a folder holding "
            f"{'/'.join(RANKS_FILE)}, or run once online (tiktoken caches it in TIKTOKEN_CACHE_DIR), "
            "or use --config.data.tokenizer=sentencepiece."
        ) from None


@functools.lru_cache(maxsize=4)
def _encoding_from_file(path: str):
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    with open(path, "rb") as f:
        contents = f.read()
    got = hashlib.sha256(contents).hexdigest()
    if got != RANKS_SHA256:
        raise UserError(f"{path} is not GPT-2's BPE ranks (sha256 {got}, expected {RANKS_SHA256}); "
                        "replace it with an intact copy or remove it.")
    # tiktoken's own reader (load_tiktoken_bpe) would also copy the file into its cache; the format is
    # one "base64(token bytes) rank" pair a line.
    ranks = {base64.b64decode(token): int(rank) for token, rank in (line.split() for line in contents.splitlines()
                                                                     if line)}
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                             special_tokens={EOT: EOT_ID}, explicit_n_vocab=EOT_ID + 1)
