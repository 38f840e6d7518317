"""The workdir: file names in one place, its config, loading a run, quantized copies (old ones too)."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from gptjax import config as config_lib
from gptjax import quantize as quantize_lib
from gptjax import workdir as workdir_lib
from gptjax.errors import UserError
from gptjax.workdir import Workdir


def same_tree(a, b):
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(a), jax.device_get(b))


def test_paths_touch_nothing_and_name_the_layout(tmp_path):
    wd = Workdir(str(tmp_path / "run"))
    assert os.path.basename(wd.config) == "config.json" and os.path.basename(wd.checkpoints) == "checkpoints"
    assert wd.data_id == os.path.join(wd.tokenizer, "data.json")
    assert not os.path.exists(wd.root) and not wd.has_checkpoints()


def test_config_round_trips_and_a_missing_one_is_a_clear_error(tmp_path):
    wd = Workdir(str(tmp_path))
    with pytest.raises(UserError, match="has no config.json; is it a gptjax workdir"):
        workdir_lib.read_config(wd)
    cfg = config_lib.base_config()
    cfg.model.n_layer = 3
    workdir_lib.write_config(wd, cfg)
    assert workdir_lib.read_config(wd).to_dict() == cfg.to_dict()


def test_load_run_restores_the_newest_or_a_given_step(trained_workdir):
    newest = workdir_lib.load_run(trained_workdir)
    assert newest.step == 60 and newest.quantized == "none" and newest.param_bytes == newest.float_bytes
    fifty = workdir_lib.load_run(trained_workdir, step=50)
    assert fifty.step == 50
    assert not np.array_equal(jax.device_get(newest.params["wte"]["embedding"]),
                              jax.device_get(fifty.params["wte"]["embedding"]))
    with pytest.raises(UserError, match=r"no checkpoint at step 7 .*\[.*50, 60\]"):
        workdir_lib.load_run(trained_workdir, step=7)


def test_a_quantized_copy_loads_like_a_workdir_with_the_same_weights(trained_workdir, tmp_path):
    run = workdir_lib.load_run(trained_workdir, quantize="int8")
    assert run.param_bytes < 0.5 * run.float_bytes
    with pytest.raises(UserError, match="needs --quantize int8"):
        workdir_lib.save_quantized(workdir_lib.load_run(trained_workdir), str(tmp_path / "f"))
    out = tmp_path / "int8"
    workdir_lib.save_quantized(run, str(out))
    again = workdir_lib.load_run(str(out))
    assert (again.step, again.quantized, again.param_bytes) == (60, "int8", run.param_bytes)
    same_tree(again.params, run.params)
    with pytest.raises(UserError, match="holds a quantized model of step 60 only"):
        workdir_lib.load_run(str(out), step=50)
    with pytest.raises(UserError, match="exists and is not empty"):
        workdir_lib.save_quantized(run, str(out))


def test_a_quantized_folder_written_by_earlier_versions_still_loads(trained_workdir, tmp_path):
    """Earlier versions wrote the params with orbax's StandardCheckpointer directly."""
    run = workdir_lib.load_run(trained_workdir, quantize="int8")
    old = tmp_path / "old"
    old.mkdir()
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(str(old / "quantized"), run.params)
        ckptr.wait_until_finished()
    (old / "config.json").write_text(config_lib.to_json(run.cfg), encoding="utf-8")
    run.tokenizer.save(str(old / "tokenizer"))
    (old / "quantization.json").write_text(json.dumps(
        {"scheme": "int8", "step": run.step, "param_bytes": run.param_bytes, "float_bytes": run.float_bytes}))
    loaded = workdir_lib.load_run(str(old))
    assert loaded.quantized == "int8" and loaded.step == run.step
    same_tree(loaded.params, run.params)
    x = np.arange(8, dtype=np.int32)[None] % run.tokenizer.vocab_size
    logits = lambda r: np.asarray(nnx.merge(r.graphdef, r.params)(x))
    np.testing.assert_array_equal(logits(loaded), logits(run))
    assert quantize_lib.tree_bytes(loaded.params) == run.param_bytes
