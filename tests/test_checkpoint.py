"""Checkpoints: save/restore, layout, retention, damaged checkpoints, failed writes (a full disk)."""

import glob
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import ROOT, assert_same_params, copy_run, load_params, small_config, tree_snapshot
from gptjax import data as data_lib
from gptjax import captured_output
from gptjax import faults
from gptjax.checkpoint import Checkpointer, abstract_like
from gptjax.errors import UserError
from gptjax.logs import read_metrics
from gptjax.trainer import build as Run
from gptjax.workdir import Workdir


def checkpointer(workdir, **kw) -> Checkpointer:
    wd = Workdir(str(workdir))
    return Checkpointer(wd.checkpoints, broken_dir=wd.broken, **kw)


def train_losses(workdir) -> dict:
    return {r["step"]: r["train_loss"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl")) if "lr" in r}


# ----------------------------------------------------------------------------- save, restore, keep

@pytest.mark.slow
def test_save_then_restore_gives_identical_params_and_next_step_loss(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run")
    run = Run(cfg, cfg.workdir, quiet=True)
    run.train(stop_at=10)
    params_before = jax.device_get(run.state["params"])
    x, y = run.batch(run.data.train_ids, 10, data_lib.TRAIN_STREAM)
    _, out_before = run.step_fn(1)(run.state, x, y)

    again = Run(small_config(text_file, tmp_path / "run"), cfg.workdir, quiet=True)
    assert again.resumed_from == 10
    params_after = jax.device_get(again.state["params"])
    jax.tree.map(np.testing.assert_array_equal, params_before, params_after)
    assert int(again.state["step"]) == 10
    _, out_after = again.step_fn(1)(again.state, x, y)
    assert float(out_before["loss"]) == float(out_after["loss"])


@pytest.mark.slow
def test_checkpoint_folder_layout(text_file, tmp_path):
    cfg = small_config(text_file, tmp_path / "run", **{"train.steps": 10})
    Run(cfg, cfg.workdir, quiet=True).train()
    ckpt = tmp_path / "run" / "checkpoints" / "10"
    assert (ckpt / "params").is_dir() and (ckpt / "opt_state").is_dir() and (ckpt / "meta").is_dir()


def test_keeps_the_newest_checkpoints_plus_the_best_by_validation_loss(tmp_path):
    ckpt = Checkpointer(str(tmp_path / "ckpts"), keep=2, async_save=False)
    params = {"w": np.zeros((2, 2), np.float32)}
    for step, val in [(1, 3.0), (2, 1.0), (3, 2.5), (4, None), (5, 2.0)]:  # step 4: saved without an eval
        ckpt.save(step, params, {"m": np.ones(2, np.float32)}, {"step": step}, val_loss=val)
    ckpt.close()
    assert Checkpointer(str(tmp_path / "ckpts"), create=False).steps() == [2, 4, 5]  # best (2) + the 2 newest


def test_a_reader_needs_the_folder_and_names_it(tmp_path):
    with pytest.raises(UserError, match=f"no checkpoint folder {tmp_path / 'missing'}"):
        Checkpointer(str(tmp_path / "missing"), create=False)
    assert not (tmp_path / "missing").exists()


# ----------------------------------------------------------------------------- damaged checkpoints

@pytest.mark.slow
def test_damaged_newest_checkpoints_are_skipped_and_the_run_resumes_from_an_older_one(trained, tmp_path, capsys):
    run, text, src = trained
    workdir = copy_run(src, tmp_path / "run")
    ckpts = os.path.join(workdir, "checkpoints")
    # Step 6: truncate its largest parameter data file. Step 4: delete its parameter metadata.
    data_files = glob.glob(os.path.join(ckpts, "6", "params", "**", "d", "*"), recursive=True)
    biggest = max(data_files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    os.remove(os.path.join(ckpts, "4", "params", "_METADATA"))

    cfg = small_config(text, workdir, **{"train.steps": 6, "train.checkpoint_every": 2,
                                         "train.eval_every": 2, "train.log_every": 1})
    again = Run(cfg, workdir, quiet=True)
    err = capsys.readouterr().err
    assert again.resumed_from == 2
    assert "checkpoint at step 6 does not restore" in err and "checkpoint at step 4 does not restore" in err
    assert "Traceback" not in err
    for step in ("6", "4"):  # kept for inspection, with the error beside them
        assert os.path.exists(os.path.join(workdir, "broken_checkpoints", step, "RESTORE_ERROR.txt"))
    again.train()  # steps 3..6 again: exactly what the undamaged run computed
    assert_same_params(load_params(src)[0], load_params(workdir)[0])
    assert train_losses(src) == train_losses(workdir)


@pytest.mark.slow
def test_when_no_checkpoint_restores_nothing_is_moved_and_the_error_lists_them(trained, tmp_path):
    run, text, src = trained
    workdir = copy_run(src, tmp_path / "run")
    for step in ("2", "4", "6"):
        os.remove(os.path.join(workdir, "checkpoints", step, "params", "_METADATA"))
    before = tree_snapshot(workdir)
    ckpt = checkpointer(workdir)
    with pytest.raises(UserError, match=r"no checkpoint in .* restores \(step 6: .*step 4: .*step 2: .*Nothing was deleted"):
        ckpt.restore_newest(abstract_like(run.state["params"], run.setup.params_sh),
                            abstract_like(run.state["opt_state"], run.setup.state_sh["opt_state"]))
    ckpt.close()
    assert tree_snapshot(workdir) == before


# ----------------------------------------------------------------------------- failed writes

@pytest.mark.slow
def test_a_failed_checkpoint_write_stops_with_a_clear_message_and_keeps_the_previous(trained, tmp_path, monkeypatch):
    _, text, src = trained
    workdir = copy_run(src, tmp_path / "run")
    cfg = small_config(text, workdir, **{"train.steps": 10, "train.checkpoint_every": 2, "train.eval_every": 2,
                                         "train.log_every": 1, "train.allow_config_change": True})
    run = Run(cfg, workdir, quiet=True)
    real_save = run.ckpt.manager.save

    def full_disk(step, *args, **kwargs):
        if step == 8:
            raise OSError(28, "No space left on device")
        return real_save(step, *args, **kwargs)

    monkeypatch.setattr(run.ckpt.manager, "save", full_disk)
    with pytest.raises(faults.TrainingStopped) as stop:
        run.train()
    assert stop.value.code == faults.EXIT_CHECKPOINT_WRITE
    msg = str(stop.value)
    assert "could not write the checkpoint at step 8" in msg and "No space left on device" in msg
    assert "previous checkpoint (step 6) is intact" in msg
    assert f"report is in {os.path.join(workdir, 'broken_checkpoints', 'write_error_step_8.txt')}" in msg
    run.ckpt.release_output()
    assert not isinstance(sys.stderr, captured_output._StderrByThread)  # the console's stderr is back
    assert checkpointer(workdir).steps()[-1] == 6
    assert load_params(workdir)[-1] == 6


ENOSPC_SHIM = r"""
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

/* Every write to a file whose path contains $ENOSPC_PATH_PART fails as on a full disk. */
static int doomed(int fd) {
  const char *part = getenv("ENOSPC_PATH_PART");
  char link[64], path[4096];
  if (!part || !*part) return 0;
  snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
  ssize_t n = readlink(link, path, sizeof path - 1);
  if (n <= 0) return 0;
  path[n] = 0;
  return strstr(path, part) != NULL;
}
#define REAL(name) static __typeof__(name) *real; if (!real) real = dlsym(RTLD_NEXT, #name); \
  if (doomed(fd)) { errno = ENOSPC; return -1; }
ssize_t write(int fd, const void *b, size_t n) { REAL(write) return real(fd, b, n); }
ssize_t pwrite(int fd, const void *b, size_t n, off_t o) { REAL(pwrite) return real(fd, b, n, o); }
ssize_t pwrite64(int fd, const void *b, size_t n, off_t o) { REAL(pwrite64) return real(fd, b, n, o); }
ssize_t writev(int fd, const struct iovec *v, int c) { REAL(writev) return real(fd, v, c); }
ssize_t pwritev(int fd, const struct iovec *v, int c, off_t o) { REAL(pwritev) return real(fd, v, c, o); }
"""


def enospc_shim(tmp_path) -> str:
    """A preload library that makes writes below the checkpoint library fail with ENOSPC (Linux, with a C compiler)."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if not sys.platform.startswith("linux") or cc is None:
        pytest.skip("needs Linux and a C compiler to inject ENOSPC at the file-write level")
    src, lib = tmp_path / "enospc.c", tmp_path / "enospc.so"
    src.write_text(ENOSPC_SHIM)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(lib), str(src), "-ldl"], check=True)
    return str(lib)


def start_train(text_file, workdir, env=None):
    args = ["--config.model.n_layer=2", "--config.model.n_head=2", "--config.model.n_embd=32",
            "--config.model.block_size=16", "--config.model.dropout=0.1", "--config.train.batch_size=4",
            "--config.train.warmup_steps=2", "--config.train.eval_steps=2", "--config.train.log_every=2",
            "--config.train.steps=12", "--config.train.checkpoint_every=2", "--config.train.eval_every=4"]
    return subprocess.Popen(
        [sys.executable, "-m", "gptjax.train", "--config", "configs/tiny.py", f"--workdir={workdir}",
         f"--config.data.path={text_file}", *args],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})), stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_a_full_disk_during_a_save_prints_one_error_line_keeps_the_details_and_resumes_bitwise(text_file, tmp_path):
    shim = enospc_shim(tmp_path)
    reference = start_train(text_file, tmp_path / "whole")  # runs alongside: the uninterrupted losses
    workdir = tmp_path / "full"
    # Every file of the step-8 checkpoint fails to write, in orbax's and tensorstore's own threads.
    proc = start_train(text_file, workdir, env={"LD_PRELOAD": shim,
                                                "ENOSPC_PATH_PART": "checkpoints/8.orbax-checkpoint-tmp"})
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == faults.EXIT_CHECKPOINT_WRITE, err
    assert "Traceback" not in err and "RESOURCE_EXHAUSTED" not in err
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: could not write the checkpoint at step 8"), err
    assert "No space left on device" in lines[-1] and "previous checkpoint (step 6) is intact" in lines[-1]
    report = workdir / "broken_checkpoints" / "write_error_step_8.txt"
    assert f"report is in {report}" in lines[-1]
    details = report.read_text()
    assert "Traceback" in details and "No space left on device" in details  # the library's detail, kept
    assert not [line for line in lines[:-1] if "error" in line.lower()], err

    again = start_train(text_file, workdir)  # the disk has room again: the same command resumes
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    assert "resumed from the checkpoint at step 6" in out
    out_ref, err_ref = reference.communicate(timeout=300)
    assert reference.returncode == 0, err_ref
    a, b = train_losses(tmp_path / "whole"), train_losses(workdir)
    assert sorted(a) == sorted(b) == list(range(2, 13, 2))
    assert [a[s] for s in sorted(a)] == [b[s] for s in sorted(b)]  # bitwise
    assert_same_params(load_params(tmp_path / "whole")[0], load_params(workdir)[0])
