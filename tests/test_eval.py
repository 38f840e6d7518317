"""`gptjax.eval`: windows cover the split once, bits per byte, the CLI with --quantize."""

import json
import math

import numpy as np

from conftest import run_cli
from gptjax import eval as eval_lib


def test_windows_score_every_token_once():
    ids = np.arange(35)
    x, y = eval_lib.eval_windows(ids, 8)
    assert x.shape == y.shape == (4, 8)
    np.testing.assert_array_equal(y.reshape(-1), ids[1:33])
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert eval_lib.eval_windows(ids, 8, max_windows=2)[0].shape == (2, 8)


def test_bits_per_byte():
    assert math.isclose(eval_lib.bits_per_byte(math.log(2) * 100, 100), 1.0)
    # a uniform guess over 256 byte values costs 8 bits per byte
    assert math.isclose(eval_lib.bits_per_byte(50 * math.log(256), 50), 8.0)


def test_eval_cli_reports_float_and_int8(text_file, tmp_path):
    from test_cli import train_cli

    workdir = tmp_path / "run"
    assert train_cli(text_file, workdir, "--config.train.steps=10").returncode == 0
    proc = run_cli("gptjax.eval", f"--workdir={workdir}", "--quantize=int8", "--json")
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["model"] for r in rows] == ["float", "int8"]
    f32, i8 = rows
    assert f32["tokens"] == i8["tokens"] > 0 and f32["step"] == 10
    assert math.isclose(f32["perplexity"], math.exp(f32["val_loss"]), rel_tol=1e-9)
    assert math.isclose(f32["bits_per_byte"], f32["val_loss"] * f32["tokens"] / (math.log(2) * f32["bytes"]),
                        rel_tol=1e-9)
    assert i8["param_bytes"] <= 0.3 * f32["param_bytes"]
    assert abs(i8["val_loss"] / f32["val_loss"] - 1) < 0.01
    bad = run_cli("gptjax.eval", f"--workdir={workdir}", "--step=3")
    assert bad.returncode == 2 and "no checkpoint at step 3" in bad.stderr and "Traceback" not in bad.stderr
