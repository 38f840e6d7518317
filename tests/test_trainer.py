import json
import math
import os

import numpy as np
import pytest

from conftest import STORIES, run_cli, small_config, write_folder
from gptjax import data as data_lib
from gptjax import config as config_lib
from gptjax.errors import UserError
from gptjax.logs import read_metrics
from gptjax.trainer import build as Run


def losses_by_step(workdir):
    return {r["step"]: r["train_loss"] for r in read_metrics(f"{workdir}/metrics.jsonl") if "lr" in r}


def test_training_lowers_the_loss(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run", **{"train.steps": 60, "train.lr": 3e-3})
    out = Run(cfg, cfg.workdir, quiet=True).train()
    records = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    evals = [r for r in records if "val_loss" in r]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 60
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.0
    assert out["step"] == 60
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["model"]["vocab_size"] > 0 and saved["train"]["steps"] == 60


def test_resume_continues_exactly_where_it_stopped(text_file, tmp_path):
    whole = small_config(text_file, tmp_path / "whole")
    Run(whole, whole.workdir, quiet=True).train()

    part = small_config(text_file, tmp_path / "part")
    Run(part, part.workdir, quiet=True).train(stop_at=10)
    resumed = Run(small_config(text_file, tmp_path / "part"), part.workdir, quiet=True)
    assert resumed.resumed_from == 10
    resumed.train()

    a, b = losses_by_step(tmp_path / "whole"), losses_by_step(tmp_path / "part")
    assert sorted(a) == sorted(b) == [5, 10, 15, 20]  # metrics append, no duplicates
    np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=1e-6)


def test_metrics_written_after_the_last_checkpoint_are_dropped_on_resume(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run")
    run = Run(cfg, cfg.workdir, quiet=True)
    run.train(stop_at=10)
    run.report.metrics.write({"step": 15, "train_loss": 9.0, "lr": 0.1})  # as if it crashed after step 15
    Run(small_config(text_file, tmp_path / "run"), cfg.workdir, quiet=True).train()
    steps = [r["step"] for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "lr" in r]
    assert steps == [5, 10, 15, 20]


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model.n_embd": 30, "model.n_head": 4}, r"n_embd \(30\) must be divisible by model.n_head \(4\)"),
        ({"model.block_size": 5000}, "fewer than model.block_size"),
        ({"train.batch_size": 0}, "train.batch_size must be a positive"),
        ({"model.activation": "swish"}, "model.activation"),
        ({"model.matmul": "fast"}, "model.matmul must be one of auto, xla, tokens"),
        ({"train.muon_ns_steps": 0}, "train.muon_ns_steps must be a positive integer, got 0"),
        ({"model.scan_unroll": 0}, "model.scan_unroll must be a positive integer, got 0"),
    ],
)
def test_bad_config_values_are_clear(text_file, tmp_path, overrides, match):
    cfg = small_config(text_file, tmp_path / "run", **overrides)
    with pytest.raises(UserError, match=match):
        Run(cfg, cfg.workdir, quiet=True)


def test_config_json_round_trips():
    cfg = config_lib.base_config()
    cfg.model.n_layer = 7
    again = config_lib.from_json(config_lib.to_json(cfg))
    assert again.model.n_layer == 7 and again.to_dict() == cfg.to_dict()


