"""What `train.diagnostics_every` costs: one train step vs one diagnostics call, and the loop with it off.

    python scripts/diagnostics_overhead.py --config configs/tiny.py [--steps 200] [--every 100]

Prints one JSON line: median seconds per train step (diagnostics off), per
diagnostics call, and the amortised overhead per step at the given interval.
With diagnostics off the train step is the same compiled function as before
(the model sows nothing unless a recording pass asks it to); the loop only
tests `step % every`. Builds the steps from `gptjax.steps`: no workdir.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from gptjax import config as config_lib
from gptjax import data as data_lib
from gptjax import diagnostics as diag_lib
from gptjax import sharding
from gptjax import steps as steps_lib

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config file (optionally FILE:SIZE).")
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
    cfg = _CONFIG.value
    config_lib.validate(cfg)
    data = data_lib.prepare(cfg, log=lambda *_: None)
    with cfg.unlocked():
        cfg.model.vocab_size = data.tokenizer.vocab_size
    mesh = sharding.make_mesh(cfg.mesh)
    setup = steps_lib.init_train_state(cfg, mesh)
    x, y = (sharding.to_global(a, mesh) for a in data_lib.get_batch(
        data.train_ids, cfg.model.block_size, cfg.train.batch_size, cfg.train.seed, 0))
    train_step = steps_lib.make_train_step(setup, cfg)
    diagnostics = diag_lib.make_diagnostics_step(setup.graphdef, setup.tx)
    state = {"now": setup.state}

    def step():
        state["now"], out = train_step(state["now"], x, y)
        return out

    step()  # compile
    jax.block_until_ready(diagnostics(state["now"], x, y))  # compile
    step_s = timed(step, _STEPS.value)
    diag_s = timed(lambda: diagnostics(state["now"], x, y), max(3, _STEPS.value // 20))
    print(json.dumps({
        "devices": f"{len(jax.devices())} x {jax.devices()[0].device_kind}",
        "params": sum(a.size for a in jax.tree.leaves(state["now"]["params"])),
        "train_step_s": step_s, "diagnostics_call_s": diag_s, "diagnostics_every": _EVERY.value,
        "overhead_per_step_at_interval": diag_s / _EVERY.value / step_s,
    }))


if __name__ == "__main__":
    config_lib.find_config_files(sys.argv)
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))
