"""Faults a long run meets, injected on purpose: kill -9, SIGTERM, damaged checkpoints,
NaN losses, a changed config on resume, a failing disk. Each test states the fault
and asserts what the program did about it."""

import glob
import json
import os
import random
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import ROOT, small_config, tree_snapshot, copy_run, load_params, assert_same_params
from gptjax import data as data_lib
from gptjax import faults, sharding
from gptjax.checkpoint import Checkpointer, abstract_like
from gptjax.config import check_resume_config
from gptjax.errors import UserError
from gptjax.logs import read_metrics
from gptjax.trainer import build as Run
from gptjax.workdir import Workdir

# ----------------------------------------------------------------------------- helpers

CLI_FLAGS = [
    "--config.model.n_layer=2", "--config.model.n_head=2", "--config.model.n_embd=32",
    "--config.model.block_size=16", "--config.model.dropout=0.1",  # dropout: the RNG must resume too
    "--config.train.batch_size=4", "--config.train.warmup_steps=2", "--config.train.eval_steps=2",
    "--config.train.log_every=1",
]


def start_train(text_file, workdir, *extra):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.Popen(
        [sys.executable, "-m", "gptjax.train", "--config", "configs/tiny.py", f"--workdir={workdir}",
         f"--config.data.path={text_file}", *CLI_FLAGS, *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def last_logged_step(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return -1
    steps = [r["step"] for r in read_metrics(path) if "lr" in r]
    return max(steps, default=-1)


def write_in_progress(workdir) -> bool:
    d = os.path.join(workdir, "checkpoints")
    return os.path.isdir(d) and any("tmp" in n for n in os.listdir(d))


def wait_for(cond, proc, timeout=240.0, poll=0.005) -> bool:
    """Poll `cond` until it holds (True) or the process ends (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(poll)
    raise TimeoutError("training subprocess made no progress")


def train_losses(workdir) -> dict:
    return {r["step"]: r["train_loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "lr" in r}


def eval_losses(workdir) -> dict:
    return {r["step"]: r["val_loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))
            if "val_loss" in r}


# ----------------------------------------------------------------------------- 1. kill -9, restart, same result

@pytest.mark.slow
def test_sigkill_at_random_moments_then_restart_gives_the_uninterrupted_result(text_file, tmp_path):
    steps = ["--config.train.steps=24", "--config.train.checkpoint_every=3", "--config.train.eval_every=8"]
    reference = start_train(text_file, tmp_path / "whole", *steps)  # runs alongside the killed one

    workdir = str(tmp_path / "killed")
    rng = random.Random(8)
    kills = [("at a random moment once training runs",
              lambda p: wait_for(lambda: last_logged_step(workdir) >= 1, p) and time.sleep(rng.uniform(0, 0.2)) is None),
             ("during a checkpoint write", lambda p: wait_for(lambda: write_in_progress(workdir), p)),
             ("at a random step", None)]
    report = []
    for what, wait in kills:
        proc = start_train(text_file, workdir, *steps)
        resumed_at = last_logged_step(workdir)
        if wait is None:
            target = min(23, max(resumed_at, 0) + rng.randint(2, 6))
            wait = lambda p, target=target: wait_for(lambda: last_logged_step(workdir) >= target, p)
        if what == "during a checkpoint write":
            hit = False
            for _ in range(3):  # the write of a tiny checkpoint is short: try a few times
                hit = wait(proc) and write_in_progress(workdir)
                if hit or proc.poll() is not None:
                    break
            proc.kill()
        else:
            wait(proc)
            proc.kill()
        proc.wait()
        report.append(f"SIGKILL {what}: logged up to step {last_logged_step(workdir)}, "
                      f"checkpoints {sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) if os.path.isdir(os.path.join(workdir, 'checkpoints')) else []}"
                      + (f", write in progress: {hit}" if what == "during a checkpoint write" else ""))

    final = start_train(text_file, workdir, *steps)
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    out_ref, err_ref = reference.communicate(timeout=300)
    assert reference.returncode == 0, err_ref
    print("\n".join(report))

    a, b = train_losses(tmp_path / "whole"), train_losses(workdir)
    assert sorted(a) == sorted(b) == list(range(1, 25))  # every step once: no gaps, no duplicates
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bitwise-equal losses
    assert eval_losses(tmp_path / "whole") == eval_losses(workdir)
    params_ref, step_ref = load_params(tmp_path / "whole")
    params, step = load_params(workdir)
    assert step == step_ref == 24
    assert_same_params(params_ref, params)


# ----------------------------------------------------------------------------- 2. SIGTERM: save and exit cleanly

@pytest.mark.slow
def test_sigterm_mid_run_saves_at_that_step_and_exits_with_the_preempted_status(text_file, tmp_path):
    workdir = str(tmp_path / "run")
    proc = start_train(text_file, workdir, "--config.train.steps=5000", "--config.train.checkpoint_every=10000",
                       "--config.train.eval_every=10000")
    assert wait_for(lambda: last_logged_step(workdir) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == faults.EXIT_PREEMPTED, err
    assert "Traceback" not in err
    stopped = re.search(r"stopped by SIGTERM after step (\d+); checkpoint saved at step (\d+)", err)
    assert stopped, err
    step = int(stopped.group(1))
    assert 5 <= step < 5000 and int(stopped.group(2)) == step
    assert os.listdir(os.path.join(workdir, "checkpoints")) == [str(step)]  # no periodic save was due
    assert last_logged_step(workdir) == step  # it finished the step it was in, then stopped
    assert load_params(workdir)[-1] == step


@pytest.mark.slow
def test_a_second_signal_exits_at_once():
    previous = signal.getsignal(signal.SIGINT)
    with faults.StopSignals() as signals:
        assert signals.should_stop(7, sync_every=1) is None
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.received == signal.SIGINT  # the first one is a request to stop, not an exit
        assert signals.should_stop(7, sync_every=1) == "SIGINT"
        # The next SIGINT or SIGTERM gets the OS default: the process ends at once.
        assert signal.getsignal(signal.SIGINT) == signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    assert signal.getsignal(signal.SIGINT) is previous  # handlers put back


@pytest.mark.slow
def test_a_second_sigterm_ends_the_process_at_once():
    code = ("import os, signal, sys, time\n"
            "from gptjax import faults\n"
            "with faults.StopSignals():\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(0.01)\n"
            "    print('still running after the first', flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGTERM)\n"
            "    time.sleep(5)\n"
            "    print('not reached', flush=True)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == -signal.SIGTERM
    assert "still running after the first" in proc.stdout and "not reached" not in proc.stdout
    assert "SIGTERM received: stopping after this step" in proc.stderr


# ----------------------------------------------------------------------------- 3. damaged checkpoints

def test_sampling_uses_the_newest_checkpoint_that_restores_and_changes_nothing(trained, tmp_path, capsys):
    from gptjax import sample

    run, _, src = trained
    workdir = copy_run(src, tmp_path / "run")
    os.remove(os.path.join(workdir, "checkpoints", "6", "params", "_METADATA"))
    before = tree_snapshot(workdir)
    loaded = sample.load_run(workdir)
    err = capsys.readouterr().err
    assert loaded.step == 4
    assert "checkpoint at step 6 does not restore" in err and "using step 4" in err and "Traceback" not in err
    four = sample.load_run(src, step=4)  # the undamaged run's step 4: the same weights
    assert_same_params(loaded.params, four.params)
    assert tree_snapshot(workdir) == before  # a reader never moves or deletes anything
    with pytest.raises(UserError, match=r"checkpoint at step 6 .* does not restore .*try --step 4"):
        sample.load_run(workdir, step=6)
    assert tree_snapshot(workdir) == before


# ----------------------------------------------------------------------------- 4. non-finite losses

def test_a_poisoned_batch_is_skipped_inside_the_step(trained):
    run, _, _ = trained
    x, y = run.batch(run.data.train_ids, 6, data_lib.TRAIN_STREAM)
    y_bad = np.asarray(jax.device_get(y)).copy()
    y_bad[0, 0] = run.data.tokenizer.vocab_size + 7  # a corrupt token id: the loss is NaN
    before = jax.device_get(run.state)
    state, out = run.step_fn(1)(run.state, x, sharding.to_global(y_bad, run.setup.mesh))
    assert not bool(out["finite"]) and not np.isfinite(float(out["loss"]))
    assert_same_params(before["params"], state["params"])
    assert_same_params(before["opt_state"], state["opt_state"])
    assert int(state["step"]) == before["step"] + 1  # the batch is consumed: batch k stays f(seed, k)
    state, out = run.step_fn(1)(state, x, y)  # the next good batch updates as usual
    assert bool(out["finite"])
    changed = jax.tree.leaves(jax.tree.map(lambda a, b: not np.array_equal(a, b),
                                           jax.device_get(state["params"]), before["params"]))
    assert any(changed)
    run.state = state


def test_lr_1e6_diverges_and_stops_after_max_bad_steps_keeping_the_last_good_checkpoint(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run", **{
        "train.lr": 1e6, "train.min_lr": 0.0, "train.warmup_steps": 0, "train.grad_clip": 0.0,
        "train.log_every": 1, "train.checkpoint_every": 1, "train.max_bad_steps": 3, "train.steps": 40})
    run = Run(cfg, cfg.workdir, quiet=True)
    with pytest.raises(faults.TrainingStopped) as stop:
        run.train()
    assert stop.value.code == faults.EXIT_DIVERGED
    msg = str(stop.value)
    first = run.nonfinite.first_bad_step + 1
    assert f"4 steps in a row (steps {first}..{first + 3})" in msg and "max_bad_steps=3" in msg
    for fix in ("train.lr", "grad_clip", "float32"):
        assert fix in msg
    good = first - 1  # the last step whose update was finite
    assert f"newest checkpoint is at step {good}" in msg
    steps = Checkpointer(Workdir(cfg.workdir).checkpoints).steps()
    assert steps[-1] == good  # nothing saved during the bad streak
    records = {r["step"]: r for r in read_metrics(os.path.join(cfg.workdir, "metrics.jsonl")) if "lr" in r}
    assert [records[s].get("skipped_steps") for s in range(first, first + 3)] == [1, 2, 3]  # counted, logged
    # The skipped updates left the state as the last good checkpoint holds it.
    ckpt = Checkpointer(Workdir(cfg.workdir).checkpoints)
    params, opt_state, _ = ckpt.restore(good, abstract_like(run.state["params"], run.setup.params_sh),
                                        abstract_like(run.state["opt_state"], run.setup.state_sh["opt_state"]))
    ckpt.close()
    assert_same_params(params, run.state["params"])
    assert_same_params(opt_state, run.state["opt_state"])


# ----------------------------------------------------------------------------- 5. config guard on resume

def test_resume_with_a_different_n_layer_is_refused_and_the_workdir_is_untouched(trained, tmp_path):
    _, text, src = trained
    workdir = copy_run(src, tmp_path / "run")
    before = tree_snapshot(workdir)
    cfg = small_config(text, workdir, **{"train.steps": 6, "model.n_layer": 3, "train.allow_config_change": True})
    with pytest.raises(UserError, match=r"refusing to resume.*model\.n_layer: 2 -> 3"):
        Run(cfg, workdir, quiet=True)
    assert tree_snapshot(workdir) == before


def test_training_changes_need_allow_config_change():
    saved = {"model": {"n_layer": 2, "vocab_size": 34}, "train": {"steps": 6, "lr": 1e-3, "log_every": 1},
             "data": {"path": "a.txt"}, "mesh": {"data": -1}}
    same = json.loads(json.dumps(saved))
    same["model"]["vocab_size"] = 0  # "from the tokenizer"
    same["train"]["log_every"] = 5  # does not change what is computed
    same["mesh"]["data"] = 2
    assert check_resume_config(saved, same, False, "w") == []
    longer = json.loads(json.dumps(same))
    longer["train"]["steps"], longer["train"]["lr"] = 20, 3e-4
    with pytest.raises(UserError, match=r"train\.lr: 0\.001 -> 0\.0003, train\.steps: 6 -> 20.*allow_config_change=True"):
        check_resume_config(saved, longer, False, "w")
    assert check_resume_config(saved, longer, True, "w") == ["train.lr: 0.001 -> 0.0003", "train.steps: 6 -> 20"]
    other_data = json.loads(json.dumps(same))
    other_data["data"]["path"] = "b.txt"
    with pytest.raises(UserError, match=r"data\.path: 'a\.txt' -> 'b\.txt'"):
        check_resume_config(saved, other_data, True, "w")


# ----------------------------------------------------------------------------- safe loading

def test_nothing_the_program_loads_is_unpickled():
    """Workdir files are JSON, orbax/tensorstore or sentencepiece: no pickle-based loader anywhere."""
    unsafe = re.compile(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib|shelve|marshal)\b"
                        r"|pickle\.loads?\(|allow_pickle\s*=\s*True|torch\.load\(|read_pickle\(")
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "gptjax", "*.py")) + glob.glob(os.path.join(ROOT, "configs", "*.py"))):
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                code = line.split("#")[0]
                if unsafe.search(code):
                    found.append(f"{os.path.relpath(path, ROOT)}:{n}: {line.strip()}")
    assert not found, found
