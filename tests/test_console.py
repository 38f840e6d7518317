"""The console: model table, progress bar or plain lines, the MFU label."""

import io

import jax
import pytest
from flax import nnx

from conftest import tiny_model
from gptjax import console as console_lib
from gptjax import params as params_lib


def table_value(lines, label):
    row = next(l for l in lines if l.split()[0] == label)
    return int(row.split()[1].replace(",", ""))


@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": False, "bias": True, "qkv_bias": True}])
def test_summary_table_total_is_the_real_parameter_count(overrides):
    cfg, model = tiny_model(**overrides)
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    real = sum(int(x.size) for x in jax.tree.leaves(params))
    V, T, D, L = cfg.vocab_size, cfg.block_size, cfg.n_embd, cfg.n_layer
    # By hand: embeddings, per block qkv + proj + fc + proj + two LayerNorms, final LayerNorm, head.
    b = cfg.bias
    per_block = 3 * D * D + D * D + 8 * D * D + 2 * D + (3 * D if cfg.qkv_bias else 0) + (D + 4 * D + D + 2 * D) * b
    by_hand = V * D + T * D + L * per_block + D * (1 + b) + (0 if cfg.tie_embeddings else V * D)
    assert real == by_hand

    lines = console_lib.model_summary(params_lib.param_counts(params))
    assert table_value(lines, "total") == real
    assert table_value(lines, "non-embedding") == real - V * D - T * D
    assert table_value(lines, "blocks.1") == per_block
    assert ("lm_head" in "\n".join(lines)) == (not cfg.tie_embeddings)
    assert f"{console_lib.format_size(4 * real, 'B')} in float32, {console_lib.format_size(2 * real, 'B')} in " \
           "bfloat16" in lines[-1]


def test_sizes_and_durations_read_as_people_write_them():
    assert console_lib.format_size(3_200_000, "B") == "3.20MB" and console_lib.format_size(950, "B") == "950B"
    assert console_lib.format_duration(44) == "00:44" and console_lib.format_duration(3725) == "1:02:05"


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_console_bar_on_a_terminal_plain_lines_otherwise_nothing_when_quiet():
    record = {"train_loss": 1.2345, "lr": 1e-3, "tokens_per_s": 5000.0}

    term = FakeTerminal()
    c = console_lib.Console(stream=term)
    c.start(0, 40, 10)
    for step in range(1, 41):
        c.advance()
        if step % 10 == 0:
            c.progress(step, record)
    c.say("step     40 | eval: train 1.0, val 1.1")
    c.close()
    text = term.getvalue()
    assert "\r" in text and "loss=1.2345" in text and "40/40" in text and "eval: train 1.0" in text

    pipe = io.StringIO()
    c = console_lib.Console(stream=pipe)
    c.start(0, 40, 10)
    for step in (10, 20, 30, 40):
        c.progress(step, record)
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in pipe.getvalue()
    assert lines[-1].startswith("step     40 | loss 1.2345 | lr 1.00e-03 | 5,000 tok/s | ETA 00:00")

    quiet = FakeTerminal()
    c = console_lib.Console(quiet=True, stream=quiet)
    c.start(0, 40, 10)
    c.progress(10, record)
    c.say("hello")
    c.close()
    assert quiet.getvalue() == ""


def test_mfu_from_a_measured_peak_reads_as_an_estimate():
    pipe = io.StringIO()
    c = console_lib.Console(stream=pipe)
    c.start(0, 20, 10)
    c.progress(10, {"train_loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, "mfu": 0.486})
    c.progress(20, {"train_loss": 1.0, "lr": 1e-3, "tokens_per_s": 10.0, "mfu": 0.486, "mfu_estimate": True})
    first, second = pipe.getvalue().splitlines()
    assert "| MFU 48.6% |" in first
    assert "| MFU ~49% (est.) |" in second
