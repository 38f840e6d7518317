"""Time to the first logged training step, cold and warm compilation cache.

    python scripts/startup_latency.py [--config configs/tiny.py] [--runs 2]

Starts `python -m gptjax.train` with a fresh, empty cache folder, then again
with the cache the first run filled, and reports for each the seconds from
launch until metrics.jsonl holds the first training record.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def first_step_seconds(config, workdir, env):
    metrics = os.path.join(workdir, "metrics.jsonl")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "gptjax.train", "--config", config, "--workdir", workdir,
                             "--config.train.steps=20"], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = None
    while proc.poll() is None and seen is None:
        if os.path.exists(metrics):
            with open(metrics, encoding="utf-8") as f:
                if any('"lr"' in line for line in f):
                    seen = time.perf_counter() - t0
        time.sleep(0.02)
    err = proc.communicate()[1]
    if proc.returncode != 0:
        sys.exit(f"error: training failed:\n{err[-2000:]}")
    return seen if seen is not None else time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/tiny.py")
    ap.add_argument("--runs", type=int, default=2, help="warm runs after the cold one")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ, XDG_CACHE_HOME=os.path.join(tmp, "cache"))  # the cache lives under it
        times = [first_step_seconds(a.config, os.path.join(tmp, f"run{i}"), env) for i in range(1 + a.runs)]
    cold, warm = times[0], min(times[1:])
    print(json.dumps({"config": a.config, "cold_s": round(cold, 2), "warm_s": round(warm, 2),
                      "warm_over_cold": round(warm / cold, 3)}))


if __name__ == "__main__":
    main()
