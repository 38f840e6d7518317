"""What a run reports: metrics.jsonl, TensorBoard, wandb, loss.png and the console.

`metrics.jsonl` in the workdir is the record of a run: one JSON object per
line, each with `step`. Every record written there also goes to the sinks
(TensorBoard event files in `WORKDIR/tensorboard`, and Weights & Biases when
asked for), with the record's keys as tags. This module imports neither JAX
nor TensorFlow, so reading and plotting a run stays light.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
TENSORBOARD_DIR = "tensorboard"
SAMPLES_FILE = "samples.txt"


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep the line parseable
    return v


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


class MetricsLog:
    """metrics.jsonl, plus sinks that get every record too (TensorBoard, wandb)."""

    def __init__(self, workdir: str, enabled: bool = True, sinks=()):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled
        self.sinks = list(sinks) if enabled else []

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")
        for sink in self.sinks:
            sink.write(record)

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a resume starts from)."""
        for sink in self.sinks:
            sink.resume_at(step)
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

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def _import_summary_writer():
    """tensorboardX's SummaryWriter, without the PyTorch import it tries on the way.

    tensorboardX imports torch when it is installed, only to accept torch
    tensors, which we never pass; that import costs seconds per process. A
    None entry in sys.modules makes it fail fast, and is removed right after.
    """
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


def scalar_tags(record: dict) -> dict:
    """{tag: value} of a record's numbers. Eval records get an `eval/` prefix: their `train_loss`
    (the loss on held-out batches of the training split) is not the per-batch `train_loss` of the log."""
    prefix = "eval/" if record_kind(record) == "eval" else ""
    return {prefix + k: float(v) for k, v in record.items() if k != "step" and _is_number(v)}


