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
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import LABELS, ROOT, compose_train, new_store, optim_conf, run_result, trainer_conf, write_jsonl
from mlflow.tracking import MlflowClient
from omegaconf import open_dict
from rich.console import Console
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader

from loralab.config import check
from loralab.core.checkpoint import Checkpoints, read_meta
from loralab.core.sampler import EpochBatchSampler
from loralab.core.trainer import FitInputs, Trainer
from loralab.data.demo import write_demo
from loralab.data.regression_demo import write_article_demo
from loralab.errors import ConfigError
from loralab.lifecycle import run
from loralab.reporting.console import print_summary, run_line

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


def fit(
    ckpt_dir,
    *,
    metric_fn=None,
    checkpoints=Checkpoints,
    resume=None,
    max_epochs=2,
    patience=100,
    monitor=("val_loss", "min"),
    max_grad_norm=None,
    **knobs,
):
    """Set up and fit a ``Trainer`` the way the lifecycle does; returns (trainer, state, on_step calls)."""
    torch.manual_seed(0)
    rows = data()
    loader = DataLoader(rows, batch_sampler=EpochBatchSampler([1] * ROWS, BATCH, 0, group_by_length=False))
    val = DataLoader(rows[:30], batch_size=8)
    trainer = Trainer(
        trainer_conf(max_epochs, monitor=monitor[0], mode=monitor[1], patience=patience, **knobs),
        optim_conf("torch.optim.AdamW", lr=0.05, scheduler="linear", max_grad_norm=max_grad_norm),
        precision="fp32",
        device=torch.device("cpu"),
        progress=False,
    )
    ckpts = checkpoints(ckpt_dir, keep=2, mode=monitor[1], meta={}, resume_from=resume)
    trainer.setup(FitInputs(Net(), nn.CrossEntropyLoss(), loader, val, metric_fn or (lambda y, p: {})), ckpts)
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

    def strip(hs):
        return [{k: v for k, v in h.items() if k != "train_loss"} for h in untimed(hs)]

    assert strip(plain_state.history) == strip(checked_state.history)


def test_early_stopping_and_ranking_at_val_checks(tmp_path):
    """Patience counts evaluations; the best evaluation is a val check, ranked, checkpointed and reloaded."""
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.9])

    trainer, state, _ = fit(
        tmp_path,
        metric_fn=lambda y, p: {"score": next(scores)},
        monitor=("score", "max"),
        patience=2,
        val_check_interval=5,
        max_epochs=3,
    )
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
        fit(
            tmp_path / "run",
            val_check_interval=4,
            max_epochs=3,
            checkpoints=functools.partial(KilledAfterCheck, kill_at=20),
        )
    assert read_meta(tmp_path / "run" / "last")["loop"]["step"] == 20
    torch.manual_seed(123)  # whatever the RNG is now, resume restores the checkpoint's
    resumed, state, calls = fit(tmp_path / "run", val_check_interval=4, max_epochs=3, resume=tmp_path / "run" / "last")
    assert calls[0][0] == 24  # the check at step 20 is not repeated
    assert untimed(state.history) == untimed(ref_state.history)
    assert untimed(state.checks) == untimed(ref_state.checks)
    assert (state.best_step, state.stop_reason) == (ref_state.best_step, ref_state.stop_reason)
    a, b = weights(ref.core), weights(resumed.core)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.checkpoints.ranked == ref.checkpoints.ranked


# --- through the lifecycle, into a real MLflow store --------------------------------------------------------------


def adversarial_test_file(path, tiny_data):
    """Val rows with every label rotated, a few train rows with theirs rotated (ids shared with train) and a broken
    line: whatever leaked from it into training, calibration or model choice would move the numbers."""
    rotate = dict(zip(LABELS, LABELS[1:] + LABELS[:1]))
    rows = [{**r, "id": f"t-{r['id']}", "label": rotate[r["label"]]} for r in tiny_data["val_rows"]]
    rows += [{**r, "label": rotate[r["label"]]} for r in tiny_data["train_rows"][:5]]
    return write_jsonl(path, [*rows, '{"id": "broken", '])


