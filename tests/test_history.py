"""A run's history: record kinds, the attempt that counts, series and the best validation loss."""

from gptjax.history import best_val, history, record_kind, series


def test_record_kinds():
    assert record_kind({"step": 5, "train_loss": 3.0, "lr": 1e-3}) == "train"
    assert record_kind({"step": 5, "eval_train_loss": 3.0, "val_loss": 3.1}) == "eval"
    assert record_kind({"step": 5, "diag/grad_norm/wte": 0.1}) == "diag"
    assert record_kind({"step": 5, "note": "x"}) == "note,step"


def test_history_keeps_the_last_attempt_when_a_run_restarted_without_truncating():
    records = [{"step": 0, "val_loss": 4.0, "eval_train_loss": 4.0}, {"step": 5, "train_loss": 3.0, "lr": 1},
               {"step": 10, "train_loss": 2.5, "lr": 1},  # crash; restart from scratch
               {"step": 0, "val_loss": 4.1, "eval_train_loss": 4.1}, {"step": 5, "train_loss": 3.1, "lr": 1},
               {"step": 10, "train_loss": 2.6, "lr": 1}, {"step": 10, "val_loss": 2.7, "eval_train_loss": 2.6}]
    kept = history(records)
    assert [(r["step"], r.get("val_loss", r.get("train_loss"))) for r in kept] == [(0, 4.1), (5, 3.1), (10, 2.6),
                                                                                  (10, 2.7)]
    # Other records may repeat a step (two notes at one step) without meaning a restart.
    notes = [{"step": 5, "note": "a"}, {"step": 5, "note": "b"}]
    assert history(records[:2] + notes) == [records[0], records[1]] + notes


def test_series_and_best_val_skip_what_is_not_a_finite_number():
    records = [{"step": 0, "val_loss": 3.0}, {"step": 10, "val_loss": "nan"}, {"step": 20, "val_loss": 2.0},
               {"step": 30, "val_loss": float("inf")}, {"step": 20, "train_loss": 1.0, "lr": 1}]
    assert series(records, "val_loss", "eval") == ([0, 20, 30], [3.0, 2.0, float("inf")])
    assert series(records, "train_loss", "train") == ([20], [1.0])
    assert best_val(records) == (20, 2.0)
    assert best_val([{"step": 1, "train_loss": 1.0}]) is None
