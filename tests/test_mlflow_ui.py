"""A sweep as the MLflow UI shows it, checked through a real ``mlflow server``'s REST API (what the UI reads): the
experiment's kind, run names, parent/child links, source/version tags, dataset inputs, the parent's description and
summary, the objective per epoch. ``docs/screenshots.py`` shows the same pages in a browser.

One small sweep for the module (tiny model, 2 × 2 grid, 2 epochs, two jobs at a time in joblib worker processes)
in a fresh git repo, so the commit is known; the same sweep pins the parallel launcher end to end.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import urllib.parse
import urllib.request
from itertools import product

import pytest
from mlflow.tracking import MlflowClient
from omegaconf import OmegaConf
from test_sweeps import demo_files, run_train, store, summary_csv, sweep_result  # noqa: F401 (fixtures, helpers)

from loralab.reporting.runs import run_row, search
from loralab.tracking.mlflow import EXPERIMENT_KIND_TAG, NOTE_TAG, TRAINING_KIND, MLflowTracker
from loralab.tracking.server import mlflow_server
from loralab.tracking.sweep import job_name, name_uniquely, read_parent, short_keys, sweep_name, swept_keys

NAMES = {"gamma=1.0 r=4", "gamma=1.0 r=8", "gamma=2.0 r=4", "gamma=2.0 r=8"}


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, demo_files, store):  # noqa: F811
    """(sweep dir, git commit of the launching dir, the finished ``train.py -m`` process): the gamma × rank grid,
    two jobs at a time (``hydra/launcher=local_parallel``), run from a fresh git repo."""
    tmp = tmp_path_factory.mktemp("ui_sweep")
    git = ["git", "-C", str(tmp), "-c", "user.name=t", "-c", "user.email=t@example.com"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], check=True, capture_output=True, text=True).stdout.strip()
    proc = run_train(
        tmp,
        demo_files,
        store,
        "hydra/launcher=local_parallel",
        "hydra.launcher.n_jobs=2",
        "lora=default",
        "loss.gamma=1.0,2.0",
        "lora.r=4,8",
        "trainer.max_epochs=2",
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return tmp / "multirun", commit, proc


@pytest.fixture(scope="module")
def server(store, tmp_path_factory):  # noqa: F811
    with mlflow_server(store, tmp_path_factory.mktemp("server")) as url:
        yield url


def rest(url: str, endpoint: str, body: dict | None = None, **query) -> dict:
    """GET (query) or POST (body) on the server's REST API, as the UI calls it."""
    address = f"{url}/api/2.0/mlflow/{endpoint}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(address, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def tags(run: dict) -> dict[str, str]:
    return {t["key"]: t["value"] for t in run["data"].get("tags", [])}


def metrics(run: dict) -> dict[str, float]:
    return {m["key"]: m["value"] for m in run["data"].get("metrics", [])}


@pytest.fixture(scope="module")
def runs(sweep, server):
    """(experiment, parent run, child runs) as the server returns them."""
    record = read_parent(sweep[0])
    experiment = rest(server, "experiments/get-by-name", experiment_name=record["experiment"])["experiment"]
    found = rest(server, "runs/search", {"experiment_ids": [experiment["experiment_id"]], "max_results": 100})
    by_id = {r["info"]["run_id"]: r for r in found["runs"]}
    parent = by_id.pop(record["run_id"])
    return experiment, parent, list(by_id.values())


