"""Checkpoints: orbax CheckpointManager over `WORKDIR/checkpoints`, plus the run's config guard.

Each step's checkpoint holds three items: `params`, `opt_state` (both
orbax/tensorstore arrays, restorable onto any mesh) and `meta` (JSON: step and
run facts). Sampling restores `params` alone.

Orbax writes each checkpoint into a temporary folder and renames it when
complete, so a process killed mid-write leaves the previous checkpoints valid.
What orbax leaves to us: a checkpoint that is on disk but does not restore
(a truncated file, a deleted metadata file) is reported and moved aside to
`WORKDIR/broken_checkpoints/`, never deleted, and the next older one is used.
Nothing here unpickles: arrays are tensorstore, everything else JSON.
"""

from __future__ import annotations

import gc
import math
import os
import shutil
import sys
import tempfile
import time

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from gptjax.errors import UserError

BROKEN_DIR = "broken_checkpoints"


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, permissions, ...)."""


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, create: bool = True, async_save: bool = True):
        self.workdir = os.path.abspath(workdir)
        self.directory = os.path.join(self.workdir, "checkpoints")
        if not create and not os.path.isdir(self.directory):
            raise UserError(f"{workdir} has no checkpoints/ folder; train first with --workdir {workdir}.")
        # The newest `keep` checkpoints, plus the one with the lowest validation loss.
        policy = ocp_policies.AnyPreservationPolicy([
            ocp_policies.LatestN(n=keep),
            ocp_policies.BestN(get_metric_fn=_val_loss, reverse=True, n=1, keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            create=create, enable_async_checkpointing=async_save, read_only=not create,
            best_fn=_val_loss, best_mode="min",  # makes orbax store each step's metrics
            preservation_policy=policy,
            cleanup_tmp_directories=create,  # half-written folders of a killed save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._in_flight: int | None = None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict, val_loss: float | None = None,
             force: bool = False) -> None:
        metrics = {"val_loss": float(val_loss)} if val_loss is not None and math.isfinite(val_loss) else {}
        try:
            self.manager.save(
                step,
                args=ocp.args.Composite(
                    params=ocp.args.StandardSave(params),
                    opt_state=ocp.args.StandardSave(opt_state),
                    meta=ocp.args.JsonSave(meta),
                ),
                metrics=metrics,
                force=force,
            )
        except Exception as e:  # a failed earlier async write surfaces here too
            raise self._write_error(self._in_flight or step, e) from None
        self._in_flight = step

    def wait(self) -> None:
        """Block until the async save in flight is on disk; raise CheckpointWriteError if it failed."""
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise self._write_error(self._in_flight, e) from None
        self._in_flight = None

    def _write_error(self, step, err: Exception) -> CheckpointWriteError:
        try:
            self.manager.reload()
            kept = self.latest_step()
        except Exception:
            kept = None
        if kept == step:  # the error came after the data was committed
            kept = None
        where = f"the previous checkpoint (step {kept}) is intact" if kept is not None else "no earlier checkpoint"
        return CheckpointWriteError(
            f"could not write the checkpoint at step {step} to {self.directory} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); {where}. "
            "Free disk space or fix the folder's permissions, then rerun the same command to resume."
        )

    def restore(self, step: int, abstract_params, abstract_opt_state=None):
        """(params, opt_state or None, meta); abstract trees carry the target shardings."""
        args = {
            "params": ocp.args.StandardRestore(abstract_params),
            "meta": ocp.args.JsonRestore(),
        }
        if abstract_opt_state is not None:
            args["opt_state"] = ocp.args.StandardRestore(abstract_opt_state)
        out = self.manager.restore(step, args=ocp.args.Composite(**args))
        return out["params"], out.get("opt_state") if abstract_opt_state is not None else None, out["meta"]

    def _try_restore(self, step: int, abstract_params, abstract_opt_state=None):
        """(restored or None, error or None, what orbax printed meanwhile).

        A damaged checkpoint makes orbax's reader threads print pages of
        tracebacks; they are captured here rather than shown on the console.
        """
        with _captured_stderr() as captured:
            try:
                out = self.restore(step, abstract_params, abstract_opt_state)
                meta_step = out[2].get("step", -1)
                error = None if int(meta_step) == step else f"its meta says step {meta_step}"
            except Exception as e:  # orbax/tensorstore raise many types for damaged files
                out, error = None, f"{type(e).__name__}: {_first_line(e)}"
        return (out if error is None else None), error, captured.text

    def restore_one(self, step: int, abstract_params):
        """The parameters of one given step; a UserError (not orbax's traceback) if it does not restore."""
        out, error, _ = self._try_restore(step, abstract_params)
        if error is None:
            return out[0]
        older = [s for s in self.steps() if s < step]
        hint = f"; try --step {older[-1]}" if older else ""
        raise UserError(f"the checkpoint at step {step} in {self.directory} does not restore ({error}){hint}.")

    def restore_newest(self, abstract_params, abstract_opt_state=None, log=print, move_broken: bool = True):
        """Restore the newest checkpoint that restores cleanly: (step, params, opt_state, meta) or None.

        Newer ones that fail are reported through `log` and, with
        `move_broken` (training), moved to WORKDIR/broken_checkpoints/ (kept
        for inspection; a new save at that step could not happen otherwise).
        Readers (sampling, evaluation) pass move_broken=False and leave the
        workdir as it is. If none restores, nothing is moved and a UserError
        lists why each failed.
        """
        failed = [(s, "incomplete: no orbax commit metadata", "") for s in self._uncommitted_step_dirs()]
        for step in reversed(self.steps()):
            out, error, details = self._try_restore(step, abstract_params, abstract_opt_state)
            if error is not None:
                failed.append((step, error, details))  # the details go beside the moved checkpoint
                continue
            params, opt_state, meta = out
            for bad, why, details in sorted(failed, reverse=True):
                if bad > step and move_broken:
                    moved = self._move_aside(bad, f"{why}\n\n{details}")
                    log(f"warning: the checkpoint at step {bad} does not restore ({why}); "
                        f"skipped it and moved it to {moved}")
                elif bad > step:
                    log(f"warning: the checkpoint at step {bad} does not restore ({why}); using step {step}")
            return step, params, opt_state, meta
        if not failed:
            return None
        listing = "; ".join(f"step {s}: {why}" for s, why, _ in sorted(failed, reverse=True))
        raise UserError(
            f"no checkpoint in {self.directory} restores ({listing}). Nothing was deleted. "
            "If the model config changed, use the original one; to start over, use a new --workdir."
        )

    def _uncommitted_step_dirs(self) -> list[int]:
        """Step folders orbax does not list (e.g. their commit metadata was deleted)."""
        if not os.path.isdir(self.directory):
            return []
        listed = set(self.steps())
        return sorted(int(n) for n in os.listdir(self.directory)
                      if n.isdigit() and int(n) not in listed and os.path.isdir(os.path.join(self.directory, n)))

    def _move_aside(self, step: int, report: str) -> str:
        dest_root = os.path.join(self.workdir, BROKEN_DIR)
        dest = os.path.join(dest_root, str(step))
        if os.path.exists(dest):
            dest = f"{dest}-{time.strftime('%Y%m%d-%H%M%S')}"
        if jax.process_index() == 0:
            os.makedirs(dest_root, exist_ok=True)
            shutil.move(os.path.join(self.directory, str(step)), dest)
            with open(os.path.join(dest, "RESTORE_ERROR.txt"), "w", encoding="utf-8") as f:
                f.write(report)
        if jax.process_count() > 1:  # every process sees the folder gone before it re-lists
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"gptjax_move_aside_{step}")
        self.manager.reload()
        return dest

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self.manager.close()


