"""`gptjax.eval`: windows cover the split once, bits per byte, the CLI with --quantize."""

import json
import math

import numpy as np
import pytest

from conftest import run_cli
from gptjax import data as data_lib
from gptjax import eval as eval_lib
from gptjax.eval import bits_per_byte
from gptjax.errors import UserError


def test_windows_score_every_token_once():
    ids = np.arange(35)
    x, y = data_lib.eval_windows(ids, 8)
    assert x.shape == y.shape == (4, 8)
    np.testing.assert_array_equal(y.reshape(-1), ids[1:33])
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert data_lib.eval_windows(ids, 8, max_windows=2)[0].shape == (2, 8)


def test_bits_per_byte():
    assert math.isclose(bits_per_byte(math.log(2), 100, 100), 1.0)
    # a uniform guess over 256 byte values costs 8 bits per byte; 4 bytes per token: 2 bits per byte
    assert math.isclose(bits_per_byte(math.log(256), 50, 50), 8.0)
    assert math.isclose(bits_per_byte(math.log(256), 50, 200), 2.0)


def test_eval_cli_reports_float_and_int8(trained_workdir):
    proc = run_cli("gptjax.eval", f"--workdir={trained_workdir}", "--quantize=int8", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["model"] for r in rows] == ["float", "int8"]
    f32, i8 = rows
    assert f32["tokens"] == i8["tokens"] > 0 and f32["step"] == 60
    assert f32["bytes"] == f32["tokens"]  # ASCII text, one character per token
    assert math.isclose(f32["perplexity"], math.exp(f32["val_loss"]), rel_tol=1e-9)
    assert math.isclose(f32["bits_per_byte"], f32["val_loss"] * f32["tokens"] / (math.log(2) * f32["bytes"]),
                        rel_tol=1e-9)
    assert i8["param_bytes"] <= 0.3 * f32["param_bytes"]
    assert abs(i8["val_loss"] / f32["val_loss"] - 1) < 0.01


def test_eval_of_a_missing_step_lists_the_saved_ones(trained_workdir):
    with pytest.raises(UserError, match=r"no checkpoint at step 3 .*\[.*50, 60\]"):
        eval_lib.run_eval(trained_workdir, step=3)


def test_bits_per_byte_by_hand():
    from gptjax.eval import bits_per_byte

    # One nat per token is 1/ln2 bits; 4 tokens spelling 2 bytes: 2/ln2 bits per byte.
    assert bits_per_byte(1.0, 4, 2) == pytest.approx(2 / math.log(2))
    # A char model of "héllo": 5 tokens, 6 UTF-8 bytes, loss ln 2 (one bit) per token -> 5/6 bits per byte.
    assert bits_per_byte(math.log(2), 5, len("héllo".encode())) == pytest.approx(5 / 6)
