"""Run metrics: `metrics.jsonl` in the workdir, one JSON object per line."""

from __future__ import annotations

import json
import math
import os

METRICS_FILE = "metrics.jsonl"


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/Inf; keep the line parseable
    return v


class MetricsLog:
    def __init__(self, workdir: str, enabled: bool = True):
        self.path = os.path.join(workdir, METRICS_FILE)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({k: _clean(v) for k, v in record.items()}) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records past `step` (written after the checkpoint a resume starts from)."""
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


def read_metrics(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError:
                    pass  # a line cut short by a crash
    return records