# --- the sweep as it ran ------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_grid_in_parallel_processes_gives_one_parent_four_children(sweep, tmp_path):
    sweep_dir, _, proc = sweep
    client, parent_id, children = sweep_result(sweep_dir.parent, proc)
    assert "database is locked" not in proc.stdout + proc.stderr

    parent = client.get_run(parent_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["hydra.launcher"].endswith("JoblibLauncher")
    assert len(children) == 4 and {c.info.status for c in children} == {"FINISHED"}
    assert sorted((c.data.params["loss.gamma"], c.data.params["lora.r"]) for c in children) == sorted(
        product(["1.0", "2.0"], ["4", "8"])
    )
    assert sorted(c.data.tags["hydra.job.num"] for c in children) == ["0", "1", "2", "3"]
    assert {c.info.run_name for c in children} == {f"gamma={g} r={r}" for g, r in product(["1.0", "2.0"], [4, 8])}
    assert parent.info.run_name == "gamma×r sweep, 4 jobs"
    assert all("loss.gamma=" in c.data.tags["hydra.overrides"] for c in children)
    # The jobs ran in two joblib worker processes (each child run says which: its `process` tag), not one after
    # another in the launching one; concurrent writers on one SQLite store are pinned in test_tracking.py.
    launched = OmegaConf.load(sweep_dir / "0" / ".hydra" / "hydra.yaml").hydra.launcher
    assert launched._target_.endswith("JoblibLauncher") and launched.n_jobs == 2
    assert len({c.data.tags["process"] for c in children}) == 2

    artifacts = {a.path for a in client.list_artifacts(parent_id, "summary")}
    assert artifacts == {f"summary/sweep_summary.{ext}" for ext in ("csv", "md")} | {
        "summary/sweep_summary_heatmap.png"
    }
    rows = summary_csv(client, parent_id, tmp_path)
    best = {c.info.run_id: c.data.metrics["best.val_macro_f1"] for c in children}
    assert {r["run_id"]: float(r["objective"]) for r in rows} == pytest.approx(best)
    assert [float(r["objective"]) for r in rows] == sorted(best.values(), reverse=True)
    assert {k for k in rows[0] if k.startswith("f1_")} == {"f1_long", "f1_short", "f1_skip"}
    assert parent.data.metrics["best.val_macro_f1"] == pytest.approx(max(best.values()))


# --- the sweep through the REST API --------------------------------------------------------------------------------


@pytest.mark.slow
def test_experiment_is_marked_as_model_training(runs):
    experiment, _, _ = runs
    assert {t["key"]: t["value"] for t in experiment["tags"]}[EXPERIMENT_KIND_TAG] == TRAINING_KIND


@pytest.mark.slow
def test_children_are_named_by_their_swept_values_and_linked_to_the_parent(runs):
    _, parent, children = runs
    assert {c["info"]["run_name"] for c in children} == NAMES  # lora=default is the same for all: not in the names
    assert {tags(c)["mlflow.parentRunId"] for c in children} == {parent["info"]["run_id"]}
    assert {tags(c)["mlflow.runName"] for c in children} == NAMES
    assert {tags(c)["loralab.role"] for c in children} == {"sweep_job"}


@pytest.mark.slow
def test_parent_is_named_by_the_sweep_and_describes_the_best_child(runs, server):
    experiment, parent, children = runs
    assert parent["info"]["run_name"] == "gamma×r sweep, 4 jobs"
    top = max(metrics(c)["best.objective"] for c in children)  # a tie goes to the lowest job number
    best = min(
        (c for c in children if metrics(c)["best.objective"] == top), key=lambda c: int(tags(c)["hydra.job.num"])
    )
    assert metrics(parent)["best.objective"] == pytest.approx(metrics(best)["best.objective"])
    assert metrics(parent)["best.val_macro_f1"] == pytest.approx(metrics(best)["best.val_macro_f1"])
    parent_id, exp_id = parent["info"]["run_id"], experiment["experiment_id"]
    assert tags(parent)["best_run_id"] == best["info"]["run_id"]
    note = tags(parent)[NOTE_TAG]
    assert f"[{best['info']['run_name']}](#/experiments/{exp_id}/runs/{best['info']['run_id']})" in note
    assert f"(#/experiments/{exp_id}/runs/{parent_id}/artifacts/summary/sweep_summary.md)" in note
    assert f"get-artifact?path=summary%2Fsweep_summary_heatmap.png&run_uuid={parent_id}" in note
    assert "| loss.gamma | lora.r |" in note
    listed = rest(server, "artifacts/list", run_id=parent_id, path="summary")["files"]
    assert {f["path"] for f in listed} == {f"summary/sweep_summary{s}" for s in (".csv", ".md", "_heatmap.png")}
    with urllib.request.urlopen(
        f"{server}/get-artifact?path=summary%2Fsweep_summary_heatmap.png&run_uuid={parent_id}", timeout=30
    ) as r:  # the note's image, as the UI loads it
        assert r.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_source_version_and_dataset_columns_are_filled(runs, sweep, demo_files):  # noqa: F811
    _, parent, children = runs
    commit = sweep[1]
    for run in [parent, *children]:
        t = tags(run)
        assert (t["mlflow.source.name"], t["mlflow.source.type"]) == ("train.py", "LOCAL")
        assert t["mlflow.source.git.commit"] == t["git_commit"] == commit
    for child in children:
        inputs = child["inputs"]["dataset_inputs"]
        contexts = {
            next(t["value"] for t in i["tags"] if t["key"] == "mlflow.data.context"): i["dataset"] for i in inputs
        }
        assert set(contexts) == {"train", "val"}
        for context, dataset in contexts.items():
            path = demo_files / f"{context}.jsonl"
            sha = hashlib.sha256(path.read_bytes()).hexdigest()
            assert dataset["name"] == path.name and dataset["digest"] == sha[:36]
            assert json.loads(dataset["source"]) == {"uri": str(path)}
            assert tags(child)[f"data.{context}_file.sha256"] == sha


@pytest.mark.slow
def test_objective_per_epoch_under_one_key_and_best_on_each_child(runs, server):
    _, _, children = runs
    for child in children:
        run_id = child["info"]["run_id"]
        history = rest(server, "metrics/get-history", run_id=run_id, metric_key="objective")["metrics"]
        monitored = rest(server, "metrics/get-history", run_id=run_id, metric_key="val_macro_f1")["metrics"]
        assert [(m["step"], m["value"]) for m in history] == [(m["step"], m["value"]) for m in monitored]
        assert len(history) == 2
        assert metrics(child)["best.objective"] == pytest.approx(metrics(child)["best.val_macro_f1"])
        assert max(m["value"] for m in history) == pytest.approx(metrics(child)["best.objective"])


# --- naming and the experiment kind (no training) ------------------------------------------------------------------


def test_names_from_the_swept_keys():
    swept = swept_keys(
        [
            "data=jsonl",
            "lora=default",
            "loss.gamma=1.0,1.5",
            "lora.r=range(8,33,8)",
            "optim.lr=tag(log, interval(1e-5, 1e-3))",
        ]
    )
    assert swept == ["loss.gamma", "lora.r", "optim.lr"]
    assert swept_keys(["a=[unclosed"]) is None
    assert (
        job_name(["lora=default", "loss.gamma=1.5", "lora.r=16", "optim.lr=0.000123456789"], swept, 3)
        == "gamma=1.5 r=16 lr=0.0001235"
    )
    assert job_name(["+a.lr=1", "b.lr=2"], None, 0) == "a.lr=1 b.lr=2"  # same last segment: whole keys
    assert job_name(["data=jsonl"], [], 5) == "job5"
    assert len(job_name([f"k{i}.x{i}=" + "9" * 40 for i in range(20)], None, 0)) <= 250
    assert short_keys(["loss.gamma", "lora.r"]) == {"loss.gamma": "gamma", "lora.r": "r"}
    assert sweep_name(["loss.gamma", "lora.r"], 4) == "gamma×r sweep, 4 jobs"
    assert sweep_name(["loss.gamma"], 1) == "gamma sweep, 1 job"


def test_colliding_child_names_get_their_job_number(tmp_path, store):  # noqa: F811
    ids = [MLflowTracker(store, tmp_path.name, run_name=n).start({}) for n in ("lr=0.001", "lr=0.001", "lr=0.1")]
    rows = [{"run_id": i, "run_name": n, "job": j} for j, (i, n) in enumerate(zip(ids, ["lr=0.001"] * 2 + ["lr=0.1"]))]
    name_uniquely(MlflowClient(store), rows)
    names = [MlflowClient(store).get_run(i).info.run_name for i in ids]
    assert names == ["lr=0.001 (job 0)", "lr=0.001 (job 1)", "lr=0.1"]


def test_experiment_kind_is_set_once_and_a_users_kind_is_kept(tmp_path, store):  # noqa: F811
    client = MlflowClient(store)
    tracker = MLflowTracker(store, f"{tmp_path.name}-new", run_name="my-run")
    tracker.start({})
    assert client.get_run(tracker.run_id).info.run_name == "my-run"  # a single run keeps tracking.run_name
    assert client.get_experiment_by_name(f"{tmp_path.name}-new").tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    exp_id = client.create_experiment(f"{tmp_path.name}-user", tags={EXPERIMENT_KIND_TAG: "genai_development"})
    MLflowTracker(store, f"{tmp_path.name}-user").start({})
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == "genai_development"
    exp_id = client.create_experiment(f"{tmp_path.name}-old")  # made before loralab marked experiments
    MLflowTracker(store, f"{tmp_path.name}-old").start({})
    assert client.get_experiment(exp_id).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND


def test_rows_keep_the_run_name(tmp_path, store):  # noqa: F811
    tracker = MLflowTracker(store, tmp_path.name, run_name="gamma=1.5 r=16")
    tracker.start({})
    (record,) = search(store, [MlflowClient(store).get_run(tracker.run_id).info.experiment_id])
    assert run_row(record)["run_name"] == "gamma=1.5 r=16"


def test_dataset_inputs_for_any_task_from_the_files_that_exist(tmp_path, store):  # noqa: F811
    from loralab.recipe import dataset_inputs
    from loralab.reporting.provenance import provenance

    train = tmp_path / "train.h5"  # a regression task's HDF5 file: any data file is a dataset input
    train.write_bytes(b"\x89HDF\r\n\x1a\n" + bytes(100))
    files = {"train_file": str(train), "val_file": str(tmp_path / "missing.h5")}
    inputs = dataset_inputs(files, provenance(tmp_path, files))
    sha = hashlib.sha256(train.read_bytes()).hexdigest()
    assert inputs == {"train": (str(train), sha)}
    tracker = MLflowTracker(store, tmp_path.name)
    tracker.start({})
    tracker.log_datasets(inputs)
    tracker.log_datasets(inputs)  # again (a resumed run): still one input
    (logged,) = MlflowClient(store).get_run(tracker.run_id).inputs.dataset_inputs
    assert (logged.dataset.name, logged.dataset.digest) == ("train.h5", sha[:36])
    assert {t.key: t.value for t in logged.tags} == {"mlflow.data.context": "train", "loralab.sha256": sha}