def test_evaluate_reports_perplexity_and_bits_per_byte(tmp_path):
    text = tmp_path / "t.txt"
    text.write_text("naïve café, déjà vu; el niño.\n" * 60, encoding="utf-8")
    cfg = small_config(str(text), tmp_path / "run", **{"train.eval_full": True, "train.steps": 1})
    run = Run(cfg, str(tmp_path / "run"), quiet=True)
    run.state["step"] = run.state["step"] + 1  # the last step: include the full pass
    ev = run.evaluate(run.state["params"], full=True)
    t = cfg.train
    n_bytes = sum(len(run.data.tokenizer.decode(y).encode()) for i in range(t.eval_steps)
                  for y in data_lib.get_batch(run.data.val_ids, 16, t.batch_size, t.seed, i, data_lib.EVAL_VAL_STREAM)[1])
    n_tokens = t.eval_steps * t.batch_size * 16
    assert n_bytes > n_tokens  # accented letters are two bytes
    assert ev["val_bpb"] == pytest.approx(ev["val_loss"] * n_tokens / (math.log(2) * n_bytes), rel=1e-6)
    assert ev["val_ppl"] == pytest.approx(math.exp(ev["val_loss"]), rel=1e-6)
    n_windows = (len(run.data.val_ids) - 1) // 16
    assert ev["val_full_tokens"] == n_windows * 16
    full_bytes = len(run.data.tokenizer.decode(np.asarray(run.data.val_ids[1:n_windows * 16 + 1])).encode())
    assert ev["val_full_bpb"] == pytest.approx(ev["val_full_loss"] * n_windows * 16 / (math.log(2) * full_bytes),
                                               rel=1e-6)
    assert abs(ev["val_full_loss"] - ev["val_loss"]) < 0.1  # an untrained model: both near ln(vocab)


