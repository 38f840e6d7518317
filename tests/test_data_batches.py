import subprocess
import sys

import numpy as np
import pytest

from conftest import ROOT
from gptjax import data as data_lib
from gptjax.data import batches
from gptjax.errors import UserError


def test_batch_is_pure_function_of_seed_and_step():
    ids = np.arange(1000, dtype=np.int32)
    x1, y1 = batches.get_batch(ids, 16, 8, seed=3, step=41)
    x2, y2 = batches.get_batch(ids, 16, 8, seed=3, step=41)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1[:, :-1], x1[:, 1:])  # targets are inputs shifted by one
    x3, _ = batches.get_batch(ids, 16, 8, seed=3, step=42)
    assert not np.array_equal(x1, x3)
    assert x1.shape == (8, 16) and x1.dtype == np.int32


def test_streams_draw_different_windows_and_rows_cut_a_share():
    ids = np.arange(5000, dtype=np.int32)
    train, _ = batches.get_batch(ids, 8, 6, seed=1, step=5, stream=batches.TRAIN_STREAM)
    val, _ = batches.get_batch(ids, 8, 6, seed=1, step=5, stream=batches.EVAL_VAL_STREAM)
    assert not np.array_equal(train, val)
    share, _ = batches.get_batch(ids, 8, 6, seed=1, step=5, rows=np.array([1, 4]))
    np.testing.assert_array_equal(share, train[[1, 4]])


@pytest.mark.slow
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
        x, y = batches.get_batch(ids, 4, 4, seed=0, step=step)
        seen.update(y.ravel().tolist())
    assert max(seen) == 19 and min(seen) == 1


def test_too_short_split_names_block_size():
    with pytest.raises(UserError, match="block_size"):
        batches.check_length(np.zeros(10, np.int32), 16, "validation")
    batches.check_length(np.zeros(17, np.int32), 16, "validation")  # block_size + 1 is enough


def test_eval_windows_are_consecutive_and_cover_the_split_once():
    ids = np.arange(35, dtype=np.uint16)
    x, y = batches.eval_windows(ids, 8)
    assert x.shape == (4, 8) and x.dtype == np.int32
    np.testing.assert_array_equal(x.ravel(), np.arange(32))
    np.testing.assert_array_equal(y.ravel(), np.arange(1, 33))
    assert batches.eval_windows(ids, 8, max_windows=2)[0].shape == (2, 8)
    with pytest.raises(UserError, match="fewer than block_size"):
        batches.eval_windows(ids[:8], 8)
