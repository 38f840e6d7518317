"""Tokenizers: text <-> integer ids, saved in and restored from a workdir.

Every tokenizer has `encode(str) -> np.ndarray`, `decode(ids) -> str`,
`vocab_size`, `eot_id` (end-of-text id, or None), `save(dir)`, and a `kind`
name; `load_tokenizer(dir)` restores whichever kind was saved there. Files are
JSON (or sentencepiece's own format): nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

import numpy as np

from gptjax.errors import UserError

TOKENIZER_FILE = "tokenizer.json"


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

    def decode(self, ids) -> str:
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        return "".join(self._table[ids]) if ids.size else ""

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        _write_json(os.path.join(directory, TOKENIZER_FILE), {"kind": self.kind, "chars": self.chars})

    def fingerprint(self) -> str:
        return "char:" + json.dumps(self.chars)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


def load_tokenizer(directory: str):
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise UserError(f"no tokenizer in {directory} (expected {TOKENIZER_FILE}); is this a gptjax workdir?")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    kind = meta.get("kind")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    raise UserError(f"unknown tokenizer kind {kind!r} in {path}.")
