"""Defaults that hold from 100 to 100,000 rows: ``trainer.max_epochs=auto`` derives epochs (and patience) from
optimizer steps, smoothed early stopping is not fooled by one noisy epoch, and a run that loses to its baseline by
more than 0.05 macro-F1 says so in one plain line (console and report.md)."""

from __future__ import annotations

import dataclasses

from conftest import run_result, typed_conf
from rich.console import Console

from loralab.core.state import EarlyStopping
from loralab.reporting.console import baseline_verdict, print_summary, run_line
from loralab.reporting.report import render_report

CONF = typed_conf()  # the shipped trainer group, its min_steps set below (1800) where a test names it


def trainer(max_epochs="auto", min_steps=1800, patience=3, patience_steps=540):
    t = CONF.trainer
    es = dataclasses.replace(t.early_stopping, patience=patience, patience_steps=patience_steps)
    return dataclasses.replace(t, max_epochs=max_epochs, min_steps=min_steps, early_stopping=es)


def resolve_length(trainer_conf, steps_per_epoch):
    return trainer_conf.for_epoch_length(steps_per_epoch)


def pretrain_epochs(epochs, min_steps, steps_per_epoch):
    pretrain = dataclasses.replace(CONF.pretrain, epochs=epochs, min_steps=min_steps)
    return pretrain.trainer(steps_per_epoch).max_epochs