def _val_loss(metrics) -> float:
    return metrics.get("val_loss", math.inf) if metrics else math.inf


def _first_line(err: Exception) -> str:
    text = str(err).strip().split(" See full TensorStore details")[0]
    return (text.splitlines()[0] if text else "")[:300]


class _captured_stderr:
    """Redirect file descriptor 2 (Python and native writers alike) to a temporary file."""

    def __enter__(self):
        self.text = ""
        sys.stderr.flush()
        self._file = tempfile.TemporaryFile(mode="w+b")
        self._saved_fd = os.dup(2)
        os.dup2(self._file.fileno(), 2)
        return self

    def __exit__(self, *exc):
        gc.collect()  # abandoned reader coroutines report while being collected: inside the capture
        sys.stderr.flush()
        os.dup2(self._saved_fd, 2)
        os.close(self._saved_fd)
        self._file.seek(0)
        self.text = self._file.read().decode("utf-8", "replace")
        self._file.close()
        return False


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the given shardings: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


# ----------------------------------------------------------------------------- config guard on resume

# Keys that do not change what the run computes: free to change on resume.
FREE_KEYS = {
    "workdir", "train.steps_per_call", "train.grad_accum", "train.log_every", "train.checkpoint_every",
    "train.keep_checkpoints", "train.max_bad_steps", "train.allow_config_change",
    "model.attention", "model.remat", "model.matmul",
}
FREE_SECTIONS = ("mesh.",)  # arrays are resharded on restore
# Keys that may change with --config.train.allow_config_change=True: the rest of the
# run trains differently but the checkpoint still fits. Any other model.* or data.* key
# is the model's shape, its tokenizer or its data: never changeable.
CHANGEABLE_KEYS = {"model.dropout", "model.dtype"}
CHANGEABLE_SECTIONS = ("train.",)


