"""FLOPs per token and the peak FLOP/s that MFU divides by.

On GPUs and TPUs the peak is the vendor's datasheet figure. A CPU has none
we can look up portably, so its peak is measured (`cpu_matmul_peak`) and any
MFU computed from it is an estimate (`peak_flops` says so).
"""

from __future__ import annotations

import time


def flops_per_token(model_cfg, n_params: int, n_position_params: int = 0) -> float:
    """Training FLOPs per token: 6N + 12·L·D·T (PaLM, Chowdhery et al. 2022, appendix B).

    6N counts the forward (2N) and backward (4N) multiply-adds of every weight
    used in a matrix product. Position embeddings are looked up, never
    multiplied, so they are left out; a tied token embedding stays in (it is
    the output projection). 12·L·D·T is the attention score and weighted-sum
    products, with D = heads x head size and T the sequence length.
    """
    n = n_params - n_position_params
    if not model_cfg.tie_embeddings:
        n -= model_cfg.vocab_size * model_cfg.n_embd  # the input table is a lookup; lm_head is counted
    return 6.0 * n + 12.0 * model_cfg.n_layer * model_cfg.n_embd * model_cfg.block_size


# Dense bf16 peak FLOP/s per device, from the vendors' datasheets (tensor
# cores / MXUs, without structured sparsity). Matched against
# jax.Device.device_kind, most specific name first.
#   NVIDIA T4 65 TFLOP/s fp16 (T4 datasheet); L4 121 (L4 datasheet, 242 with sparsity);
#   L40S 362 and L40 181 (their datasheets, 733/362 with sparsity);
#   A100 312 (A100 datasheet, SXM and PCIe); H100 SXM 989, H100 PCIe/NVL 756
#   (H100 datasheet); H200 989 (H200 datasheet, same compute as H100 SXM).
#   Google TPU v2 45 per chip, v3 123, v4 275, v5e 197, v5p 459, v6e (Trillium) 918
#   (cloud.google.com/tpu/docs/system-architecture-tpu-vm and the per-version pages).
PEAK_BF16_FLOPS = [
    ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12),
    ("A100", 312e12), ("L40S", 362e12), ("L40", 181e12), ("L4", 121e12), ("T4", 65e12),
    ("TPU v2", 45e12), ("TPU v3", 123e12), ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12), ("TPU v5e", 197e12), ("TPU v5p", 459e12), ("TPU v5", 459e12),
    ("TPU v6 lite", 918e12), ("TPU v6e", 918e12),
]

CPU_PEAK_SOURCE = "cpu matmul probe (float32, an estimate)"


def datasheet_peak(device_kind: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


_cpu_peak_cache: dict = {}


def best_rate(run_once, flops: float, probes: int = 10, calls: int = 1, gap_s: float = 0.025, clock=time.perf_counter,
              sleep=time.sleep) -> float:
    """The best FLOP/s of `probes` short timings of `calls` calls each, `gap_s` apart.

    On a shared machine a single timing catches whatever else runs at that
    moment; spreading short probes out and keeping the fastest finds the
    rate the hardware reaches when it gets a quiet moment.
    """
    best = 0.0
    for i in range(probes):
        if i:
            sleep(gap_s)
        t0 = clock()
        for _ in range(calls):
            run_once()
        best = max(best, calls * flops / max(clock() - t0, 1e-12))
    return best


def cpu_matmul_peak(n: int = 1024) -> float:
    """Measured float32 matmul FLOP/s of the host's CPU device (all its threads), cached per process.

    A CPU has no datasheet figure we can look up portably, so its "peak" is
    the best rate XLA reaches on a large square matmul: MFU on a CPU then
    reads as the fraction of what the CPU can do in matmuls.
    """
    import jax
    import jax.numpy as jnp

    if n in _cpu_peak_cache:
        return _cpu_peak_cache[n]
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()  # compile outside the timings
    _cpu_peak_cache[n] = best_rate(lambda: f(a).block_until_ready(), 2.0 * n**3)
    return _cpu_peak_cache[n]


def peak_flops(devices) -> tuple[float | None, str]:
    """(total peak FLOP/s over `devices`, where the figure comes from)."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # The CPU "devices" share one machine's cores: the probe measures all of them.
        return cpu_matmul_peak(), CPU_PEAK_SOURCE
    per_device = datasheet_peak(kind)
    if per_device is None:
        return None, f"no peak figure known for {kind!r}"
    return per_device * len(devices), f"datasheet bf16 ({kind})"


def is_estimate(peak_source: str) -> bool:
    """True when the peak was measured on this machine: MFU from it is an estimate."""
    return peak_source == CPU_PEAK_SOURCE
