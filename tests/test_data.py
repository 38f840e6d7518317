import os
import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT, shared_data_dir
from gptjax import data as data_lib
from gptjax.errors import UserError


def test_batch_is_pure_function_of_seed_and_step():
    ids = np.arange(1000, dtype=np.int32)
    x1, y1 = data_lib.get_batch(ids, 16, 8, seed=3, step=41)
    x2, y2 = data_lib.get_batch(ids, 16, 8, seed=3, step=41)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one
    x3, _ = data_lib.get_batch(ids, 16, 8, seed=3, step=42)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (8, 16) and x1.dtype == np.int32


def test_batch_at_step_k_is_the_same_in_a_fresh_process():
    ids = np.random.default_rng(0).integers(0, 60, 5000).astype(np.int32)
    here, _ = data_lib.get_batch(ids, 32, 4, seed=1337, step=123)
    code = (
        "import numpy as np; from gptjax import data as d;"
        "ids=np.random.default_rng(0).integers(0,60,5000).astype(np.int32);"
        "x,_=d.get_batch(ids,32,4,seed=1337,step=123); print(x.tobytes().hex())"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert bytes.fromhex(out.stdout.strip()) == here.tobytes()


def test_windows_cover_the_last_token():
    ids = np.arange(20, dtype=np.int32)
    seen = set()
    for step in range(200):
        x, y = data_lib.get_batch(ids, 4, 4, seed=0, step=step)
        seen.update(y.ravel().tolist())
    assert max(seen) == 19 and min(seen) == 1


def test_split_is_first_90_percent_then_last_10():
    train, val = data_lib.split_text("a" * 90 + "b" * 10, 0.1)
    assert train == "a" * 90 and val == "b" * 10


def test_missing_empty_and_binary_files_are_clear(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data_lib.read_text_file(str(tmp_path / "nope.txt"))
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(UserError, match="empty"):
        data_lib.read_text_file(str(tmp_path / "empty.txt"))
    (tmp_path / "bin.txt").write_bytes(b"\xff\xfe\x00\x81")
    with pytest.raises(UserError, match="not UTF-8"):
        data_lib.read_text_file(str(tmp_path / "bin.txt"))


def test_too_short_split_names_block_size():
    with pytest.raises(UserError, match="block_size"):
        data_lib.check_length(np.zeros(10, np.int32), 16, "validation")


def test_offline_without_data_says_how_to_provide_it(tmp_path, monkeypatch):
    monkeypatch.delenv(data_lib.DATA_DIR_ENV, raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(data_lib, "TINYSHAKESPEARE_URL", "http://127.0.0.1:9/input.txt")  # nothing listens
    with pytest.raises(UserError, match="GPTJAX_DATA_DIR"):
        data_lib.tinyshakespeare_path()


def test_download_is_verified_and_cached(tmp_path, monkeypatch):
    src = tmp_path / "src.txt"
    src.write_text("hello")
    import hashlib

    good = hashlib.sha256(b"hello").hexdigest()
    dest = tmp_path / "cache" / "f.txt"
    assert data_lib.download_verified(src.as_uri(), str(dest), good, "") == str(dest)
    assert dest.read_text() == "hello"
    with pytest.raises(UserError, match="sha256"):
        data_lib.download_verified(src.as_uri(), str(tmp_path / "cache" / "g.txt"), "0" * 64, "")
    assert not (tmp_path / "cache" / "g.txt").exists()


@pytest.mark.skipif(shared_data_dir() is None, reason="GPTJAX_DATA_DIR is not set to the shared data folder")
def test_tinyshakespeare_is_read_from_the_data_dir():
    path = data_lib.tinyshakespeare_path()
    assert path.startswith(os.environ["GPTJAX_DATA_DIR"])
    text = data_lib.read_text_file(path)
    assert text.startswith("First Citizen:") and len(text) == 1115394
