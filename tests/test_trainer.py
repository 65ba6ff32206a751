"""The trainer's promises on a two-weight-matrix model (milliseconds per epoch): accumulation, fp16 overflow
handling, non-finite stops, the best epoch reloaded, top-k rotation, early stopping, mid-epoch resume and DDP ranks
(two gloo processes) staying in step. The monitored metric is scripted where a test needs a given ranking."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import optim_conf, trainer_conf
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from loralab.core.checkpoint import CheckpointError, Checkpoints, load_weights, read_meta
from loralab.core.distributed import Dist
from loralab.core.sampler import EpochBatchSampler
from loralab.core.state import EarlyStopping
from loralab.core.trainer import MAX_SKIPPED_IN_A_ROW, FitInputs, Trainer
from loralab.errors import NonFiniteLossError, TrainingInterrupted

TIMINGS = ("train_samples_per_s", "epoch_train_time_s", "eval_samples_per_s")


class Tiny(nn.Module):
    """Linear ▸ ReLU ▸ linear; ``poisoned`` makes every output NaN (a run that diverges later)."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)
        self.poisoned = False

    def forward(self, x):
        out = self.b(torch.relu(self.a(x)))
        return SimpleNamespace(logits=out * float("nan") if self.poisoned else out)


def rows(n: int, huge_every: int = 0) -> list[dict[str, torch.Tensor]]:
    """``n`` fixed rows; every ``huge_every``-th has inputs that overflow fp16 (> 65504 after the first layer)."""
    g = torch.Generator().manual_seed(1)
    x, y = 0.1 * torch.randn(n, 3, generator=g), torch.randint(0, 2, (n,), generator=g)  # small: no fp16 overflow
    if huge_every:
        x[::huge_every] = 1e6
    return [{"x": x[i], "labels": y[i]} for i in range(n)]


def loader(data, batch_size: int, rank: int = 0, world_size: int = 1) -> DataLoader:
    sampler = EpochBatchSampler(
        [1] * len(data), batch_size, seed=0, group_by_length=False, rank=rank, world_size=world_size
    )
    return DataLoader(data, batch_sampler=sampler)


def scripted(values):
    """A metric function returning ``values`` one epoch after another (``acc``)."""
    it = iter(values)
    return lambda y, logits: {"acc": next(it)}


def make_trainer(
    max_epochs: int,
    *,
    patience: int = 100,
    min_delta: float = 0.0,
    grace: int = 0,
    mode: str = "max",
    precision: str = "fp32",
    lr: float = 0.1,
    ddp: Dist = Dist(),
) -> Trainer:
    return Trainer(
        trainer_conf(max_epochs, mode=mode, patience=patience, min_delta=min_delta, grace=grace),
        optim_conf(lr=lr),
        precision=precision,
        device=torch.device("cpu"),
        ddp=ddp,
        progress=False,
    )


def fit(
    tmp_path: Path,
    *,
    model=None,
    data=None,
    batch_size: int = 4,
    accum: int = 1,
    metric=None,
    keep: int = 3,
    resume_from: Path | None = None,
    **trainer_kw,
) -> Trainer:
    """Set up a trainer on ``data`` (train and val) with checkpoints in ``tmp_path``; not yet fitted."""
    data = data if data is not None else rows(40)
    model = model or Tiny()
    trainer = make_trainer(**trainer_kw)
    metric = metric or (lambda y, logits: {"acc": float((logits.argmax(1) == y).mean())})
    trainer.setup(
        FitInputs(
            model, nn.CrossEntropyLoss(), loader(data, batch_size), DataLoader(data, batch_size=16), metric, accum
        ),
        Checkpoints(tmp_path, keep=keep, mode=trainer.conf.monitor_mode, meta={}, resume_from=resume_from),
    )
    return trainer


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_accumulated_micro_batches_equal_the_full_batch(tmp_path):
    """Batches of 8 vs micro-batches of 4 x 2 steps, 36 rows (the last group is one short micro-batch): the same
    weights and losses after two epochs, not just the same arithmetic."""
    data = rows(36)
    full = fit(tmp_path / "full", data=data, batch_size=8, max_epochs=2)
    full.fit()
    accum = fit(tmp_path / "accum", data=data, batch_size=4, accum=2, max_epochs=2)
    accum.fit()
    assert full.state.step == accum.state.step == 10
    for key, value in weights(full.core).items():
        torch.testing.assert_close(weights(accum.core)[key], value, rtol=0, atol=1e-6)
    assert [h["train_loss"] for h in accum.state.history] == pytest.approx(
        [h["train_loss"] for h in full.state.history], rel=1e-6
    )


