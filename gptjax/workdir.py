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
import os

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
    def quantized_meta(self) -> str:
        return self._join(QUANTIZED_META)

    @property
    def quantized_params(self) -> str:
        return self._join(QUANTIZED_PARAMS)

    def has_checkpoints(self) -> bool:
        """True when checkpoints/ holds at least one step folder: a run here is worth protecting."""
        d = self.checkpoints
        return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


# ---- import/export

def write_config(wd: Workdir, cfg) -> None:
    """Write the resolved run config as config.json (whole or not at all)."""
    from gptjax import config as config_lib

    os.makedirs(wd.root, exist_ok=True)
    tmp = wd.config + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config_lib.to_json(cfg))
    os.replace(tmp, wd.config)
