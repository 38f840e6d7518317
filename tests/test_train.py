import json

import numpy as np
import pytest

from conftest import small_config
from gptjax import config as config_lib
from gptjax.errors import UserError
from gptjax.logs import read_metrics
from gptjax.train import Run


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
    run.metrics.write({"step": 15, "train_loss": 9.0, "lr": 0.1})  # as if it crashed after step 15
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


def test_a_prompt_the_tokenizer_cannot_encode_fails_before_training(text_file, tmp_path):
    from gptjax.errors import UserError
    from gptjax.train import Run

    cfg = small_config(text_file, tmp_path / "run", **{"train.sample_every": 5, "train.sample_prompt": "Zebra"})
    with pytest.raises(UserError, match="'Z'"):
        Run(cfg, cfg.workdir, quiet=True)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
