import os

import numpy as np
import pytest

from conftest import STORIES, load_config, shared_data_dir, small_config, write_folder
from gptjax import workdir as workdir_lib
from gptjax.data import cache, sources
from gptjax.errors import UserError
from gptjax.tokenizers import EOT, CharTokenizer

QUIET = dict(log=lambda *_: None)


@pytest.fixture
def cache_root(tmp_path, monkeypatch):
    """A private token/tokenizer cache for each test."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "gptjax"


def data_config(path, **data):
    c = small_config(str(path), "unused")
    for k, v in data.items():
        c.data[k] = v
    return c


def cached_token_files(root):
    d = root / "tokens"
    return sorted(p.name for p in d.iterdir()) if d.exists() else []


def test_documents_are_separated_by_end_of_text(tmp_path, cache_root):
    folder = write_folder(tmp_path / "docs", STORIES)
    cfg = data_config(folder, tokenizer="sentencepiece", vocab_size=300, val_fraction=0.25)
    p = cache.prepare(cfg, **QUIET)
    eot = p.tokenizer.eot_id
    assert p.tokenizer.decode([eot]) == EOT
    for ids, n_docs in ((p.train_ids, 3), (p.val_ids, 1)):  # 4 files: 3 train, 1 validation
        ids = np.asarray(ids)
        assert ids[-1] == eot and int((ids == eot).sum()) == n_docs
        docs = [p.tokenizer.decode(part) for part in np.split(ids, np.flatnonzero(ids == eot) + 1)[:-1]]
        assert all(d.endswith(EOT) and d[: -len(EOT)] in [s * 8 for s in STORIES] for d in docs)
    assert p.stats["train"]["docs"] == 3 and p.stats["val"]["tokens"] == len(p.val_ids)


def test_token_cache_is_reused_and_invalidated(tmp_path, cache_root, monkeypatch):
    folder = write_folder(tmp_path / "docs", STORIES)
    cfg = data_config(folder, tokenizer="sentencepiece", vocab_size=300)
    first = cache.prepare(cfg, **QUIET)
    assert first.train_ids.dtype == np.uint16 and isinstance(first.train_ids, np.memmap)
    assert len(cached_token_files(cache_root)) == 4  # train and val: ids + counts

    real_load_rows = sources.load_rows
    monkeypatch.setattr(sources, "load_rows", lambda s: pytest.fail("the cache should have been used"))
    again = cache.prepare(cfg, **QUIET)
    np.testing.assert_array_equal(again.train_ids, first.train_ids)
    assert again.tokenizer.fingerprint() == first.tokenizer.fingerprint()
    monkeypatch.setattr(sources, "load_rows", real_load_rows)

    cfg.data.vocab_size = 310  # another tokenizer: new token files
    cache.prepare(cfg, **QUIET)
    assert len(cached_token_files(cache_root)) == 8
    (folder / "doc0.txt").write_text("A new first story about a frog.\n" * 8)  # the source changed
    changed = cache.prepare(cfg, **QUIET)
    assert len(cached_token_files(cache_root)) == 12
    assert "frog" in changed.tokenizer.decode(np.concatenate([changed.train_ids, changed.val_ids]))


def test_streamed_rows_tokenize_like_downloaded_rows(tmp_path):
    import datasets

    tok = CharTokenizer.from_text("".join(STORIES) + "\n")
    rows = datasets.Dataset.from_dict({"text": STORIES})
    a = cache.write_tokens(rows, tok, True, str(tmp_path / "a.bin"), 1, "a")
    b = cache.write_tokens(rows.to_iterable_dataset(), tok, True, str(tmp_path / "b.bin"), 1, "b")
    assert a == b and a["docs"] == 4 and a["bytes"] == sum(len(s.encode()) for s in STORIES)
    ids, _ = cache.read_tokens(str(tmp_path / "b.bin"))
    assert tok.decode(ids) == "".join(s + "\n\n" for s in STORIES)  # char: a blank line between documents


def test_an_incomplete_token_file_is_a_miss(tmp_path):
    tok = CharTokenizer.from_text("abc")
    import datasets

    path = str(tmp_path / "t.bin")
    cache.write_tokens(datasets.Dataset.from_dict({"text": ["abcabc"]}), tok, False, path, 1, "t")
    assert cache.read_tokens(path)[1]["tokens"] == 6
    with open(path, "ab") as f:
        f.write(b"\0")
    assert cache.read_tokens(path) is None


def test_failed_tokenization_leaves_nothing_in_the_cache(tmp_path, cache_root, monkeypatch):
    folder = write_folder(tmp_path / "docs", STORIES)

    def broken(batch, **_):
        raise UserError("tokenizer broke")

    monkeypatch.setattr(cache, "_encode_rows", broken)
    with pytest.raises(UserError, match="tokenizer broke"):
        cache.prepare(data_config(folder), **QUIET)
    assert cached_token_files(cache_root) == []


def test_prepare_writes_only_the_cache_and_a_kept_tokenizer_is_reused(tmp_path, cache_root, text_file):
    wd = workdir_lib.Workdir(str(tmp_path / "run"))
    assert workdir_lib.kept_tokenizer(wd) == (None, None)  # nothing there
    p = cache.prepare(data_config(text_file), *workdir_lib.kept_tokenizer(wd), **QUIET)
    assert not os.path.exists(wd.root)  # prepare itself writes nothing into a workdir
    workdir_lib.save_tokenizer(wd, p.tokenizer, p.data_id)
    assert os.path.exists(wd.data_id) and workdir_lib.kept_tokenizer(wd) == (None, None)  # no checkpoint yet

    # Without checkpoints the tokenizer is rebuilt freely, and saved over the old one.
    other = cache.prepare(data_config(text_file, tokenizer="sentencepiece", vocab_size=300), **QUIET)
    workdir_lib.save_tokenizer(wd, other.tokenizer, other.data_id)
    os.makedirs(os.path.join(wd.checkpoints, "10"))  # a run to protect now exists
    kept, data_id = workdir_lib.kept_tokenizer(wd)
    assert kept == wd.tokenizer and data_id["tokenizer"]["kind"] == "sentencepiece"
    before = {n: os.stat(os.path.join(kept, n)).st_mtime_ns for n in os.listdir(kept)}
    again = cache.prepare(data_config(text_file, tokenizer="sentencepiece", vocab_size=300), kept, data_id, **QUIET)
    assert again.tokenizer.fingerprint() == other.tokenizer.fingerprint()
    workdir_lib.save_tokenizer(wd, again.tokenizer, again.data_id)  # a kept tokenizer stays as it is
    assert {n: os.stat(os.path.join(kept, n)).st_mtime_ns for n in os.listdir(kept)} == before


def test_resume_on_different_data_is_refused(tmp_path, cache_root, text_file):
    wd = workdir_lib.Workdir(str(tmp_path / "run"))
    p = cache.prepare(data_config(text_file), **QUIET)
    workdir_lib.save_tokenizer(wd, p.tokenizer, p.data_id)
    os.makedirs(os.path.join(wd.checkpoints, "10"))
    kept = workdir_lib.kept_tokenizer(wd)
    cache.prepare(data_config(text_file), *kept, **QUIET)  # same data: fine
    with pytest.raises(UserError, match="different data tokenizer .* would tokenize differently"):
        cache.prepare(data_config(text_file, tokenizer="sentencepiece", vocab_size=300), *kept)
    other = tmp_path / "other.txt"
    other.write_text(open(text_file).read())
    with pytest.raises(UserError, match=f"{wd.tokenizer} was trained with a different data source"):
        cache.prepare(data_config(other), *kept)
    os.remove(wd.data_id)  # a run saved before runs recorded their data: nothing to compare
    assert cache.prepare(data_config(other), *workdir_lib.kept_tokenizer(wd), **QUIET).tokenizer.kind == "char"


@pytest.mark.skipif(shared_data_dir() is None, reason="GPTJAX_DATA_DIR is not set to the shared data folder")
def test_tiny_shakespeare_keeps_its_65_characters(cache_root):
    p = cache.prepare(load_config("tiny"), **QUIET)
    assert p.tokenizer.vocab_size == 65 and len(p.train_ids) == 1003854 and len(p.val_ids) == 111540
