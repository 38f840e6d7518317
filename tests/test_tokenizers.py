import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from gptjax.errors import UserError
from gptjax.tokenizers import CharTokenizer, load_tokenizer

ALPHABET = "abcdefghij XYZ\n:!é漢🙂"


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=ALPHABET))
def test_char_tokenizer_round_trips(text):
    tok = CharTokenizer.from_text(ALPHABET)
    ids = tok.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text)
    assert tok.decode(ids) == text


def test_char_tokenizer_ids_are_sorted_and_dense():
    tok = CharTokenizer.from_text("hello world")
    assert tok.vocab_size == 8
    assert tok.decode(range(tok.vocab_size)) == " dehlorw"


def test_char_tokenizer_saves_and_loads(tmp_path):
    tok = CharTokenizer.from_text("To be, or not to be\n")
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.chars == tok.chars
    np.testing.assert_array_equal(again.encode("be or not"), tok.encode("be or not"))


def test_unknown_characters_name_themselves():
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UserError, match=r"never saw.*'z'"):
        tok.encode("abz")


def test_loading_from_a_folder_without_tokenizer_is_clear(tmp_path):
    with pytest.raises(UserError, match="no tokenizer"):
        load_tokenizer(str(tmp_path))


# ----------------------------------------------------------------------------- sentencepiece

import functools

from gptjax.tokenizers import EOT, GPT2Tokenizer, SentencePieceTokenizer, load_gpt2_encoding

TRAIN_TEXT = (
    "Once upon a time there was a little girl named Lily. She liked to play in the park.\n"
    "One day she saw a big dog. The dog was happy and wagged its tail.\n"
) * 30


@functools.lru_cache(maxsize=None)
def sp_tokenizer(vocab_size=320, model_type="bpe"):
    return SentencePieceTokenizer.train(iter(TRAIN_TEXT.split("\n")), vocab_size, model_type)


def check_round_trip(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Every id stands for a known number of UTF-8 bytes: what bits per byte counts.
    assert int(tok.token_bytes()[ids].sum()) == len(text.encode("utf-8"))


@settings(max_examples=150, deadline=None)
@given(st.text())  # any Unicode, nearly all of it never seen in training: byte fallback
def test_sentencepiece_round_trips_arbitrary_unicode(text):
    check_round_trip(sp_tokenizer(), text)


@settings(max_examples=30, deadline=None)
@given(st.text())
def test_sentencepiece_unigram_round_trips(text):
    check_round_trip(sp_tokenizer(300, "unigram"), text)


@pytest.mark.parametrize("text", ["漢字 🙂 naïve", "  two  spaces\n\n\ttab", "literal \u2581 meta space", "\x00\r\n",
                                  f"story one{EOT}story two"])
def test_sentencepiece_round_trips_awkward_text(text):
    check_round_trip(sp_tokenizer(), text)


def test_sentencepiece_uses_byte_fallback_and_learns_merges():
    tok = sp_tokenizer()
    unseen = tok.encode("漢")
    assert len(unseen) == 3 and all(tok.sp.is_byte(int(i)) for i in unseen)  # three UTF-8 bytes
    assert len(tok.encode("Once upon a time")) < len("Once upon a time")  # merges learned
    assert tok.eot_id is not None and tok.decode([tok.eot_id]) == EOT
    assert tok.token_bytes()[tok.eot_id] == 0


def test_sentencepiece_saves_and_loads(tmp_path):
    tok = sp_tokenizer()
    tok.save(str(tmp_path))
    again = load_tokenizer(str(tmp_path))
    assert again.kind == "sentencepiece" and again.fingerprint() == tok.fingerprint()
    np.testing.assert_array_equal(again.encode("Lily saw a dog"), tok.encode("Lily saw a dog"))
    assert sp_tokenizer(300).fingerprint() != tok.fingerprint()


def test_sentencepiece_vocab_larger_than_data_supports_is_clear():
    with pytest.raises(UserError, match=r"data.vocab_size=100000 is larger than the training text supports"):
        SentencePieceTokenizer.train(iter(["tiny text", "more tiny text"]), 100000)


def test_char_token_bytes_count_utf8():
    tok = CharTokenizer.from_text("aé漢🙂")
    ids = tok.encode("é🙂a")
    assert int(tok.token_bytes()[ids].sum()) == 2 + 4 + 1


# ----------------------------------------------------------------------------- GPT-2 (tiktoken)

def gpt2_or_skip():
    try:
        return GPT2Tokenizer()
    except UserError as e:
        pytest.skip(f"tiktoken's GPT-2 encoding cannot be loaded here (offline, not cached): {e}")


@settings(max_examples=50, deadline=None)
@given(st.text())
def test_gpt2_round_trips_arbitrary_unicode(text):
    check_round_trip(gpt2_or_skip(), text)


def test_gpt2_ids_and_end_of_text(tmp_path):
    tok = gpt2_or_skip()
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert tok.eot_id not in tok.encode(f"a{EOT}b").tolist()  # a literal mark in text stays text
    tok.save(str(tmp_path))
    assert load_tokenizer(str(tmp_path)).encode("Hello world").tolist() == [15496, 995]


def test_gpt2_unavailable_is_one_clear_error():
    try:
        load_gpt2_encoding()
    except UserError as e:
        assert "TIKTOKEN_CACHE_DIR" in str(e) and "sentencepiece" in str(e)
    else:
        pytest.skip("tiktoken's GPT-2 encoding is available here, so the offline error cannot be shown")
