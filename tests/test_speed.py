"""Speed switches change how the step runs, never what it computes."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import run_cli, small_config
from gptjax import runtime
from gptjax.logs import read_metrics
from gptjax.steps import loss_fn
from gptjax.trainer import build as Run


def _leaves(tree):
    return [np.asarray(a, np.float32) for a in jax.tree.leaves(tree)]


@pytest.mark.slow
def test_bfloat16_compute_trains_as_well_as_float32(text_file, tmp_path):
    # 300 steps of a 2-layer, 32-wide model: the same question as the tiny
    # config's (does bf16 compute with f32 master weights lose accuracy?) at a
    # test's cost.
    final = {}
    for dtype in ("float32", "bfloat16"):
        cfg = small_config(text_file, tmp_path / dtype, **{
            "model.dtype": dtype, "train.steps": 300, "train.lr": 3e-3, "train.eval_every": 300,
            "train.checkpoint_every": 300, "train.log_every": 50, "train.steps_per_call": 10,
        })
        run = Run(cfg, cfg.workdir, quiet=True)
        assert run.state["params"]["wte"]["embedding"].dtype == jnp.float32  # master weights stay f32
        final[dtype] = run.train()["val_loss"]
    assert final["float32"] < 2.5  # it did learn
    assert abs(final["bfloat16"] - final["float32"]) <= 0.02 * final["float32"]


def test_remat_gives_the_same_loss_and_gradients(text_file, tmp_path):
    out = {}
    for remat in (False, True):
        cfg = small_config(text_file, tmp_path / str(remat), **{"model.remat": remat, "model.dropout": 0.1})
        run = Run(cfg, cfg.workdir, quiet=True)
        x, y = run.batch(run.data.train_ids, 0, 0)
        key = jax.random.key(3)
        out[remat] = jax.jit(jax.value_and_grad(lambda p: loss_fn(run.setup.graphdef, p, x, y, key)))(run.state["params"])
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6)
    for a, b in zip(_leaves(out[True][1]), _leaves(out[False][1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_tokens_matmul_gives_the_same_loss_and_gradients(text_file, tmp_path, dtype):
    # model.matmul=tokens (the CPU default) only rewrites how the Dense
    # layers' backward pass is laid out; autodiff through XLA's dot is the reference.
    out = {}
    for impl in ("xla", "tokens"):
        cfg = small_config(text_file, tmp_path / impl, **{"model.matmul": impl, "model.dtype": dtype,
                                                          "model.tie_embeddings": False, "model.bias": True})
        run = Run(cfg, cfg.workdir, quiet=True)
        x, y = run.batch(run.data.train_ids, 0, 0)
        out[impl] = jax.jit(jax.value_and_grad(lambda p: loss_fn(run.setup.graphdef, p, x, y)))(run.state["params"])
    tol = {"float32": dict(rtol=1e-5, atol=1e-7), "bfloat16": dict(rtol=2e-2, atol=1e-4)}[dtype]
    np.testing.assert_allclose(out["tokens"][0], out["xla"][0], **tol)
    grads = {k: jax.tree_util.tree_leaves_with_path(v[1]) for k, v in out.items()}
    for (path, a), (_, b) in zip(grads["tokens"], grads["xla"]):
        assert a.dtype == b.dtype, jax.tree_util.keystr(path)
        assert float(jnp.max(jnp.abs(b))) > 0, jax.tree_util.keystr(path)  # every Dense kernel gets a gradient
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), **tol,
                                   err_msg=jax.tree_util.keystr(path))


def test_tokens_dot_general_matches_lax_and_falls_back_for_other_contractions():
    from gptjax.kernels import tokens_dot_general

    rng = np.random.default_rng(0)
    x, w = jnp.asarray(rng.normal(size=(3, 5, 4)), jnp.float32), jnp.asarray(rng.normal(size=(4, 6)), jnp.float32)
    dense = (((2,), (0,)), ((), ()))
    f = lambda dg: lambda x, w: jnp.sum(jnp.sin(dg(x, w, dense)))
    ref = jax.value_and_grad(f(jax.lax.dot_general), argnums=(0, 1))(x, w)
    got = jax.value_and_grad(f(tokens_dot_general), argnums=(0, 1))(x, w)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # A batched contraction is not a Dense layer's: it goes to lax.dot_general as it is.
    a, b = jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5))
    batched = (((2,), (1,)), ((0,), (0,)))
    np.testing.assert_array_equal(tokens_dot_general(a, b, batched), jax.lax.dot_general(a, b, batched))


def test_grad_accumulation_equals_one_full_batch_step(text_file, tmp_path):
    after = {}
    for accum in (1, 4):
        cfg = small_config(text_file, tmp_path / str(accum), **{"train.batch_size": 8, "train.grad_accum": accum})
        run = Run(cfg, cfg.workdir, quiet=True)
        x, y = run.batch(run.data.train_ids, 0, 0)
        state, out = run.step_fn(1)(run.state, x, y)
        state, out2 = run.step_fn(1)(state, x, y)  # a second step sees the updated optimizer state
        after[accum] = (float(out["loss"]), float(out2["loss"]), float(out2["grad_norm"]), state["params"])
    np.testing.assert_allclose(after[4][:3], after[1][:3], rtol=1e-5)
    for a, b in zip(_leaves(after[4][3]), _leaves(after[1][3])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_several_steps_per_call_equal_single_steps(text_file, tmp_path):
    # 23 steps, 5 per call: logs every 5 and evals every 10 must still land on
    # their steps, and the last 3 steps run one at a time.
    runs = {}
    for k in (1, 5):
        cfg = small_config(text_file, tmp_path / str(k), **{
            "train.steps": 23, "train.steps_per_call": k, "model.dropout": 0.1})
        run = Run(cfg, cfg.workdir, quiet=True)
        run.train()
        runs[k] = (read_metrics(f"{cfg.workdir}/metrics.jsonl"), run.state["params"])
    logged = {k: [(r["step"], r.get("train_loss"), r.get("val_loss")) for r in recs] for k, (recs, _) in runs.items()}
    assert [s for s, *_ in logged[5]] == [s for s, *_ in logged[1]]
    assert [r["step"] for r in runs[5][0] if "lr" in r] == [5, 10, 15, 20, 23]
    for (_, l1, v1), (_, l5, v5) in zip(logged[1], logged[5]):
        np.testing.assert_allclose([l5 or 0, v5 or 0], [l1 or 0, v1 or 0], rtol=1e-5)
    for a, b in zip(_leaves(runs[5][1]), _leaves(runs[1][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_steps_per_call_logs_tokens_per_second_and_mfu(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run", **{"train.steps_per_call": 5})
    Run(cfg, cfg.workdir, quiet=True).train()
    recs = [r for r in read_metrics(f"{cfg.workdir}/metrics.jsonl") if "lr" in r]
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in recs)


def test_malloc_tuning_applies_on_linux():
    import sys

    assert runtime.keep_freed_memory() is sys.platform.startswith("linux")


def test_add_xla_flags_keeps_what_the_user_set(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    runtime.add_xla_flags(["--xla_cpu_experimental_ynn_fusion_type=dot", "--xla_foo=1"])
    import os

    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type= --xla_foo=1"


@pytest.mark.slow
def test_bench_prints_one_json_line(text_file):
    res = run_cli("gptjax.bench", "--config", "configs/tiny.py", f"--config.data.path={text_file}",
                  "--config.model.n_layer=2", "--config.model.n_embd=32", "--config.model.block_size=16",
                  "--config.train.batch_size=4", "--config.train.steps_per_call=2", "--steps=6", "--warmup=2")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert out["tokens_per_step"] == 64 and out["timed_steps"] >= 6 and out["platform"] == "cpu"
    assert out["params"] > 0 and out["ms_per_step"] > 0 and out["compile_s"] > 0
    assert out["tokens_per_s"] == pytest.approx(64 / (out["ms_per_step"] / 1000), rel=1e-3)
    # From unrounded figures: tflops keeps 4 decimals, a few percent of a tiny model's rate.
    achieved = out["tokens_per_s"] * out["flops_per_token"] / 1e12
    assert out["mfu"] == pytest.approx(achieved / out["peak_tflops"], rel=0.01, abs=1e-4)


@pytest.mark.slow
def test_bench_rejects_bad_steps(text_file):
    res = run_cli("gptjax.bench", "--config", "configs/tiny.py", f"--config.data.path={text_file}", "--steps=0")
    assert res.returncode == 2 and res.stderr.startswith("error: ") and "Traceback" not in res.stderr


def test_the_users_jax_compilation_cache_dir_wins(monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", "/cache-home")
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR")
    assert runtime.compilation_cache_dir() == "/cache-home/gptjax/jax"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/my/jax-cache")
    assert runtime.compilation_cache_dir() == "/my/jax-cache"


def test_parse_compare_reads_literals_and_bare_words():
    from gptjax import bench
    from gptjax.errors import UserError

    assert bench.parse_compare("model.scan_layers=False,True") == ("model.scan_layers", [False, True])
    assert bench.parse_compare("train.optimizer=adamw,muon") == ("train.optimizer", ["adamw", "muon"])
    assert bench.parse_compare("model.n_layer=2, 4,8") == ("model.n_layer", [2, 4, 8])
    for bad in ("model.scan_layers=True", "scan_layers=False,True", "model.scan_layers", "model.x=1,"):
        with pytest.raises(UserError, match="--compare takes"):
            bench.parse_compare(bad)


@pytest.mark.slow
def test_bench_compare_times_each_value_in_alternating_rounds(text_file):
    res = run_cli("gptjax.bench", "--config", "configs/tiny.py", f"--config.data.path={text_file}",
                  "--config.model.n_layer=2", "--config.model.n_embd=32", "--config.model.block_size=16",
                  "--config.train.batch_size=4", "--config.train.steps_per_call=1", "--steps=6", "--warmup=1",
                  "--compare=model.scan_layers=False,True", "--rounds=3")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["key"] == "model.scan_layers" and out["rounds"] == 3
    assert [v["value"] for v in out["variants"]] == [False, True]
    assert [v["config"]["scan_layers"] for v in out["variants"]] == [False, True]
    assert all(v["timed_steps"] == 6 and v["ms_per_step"] > 0 for v in out["variants"])
    first, second = out["ratio_to_first"]
    assert first["median"] == 1.0 and second["median"] > 0
    assert second["spread"][0] <= second["median"] <= second["spread"][1]
    assert "round 3/3" in res.stderr
    bad = run_cli("gptjax.bench", "--config", "configs/tiny.py", f"--config.data.path={text_file}",
                  "--compare=model.scan_layers=False,7")
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
