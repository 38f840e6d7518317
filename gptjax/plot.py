"""`python -m gptjax.plot WORKDIR [WORKDIR ...] [--out FILE] [--x tokens|steps] [--diagnostics]`

Draws runs from their `metrics.jsonl`:
  - one or more workdirs: their loss curves overlaid in one PNG (validation
    loss with the best point starred, train loss faint). When the runs use
    different tokenizers, losses per token do not compare, so the curves are
    drawn in bits per byte if every run has them (`val_bpb`).
  - `--diagnostics`: a panel per quantity of `train.diagnostics_every`
    (gradient norms, update/weight ratios, activation mean/std, attention
    entropy, dead ReLU units), one line per layer.
Needs only matplotlib: no JAX, so it runs anywhere the workdir can be read.
The trainer redraws WORKDIR/loss.png with `save_loss_png`.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys

from gptjax.errors import UserError, exit_with
from gptjax.history import history, is_number, record_kind, series
from gptjax.logs import EVAL_TRAIN_PREFIX, read_metrics
from gptjax.workdir import Workdir

DIAGNOSTICS = (  # (key, title, log scale)
    ("grad_norm", "gradient norm", True),
    ("update_ratio", "|update| / |weights|", True),
    ("act_mean", "block output mean", False),
    ("act_std", "block output std", False),
    ("attn_entropy", "attention entropy (nats)", False),
    ("dead_frac", "dead ReLU units (fraction)", False),
)

OTHER_MODULES = {"wte": ("0.15", "--"), "wpe": ("0.45", ":"), "ln_f": ("0.6", "-."), "lm_head": ("0.3", "-.")}


# ----------------------------------------------------------------------------- loss curves

def new_figure(width: float = 7.5, height: float = 4.5):
    """A matplotlib Figure on the Agg canvas: no pyplot, no display, no global state."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def draw_loss(ax, records: list[dict], tokens_per_step: int | None = None, label: str = "", color=None,
              key: str = "loss", x_scale: float = 1.0, eval_train: bool = True) -> None:
    """Train loss (every log) as a thin line, eval losses as points; the best val point starred.

    `key` is "loss" (nats per token) or "bpb" (bits per byte): the train log's
    `train_<key>`, the evaluation's `eval_train_<key>` and `val_<key>`. The x
    axis is the step times `x_scale` (1: steps; tokens per step: tokens); with
    `tokens_per_step`, a second axis on top reads in tokens.
    """
    from matplotlib.ticker import EngFormatter

    prefix = f"{label}: " if label else ""
    s, v = series(records, f"train_{key}", "train")
    if s:
        line, = ax.plot([x * x_scale for x in s], v, lw=0.8, alpha=0.45, color=color, label=f"{prefix}train (batches)")
        color = color or line.get_color()
    s, v = series(records, f"{EVAL_TRAIN_PREFIX}{key}", "eval")
    if s and eval_train:
        ax.plot([x * x_scale for x in s], v, "o--", ms=3, lw=1, color=color, alpha=0.8, label=f"{prefix}train (eval)")
    s, v = series(records, f"val_{key}", "eval")
    if s:
        line, = ax.plot([x * x_scale for x in s], v, "o-", ms=3, lw=1.6, color=color, label=f"{prefix}val")
        color = line.get_color()
        i = min(range(len(v)), key=lambda j: v[j] if math.isfinite(v[j]) else math.inf)
        ax.plot([s[i] * x_scale], [v[i]], "*", ms=14, color=color, markeredgecolor="black", linestyle="none",
                label=f"{prefix}best val {v[i]:.4f} @ step {s[i]:,}")
    ax.set_xlabel("step" if x_scale == 1 else "tokens")
    ax.set_ylabel("loss (nats/token)" if key == "loss" else "bits per byte")
    ax.grid(alpha=0.3)
    if x_scale != 1:
        ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 1.5k, 2M
    if tokens_per_step and x_scale == 1:
        top = ax.secondary_xaxis("top", functions=(lambda x: x * tokens_per_step, lambda t: t / tokens_per_step))
        top.set_xlabel("tokens")
        top.xaxis.set_major_formatter(EngFormatter(sep=""))


