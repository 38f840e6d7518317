"""What `train.diagnostics_every` costs: one train step vs one diagnostics call, and the loop with it off.

    python scripts/diagnostics_overhead.py --config configs/tiny.py [--steps 200] [--every 100]

Prints one JSON line: median seconds per train step (diagnostics off), per
diagnostics call, and the amortised overhead per step at the given interval.
With diagnostics off the train step is the same compiled function as before
(the model's `taps` hook traces nothing when it is None); the loop only tests
`step % every`.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from gptjax import config as config_lib  # noqa: E402
from gptjax import data as data_lib  # noqa: E402
from gptjax import train  # noqa: E402

_STEPS = flags.DEFINE_integer("steps", 200, "Train steps to time.")
_EVERY = flags.DEFINE_integer("every", 100, "Diagnostics interval to amortise over.")


def timed(fn, n):
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv):
    logging.set_verbosity(logging.WARNING)
    cfg = train._CONFIG.value
    with cfg.unlocked():
        cfg.train.diagnostics_every = _EVERY.value
        cfg.train.eval_every = cfg.train.checkpoint_every = 10**9
    with tempfile.TemporaryDirectory() as workdir:
        run = train.Run(cfg, workdir, quiet=True)
        x, y = run.batch(run.data.train_ids, 0, data_lib.TRAIN_STREAM)

        def step():
            run.state, out = run.step_fn(1)(run.state, x, y)
            return out

        step()  # compile
        jax.block_until_ready(run.diagnostics(run.state, x, y))  # compile
        step_s = timed(step, _STEPS.value)
        diag_s = timed(lambda: run.diagnostics(run.state, x, y), max(3, _STEPS.value // 20))
        run.ckpt.close()
    print(json.dumps({
        "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
        "params": sum(x.size for x in jax.tree.leaves(run.state["params"])),
        "train_step_s": step_s, "diagnostics_call_s": diag_s, "diagnostics_every": _EVERY.value,
        "overhead_per_step_at_interval": diag_s / _EVERY.value / step_s,
    }))


if __name__ == "__main__":
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))
