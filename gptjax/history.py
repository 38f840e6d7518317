"""A run's history, read from its metrics records: what kind each record is, the attempt that counts.

Pure functions on lists of records (dicts with `step`); `gptjax.logs` reads
and writes them. Imports neither JAX nor matplotlib.
"""

from __future__ import annotations

import math


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def record_kind(r: dict) -> str:
    """'eval', 'diag', 'train', or (any other record) its sorted keys joined by commas."""
    if "val_loss" in r:
        return "eval"
    if any(k.startswith("diag/") for k in r):
        return "diag"
    if "train_loss" in r:
        return "train"
    return ",".join(sorted(r))


def history(records: list[dict]) -> list[dict]:
    """The records of the run as it finally went, in step order.

    A run that restarted from an earlier point (after a crash, from its last
    checkpoint or from scratch) writes steps it had written before. When a
    train, eval or diagnostics record does not move past the last step of its
    kind (any other record: when it goes back), everything from that step on
    is from an abandoned attempt and is dropped.
    """
    kept: list[dict] = []
    last: dict[str, int] = {}
    for r in records:
        if "step" not in r:
            continue
        kind, step = record_kind(r), r["step"]
        if kind in last and (step < last[kind] or (step == last[kind] and kind in ("train", "eval", "diag"))):
            kept = [k for k in kept if k["step"] < step]
            last = {record_kind(k): k["step"] for k in kept}
        kept.append(r)
        last[kind] = step
    return sorted(kept, key=lambda r: r["step"])


def series(records: list[dict], key: str, kind: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key` in the records of one kind, skipping non-numbers (NaN written as text)."""
    pts = [(r["step"], r[key]) for r in records if record_kind(r) == kind and is_number(r.get(key))]
    return [p[0] for p in pts], [float(p[1]) for p in pts]


def best_val(records: list[dict]) -> tuple[int, float] | None:
    """(step, val_loss) of the lowest finite validation loss, or None."""
    steps, vals = series(records, "val_loss", "eval")
    pts = [(v, s) for s, v in zip(steps, vals) if math.isfinite(v)]
    if not pts:
        return None
    v, s = min(pts)
    return s, v
