import shutil

import ml_collections
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from conftest import shared_data_dir
from gptjax import tokenizers as tok_lib
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

needs_gpt2_file = pytest.mark.skipif(shared_data_dir() is None,
                                     reason="GPTJAX_DATA_DIR is not set to the shared data folder (gpt2/)")


def gpt2_or_skip():
    try:
        return GPT2Tokenizer.load()
    except UserError as e:
        pytest.skip(f"GPT-2's BPE cannot be loaded here (no GPTJAX_DATA_DIR copy, offline, not cached): {e}")


@pytest.fixture
def offline_tiktoken(monkeypatch):
    """tiktoken's own download fails, as it does without a network."""
    import tiktoken

    def offline(name):
        raise ConnectionError("no network")

    monkeypatch.setattr(tiktoken, "get_encoding", offline)


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


@needs_gpt2_file
def test_gpt2_loads_from_the_data_dir_without_the_network(tmp_path, monkeypatch, offline_tiktoken):
    (tmp_path / "gpt2").mkdir()
    shutil.copy(f"{shared_data_dir()}/gpt2/r50k_base.tiktoken", tmp_path / "gpt2")
    monkeypatch.setenv("GPTJAX_DATA_DIR", str(tmp_path))
    tok = GPT2Tokenizer.load()
    assert tok.encode("Hello world").tolist() == [15496, 995]
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.fingerprint() == "gpt2:tiktoken-gpt2-50257"  # token caches made with tiktoken's own copy still hit
    d = ml_collections.ConfigDict({"tokenizer": "gpt2"})
    assert tok_lib.build_tokenizer(d, (), (), docs=True).encode("Hello world").tolist() == [15496, 995]


def test_gpt2_unavailable_is_one_clear_error(tmp_path, monkeypatch, offline_tiktoken):
    monkeypatch.setenv("GPTJAX_DATA_DIR", str(tmp_path))  # no gpt2/ in it
    with pytest.raises(UserError) as e:
        load_gpt2_encoding()
    msg = str(e.value)
    assert "GPTJAX_DATA_DIR" in msg and "gpt2/r50k_base.tiktoken" in msg and "sentencepiece" in msg
    assert "TIKTOKEN_CACHE_DIR" in msg and msg.count(". ") == 0 and "\n" not in msg  # one sentence


def test_a_damaged_gpt2_file_is_refused(tmp_path, monkeypatch, offline_tiktoken):
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "r50k_base.tiktoken").write_bytes(b"SGVsbG8= 0\n")
    monkeypatch.setenv("GPTJAX_DATA_DIR", str(tmp_path))
    with pytest.raises(UserError, match="is not GPT-2's BPE ranks"):
        load_gpt2_encoding()


def test_gpt2_mergeable_ranks_are_its_bpe():
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    tok = gpt2_or_skip()
    ranks = tok.mergeable_ranks()
    assert len(ranks) == 50256 and ranks[b"Hello"] == 15496 and ranks[b" world"] == 995
    assert sorted(ranks.values()) == list(range(50256)) and all(bytes([b]) in ranks for b in range(256))
    # The ranks alone rebuild an encoder that gives the same ids.
    again = tiktoken.Encoding("check", pat_str=r50k_pat_str, mergeable_ranks=ranks, special_tokens={})
    for text in ("Hello world", "naïve café 漢字 🙂", "  two  spaces\n\ttab"):
        assert again.encode_ordinary(text) == tok.encode(text).tolist()


# ----------------------------------------------------------------------------- one protocol, building from a config

def all_kinds():
    kinds = [CharTokenizer.from_text(TRAIN_TEXT + "é漢"), sp_tokenizer()]
    try:
        kinds.append(GPT2Tokenizer.load())
    except UserError:
        pass  # covered where GPT-2's BPE is available
    return kinds


def test_every_kind_is_a_tokenizer_and_batches_like_single_texts(tmp_path):
    texts = ["Once upon a time", "", "Lily saw a dog\n", "é漢"]
    for tok in all_kinds():
        assert isinstance(tok, tok_lib.Tokenizer), tok.kind
        batch = tok.encode_batch(texts, num_threads=2)
        assert [b.tolist() for b in batch] == [tok.encode(t).tolist() for t in texts]
        assert all(b.dtype == np.int32 for b in batch)
        tok.save(str(tmp_path / tok.kind))
        assert tok_lib.is_saved(str(tmp_path / tok.kind))
        assert load_tokenizer(str(tmp_path / tok.kind)).fingerprint() == tok.fingerprint()


def data_section(**kw):
    d = ml_collections.ConfigDict({"tokenizer": "char", "vocab_size": 0, "sp_model_type": "bpe",
                                   "sp_max_chars": 10_000_000})
    d.update(kw)
    return d


def test_build_tokenizer_follows_the_data_config(tmp_path):
    char = tok_lib.build_tokenizer(data_section(), iter(["ab"]), iter(["cd"]), docs=True)
    assert char.chars == ["\n", "a", "b", "c", "d"]  # validation text too, and the document separator
    assert tok_lib.build_tokenizer(data_section(), iter(["ab"]), iter([]), docs=False).chars == ["a", "b"]
    lines = TRAIN_TEXT.split("\n")
    sp = tok_lib.build_tokenizer(data_section(tokenizer="sentencepiece", vocab_size=300), iter(lines), iter([]),
                                 docs=True)
    assert sp.kind == "sentencepiece" and sp.vocab_size == 300
    sp.save(str(tmp_path))
    model = str(tmp_path / "sentencepiece.model")
    given = tok_lib.build_tokenizer(data_section(tokenizer=model), (), (), docs=True)
    assert given.fingerprint() == sp.fingerprint()
    assert tok_lib.tokenizer_spec(data_section(tokenizer=model)) == {"kind": "sentencepiece", "model_file": model}
    assert tok_lib.is_trained(tok_lib.tokenizer_spec(data_section(tokenizer="sentencepiece", vocab_size=300)))
    assert not tok_lib.is_trained(tok_lib.tokenizer_spec(data_section(tokenizer=model)))


def test_capped_lines_stop_near_max_chars():
    from gptjax.tokenizers.build import capped_lines

    out = list(capped_lines(iter(["aaaa\n\nbbbb", "cccc\ndddd"]), 9))
    assert out == ["aaaa", "bbbb"]  # empty lines skipped; 5 + 5 characters reach the cap
    assert list(capped_lines(iter(["x\ny"]), 100)) == ["x", "y"]