def test_fp16_overflow_steps_are_skipped_and_counted(tmp_path):
    trainer = fit(tmp_path, data=rows(30, huge_every=3), batch_size=1, precision="fp16", max_epochs=1)
    trainer.fit()
    # The scaler halves its scale at every step it skips (and grows it only after 2000 good ones): the count must
    # be exactly the halvings, at least one per overflowing row (it may also skip while finding its scale).
    halvings = math.log2(65536 / trainer.scaler.get_scale())
    assert trainer.state.skipped_steps == halvings >= 10
    assert trainer.state.history[0]["skipped_steps"] == trainer.state.skipped_steps and trainer.state.step == 30
    assert all(torch.isfinite(w).all() for w in weights(trainer.core).values())  # skipped, never applied


def test_fp16_stops_after_max_skipped_steps_in_a_row(tmp_path):
    assert MAX_SKIPPED_IN_A_ROW == 50  # docs/hardware.md: "50 overflowing steps in a row stop the run"
    trainer = fit(tmp_path, data=rows(60, huge_every=1), batch_size=1, precision="fp16", max_epochs=1)
    with pytest.raises(NonFiniteLossError, match="50 fp16 steps in a row overflowed"):
        trainer.fit()
    assert trainer.state.skipped_steps == 50


def test_a_non_finite_stop_after_a_good_epoch_keeps_that_checkpoint(tmp_path):
    model = Tiny()
    trainer = fit(tmp_path, model=model, max_epochs=3)
    good = {}

    def poison_after_epoch_1(state, metrics):
        good.update(weights(model))
        model.poisoned = True

    with pytest.raises(NonFiniteLossError):
        trainer.fit(on_epoch_end=poison_after_epoch_1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_001", "last"]
    assert read_meta(tmp_path / "last")["loop"]["epoch"] == 1
    saved = load_file(tmp_path / "epoch_001" / "weights.safetensors")
    assert saved.keys() == good.keys() and all(torch.equal(saved[k], good[k]) for k in saved)


def test_loading_a_checkpoint_with_nan_or_inf_is_refused(tmp_path):
    trainer = fit(tmp_path / "run", max_epochs=1)
    trainer.fit()
    for bad in (float("nan"), float("inf")):
        ckpt = tmp_path / f"epoch_001_{bad}"  # a fresh copy each time, its checksums.json in place
        shutil.copytree(tmp_path / "run" / "epoch_001", ckpt)
        assert (ckpt / "checksums.json").is_file()
        tensors = load_file(ckpt / "weights.safetensors")
        tensors["a.weight"][0, 0] = bad
        save_file(tensors, ckpt / "weights.safetensors")
        with pytest.raises(CheckpointError, match="sha256 does not match"):  # the checksum catches it first
            load_weights(ckpt, Tiny())
        (ckpt / "checksums.json").unlink()  # as a checkpoint from before checksums: still refused
        with pytest.raises(CheckpointError, match="a.weight contains NaN/Inf"):
            load_weights(ckpt, Tiny())
        with pytest.raises(CheckpointError, match="NaN/Inf"):  # resuming from it too
            fit(tmp_path / f"resumed_{bad}", max_epochs=2, resume_from=ckpt)


def test_the_best_epoch_is_reloaded_when_it_is_not_the_last(tmp_path):
    trainer = fit(tmp_path, max_epochs=3, metric=scripted([0.5, 0.9, 0.6]))
    trainer.fit()
    last = weights(trainer.core)
    trainer.finish()
    assert trainer.state.best_epoch == 2
    best = load_file(tmp_path / "epoch_002" / "weights.safetensors")
    now = weights(trainer.core)
    assert all(torch.equal(now[k], best[k]) for k in best)
    assert not all(torch.equal(now[k], last[k]) for k in best)  # the last epoch's weights were replaced


@pytest.mark.parametrize(
    "mode, values, kept",
    [
        ("max", [0.5, 0.7, 0.6, 0.8], ["epoch_004", "epoch_002"]),
        ("min", [0.5, 0.7, 0.4, 0.8], ["epoch_003", "epoch_001"]),
    ],
)
def test_top_k_checkpoints_rotate(tmp_path, mode, values, kept):
    trainer = fit(tmp_path, max_epochs=4, keep=2, mode=mode, metric=scripted(values))
    trainer.fit()
    assert [e["name"] for e in trainer.checkpoints.ranked] == kept
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*kept, "last"])
    assert read_meta(tmp_path / "last")["meta"]["top_k"][:2] == trainer.checkpoints.ranked  # (before the rotation)


