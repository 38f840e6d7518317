"""`python -m gptjax.plot`: overlays, resumed runs, diagnostics panels, clear errors."""

import json
import shutil

import numpy as np
import pytest

from conftest import run_cli, small_config
from gptjax import plot
from gptjax.errors import UserError
from gptjax.logs import read_metrics


@pytest.fixture(scope="module")
def resumed_workdir(tmp_path_factory):
    """A run stopped at step 10, that also left records past its checkpoint (a crash), then resumed to 20."""
    from conftest import SAMPLE_TEXT
    from gptjax.trainer import build as Run

    root = tmp_path_factory.mktemp("plot")
    text = root / "corpus.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    workdir = root / "resumed"
    run = Run(small_config(str(text), workdir), str(workdir), quiet=True)
    run.train(stop_at=10)
    crashed = [{"step": 15, "train_loss": 9.0, "lr": 0.1}, {"step": 15, "eval_train_loss": 9.0, "val_loss": 9.5}]
    with open(workdir / "metrics.jsonl", "a") as f:  # as if it died after step 15, before saving it
        f.writelines(json.dumps(r) + "\n" for r in crashed)
    Run(small_config(str(text), workdir), str(workdir), quiet=True).train()
    return workdir


def fake_workdir(path, tokenizer, vocab, val_losses, bpb=None, batch=4, tokenizer_from=None):
    """A workdir as the previous version's training left it, written by hand: config.json and metrics.jsonl
    (its evaluation records name their training-split figures train_*)."""
    path.mkdir()
    if tokenizer_from is not None:
        shutil.copytree(tokenizer_from / "tokenizer", path / "tokenizer")
    cfg = {"data": {"tokenizer": tokenizer, "dataset": "tinyshakespeare", "path": ""},
           "model": {"vocab_size": vocab, "block_size": 16}, "train": {"batch_size": batch}}
    (path / "config.json").write_text(json.dumps(cfg))
    with open(path / "metrics.jsonl", "w") as f:
        for i, v in enumerate(val_losses):
            step = 10 * i
            f.write(json.dumps({"step": step, "train_loss": v + 0.1, "lr": 1e-3}) + "\n")
            ev = {"step": step, "train_loss": v - 0.05, "val_loss": v}
            if bpb is not None:
                ev.update(val_bpb=v * bpb, train_bpb=(v - 0.05) * bpb)
            f.write(json.dumps(ev) + "\n")
    return path


def line(fig, label):
    matches = [l for l in fig.axes[0].lines if l.get_label() == label]
    assert len(matches) == 1, [l.get_label() for l in fig.axes[0].lines]
    return np.asarray(matches[0].get_xdata()), np.asarray(matches[0].get_ydata())


