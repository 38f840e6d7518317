"""to_loss.py: time, steps and tokens to a validation loss, from scratch."""

import json

import numpy as np
import pytest

from conftest import run_cli, small_config
from gptjax import to_loss


def test_the_first_evaluation_at_or_below_the_target_is_reported(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "w", **{"train.steps": 20, "train.steps_per_call": 1})
    rec = to_loss.time_to_loss(cfg, target=100.0, eval_every=5, full=True)
    assert rec["reached"] and rec["step"] == 5 and rec["tokens"] == 5 * 4 * 16
    curve = rec["curve"]
    assert [c[0] for c in curve] == [5, 10, 15, 20]
    assert rec["val_loss"] == pytest.approx(curve[0][1], abs=1e-4)
    assert rec["wall_s"] == pytest.approx(rec["compile_s"] + rec["train_s"] + rec["eval_s"])
    assert rec["final"]["step"] == 20 and rec["final"]["val_loss"] < curve[0][1]

    # The first evaluation below a target between the first and last losses, not a later one.
    target = (curve[1][1] + curve[2][1]) / 2
    again = to_loss.time_to_loss(cfg, target=target, eval_every=5)
    assert again["reached"] and again["step"] == min(c[0] for c in curve if c[1] <= target)
    assert "final" not in again


def test_an_unreached_target_says_so_and_reports_where_the_run_ended(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "w", **{"train.steps": 10, "train.steps_per_call": 5})
    rec = to_loss.time_to_loss(cfg, target=0.01, eval_every=3)  # rounded up to 5, a whole compiled call
    assert not rec["reached"] and rec["step"] is None and rec["wall_s"] is None
    assert rec["eval_every"] == 5 and rec["final"]["step"] == 10


@pytest.mark.slow
def test_losses_are_the_trainers(text_file, tmp_path):
    from gptjax.logs import read_metrics
    from gptjax.trainer import build as Run

    cfg = small_config(text_file, tmp_path / "run", **{"train.steps": 20, "train.optimizer": "muon"})
    Run(cfg, cfg.workdir, quiet=True).train()
    from gptjax.workdir import Workdir

    trained = {r["step"]: r["val_loss"] for r in read_metrics(Workdir(cfg.workdir).metrics) if "val_loss" in r and r["step"]}
    rec = to_loss.time_to_loss(small_config(text_file, tmp_path / "x", **{"train.steps": 20,
                                                                          "train.optimizer": "muon"}),
                               target=0.0, eval_every=10, full=True)
    np.testing.assert_allclose([c[1] for c in rec["curve"]], [trained[10], trained[20]], atol=1e-4)


@pytest.mark.slow
def test_cli_prints_one_json_line(text_file):
    proc = run_cli("gptjax.to_loss", "--to_loss=100", "--config=configs/tiny.py", f"--config.data.path={text_file}",
                   "--config.model.n_layer=1", "--config.model.n_embd=32", "--config.model.block_size=16",
                   "--config.train.steps=20", "--config.train.batch_size=4")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1
    rec = json.loads(lines[0])
    # Every 25 steps rounds up to 30 (tiny.py runs 10 steps a call): the first evaluation is the last, at 20.
    assert rec["reached"] and rec["step"] == 20 and rec["eval_every"] == 30
    assert rec["target"] == 100.0 and rec["compile_s"] > 0
