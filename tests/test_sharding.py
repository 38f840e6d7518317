"""Sharded training: meshes, FSDP and tensor shards, multi-process runs, checkpoints across meshes.

Tests marked `eight_devices` need 8 devices, which the CPU backend gives only
when XLA_FLAGS is set before JAX starts: `test_eight_device_tests` runs every
such test of the suite in one fresh pytest with the flag set (conftest).
"""

import json
import os
import socket
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import ROOT, eight_devices, outer, run_cli, run_eight_device_tests, small_config
from gptjax import data as data_lib
from gptjax import model as model_lib
from gptjax import sharding
from gptjax.errors import UserError
from gptjax.logs import read_metrics
from gptjax.trainer import build as Run

MESHES = {  # name: (data, fsdp, tensor)
    "1": (1, 1, 1),
    "data8": (8, 1, 1),
    "data4_fsdp2": (4, 2, 1),
    "data2_fsdp2_tensor2": (2, 2, 2),
}


def sharded_config(text_file, workdir, mesh=(-1, 1, 1), **overrides):
    """Tiny model, batch 8 (divisible by every data-parallel size here), no eval noise."""
    c = small_config(text_file, workdir, **{"train.batch_size": 8, "train.steps": 10, **overrides})
    c.mesh.data, c.mesh.fsdp, c.mesh.tensor = mesh
    return c


def make_run(text_file, workdir, mesh, **overrides):
    n = int(np.prod(mesh))
    return Run(sharded_config(text_file, workdir, mesh, **overrides), str(workdir), quiet=True,
               devices=jax.devices()[:n])


def train_steps(run, steps, start=0):
    losses = []
    for step in range(start, start + steps):
        x, y = run.batch(run.data.train_ids, step, data_lib.TRAIN_STREAM)
        run.state, out = run.step_fn(1)(run.state, x, y)
        losses.append(float(out["loss"]))
    return losses


def leaf(tree, suffix, within=""):
    """The one leaf whose path ends with `suffix` (and contains `within`)."""
    hits = [v for p, v in jax.tree_util.tree_leaves_with_path(tree)
            if jax.tree_util.keystr(p).endswith(suffix) and within in jax.tree_util.keystr(p)]
    assert len(hits) == 1, (suffix, within, len(hits))
    return hits[0]


FC = "['blocks'][0]['mlp']['fc']['kernel']"
QKV = "['blocks'][0]['attn']['qkv']['kernel']"


def shard_shapes(array):
    return {tuple(s.data.shape) for s in array.addressable_shards}


def logits_of(run, params, x):
    return jax.jit(lambda p, x: nnx.merge(run.setup.graphdef, p)(x))(params, x)


# ----------------------------------------------------------------------------- rules (no devices needed)

def fake_mesh(data=1, fsdp=1, tensor=1):
    return types.SimpleNamespace(shape={"data": data, "fsdp": fsdp, "tensor": tensor})


def test_partition_rules_for_gpt2_shapes():
    from jax.sharding import PartitionSpec as P

    m = fake_mesh(data=2, fsdp=4, tensor=2)
    assert sharding.param_spec(("embed", "qkv"), (768, 2304), m) == P("fsdp", "tensor")
    assert sharding.param_spec(("mlp", "embed"), (3072, 768), m) == P("tensor", "fsdp")
    # fsdp takes the largest dimension it divides: not the 50257-token vocabulary.
    assert sharding.param_spec(("vocab", "embed"), (50257, 768), m) == P(None, "fsdp")
    assert sharding.param_spec(("embed",), (768,), m) == P("fsdp")
    assert sharding.param_spec(("vocab",), (65,), m) == P(None)
    # Without tensor parallelism FSDP splits the wide dimension.
    assert sharding.param_spec(("embed", "mlp"), (768, 3072), fake_mesh(fsdp=8)) == P(None, "fsdp")
    assert sharding.param_spec(("embed", "mlp"), (768, 3072), fake_mesh(data=8)) == P(None, None)


def tiny_attention():
    from gptjax import config as config_lib

    cfg = config_lib.base_config().model
    cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.block_size, cfg.vocab_size = 1, 4, 32, 8, 10
    x = jax.random.normal(jax.random.key(1), (2, 8, 32))
    return model_lib.CausalSelfAttention(model_lib.ModelConfig.of(cfg), rngs=nnx.Rngs(0)), x