def save_loss_png(workdir: Workdir, tokens_per_step: int | None = None, title: str | None = None) -> str | None:
    """Redraw the workdir's loss.png from its metrics; returns its path (None when there is nothing to draw)."""
    if not os.path.exists(workdir.metrics):
        return None
    records = history(read_metrics(workdir.metrics))
    if not records:
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    draw_loss(ax, records, tokens_per_step)
    ax.set_title(title or os.path.basename(os.path.abspath(workdir.root)))
    ax.legend(fontsize=8)
    out = workdir.loss_png
    tmp = out + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, out)  # a viewer never sees half a file
    return out


@dataclasses.dataclass
class RunData:
    workdir: str
    name: str
    config: dict
    records: list

    @property
    def tokens_per_step(self) -> int | None:
        try:
            return int(self.config["train"]["batch_size"]) * int(self.config["model"]["block_size"])
        except (KeyError, TypeError, ValueError):
            return None

    @property
    def tokenizer(self):
        """What identifies the tokenizer: the files the run saved, else its kind and vocabulary size."""
        folder = Workdir(self.workdir).tokenizer
        if os.path.isdir(folder):
            h = hashlib.sha256()
            for name in sorted(os.listdir(folder)):
                if os.path.isfile(os.path.join(folder, name)):
                    with open(os.path.join(folder, name), "rb") as f:
                        h.update(name.encode() + b"\0" + f.read())
            return h.hexdigest()
        return self.config.get("data", {}).get("tokenizer"), self.config.get("model", {}).get("vocab_size")

    def has(self, key: str) -> bool:
        return any(is_number(r.get(key)) for r in self.records)


def load_run(workdir: str) -> RunData:
    """A workdir's config and metrics history, or a UserError that says what is missing."""
    if not os.path.isdir(workdir):
        raise UserError(f"{workdir} is not a folder; give the workdir of a training run (e.g. runs/tiny).")
    wd = Workdir(workdir)
    config_path, metrics_path = wd.config, wd.metrics
    metrics_name = os.path.basename(metrics_path)
    if not os.path.exists(config_path) and not os.path.exists(metrics_path):
        raise UserError(f"{workdir} is not a gptjax workdir (it has no {os.path.basename(config_path)} or {metrics_name}); "
                        "give the folder a training run writes to, e.g. runs/tiny.")
    config = {}
    if os.path.exists(config_path):
        try:
            with open(config_path, encoding="utf-8") as f:
                config = json.load(f)
        except (OSError, json.JSONDecodeError) as e:
            raise UserError(f"{config_path} is not readable JSON ({e}).") from None
    records = history(read_metrics(metrics_path)) if os.path.exists(metrics_path) else []
    if not records:
        raise UserError(f"{workdir} has no metrics yet ({metrics_name} is missing or empty); "
                        "a run writes them from its first eval on; plot again once it has.")
    name = os.path.basename(os.path.normpath(os.path.abspath(workdir)))
    return RunData(workdir, name, config, records)


def loss_key(runs: list[RunData]) -> tuple[str, str | None]:
    """("loss" or "bpb", a note to print when the comparison is weaker than it looks)."""
    if len({r.tokenizer for r in runs}) <= 1:
        return "loss", None
    if all(r.has("val_bpb") for r in runs):
        return "bpb", None
    missing = ", ".join(r.name for r in runs if not r.has("val_bpb"))
    return "loss", (f"the runs use different tokenizers but {missing} has no bits-per-byte metrics (val_bpb); "
                    "drawing losses per token, which do not compare across tokenizers")


def compare_figure(runs: list[RunData], x: str = "tokens"):
    """One axes, every run's loss curves; returns (figure, note or None)."""
    key, note = loss_key(runs)
    by_tokens = x == "tokens" and all(r.tokens_per_step for r in runs)
    fig = new_figure(8, 5)
    ax = fig.add_subplot()
    single = len(runs) == 1
    for i, run in enumerate(runs):
        draw_loss(ax, run.records, tokens_per_step=run.tokens_per_step if not by_tokens else None,
                  label="" if single else run.name, color=None if single else f"C{i}", key=key,
                  x_scale=run.tokens_per_step if by_tokens else 1, eval_train=single)
    ax.set_title(runs[0].name if single else " vs ".join(r.name for r in runs)
                 + (" (bits per byte: tokenizers differ)" if key == "bpb" else ""))
    if note:
        ax.text(0.01, 0.01, "note: " + note, transform=ax.transAxes, fontsize=7, va="bottom", wrap=True)
    ax.legend(fontsize=7)
    return fig, note


