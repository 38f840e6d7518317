"""`python -m gptjax.train --config configs/tiny.py [--config.KEY=VALUE ...] [--workdir DIR]`

Builds the run (`trainer.build`: checks, data, tokenizer, train state, resume
from the newest checkpoint in the workdir) and trains it (`Trainer.train`).
"""

from __future__ import annotations

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from gptjax import config as config_lib
from gptjax import faults
from gptjax import runtime
from gptjax import sharding
from gptjax.errors import UserError, exit_with

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Run config file (optionally FILE:SIZE).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder; default: the config's workdir.")
# Multi-process runs (see README "Scaling out"): all three, or none on a TPU pod / under SLURM.
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "HOST:PORT of process 0, for jax.distributed.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes in the run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes-1.")
_DISTRIBUTED = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                                 "Start jax.distributed: auto = with the flags above or under a multi-process "
                                 "SLURM / MPI / TPU-pod launch; on = always (JAX detects the cluster).")
_QUIET = flags.DEFINE_bool("quiet", False, "Print nothing but errors.")


def resolve_workdir(cfg, flag_value: str | None) -> str:
    workdir = flag_value or cfg.workdir
    with cfg.unlocked():
        cfg.workdir = workdir
    return workdir


def main(argv):
    from gptjax import trainer as trainer_lib

    if len(argv) > 1:
        exit_with(UserError(f"unexpected arguments {argv[1:]}; config keys go as --config.SECTION.KEY=VALUE."))
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    cfg = _CONFIG.value
    runtime.configure(compilation_cache=bool(cfg.train.get("compilation_cache", True)))
    try:
        sharding.initialize_distributed(_DISTRIBUTED.value, _COORDINATOR.value, _NUM_PROCESSES.value,
                                        _PROCESS_ID.value)
        trainer_lib.build(cfg, resolve_workdir(cfg, _WORKDIR.value), quiet=_QUIET.value).train()
    except UserError as e:
        exit_with(e)
    except faults.TrainingStopped as e:
        print(e if e.code == faults.EXIT_PREEMPTED else f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.code)


def run_main():
    config_lib.find_config_files(sys.argv)
    app.run(main, flags_parser=lambda argv: config_lib.parse_flags_or_exit(argv, flags.FLAGS))


if __name__ == "__main__":
    run_main()
