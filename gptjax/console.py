"""The console: a tqdm progress bar on a terminal, plain lines otherwise, and the model table."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

from gptjax.params import EMBEDDINGS

# tqdm's own formatting: `format_duration(44)` -> "00:44", `format_size(3.2e6, "B")` -> "3.20MB".
format_duration = tqdm.format_interval
format_size = tqdm.format_sizeof


def model_summary(counts: dict[str, int]) -> list[str]:
    """Lines of a table: parameters per module, total, non-embedding, bytes in float32/bfloat16.

    `counts` maps module names to parameter counts (`params.param_counts`).
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
    lines.append(f"  weights: {format_size(4 * total, 'B')} in float32, {format_size(2 * total, 'B')} in bfloat16")
    return lines


def mfu_text(rec: dict) -> str:
    """" | MFU 48.6%" for a train record with `mfu`; "~" and "(est.)" when its peak was measured, not known."""
    if "mfu" not in rec:
        return ""
    if rec.get("mfu_estimate"):
        return f" | MFU ~{100 * rec['mfu']:.0f}% (est.)"
    return f" | MFU {100 * rec['mfu']:.1f}%"


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
        self.start_step, self.total, self.t0 = 0, 0, time.perf_counter()
        self.rate_from: tuple[float, int] | None = None  # (time, step) of the first progress report

    def say(self, msg: str = "") -> None:
        if self.silent:
            return
        if self.bar is not None:
            self.bar.write(msg, file=self.stream)
        else:
            print(msg, file=self.stream, flush=True)

    def start(self, start: int, total: int, log_every: int) -> None:
        self.start_step, self.total, self.t0 = start, total, time.perf_counter()
        self.rate_from = None  # compilation is over by the first progress report: the rate counts from there
        # Plain mode: about twenty progress lines per run, on log steps.
        self.plain_every = max(log_every, (total // 20) // log_every * log_every)
        interactive = hasattr(self.stream, "isatty") and self.stream.isatty()
        if not self.silent and interactive:
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=self.stream,
                            smoothing=0.1)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def eta(self, done: int) -> float:
        now = time.perf_counter()
        if self.rate_from is None or done <= self.rate_from[1]:
            t0, s0 = self.t0, self.start_step
        else:
            t0, s0 = self.rate_from
        return (now - t0) / max(done - s0, 1) * (self.total - done)

    def progress(self, done: int, rec: dict) -> None:
        """Show a train log record: as the bar's postfix, or as a line every `plain_every` steps."""
        if self.silent:
            return
        loss, lr, tps = rec.get("train_loss", float("nan")), rec.get("lr", float("nan")), rec.get("tokens_per_s", 0)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}", refresh=False)
        elif done % self.plain_every == 0 or done == self.total:
            self.say(f"step {done:>6} | loss {loss:.4f} | lr {lr:.2e} | {tps:,.0f} tok/s{mfu_text(rec)} | "
                     f"ETA {format_duration(self.eta(done))}")
        if self.rate_from is None:
            self.rate_from = (time.perf_counter(), done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
