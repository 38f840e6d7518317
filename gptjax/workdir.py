"""The one module that knows a workdir's layout.

    WORKDIR/
      config.json          the resolved run config
      tokenizer/           the run's tokenizer (and data.json: what it was built from)
      checkpoints/         orbax checkpoints, one folder per step
      broken_checkpoints/  checkpoints that failed to restore, moved aside
      metrics.jsonl        one JSON record per line (README "Metrics")
      loss.png, diagnostics.png, samples.txt, tensorboard/
      quantization.json + quantized/   only in a folder written by `gptjax.sample --save_quantized`

Every other module gets the paths it needs from a `Workdir`, never by
spelling a file name itself.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os

from gptjax import tokenizers as tok_lib
from gptjax.errors import UserError

CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"
DATA_ID_FILE = "data.json"  # inside tokenizer/
CHECKPOINTS_DIR = "checkpoints"
BROKEN_DIR = "broken_checkpoints"
METRICS_FILE = "metrics.jsonl"
LOSS_PNG = "loss.png"
DIAGNOSTICS_PNG = "diagnostics.png"
SAMPLES_FILE = "samples.txt"
TENSORBOARD_DIR = "tensorboard"
QUANTIZED_META = "quantization.json"
QUANTIZED_PARAMS = "quantized"
LOCK_FILE = "train.lock"  # held by the live trainer


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Paths inside one workdir; creating one touches nothing on disk."""

    root: str

    def _join(self, name: str) -> str:
        return os.path.join(self.root, name)

    @property
    def config(self) -> str:
        return self._join(CONFIG_FILE)

    @property
    def tokenizer(self) -> str:
        return self._join(TOKENIZER_DIR)

    @property
    def data_id(self) -> str:
        return os.path.join(self.tokenizer, DATA_ID_FILE)

    @property
    def checkpoints(self) -> str:
        return self._join(CHECKPOINTS_DIR)

    @property
    def broken(self) -> str:
        return self._join(BROKEN_DIR)

    @property
    def metrics(self) -> str:
        return self._join(METRICS_FILE)

    @property
    def loss_png(self) -> str:
        return self._join(LOSS_PNG)

    @property
    def diagnostics_png(self) -> str:
        return self._join(DIAGNOSTICS_PNG)

    @property
    def samples(self) -> str:
        return self._join(SAMPLES_FILE)

    @property
    def tensorboard(self) -> str:
        return self._join(TENSORBOARD_DIR)

    @property
    def lock(self) -> str:
        return self._join(LOCK_FILE)

    @property
    def quantized_meta(self) -> str:
        return self._join(QUANTIZED_META)

    @property
    def quantized_params(self) -> str:
        return self._join(QUANTIZED_PARAMS)

    def has_checkpoints(self) -> bool:
        """True when checkpoints/ holds at least one step folder: a run here is worth protecting."""
        d = self.checkpoints
        return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


# ---- the live trainer's lock

class TrainLock:
    """An exclusive lock on a workdir, held by the one trainer writing it.

    `flock` on WORKDIR/train.lock: the kernel releases it when the process
    ends in any way (a crash or `kill -9` included), so a stale lock file
    never blocks a restart. Readers (sampling, eval, plots) never take it.
    """

    def __init__(self, wd: Workdir):
        self.wd = wd
        self.fd: int | None = None

    def acquire(self) -> "TrainLock":
        os.makedirs(self.wd.root, exist_ok=True)
        fd = os.open(self.wd.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise UserError(f"{self.wd.root} is being trained by a live process (pid {holder}); "
                            "wait for it to finish, stop it, or give this run another --workdir.") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the lock
            self.fd = None

    def __del__(self):
        self.release()


# ---- tokenizer and data identity

def kept_tokenizer(wd: Workdir) -> tuple[str | None, dict | None]:
    """(tokenizer folder, data identity) that a run here must keep, or (None, None).

    A run with checkpoints keeps the tokenizer it saved (resume, sampling, eval);
    a workdir without one holds no run to protect, and its tokenizer is rebuilt.
    The data identity is None for runs saved before it was recorded.
    """
    if not (wd.has_checkpoints() and tok_lib.is_saved(wd.tokenizer)):
        return None, None
    if not os.path.exists(wd.data_id):
        return wd.tokenizer, None
    with open(wd.data_id, encoding="utf-8") as f:
        return wd.tokenizer, json.load(f)


def save_tokenizer(wd: Workdir, tokenizer: tok_lib.Tokenizer, data_id: dict) -> None:
    """Save the run's tokenizer and what it was built for; a kept tokenizer is left as it is."""
    if kept_tokenizer(wd)[0]:
        return
    os.makedirs(wd.tokenizer, exist_ok=True)
    tmp = wd.data_id + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(data_id, f, ensure_ascii=False)
    os.replace(tmp, wd.data_id)
    tokenizer.save(wd.tokenizer)  # its tokenizer.json, written last, marks the folder complete
# ---- import/export

def write_config(wd: Workdir, cfg) -> None:
    """Write the resolved run config as config.json (whole or not at all)."""
    from gptjax import config as config_lib

    os.makedirs(wd.root, exist_ok=True)
    tmp = wd.config + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config_lib.to_json(cfg))
    os.replace(tmp, wd.config)