def test_qkv_columns_are_head_major_so_tensor_shards_hold_whole_heads():
    """Columns [h*3*hd, (h+1)*3*hd) of the fused kernel are q, k and v of head h alone."""
    attn, x = tiny_attention()
    hd = 32 // attn.n_head
    attn.proj.kernel.value = attn.proj.kernel.value.at[hd:].set(0.0)  # only head 0 reaches the output
    base, _ = attn(x)
    for head, changes in ((1, False), (0, True)):
        a2, _ = tiny_attention()
        a2.proj.kernel.value = attn.proj.kernel.value
        cols = slice(head * 3 * hd, (head + 1) * 3 * hd)
        a2.qkv.kernel.value = attn.qkv.kernel.value.at[:, cols].add(0.5)
        out, _ = a2(x)
        assert (not np.allclose(out, base, atol=1e-6)) == changes, head


def test_multi_process_flags_must_come_together():
    for kw in ({"num_processes": 2}, {"coordinator_address": "localhost:1234", "process_id": 0}):
        with pytest.raises(UserError, match="a multi-process run needs all three"):
            sharding.initialize_distributed("auto", **kw)
    with pytest.raises(UserError, match="--process_id must be in"):
        sharding.initialize_distributed("auto", "localhost:1234", 2, 2)
    assert sharding.initialize_distributed("off") is False


@outer
def test_multi_process_flag_alone_is_one_clear_error(text_file, tmp_path):
    proc = run_cli("gptjax.train", "--config", "configs/tiny.py", f"--workdir={tmp_path / 'run'}",
                   f"--config.data.path={text_file}", "--process_id=1")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "--process_id given without --coordinator_address, --num_processes" in proc.stderr
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- on 8 devices

