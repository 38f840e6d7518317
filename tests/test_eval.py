"""`gptjax.eval`: the one full-split pass (shared with the trainer), perplexity, bits per byte, the CLI."""

import json
import logging
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import run_cli
from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import eval as eval_lib
from gptjax import steps as steps_lib
from gptjax import model as model_lib
from gptjax.errors import UserError


def test_windows_score_every_token_once():
    ids = np.arange(35)
    x, y = data_lib.eval_windows(ids, 8)
    assert x.shape == y.shape == (4, 8)
    np.testing.assert_array_equal(y.reshape(-1), ids[1:33])
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    assert data_lib.eval_windows(ids, 8, max_windows=2)[0].shape == (2, 8)


def test_bits_per_byte_and_perplexity():
    assert math.isclose(eval_lib.bits_per_byte(math.log(2), 100, 100), 1.0)
    # a uniform guess over 256 byte values costs 8 bits per byte; 4 bytes per token: 2 bits per byte
    assert math.isclose(eval_lib.bits_per_byte(math.log(256), 50, 50), 8.0)
    assert math.isclose(eval_lib.bits_per_byte(math.log(256), 50, 200), 2.0)
    assert math.isclose(eval_lib.perplexity(math.log(65)), 65.0)
    assert math.isfinite(eval_lib.perplexity(1e6))  # a diverged loss does not overflow


def test_full_split_loss_is_the_mean_over_every_window_with_one_compiled_shape():
    c = config_lib.base_config().model
    c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size = 2, 2, 32, 8, 40
    graphdef, state = nnx.split(model_lib.GPT(c, rngs=nnx.Rngs(0)))
    params = jax.tree.map(lambda a: a * 10 if a.ndim == 2 else a, nnx.to_pure_dict(state))
    ids = np.random.default_rng(0).integers(0, 40, 8 * 7 + 1)
    x, y = data_lib.eval_windows(ids, 8)  # 7 windows: batches of 3 leave a last batch of 1
    logits = nnx.merge(graphdef, params)(jnp.asarray(x))
    log_p = jax.nn.log_softmax(np.asarray(logits, np.float64), axis=-1)
    expected = -np.take_along_axis(log_p, y[..., None], axis=-1).mean()
    compiled = []
    handler = logging.Handler()
    handler.emit = lambda r: compiled.append(r.getMessage()) if r.getMessage().startswith("Compiling jit(eval_sum)") else None
    logging.getLogger("jax").addHandler(handler)
    try:
        with jax.log_compiles():
            step = steps_lib.make_eval_sum_step(graphdef)
            got = eval_lib.full_split_loss(step, params, x, y, batch_size=3)
    finally:
        logging.getLogger("jax").removeHandler(handler)
    assert math.isclose(got, expected, rel_tol=1e-5), (got, expected)
    assert len(compiled) == 1, compiled
    assert math.isclose(eval_lib.full_split_loss(step, params, x, y, batch_size=7), got, rel_tol=1e-6)


def test_eval_of_a_missing_step_lists_the_saved_ones(trained_workdir):
    with pytest.raises(UserError, match=r"no checkpoint at step 3 .*\[.*50, 60\]"):
        eval_lib.run_eval(trained_workdir, step=3)


@pytest.mark.slow
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


def test_bits_per_byte_by_hand():
    from gptjax.eval import bits_per_byte

    # One nat per token is 1/ln2 bits; 4 tokens spelling 2 bytes: 2/ln2 bits per byte.
    assert bits_per_byte(1.0, 4, 2) == pytest.approx(2 / math.log(2))
    # A char model of "héllo": 5 tokens, 6 UTF-8 bytes, loss ln 2 (one bit) per token -> 5/6 bits per byte.
    assert bits_per_byte(math.log(2), 5, len("héllo".encode())) == pytest.approx(5 / 6)
