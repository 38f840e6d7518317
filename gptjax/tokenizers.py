"""Tokenizers: text <-> integer ids, saved in and restored from a workdir.

Every tokenizer has `encode(str) -> np.ndarray`, `decode(ids) -> str`,
`vocab_size`, `eot_id` (end-of-text id, or None), `token_bytes()` (UTF-8 bytes
each id stands for, for bits per byte), `save(dir)`, `fingerprint()` and a
`kind` name; `load_tokenizer(dir)` restores whichever kind was saved there.

- `char`: one id per character of the training text.
- `sentencepiece`: BPE or unigram trained on the training split, with byte
  fallback so that any Unicode text encodes, and `<|endoftext|>` and `\n` as
  their own pieces.
- `gpt2`: tiktoken's GPT-2 byte-level BPE (50257 ids).

Files are JSON (or sentencepiece's own model file): nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
from typing import Iterable, Iterator

import numpy as np

from gptjax.errors import UserError

TOKENIZER_FILE = "tokenizer.json"
SP_MODEL_FILE = "sentencepiece.model"
EOT = "<|endoftext|>"
# sentencepiece writes spaces as U+2581; a literal U+2581 in text would decode
# to a space, and a literal end-of-text mark would become the end-of-text id,
# so both are spelled in byte pieces instead (as GPT-2 keeps a literal mark text).
SP_SPACE = "\u2581"
_SP_LITERALS = re.compile(f"({re.escape(SP_SPACE)}|{re.escape(EOT)})")


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

    def token_bytes(self) -> np.ndarray:
        return np.array([len(ch.encode("utf-8")) for ch in self.chars], np.int64)

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        _write_json(os.path.join(directory, TOKENIZER_FILE), {"kind": self.kind, "chars": self.chars})

    def fingerprint(self) -> str:
        return "char:" + _sha(json.dumps(self.chars).encode())


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
        n = self.sp.get_piece_size()
        eot = self.sp.piece_to_id(EOT)
        self._eot = eot if eot != self.sp.unk_id() and self.sp.id_to_piece(eot) == EOT else None
        self._byte_ids = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in range(256)]
        if not all(self.sp.is_byte(i) for i in self._byte_ids):
            raise UserError("sentencepiece model has no byte fallback; train it with byte_fallback=True "
                            "(or let gptjax train one: data.tokenizer=sentencepiece).")
        self._n = n

    def __getstate__(self):  # for datasets.map(num_proc=...)
        return {"model_proto": self.model_proto}

    def __setstate__(self, state):
        self.__init__(state["model_proto"])

    @classmethod
    def train(cls, sentences: Iterator[str], vocab_size: int, model_type: str = "bpe") -> "SentencePieceTokenizer":
        """Train on an iterator of lines (no newlines inside)."""
        import sentencepiece as spm

        if model_type not in ("bpe", "unigram"):
            raise UserError(f"data.sp_model_type must be 'bpe' or 'unigram', got {model_type!r}.")
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
        _write_json(os.path.join(directory, TOKENIZER_FILE), {"kind": self.kind, "model_file": SP_MODEL_FILE})

    def fingerprint(self) -> str:
        return "sentencepiece:" + _sha(self.model_proto)


class GPT2Tokenizer:
    """tiktoken's GPT-2 encoding; literal `<|endoftext|>` in text stays text."""

    kind = "gpt2"

    def __init__(self):
        self.enc = load_gpt2_encoding()

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self.__init__()

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

    def save(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)
        _write_json(os.path.join(directory, TOKENIZER_FILE), {"kind": self.kind, "encoding": "gpt2"})

    def fingerprint(self) -> str:
        return f"gpt2:tiktoken-{self.enc.name}-{self.enc.n_vocab}"


GPT2_RANKS = ("gpt2", "r50k_base.tiktoken")  # under GPTJAX_DATA_DIR: GPT-2's BPE ranks, read offline
GPT2_RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"  # tiktoken's own check


def load_gpt2_encoding():
    import tiktoken

    local = os.path.join(os.environ.get("GPTJAX_DATA_DIR") or "", *GPT2_RANKS)
    if os.environ.get("GPTJAX_DATA_DIR") and os.path.isfile(local):
        from tiktoken.load import load_tiktoken_bpe
        from tiktoken_ext.openai_public import r50k_pat_str

        # The same ids as tiktoken.get_encoding("gpt2"), with no download.
        ranks = load_tiktoken_bpe(local, expected_hash=GPT2_RANKS_SHA256)
        return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
                                 special_tokens={EOT: len(ranks)}, explicit_n_vocab=len(ranks) + 1)
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken raises requests' errors, ValueError, OSError ...
        raise UserError(
            f"could not load tiktoken's GPT-2 encoding ({type(e).__name__}). It is downloaded once from "
            "openaipublic.blob.core.windows.net and cached in TIKTOKEN_CACHE_DIR: run once online, or use "
            "--config.data.tokenizer=sentencepiece."
        ) from None


def encode_batch(tokenizer, texts: list[str], num_threads: int = 1) -> list[np.ndarray]:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts, num_threads=num_threads)
    return [tokenizer.encode(t) for t in texts]


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()[:16]


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
    os.replace(tmp, path)


def copy_tokenizer(src: str, dst: str) -> None:
    """Copy a saved tokenizer folder (from the cache into a workdir)."""
    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src), key=lambda n: n == TOKENIZER_FILE):  # tokenizer.json last
        shutil.copyfile(os.path.join(src, name), os.path.join(dst, name + ".tmp"))
        os.replace(os.path.join(dst, name + ".tmp"), os.path.join(dst, name))


def load_tokenizer(directory: str):
    path = os.path.join(directory, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise UserError(f"no tokenizer in {directory} (expected {TOKENIZER_FILE}); is this a gptjax workdir?")
    with open(path, encoding="utf-8") as f:
        meta = json.load(f)
    kind = meta.get("kind")
    if kind == "char":
        return CharTokenizer(meta["chars"])
    if kind == "sentencepiece":
        return SentencePieceTokenizer.from_file(os.path.join(directory, meta["model_file"]))
    if kind == "gpt2":
        return GPT2Tokenizer()
    raise UserError(f"unknown tokenizer kind {kind!r} in {path}.")
