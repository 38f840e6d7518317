"""Train configs/tiny.py and a PyTorch reference trainer one after the other on this machine.

    python scripts/compare_torch.py --reference PATH/torch_reference.py [--steps 2000] [--text FILE] [--repeats N]

The reference is a separate script (it needs torch; gptjax does not) that
trains the same shape (4 layers, 4 heads, 128 wide, block 64, batch 12) on
the same text and prints one JSON line with `tokens_per_s` and `val_loss`.
Both throughputs are steady-state: the reference skips its warm-up steps,
and ours leaves out the first logging window (it holds the compilation) and
the evaluations. Prints one JSON line with both results and the ratio.

`--repeats N` runs the pair N times, alternating, and reports the median
ratio (and every run): on a machine shared with other work, load that comes
and goes during one trainer's run moves a single ratio by several percent.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "batch_size": 12}


def run_reference(path, text, steps):
    args = [sys.executable, path, "--text", text, "--steps", str(steps)]
    for k, v in SHAPE.items():
        args += [f"--{k}", str(v)]
    out = subprocess.run(args, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"error: the reference trainer failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_gptjax(text, steps, workdir):
    from gptjax.logs import read_metrics

    args = [sys.executable, "-m", "gptjax.train", "--config", "configs/tiny.py", "--workdir", workdir,
            f"--config.data.path={text}", f"--config.train.steps={steps}"]
    args += [f"--config.{'train' if k == 'batch_size' else 'model'}.{k}={v}" for k, v in SHAPE.items()]
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        sys.exit(f"error: gptjax training failed:\n{out.stderr[-2000:]}")
    recs = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    windows = [r for r in recs if "lr" in r]
    tokens_per_step = SHAPE["batch_size"] * SHAPE["block_size"]
    tokens = seconds = 0.0
    prev = 0
    for i, r in enumerate(windows):
        n = (r["step"] - prev) * tokens_per_step
        prev = r["step"]
        if i == 0:
            continue  # includes compilation
        tokens += n
        seconds += n / r["tokens_per_s"]
    evals = [r for r in recs if "val_loss" in r]
    return {"impl": "gptjax", "tokens_per_s": tokens / seconds, "ms_per_step": 1000 * seconds / (tokens / tokens_per_step),
            "final_train_loss": windows[-1]["train_loss"], "val_loss": evals[-1]["val_loss"],
            "mfu": windows[-1].get("mfu")}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reference", required=True, help="path to the PyTorch reference trainer script")
    ap.add_argument("--steps", type=int, default=2000)
    default_text = os.path.join(os.environ.get("GPTJAX_DATA_DIR", ""), "tinyshakespeare", "input.txt")
    ap.add_argument("--text", default=default_text, help="training text (default: Tiny Shakespeare)")
    ap.add_argument("--repeats", type=int, default=1, help="run the pair this many times; report the median ratio")
    a = ap.parse_args()
    if a.repeats < 1 or a.steps < 1:
        sys.exit("error: --repeats and --steps must be positive.")
    if not os.path.isfile(a.reference):
        sys.exit(f"error: no reference trainer at {a.reference}; pass --reference PATH.")
    if not os.path.isfile(a.text):
        sys.exit(f"error: no text file at {a.text!r}; pass --text FILE or set GPTJAX_DATA_DIR.")
    runs = []
    for i in range(a.repeats):
        ref = run_reference(a.reference, a.text, a.steps)
        with tempfile.TemporaryDirectory() as workdir:
            ours = run_gptjax(a.text, a.steps, workdir)
        runs.append({"ratio": ours["tokens_per_s"] / ref["tokens_per_s"], "gptjax": ours, "reference": ref})
        print(f"run {i + 1}/{a.repeats}: reference {ref['tokens_per_s']:,.0f} tokens/s (val loss {ref['val_loss']:.4f}), "
              f"gptjax {ours['tokens_per_s']:,.0f} tokens/s (val loss {ours['val_loss']:.4f}), "
              f"ratio {runs[-1]['ratio']:.2f}x", file=sys.stderr, flush=True)
    median = sorted(runs, key=lambda r: r["ratio"])[(len(runs) - 1) // 2]  # the lower middle run when even
    print(f"median ratio: {median['ratio']:.2f}x over {len(runs)} run(s)", file=sys.stderr)
    print(json.dumps({"steps": a.steps, "ratio": median["ratio"], "ratios": [r["ratio"] for r in runs],
                      "gptjax": median["gptjax"], "reference": median["reference"], "runs": runs}))

if __name__ == "__main__":
    main()
