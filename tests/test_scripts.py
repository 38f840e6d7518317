"""The measurement scripts run end to end (with a stand-in for the PyTorch reference)."""

import json
import subprocess
import sys

import pytest

from conftest import ROOT

pytestmark = pytest.mark.slow  # each test starts the script in a process of its own

FAKE_REFERENCE = '''
import argparse, json
ap = argparse.ArgumentParser()
for flag in ("--text", "--steps", "--n_layer", "--n_head", "--n_embd", "--block_size", "--batch_size"):
    ap.add_argument(flag)
a = ap.parse_args()
assert (a.n_layer, a.n_head, a.n_embd, a.block_size, a.batch_size) == ("4", "4", "128", "64", "12")
print("warming up")
print(json.dumps({"impl": "stand-in", "tokens_per_s": 1000.0, "val_loss": 9.0}))
'''


def test_compare_torch_reports_each_run_and_the_median_ratio(text_file, tmp_path):
    ref = tmp_path / "reference.py"
    ref.write_text(FAKE_REFERENCE)
    out = subprocess.run(
        [sys.executable, "scripts/compare_torch.py", "--reference", str(ref), "--text", text_file,
         "--steps", "20", "--repeats", "2"],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(result["runs"]) == 2 and len(result["ratios"]) == 2
    ours = result["gptjax"]
    assert ours["tokens_per_s"] > 0 and ours["val_loss"] < 9.0
    assert result["ratio"] == min(result["ratios"])  # lower middle of two
    assert abs(result["ratio"] - ours["tokens_per_s"] / 1000.0) < 1e-9
    assert "run 2/2" in out.stderr and "median ratio" in out.stderr


def test_compare_torch_needs_a_reference(tmp_path):
    out = subprocess.run([sys.executable, "scripts/compare_torch.py", "--reference", str(tmp_path / "nope.py")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "no reference trainer" in out.stderr