def test_a_failed_data_check_leaves_no_tokenizer_in_the_workdir(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run", **{"model.block_size": 100_000})
    with pytest.raises(UserError, match="model.block_size"):
        Run(cfg, cfg.workdir, quiet=True)
    assert not os.path.exists(tmp_path / "run" / "tokenizer")  # nothing that a corrected command trips over
    cfg = small_config(text_file, tmp_path / "run", **{"train.steps": 1})
    Run(cfg, cfg.workdir, quiet=True)
    assert sorted(os.listdir(tmp_path / "run" / "tokenizer")) == ["data.json", "tokenizer.json"]


# ----------------------------------------------------------------------------- command lines

CLI_MODEL = ["--config.model.n_layer=2", "--config.model.n_head=2", "--config.model.n_embd=32",
             "--config.model.block_size=16", "--config.train.batch_size=4", "--config.train.steps=6",
             "--config.train.eval_every=6", "--config.train.eval_steps=2", "--config.train.warmup_steps=1"]


@pytest.mark.slow
def test_text_runs_on_a_folder_and_on_jsonl_with_a_custom_field(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    folder = write_folder(tmp_path / "mytexts")
    proc = run_cli("gptjax.train", "--config", "configs/tiny.py", f"--workdir={tmp_path / 'a'}", *CLI_MODEL,
                   "--config.data.dataset=text", f"--config.data.path={folder}", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "step      6 | eval" in proc.stdout
    jsonl = tmp_path / "stories.jsonl"
    jsonl.write_text("".join(json.dumps({"story": s * 4, "n": i}) + "\n" for i, s in enumerate(STORIES * 3)))
    proc = run_cli("gptjax.train", "--config", "configs/tiny.py", f"--workdir={tmp_path / 'b'}", *CLI_MODEL,
                   "--config.data.dataset=text", f"--config.data.path={jsonl}", "--config.data.text_field=story",
                   "--config.data.tokenizer=sentencepiece", "--config.data.vocab_size=300", env=env)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(l) for l in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert any("val_bpb" in r and "val_ppl" in r for r in records)
    out = run_cli("gptjax.sample", f"--workdir={tmp_path / 'b'}", "--prompt=Tom", "--max_new_tokens=5", env=env)
    assert out.returncode == 0 and out.stdout.startswith("Tom"), out.stderr


def test_a_prompt_the_tokenizer_cannot_encode_fails_before_training(text_file, tmp_path):
    from gptjax.errors import UserError
    from gptjax.trainer import build as Run

    cfg = small_config(text_file, tmp_path / "run", **{"train.sample_every": 5, "train.sample_prompt": "Zebra"})
    with pytest.raises(UserError, match="'Z'"):
        Run(cfg, cfg.workdir, quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


# ----------------------------------------------------------------------------- failed starts leave nothing that blocks

def _trains(cfg):
    out = Run(cfg, cfg.workdir, quiet=True).train()
    assert out["step"] == cfg.train.steps


@pytest.mark.parametrize("bad, match", [
    ({"mesh.data": 3}, r"= 3 devices"),  # one CPU device: a mesh of 3 cannot be laid out
    ({"train.batch_size": 5, "train.grad_accum": 2}, r"batch_size \(5\) must be divisible by train.grad_accum"),
    ({"model.n_head": 3}, r"n_embd \(32\) must be divisible by model.n_head \(3\)"),
    ({"model.block_size": 100_000}, r"model.block_size"),
])
def test_a_failed_start_then_the_corrected_command_in_the_same_workdir(text_file, tmp_path, bad, match):
    overrides = {"train.steps": 4, "train.eval_every": 4, "train.checkpoint_every": 4}
    with pytest.raises(UserError, match=match):
        Run(small_config(text_file, tmp_path / "run", **overrides, **bad), str(tmp_path / "run"), quiet=True)
    left = sorted(os.listdir(tmp_path / "run")) if os.path.exists(tmp_path / "run") else []
    assert left in ([], ["train.lock"]), left  # nothing that a corrected command trips over
    _trains(small_config(text_file, tmp_path / "run", **overrides))


def test_a_run_that_diverges_before_its_first_checkpoint_does_not_block_a_lower_lr(text_file, tmp_path):
    from gptjax import faults

    wd = tmp_path / "run"
    diverging = small_config(text_file, wd, **{"train.lr": 1e6, "train.warmup_steps": 0, "train.max_bad_steps": 2,
                                               "train.checkpoint_every": 100, "train.steps": 20})
    with pytest.raises(faults.TrainingStopped, match="training diverged"):
        Run(diverging, str(wd), quiet=True).train()
    assert not (wd / "checkpoints").exists() or not os.listdir(wd / "checkpoints")
    assert (wd / "config.json").exists()  # what the failed run left: no run to protect
    _trains(small_config(text_file, wd, **{"train.lr": 1e-3, "train.steps": 10}))


def test_a_workdir_that_is_a_file_is_one_clear_error(text_file, tmp_path):
    path = tmp_path / "some.txt"
    path.write_text("not a folder")
    with pytest.raises(UserError, match="is a file, not a folder"):
        Run(small_config(text_file, path), str(path), quiet=True)


# ----------------------------------------------------------------------------- one trainer per workdir

def test_a_second_trainer_on_a_live_workdir_is_refused_until_the_first_ends(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run", **{"train.steps": 4, "train.checkpoint_every": 4})
    first = Run(cfg, cfg.workdir, quiet=True)
    with pytest.raises(UserError, match=rf"being trained by a live process \(pid {os.getpid()}\)"):
        Run(small_config(text_file, tmp_path / "run"), cfg.workdir, quiet=True)
    first.train()  # the lock goes with the run
    again = Run(small_config(text_file, tmp_path / "run", **{"train.steps": 4}), cfg.workdir, quiet=True)
    assert again.resumed_from == 4


# ----------------------------------------------------------------------------- diagnostics and samples

def test_diagnostics_are_recorded_at_every_interval_whatever_steps_per_call(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run", **{"train.steps": 20, "train.steps_per_call": 5,
                                                      "train.log_every": 10, "train.diagnostics_every": 10,
                                                      "model.activation": "relu"})
    Run(cfg, cfg.workdir, quiet=True).train()
    diag = [r for r in read_metrics(str(tmp_path / "run" / "metrics.jsonl")) if "diag/grad_norm/wte" in r]
    assert [r["step"] for r in diag] == [10, 20]
    assert all(0 <= r["diag/dead_frac/blocks.0"] <= 1 for r in diag)


def test_the_tiny_config_writes_samples_as_it_learns():
    from conftest import load_config

    c = load_config("tiny")
    assert c.train.sample_every and c.train.steps % c.train.sample_every == 0
