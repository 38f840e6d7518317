"""Making a tokenizer: building one for a config's `data` section, or loading a saved one."""

from __future__ import annotations

import os
from typing import Iterable, Iterator

from gptjax.errors import UserError
from gptjax.tokenizers.base import TOKENIZER_FILE, Tokenizer, is_saved, read_meta
from gptjax.tokenizers.char import CharTokenizer
from gptjax.tokenizers.gpt2 import GPT2Tokenizer
from gptjax.tokenizers.sentencepiece import SentencePieceTokenizer


def tokenizer_spec(d) -> dict:
    """What decides the tokenizer besides the training text."""
    tok = d.tokenizer
    if tok == "sentencepiece":
        return {"kind": tok, "vocab_size": d.vocab_size, "model_type": d.sp_model_type, "max_chars": d.sp_max_chars}
    if tok.endswith(".model"):
        return {"kind": "sentencepiece", "model_file": os.path.abspath(tok)}
    return {"kind": tok}


def is_trained(spec: dict) -> bool:
    """Whether this tokenizer is learned from the training text (worth caching), not read as it is."""
    return spec["kind"] in ("char", "sentencepiece") and "model_file" not in spec


def build_tokenizer(d, train_texts: Iterable[str], val_texts: Iterable[str], docs: bool) -> Tokenizer:
    """The tokenizer `d` (a config's `data` section, already validated) asks for.

    `train_texts`/`val_texts` are read at most once each, and only by the kinds
    that learn from text; `docs`: the texts are documents, separated by a newline
    in the character vocabulary.
    """
    if d.tokenizer == "char":
        # The vocabulary covers train and validation text, so validation encodes too.
        chars = set()
        for texts in (train_texts, val_texts):
            for text in texts:
                chars.update(text)
        if docs:
            chars.add("\n")  # the separator between documents
        return CharTokenizer(chars)
    if d.tokenizer == "sentencepiece":
        return SentencePieceTokenizer.train(capped_lines(train_texts, d.sp_max_chars), d.vocab_size, d.sp_model_type)
    if d.tokenizer == "gpt2":
        return GPT2Tokenizer.load()
    return SentencePieceTokenizer.from_file(d.tokenizer)  # config.validate allows only a .model path here


def capped_lines(texts: Iterable[str], max_chars: int) -> Iterator[str]:
    """Non-empty lines of the texts, at most max_chars characters in all (keeps training to seconds)."""
    seen = 0
    for text in texts:
        for line in text.split("\n"):
            if line:
                yield line
                seen += len(line) + 1
                if seen >= max_chars:
                    return


def load_tokenizer(directory: str) -> Tokenizer:
    """Restore whichever kind of tokenizer was saved in `directory`."""
    if not is_saved(directory):
        raise UserError(f"no tokenizer in {directory} (expected {TOKENIZER_FILE}); is this a gptjax workdir?")
    meta = read_meta(directory)
    kind = meta.get("kind")
    if kind == CharTokenizer.kind:
        return CharTokenizer(meta["chars"])
    if kind == SentencePieceTokenizer.kind:
        return SentencePieceTokenizer.load(directory, meta)
    if kind == GPT2Tokenizer.kind:
        return GPT2Tokenizer.load()
    raise UserError(f"unknown tokenizer kind {kind!r} in {os.path.join(directory, TOKENIZER_FILE)}.")
