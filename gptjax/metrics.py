"""Run metrics: `metrics.jsonl` in the workdir, one JSON object per line."""

from __future__ import annotations

import json
import math
import os

METRICS_FILE = "metrics.jsonl"


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep the line parseable
    return v


class MetricsLog:
    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a resume starts from)."""
        if not self.enabled or not os.path.exists(self.path):
            return
        records = read_metrics(self.path)
        kept = [r for r in records if r.get("step", 0) <= step]
        with open(self.path, encoding="utf-8") as f:
            lines = f.read().splitlines(keepends=True)
        intact = all(line.endswith("\n") for line in lines) and len(records) == sum(bool(l.strip()) for l in lines)
        if len(kept) == len(records) and intact:  # else rewrite: a line cut short by a kill would swallow the next
            return
        tmp = self.path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        os.replace(tmp, self.path)


def read_metrics(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a crash
    return records


# ----------------------------------------------------------------------------- FLOPs and MFU

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


def datasheet_peak(device_kind: str) -> float | None:
    for name, flops in PEAK_BF16_FLOPS:
        if name.lower() in device_kind.lower():
            return flops
    return None


_cpu_peak_cache: dict = {}


def cpu_matmul_peak(n: int = 1024, seconds: float = 0.2) -> float:
    """Measured float32 matmul FLOP/s of the host's CPU device (all its threads).

    A CPU has no datasheet figure we can look up portably, so its "peak" is
    the best rate XLA reaches on a large square matmul: MFU on a CPU then
    reads as the fraction of what the CPU can do in matmuls.
    """
    import time

    import jax
    import jax.numpy as jnp

    if n in _cpu_peak_cache:
        return _cpu_peak_cache[n]
    cpu = jax.devices("cpu")[0]
    a = jax.device_put(jnp.ones((n, n), jnp.float32), cpu)
    f = jax.jit(lambda a: a @ a)
    f(a).block_until_ready()
    best, spent = 0.0, 0.0
    while spent < seconds:
        t0 = time.perf_counter()
        f(a).block_until_ready()
        dt = time.perf_counter() - t0
        spent += dt
        best = max(best, 2.0 * n**3 / dt)
    _cpu_peak_cache[n] = best
    return best


def peak_flops(devices) -> tuple[float | None, str]:
    """(total peak FLOP/s over `devices`, where the figure comes from)."""
    kind = devices[0].device_kind
    if devices[0].platform == "cpu":
        # The CPU "devices" share one machine's cores: the probe measures all of them.
        return cpu_matmul_peak(), "cpu matmul probe (float32)"
    per_device = datasheet_peak(kind)
    if per_device is None:
        return None, f"no peak figure known for {kind!r}"
    return per_device * len(devices), f"datasheet bf16 ({kind})"
