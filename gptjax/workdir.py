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
spelling a file name itself. Below the names: reading and writing the
config, loading a run's model for sampling and evaluation (`load_run`), and
writing a quantized copy that loads like a workdir (`save_quantized`).
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import sys

import jax
from flax import nnx

from gptjax import checkpoint as checkpoint_lib
from gptjax import config as config_lib
from gptjax import model as model_lib
from gptjax import params as params_lib
from gptjax import quantize as quantize_lib
from gptjax.errors import UserError
from gptjax import tokenizers as tok_lib
from gptjax.tokenizers import load_tokenizer

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


def _inside(*parts: str) -> property:
    """A property: the path of `parts` inside the workdir."""
    return property(lambda self: os.path.join(self.root, *parts))


@dataclasses.dataclass(frozen=True)
class Workdir:
    """Paths inside one workdir; creating one touches nothing on disk."""

    root: str

    config = _inside(CONFIG_FILE)
    tokenizer = _inside(TOKENIZER_DIR)
    data_id = _inside(TOKENIZER_DIR, DATA_ID_FILE)
    checkpoints = _inside(CHECKPOINTS_DIR)
    broken = _inside(BROKEN_DIR)
    metrics = _inside(METRICS_FILE)
    loss_png = _inside(LOSS_PNG)
    diagnostics_png = _inside(DIAGNOSTICS_PNG)
    samples = _inside(SAMPLES_FILE)
    tensorboard = _inside(TENSORBOARD_DIR)
    lock = _inside(LOCK_FILE)
    quantized_meta = _inside(QUANTIZED_META)
    quantized_params = _inside(QUANTIZED_PARAMS)

    def has_checkpoints(self) -> bool:
        """True when checkpoints/ holds at least one step folder: a run here is worth protecting."""
        d = self.checkpoints
        return os.path.isdir(d) and any(name.isdigit() for name in os.listdir(d))


# ----------------------------------------------------------------------------- the live trainer's lock

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


# ----------------------------------------------------------------------------- tokenizer and data identity

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
# ----------------------------------------------------------------------------- the config

def read_config(wd: Workdir):
    """The run config saved in the workdir, with keys newer code added filled in."""
    if not os.path.exists(wd.config):
        raise UserError(f"{wd.root} has no {CONFIG_FILE}; is it a gptjax workdir? Train with --workdir {wd.root}.")
    with open(wd.config, encoding="utf-8") as f:
        return config_lib.from_json(f.read())


def write_config(wd: Workdir, cfg) -> None:
    """Write the resolved run config as config.json (whole or not at all)."""
    os.makedirs(wd.root, exist_ok=True)
    tmp = wd.config + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(config_lib.to_json(cfg))
    os.replace(tmp, wd.config)


# ----------------------------------------------------------------------------- loading a run

@dataclasses.dataclass
class LoadedRun:
    """A restored model, its config and tokenizer: what sampling and evaluation start from."""

    workdir: str
    cfg: object
    tokenizer: object
    graphdef: object
    params: dict
    step: int
    quantized: str  # "none" | "int8"
    float_bytes: int  # parameter bytes of the float model
    param_bytes: int  # parameter bytes as loaded


def _abstract(cfg, scheme: str):
    """(graphdef, restore target on the first local device) of the model quantized by `scheme`."""
    abstract = nnx.eval_shape(lambda: quantize_lib.quantize_model(model_lib.GPT(cfg.model, rngs=nnx.Rngs(0)), scheme))
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    target = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=device),
                          nnx.to_pure_dict(nnx.state(abstract)))
    return nnx.graphdef(abstract), target


def load_run(workdir: str, step: int | None = None, quantize: str = "none") -> LoadedRun:
    """The model of a workdir (or of a folder written by --save_quantized), optionally quantized.

    Reads only: a damaged newer checkpoint is reported and the newest one that
    restores is used, nothing is moved (a live run may be writing here).
    """
    quantize_lib.check_scheme(quantize)
    wd = Workdir(workdir)
    cfg = read_config(wd)
    tokenizer = load_tokenizer(wd.tokenizer)
    per_layer = cfg.copy_and_resolve_references()
    with per_layer.unlocked():
        per_layer.model.scan_layers = False  # checkpoints (and quantized copies) hold the per-layer layout
    float_bytes = quantize_lib.tree_bytes(_abstract(per_layer, "none")[1])
    if os.path.exists(wd.quantized_meta):
        with open(wd.quantized_meta, encoding="utf-8") as f:
            meta = json.load(f)
        if step is not None and step != meta["step"]:
            raise UserError(f"{workdir} holds a quantized model of step {meta['step']} only; drop --step.")
        graphdef, target = _abstract(per_layer, meta["scheme"])
        params = checkpoint_lib.restore_tree(wd.quantized_params, target)
        return LoadedRun(workdir, cfg, tokenizer, graphdef, params, meta["step"], meta["scheme"], float_bytes,
                         quantize_lib.tree_bytes(params))

    ckpt = checkpoint_lib.Checkpointer(wd.checkpoints, create=False, async_save=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise UserError(f"{workdir} has no checkpoint yet; train first with --workdir {workdir}.")
        if step is not None and step not in steps:
            raise UserError(f"no checkpoint at step {step} in {workdir}; steps with checkpoints: {steps}.")
        graphdef, target = _abstract(per_layer, "none")
        if step is None:  # the newest that restores; a damaged newer one is reported, never moved
            step, params, _, _ = ckpt.restore_newest(
                target, log=lambda msg: print(msg, file=sys.stderr, flush=True), move_broken=False)
        else:
            params = ckpt.restore_one(step, target)
    finally:
        ckpt.close()
    if cfg.model.scan_layers and quantize == "none":
        graphdef, params = _abstract(cfg, "none")[0], params_lib.stack_layers(params)
    if quantize != "none":  # int8 swaps the per-layer model's Linear/Embed modules
        model = quantize_lib.quantize_model(nnx.merge(graphdef, params), quantize)
        graphdef, params = nnx.graphdef(model), nnx.to_pure_dict(nnx.state(model))
    return LoadedRun(workdir, cfg, tokenizer, graphdef, params, step, quantize, float_bytes,
                     quantize_lib.tree_bytes(params))


def save_quantized(run: LoadedRun, directory: str) -> None:
    """Write a quantized model as a folder that sample/eval load like a workdir."""
    if run.quantized == "none":
        raise UserError("--save_quantized needs --quantize int8.")
    if os.path.exists(directory) and os.listdir(directory):
        raise UserError(f"--save_quantized folder {directory} exists and is not empty; give a new folder.")
    wd = Workdir(directory)
    os.makedirs(directory, exist_ok=True)
    checkpoint_lib.save_tree(wd.quantized_params, run.params)
    write_config(wd, run.cfg)
    run.tokenizer.save(wd.tokenizer)
    # Written last: it marks the folder as complete.
    with open(wd.quantized_meta, "w", encoding="utf-8") as f:
        json.dump({"scheme": run.quantized, "step": run.step, "param_bytes": run.param_bytes,
                   "float_bytes": run.float_bytes}, f, indent=2)
