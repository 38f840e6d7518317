"""End-to-end: the real `python -m gptjax.train` / `gptjax.sample` in subprocesses."""

import json
import os

import pytest

from conftest import run_cli

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
