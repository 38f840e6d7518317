"""`python -m gptjax.data`: the command line, in subprocesses."""

import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, STORIES, run_cli, write_folder

pytestmark = pytest.mark.slow

def test_counts_are_printed_and_only_our_lines_reach_a_log(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path / "xdg")}
    folder = write_folder(tmp_path / "mytexts", STORIES)
    proc = run_cli("gptjax.data", "--config", "configs/tiny.py", "--config.data.dataset=text",
                   f"--config.data.path={folder}", f"--workdir={tmp_path / 'run'}", env=env)
    assert proc.returncode == 0, proc.stderr
    assert "characters/token" in proc.stdout and "train:" in proc.stdout
    # stdout and stderr are pipes here: none of datasets' progress bars, only our own lines.
    log = proc.stdout + proc.stderr
    for bar in ("Generating", "Map", "it/s", "examples/s", "%|"):
        assert bar not in log, log
    assert all(re.match(r"(data:|source:|\s*(train|val):)", line) for line in log.splitlines() if line), log
    assert sorted(os.listdir(tmp_path / "run" / "tokenizer")) == ["data.json", "tokenizer.json"]


def test_a_failed_data_check_leaves_no_workdir(tmp_path):
    (tmp_path / "blank.txt").write_text("\n \n")
    proc = run_cli("gptjax.data", "--config", "configs/tiny.py", f"--config.data.path={tmp_path / 'blank.txt'}",
                   f"--workdir={tmp_path / 'run'}", env={"XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert proc.returncode == 2 and "is empty" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_hub_name_offline_is_clear(tmp_path):
    offline = {"XDG_CACHE_HOME": str(tmp_path / "xdg"), "GPTJAX_DATA_DIR": str(tmp_path / "nothing-here"),
               "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    proc = run_cli("gptjax.data", "--config", "configs/tinystories.py", env=offline)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "roneneldan/TinyStories" in proc.stderr and "GPTJAX_DATA_DIR" in proc.stderr
    assert "data.path" in proc.stderr


def test_the_console_script_entry_point_runs(tmp_path):
    folder = write_folder(tmp_path / "mytexts", STORIES)
    code = ("import sys; from gptjax.data.__main__ import run_main; "
            f"sys.argv = ['gptjax-data', '--config=configs/tiny.py', '--config.data.path={folder}']; run_main()")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "XDG_CACHE_HOME": str(tmp_path / "xdg")})
    assert proc.returncode == 0 and "characters/token" in proc.stdout, proc.stderr
