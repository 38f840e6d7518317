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