class TensorBoardLog:
    """Scalar event files via tensorboardX (no TensorFlow needed); tags from `scalar_tags`."""

    def __init__(self, workdir: str):
        self.logdir = os.path.join(workdir, TENSORBOARD_DIR)
        # Event files already here and no resume: an earlier attempt died before its first
        # checkpoint, and the run starts again from step 0.
        self.purge_step = 0 if os.path.isdir(self.logdir) and os.listdir(self.logdir) else None
        self.writer = None
        self.closed = False

    def resume_at(self, step: int) -> None:
        # Events a crashed run wrote past the checkpoint are hidden by TensorBoard.
        self.purge_step = step + 1

    def write(self, record: dict) -> None:
        if self.closed:
            return
        if self.writer is None:
            SummaryWriter = _import_summary_writer()
            # The suffix keeps two writers opened within one second from sharing a file name.
            self.writer = SummaryWriter(logdir=self.logdir, purge_step=self.purge_step, flush_secs=10,
                                        filename_suffix=f".{time.time_ns()}")
        step = int(record["step"])
        for tag, v in scalar_tags(record).items():
            self.writer.add_scalar(tag, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.closed = True


class WandbLog:
    """Weights & Biases, only when log.wandb=True and the package is installed."""

    def __init__(self, wandb, project: str, workdir: str, config: dict):
        self.run = wandb.init(project=project, name=os.path.basename(os.path.abspath(workdir)),
                              dir=workdir, config=config, resume="allow")

    def resume_at(self, step: int) -> None:
        pass

    def write(self, record: dict) -> None:
        self.run.log(scalar_tags(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def make_sinks(log_cfg, workdir: str, config: dict, say=print) -> list:
    sinks = []
    if log_cfg.tensorboard:
        sinks.append(TensorBoardLog(workdir))
    if log_cfg.wandb:
        try:
            import wandb
        except ImportError:
            say("log.wandb=True but the wandb package is not installed (pip install wandb); "
                "logging to metrics.jsonl and TensorBoard only.")
        else:
            sinks.append(WandbLog(wandb, log_cfg.wandb_project, workdir, config))
    return sinks


def bits_per_byte(mean_loss: float, n_tokens: int, n_bytes: int) -> float:
    """Nats per token -> bits per UTF-8 byte of the text those tokens spell.

    Comparable across tokenizers: a char model and a BPE model of the same
    text are charged for the same bytes.
    """
    return mean_loss * n_tokens / (math.log(2) * max(1, n_bytes))


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


# ----------------------------------------------------------------------------- a run's history

def record_kind(r: dict) -> str:
    if "val_loss" in r:
        return "eval"
    if any(k.startswith("diag/") for k in r):
        return "diag"
    if "train_loss" in r:
        return "train"
    return ",".join(sorted(r))


def history(records: list[dict]) -> list[dict]:
    """The records of the run as it finally went, in step order.

    A run that restarted from an earlier point (after a crash, from its last
    checkpoint or from scratch) writes steps it had written before. When a
    train, eval or diagnostics record does not move past the last step of its
    kind (any other record: when it goes back), everything from that step on
    is from an abandoned attempt and is dropped.
    """
    kept: list[dict] = []
    last: dict[str, int] = {}
    for r in records:
        if "step" not in r:
            continue
        kind, step = record_kind(r), r["step"]
        if kind in last and (step < last[kind] or (step == last[kind] and kind in ("train", "eval", "diag"))):
            kept = [k for k in kept if k["step"] < step]
            last = {record_kind(k): k["step"] for k in kept}
        kept.append(r)
        last[kind] = step
    return sorted(kept, key=lambda r: r["step"])


def series(records: list[dict], key: str, kind: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the records of one kind, skipping non-numbers (NaN written as text)."""
    pts = [(r["step"], r[key]) for r in records if record_kind(r) == kind and _is_number(r.get(key))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def best_val(records: list[dict]) -> tuple[int, float] | None:
    steps, vals = series(records, "val_loss", "eval")
    pts = [(v, s) for s, v in zip(steps, vals) if math.isfinite(v)]
    if not pts:
        return None
    v, s = min(pts)
    return s, v


# ----------------------------------------------------------------------------- loss.png

def draw_loss(ax, records: list[dict], tokens_per_step: int | None = None, label: str = "", color=None,
              key: str = "loss", x_scale: float = 1.0, eval_train: bool = True) -> None:
    """Train loss (every log) as a thin line, eval losses as points; the best val point starred.

    `key` is "loss" (nats per token) or "bpb" (bits per byte): the train and
    val keys are `train_<key>` and `val_<key>`. The x axis is the step times
    `x_scale` (1: steps; tokens per step: tokens); with `tokens_per_step`, a
    second axis on top reads in tokens.
    """
    prefix = f"{label}: " if label else ""
    s, v = series(records, f"train_{key}", "train")
    if s:
        line, = ax.plot([x * x_scale for x in s], v, lw=0.8, alpha=0.45, color=color, label=f"{prefix}train (batches)")
        color = color or line.get_color()
    s, v = series(records, f"train_{key}", "eval")
    if s and eval_train:
        ax.plot([x * x_scale for x in s], v, "o--", ms=3, lw=1, color=color, alpha=0.8, label=f"{prefix}train (eval)")
    s, v = series(records, f"val_{key}", "eval")
    if s:
        line, = ax.plot([x * x_scale for x in s], v, "o-", ms=3, lw=1.6, color=color, label=f"{prefix}val")
        color = line.get_color()
        i = min(range(len(v)), key=lambda j: v[j] if math.isfinite(v[j]) else math.inf)
        ax.plot([s[i] * x_scale], [v[i]], "*", ms=14, color=color, markeredgecolor="black", linestyle="none",
                label=f"{prefix}best val {v[i]:.4f} @ step {s[i]:,}")
    from matplotlib.ticker import FuncFormatter

    count_format = FuncFormatter(lambda v, _: human_count(v))
    ax.set_xlabel("step" if x_scale == 1 else "tokens")
    ax.set_ylabel("loss (nats/token)" if key == "loss" else "bits per byte")
    ax.grid(alpha=0.3)
    if x_scale != 1:
        ax.xaxis.set_major_formatter(count_format)
    if tokens_per_step and x_scale == 1:
        top = ax.secondary_xaxis("top", functions=(lambda x: x * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("tokens")
        top.xaxis.set_major_formatter(count_format)


def new_figure(width: float = 7.5, height: float = 4.5):
    """A matplotlib Figure on the Agg canvas: no pyplot, no display, no global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_loss_png(workdir: str, tokens_per_step: int | None = None, title: str | None = None) -> str | None:
    """Redraw WORKDIR/loss.png from metrics.jsonl; returns its path (None when there is nothing to draw)."""
    path = os.path.join(workdir, METRICS_FILE)
    if not os.path.exists(path):
        return None
    records = history(read_metrics(path))
    if not records:
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    draw_loss(ax, records, tokens_per_step)
    ax.set_title(title or os.path.basename(os.path.abspath(workdir)))
    ax.legend(fontsize=8)
    out = os.path.join(workdir, LOSS_PNG)
    tmp = out + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, out)  # a viewer never sees half a file
    return out


# ----------------------------------------------------------------------------- console

def human_count(n: float) -> str:
    """1500 -> "1.5k", 2_000_000 -> "2M"."""
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}"
    return f"{n:.3g}"


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return ""


EMBEDDINGS = ("wte", "wpe")


def model_summary(counts: dict[str, int]) -> list[str]:
    """Lines of a table: parameters per module, total, non-embedding, bytes in float32/bfloat16.

    `counts` maps module names to parameter counts (`model.param_counts`).
    """
    total = sum(counts.values())
    non_emb = total - sum(counts.get(k, 0) for k in EMBEDDINGS)
    counts = {**{k: counts[k] for k in EMBEDDINGS if k in counts}, **counts}  # input side first
    width = max([len(k) for k in counts] + [len("non-embedding")])
    lines = [f"  {'module':<{width}}  {'params':>13}  {'share':>6}"]
    for name, n in counts.items():
        lines.append(f"  {name:<{width}}  {n:>13,}  {100 * n / max(total, 1):>5.1f}%")
    lines.append(f"  {'-' * width}  {'-' * 13}  {'-' * 6}")
    lines.append(f"  {'total':<{width}}  {total:>13,}")
    lines.append(f"  {'non-embedding':<{width}}  {non_emb:>13,}")
    lines.append(f"  weights: {human_bytes(4 * total)} in float32, {human_bytes(2 * total)} in bfloat16")
    return lines


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


class Console:
    """Progress for people: a tqdm bar on a terminal, plain lines when stdout is not one, nothing when quiet.

    Everything printed during the run goes through `say`, so lines never
    tear the bar.
    """

    def __init__(self, quiet: bool = False, enabled: bool = True, stream=None):
        self.stream = stream or sys.stdout
        self.silent = quiet or not enabled
        self.bar = None
        self.plain_every = 1

    def say(self, msg: str = "") -> None:
        if self.silent:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def start(self, start: int, total: int, log_every: int) -> None:
        self.start_step, self.total, self.t0 = start, total, time.perf_counter()
        self._rate_from = None  # (time, step) of the first progress report: compilation is over by then
        # Plain mode: about twenty progress lines per run, on log steps.
        self.plain_every = max(log_every, (total // 20) // log_every * log_every)
        interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        if not self.silent and interactive:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=self.stream,
                            smoothing=0.1)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def eta(self, done: int) -> float:
        now = time.perf_counter()
        if self._rate_from is None or done <= self._rate_from[1]:
            t0, s0 = self.t0, self.start_step
        else:
            t0, s0 = self._rate_from
        return (now - t0) / max(done - s0, 1) * (self.total - done)

    def progress(self, done: int, rec: dict) -> None:
        """Show a train log record: as the bar's postfix, or as a line every `plain_every` steps."""
        if self.silent:
            return
        loss, lr, tps = rec.get("train_loss", float("nan")), rec.get("lr", float("nan")), rec.get("tokens_per_s", 0)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
        elif done % self.plain_every == 0 or done == self.total:
            mfu = f" | MFU {100 * rec['mfu']:.1f}%" if "mfu" in rec else ""
            self.say(f"step {done:>6} | loss {loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s{mfu} | "
                     f"ETA {format_duration(self.eta(done))}")
        if self._rate_from is None:
            self._rate_from = (time.perf_counter(), done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


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
