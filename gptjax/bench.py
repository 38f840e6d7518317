"""`python -m gptjax.bench --config CONFIG [--config.KEY=VALUE ...] [--steps N]`

Compiles the real train step of a config, runs warm-up steps and N timed
steps on real batches, and prints one JSON line: devices, parameters,
tokens per step, compile seconds, median ms per step, tokens/s, model FLOPs
per token, achieved TFLOP/s, MFU and peak device memory where the backend
reports it.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

from absl import app, flags, logging

from gptjax import config as config_lib
from gptjax import runtime
from gptjax import train as train_lib
from gptjax.errors import UserError, exit_with

_CONFIG = train_lib._CONFIG  # the same --config flag (and overrides) as training
_STEPS = flags.DEFINE_integer("steps", 100, "Timed optimizer steps (rounded up to whole calls).")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed optimizer steps after compilation.")
_CACHE = flags.DEFINE_bool("compilation_cache", False,
                           "Use the persistent compilation cache (compile_s then measures a cache load).")


def bench_train(cfg, steps: int = 100, warmup: int = 10) -> dict:
    """Time the compiled train step of `cfg`; returns the figures as a dict."""
    import jax
    import numpy as np

    from gptjax import model as model_lib
    from gptjax import sharding
    with tempfile.TemporaryDirectory() as workdir:
        with cfg.unlocked():
            cfg.train.eval_steps = 1  # the bench never evaluates; keep set-up short
        run = train_lib.Run(cfg, workdir, quiet=True)
        k = cfg.train.steps_per_call
        calls, warm_calls = -(-steps // k), -(-warmup // k)
        state = run.state
        x, y = run.train_batches(0, k)

        t0 = time.perf_counter()
        step = run.step_fn(k).lower(state, x, y).compile()
        compile_s = time.perf_counter() - t0

        for i in range(warm_calls):
            state, out = step(state, x, y)
            x, y = run.train_batches((i + 1) * k, k)
        jax.block_until_ready(state)

        # Time windows of several calls without a host sync inside them, as the
        # training loop runs; the median window is robust to stray pauses.
        window = max(1, calls // 10)
        ms_per_step = []
        done = warm_calls * k
        for _ in range(-(-calls // window)):
            t0 = time.perf_counter()
            for _ in range(window):
                state, out = step(state, x, y)
                done += k
                x, y = run.train_batches(done, k)  # prepared while the step runs
            jax.block_until_ready((state, out))
            ms_per_step.append(1000 * (time.perf_counter() - t0) / (window * k))
        timed_steps = len(ms_per_step) * window * k

        ms = float(np.median(ms_per_step))
        tokens_per_s = run.tokens_per_step / (ms / 1000)
        achieved = tokens_per_s * run.flops_per_token
        devices = list(run.mesh.devices.flat)
        mem = devices[0].memory_stats() or {}
        n_params = model_lib.count_params(state["params"])
        m, t = cfg.model, cfg.train
        return {
            "config": {"n_layer": m.n_layer, "n_head": m.n_head, "n_embd": m.n_embd, "block_size": m.block_size,
                       "batch_size": t.batch_size, "dtype": m.dtype, "param_dtype": m.param_dtype,
                       "attention": model_lib.resolve_attention(m.attention, m.dtype, m.n_embd // m.n_head),
                       "remat": m.remat, "grad_accum": t.grad_accum, "steps_per_call": k},
            "devices": len(devices),
            "device_kind": devices[0].device_kind,
            "platform": devices[0].platform,
            "mesh": dict(run.mesh.shape),
            "params": n_params,
            "tokens_per_step": run.tokens_per_step,
            "compile_s": round(compile_s, 3),
            "timed_steps": timed_steps,
            "ms_per_step": round(ms, 3),
            "tokens_per_s": round(tokens_per_s, 1),
            "flops_per_token": run.flops_per_token,
            "tflops": round(achieved / 1e12, 4),
            "peak_tflops": round(run.peak_flops / 1e12, 4) if run.peak_flops else None,
            "peak_source": run.peak_source,
            "mfu": round(achieved / run.peak_flops, 4) if run.peak_flops else None,
            "peak_memory_bytes": mem.get("peak_bytes_in_use"),
            "sharding": str(sharding.describe_devices(devices)),
        }


def main(argv):
    if len(argv) > 1:
        exit_with(UserError(f"unexpected arguments {argv[1:]}; config keys go as --config.SECTION.KEY=VALUE."))
    logging.set_verbosity(logging.WARNING)
    runtime.configure(compilation_cache=_CACHE.value)
    cfg = _CONFIG.value
    try:
        if _STEPS.value < 1 or _WARMUP.value < 0:
            raise UserError("--steps must be >= 1 and --warmup >= 0.")
        config_lib.validate(cfg)
        print(json.dumps(bench_train(cfg, _STEPS.value, _WARMUP.value)), flush=True)
    except UserError as e:
        exit_with(e)


def run_main():
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))


if __name__ == "__main__":
    run_main()
