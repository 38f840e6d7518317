import hashlib
import json
import os

import pytest

from conftest import STORIES, shared_data_dir, small_config
from gptjax import config as config_lib
from gptjax.data import sources
from gptjax.errors import UserError
from gptjax.tokenizers import EOT

def data_section(**data):
    c = small_config("", "unused")
    for k, v in data.items():
        c.data[k] = v
    return c.data


def test_split_is_first_90_percent_then_last_10():
    train, val = sources.split_text("a" * 90 + "b" * 10, 0.1)
    assert train == "a" * 90 and val == "b" * 10


def test_offline_without_data_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.delenv("GPTJAX_DATA_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(sources, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # nothing listens
    with pytest.raises(UserError, match="GPTJAX_DATA_DIR"):
        sources.tinyshakespeare_path()


def test_download_is_verified_and_cached(tmp_path):
    src = tmp_path / "src.txt"
    src.write_text("hello")
    good = hashlib.sha256(b"hello").hexdigest()
    dest = tmp_path / "cache" / "f.txt"
    assert sources.download_verified(src.as_uri(), str(dest), good, "") == str(dest)
    assert dest.read_text() == "hello"
    src.write_text("changed")  # a good copy is reused, not fetched again
    assert sources.download_verified(src.as_uri(), str(dest), good, "") == str(dest)
    assert dest.read_text() == "hello"
    with pytest.raises(UserError, match="sha256"):
        sources.download_verified(src.as_uri(), str(tmp_path / "cache" / "g.txt"), "0" * 64, "")
    assert not (tmp_path / "cache" / "g.txt").exists()


@pytest.mark.skipif(shared_data_dir() is None, reason="GPTJAX_DATA_DIR is not set to the shared data folder")
def test_tinyshakespeare_is_read_from_the_data_dir():
    path = sources.tinyshakespeare_path()
    assert path.startswith(os.environ["GPTJAX_DATA_DIR"])
    with open(path, encoding="utf-8") as f:
        text = f.read()
    assert text.startswith("First Citizen:") and len(text) == 1115394


def test_local_files_load_through_datasets(tmp_path):
    folder = tmp_path / "txt"
    folder.mkdir()
    for i, t in enumerate(STORIES[:2]):
        (folder / f"doc{i}.txt").write_text(t * 8, encoding="utf-8")
    (folder / "more.txt").write_text(f"{STORIES[2]}\n{EOT}\n{STORIES[3]}\n{EOT}\n", encoding="utf-8")
    rows = sources.load_files(sources.resolve_files(str(folder)))
    assert sorted(rows["text"]) == sorted([STORIES[0] * 8, STORIES[1] * 8, STORIES[2], STORIES[3]])

    jsonl = tmp_path / "stories.jsonl"
    jsonl.write_text("".join(json.dumps({"id": i, "body": s}) + "\n" for i, s in enumerate(STORIES)))
    assert sources.load_files((str(jsonl),), text_field="body")["text"] == STORIES

    blob = tmp_path / "tiny-stories.json"  # one object holding a list of texts
    blob.write_text(json.dumps({"texts": STORIES}))
    assert sources.load_files((str(blob),), text_field="texts")["text"] == STORIES

    import datasets

    parquet = tmp_path / "p" / "part-0.parquet"
    parquet.parent.mkdir()
    datasets.Dataset.from_dict({"content": STORIES}).to_parquet(str(parquet))
    files = sources.resolve_files(str(tmp_path / "p" / "*.parquet"))
    assert sources.load_files(files, text_field="content")["text"] == STORIES


def test_one_text_is_split_by_characters_and_documents_by_rows(tmp_path):
    one = tmp_path / "one.txt"
    one.write_text("abcdefghij" * 10)
    train, val, docs = sources.load_rows(sources.Source("one", train_files=(str(one),), val_fraction=0.1))
    assert not docs and train["text"] == ["abcdefghij" * 9] and val["text"] == ["abcdefghij"]
    jsonl = tmp_path / "many.jsonl"
    jsonl.write_text("".join(json.dumps({"text": s}) + "\n" for s in STORIES * 5))
    train, val, docs = sources.load_rows(sources.Source("many", train_files=(str(jsonl),), val_fraction=0.1))
    assert docs and len(train) == 18 and len(val) == 2


def test_bad_sources_are_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"has no .txt, .json, .jsonl, .parquet files"):
        sources.resolve_files(str(tmp_path / "empty"))
    with pytest.raises(UserError, match="does not exist"):
        sources.resolve_files(str(tmp_path / "nope.txt"))
    (tmp_path / "blank.txt").write_text("\n \n")
    with pytest.raises(UserError, match="is empty"):
        sources.load_files((str(tmp_path / "blank.txt"),))
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt is not UTF-8 text"):
        sources.load_files((str(tmp_path / "latin1.txt"),))
    jsonl = tmp_path / "x.jsonl"
    jsonl.write_text('{"title": "a", "body": "b"}\n')
    with pytest.raises(UserError, match=r"no field 'text'; its fields are \['title', 'body'\]"):
        sources.load_files((str(jsonl),))
    with pytest.raises(UserError, match="pattern .* matches no files"):
        sources.resolve_files(str(tmp_path / "nothing-*.txt"))
    with pytest.raises(UserError, match="data.dataset=text needs data.path"):
        sources.resolve_source(data_section(path="", dataset="text"))
    with pytest.raises(UserError, match="data.dataset=hf needs data.hf_name"):
        sources.resolve_source(data_section(path="", dataset="hf"))


def test_an_unknown_dataset_is_refused_by_the_config_check():
    c = small_config("", "unused")
    c.data.dataset = "tinystorys"
    with pytest.raises(UserError, match=r"unknown dataset 'tinystorys'; known: tinyshakespeare, tinystories"):
        config_lib.validate(c)


def test_source_identity_ignores_file_times_but_file_stats_do_not(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello")
    src = sources.Source("a", train_files=(str(f),))
    before, stats = src.identity(), src.file_stats()
    os.utime(f, ns=(1, 1))
    assert src.identity() == before and "label" not in before
    assert src.file_stats() != stats


@pytest.mark.skipif(shared_data_dir() is None, reason="GPTJAX_DATA_DIR is not set to the shared data folder")
def test_named_datasets_use_the_local_copies():
    for name, folder in (("tinystories", "tinystories"), ("wikitext2", "wikitext-2")):
        src = sources.resolve_source(data_section(path="", dataset=name))
        assert src.train_files == (os.path.join(os.environ["GPTJAX_DATA_DIR"], folder, "train.txt"),)
        assert src.val_files == (os.path.join(os.environ["GPTJAX_DATA_DIR"], folder, "valid.txt"),)
    _, val, docs = sources.load_rows(src)  # WikiText: one row per line, lines kept
    assert not docs and "".join(val["text"]) == open(src.val_files[0], encoding="utf-8").read()
