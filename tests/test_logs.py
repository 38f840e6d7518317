"""metrics.jsonl and its sinks: record names, old workdirs, TensorBoard, wandb."""

import json
import math
import types

import ml_collections
import numpy as np
import pytest

from conftest import SAMPLE_TEXT, small_config
from gptjax import logs
from gptjax.history import record_kind
from gptjax.logs import read_metrics


def old_style(record: dict) -> dict:
    """An evaluation record as the previous version wrote it: its training-split figures as train_*."""
    return {(k.replace("eval_train_", "train_", 1) if k.startswith("eval_train_") else k): v for k, v in record.items()}


def test_eval_record_names_the_training_split_figures_apart_from_the_train_log():
    result = {"train_loss": 2.0, "train_ppl": 7.4, "train_bpb": 2.9, "val_loss": 2.25, "val_ppl": 9.5,
              "val_bpb": 3.2, "val_full_loss": 2.3, "val_full_tokens": 1000}
    rec = logs.eval_record(10, result)
    assert rec == {"step": 10, "eval_train_loss": 2.0, "eval_train_ppl": 7.4, "eval_train_bpb": 2.9, "val_loss": 2.25,
                   "val_ppl": 9.5, "val_bpb": 3.2, "val_full_loss": 2.3, "val_full_tokens": 1000}
    # TensorBoard tags as before the rename, for new and old records alike.
    tags = logs.scalar_tags(rec)
    assert tags == logs.scalar_tags(old_style(rec))
    assert tags["eval/train_loss"] == 2.0 and tags["eval/val_loss"] == 2.25 and tags["eval/val_full_tokens"] == 1000
    assert logs.scalar_tags({"step": 10, "train_loss": 1.5, "lr": 0.1, "mfu_estimate": True}) == \
        {"train_loss": 1.5, "lr": 0.1}


def test_old_eval_records_are_read_with_todays_names_and_truncate_cleanly(tmp_path):
    path = tmp_path / "metrics.jsonl"
    old = [{"step": 0, "train_loss": 4.0, "val_loss": 4.1}, {"step": 5, "train_loss": 3.0, "lr": 1e-3},
           {"step": 10, "train_loss": 2.0, "val_loss": 2.5, "train_bpb": 2.9}, {"step": 10, "train_loss": 2.2, "lr": 1}]
    path.write_text("".join(json.dumps(r) + "\n" for r in old) + '{"step": 15, "train_lo')  # cut short by a kill
    got = read_metrics(str(path))
    assert got == [{"step": 0, "eval_train_loss": 4.0, "val_loss": 4.1}, old[1],
                   {"step": 10, "eval_train_loss": 2.0, "val_loss": 2.5, "eval_train_bpb": 2.9}, old[3]]
    log = logs.MetricsLog(str(path))
    log.truncate_after(5)  # a resume from the checkpoint at step 5
    assert read_metrics(str(path)) == got[:2]
    assert path.read_text().endswith("\n")


@pytest.fixture(scope="module")
def fresh_run(tmp_path_factory):
    """A run with diagnostics and samples; (workdir, what it printed)."""
    import contextlib
    import io

    from gptjax.trainer import build as Run

    root = tmp_path_factory.mktemp("logs")
    text = root / "corpus.txt"
    text.write_text(SAMPLE_TEXT, encoding="utf-8")
    cfg = small_config(str(text), root / "run", **{
        "train.diagnostics_every": 5, "train.sample_every": 10, "train.sample_tokens": 20,
        "train.sample_prompt": "All:", "model.activation": "relu", "train.eval_full": True})
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        Run(cfg, cfg.workdir).train()
    return root / "run", out.getvalue()


@pytest.mark.slow
def test_each_meaning_has_one_record_type(fresh_run):
    workdir, _ = fresh_run
    records = read_metrics(str(workdir / "metrics.jsonl"))
    raw = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records == raw  # a fresh file needs no renaming
    kinds = {}
    for r in records:
        for key in r:
            if key != "step":
                kinds.setdefault(key, set()).add(record_kind(r))
    assert {k: v for k, v in kinds.items() if len(v) != 1} == {}
    assert kinds["train_loss"] == {"train"} and kinds["eval_train_loss"] == {"eval"} and kinds["val_loss"] == {"eval"}
    assert kinds["lr"] == kinds["tokens_per_s"] == kinds["mfu"] == kinds["mfu_estimate"] == {"train"}
    assert kinds["val_full_loss"] == {"eval"} and kinds["diag/grad_norm/wte"] == {"diag"}
    evals = [r for r in records if record_kind(r) == "eval"]
    assert [r["step"] for r in evals] == [0, 10, 20]
    assert all(r["mfu_estimate"] is True for r in records if "mfu" in r)  # a CPU run: the peak is measured


