"""End-to-end: the real `python -m gptjax.train` (and `gptjax.sample` on what it wrote), in subprocesses."""

import json
import os

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow

TRAIN_FLAGS = [
    "--config.model.n_layer=2", "--config.model.n_head=2", "--config.model.n_embd=32",
    "--config.model.block_size=16", "--config.train.batch_size=4", "--config.train.steps=20",
    "--config.train.eval_every=10", "--config.train.eval_steps=2", "--config.train.checkpoint_every=10",
    "--config.train.warmup_steps=2",
]


def train_cli(text_file, workdir, *extra):
    return run_cli("gptjax.train", "--config", "configs/tiny.py", f"--workdir={workdir}",
                   f"--config.data.path={text_file}", *TRAIN_FLAGS, *extra)


def assert_clean_error(proc, *needles):
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr
    err = proc.stderr.lower()
    for n in needles:
        assert n.lower() in err, proc.stderr


def test_train_then_sample_from_the_workdir(text_file, tmp_path):
    workdir = tmp_path / "run"
    proc = train_cli(text_file, workdir)
    assert proc.returncode == 0, proc.stderr
    assert "step     20 | eval" in proc.stdout
    for name in ("config.json", "metrics.jsonl", "tokenizer/tokenizer.json"):
        assert (workdir / name).exists(), name
    assert sorted(os.listdir(workdir / "checkpoints")) == ["10", "20"]
    records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records) and any("tokens_per_s" in r for r in records)

    out = run_cli("gptjax.sample", f"--workdir={workdir}", "--prompt=First", "--max_new_tokens=40",
                  "--num_samples=2", "--seed=1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("First") >= 2 and "sample 2" in out.stdout
    greedy = [run_cli("gptjax.sample", f"--workdir={workdir}", "--prompt=All", "--max_new_tokens=30",
                      "--temperature=0").stdout for _ in range(2)]
    assert greedy[0] == greedy[1] and greedy[0].startswith("All")


def test_running_the_same_command_again_resumes(text_file, tmp_path):
    workdir = tmp_path / "run"
    assert train_cli(text_file, workdir, "--config.train.steps=10").returncode == 0
    proc = train_cli(text_file, workdir, "--config.train.allow_config_change=True")  # train.steps 10 -> 20
    assert proc.returncode == 0, proc.stderr
    assert "resumed from the checkpoint at step 10" in proc.stdout
    assert "config change accepted on resume: train.steps: 10 -> 20" in proc.stdout
    steps = [json.loads(l)["step"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 20


def test_unknown_config_key_is_one_clear_error(text_file, tmp_path):
    proc = train_cli(text_file, tmp_path / "run", "--config.model.n_lyer=3")
    assert_clean_error(proc, "n_lyer", "unknown config key", "n_layer")


def test_unknown_config_size_is_one_clear_error(tmp_path):
    proc = run_cli("gptjax.train", "--config", "configs/wikitext.py:huge", f"--workdir={tmp_path / 'run'}")
    assert_clean_error(proc, "unknown size 'huge' for configs/wikitext.py", "tiny, small, gpt2")
    assert len(proc.stderr.strip().splitlines()) == 2  # the error line and the --helpfull hint


def test_indivisible_heads_is_one_clear_error(text_file, tmp_path):
    proc = train_cli(text_file, tmp_path / "run", "--config.model.n_embd=31")
    assert_clean_error(proc, "n_embd (31) must be divisible by model.n_head (2)")


@pytest.mark.parametrize("content, needle", [(None, "does not exist"), ("", "empty"), ("abc", "block_size")])
def test_bad_data_file_is_one_clear_error(tmp_path, content, needle):
    path = tmp_path / "data.txt"
    if content is not None:
        path.write_text(content)
    proc = train_cli(str(path), tmp_path / "run")
    assert_clean_error(proc, needle)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_sample_errors_are_clear(text_file, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_clean_error(run_cli("gptjax.sample", f"--workdir={empty}"), "config.json")
    workdir = tmp_path / "run"
    assert train_cli(text_file, workdir, "--config.train.steps=10").returncode == 0
    assert_clean_error(run_cli("gptjax.sample", f"--workdir={workdir}", "--prompt=Zebra"), "never saw", "'z'")
    assert_clean_error(run_cli("gptjax.sample", f"--workdir={workdir}", "--step=7"), "no checkpoint at step 7", "[10]")
    assert_clean_error(run_cli("gptjax.sample", f"--workdir={workdir}", "--temperature=-1"), "--temperature")


# ----------------------------------------------------------------------------- a new user's first minutes

@pytest.mark.parametrize("module", ["gptjax.train", "gptjax.sample", "gptjax.eval", "gptjax.bench", "gptjax.convert",
                                    "gptjax.plan", "gptjax.data"])
def test_help_exits_zero(module):
    proc = run_cli(module, "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--" in proc.stdout + proc.stderr


def test_a_config_file_that_does_not_exist_is_one_clear_error(tmp_path):
    proc = run_cli("gptjax.train", "--config", "configs/nope.py", f"--workdir={tmp_path / 'run'}")
    assert_clean_error(proc, "config file configs/nope.py does not exist")
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_config_files_are_found_from_any_folder(text_file, tmp_path):
    """`--config configs/tiny.py` means the checkout's file when the current folder has none."""
    proc = run_cli("gptjax.train", "--config", "configs/tiny.py", f"--workdir={tmp_path / 'run'}",
                   f"--config.data.path={text_file}", *TRAIN_FLAGS, "--config.train.steps=2",
                   "--config.train.eval_every=2", "--config.train.sample_every=0", cwd=str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "run" / "checkpoints" / "2").is_dir()


def test_a_second_trainer_on_a_live_workdir_exits_at_once_and_the_first_is_undisturbed(text_file, tmp_path):
    import subprocess
    import sys
    import time

    from conftest import ROOT

    flags = [f"--config.data.path={text_file}", *TRAIN_FLAGS, "--config.train.steps=300",
             "--config.train.eval_every=100", "--config.train.checkpoint_every=100", "--config.train.log_every=10"]
    alone = train_cli(text_file, tmp_path / "alone", *flags[1:])
    assert alone.returncode == 0, alone.stderr

    env = dict(os.environ, JAX_PLATFORMS="cpu")
    first = subprocess.Popen([sys.executable, "-m", "gptjax.train", "--config", "configs/tiny.py",
                              f"--workdir={tmp_path / 'run'}", *flags], cwd=ROOT, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (tmp_path / "run" / "metrics.jsonl").exists() and time.time() < deadline:
            time.sleep(0.2)  # the first run is past its start-up and training
        t0 = time.time()
        second = train_cli(text_file, tmp_path / "run", *flags[1:])
        took = time.time() - t0
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert second.returncode == 2 and took < 60, (second.returncode, took)
    assert_clean_error(second, "being trained by a live process", f"pid {first.pid}")
    assert len(second.stderr.strip().splitlines()) == 1, second.stderr

    def losses(workdir):
        return [(r["step"], r["train_loss"]) for r in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())
                if "lr" in r]
    assert losses(tmp_path / "run") == losses(tmp_path / "alone")  # bitwise: nothing of the second run got in


def test_the_python_api_works_from_any_folder(trained_workdir, tmp_path):
    import subprocess
    import sys

    script = tmp_path / "use_it.py"
    script.write_text("from gptjax.sample import Generator\n"
                      f"g = Generator.from_workdir({str(trained_workdir)!r})\n"
                      "print(g.generate('First', max_new_tokens=20, seed=0))\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("First")
