"""metrics.jsonl, the record of a run, and the sinks that get every record too.

One JSON object per line, each with `step`. The record types (README
"Metrics"): a train log (`train_loss`, `lr`, `grad_norm`, `tokens_per_s`, ...),
an evaluation (`val_*` and `eval_train_*`, built by `eval_record`), and
diagnostics (`diag/...`). Every record also goes to the sinks (TensorBoard
event files, and Weights & Biases when asked for), with its keys as tags.
This module imports neither JAX nor TensorFlow, so reading a run stays light.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from gptjax.history import is_number, record_kind

# An evaluation scores fixed batches of the training split too; in the file those
# figures are `eval_train_*`, so that `train_loss` always means the train log's
# mean loss of the steps since the previous log.
EVAL_TRAIN_PREFIX = "eval_train_"


def eval_record(step: int, result: dict) -> dict:
    """The metrics.jsonl record of an evaluation result ({"train_loss", "val_loss", "val_bpb", ...})."""
    rec = {"step": step}
    for key, value in result.items():
        rec[EVAL_TRAIN_PREFIX + key[len("train_"):] if key.startswith("train_") else key] = value
    return rec


def _upgraded(r: dict) -> dict:
    """An evaluation record as older versions wrote it (`train_loss` next to `val_loss`), renamed."""
    if "val_loss" in r and "train_loss" in r:
        return {(EVAL_TRAIN_PREFIX + k[len("train_"):] if k.startswith("train_") else k): v for k, v in r.items()}
    return r


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl file, in file order; old evaluation records get today's names."""
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(_upgraded(json.loads(line)))
                except json.JSONDecodeError:
                    pass  # a line cut short by a crash
    return records


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep the line parseable
    return v


class MetricsLog:
    """Appends records to the metrics file at `path`, and hands each to the sinks."""

    def __init__(self, path: str, enabled: bool = True, sinks=()):
        self.path = path
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


def scalar_tags(record: dict) -> dict:
    """{tag: value} of a record's numbers. An evaluation's are under `eval/`: `eval/val_loss`,
    `eval/train_loss` (its `eval_train_loss`: held-out batches of the training split)."""
    if record_kind(record) != "eval":
        return {k: float(v) for k, v in record.items() if k != "step" and is_number(v)}
    return {"eval/" + (k[len("eval_"):] if k.startswith(EVAL_TRAIN_PREFIX) else k): float(v)
            for k, v in _upgraded(record).items() if k != "step" and is_number(v)}


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


class TensorBoardLog:
    """Scalar event files in the folder `logdir` via tensorboardX (no TensorFlow needed)."""

    def __init__(self, logdir: str):
        self.logdir = logdir
        self.purge_step: int | None = None
        self.writer = None
        self.closed = False

    def resume_at(self, step: int) -> None:
        # TensorBoard hides events an earlier attempt wrote past the step a run starts from
        # (-1: a fresh start, after an attempt that died before its first checkpoint).
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
    """Weights & Biases, only when log.wandb=True and the package is installed; `run` is wandb.init's."""

    def __init__(self, run):
        self.run = run

    def resume_at(self, step: int) -> None:
        pass

    def write(self, record: dict) -> None:
        self.run.log(scalar_tags(record), step=int(record["step"]))

    def close(self) -> None:
        self.run.finish()


def make_sinks(log_cfg, config: dict, tensorboard_dir: str, run_dir: str, say=print) -> list:
    """The sinks `log_cfg` asks for: event files in `tensorboard_dir`, a wandb run named after `run_dir`."""
    sinks = []
    if log_cfg.tensorboard:
        sinks.append(TensorBoardLog(tensorboard_dir))
    if log_cfg.wandb:
        try:
            import wandb
        except ImportError:
            say("log.wandb=True but the wandb package is not installed (pip install wandb); "
                "logging to metrics.jsonl and TensorBoard only.")
        else:
            sinks.append(WandbLog(wandb.init(project=log_cfg.wandb_project, dir=run_dir, config=config,
                                             name=os.path.basename(os.path.abspath(run_dir)), resume="allow")))
    return sinks
