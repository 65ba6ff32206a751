"""Resume and fault tolerance: atomic checkpoints, exact resume after SIGKILL/SIGTERM, non-finite stops."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from conftest import assert_same_run, history, new_store, optim_conf, trainer_conf
from safetensors.torch import load_file

from loralab.core.checkpoint import CheckpointError, Checkpoints, load_weights, read_meta, save_train_state
from loralab.core.trainer import FitInputs, Trainer
from loralab.data.demo import write_demo
from loralab.data.regression_demo import write_article_demo, write_tabular_demo
from loralab.errors import NonFiniteLossError
from loralab.fs import atomic_dir, recover
from loralab.lifecycle import stop_on_signals

ROOT = Path(__file__).resolve().parents[1]


def test_atomic_dir_keeps_previous_version_when_writing_fails(tmp_path):
    final = tmp_path / "ckpt"
    with atomic_dir(final) as d:
        (d / "a.txt").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(final) as d:
            (d / "a.txt").write_text("v2-partial")
            raise RuntimeError("crash while writing")
    assert (final / "a.txt").read_text() == "v1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


WRITER = """
import sys, os
from loralab.fs import atomic_dir
final = sys.argv[1]
i = 0
while True:
    i += 1
    with atomic_dir(final) as d:
        payload = os.urandom(1 << 20)
        (d / "blob.bin").write_bytes(payload)
        (d / "size.txt").write_text(str(len(payload)) + ":" + str(i))
    if i == 1:
        print("saved", flush=True)
"""


@pytest.mark.slow
def test_sigkill_during_saves_never_leaves_a_half_written_checkpoint(tmp_path):
    """SIGKILL at several points of a writer's save loop, each after its first save finished (so there is always a
    checkpoint to check): what ``recover`` leaves is always one complete save, never a torn one."""
    final = tmp_path / "ckpt"
    versions = set()
    for delay in (0.0, 0.05, 0.1, 0.2):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER, str(final)],
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(ROOT / "src")},
        )
        assert proc.stdout.readline() == "saved\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        recover(final)
        size, version = (final / "size.txt").read_text().split(":")
        assert (final / "blob.bin").stat().st_size == int(size)
        versions.add(version)
    assert len(versions) > 1  # the kills landed at different points of the loop


def test_checkpoint_refuses_nan_weights_and_wrong_shapes(tmp_path):
    from transformers import PreTrainedTokenizerFast  # noqa: F401  (tokenizer only needs save_pretrained)

    class Tok:
        def save_pretrained(self, path):
            Path(path).mkdir(parents=True)

    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    parts = dict(
        model=model,
        tokenizer=Tok(),
        optimizer=opt,
        scheduler=sched,
        scaler=torch.amp.GradScaler("cpu", enabled=False),
        loop_state={},
        meta={},
    )
    save_train_state(tmp_path / "ok", **parts)
    with pytest.raises(CheckpointError, match="shape|does not fit"):
        load_weights(tmp_path / "ok", torch.nn.Linear(4, 2))
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match="NaN"):
        save_train_state(tmp_path / "bad", **parts)
    assert not (tmp_path / "bad").exists()


def tiny_trainer(max_epochs: int = 1, lr: float = 0.1) -> Trainer:
    return Trainer(
        trainer_conf(max_epochs, patience=1), optim_conf(lr=lr), precision="fp32", device=torch.device("cpu")
    )


def test_fit_stops_on_non_finite_loss(tmp_path):
    class Model(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)

        def forward(self, x):
            return type("Out", (), {"logits": self.lin(x) * float("nan")})()

    from torch.utils.data import DataLoader

    from loralab.core.sampler import EpochBatchSampler

    data = [{"x": torch.randn(2), "labels": torch.tensor(i % 2)} for i in range(40)]
    loader = DataLoader(data, batch_sampler=EpochBatchSampler([1] * 40, 4, 0, group_by_length=False))
    trainer = tiny_trainer()
    trainer.setup(
        FitInputs(Model(), torch.nn.CrossEntropyLoss(), loader, loader, metric_fn=lambda y, p: {"acc": 0.0}),
        Checkpoints(tmp_path, keep=1, mode="max", meta={}),
    )
    with pytest.raises(NonFiniteLossError):
        trainer.fit()


# --- end to end through train.py ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("resume_data")
    write_demo(d, n_train=240, n_val=60)
    return d


def train_cmd(data_dir, run_dir, *extra):
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "data=jsonl",
        f"data.train_file={data_dir}/train.jsonl",
        f"data.val_file={data_dir}/val.jsonl",
        "trainer.max_epochs=3",
        "model.tokenizer_vocab_size=300",
        "export.zip=false",
        f"hydra.run.dir={run_dir}",
        f"tracking.uri={new_store(run_dir.parent / 'mlflow.db')}",
        *extra,
    ]


def start_and_signal(cmd, run_dir, sig):
    """Start a run and send ``sig`` as soon as the first epoch's `last` checkpoint exists."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    last = run_dir / "checkpoints" / "last" / "trainer_state.pt"
    while not last.exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=300)
    return proc.returncode, out


