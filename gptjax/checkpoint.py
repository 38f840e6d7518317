"""Checkpoints: orbax CheckpointManager over `WORKDIR/checkpoints`.

Each step's checkpoint holds three items: `params`, `opt_state` (both
orbax/tensorstore arrays, restorable onto any mesh) and `meta` (JSON: step and
run facts). Sampling restores `params` alone.
"""

from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp

from gptjax.errors import UserError


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, create: bool = True, async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        if not create and not os.path.isdir(self.directory):
            raise UserError(f"{workdir} has no checkpoints/ folder; train first with --workdir {workdir}.")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=create, enable_async_checkpointing=async_save
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, params, opt_state, meta: dict, force: bool = False) -> None:
        self.manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(params),
                opt_state=ocp.args.StandardSave(opt_state),
                meta=ocp.args.JsonSave(meta),
            ),
            force=force,
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

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree, shardings):
    """ShapeDtypeStructs with the given shardings: the restore target."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
