"""`python -m gptjax.bench --config CONFIG [--config.KEY=VALUE ...] [--steps N]`

Compiles the real train step of a config, runs warm-up steps and N timed
steps on real batches, and prints one JSON line: devices, parameters,
tokens per step, compile seconds, median ms per step, tokens/s, model FLOPs
per token, achieved TFLOP/s, MFU and peak device memory where the backend
reports it.

`python -m gptjax.bench --sample` times decoding instead: generation with
and without the KV cache for a randomly initialised GPT (6 layers, 6 heads,
384 wide by default, the size of configs/shakespeare.py) at several context
lengths. Decode speed is (n - 1) / (time(n tokens) - time(1 token)): the
prefill, dispatch and compilation cancel out, leaving the per-token cost with
a context that is half full (prompt of context/2 tokens).

`python -m gptjax.bench --compare model.scan_layers=False,True` compiles the
train step once per value and times them in alternating windows in one
process: on a shared machine the variants see the same load, and
`ratio_to_first` (the median of per-round ratios) is the figure to quote.

`python -m gptjax.bench --to_loss 1.90 --config configs/tiny.py:modern` times
training from scratch to a validation loss instead (`gptjax/to_loss.py`):
wall time, steps and tokens to the first evaluation at or below the target,
with compilation included and reported separately. Its compilation cache is
off unless --compilation_cache.
"""

from __future__ import annotations

import ast
import json
import sys
import time

import jax
import numpy as np
from absl import app, flags, logging
from flax import nnx

from gptjax import config as config_lib
from gptjax import kernels
from gptjax import decode
from gptjax import model as model_lib
from gptjax import params as params_lib
from gptjax import runtime
from gptjax.errors import UserError, exit_with

from ml_collections import config_flags

# The same --config flag (and overrides) as training.
_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config file (optionally FILE:SIZE).")
_STEPS = flags.DEFINE_integer("steps", 100, "Timed optimizer steps (rounded up to whole calls).")
_WARMUP = flags.DEFINE_integer("warmup", 10, "Untimed optimizer steps after compilation.")
_CACHE = flags.DEFINE_bool("compilation_cache", False,
                           "Use the persistent compilation cache (compile_s then measures a cache load).")

_COMPARE = flags.DEFINE_string("compare", None, "SECTION.KEY=V1,V2[,...]: time the train step with the key set "
                                "to each value, alternating windows in one process (noisy machines).")
_ROUNDS = flags.DEFINE_integer("rounds", 9, "With --compare: timing rounds (one window of every variant each).")
_SAMPLE = flags.DEFINE_boolean("sample", False, "Benchmark decoding (tokens/s with and without the KV cache).")
_TO_LOSS = flags.DEFINE_float("to_loss", None, "Time to a loss instead: train from scratch until the validation "
                              "loss (or bits per byte, --metric bpb) is at most this (gptjax/to_loss.py).")
_METRIC = flags.DEFINE_enum("metric", "loss", ["loss", "bpb"], "With --to_loss: what the target compares with.")
_EVAL_EVERY = flags.DEFINE_integer("eval_every", 25, "With --to_loss: evaluate every N steps "
                                   "(rounded up to whole compiled calls).")
flags.DEFINE_list("sample_contexts", ["256", "1024"], "Context lengths (model.block_size) to time.")
flags.DEFINE_integer("sample_layers", 6, "Layers of the benchmarked model.")
flags.DEFINE_integer("sample_width", 384, "Width (n_embd) of the benchmarked model; 64 per head.")
flags.DEFINE_integer("sample_vocab", 65, "Vocabulary size (65: Tiny Shakespeare characters).")
flags.DEFINE_integer("sample_tokens", 64, "Tokens decoded per timed run with the cache.")
flags.DEFINE_integer("sample_tokens_nocache", 16, "Tokens decoded per timed run without the cache.")
flags.DEFINE_integer("sample_repeats", 3, "Timed runs per setting; the fastest counts.")


