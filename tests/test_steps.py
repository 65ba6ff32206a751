"""Step-level control: step metrics, evaluations inside an epoch (val checks) with early stopping and checkpoint
ranking, ``max_steps``, exact resume after a kill that follows a val check — on the real ``Trainer`` with a small
dropout model (so the RNG stream matters), then through ``train.py`` into a real MLflow store."""

from __future__ import annotations

import functools
import json
import os
import signal
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from loralab.core.checkpoint import Checkpoints, read_meta
from loralab.core.sampler import EpochBatchSampler
from loralab.core.trainer import Fit, Trainer

ROWS, BATCH = 60, 4  # 15 optimizer steps per epoch
TIMINGS = ("train_samples_per_s", "epoch_train_time_s", "eval_samples_per_s")


class Net(nn.Module):
    """Dropout before a linear head: training draws from the RNG, so any extra or missing draw changes weights."""

    def __init__(self):
        super().__init__()
        self.drop, self.lin = nn.Dropout(0.3), nn.Linear(4, 3)

    def forward(self, x):
        return SimpleNamespace(logits=self.lin(self.drop(x)))


def data() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(4, generator=g), "labels": torch.tensor(i % 3)} for i in range(ROWS)]


class Killed(BaseException):
    """A SIGKILL stand-in: nothing after it runs, only what is already on disk survives."""


