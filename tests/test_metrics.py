"""What a run reports: model table, diagnostics, TensorBoard, console, loss.png, samples."""

import io
import math
import types

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from conftest import small_config
from gptjax import config as config_lib
from gptjax import diagnostics as diag_lib
from gptjax import metrics as metrics_lib
from gptjax import model as model_lib
from gptjax.metrics import read_metrics


def tiny_model(**overrides):
    cfg = config_lib.base_config().model
    cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size = 2, 2, 32, 16, 34
    for k, v in overrides.items():
        cfg[k] = v
    return cfg, model_lib.GPT(cfg, rngs=nnx.Rngs(0))


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

    lines = metrics_lib.model_summary(model_lib.param_counts(params))
    assert table_value(lines, "total") == real
    assert table_value(lines, "non-embedding") == real - V * D - T * D
    assert table_value(lines, "blocks.1") == per_block
    assert ("lm_head" in "\n".join(lines)) == (not cfg.tie_embeddings)
    assert f"{metrics_lib.human_bytes(4 * real)} in float32, {metrics_lib.human_bytes(2 * real)} in bfloat16" \
        in lines[-1]


def test_dead_unit_fraction_on_a_constructed_layer():
    cfg, model = tiny_model(activation="relu", bias=True)
    F = 4 * cfg.n_embd
    # Layer 0: the first 40 hidden units get a bias no input can overcome (always 0 after ReLU),
    # the others one that keeps them always on.
    bias = np.full((F,), 1e4, np.float32)
    bias[:40] = -1e4
    model.blocks[0].mlp.fc.bias.value = jnp.asarray(bias)
    # Layer 1: zero weights, bias -1 on units 0..9 only, +1 elsewhere.
    model.blocks[1].mlp.fc.kernel.value = jnp.zeros_like(model.blocks[1].mlp.fc.kernel.value)
    model.blocks[1].mlp.fc.bias.value = jnp.where(jnp.arange(F) < 10, -1.0, 1.0)
    tokens = jax.random.randint(jax.random.key(0), (4, cfg.block_size), 0, cfg.vocab_size)
    stats = diag_lib.forward_stats(model, tokens)
    assert stats["diag/dead_frac/blocks.0"] == pytest.approx(40 / F)
    assert stats["diag/dead_frac/blocks.1"] == pytest.approx(10 / F)

    # A unit that fires at a single position of the batch is alive.
    h = np.zeros((2, 3, 4), np.float32)
    h[1, 2, 3] = 0.5
    assert float(diag_lib.dead_fraction(jnp.asarray(h))) == pytest.approx(3 / 4)


def test_attention_entropy_of_uniform_attention_is_log_of_the_context():
    cfg, model = tiny_model()
    for block in model.blocks:  # q = k = 0: every query attends uniformly to itself and all before
        block.attn.qkv.kernel.value = jnp.zeros_like(block.attn.qkv.kernel.value)
    tokens = jnp.zeros((2, cfg.block_size), jnp.int32)
    stats = diag_lib.forward_stats(model, tokens)
    expected = np.mean(np.log(np.arange(1, cfg.block_size + 1)))
    for i in range(cfg.n_layer):
        assert stats[f"diag/attn_entropy/blocks.{i}"] == pytest.approx(expected, rel=1e-5)
    assert "diag/dead_frac/blocks.0" not in stats  # GELU has no dead units to count