@pytest.mark.slow
def test_run_writes_tensorboard_diagnostics_samples_and_loss_png(fresh_run):
    from tensorboard.backend.event_processing import event_accumulator

    workdir, out = fresh_run
    # Console (stdout is not a terminal here): start-up block, plain progress lines, evals, finish block.
    for needle in ("devices:", "mesh:", "tokenizer: char, vocab", "non-embedding", "in float32",
                   "step     10 | eval: train", "step     20 | loss", "(est.)", "ETA", "best val loss", "loss curve"):
        assert needle in out, needle
    assert "\r" not in out  # no progress bar

    records = read_metrics(str(workdir / "metrics.jsonl"))
    diag = [r for r in records if record_kind(r) == "diag"]
    assert [r["step"] for r in diag] == [5, 10, 15, 20]
    for key in ("grad_norm/blocks.1", "update_ratio/wte", "act_std/blocks.0", "attn_entropy/blocks.1",
                "dead_frac/blocks.0"):
        assert all(math.isfinite(r[f"diag/{key}"]) for r in diag), key
    assert all(0 <= r["diag/dead_frac/blocks.1"] <= 1 for r in diag)

    samples = (workdir / "samples.txt").read_text()
    assert samples.count("--- step ") == 2 and "--- step 20 ---\nAll:" in samples
    assert "step     10 | sample:\nAll:" in out

    assert (workdir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # TensorBoard's own reader gets back exactly what metrics.jsonl holds, under the tags it always had.
    acc = event_accumulator.EventAccumulator(str(workdir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    tb = lambda tag: {e.step: e.value for e in acc.Scalars(tag)}
    train = {r["step"]: r for r in records if record_kind(r) == "train"}
    evals = {r["step"]: r for r in records if record_kind(r) == "eval"}
    for tag, rows, key in (("train_loss", train, "train_loss"), ("lr", train, "lr"),
                           ("tokens_per_s", train, "tokens_per_s"), ("grad_norm", train, "grad_norm"),
                           ("eval/val_loss", evals, "val_loss"), ("eval/train_loss", evals, "eval_train_loss"),
                           ("diag/dead_frac/blocks.0", {r["step"]: r for r in diag}, "diag/dead_frac/blocks.0")):
        got = tb(tag)
        assert sorted(got) == sorted(rows), tag
        np.testing.assert_allclose([got[s] for s in sorted(rows)], [rows[s][key] for s in sorted(rows)],
                                   rtol=1e-6, err_msg=tag)
    assert not any(t.startswith("eval_train") or t.startswith("eval/eval_") for t in acc.Tags()["scalars"])


def test_wandb_is_optional(tmp_path, monkeypatch):
    log_cfg = ml_collections.ConfigDict({"tensorboard": False, "wandb": True, "wandb_project": "p"})
    said = []
    monkeypatch.setitem(__import__("sys").modules, "wandb", None)  # as if not installed
    assert logs.make_sinks(log_cfg, {}, str(tmp_path / "tb"), str(tmp_path), say=said.append) == []
    assert "wandb package is not installed" in said[0]

    logged, inits = [], []

    class FakeRun:
        def log(self, data, step):
            logged.append((step, data))

        def finish(self):
            logged.append("finished")

    fake = types.SimpleNamespace(init=lambda **kw: inits.append(kw) or FakeRun())
    monkeypatch.setitem(__import__("sys").modules, "wandb", fake)
    log = logs.MetricsLog(str(tmp_path / "metrics.jsonl"),
                          sinks=logs.make_sinks(log_cfg, {}, str(tmp_path / "tb"), str(tmp_path / "run7")))
    log.write({"step": 3, "train_loss": 2.5, "lr": 0.1})
    log.write(logs.eval_record(3, {"train_loss": 2.0, "val_loss": 2.25}))
    log.close()
    assert inits[0]["name"] == "run7" and inits[0]["project"] == "p"
    assert logged == [(3, {"train_loss": 2.5, "lr": 0.1}), (3, {"eval/train_loss": 2.0, "eval/val_loss": 2.25}),
                      "finished"]