class KilledAfterCheck(Checkpoints):
    """Dies right after the checkpoints of the val check at ``step`` are written."""

    def __init__(self, *args, kill_at: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.kill_at = kill_at

    def check(self, loop_state, step, epoch, value):
        super().check(loop_state, step, epoch, value)
        if step == self.kill_at:
            raise Killed


def fit(ckpt_dir, *, metric_fn=None, checkpoints=Checkpoints, resume=None, max_epochs=2, patience=100,
        monitor=("val_loss", "min"), max_grad_norm=None, **knobs):
    """Set up and fit a ``Trainer`` the way the lifecycle does; returns (trainer, state, on_step calls)."""
    torch.manual_seed(0)
    rows = data()
    loader = DataLoader(rows, batch_sampler=EpochBatchSampler([1] * ROWS, BATCH, 0, group_by_length=False))
    val = DataLoader(rows[:30], batch_size=8)
    trainer_cfg = OmegaConf.create({"max_epochs": max_epochs, "monitor": monitor[0], "monitor_mode": monitor[1],
                                    "early_stopping": {"patience": patience, "min_delta": 0.0}, **knobs})
    optim_cfg = OmegaConf.create({"optimizer": {"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 0.05},
                                  "scheduler": "linear", "warmup_ratio": 0.0, "max_grad_norm": max_grad_norm})
    trainer = Trainer(trainer_cfg, optim_cfg, precision="fp32", device=torch.device("cpu"), progress=False)
    ckpts = checkpoints(ckpt_dir, keep=2, mode=monitor[1], meta={}, resume_from=resume)
    trainer.setup(Fit(Net(), nn.CrossEntropyLoss(), loader, val, metric_fn or (lambda y, p: {})), ckpts)
    calls: list[tuple[int, dict[str, float]]] = []
    state = trainer.fit(on_step=lambda step, metrics: calls.append((step, metrics)))
    return trainer, state, calls


def untimed(entries):
    return [{k: v for k, v in e.items() if k not in TIMINGS} for e in entries]


def weights(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_step_metrics_come_every_n_optimizer_steps_and_at_every_evaluation(tmp_path):
    trainer, state, calls = fit(tmp_path, log_every_n_steps=4, val_check_interval=6)
    train = [(s, m) for s, m in calls if "train_loss" in m]
    val = [s for s, m in calls if "val_loss" in m]
    assert [s for s, _ in train] == [4, 8, 12, 16, 20, 24, 28]
    assert all(m.keys() == {"train_loss", "lr", "grad_norm", "samples_per_s"} for _, m in train)
    assert all(m["grad_norm"] > 0 and m["samples_per_s"] > 0 and m["train_loss"] > 0 for _, m in train)
    # lr: the one the step used; linear decay from 0.05 over 30 steps
    assert [m["lr"] for _, m in train] == pytest.approx([0.05 * (1 - (s - 1) / 30) for s, _ in train])
    assert val == [6, 12, 15, 18, 24, 30]  # checks, plus the epoch ends (15, 30); no check on an epoch's last step
    assert [c["step"] for c in state.checks] == [6, 12, 18, 24] and [h["step"] for h in state.history] == [15, 30]
    assert [c["epoch"] for c in state.checks] == [0.4, 0.8, 1.2, 1.6]


def test_max_steps_stops_exactly_there_and_the_schedule_ends_with_it(tmp_path):
    trainer, state, calls = fit(tmp_path, max_epochs=5, max_steps=20, log_every_n_steps=1)
    assert state.step == 20 and state.stop_reason == "max_steps: 20 optimizer steps"
    assert [s for s, m in calls if "train_loss" in m] == list(range(1, 21))
    assert [h["step"] for h in state.history] == [15] and [c["step"] for c in state.checks] == [20]  # evaluated
    assert trainer.scheduler.get_last_lr() == [0.0]  # a linear schedule over max_steps, not 5 epochs
    assert read_meta(tmp_path / "last")["loop"]["batches_done"] == 5
    # resumed from its `last`, a run that reached max_steps does nothing more
    _, again, calls = fit(tmp_path / "again", resume=tmp_path / "last", max_epochs=5, max_steps=20)
    assert again.step == 20 and calls == []


def test_max_steps_at_an_epoch_end_is_that_epoch(tmp_path):
    _, state, _ = fit(tmp_path, max_epochs=5, max_steps=15)
    assert state.step == 15 and len(state.history) == 1 and state.checks == []
    assert state.stop_reason == "max_steps: 15 optimizer steps"


def test_val_checks_change_nothing_that_is_trained(tmp_path):
    """Evaluation runs on a forked RNG: with dropout, the weights and the epoch-end metrics are the same whether
    or not the run also evaluates every 4 steps."""
    plain, plain_state, _ = fit(tmp_path / "plain")
    checked, checked_state, _ = fit(tmp_path / "checked", val_check_interval=4)
    assert [c["step"] for c in checked_state.checks] == [4, 8, 12, 16, 20, 24, 28]
    a, b = weights(plain.core), weights(checked.core)
    assert all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda hs: [{k: v for k, v in h.items() if k != "train_loss"} for h in untimed(hs)]  # noqa: E731
    assert strip(plain_state.history) == strip(checked_state.history)


def test_early_stopping_and_ranking_at_val_checks(tmp_path):
    """Patience counts evaluations; the best evaluation is a val check, ranked, checkpointed and reloaded."""
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.9])

    trainer, state, _ = fit(tmp_path, metric_fn=lambda y, p: {"score": next(scores)}, monitor=("score", "max"),
                            patience=2, val_check_interval=5, max_epochs=3)
    # evaluations: step 5 (0.5), 10 (0.6, best), 15 = epoch 1 end (0.55), 20 (0.58: second miss, stop)
    assert state.step == 20 and state.stop_reason == "early_stopping: no score improvement for 2 evaluations"
    assert state.best_step == 10 and state.best_epoch == 1 and state.best["score"] == 0.6
    assert [e["name"] for e in trainer.checkpoints.ranked] == ["step_0000010", "step_0000020"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "step_0000010", "step_0000020"]
    trainer.finish()  # the best evaluation's weights back in the model
    best = load_file(tmp_path / "step_0000010" / "weights.safetensors")
    assert all(torch.equal(trainer.core.state_dict()[k], v) for k, v in best.items())
    assert state.fit_time_s > 0 and state.train_samples_per_s > 0  # the unfinished epoch is counted


def test_resume_after_a_kill_that_follows_a_val_check_equals_the_uninterrupted_run(tmp_path):
    """Killed right after the val check at step 20 (inside epoch 2) wrote its checkpoints, then resumed from
    `last`: same evaluations, same best, bit-identical weights — with dropout drawing from the RNG."""
    ref, ref_state, _ = fit(tmp_path / "ref", val_check_interval=4, max_epochs=3)
    with pytest.raises(Killed):
        fit(tmp_path / "run", val_check_interval=4, max_epochs=3, 
            checkpoints=functools.partial(KilledAfterCheck, kill_at=20))
    assert read_meta(tmp_path / "run" / "last")["loop"]["step"] == 20
    torch.manual_seed(123)  # whatever the RNG is now, resume restores the checkpoint's
    resumed, state, calls = fit(tmp_path / "run", val_check_interval=4, max_epochs=3,
                                resume=tmp_path / "run" / "last")
    assert calls[0][0] == 24  # the check at step 20 is not repeated
    assert untimed(state.history) == untimed(ref_state.history)
    assert untimed(state.checks) == untimed(ref_state.checks)
    assert (state.best_step, state.stop_reason) == (ref_state.best_step, ref_state.stop_reason)
    a, b = weights(ref.core), weights(resumed.core)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.checkpoints.ranked == ref.checkpoints.ranked
