"""What the train loop does when something goes wrong: signals, preemption, non-finite steps.

- `skip_nonfinite` runs inside the jitted train step: an update whose loss or
  gradient norm is NaN/Inf is dropped (params and optimizer state unchanged).
- `NonFiniteGuard` counts skipped steps on the host, reading the flags only
  when the loop syncs anyway (logging, checkpointing), and stops the run after
  more than `train.max_bad_steps` in a row.
- `StopSignals` turns the first SIGTERM/SIGINT into a request to stop after the
  current step (with a checkpoint); a second one ends the process at once. On a multi-host
  run, cloud preemption notices come through JAX's preemption sync point, which
  every process reaches at the same step.
"""

from __future__ import annotations

import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np

# Exit statuses a job scheduler can act on.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: stopped cleanly by a signal, checkpoint saved; rerun to resume
EXIT_DIVERGED = 3  # too many non-finite steps in a row
EXIT_CHECKPOINT_WRITE = 4  # a checkpoint could not be written


class TrainingStopped(Exception):
    """The run stopped before train.steps; `code` is the process exit status."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------------- non-finite steps

def skip_nonfinite(old_state, new_state, loss, grad_norm):
    """(state, finite): `new_state` if loss and grad norm are finite, else `old_state`
    with only its step advanced (the batch is consumed either way, so batch k stays
    a function of step k). Call inside the jitted step."""
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
    kept = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state, old_state)
    if "step" in new_state:
        kept["step"] = new_state["step"]
    return kept, finite


class NonFiniteGuard:
    """Counts skipped (non-finite) steps from the per-step `finite` flags."""

    def __init__(self, max_bad_steps: int):
        self.max_bad_steps = max_bad_steps
        self.total = 0  # skipped steps in this process's run
        self.in_a_row = 0
        self.first_bad_step: int | None = None  # first step of the current bad streak
        self._flags: list = []  # (step, device bool) not yet read

    def record(self, step: int, finite) -> None:
        self._flags.append((step, finite))

    def check(self) -> int:
        """Read the pending flags; return how many of them were skipped steps.

        Raises TrainingStopped when more than max_bad_steps in a row were skipped.
        """
        if not self._flags:
            return 0
        steps, flags = zip(*self._flags)
        self._flags = []
        skipped = 0
        for step, ok in zip(steps, jax.device_get(list(flags))):
            if bool(np.all(ok)):
                self.in_a_row, self.first_bad_step = 0, None
                continue
            skipped += 1
            self.total += 1
            self.in_a_row += 1
            if self.first_bad_step is None:
                self.first_bad_step = step
            if self.in_a_row > self.max_bad_steps:
                raise TrainingStopped(self.diverged_message(step), EXIT_DIVERGED)
        return skipped

    def diverged_message(self, step: int) -> str:
        return (
            f"training diverged: the loss or gradient norm was NaN/Inf at {self.in_a_row} steps in a row "
            f"(steps {self.first_bad_step + 1}..{step + 1}), more than train.max_bad_steps="
            f"{self.max_bad_steps}; those updates were skipped and the run stopped. Usual fixes: lower "
            "--config.train.lr, turn on or lower --config.train.grad_clip, use a longer warm-up "
            "(train.warmup_steps), or compute in float32 (--config.model.dtype=float32) instead of bfloat16."
        )


# ----------------------------------------------------------------------------- signals and preemption

class StopSignals:
    """Context manager: SIGTERM/SIGINT request a clean stop; a second one exits at once."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous = {}
        self._multihost = jax.process_count() > 1

    def __enter__(self):
        if not _is_main_thread():
            return self  # signal handlers can only be installed from the main thread
        for sig in self.SIGNALS:
            if sig == signal.SIGTERM and self._multihost and _has_preemption_service():
                continue  # JAX's preemption notifier owns SIGTERM and syncs all hosts on it
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}
        return False

    def _handle(self, signum, frame):
        self.received = signum
        # The default action for the next one: the OS ends the process at once, even while
        # the main thread waits inside XLA or a checkpoint write (a Python handler would
        # only run after that returns). Complete checkpoints on disk stay valid.
        for sig in self._previous:
            signal.signal(sig, signal.SIG_DFL)
        print(f"{signal.Signals(signum).name} received: stopping after this step and saving a checkpoint "
              "(send it again to exit at once without saving).", file=sys.stderr, flush=True)

    def should_stop(self, step: int, sync_every: int) -> str | None:
        """The reason to stop after `step`, or None. Every process gets the same answer."""
        if _reached_preemption_sync_point(step):
            return "a preemption notice"
        if not self._multihost:
            return signal.Signals(self.received).name if self.received is not None else None
        if step % sync_every:  # a signal reaches hosts at different moments: agree at fixed steps
            return None
        from jax.experimental import multihost_utils

        got = multihost_utils.process_allgather(np.int32(self.received or 0))
        sig = int(np.max(got))
        return signal.Signals(sig).name if sig else None


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _has_preemption_service() -> bool:
    try:
        from jax._src import distributed

        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


def _reached_preemption_sync_point(step: int) -> bool:
    if not _has_preemption_service():
        return False
    from jax.experimental import multihost_utils

    return bool(multihost_utils.reached_preemption_sync_point(step))
