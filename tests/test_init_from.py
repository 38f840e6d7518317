"""gptjax.init_from: a run that starts from a GPT-2 checkpoint or another workdir."""

import json
import os

import numpy as np
import pytest

from gptjax import init_from
from gptjax.errors import UserError

from conftest import load_config, run_cli, shared_data_dir

DATA = shared_data_dir()
TINY = os.path.join(DATA, "hf-gpt2-tiny") if DATA else None
pytestmark = pytest.mark.skipif(not (TINY and os.path.isdir(TINY)), reason="needs $GPTJAX_DATA_DIR/hf-gpt2-tiny")


@pytest.fixture(scope="module")
def tiny():
    return init_from.read_hf(TINY)


def finetune_config(**model):
    cfg = load_config("finetune_shakespeare")
    cfg.train.init_from = f"hf:{TINY}"
    cfg.model.update(model)
    return cfg


def test_the_run_takes_the_models_shape_and_tokenizer(tiny):
    cfg = finetune_config(block_size=32)
    init_from.adopt(cfg, tiny)
    m = cfg.model
    assert (m.n_layer, m.n_head, m.n_embd, m.vocab_size, m.activation) == (2, 3, 96, 211, "gelu_tanh")
    assert m.bias and m.qkv_bias and cfg.data.tokenizer == "char" and m.block_size == 32  # cropped, not replaced


def test_a_config_asking_for_another_shape_or_tokenizer_is_one_error_listing_each(tiny):
    cfg = finetune_config(n_layer=6, block_size=512)
    cfg.data.tokenizer = "gpt2"
    with pytest.raises(UserError) as e:
        init_from.adopt(cfg, tiny)
    msg = str(e.value)
    assert "model.n_layer=6 (the model has 2)" in msg and "model.block_size=512 (the model has 128)" in msg
    assert "data.tokenizer='gpt2' (the model's is 'char')" in msg and msg.count("\n") == 0


def test_initial_params_crop_the_positions_and_keep_the_weights(tiny):
    import jax

    cfg = finetune_config(block_size=32)
    init_from.adopt(cfg, tiny)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    params = init_from.initial_params(tiny, cfg.model, jax.tree.map(lambda _: sharding, tiny.params))
    assert params["wpe"]["embedding"].shape == (32, 96)
    np.testing.assert_array_equal(params["wpe"]["embedding"], tiny.params["wpe"]["embedding"][:32])
    np.testing.assert_array_equal(params["blocks"][1]["mlp"]["fc"]["kernel"],
                                  tiny.params["blocks"][1]["mlp"]["fc"]["kernel"])


def test_a_scanned_model_starts_from_the_per_layer_weights(tiny):
    import jax

    from gptjax import config as config_lib
    from gptjax import sharding, steps

    losses = []
    for scan in (False, True):
        cfg = finetune_config(block_size=32, scan_layers=scan)
        init_from.adopt(cfg, tiny)
        setup = steps.init_train_state(cfg, sharding.make_mesh(config_lib.base_config().mesh, jax.devices()[:1]),
                                       params=init_from.initial_params(tiny, cfg.model, None))
        x = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (2, 33))
        losses.append(float(steps.make_eval_step(setup)(setup.state["params"], x[:, :-1], x[:, 1:])))
    assert setup.state["params"]["blocks"]["mlp"]["fc"]["kernel"].shape == (2, 96, 384)
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-5)


def test_a_missing_workdir_is_a_clear_error(tmp_path):
    with pytest.raises(UserError, match="no such workdir"):
        init_from.read(str(tmp_path / "nothing"))


FINETUNE = ["--config", "configs/finetune_shakespeare.py", "--config.model.block_size=32",
            "--config.train.batch_size=4", "--config.train.eval_every=10", "--config.train.eval_steps=4",
            "--config.train.log_every=5", "--config.train.checkpoint_every=10", "--config.train.lr=1e-3",
            "--config.train.min_lr=1e-3"]


def records(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.mark.slow
def test_finetune_from_the_cli_lowers_val_loss_and_resumes_exactly(tmp_path):
    def finetune(workdir, *extra):
        proc = run_cli("gptjax.train", *FINETUNE, f"--config.train.init_from=hf:{TINY}", f"--workdir={workdir}",
                       *extra, env={"GPTJAX_DATA_DIR": DATA})
        assert proc.returncode == 0, proc.stderr
        return proc

    whole = tmp_path / "whole"
    finetune(whole, "--config.train.steps=20")
    val = {r["step"]: r["val_loss"] for r in records(whole) if "val_loss" in r}
    assert val[20] < val[10] < val[0]
    part = tmp_path / "part"
    finetune(part, "--config.train.steps=10")
    proc = finetune(part, "--config.train.steps=20", "--config.train.allow_config_change=True")
    assert "resumed from the checkpoint at step 10" in proc.stdout
    losses = lambda w: [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in records(w)]
    assert losses(whole) == losses(part)  # bitwise: the same steps from the same state
    assert [r["step"] for r in records(part) if "lr" in r] == [5, 10, 15, 20]