@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-device run (mesh "1") and its 10 losses."""
    from conftest import SAMPLE_TEXT

    d = tmp_path_factory.mktemp("ref")
    (d / "corpus.txt").write_text(SAMPLE_TEXT)
    run = make_run(str(d / "corpus.txt"), d / "run", (1, 1, 1))
    return run, train_steps(run, 10)


@eight_devices
@pytest.mark.parametrize("name", list(MESHES))
def test_sharded_losses_match_one_device_and_shards_split_memory(name, text_file, tmp_path, reference):
    data, fsdp, tensor = MESHES[name]
    ref_run, ref_losses = reference
    if name == "1":
        run = ref_run
    else:
        run = make_run(text_file, tmp_path / "run", MESHES[name])
        np.testing.assert_allclose(train_steps(run, 10), ref_losses, rtol=0, atol=1e-4)
        assert not np.allclose(ref_losses[0], ref_losses[-1], atol=1e-3)  # it trained: the check has teeth
    assert dict(run.setup.mesh.shape) == {"data": data, "fsdp": fsdp, "tensor": tensor}
    # The global batch is the one-device batch, its rows split over data x fsdp.
    x, _ = run.batch(run.data.train_ids, 3, data_lib.TRAIN_STREAM)
    np.testing.assert_array_equal(np.asarray(x), data_lib.get_batch(run.data.train_ids, 16, 8, run.cfg.train.seed, 3)[0])
    assert shard_shapes(x) == {(8 // (data * fsdp), 16)}

    D = run.cfg.model.n_embd
    # mlp.fc [D, 4D]: tensor splits the hidden dim; fsdp the largest dim still whole.
    want_fc = {"1": (D, 4 * D), "data8": (D, 4 * D), "data4_fsdp2": (D, 2 * D),
               "data2_fsdp2_tensor2": (D // 2, 2 * D)}[name]
    # attn.qkv [D, 3D]: likewise, and each tensor shard is whole heads (head-major columns).
    want_qkv = {"1": (D, 3 * D), "data8": (D, 3 * D), "data4_fsdp2": (D, 3 * D // 2),
                "data2_fsdp2_tensor2": (D // 2, 3 * D // 2)}[name]
    state = run.state
    assert shard_shapes(leaf(state["params"], FC)) == {want_fc}
    assert shard_shapes(leaf(state["params"], QKV)) == {want_qkv}
    for moment in (".mu", ".nu"):  # Adam moments split exactly like their weights
        assert shard_shapes(leaf(state["opt_state"], FC, moment)) == {want_fc}
        assert shard_shapes(leaf(state["opt_state"], QKV, moment)) == {want_qkv}
        assert leaf(state["opt_state"], FC, moment).sharding == leaf(state["params"], FC).sharding
    # Per-device bytes of parameters + optimizer state shrink with fsdp x tensor.
    dev0 = jax.devices()[0]
    per_dev = sum(s.data.nbytes for a in jax.tree.leaves(state) for s in a.addressable_shards if s.device == dev0)
    total = sum(a.nbytes for a in jax.tree.leaves(state))
    assert per_dev < total / (fsdp * tensor) * 1.25 + 4096


@pytest.fixture(scope="module")
def text_path(tmp_path_factory):
    from conftest import SAMPLE_TEXT

    p = tmp_path_factory.mktemp("text") / "corpus.txt"
    p.write_text(SAMPLE_TEXT)
    return str(p)


def save_after(run, steps):
    train_steps(run, steps)
    run.save(steps, force=True)
    run.close()  # the checkpoint on disk, the workdir unlocked


@eight_devices
def test_checkpoint_from_8_devices_restores_on_1_and_on_4(text_path, tmp_path):
    from gptjax.sample import load_run

    workdir = tmp_path / "run"
    run8 = make_run(text_path, workdir, (2, 2, 2))
    save_after(run8, 3)
    params8 = jax.device_get(run8.state["params"])
    x = jnp.asarray(data_lib.get_batch(run8.data.train_ids, 16, 8, 0, 0)[0])
    logits8 = np.asarray(logits_of(run8, run8.state["params"], sharding.to_global(np.asarray(x), run8.setup.mesh)))

    # Sampling restores onto one device.
    loaded = load_run(str(workdir))
    graphdef, params1, step = loaded.graphdef, loaded.params, loaded.step
    assert step == 3 and len(leaf(params1, FC).devices()) == 1
    jax.tree.map(np.testing.assert_array_equal, params8, jax.device_get(params1))
    logits1 = np.asarray(jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))(params1, x))
    np.testing.assert_array_equal(logits1, np.asarray(logits_of(run8, jax.device_put(params8), x)))
    np.testing.assert_allclose(logits1, logits8, atol=1e-5)

    # Resume on 4 devices (data=2 x fsdp=2): same state, resharded, and the next step agrees.
    next8 = train_steps(run8, 1, start=3)
    run4 = make_run(text_path, workdir, (2, 2, 1))
    assert run4.resumed_from == 3 and int(run4.state["step"]) == 3
    jax.tree.map(np.testing.assert_array_equal, params8, jax.device_get(run4.state["params"]))
    assert shard_shapes(leaf(run4.state["opt_state"], FC, ".mu")) == {(32, 64)}
    np.testing.assert_allclose(train_steps(run4, 1, start=3), next8, atol=1e-5)


@eight_devices
def test_checkpoint_from_1_device_restores_on_8(text_path, tmp_path):
    workdir = tmp_path / "run"
    run1 = make_run(text_path, workdir, (1, 1, 1))
    save_after(run1, 3)
    params1 = jax.device_get(run1.state["params"])
    x = np.asarray(data_lib.get_batch(run1.data.train_ids, 16, 8, 0, 0)[0])
    logits1 = np.asarray(logits_of(run1, run1.state["params"], jnp.asarray(x)))

    run8 = make_run(text_path, workdir, (2, 2, 2))
    assert run8.resumed_from == 3
    assert shard_shapes(leaf(run8.state["params"], FC)) == {(16, 64)}
    jax.tree.map(np.testing.assert_array_equal, params1, jax.device_get(run8.state["params"]))
    logits8 = np.asarray(logits_of(run8, run8.state["params"], sharding.to_global(x, run8.setup.mesh)))
    np.testing.assert_allclose(logits8, logits1, atol=1e-5)


@eight_devices
@pytest.mark.parametrize(
    "mesh, overrides, match",
    [
        ((3, 1, 1), {}, r"= 3 devices, but there are 8 \(8 x cpu on 1 process"),
        ((-1, 3, 1), {}, r"multiply to 3, which does not divide the 8 devices \(8 x cpu"),
        ((8, 1, 1), {"train.batch_size": 12}, r"batch_size \(12\) must be divisible by the data-parallel size"),
        ((2, 1, 4), {}, r"model.n_head \(2\) must be divisible by mesh.tensor \(4\)"),
    ],
)
def test_bad_mesh_input_is_clear(text_file, tmp_path, mesh, overrides, match):
    cfg = sharded_config(text_file, tmp_path / "run", mesh, **overrides)
    with pytest.raises(UserError, match=match):
        Run(cfg, cfg.workdir, quiet=True)


# ----------------------------------------------------------------------------- launchers

def _env(**extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.update(extra)
    return env


@outer
def test_eight_device_tests():
    """Runs every `eight_devices` test (this file's, test_steps' and test_plan's) with 8 CPU devices."""
    proc = run_eight_device_tests()
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout and "failed" not in proc.stdout and "skipped" not in proc.stdout, \
        proc.stdout[-2000:]


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@outer
def test_two_processes_train_like_one(text_file, tmp_path):
    """Two processes x 2 CPU devices, jax.distributed over gloo: the same losses as one process."""
    flags = [
        "--config", "configs/tiny.py", f"--workdir={tmp_path / 'multi'}", f"--config.data.path={text_file}",
        "--config.model.n_layer=2", "--config.model.n_head=2", "--config.model.n_embd=32",
        "--config.model.block_size=16", "--config.train.batch_size=8", "--config.train.steps=10",
        "--config.train.warmup_steps=2", "--config.train.log_every=1", "--config.train.eval_every=10",
        "--config.train.eval_steps=2", "--config.train.checkpoint_every=10",
        "--config.mesh.data=2", "--config.mesh.fsdp=2",
        f"--coordinator_address=localhost:{_free_port()}", "--num_processes=2",
    ]
    env = _env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    procs = [subprocess.Popen([sys.executable, "-m", "gptjax.train", *flags, f"--process_id={i}"], cwd=ROOT,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in (0, 1)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    assert "devices: 4 x cpu on 2 process(es)" in outs[0][0]
    assert "step" not in outs[1][0]  # process 1 logs nothing

    single = small_config(text_file, tmp_path / "single", **{
        "train.batch_size": 8, "train.steps": 10, "train.log_every": 1, "train.eval_steps": 2})
    Run(single, single.workdir, quiet=True).train()

    def curve(workdir):
        records = [r for r in read_metrics(str(workdir / "metrics.jsonl"))]
        steps = [r["step"] for r in records]
        assert len(steps) == len(set(zip(steps, ["lr" in r for r in records]))), "records written twice"
        return {r["step"]: r["train_loss"] for r in records if "lr" in r}, [r for r in records if "val_loss" in r]

    (multi, multi_eval), (one, one_eval) = curve(tmp_path / "multi"), curve(tmp_path / "single")
    assert sorted(multi) == sorted(one) == list(range(1, 11))
    np.testing.assert_allclose([multi[s] for s in range(1, 11)], [one[s] for s in range(1, 11)], atol=1e-4)
    np.testing.assert_allclose(multi_eval[-1]["val_loss"], one_eval[-1]["val_loss"], atol=1e-4)
    assert sorted(os.listdir(tmp_path / "multi" / "checkpoints")) == ["10"]


@outer
def test_colab_notebook_runs_top_to_bottom_on_cpu(text_file, tmp_path):
    nb = json.loads(open(os.path.join(ROOT, "notebooks", "colab_tpu.ipynb"), encoding="utf-8").read())
    cells = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    assert cells and not any(line.lstrip().startswith(("!", "%")) for c in cells for line in c.splitlines())
    script = tmp_path / "notebook.py"
    script.write_text("\n\n".join(cells))
    overrides = {
        "data.path": text_file, "model.n_layer": 2, "model.n_head": 2, "model.n_embd": 32,
        "model.block_size": 16, "model.dropout": 0.0, "train.batch_size": 8, "train.steps": 20,
        "train.eval_every": 10, "train.eval_steps": 2, "train.log_every": 5, "train.checkpoint_every": 10,
    }
    env = _env(GPTJAX_NOTEBOOK_OVERRIDES=json.dumps(overrides), GPTJAX_NOTEBOOK_SAVE_TO=str(tmp_path / "drive"),
               GPTJAX_NOTEBOOK_PROMPT="First", MPLBACKEND="Agg")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "runtime: cpu" in proc.stdout
    assert "step     20 | eval" in proc.stdout
    workdir = tmp_path / "runs" / "shakespeare"
    assert (workdir / "loss.png").stat().st_size > 1000
    assert "--- sample --- (step 20)\nFirst" in proc.stdout
    assert sorted(os.listdir(tmp_path / "drive" / "checkpoints")) == ["10", "20"]
