"""The README's memory table: `python -m gptjax.plan --json` for every row, as a Markdown table.

    python scripts/memory_table.py [--jobs 2] [--out table.jsonl]

Each row is one run of the plan command (GPT-2 124M to 1.5B on 8 virtual
devices, the sizes of configs/openwebtext.py:gpt2 overridden), so every
figure comes from XLA's analysis of the real, compiled train step. The
command of each row is printed above the table.
"""

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {"124M": (12, 768, 12), "350M": (24, 1024, 16), "774M": (36, 1280, 20), "1.5B": (48, 1600, 25)}
MESHES = ("data=8", "fsdp=8", "fsdp=4,tensor=2")
BATCHES = (8, 32)
GIB = 2**30


def rows():
    """(label, plan arguments) of every row: each size x mesh x remat x batch, and 1.5B with bf16 weights."""
    for size, (layers, width, heads) in SIZES.items():
        for mesh in MESHES:
            if heads % 2 and "tensor=2" in mesh:
                continue  # 25 heads do not split over 2 tensor devices
            for remat in (True, False):
                for batch in BATCHES:
                    yield size, [f"--mesh={mesh}", f"--config.model.n_layer={layers}",
                                 f"--config.model.n_embd={width}", f"--config.model.n_head={heads}",
                                 f"--config.model.remat={remat}", f"--config.train.batch_size={batch}"]
    layers, width, heads = SIZES["1.5B"]
    for batch in BATCHES:
        yield "1.5B (bf16 weights)", ["--mesh=fsdp=8", f"--config.model.n_layer={layers}",
                                      f"--config.model.n_embd={width}", f"--config.model.n_head={heads}",
                                      "--config.model.remat=True", f"--config.train.batch_size={batch}",
                                      "--config.model.param_dtype=bfloat16"]


def plan(args):
    cmd = [sys.executable, "-m", "gptjax.plan", "--config", "configs/openwebtext.py:gpt2", "--devices=8",
           "--json", *args]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown_row(label, p):
    c, h = p["compiled"], p["hand"]
    mesh = ",".join(f"{k}={v}" for k, v in p["mesh"].items() if v > 1)
    per_device = p["batch_size"] // (p["mesh"]["data"] * p["mesh"]["fsdp"])
    fits = lambda limit: "yes" if c["total"] <= limit else "no"
    return (f"| {label} | {mesh} | {'on' if p['model']['remat'] else 'off'} | {p['batch_size']} ({per_device}) | "
            f"{c['params'] / GIB:.2f} + {c['optimizer'] / GIB:.2f} | {c['temporaries'] / GIB:.2f} | "
            f"**{c['total'] / GIB:.2f}** | {h['total'] / GIB:.2f} | {fits(16e9)} / {fits(80e9)} | {p['compile_s']} |")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--jobs", type=int, default=2, help="plans compiled at once")
    ap.add_argument("--out", help="also write each plan's JSON here, one line per row")
    a = ap.parse_args()
    todo = list(rows())
    with concurrent.futures.ThreadPoolExecutor(a.jobs) as pool:
        plans = list(pool.map(lambda row: plan(row[1]), todo))
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            for (label, args), p in zip(todo, plans):
                f.write(json.dumps({"label": label, "args": args, "plan": p}) + "\n")
    print("| model | mesh | remat | global batch (per device) | params + Adam | temporaries | compiled total "
          "| hand total | 16 GB / 80 GB | compile s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for (label, _), p in zip(todo, plans):
        print(markdown_row(label, p))


if __name__ == "__main__":
    main()
