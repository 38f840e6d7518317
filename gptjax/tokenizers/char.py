"""The character tokenizer: one id per distinct character of the training text."""

from __future__ import annotations

import json
from typing import Iterable

import numpy as np

from gptjax.errors import UserError
from gptjax.tokenizers.base import short_sha, write_meta


class CharTokenizer:
    """One id per distinct character of the training text, in sorted order."""

    kind = "char"

    def __init__(self, chars: Iterable[str]):
        self.chars = sorted(set(chars))
        if not self.chars:
            raise UserError("cannot build a character tokenizer from empty text.")
        self._index = {ch: i for i, ch in enumerate(self.chars)}
        self._table = np.array(self.chars, dtype=object)

    @classmethod
    def from_text(cls, text: str) -> "CharTokenizer":
        return cls(set(text))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    @property
    def eot_id(self) -> int | None:
        return None

    def encode(self, text: str) -> np.ndarray:
        index = self._index
        try:
            return np.fromiter((index[ch] for ch in text), dtype=np.int32, count=len(text))
        except KeyError:
            unknown = sorted({ch for ch in text if ch not in index})
            shown = ", ".join(repr(ch) for ch in unknown[:10])
            raise UserError(
                f"text contains {len(unknown)} character(s) the character tokenizer never saw in its "
                f"training text: {shown}. Remove them, or train on text that contains them."
            ) from None

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return "".join(self._table[ids]) if ids.size else ""

    def token_bytes(self) -> np.ndarray:
        return np.array([len(ch.encode("utf-8")) for ch in self.chars], np.int64)

    def save(self, directory: str) -> None:
        write_meta(directory, {"kind": self.kind, "chars": self.chars})

    def fingerprint(self) -> str:
        return "char:" + short_sha(json.dumps(self.chars).encode())