@pytest.mark.parametrize(
    "patience, min_delta, mode, values, stops_after",
    [
        (0, 0.0, "max", [0.5, 0.6, 0.55], 3),  # patience 0: stop at the first epoch without improvement
        (2, 0.0, "max", [0.5, 0.4, 0.6, 0.5, 0.5], 5),
        (1, 0.0, "max", [0.5, 0.6, 0.7], None),
        (1, 0.1, "max", [0.5, 0.55, 0.9], 2),  # +0.05 is not an improvement of more than min_delta
        (1, 0.1, "max", [0.5, 0.65, 0.7], 3),  # +0.15 is; +0.05 then is not
        (1, 0.1, "min", [1.0, 0.95, 0.5], 2),
        (1, 0.1, "min", [1.0, 0.85, 0.5], None),
    ],
)
def test_early_stopping_patience_and_min_delta(patience, min_delta, mode, values, stops_after):
    es = EarlyStopping(patience=patience, min_delta=min_delta, mode=mode)
    stopped = None
    for epoch, v in enumerate(values, start=1):
        es.update(v)
        if es.should_stop:
            stopped = epoch
            break
    assert stopped == stops_after


def test_early_stopping_ends_a_fit_with_its_reason(tmp_path):
    """min_delta decides when patience runs out; the best epoch is still the best raw value (epoch 2 here)."""
    trainer = fit(tmp_path, max_epochs=5, patience=1, min_delta=0.1, metric=scripted([0.5, 0.55, 0.9, 0.9, 0.9]))
    state = trainer.fit()
    assert len(state.history) == 2 and state.best_epoch == 2
    assert state.stop_reason == "early_stopping: no acc improvement for 1 epochs"
    resumed = fit(
        tmp_path / "again", max_epochs=5, patience=1, min_delta=0.1, resume_from=tmp_path / "last", metric=scripted([])
    )
    assert resumed.fit().history == state.history  # a resumed run that had stopped stays stopped


@pytest.mark.parametrize("grace, epochs_run, best_epoch", [(0, 2, 1), (2, 5, 4)])
def test_early_stopping_does_not_weigh_evaluations_in_the_grace_epochs(tmp_path, grace, epochs_run, best_epoch):
    """Six planned epochs of 10 steps, patience 1. Watching from the start, the dip at epoch 2 stops the run; with
    grace 2 epochs 1-2 (steps 10, 20) are not weighed, epoch 3 sets the stopper's bar, 4 beats it, 5 stops.
    The best epoch is ranked over every evaluation either way."""
    acc = [0.5, 0.4, 0.3, 0.6, 0.5, 0.9]
    state = fit(tmp_path, max_epochs=6, patience=1, grace=grace, metric=scripted(acc)).fit()
    assert len(state.history) == epochs_run and state.best_epoch == best_epoch