def test_run_writes_tensorboard_diagnostics_samples_and_loss_png(text_file, tmp_path, capsys):
    from tensorboard.backend.event_processing import event_accumulator

    from gptjax.train import Run

    cfg = small_config(text_file, tmp_path / "run", **{
        "train.diagnostics_every": 5, "train.sample_every": 10, "train.sample_tokens": 20,
        "train.sample_prompt": "All:", "model.activation": "relu"})
    Run(cfg, cfg.workdir).train()
    out = capsys.readouterr().out
    workdir = tmp_path / "run"

    # Console (stdout is not a terminal here): start-up block, plain progress lines, evals, finish block.
    for needle in ("devices:", "mesh:", "tokenizer: char, vocab", "non-embedding", "in float32",
                   "step     10 | eval: train", "step     20 | loss", "ETA", "best val loss", "loss curve"):
        assert needle in out, needle
    assert "\r" not in out  # no progress bar

    records = read_metrics(str(workdir / "metrics.jsonl"))
    diag = [r for r in records if metrics_lib.record_kind(r) == "diag"]
    assert [r["step"] for r in diag] == [5, 10, 15, 20]
    for key in ("grad_norm/blocks.1", "update_ratio/wte", "act_std/blocks.0", "attn_entropy/blocks.1",
                "dead_frac/blocks.0"):
        assert all(math.isfinite(r[f"diag/{key}"]) for r in diag), key
    assert all(0 <= r["diag/dead_frac/blocks.1"] <= 1 for r in diag)

    samples = (workdir / "samples.txt").read_text()
    assert samples.count("--- step ") == 2 and "--- step 20 ---\nAll:" in samples
    assert "step     10 | sample:\nAll:" in out

    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # TensorBoard's own reader gets back exactly what metrics.jsonl holds.
    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = lambda tag: {e.step: e.value for e in acc.Scalars(tag)}
    train = {r["step"]: r for r in records if metrics_lib.record_kind(r) == "train"}
    evals = {r["step"]: r for r in records if metrics_lib.record_kind(r) == "eval"}
    for tag, rows, key in (("train_loss", train, "train_loss"), ("lr", train, "lr"),
                           ("tokens_per_s", train, "tokens_per_s"), ("grad_norm", train, "grad_norm"),
                           ("eval/val_loss", evals, "val_loss"), ("eval/train_loss", evals, "train_loss"),
                           ("diag/dead_frac/blocks.0", {r["step"]: r for r in diag}, "diag/dead_frac/blocks.0")):
        got = tb(tag)
        assert sorted(got) == sorted(rows), tag
        np.testing.assert_allclose([got[s] for s in sorted(rows)], [rows[s][key] for s in sorted(rows)],
                                   rtol=1e-6, err_msg=tag)


def test_a_prompt_the_tokenizer_cannot_encode_fails_before_training(text_file, tmp_path):
    from gptjax.errors import UserError
    from gptjax.train import Run

    cfg = small_config(text_file, tmp_path / "run", **{"train.sample_every": 5, "train.sample_prompt": "Zebra"})
    with pytest.raises(UserError, match="'Z'"):
        Run(cfg, cfg.workdir, quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_wandb_is_optional(tmp_path, monkeypatch):
    log_cfg = ml_collections.ConfigDict({"tensorboard": False, "wandb": True, "wandb_project": "p"})
    said = []
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
    assert metrics_lib.make_sinks(log_cfg, str(tmp_path), {}, say=said.append) == []
    assert "wandb package is not installed" in said[0]

    logged = []

    class FakeRun:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            logged.append("finished")

    fake = types.SimpleNamespace(init=lambda **kw: FakeRun())
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    log = metrics_lib.MetricsLog(str(tmp_path), sinks=metrics_lib.make_sinks(log_cfg, str(tmp_path), {}))
    log.write({"step": 3, "train_loss": 2.5, "lr": 0.1})
    log.write({"step": 3, "train_loss": 2.0, "val_loss": 2.25})
    log.close()
    assert logged == [(3, {"train_loss": 2.5, "lr": 0.1}), (3, {"eval/train_loss": 2.0, "eval/val_loss": 2.25}),
                      "finished"]


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def test_console_bar_on_a_terminal_plain_lines_otherwise_nothing_when_quiet():
    record = {"train_loss": 1.2345, "lr": 1e-3, "tokens_per_s": 5000.0}

    term = FakeTerminal()
    c = metrics_lib.Console(stream=term)
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
    c = metrics_lib.Console(stream=pipe)
    c.start(0, 40, 10)
    for step in (10, 20, 30, 40):
        c.progress(step, record)
    lines = pipe.getvalue().splitlines()
    assert len(lines) == 4 and "\r" not in pipe.getvalue()
    assert lines[-1].startswith("step     40 | loss 1.2345 | lr 1.00e-03 | 5,000 tok/s | ETA")

    quiet = FakeTerminal()
    c = metrics_lib.Console(quiet=True, stream=quiet)
    c.start(0, 40, 10)
    c.progress(10, record)
    c.say("hello")
    c.close()
    assert quiet.getvalue() == ""


def test_bits_per_byte_by_hand():
    from gptjax.metrics import bits_per_byte

    # One nat per token is 1/ln2 bits; 4 tokens spelling 2 bytes: 2/ln2 bits per byte.
    assert bits_per_byte(1.0, 4, 2) == pytest.approx(2 / math.log(2))
    # A char model of "héllo": 5 tokens, 6 UTF-8 bytes, loss ln 2 (one bit) per token -> 5/6 bits per byte.
    assert bits_per_byte(math.log(2), 5, len("héllo".encode())) == pytest.approx(5 / 6)