def test_auto_epochs_reach_min_steps_on_any_size():
    for rows, batch in ((100, 16), (124, 16), (3000, 16), (100_000, 16)):
        per_epoch = -(-rows // batch)
        cfg, length = resolve_length(trainer(), per_epoch)
        assert cfg.max_epochs * per_epoch >= 1800 > (cfg.max_epochs - 1) * per_epoch or cfg.max_epochs == 1
        assert cfg.early_stopping.patience * per_epoch >= 540 or cfg.early_stopping.patience == 3
        assert length["max_epochs"] == cfg.max_epochs
    assert resolve_length(trainer(), 8)[0].max_epochs == 225  # 124 rows: 8 steps an epoch
    assert resolve_length(trainer(), 8)[0].early_stopping.patience == 68
    assert resolve_length(trainer(), 6250)[0].max_epochs == 1  # 100k rows: one epoch is already 6,250 steps
    assert resolve_length(trainer(), 6250)[0].early_stopping.patience == 3


def test_a_long_epoch_is_evaluated_inside_and_a_short_one_at_its_end():
    """val_check_interval=auto: checks at most min_steps/4 (450) steps apart, evenly spaced within the epoch."""
    assert resolve_length(trainer(), 258)[0].val_check_interval is None  # the demo: 7 epochs, checked at their ends
    assert resolve_length(trainer(), 450)[0].val_check_interval is None
    cfg, length = resolve_length(trainer(), 2500)  # 40k rows: one epoch, checked 6 times
    assert cfg.val_check_interval == 417 and length["val_check_interval"] == 417
    assert cfg.max_epochs == 1 and cfg.early_stopping.patience == 3  # 3 checks (1,251 steps) without a rise
    assert resolve_length(trainer(), 6250)[0].val_check_interval == 447  # 14 checks
    fixed = dataclasses.replace(trainer(), val_check_interval=100)
    assert resolve_length(fixed, 2500)[0].val_check_interval == 100  # a number is used as given
    assert resolve_length(dataclasses.replace(fixed, val_check_interval=None), 2500)[0].val_check_interval is None


def test_pretrain_min_steps_gives_small_corpora_more_epochs_only():
    # wine: 118 texts after the hold-out are 8 steps an epoch; the demo's 2,280 are 143 (5 epochs: 715 steps)
    assert pretrain_epochs(5, 700, 8) == 88
    assert pretrain_epochs(5, 700, 143) == 5
    assert pretrain_epochs(5, 0, 8) == 5  # the shipped default: off


def test_a_number_of_epochs_is_used_as_given():
    cfg = dataclasses.replace(trainer(max_epochs=2), val_check_interval=None)
    assert resolve_length(cfg, 5) == (cfg, {})


def stops_after(values, smoothing, patience=2):
    es = EarlyStopping(patience, 0.0, "max", smoothing)
    for epoch, v in enumerate(values, start=1):
        es.update(v)
        if es.should_stop:
            return epoch
    return None


def test_one_lucky_epoch_does_not_end_a_rising_run():
    # A spike at epoch 2, then a steady climb that stays under the spike for two epochs.
    values = [0.50, 0.80, 0.66, 0.70, 0.74, 0.78, 0.82]
    assert stops_after(values, smoothing=0.0) == 4  # raw values: stopped by the spike
    assert stops_after(values, smoothing=0.5) is None  # smoothed: the climb counts


def test_a_real_decline_still_stops_and_state_resumes():
    assert stops_after([0.8, 0.7, 0.6, 0.5, 0.4], smoothing=0.5) == 3
    es = EarlyStopping(3, 0.0, "max", 0.5)
    for v in (0.5, 0.7, 0.6):
        es.update(v)
    resumed = EarlyStopping(3, 0.0, "max", 0.5)
    for k, v in es.state().items():  # as the trainer restores it from a checkpoint
        setattr(resumed, k, v)
    assert resumed.update(0.9) == es.update(0.9) and resumed.state() == es.state()


def test_a_plateau_starts_the_patience_with_the_shipped_min_delta():
    # A run stuck at 1.0 (wine from epoch ~40): in floats its smoothed value keeps rising by ever smaller amounts
    # for ~50 evaluations, each one a "new best" under min_delta 0; the shipped min_delta ends that creep.
    shipped = CONF.trainer.early_stopping
    values = [0.5] + [1.0] * 200
    with_default = stopped_at(values, EarlyStopping(68, shipped.min_delta, "max", shipped.smoothing))
    creeping = stopped_at(values, EarlyStopping(68, 0.0, "max", shipped.smoothing))
    assert with_default <= 1 + 12 + 68 < creeping


def stopped_at(values, es):
    for epoch, v in enumerate(values, start=1):
        es.update(v)
        if es.should_stop:
            return epoch
    return len(values) + 1


def metrics(model_f1, base_f1):
    return {
        "val_macro_f1": model_f1,
        "gates": {},
        "best_epoch": 1,
        "baseline": {"name": "hgb", "train_rows": 10, "fit_time_s": 0.1, "scalars": {"val_macro_f1": base_f1}},
    }


def test_losing_to_the_baseline_by_more_than_005_is_said_plainly():
    assert baseline_verdict(metrics(0.90, 0.94)) is None  # within 0.05
    assert baseline_verdict({"val_macro_f1": 0.5, "baseline": None}) is None
    line = baseline_verdict(metrics(0.446, 1.0))
    assert line.startswith("The model loses to the hgb baseline by 0.554 macro-F1 (0.446 vs 1.000)")
    assert "ensemble=blend" in line  # the override that recovers the baseline's score...
    assert "ensemble=blend" not in baseline_verdict({**metrics(0.446, 1.0), "ensemble": {"weight": 0.2}})  # ...once
    summary = run_result(metrics=metrics(0.446, 1.0), objective=0.446)
    console = Console(record=True, width=200)
    print_summary(summary, console)
    assert line in console.export_text()
    assert "model LOSES" in run_line(summary)
    report = render_report(
        metrics=summary.metrics,
        data_report={},
        result=summary,
        plots={},
        overrides=None,
        run_id=None,
        tracking_uri=None,
        run_dir="/r",
    )
    assert f"**{line}**" in report
    summary.metrics = metrics(0.93, 0.95)
    console = Console(record=True, width=200)
    print_summary(summary, console)
    assert "loses" not in console.export_text() and "LOSES" not in run_line(summary)


def test_the_summary_shows_where_the_wall_went():
    summary = run_result(
        metrics=metrics(0.9, 0.9),
        wall_time_s=200.0,
        stage_seconds={"data": 10.0, "pretrain": 30.0, "model": 2.0, "fit": 140.0, "finalize": 18.0},
    )
    console = Console(record=True, width=250)
    print_summary(summary, console)
    assert "data 10 s (5%) · pretrain 30 s (15%) · model 2 s (1%) · fit 140 s (70%) · finalize 18 s (9%)" in (
        console.export_text()
    )


def test_a_pretrain_budget_ends_the_stage_whatever_the_corpus_size():
    budget = dataclasses.replace(CONF.pretrain, max_steps=2000)
    assert CONF.pretrain.max_steps == 2000  # the shipped budget
    assert budget.trainer(2375).max_steps == 2000  # 38k texts: 5 epochs would be 11,875 steps
    assert budget.trainer(2375).max_epochs == 5  # the budget ends the stage first (and its lr schedule with it)
    assert dataclasses.replace(CONF.pretrain, max_steps=None).trainer(143).max_steps is None


def test_the_loop_refuses_a_length_left_at_auto():
    import pytest
    import torch
    from conftest import optim_conf

    from loralab.core.trainer import Trainer

    with pytest.raises(ValueError, match=r"\['val_check_interval'\] still 'auto'"):
        Trainer(trainer(max_epochs=2), optim_conf(), precision="fp32", device=torch.device("cpu"))
    resolved, _ = trainer(max_epochs=2).for_epoch_length(100)
    Trainer(resolved, optim_conf(), precision="fp32", device=torch.device("cpu"))  # numbers: accepted