def _layer_order(name: str):
    if name.startswith("blocks."):
        return (1, int(name.split(".")[1]))
    return (0 if name in ("wte", "wpe") else 2, name)


def diagnostics_figure(run: RunData):
    """A panel per diagnostic quantity, one line per layer (blocks shaded by depth, other modules dashed)."""
    records = [r for r in run.records if record_kind(r) == "diag"]
    if not records:
        raise UserError(f"{run.workdir} has no diagnostics in {os.path.basename(Workdir(run.workdir).metrics)}; train with "
                        "--config.train.diagnostics_every=N (e.g. 100) to record them.")
    keys = {k for r in records for k in r if k.startswith("diag/")}
    panels = [(q, title, log) for q, title, log in DIAGNOSTICS if any(k.startswith(f"diag/{q}/") for k in keys)]
    cols = 3 if len(panels) > 4 else 2
    rows = math.ceil(len(panels) / cols)
    fig = new_figure(4.2 * cols, 3.0 * rows + 0.4)
    from matplotlib import colormaps

    cmap = colormaps["viridis"]
    n_blocks = 1 + max([_layer_order(k.split("/", 2)[2])[1] for k in keys if "/blocks." in k] or [0])
    for i, (q, title, log) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        names = sorted({k.split("/", 2)[2] for k in keys if k.startswith(f"diag/{q}/")}, key=_layer_order)
        for name in names:
            steps, values = series(records, f"diag/{q}/{name}", "diag")
            if name.startswith("blocks."):
                layer = int(name.split(".")[1])
                ax.plot(steps, values, lw=1.3, color=cmap(layer / max(n_blocks - 1, 1) * 0.9),
                        label=f"layer {layer}")
            else:
                color, ls = OTHER_MODULES.get(name, ("0.5", "--"))
                ax.plot(steps, values, lw=1, ls=ls, color=color, label=name)
        if log and all(v > 0 for name in names for v in series(records, f"diag/{q}/{name}", "diag")[1]):
            ax.set_yscale("log")
        else:
            ax.ticklabel_format(axis="y", useOffset=False)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if i == 0 or (q == "grad_norm"):
            ax.legend(fontsize=6, ncol=2)
    fig.suptitle(f"{run.name}: per-layer diagnostics", fontsize=11)
    return fig


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m gptjax.plot", description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workdirs", nargs="+", metavar="WORKDIR", help="workdirs of training runs")
    p.add_argument("--out", help="PNG to write (default: WORKDIR/loss.png for one run, compare.png for several, "
                                 "WORKDIR/diagnostics.png with --diagnostics)")
    p.add_argument("--x", choices=("tokens", "steps"), default="tokens",
                   help="x axis when comparing runs (default: tokens, so runs with different batches line up)")
    p.add_argument("--diagnostics", action="store_true", help="draw the per-layer diagnostics instead")
    return p.parse_args(argv)


def _save(fig, out: str) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out)
    return out


def plot(argv) -> list[str]:
    """Run the command; returns the files written."""
    args = parse_args(argv)
    runs = [load_run(w) for w in args.workdirs]
    if args.out and not args.out.lower().endswith(".png"):
        raise UserError(f"--out {args.out} must name a .png file.")
    if args.diagnostics:
        if args.out and len(runs) > 1:
            raise UserError("--out with --diagnostics takes one WORKDIR; leave --out away to write "
                            "WORKDIR/diagnostics.png in each.")
        return [_save(diagnostics_figure(r), args.out or Workdir(r.workdir).diagnostics_png) for r in runs]
    fig, note = compare_figure(runs, x=args.x if len(runs) > 1 else "steps")
    if note:
        print(f"note: {note}", file=sys.stderr)
    out = args.out or (Workdir(runs[0].workdir).loss_png if len(runs) == 1 else "compare.png")
    return [_save(fig, out)]


def main(argv=None) -> None:
    try:
        for path in plot(sys.argv[1:] if argv is None else argv):
            print(f"wrote {path}")
    except UserError as e:
        exit_with(e)


if __name__ == "__main__":
    main()
