import jax
import numpy as np

from conftest import small_config
from gptjax import data as data_lib
from gptjax.train import Run


def test_save_then_restore_gives_identical_params_and_next_step_loss(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run")
    run = Run(cfg, cfg.workdir, quiet=True)
    run.train(stop_at=10)
    params_before = jax.device_get(run.state["params"])
    x, y = run.batch(run.train_ids, 10, data_lib.TRAIN_STREAM)
    _, out_before = run.train_step(run.state, x, y)

    again = Run(small_config(text_file, tmp_path / "run"), cfg.workdir, quiet=True)
    assert again.resumed_from == 10
    params_after = jax.device_get(again.state["params"])
    jax.tree.map(np.testing.assert_array_equal, params_before, params_after)
    assert int(again.state["step"]) == 10
    _, out_after = again.train_step(again.state, x, y)
    assert float(out_before["loss"]) == float(out_after["loss"])


def test_checkpoint_folder_layout(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run", **{"train.steps": 10})
    Run(cfg, cfg.workdir, quiet=True).train()
    ckpt = tmp_path / "run" / "checkpoints" / "10"
    assert (ckpt / "params").is_dir() and (ckpt / "opt_state").is_dir() and (ckpt / "meta").is_dir()
