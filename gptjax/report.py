"""What people see and keep of a training run: console lines, metrics records, loss.png, samples.txt.

The trainer talks to one `Reporter`; it never prints or writes those files itself.
"""

from __future__ import annotations

import os

import jax

from gptjax import console as console_lib
from gptjax import history as history_lib
from gptjax import logs as logs_lib
from gptjax import params as params_lib
from gptjax import plot as plot_lib
from gptjax import sharding
from gptjax.workdir import Workdir


class Reporter:
    """What people see and keep of a run: console lines, metrics records, loss.png and samples.txt.

    Only process 0 writes; on other processes every method does nothing.
    """

    def __init__(self, cfg, wd: Workdir, console, log, tokens_per_step: int, enabled: bool):
        self.cfg, self.wd, self.console, self.metrics = cfg, wd, console, log
        self.tokens_per_step, self.enabled = tokens_per_step, enabled
        self._plotted = None  # (size, mtime) of metrics.jsonl at the last loss.png

    def say(self, msg: str) -> None:
        self.console.say(msg)

    def record(self, rec: dict) -> None:
        self.metrics.write(rec)

    def best(self):
        if not self.enabled or not os.path.exists(self.metrics.path):
            return None
        return history_lib.best_val(history_lib.history(logs_lib.read_metrics(self.metrics.path)))

    def describe(self, mesh, data, params) -> None:
        """The start-up block: devices, mesh, data, tokenizer, model table, plan."""
        m, t = self.cfg.model, self.cfg.train
        devices = jax.devices()
        listed = ", ".join(str(d) for d in devices[:4]) + (f", ... ({len(devices)} in all)" if len(devices) > 4 else "")
        self.say(f"devices: {sharding.describe_devices()}: {listed}")
        self.say(f"mesh: {dict(mesh.shape)}")
        self.say(f"data: {data.source}: train {len(data.train_ids):,} tokens, val {len(data.val_ids):,} tokens")
        self.say(f"tokenizer: {data.tokenizer.kind}, vocab {data.tokenizer.vocab_size:,}")
        self.say(f"model: {m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size}, "
                 f"{m.activation}, {m.dtype} compute")
        for line in console_lib.model_summary(params_lib.param_counts(params)):
            self.say(line)
        n = self.tokens_per_step
        self.say(f"train: {t.steps:,} steps x {t.batch_size} sequences x {m.block_size} tokens = {n:,} tokens/step, "
                 f"{t.steps * n:,} in all ({t.steps * n / max(len(data.train_ids), 1):.1f} epochs)")
        self.say(f"workdir: {os.path.abspath(self.wd.root)}")

    def evaluation(self, step: int, ev: dict) -> None:
        """The eval record and line, and a fresh loss.png."""
        self.record(logs_lib.eval_record(step, ev))
        best = self.best()
        mark = " (best)" if best is not None and best[0] == step else ""
        extra = f" = {ev['val_bpb']:.4f} bits/byte" if "val_bpb" in ev else ""
        self.say(f"step {step:>6} | eval: train {ev['train_loss']:.4f}, val {ev['val_loss']:.4f}{extra}{mark}")
        self.plot()

    def sample(self, step: int, text: str) -> None:
        self.say(f"step {step:>6} | sample:\n{text}")
        if self.enabled:
            with open(self.wd.samples, "a", encoding="utf-8") as f:
                f.write(f"--- step {step} ---\n{text}\n\n")

    def plot(self) -> None:
        """Redraw loss.png, unless metrics.jsonl has not changed since the last drawing."""
        if not self.enabled or not os.path.exists(self.metrics.path):
            return
        stat = os.stat(self.metrics.path)
        if (stat.st_size, stat.st_mtime_ns) != self._plotted:
            plot_lib.save_loss_png(self.wd, self.tokens_per_step)
            self._plotted = (stat.st_size, stat.st_mtime_ns)

    def finish(self, steps: int, wall: float) -> None:
        best = self.best()
        self.say(f"done: {steps} steps in {console_lib.format_duration(wall)} ({wall:.1f}s)"
                 + (f"; best val loss {best[1]:.4f} at step {best[0]}" if best else ""))
        self.say(f"  checkpoints  {shown(self.wd.checkpoints)}")
        self.say(f"  metrics      {shown(self.metrics.path)}")
        self.say(f"  loss curve   {shown(self.wd.loss_png)}")
        if self.cfg.log.tensorboard:
            self.say(f"  tensorboard  tensorboard --logdir {shown(self.wd.tensorboard)}")
        if self.cfg.train.sample_every and os.path.exists(self.wd.samples):
            self.say(f"  samples      {shown(self.wd.samples)}")

    def close(self) -> None:
        self.console.close()
        self.metrics.close()


def shown(path: str) -> str:
    """A path as the finish block prints it: relative to the current folder when inside it."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return path if rel == ".." or rel.startswith(".." + os.sep) else rel
