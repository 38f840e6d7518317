"""Tokenizers: text <-> integer ids, behind one `Tokenizer` protocol.

- `char`: one id per character of the training text.
- `sentencepiece`: BPE or unigram trained on the training split, with byte
  fallback so that any Unicode text encodes, and `<|endoftext|>` and `\\n` as
  their own pieces.
- `gpt2`: tiktoken's GPT-2 byte-level BPE (50257 ids).

`build_tokenizer` makes the one a config asks for; `save(dir)` and
`load_tokenizer(dir)` keep it. Files are JSON (or sentencepiece's own model
file): nothing is unpickled.
"""

from gptjax.tokenizers.base import EOT, TOKENIZER_FILE, Tokenizer, is_saved
from gptjax.tokenizers.build import build_tokenizer, is_trained, load_tokenizer, tokenizer_spec
from gptjax.tokenizers.char import CharTokenizer
from gptjax.tokenizers.gpt2 import GPT2Tokenizer, load_gpt2_encoding
from gptjax.tokenizers.sentencepiece import SentencePieceTokenizer

__all__ = ["EOT", "TOKENIZER_FILE", "Tokenizer", "is_saved", "build_tokenizer", "is_trained", "load_tokenizer",
           "tokenizer_spec", "CharTokenizer", "GPT2Tokenizer", "load_gpt2_encoding", "SentencePieceTokenizer"]
