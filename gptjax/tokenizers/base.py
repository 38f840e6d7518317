"""What every tokenizer is: the `Tokenizer` protocol, the end-of-text mark, the saved form."""

from __future__ import annotations

import hashlib
import json
import os
from typing import Protocol, runtime_checkable

import numpy as np

# The end-of-text mark: GPT-2's special token, and the piece that separates
# documents for the other kinds. Spelled here only.
EOT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"  # in a saved tokenizer's folder: {"kind": ..., ...}


@runtime_checkable
class Tokenizer(Protocol):
    """Text <-> int32 ids; char, sentencepiece and GPT-2 tokenizers all are one."""

    kind: str  # "char", "sentencepiece" or "gpt2": the name saved in tokenizer.json

    @property
    def vocab_size(self) -> int: ...

    @property
    def eot_id(self) -> int | None:
        """The id that ends a document, or None (then documents are separated by a blank line)."""

    def encode(self, text: str) -> np.ndarray: ...

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]: ...

    def decode(self, ids) -> str: ...

    def token_bytes(self) -> np.ndarray:
        """UTF-8 bytes each id stands for (0 for end-of-text): what bits per byte counts."""

    def fingerprint(self) -> str:
        """Changes whenever any text would encode differently: keys the token cache."""

    def save(self, directory: str) -> None:
        """Write the tokenizer into `directory`; `load_tokenizer(directory)` restores it."""


def short_sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def write_meta(directory: str, meta: dict) -> None:
    """Write `directory`/tokenizer.json last, atomically: a folder that has it is complete."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, TOKENIZER_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False)
    os.replace(tmp, path)


def is_saved(directory: str) -> bool:
    """True when `directory` holds a complete saved tokenizer."""
    return os.path.isfile(os.path.join(directory, TOKENIZER_FILE))


def read_meta(directory: str) -> dict:
    with open(os.path.join(directory, TOKENIZER_FILE), encoding="utf-8") as f:
        return json.load(f)