@pytest.mark.slow
def test_resumed_run_plots_one_continuous_curve(resumed_workdir, capsys):
    assert capsys.readouterr().out == ""  # quiet runs print nothing
    fig, note = plot.compare_figure([plot.load_run(str(resumed_workdir))], x="steps")
    assert note is None
    x, y = line(fig, "train (batches)")
    assert list(x) == [5, 10, 15, 20]  # continues past the resume point, once per step
    assert 9.0 not in y  # the crashed attempt's step 15 is gone
    x, _ = line(fig, "val")
    assert list(x) == [0, 10, 20]

    # TensorBoard's reader hides what the crashed attempt wrote past the checkpoint, too.
    from tensorboard.backend.event_processing import event_accumulator

    acc = event_accumulator.EventAccumulator(str(resumed_workdir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train_loss")]
    assert steps == [5, 10, 15, 20]
    jsonl = {r["step"]: r["train_loss"] for r in read_metrics(str(resumed_workdir / "metrics.jsonl")) if "lr" in r}
    np.testing.assert_allclose([e.value for e in acc.Scalars("train_loss")], [jsonl[s] for s in steps], rtol=1e-6)
    assert not any(k.startswith("diag/") for r in read_metrics(str(resumed_workdir / "metrics.jsonl")) for k in r)


@pytest.mark.slow
def test_plot_command_overlays_two_workdirs(resumed_workdir, tmp_path):
    other = fake_workdir(tmp_path / "wide", "char", 34, [3.6, 3.0, 2.5], batch=8, tokenizer_from=resumed_workdir)
    out = tmp_path / "both.png"
    proc = run_cli("gptjax.plot", str(resumed_workdir), str(other), f"--out={out}")
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"wrote {out}" in proc.stdout

    runs = [plot.load_run(str(resumed_workdir)), plot.load_run(str(other))]
    fig, note = plot.compare_figure(runs, x="tokens")
    x, _ = line(fig, "wide: val")
    assert list(x) == [0, 10 * 8 * 16, 20 * 8 * 16]  # steps x tokens per step of that run
    x, _ = line(fig, "resumed: val")
    assert list(x) == [0, 10 * 4 * 16, 20 * 4 * 16]
    assert note is None and fig.axes[0].get_ylabel() == "loss (nats/token)"  # one tokenizer: losses compare


def test_different_tokenizers_compare_in_bits_per_byte(tmp_path, capsys):
    a = fake_workdir(tmp_path / "char", "char", 65, [4.0, 2.0], bpb=2.0)
    b = fake_workdir(tmp_path / "bpe", "gpt2", 50257, [10.0, 5.0], bpb=0.5)
    fig, note = plot.compare_figure([plot.load_run(str(a)), plot.load_run(str(b))])
    assert note is None and fig.axes[0].get_ylabel() == "bits per byte"
    assert list(line(fig, "char: val")[1]) == [8.0, 4.0] and list(line(fig, "bpe: val")[1]) == [5.0, 2.5]

    c = fake_workdir(tmp_path / "nobpb", "gpt2", 50257, [10.0, 5.0])
    plot.main([str(a), str(c), f"--out={tmp_path / 'x.png'}"])
    err = capsys.readouterr().err
    assert "nobpb has no bits-per-byte metrics" in err and (tmp_path / "x.png").exists()


def test_diagnostics_panels(tmp_path):
    workdir = fake_workdir(tmp_path / "run", "char", 34, [3.0, 2.0])
    with open(workdir / "metrics.jsonl", "a") as f:
        for step in (10, 20):
            rec = {"step": step}
            for i in range(3):
                rec.update({f"diag/grad_norm/blocks.{i}": 0.1 * (i + 1), f"diag/update_ratio/blocks.{i}": 1e-3,
                            f"diag/act_std/blocks.{i}": 1.0, f"diag/dead_frac/blocks.{i}": 0.01 * i})
            rec["diag/grad_norm/wte"] = 0.5
            f.write(json.dumps(rec) + "\n")
    out = plot.plot(["--diagnostics", str(workdir)])
    assert out == [str(workdir / "diagnostics.png")] and (workdir / "diagnostics.png").stat().st_size > 1000
    fig = plot.diagnostics_figure(plot.load_run(str(workdir)))
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["gradient norm", "|update| / |weights|", "block output std", "dead ReLU units (fraction)"]
    grad = {l.get_label(): list(l.get_ydata()) for l in fig.axes[0].lines}
    assert grad == {"wte": [0.5, 0.5], "layer 0": [0.1, 0.1], "layer 1": [0.2, 0.2],
                    "layer 2": [pytest.approx(0.3), pytest.approx(0.3)]}


@pytest.mark.slow
def test_bad_input_says_so_plainly(tmp_path, capsys):
    (tmp_path / "notes").mkdir()
    with pytest.raises(UserError, match="is not a gptjax workdir"):
        plot.plot([str(tmp_path / "notes")])
    with pytest.raises(UserError, match="is not a folder"):
        plot.plot([str(tmp_path / "missing")])
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "config.json").write_text("{}")
    with pytest.raises(UserError, match="has no metrics yet"):
        plot.plot([str(fresh)])
    (fresh / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="has no metrics yet"):
        plot.plot([str(fresh)])
    nodiag = fake_workdir(tmp_path / "nodiag", "char", 34, [3.0])
    with pytest.raises(UserError, match="diagnostics_every"):
        plot.plot(["--diagnostics", str(nodiag)])

    proc = run_cli("gptjax.plot", str(tmp_path / "notes"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"error: {tmp_path / 'notes'} is not a gptjax workdir")


def to_old_format(workdir):
    """Rewrite a workdir's metrics.jsonl as the previous version wrote it (evaluations: train_loss, ...)."""
    path = workdir / "metrics.jsonl"
    records = [json.loads(line) for line in path.read_text().splitlines()]
    old = [{(k.replace("eval_train_", "train_", 1)): v for k, v in r.items()} for r in records]
    path.write_text("".join(json.dumps(r) + "\n" for r in old))
    return old


@pytest.mark.slow
def test_an_old_workdir_still_plots_resumes_and_compares_with_a_new_one(resumed_workdir, tmp_path):
    from conftest import SAMPLE_TEXT
    from gptjax.history import best_val, history, record_kind
    from gptjax.trainer import build as Run

    text = tmp_path / "corpus.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    workdir = tmp_path / "old"
    Run(small_config(str(text), workdir), str(workdir), quiet=True).train(stop_at=10)
    old = to_old_format(workdir)
    assert [r["step"] for r in old if "val_loss" in r and "train_loss" in r] == [0, 10]  # really the old names

    # It plots: the evaluation's training-split points are drawn as such.
    fig, _ = plot.compare_figure([plot.load_run(str(workdir))], x="steps")
    x, y = line(fig, "train (eval)")
    assert list(x) == [0, 10] and list(y) == [r["train_loss"] for r in old if "val_loss" in r]
    with open(workdir / "metrics.jsonl", "a") as f:  # and an old crashed attempt past the checkpoint
        f.write(json.dumps({"step": 15, "train_loss": 9.0, "val_loss": 9.5}) + "\n")

    # It resumes: the old crashed record is dropped, the new records carry the new names.
    Run(small_config(str(text), workdir), str(workdir), quiet=True).train()
    records = read_metrics(str(workdir / "metrics.jsonl"))
    evals = [r for r in records if record_kind(r) == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20] and 9.5 not in [r["val_loss"] for r in evals]
    assert all("eval_train_loss" in r and "train_loss" not in r for r in evals)
    assert [r["step"] for r in records if record_kind(r) == "train"] == [5, 10, 15, 20]
    assert best_val(history(records)) == min((r["val_loss"], r["step"]) for r in evals)[::-1]
    # The same run as a new one computed it: resumed_workdir trained the same config the same way.
    new = read_metrics(str(resumed_workdir / "metrics.jsonl"))
    assert [r["val_loss"] for r in history(new) if record_kind(r) == "eval"] == [r["val_loss"] for r in evals]

    # It compares with a new workdir.
    fig, note = plot.compare_figure([plot.load_run(str(workdir)), plot.load_run(str(resumed_workdir))], x="steps")
    assert note is None
    assert list(line(fig, "old: val")[0]) == list(line(fig, "resumed: val")[0]) == [0, 10, 20]