def run_in_process(run_dir, *overrides):
    cfg = compose_train(
        "data=jsonl",
        "data.cache_dir=null",
        "model.tokenizer_vocab_size=300",
        "export.zip=false",
        "baseline=none",
        "quiet=true",
        "trainer.max_epochs=2",
        "trainer.log_every_n_steps=3",
        "trainer.val_check_interval=4",
        "trainer.max_steps=12",
        "trainer.early_stopping.patience=100",  # these runs end at max_steps, whatever they learn
        f"tracking.uri={new_store(run_dir / 'mlflow.db')}",
        *overrides,
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
    run(cfg)
    return run_dir


@pytest.fixture(scope="module")
def data_args(tiny_data):
    return [f"data.train_file={tiny_data['train']}", f"data.val_file={tiny_data['val']}"]


@pytest.fixture(scope="module")
def test_file(tmp_path_factory, tiny_data):
    return adversarial_test_file(tmp_path_factory.mktemp("test_split") / "test.jsonl", tiny_data)


@pytest.fixture(scope="module")
def with_test(tmp_path_factory, data_args, test_file):
    """A run with step logging, val checks, max_steps, an adversarial test file and MLflow system metrics."""
    os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"] = "0.5"  # MLflow's own knob; the default is 10 s
    try:
        return run_in_process(
            tmp_path_factory.mktemp("with_test"),
            *data_args,
            f"data.test_file={test_file}",
            "tracking.system_metrics=true",
        )
    finally:
        del os.environ["MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"]


def read_json(path):
    return json.loads(path.read_text())


def only_run(run_dir):
    client = MlflowClient(f"sqlite:///{run_dir}/mlflow.db")
    (found,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    return client, found


@pytest.mark.slow
def test_step_metrics_reach_mlflow_at_optimizer_steps(with_test):
    run_dir = with_test
    client, mlrun = only_run(run_dir)
    summary = read_json(run_dir / "training_summary.json")

    def steps(key):
        return [m.step for m in client.get_metric_history(mlrun.info.run_id, key)]

    assert summary["optimizer_steps"] == 12 and mlrun.data.tags["stop_reason"] == "max_steps: 12 optimizer steps"
    for key in ("step.train_loss", "step.lr", "step.grad_norm", "step.samples_per_s"):
        assert steps(key) == [3, 6, 9, 12], key
    evaluations = sorted(h["step"] for h in [*summary["history"], *summary["val_checks"]])
    assert 4 in evaluations and 8 in evaluations and evaluations[-1] == 12  # checks, epoch ends, the last step
    assert steps("step.val_macro_f1") == steps("step.val_loss") == evaluations
    assert steps("val_macro_f1") == list(range(1, summary["epochs_run"] + 1))  # epoch curves stay at step = epoch
    assert mlrun.data.tags["best_step"] == str(summary["best_step"])
    assert any(k.startswith("system/cpu_utilization") for k in mlrun.data.metrics)  # tracking.system_metrics


@pytest.mark.slow
def test_the_test_split_is_scored_once_and_reported_everywhere(with_test, test_file):
    run_dir = with_test
    metrics, data_report = read_json(run_dir / "metrics.json"), read_json(run_dir / "data_report.json")
    rows = len(test_file.read_text().splitlines()) - 1  # one broken line dropped, by the training reader
    assert data_report["test_file"]["rows_kept"] == rows and data_report["test_file"]["dropped_by_reason"] == {
        "invalid_json": 1
    }
    assert data_report["test_file"]["ids_in_train"] == 5 and data_report["test_file"]["ids_in_val"] == 0
    assert metrics["test"]["rows"] == rows and metrics["test"]["temperature"] == metrics["temperature"]
    assert sum(map(sum, metrics["test"]["confusion_matrix"]["matrix"])) == rows
    for key in ("test_macro_f1", "test_accuracy", "test_loss", "test_nll_calibrated", "test_ece_calibrated"):
        assert 0 <= metrics[key] < 10, key
    cm = np.asarray(metrics["test"]["confusion_matrix"]["matrix"])  # the scores are those of that matrix
    assert metrics["test_accuracy"] == pytest.approx(np.trace(cm) / rows)
    present = (cm.sum(0) + cm.sum(1)) > 0
    f1 = 2 * np.diag(cm) / np.maximum(cm.sum(0) + cm.sum(1), 1)
    assert metrics["test_macro_f1"] == pytest.approx(f1[present].mean())
    client, mlrun = only_run(run_dir)
    assert len(client.get_metric_history(mlrun.info.run_id, "test_macro_f1")) == 1  # scored once
    logged = {k: v for k, v in mlrun.data.metrics.items() if k.startswith(("test_", "calibrated.test_"))}
    assert logged == pytest.approx(
        {  # MLflow names: the calibrated ones under calibrated.* (docs/mlflow.md)
            f"calibrated.{k.removesuffix('_calibrated')}" if k.endswith("_calibrated") else k: v
            for k, v in metrics.items()
            if k.startswith("test_")
        }
    )
    contexts = {tag.value for d in mlrun.inputs.dataset_inputs for tag in d.tags if tag.key == "mlflow.data.context"}
    assert contexts == {"train", "val", "test"}
    report = (run_dir / "report.md").read_text()
    assert "| metric | model | test | gate | status |" in report and "| test_file |" in report
    assert f"test_macro_f1 = {metrics['test_macro_f1']:.4f} on {rows} rows" in report


@pytest.mark.slow  # a second run
def test_the_test_split_never_influences_training_calibration_or_choice(with_test, data_args, tmp_path):
    """The adversarial test file changes nothing but the test_* numbers: same evaluations, best step,
    temperature, val metrics and weights as the same run without it."""
    without = run_in_process(tmp_path, *data_args)
    a, b = (read_json(d / "training_summary.json") for d in (with_test, without))
    assert untimed(a["history"]) == untimed(b["history"]) and untimed(a["val_checks"]) == untimed(b["val_checks"])
    assert (a["best_epoch"], a["best_step"], a["objective"]) == (b["best_epoch"], b["best_step"], b["objective"])
    ma, mb = (read_json(d / "metrics.json") for d in (with_test, without))
    assert ma["temperature"] == mb["temperature"]
    assert {k: v for k, v in ma.items() if k.startswith("val_")} == {
        k: v for k, v in mb.items() if k.startswith("val_")
    }
    assert not any(k.startswith("test") for k in mb)
    files = sorted(p.relative_to(with_test) for p in (with_test / "checkpoint_best").rglob("*.safetensors"))
    assert files  # the adapter (LoRA) or the whole model (full fine-tuning)
    for name in files:
        wa, wb = load_file(with_test / name), load_file(without / name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_console_summary_shows_the_test_column_and_where_the_best_evaluation_was():
    summary = run_result(
        best_epoch=2,
        best_step=20,
        epochs_run=1,
        stop_reason="max_steps: 25 optimizer steps",
        history=[{"epoch": 1, "step": 15}],
        objective_key="val_macro_f1",
        objective=0.5,
        metrics={"val_macro_f1": 0.5, "test_macro_f1": 0.25, "test": {"rows": 7}, "gates": {}},
    )
    console = Console(width=200, record=True)
    print_summary(summary, console)
    text = " ".join(console.export_text().split())  # the title wraps at the table's width
    assert "best step 20 in epoch 2 of 1 epochs — max_steps: 25 optimizer steps" in text
    assert "test (7 rows)" in text and "0.2500" in text and "test_macro_f1" not in text  # a column, not a row
    assert "(step 20 in epoch 2, 1 epochs)" in run_line(summary)


def train_py(data_dir, run_dir, *extra):
    """``python train.py`` with LoRA (its dropout draws from the RNG) and a val check every 6 steps."""
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "data=jsonl",
        f"data.train_file={data_dir}/train.jsonl",
        f"data.val_file={data_dir}/val.jsonl",
        "data.cache_dir=null",
        "model.tokenizer_vocab_size=300",
        "lora=default",
        "trainer.max_epochs=2",
        "trainer.val_check_interval=6",
        "trainer.max_steps=22",
        "trainer.early_stopping.patience=100",  # it ends at max_steps, whatever it learns
        "baseline=none",
        "export.zip=false",
        f"hydra.run.dir={run_dir}",
        f"tracking.uri={new_store(run_dir.parent / 'mlflow.db')}",
        *extra,
    ]


@pytest.mark.slow
def test_sigkill_after_a_val_check_then_resume_auto_equals_the_uninterrupted_run(tmp_path):
    write_demo(tmp_path / "data", n_train=200, n_val=40)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LORALAB_ROOT": str(tmp_path), "OMP_NUM_THREADS": "1"}
    reference, run_dir = tmp_path / "ref" / "run", tmp_path / "killed" / "run"
    subprocess.run(train_py(tmp_path / "data", reference), check=True, capture_output=True, env=env)
    proc = subprocess.Popen(
        train_py(tmp_path / "data", run_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    last = run_dir / "checkpoints" / "last" / "trainer_state.pt"
    while not last.exists() and proc.poll() is None:  # the first `last` is the first val check's (step 6)
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    loop = read_meta(run_dir / "checkpoints" / "last")["loop"]
    assert loop["batches_done"] > 0 and loop["checks"], loop  # killed inside an epoch, after a val check
    subprocess.run([*train_py(tmp_path / "data", run_dir), "resume=auto"], check=True, capture_output=True, env=env)
    a, b = (read_json(d / "training_summary.json") for d in (reference, run_dir))
    assert untimed(a["val_checks"]) == untimed(b["val_checks"]) and untimed(a["history"]) == untimed(b["history"])
    assert (a["best_step"], a["stop_reason"], a["optimizer_steps"]) == (b["best_step"], b["stop_reason"], 22)
    wa, wb = (load_file(d / "checkpoints" / "last" / "weights.safetensors") for d in (reference, run_dir))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    client, mlrun = only_run(run_dir.parent)
    steps = [m.step for m in client.get_metric_history(mlrun.info.run_id, "step.val_loss")]
    assert sorted(set(steps)) == sorted(h["step"] for h in [*b["history"], *b["val_checks"]])
    assert mlrun.info.status == "FINISHED"


@pytest.mark.slow
def test_article_regression_scores_its_test_split_once(tmp_path):
    """The text regression task takes ``data.test_file`` too: ``test_*`` next to ``best.val_*``."""
    train, val, _ = write_article_demo(tmp_path / "data", n_train=48, n_val=16)
    test = write_jsonl(
        tmp_path / "test.jsonl",
        [{**json.loads(line), "id": f"t-{i}"} for i, line in enumerate(val.read_text().splitlines())],
    )
    cfg = compose_train(
        "experiment=article_regression",
        "data.demo=false",
        f"data.train_file={train}",
        f"data.val_file={val}",
        f"data.test_file={test}",
        "model.tokenizer_vocab_size=300",
        "model.max_length=64",
        "trainer.max_epochs=1",
        "trainer.max_steps=2",
        "export.zip=false",
        "quiet=true",
        f"tracking.uri={new_store(tmp_path / 'mlflow.db')}",
    )
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
    run(cfg)
    metrics = read_json(tmp_path / "run" / "metrics.json")
    assert metrics["test_rows"] == 16 and metrics["test_mae"] > 0
    dims = read_json(tmp_path / "run" / "training_metadata.json")["target_names"]
    assert {f"test_mae_{d}" for d in dims} <= metrics.keys()
    # the test rows are the val rows: the final model scores them as the best evaluation did
    assert metrics["test_mae"] == pytest.approx(metrics["val_mae"], rel=1e-5)
    _, mlrun = only_run(tmp_path)
    assert mlrun.data.metrics["test_mae"] == pytest.approx(metrics["test_mae"])
    assert read_json(tmp_path / "run" / "training_metadata.json")["data"]["test_file"]["ids_in_val"] == 0


@pytest.mark.parametrize(
    "override, message",
    [
        ("trainer.val_check_interval=0", "trainer.val_check_interval=0: must be auto, an int >= 1 or null"),
        ("trainer.max_steps=-5", "trainer.max_steps=-5: must be >= 1 or null"),
        ("trainer.log_every_n_steps=0", "trainer.log_every_n_steps=0: must be >= 1 or null"),
        ("data.test_file=/no/such/test.jsonl", "data.test_file='/no/such/test.jsonl': file not found"),
    ],
)
def test_bad_step_and_test_split_values_fail_in_one_line(override, message):
    with pytest.raises(ConfigError) as err:
        check(compose_train(override))
    assert str(err.value) == message
