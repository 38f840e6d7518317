"""Checkpoints: an orbax CheckpointManager over a run's checkpoints folder, plus the run's config guard.

Each step's checkpoint holds three items: `params`, `opt_state` (both
orbax/tensorstore arrays, restorable onto any mesh) and `meta` (JSON: step and
run facts). Sampling restores `params` alone.

Orbax writes each checkpoint into a temporary folder and renames it when
complete, so a process killed mid-write leaves the previous checkpoints valid.
What orbax leaves to us: a checkpoint that is on disk but does not restore
(a truncated file, a deleted metadata file) is reported and moved aside to the
broken-checkpoints folder, never deleted, and the next older one is used; a
write that fails (a full disk) becomes one CheckpointWriteError, with the
library's own report kept in a file there rather than on the console.
Nothing here unpickles: arrays are tensorstore, everything else JSON.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocp_policies

from gptjax.errors import UserError
from gptjax.captured_output import LibraryOutput, captured_stderr


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, permissions, ...)."""


class Checkpointer:
    """Saves and restores the checkpoints in `directory`; ones that do not restore move to `broken_dir`.

    Readers (sampling, evaluation) pass create=False and no `broken_dir`: they
    never write or move anything.
    """

    def __init__(self, directory: str, keep: int = 3, create: bool = True, async_save: bool = True,
                 broken_dir: str | None = None):
        self.directory = os.path.abspath(directory)
        self.broken_dir = os.path.abspath(broken_dir) if broken_dir is not None else None
        if not create and not os.path.isdir(self.directory):
            raise UserError(f"there is no checkpoint folder {directory}; train first.")
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
        self._writer_output = LibraryOutput()  # what orbax's writer threads print while a save is in flight
        self._failure: CheckpointWriteError | None = None
        self._report_path: str | None = None

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict, val_loss: float | None = None,
             force: bool = False) -> None:
        if self._failure is not None:
            raise self._failure
        metrics = {"val_loss": float(val_loss)} if val_loss is not None and math.isfinite(val_loss) else {}
        if self._in_flight is not None and not self.manager.is_saving_in_progress():
            self.wait()  # the previous write is done: show what it printed, if anything, and start afresh
        self._writer_output.start()
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
        if self._failure is not None:
            raise self._failure
        try:
            self.manager.wait_until_finished()
            self.manager.check_for_errors()
        except Exception as e:
            raise self._write_error(self._in_flight, e) from None
        self._writer_output.stop(replay=True)
        self._in_flight = None

    def _write_error(self, step, err: Exception) -> CheckpointWriteError:
        """The one error of a failed write; the library's report goes to a file the message names."""
        try:
            self.manager.reload()
            kept = self.latest_step()
        except Exception:
            kept = None
        if kept == step:  # the error came after the data was committed
            kept = None
        where = f"the previous checkpoint (step {kept}) is intact" if kept is not None else "no earlier checkpoint"
        self._report_path = write_report(self.broken_dir, step, self._writer_output.text_so_far())
        report = f"; the checkpoint library's report is in {self._report_path}" if self._report_path else ""
        self._failure = CheckpointWriteError(
            f"could not write the checkpoint at step {step} to {self.directory} "
            f"({type(err).__name__}: {_first_line(err)}); {where}{report}. "
            "Free disk space or fix the folder's permissions, then rerun the same command to resume."
        )
        return self._failure

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
        with captured_stderr() as captured:
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
        `move_broken` (training), moved to `broken_dir` (kept
        for inspection; a new save at that step could not happen otherwise).
        Readers (sampling, evaluation) pass move_broken=False and leave the
        workdir as it is. If none restores, nothing is moved and a UserError
        lists why each failed.
        """
        failed = [(s, "incomplete: no orbax commit metadata", "")
                  for s in uncommitted_step_dirs(self.directory, self.steps())]
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

    def _move_aside(self, step: int, report: str) -> str:
        if self.broken_dir is None:
            raise ValueError("a Checkpointer without broken_dir never moves checkpoints (move_broken=False)")
        dest_root = self.broken_dir
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
        """Wait for the write in flight and close; a failed write raises CheckpointWriteError."""
        try:
            self.wait()
        finally:
            try:
                self.manager.close()
            except Exception:
                pass  # a failed write was reported by wait(); closing adds nothing to say
            if self._failure is not None:
                # The library goes on reporting after the failure, down to the interpreter's exit
                # (futures whose errors nobody read): that goes on into the report, not the console.
                self._writer_output.settle()
                if self._report_path is None or not self._writer_output.move_to(self._report_path):
                    self._writer_output.stop(replay=False)
            else:
                self._writer_output.stop(replay=True)

    def release_output(self) -> None:
        """Give file descriptor 2 and sys.stderr back (after a failed write they stay on the report)."""
        self._writer_output.stop(replay=False)


def uncommitted_step_dirs(directory: str, listed) -> list[int]:
    """Step folders in `directory` that orbax does not list (e.g. their commit metadata was deleted)."""
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and int(n) not in set(listed) and os.path.isdir(os.path.join(directory, n)))


def write_report(broken_dir: str | None, step, text: str) -> str | None:
    """Write what the library printed to the broken-checkpoints folder, else (a full disk) to the temp folder."""
    name = f"write_error_step_{step}" + (f"_process_{jax.process_index()}" if jax.process_count() > 1 else "")
    if broken_dir is not None:
        path = os.path.join(broken_dir, f"{name}.txt")
        if os.path.exists(path):
            path = os.path.join(broken_dir, f"{name}-{time.strftime('%Y%m%d-%H%M%S')}.txt")
        try:
            os.makedirs(broken_dir, exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            return path
        except OSError:
            pass
    try:
        fd, path = tempfile.mkstemp(prefix=f"gptjax-checkpoint-{name}-", suffix=".txt")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return path
    except OSError:
        return None



def _val_loss(metrics) -> float:
    return metrics.get("val_loss", math.inf) if metrics else math.inf


def _first_line(err: Exception) -> str:
    text = str(err).strip().split(" See full TensorStore details")[0]
    return (text.splitlines()[0] if text else "")[:300]


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the given shardings: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


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