@pytest.fixture(scope="module")
def reference(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("ref") / "run"
    subprocess.run(train_cmd(data_dir, run_dir), check=True, capture_output=True)
    return run_dir


def regression_cmd(task: str, data_dir: Path, run_dir: Path) -> list[str]:
    """``python train.py experiment=...`` for the two regression tasks, on small demo files in ``data_dir``."""
    common = [
        f"hydra.run.dir={run_dir}",
        f"tracking.uri={new_store(run_dir.parent / 'mlflow.db')}",
        "data.demo=false",
        "export.zip=false",
    ]
    if task == "tabular_regression":
        train, val, schema = write_tabular_demo(data_dir / "t.h5", data_dir / "v.h5", data_dir / "s.txt", 2000, 300)
        return [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=marketsentinel",
            f"data.train_file={train}",
            f"data.val_file={val}",
            f"data.schema_file={schema}",
            "trainer.max_epochs=12",
            "trainer.early_stopping.patience=20",
            *common,
        ]
    train, val, _ = write_article_demo(data_dir, n_train=120, n_val=30)
    return [
        sys.executable,
        str(ROOT / "train.py"),
        "experiment=article_regression",
        f"data.train_file={train}",
        f"data.val_file={val}",
        "trainer.max_epochs=3",
        "model.tokenizer_vocab_size=300",
        "model.max_length=96",
        *common,
    ]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["tabular_regression", "text_regression"])