def _timed_generate(graphdef, params, block: int, vocab_size: int, n_new: int, use_cache: bool, repeats: int) -> float:
    """Seconds for the fastest of `repeats` generations of n_new tokens (compiled beforehand)."""
    prompt_len = block // 2
    prompt = np.random.default_rng(0).integers(0, vocab_size, prompt_len)
    window, settings = decode.request(prompt, 1, block, n_new, temperature=1.0, top_k=0, top_p=1.0)
    args = (graphdef, params, window, prompt_len, jax.random.key(0), settings)
    jax.block_until_ready(decode.generate(*args, n_new=n_new, use_cache=use_cache))  # compile
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(decode.generate(*args, n_new=n_new, use_cache=use_cache))
        best = min(best, time.perf_counter() - t0)
    return best


def bench_sample(contexts=(256, 1024), n_layer: int = 6, n_embd: int = 384, vocab_size: int = 65,
                 n_tokens: int = 64, n_tokens_nocache: int = 16, repeats: int = 3) -> dict:
    """Decode tokens/s with and without the KV cache, per context length."""
    if n_embd % 64 or n_layer < 1 or min(contexts) < 4 or min(n_tokens, n_tokens_nocache) < 2 or repeats < 1:
        raise UserError("sample benchmark: need width a multiple of 64, >= 1 layer, contexts >= 4, "
                        ">= 2 tokens per run and >= 1 repeat.")
    results = []
    for block in contexts:
        cfg = config_lib.base_config().model
        cfg.n_layer, cfg.n_head, cfg.n_embd = n_layer, n_embd // 64, n_embd
        cfg.block_size, cfg.vocab_size = block, vocab_size
        graphdef, state = nnx.split(model_lib.GPT(cfg, rngs=nnx.Rngs(0)))
        params = nnx.to_pure_dict(state)
        row = {"context": block}
        for use_cache, n in ((True, n_tokens), (False, n_tokens_nocache)):
            n = min(n, block - block // 2)  # stay inside the window: the steady-state decode cost
            t_n = _timed_generate(graphdef, params, block, vocab_size, n, use_cache, repeats)
            t_1 = _timed_generate(graphdef, params, block, vocab_size, 1, use_cache, repeats)
            # None: the difference drowned in timing noise (too few tokens for this model).
            row["cache_tokens_per_s" if use_cache else "nocache_tokens_per_s"] = (
                (n - 1) / (t_n - t_1) if t_n > t_1 else None)
        if row["cache_tokens_per_s"] and row["nocache_tokens_per_s"]:
            row["speedup"] = row["cache_tokens_per_s"] / row["nocache_tokens_per_s"]
        results.append(row)
    return {
        "bench": "sample", "backend": jax.default_backend(), "devices": len(jax.devices()),
        "model": {"n_layer": n_layer, "n_embd": n_embd, "n_head": n_embd // 64, "vocab_size": vocab_size,
                  "params": params_lib.count_params(params)},
        "batch": 1, "prompt": "context/2", "results": results,
    }



class _TrainTimer:
    """One config's real train step (built by `steps.py`, no workdir): compiled, warmed up, then timed
    a window of calls at a time on real batches, without a host sync inside a window (as the
    training loop runs)."""

    def __init__(self, cfg, warmup: int):
        from gptjax import data as data_lib
        from gptjax import sharding
        from gptjax import steps as steps_lib

        config_lib.validate(cfg)
        data = data_lib.prepare(cfg, None, log=lambda *_: None)  # real batches; nothing written but caches
        with cfg.unlocked():
            cfg.model.vocab_size = data.tokenizer.vocab_size
        m, t = cfg.model, cfg.train
        data_lib.check_length(data.train_ids, m.block_size, "training")
        mesh = sharding.make_mesh(cfg.mesh)
        sharding.check_batch(t.batch_size, mesh)
        sharding.check_model(m, mesh)
        setup = steps_lib.init_train_state(cfg, mesh)
        self.cfg, self.mesh, self.k = cfg, mesh, t.steps_per_call
        rows = sharding.process_rows(mesh, t.batch_size)

        def batches(step):
            xy = [data_lib.get_batch(data.train_ids, m.block_size, t.batch_size, t.seed, s, rows=rows)
                  for s in range(step, step + self.k)]
            if self.k == 1:
                return tuple(sharding.to_global(a, mesh, t.batch_size) for a in xy[0])
            return tuple(sharding.to_global(np.stack(a), mesh, t.batch_size, stacked=True) for a in zip(*xy))

        self._batches = batches
        self.state = setup.state
        self.x, self.y = batches(0)
        t0 = time.perf_counter()
        self._step = steps_lib.make_train_step(setup, cfg, steps_per_call=self.k).lower(
            self.state, self.x, self.y).compile()
        self.compile_s = time.perf_counter() - t0
        self.done = 0
        self.run(-(-warmup // self.k))

    def run(self, calls: int) -> float:
        """Run `calls` compiled calls; returns milliseconds per optimizer step."""
        t0 = time.perf_counter()
        out = None
        for _ in range(calls):
            self.state, out = self._step(self.state, self.x, self.y)
            self.done += self.k
            self.x, self.y = self._batches(self.done)  # prepared while the step runs
        jax.block_until_ready((self.state, out))
        return 1000 * (time.perf_counter() - t0) / max(1, calls * self.k)

    def figures(self, ms_per_step: list[float], timed_steps: int) -> dict:
        """The JSON figures of this config, from its timing windows (ms per step each)."""
        from gptjax import sharding
        from gptjax.flops import flops_per_token, peak_flops

        m, t = self.cfg.model, self.cfg.train
        ms = float(np.median(ms_per_step))
        tokens_per_step = t.batch_size * m.block_size
        tokens_per_s = tokens_per_step / (ms / 1000)
        counts = params_lib.param_counts(self.state["params"])
        fpt = flops_per_token(m, sum(counts.values()), counts.get("wpe", 0))
        achieved = tokens_per_s * fpt
        devices = list(self.mesh.devices.flat)
        peak, peak_source = peak_flops(devices)
        mem = devices[0].memory_stats() or {}
        return {
            "config": {"n_layer": m.n_layer, "n_embd": m.n_embd, "n_head": m.n_head, "block_size": m.block_size,
                       "batch_size": t.batch_size, "dtype": m.dtype, "param_dtype": m.param_dtype,
                       "attention": kernels.resolve_attention(m.attention, m.dtype, m.n_embd // m.n_head),
                       "matmul": kernels.resolve_matmul(m.matmul), "remat": m.remat,
                       "scan_layers": m.scan_layers, "grad_accum": t.grad_accum, "steps_per_call": self.k},
            "devices": len(devices),
            "device_kind": devices[0].device_kind,
            "platform": devices[0].platform,
            "mesh": dict(self.mesh.shape),
            "params": sum(counts.values()),
            "tokens_per_step": tokens_per_step,
            "compile_s": round(self.compile_s, 3),
            "timed_steps": timed_steps,
            "ms_per_step": round(ms, 3),
            "ms_per_step_spread": [round(min(ms_per_step), 3), round(max(ms_per_step), 3)],
            "tokens_per_s": round(tokens_per_s, 1),
            "flops_per_token": fpt,
            "tflops": round(achieved / 1e12, 4),
            "peak_tflops": round(peak / 1e12, 4) if peak else None,
            "peak_source": peak_source,
            "mfu": round(achieved / peak, 4) if peak else None,
            "peak_memory_bytes": mem.get("peak_bytes_in_use"),
            "sharding": str(sharding.describe_devices(devices)),
        }


def bench_train(cfg, steps: int = 100, warmup: int = 10, progress=None) -> dict:
    """Time the compiled train step of `cfg`; returns the figures.

    The median of ~10 timing windows is robust to stray pauses. `progress(msg)`
    gets a line per window once a benchmark has run for more than a few
    seconds, so a long one (a big config on a CPU) shows that it is alive.
    """
    timer = _TrainTimer(cfg, warmup)
    calls = -(-steps // timer.k)
    window = max(1, calls // 10)
    n_windows = -(-calls // window)
    ms_per_step, started = [], time.perf_counter()
    for w in range(n_windows):
        ms_per_step.append(timer.run(window))
        if progress is not None and time.perf_counter() - started > 5:
            progress(f"bench: window {w + 1}/{n_windows}: {ms_per_step[-1]:.1f} ms/step")
    return timer.figures(ms_per_step, n_windows * window * timer.k)


def parse_compare(text: str) -> tuple[str, list]:
    """"SECTION.KEY=V1,V2[,...]" -> ("SECTION.KEY", [V1, V2, ...]), each value a Python literal or a string."""
    key, sep, values = text.partition("=")
    parts = [v.strip() for v in values.split(",")]
    if not sep or key.count(".") != 1 or len(parts) < 2 or not all(parts):
        raise UserError(f"--compare takes SECTION.KEY=V1,V2[,...] (two values or more), got {text!r}.")

    def literal(v):
        try:
            return ast.literal_eval(v)
        except (ValueError, SyntaxError):
            return v  # a bare word: a string value such as adamw

    return key, [literal(v) for v in parts]


def bench_compare(cfg, key: str, values: list, steps: int = 100, warmup: int = 10, rounds: int = 9,
                  progress=None) -> dict:
    """Time the train step of `cfg` with `key` set to each of `values`, alternating in one process.

    Round r times one window of every variant back to back, so a shared or
    noisy machine slows them alike; each variant's figures come from its own
    windows, and `ratio_to_first` is the median over rounds of (variant's
    window / first variant's window of the same round), with its spread.
    """
    section, name = key.split(".")
    if section not in cfg or name not in cfg[section]:
        raise UserError(f"--compare: no config key {key}.")
    timers = []
    for v in values:
        c = cfg.copy_and_resolve_references()
        try:
            with c.unlocked():
                c[section][name] = v
        except TypeError as e:
            raise UserError(f"--compare: {key}={v!r}: {e}") from None
        timers.append(_TrainTimer(c, warmup))
    calls = max(1, -(-steps // (timers[0].k * rounds)))
    windows = [[] for _ in timers]
    for r in range(rounds):
        for timer, ms in zip(timers, windows):
            ms.append(timer.run(calls))
        if progress is not None:
            progress(f"bench: round {r + 1}/{rounds}: " + ", ".join(
                f"{key}={v}: {ms[-1]:.1f} ms/step" for v, ms in zip(values, windows)))
    first = np.asarray(windows[0])
    ratios = [np.asarray(ms) / first for ms in windows]
    return {
        "bench": "compare", "key": key, "rounds": rounds,
        "variants": [{"value": v, **t.figures(ms, rounds * calls * t.k)} for v, t, ms in zip(values, timers, windows)],
        "ratio_to_first": [{"value": v, "median": round(float(np.median(r)), 4),
                            "spread": [round(float(r.min()), 4), round(float(r.max()), 4)]}
                           for v, r in zip(values, ratios)],
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
        if _TO_LOSS.value is not None:
            from gptjax.to_loss import time_to_loss

            out = time_to_loss(cfg, _TO_LOSS.value, _METRIC.value, _EVAL_EVERY.value,
                               log=lambda msg: print(msg, file=sys.stderr, flush=True))
        elif _SAMPLE.value:
            F = flags.FLAGS
            out = bench_sample([int(c) for c in F.sample_contexts], F.sample_layers, F.sample_width,
                               F.sample_vocab, F.sample_tokens, F.sample_tokens_nocache, F.sample_repeats)
        elif _COMPARE.value:
            if _ROUNDS.value < 1:
                raise UserError("--rounds must be >= 1.")
            key, values = parse_compare(_COMPARE.value)
            out = bench_compare(cfg, key, values, _STEPS.value, _WARMUP.value, _ROUNDS.value,
                                progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        else:
            out = bench_train(cfg, _STEPS.value, _WARMUP.value,
                              progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(json.dumps(out), flush=True)
    except (UserError, ValueError) as e:
        exit_with(UserError(str(e)))


def run_main():
    config_lib.find_config_files(sys.argv)
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))


if __name__ == "__main__":
    run_main()
