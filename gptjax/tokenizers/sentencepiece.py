"""Sentencepiece tokenizers (BPE or unigram) trained with byte fallback."""

from __future__ import annotations

import io
import os
import re
from typing import Iterator

import numpy as np

from gptjax.errors import UserError
from gptjax.tokenizers.base import EOT, short_sha, write_meta

SP_MODEL_FILE = "sentencepiece.model"
# sentencepiece writes spaces as U+2581; a literal U+2581 in text would decode
# to a space, and a literal end-of-text mark would become the end-of-text id,
# so both are spelled in byte pieces instead (as GPT-2 keeps a literal mark text).
SP_SPACE = "\u2581"
_SP_LITERALS = re.compile(f"({re.escape(SP_SPACE)}|{re.escape(EOT)})")


class SentencePieceTokenizer:
    """A sentencepiece model (BPE or unigram) with byte fallback.

    The end-of-text id only comes from the data pipeline (between documents),
    never from text that happens to contain the mark.
    """

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes):
        import sentencepiece as spm

        self.model_proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self.model_proto)
        self._n = self.sp.get_piece_size()
        eot = self.sp.piece_to_id(EOT)
        self._eot = eot if eot != self.sp.unk_id() and self.sp.id_to_piece(eot) == EOT else None
        self._byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        if not all(self.sp.is_byte(i) for i in self._byte_ids):
            raise UserError("sentencepiece model has no byte fallback; train it with byte_fallback=True "
                            "(or let gptjax train one: data.tokenizer=sentencepiece).")

    def __getstate__(self):  # the processor itself does not pickle; its model does
        return {"model_proto": self.model_proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    @classmethod
    def train(cls, sentences: Iterator[str], vocab_size: int, model_type: str = "bpe") -> "SentencePieceTokenizer":
        """Train on an iterator of lines (no newlines inside); model_type is bpe or unigram."""
        import sentencepiece as spm

        out = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=sentences, model_writer=out, vocab_size=vocab_size, model_type=model_type,
                byte_fallback=True, character_coverage=0.9995, split_digits=True,
                # Exact round trips: no normalisation, no dummy leading space, spaces kept as they are.
                normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=False,
                allow_whitespace_only_pieces=True, user_defined_symbols=[EOT, "\n"],
                unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1,
                max_sentence_length=1 << 16, num_threads=os.cpu_count() or 1, minloglevel=2,
            )
        except RuntimeError as e:
            msg = str(e)
            if "Vocabulary size" in msg:
                hint = msg.split("Please set it to a value")[-1].strip(" .")
                raise UserError(
                    f"data.vocab_size={vocab_size} is larger than the training text supports "
                    f"(sentencepiece: set it to a value {hint}); lower --config.data.vocab_size or use more text."
                ) from None
            raise UserError(f"sentencepiece training failed: {msg.splitlines()[-1]}") from None
        return cls(out.getvalue())

    @classmethod
    def from_file(cls, path: str) -> "SentencePieceTokenizer":
        if not os.path.isfile(path):
            raise UserError(f"sentencepiece model {path} does not exist; check data.tokenizer.")
        with open(path, "rb") as f:
            proto = f.read()
        try:
            return cls(proto)
        except (RuntimeError, OSError) as e:
            raise UserError(f"{path} is not a sentencepiece model ({e}).") from None

    @classmethod
    def load(cls, directory: str, meta: dict) -> "SentencePieceTokenizer":
        return cls.from_file(os.path.join(directory, meta["model_file"]))

    @property
    def vocab_size(self) -> int:
        return self._n

    @property
    def eot_id(self) -> int | None:
        return self._eot

    def encode(self, text: str) -> np.ndarray:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
        """Encode many texts; sentencepiece's own C++ threads share the work."""
        plain = [i for i, t in enumerate(texts) if SP_SPACE not in t and EOT not in t]
        out = [None] * len(texts)
        if plain:
            for i, ids in zip(plain, self.sp.encode([texts[i] for i in plain], num_threads=num_threads)):
                out[i] = np.asarray(ids, np.int32)
        for i, text in enumerate(texts):
            if out[i] is None:
                ids = []
                for j, part in enumerate(_SP_LITERALS.split(text)):
                    if j % 2:  # a literal meta space or end-of-text mark: spelled in bytes
                        ids += [self._byte_ids[b] for b in part.encode("utf-8")]
                    elif part:
                        ids += self.sp.encode(part)
                out[i] = np.asarray(ids, np.int32)
        return out

    def decode(self, ids) -> str:
        return self.sp.decode(np.asarray(ids, np.int64).reshape(-1).tolist())

    def token_bytes(self) -> np.ndarray:
        sizes = np.zeros(self._n, np.int64)
        for i in range(self._n):
            if self.sp.is_byte(i):
                sizes[i] = 1
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i) or i == self._eot):
                sizes[i] = len(self.sp.id_to_piece(i).replace(SP_SPACE, " ").encode("utf-8"))
        return sizes

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        tmp = os.path.join(directory, SP_MODEL_FILE + ".tmp")
        with open(tmp, "wb") as f:
            f.write(self.model_proto)
        os.replace(tmp, os.path.join(directory, SP_MODEL_FILE))
        write_meta(directory, {"kind": self.kind, "model_file": SP_MODEL_FILE})

    def fingerprint(self) -> str:
        return "sentencepiece:" + short_sha(self.model_proto)