def test_every_task_resumes_exactly_after_sigkill(task, tmp_path):
    """The lifecycle, not the task, owns resume: SIGKILL mid-run, then ``resume=auto`` equals the uninterrupted
    run for the regression tasks too (classification: the tests below)."""
    data_dir = tmp_path / "data"
    reference_dir, run_dir = tmp_path / "ref" / "run", tmp_path / "killed" / "run"
    subprocess.run(regression_cmd(task, data_dir, reference_dir), check=True, capture_output=True)
    rc, out = start_and_signal(regression_cmd(task, data_dir, run_dir), run_dir, signal.SIGKILL)
    assert rc == -signal.SIGKILL, out[-2000:]
    epochs = len(history(reference_dir))
    assert read_meta(run_dir / "checkpoints" / "last")["loop"]["epoch"] < epochs
    proc = subprocess.run([*regression_cmd(task, data_dir, run_dir), "resume=auto"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_run(reference_dir, run_dir)
    client = mlflow.MlflowClient(f"sqlite:///{run_dir.parent}/mlflow.db")
    (run,) = client.search_runs(client.search_experiments()[0].experiment_id)
    assert run.info.status == "FINISHED"


@pytest.mark.slow
def test_sigkill_then_resume_auto_equals_uninterrupted_run(data_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    rc, _ = start_and_signal(train_cmd(data_dir, run_dir), run_dir, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    assert read_meta(run_dir / "checkpoints" / "last")["loop"]["epoch"] < 3
    subprocess.run(train_cmd(data_dir, run_dir, "resume=auto"), check=True, capture_output=True)
    assert_same_run(reference, run_dir)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    runs = client.search_runs(client.get_experiment_by_name("loralab").experiment_id)
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"  # continued, not duplicated
    assert [m.step for m in client.get_metric_history(runs[0].info.run_id, "val_macro_f1")] == [1, 2, 3]
    tags = runs[0].data.tags
    assert len(tags["data.train_file.sha256"]) == 64 and "git_commit" in tags and "host" in tags


@pytest.mark.slow
def test_sigterm_writes_last_marks_killed_and_resumes_exactly(data_dir, reference, tmp_path):
    run_dir = tmp_path / "run"
    rc, out = start_and_signal(train_cmd(data_dir, run_dir), run_dir, signal.SIGTERM)
    assert rc == 130, out
    loop = read_meta(run_dir / "checkpoints" / "last")["loop"]
    assert loop["batches_done"] > 0, loop  # stopped inside an epoch: the resume below is a mid-epoch one
    assert "resume=auto" in out and f"hydra.run.dir={run_dir}" in out
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("loralab").experiment_id)
    assert run.info.status == "KILLED"
    subprocess.run(train_cmd(data_dir, run_dir, "resume=auto"), check=True, capture_output=True)
    assert_same_run(reference, run_dir)
    assert client.get_run(run.info.run_id).info.status == "FINISHED"


def _delivered(sig: int, flag) -> None:
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + 5
    while not flag() and time.monotonic() < deadline:  # Python runs the handler between bytecodes
        time.sleep(0.01)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_asks_to_stop_and_a_second_ctrl_c_aborts_at_once(sig):
    previous = signal.getsignal(sig)
    with stop_on_signals() as stop_requested:
        assert not stop_requested()
        _delivered(sig, stop_requested)
        assert stop_requested()  # the trainer stops after its current step, writes `last`: no exception here
        if sig == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):  # the second Ctrl-C does not wait for the step
                _delivered(sig, lambda: False)
        else:
            _delivered(sig, lambda: True)  # a repeated SIGTERM just asks again
    assert signal.getsignal(sig) is previous  # handlers restored after the run


@pytest.mark.slow
def test_non_finite_training_fails_the_run_with_reason(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        train_cmd(data_dir, run_dir, "optim.lr=1e30", "optim.max_grad_norm=null", "trainer.max_epochs=1"),
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 3, proc.stderr[-2000:]
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("loralab").experiment_id)
    assert run.info.status == "FAILED" and "NonFinite" in run.data.tags["error"]


@pytest.mark.slow
def test_resume_from_another_runs_checkpoint_replays_it_exactly(data_dir, reference, tmp_path):
    """resume=<path>: the other run's ranked epochs come along (the best one is reloaded at the end), and a
    checkpoint whose MLflow run is not in this store starts a new run instead of failing."""
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        train_cmd(data_dir, run_dir, f"resume={reference}/checkpoints/epoch_001"), capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert_same_run(reference, run_dir)
    assert (run_dir / "checkpoints" / "epoch_001").is_dir()
    # The best evaluation, reloaded at the end from the ranked epochs it brought along, is the reference's: the
    # same epoch and scores, and the exported (merged) weights identical.
    ref_metrics, metrics = (json.loads((d / "metrics.json").read_text()) for d in (reference, run_dir))
    assert (metrics["best_epoch"], metrics["val_macro_f1"]) == (ref_metrics["best_epoch"], ref_metrics["val_macro_f1"])
    wa, wb = (load_file(d / "merged" / "model.safetensors") for d in (reference, run_dir))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    (run,) = client.search_runs(client.get_experiment_by_name("loralab").experiment_id)
    assert run.info.status == "FINISHED"