def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_differences(saved: dict, new: dict) -> list[tuple[str, object, object]]:
    """(key, saved value, new value) for every key that differs, sorted by key."""
    a, b = flatten(saved), flatten(new)
    missing = object()
    diffs = []
    for key in sorted(set(a) | set(b)):
        old, cur = a.get(key, missing), b.get(key, missing)
        if key == "model.vocab_size" and cur == 0:
            continue  # 0 means "from the tokenizer", which the workdir supplies
        if old is missing or cur is missing:
            continue  # a key newer or older code added: nothing to compare
        if old != cur:
            diffs.append((key, old, cur))
    return diffs


def change_kind(key: str) -> str:
    """'free', 'changeable' (with allow_config_change) or 'fixed'."""
    if key in FREE_KEYS or key.startswith(FREE_SECTIONS):
        return "free"
    if key in CHANGEABLE_KEYS or key.startswith(CHANGEABLE_SECTIONS):
        return "changeable"
    return "fixed"


def check_resume_config(saved: dict, new: dict, allow_change: bool, workdir: str) -> list[str]:
    """Refuse a resume whose config differs from the workdir's in a way that matters.

    Returns the accepted changes as `key: old -> new` lines; raises a UserError
    listing every refused difference otherwise.
    """
    diffs = [(k, old, cur, change_kind(k)) for k, old, cur in config_differences(saved, new)]
    fixed = [d for d in diffs if d[3] == "fixed"]
    changeable = [d for d in diffs if d[3] == "changeable"]
    show = lambda ds: ", ".join(f"{k}: {old!r} -> {cur!r}" for k, old, cur, _ in ds)
    if fixed:
        raise UserError(
            f"{workdir} holds a run with a different model, tokenizer or data; refusing to resume. "
            f"Differences: {show(fixed)}. Use the run's own config (see {workdir}/config.json), "
            "or a new --workdir for a new run."
        )
    if changeable and not allow_change:
        raise UserError(
            f"the config differs from the one {workdir} was trained with: {show(changeable)}. "
            "Pass --config.train.allow_config_change=True to resume with these changes, "
            "or use the run's own values (see its config.json)."
        )
    return [f"{k}: {old!r} -> {cur!r}" for k, old, cur, kind in diffs if kind == "changeable"]


# ----------------------------------------------------------------------------- a plain params tree

def save_tree(directory: str, tree) -> None:
    """Write one pytree of arrays to a new folder (orbax StandardCheckpointer), blocking until done."""
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(os.path.abspath(directory), tree)
        ckptr.wait_until_finished()


def restore_tree(directory: str, abstract_tree):
    """A pytree written by `save_tree`, restored onto `abstract_tree`'s shapes, dtypes and shardings."""
    with ocp.StandardCheckpointer() as ckptr:
        return ckptr.restore(os.path.abspath(directory), abstract_tree)