def test_mid_epoch_resume_equals_the_uninterrupted_fit(tmp_path):
    reference = fit(tmp_path / "ref", max_epochs=2)
    reference.fit()
    stopped = fit(tmp_path / "run", max_epochs=2)
    steps = iter(range(100))
    with pytest.raises(TrainingInterrupted, match=r"stopped at step 13 \(epoch 2, batch 3/10\)"):
        stopped.fit(stop_requested=lambda: next(steps) == 12)  # the 13th step: epoch 2, batch 3
    loop = read_meta(tmp_path / "run" / "last")["loop"]
    assert (loop["epoch"], loop["batches_done"], loop["step"]) == (1, 3, 13)
    resumed = fit(tmp_path / "run", max_epochs=2, resume_from=tmp_path / "run" / "last", model=Tiny(seed=5))
    assert resumed.state.batches_done == 3
    resumed.fit()
    strip = lambda h: [{k: v for k, v in e.items() if k not in TIMINGS + ("train_loss",)} for e in h]  # noqa: E731
    assert strip(resumed.state.history) == strip(reference.state.history)
    assert [h["train_loss"] for h in resumed.state.history] == pytest.approx(
        [h["train_loss"] for h in reference.state.history], rel=1e-6
    )
    a, b = weights(resumed.core), weights(reference.core)
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- DDP: two gloo processes ---------------------------------------------------------------------------------------


def _ddp_fit(rank: int, world: int, out: Path, stop_rank: int | None) -> dict:
    """42 rows in per-rank batches of 4 make 11 batches (the last one 2 rows) for 2 ranks; early stopping from the
    gathered val metric (patience 1, scripted to stop after epoch 2), or a stop requested on ``stop_rank`` only."""
    ddp = Dist(rank=rank, world_size=world)
    data = rows(42)
    model = DistributedDataParallel(Tiny())
    trainer = make_trainer(4, patience=1, ddp=ddp)
    values = iter([0.5, 0.4, 0.9, 0.9])
    train = loader(data, 4, rank, world)
    trainer.setup(
        FitInputs(
            model,
            nn.CrossEntropyLoss(),
            train,
            DataLoader(data[rank::world], batch_size=16),
            lambda y, p: {"acc": next(values), "rows": float(len(y))},
        ),
        Checkpoints(out, keep=1, mode="max", meta={}, ddp=ddp),
    )
    result = {"batches": len(train.batch_sampler), "rows": [i for b in train for i in b["x"][:, 0].tolist()]}
    steps = iter(range(1000))
    try:
        trainer.fit(stop_requested=lambda: rank == stop_rank and next(steps) >= 1)
        result["ended"] = trainer.state.stop_reason
    except TrainingInterrupted as err:
        result["ended"] = str(err)
    return {
        **result,
        "step": trainer.state.step,
        "epochs": len(trainer.state.history),
        "val_rows": [h["rows"] for h in trainer.state.history],
        "weights": {k: v.flatten().tolist() for k, v in trainer.core.state_dict().items()},
    }


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank of both fits (early stopping; a stop asked on rank 1 only); writes ``out/rank<r>.json``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {
            name: _ddp_fit(rank, world, Path(out) / name, stop_rank)
            for name, stop_rank in (("early", None), ("stop", 1))
        }
        Path(out, f"rank{rank}.json").write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


def test_ddp_ranks_step_and_stop_together_with_an_uneven_last_batch(tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_ddp_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True, start_method="fork")
    a, b = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    for name in ("early", "stop"):
        ra, rb = a[name], b[name]
        assert ra["batches"] == rb["batches"] == 5  # 11 batches: 5 each, the 11th of this epoch dropped
        assert not set(ra["rows"]) & set(rb["rows"])  # disjoint shards
        assert (ra["step"], ra["epochs"], ra["ended"]) == (rb["step"], rb["epochs"], rb["ended"])  # in step
        assert ra["weights"] == rb["weights"]  # gradients all-reduced: the replicas never drift apart
        assert ra["val_rows"] == [42.0] * ra["epochs"]  # every rank scores the whole (gathered) val set
    assert a["early"]["ended"].startswith("early_stopping") and a["early"]["epochs"] == 2
    # Rank 1 alone asked to stop (at its 2nd step); both stop where ranks agree (here the end of epoch 1).
    assert a["stop"]["ended"] == "stopped at step 5 (epoch 1, batch 5/5)"
