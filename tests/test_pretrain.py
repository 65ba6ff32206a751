"""The pretrain stage (``conf/pretrain``): the cache (miss, hit, another setting, two jobs at once), the card's sweep
running LoRA in every job, an export of LoRA over a pretrained base reloading with stock transformers + peft, resume
across the stage, and a cache entry that does not match its manifest. Whether the stage pays off on a data set is a
measurement, not a test: ``bench/pretrain_vs_random.py`` (numbers in docs/performance.md)."""

from __future__ import annotations

import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT, compose_train, new_store, typed_conf
from hydra.utils import instantiate
from mlflow.tracking import MlflowClient
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed

from loralab.archive import safe_extract
from loralab.config import check
from loralab.data.demo import write_demo
from loralab.data.records import load_records
from loralab.data.text import serialize
from loralab.pretrain import CausalLMPretrain
from loralab.tracking.mlflow import MLflowTracker

LABELS = ["long", "short", "skip"]


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("pretrain_data")
    write_demo(out, n_train=80, n_val=30)
    return out


def texts_of(path: Path) -> list[str]:
    return [serialize(r.features) for r in load_records(path, LABELS)[0]]


def stage_and_inputs(demo: Path, cache: Path, *overrides: str):
    """The ``clm`` stage as the run's config builds it, the tiny random source and its tokenizer."""
    conf = typed_conf(
        "pretrain=clm",
        "pretrain.epochs=1",
        f"pretrain.cache_dir={cache}",
        "model.tokenizer_vocab_size=300",
        "model.max_length=64",
        *overrides,
    )
    source = instantiate(conf.model)
    tokenizer = source.load_tokenizer(texts_of(demo / "train.jsonl"))
    return conf.pretrain.stage(), source, tokenizer, conf.hardware


def pretrain_once(stage, source, tokenizer, hardware, texts, uri: str):
    """One run's pass through the stage, tracked in its own MLflow run; returns (source, that run's id)."""
    tracker = MLflowTracker(uri, "pretrain")
    tracker.start({})
    try:
        out = stage.base(
            source,
            tokenizer,
            lambda splits, extra: list(texts),
            seed=0,
            device=torch.device("cpu"),
            hardware=hardware,
            tracker=tracker,
            stop_requested=lambda: False,
            progress=False,
        )
    finally:
        tracker.end()
    return out, tracker.run_id


@pytest.mark.slow
def test_cache_miss_then_hit_then_another_setting_misses(demo, tmp_path, caplog):
    uri, cache = new_store(tmp_path / "mlflow.db"), tmp_path / "cache"
    stage, source, tokenizer, hardware = stage_and_inputs(demo, cache)
    assert isinstance(stage, CausalLMPretrain)
    texts = texts_of(demo / "train.jsonl")
    client = MlflowClient(uri)

    first, run1 = pretrain_once(stage, source, tokenizer, hardware, texts, uri)
    base = Path(first.path)
    assert first.pretrained and first.pretrain_key and base.name == f"tiny_qwen2-{first.pretrain_key}"
    assert first.local_base and source.local_base  # an export must carry a base pretrained here, like a random one
    assert {p.name for p in base.iterdir()} >= {
        "model.safetensors",
        "config.json",
        "tokenizer.json",
        "loralab_checkpoint.json",
    }
    assert not list(cache.glob("*.partial"))  # the work dir is gone once the base is saved
    tags = client.get_run(run1).data.tags
    assert tags["pretrain.cache_hit"] == "False" and tags["pretrain.cache_key"] == first.pretrain_key
    assert len(client.get_metric_history(run1, "pretrain.lm_loss")) == 1  # one epoch, logged as it ran

    mtime = (base / "model.safetensors").stat().st_mtime_ns
    caplog.clear()
    with caplog.at_level(logging.INFO):
        second, run2 = pretrain_once(stage, source, tokenizer, hardware, texts, uri)
    assert second == first
    assert (base / "model.safetensors").stat().st_mtime_ns == mtime  # not rewritten
    assert not [r for r in caplog.records if r.name == "loralab.core.trainer"]  # no training step, no epoch
    assert any("cache hit" in r.getMessage() for r in caplog.records)
    tags = client.get_run(run2).data.tags
    assert tags["pretrain.cache_hit"] == "True" and tags["pretrain.cache_key"] == first.pretrain_key
    assert client.get_run(run2).data.metrics["pretrain.lm_loss"] == pytest.approx(
        json.loads((base / "loralab_checkpoint.json").read_text())["history"][-1]["train_loss"]
    )  # the curve, from the cache

    other, _ = pretrain_once(*stage_and_inputs(demo, cache, "pretrain.lr=5e-4"), texts, uri)
    assert other.pretrain_key != first.pretrain_key and Path(other.path).is_dir()
    fewer, _ = pretrain_once(stage, source, tokenizer, hardware, texts[:-1], uri)  # other texts: another base
    assert fewer.pretrain_key not in (first.pretrain_key, other.pretrain_key)


@pytest.mark.slow
def test_a_cached_base_that_does_not_match_its_manifest_is_never_used(demo, tmp_path, caplog):
    """A cache outlives runs and may be shared: an altered weight (same size, finite values) or an unreadable
    ``loralab_checkpoint.json`` is caught on the hit, set aside under a name that says so, and the base is trained
    again, to the same weights (the key fixes every input)."""
    uri, cache = new_store(tmp_path / "mlflow.db"), tmp_path / "cache"
    stage, source, tokenizer, hardware = stage_and_inputs(demo, cache)
    texts = texts_of(demo / "train.jsonl")
    first, _ = pretrain_once(stage, source, tokenizer, hardware, texts, uri)
    base = Path(first.path)
    original = {k: v.clone() for k, v in load_file(base / "model.safetensors").items()}  # not a view of the file
    assert set(json.loads((base / "loralab_checkpoint.json").read_text())["files"]) >= {
        "model.safetensors",
        "tokenizer.json",
    }

    weights = bytearray((base / "model.safetensors").read_bytes())
    weights[-4:] = bytes(4)  # the last float of the last tensor: still finite, same size
    (base / "model.safetensors").write_bytes(bytes(weights))
    caplog.clear()
    with caplog.at_level(logging.INFO):
        again, run = pretrain_once(stage, source, tokenizer, hardware, texts, uri)
    (warning,) = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert f"{base} rejected: model.safetensors does not match its sha256" in warning
    assert MlflowClient(uri).get_run(run).data.tags["pretrain.cache_hit"] == "False"
    assert again == first and len(list(cache.glob(f"{base.name}.rejected-*"))) == 1
    rebuilt = load_file(base / "model.safetensors")
    assert all(torch.equal(original[k], rebuilt[k]) for k in original)

    (base / "loralab_checkpoint.json").write_text("{")
    caplog.clear()
    with caplog.at_level(logging.INFO):
        pretrain_once(stage, source, tokenizer, hardware, texts, uri)
    assert any("loralab_checkpoint.json is unreadable" in r.getMessage() for r in caplog.records)


@pytest.mark.slow
def test_pretraining_through_its_own_lora_saves_a_plain_merged_base(demo, tmp_path, caplog):
    """``pretrain.train=lora``: only adapters train (embeddings stay), and they are merged into the saved base, so the
    task loads it like any checkpoint."""
    stage, source, tokenizer, hardware = stage_and_inputs(
        demo, tmp_path / "cache", "pretrain.train=lora", "pretrain.lora.r=4"
    )
    set_seed(0)  # as the stage does before building the base
    random_lm = source.load_causal_lm(tokenizer)
    out, _ = pretrain_once(
        stage, source, tokenizer, hardware, texts_of(demo / "train.jsonl"), f"sqlite:///{tmp_path}/mlflow.db"
    )
    weights = load_file(Path(out.path) / "model.safetensors")
    assert not [k for k in weights if "lora" in k]
    assert torch.equal(weights["model.embed_tokens.weight"], random_lm.model.embed_tokens.weight.detach())  # frozen
    assert not torch.equal(
        weights["model.layers.0.self_attn.q_proj.weight"], random_lm.model.layers[0].self_attn.q_proj.weight.detach()
    )  # the adapter merged in
    model = AutoModelForSequenceClassification.from_pretrained(out.path, num_labels=3)
    assert model.config.num_labels == 3
    # Through loralab the always-new head is one INFO line, not transformers' WARNING table (a sweep's quiet line).
    caplog.clear()
    with caplog.at_level(logging.INFO):
        out.load_model(["a", "b", "c"], tokenizer)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    assert "classifier head ['score'] is new" in caplog.text


ASK_FOR_A_BASE = """
import logging, sys, torch
logging.basicConfig(level=logging.INFO)
sys.path.insert(0, sys.argv[3])
from test_pretrain import stage_and_inputs, texts_of
from pathlib import Path
from loralab.tracking.mlflow import MLflowTracker
stage, source, tokenizer, hardware = stage_and_inputs(Path(sys.argv[1]), Path(sys.argv[2]))
tracker = MLflowTracker("", "x", enabled=False)
stage.base(source, tokenizer, lambda s, e: texts_of(Path(sys.argv[1]) / "train.jsonl"), seed=0,
           device=torch.device("cpu"), hardware=hardware, tracker=tracker, stop_requested=lambda: False,
           progress=False)
"""


@pytest.mark.slow
def test_two_jobs_asking_at_once_pretrain_once(demo, tmp_path):
    """Two sweep jobs that need the same base: one trains it, the other waits on the lock and then loads it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", ASK_FOR_A_BASE, str(demo), str(tmp_path / "cache"), str(ROOT / "tests")],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-2000:] for o in outputs]
    said = sorted("cache hit" in o for o in outputs)
    assert said == [False, True], outputs
    assert len([d for d in (tmp_path / "cache").iterdir() if d.is_dir()]) == 1


def test_the_cards_sweep_composes_with_lora_on_in_every_job():
    """``python train.py -m loss.gamma=1.0,1.5,2.0 lora.r=8,16,32``: each job's config, as the sweeper builds it.
    The tiny model's ``lora=auto`` trains the adapters on sets under ``lora.full_from_rows`` rows (the demo's)."""
    for gamma, r in itertools.product(["1.0", "1.5", "2.0"], [8, 16, 32]):
        cfg = check(compose_train(f"loss.gamma={gamma}", f"lora.r={r}"))
        assert cfg.lora.enabled == "auto" and cfg.lora.r == r and cfg.loss.gamma == float(gamma)
        assert cfg.pretrain.name == "none" and cfg.model.name == "tiny_qwen2"
        assert check(compose_train("model=qwen2_5_0_5b", f"lora.r={r}")).lora.enabled is True  # a real model: LoRA
    assert check(compose_train("lora=none")).lora.enabled is False  # full fine-tuning is asked for by name


def train_cmd(demo: Path, *overrides: str, multirun: bool = False) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *(["-m"] if multirun else []),
        "data=jsonl",
        f"data.train_file={demo / 'train.jsonl'}",
        f"data.val_file={demo / 'val.jsonl'}",
        "trainer.max_epochs=1",
        "model.tokenizer_vocab_size=300",
        "model.max_length=64",
        "pretrain=clm",
        "pretrain.epochs=2",
        "baseline=none",
        "hardware.torch_threads=1",
        *overrides,
    ]


@pytest.fixture(scope="module")
def sweep_job(demo, tmp_path_factory) -> dict:
    """The card's sweep command cut to one job (``-m loss.gamma=1.0 lora.r=8``), run as typed, plus its store; its
    own empty pretrain cache, so the job must pretrain (a miss) whatever other tests cached before it."""
    tmp = tmp_path_factory.mktemp("sweep")
    uri = new_store(tmp / "mlflow.db")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "LORALAB_CACHE": str(tmp / "cache")}
    proc = subprocess.run(
        train_cmd(
            demo,
            f"tracking.uri={uri}",
            f"hydra.sweep.dir={tmp / 'multirun'}",
            "loss.gamma=1.0",
            "lora.r=8",
            multirun=True,
        ),
        cwd=tmp,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"uri": uri, "job_dir": tmp / "multirun" / "0", "tmp": tmp}


@pytest.mark.slow
def test_a_sweep_job_trains_lora_adapters_over_the_pretrained_base(sweep_job):
    client = MlflowClient(sweep_job["uri"])
    runs = client.search_runs(
        [client.get_experiment_by_name("loralab").experiment_id], filter_string="tags.`mlflow.parentRunId` != ''"
    )
    (child,) = [r for r in runs if "lora.r" in r.data.params]
    params, metrics, tags = child.data.params, child.data.metrics, child.data.tags
    assert child.info.status == "FINISHED"
    assert params["lora.enabled"] == "auto" and params["lora.r"] == "8" and params["pretrain.name"] == "clm"
    assert tags["resolved.lora.enabled"] == "True"  # the demo's rows are under lora.full_from_rows
    assert 0 < metrics["model.trainable_params"] < 0.1 * metrics["model.total_params"]  # adapters + head only
    assert tags["pretrain.cache_hit"] == "False" and len(tags["pretrain.cache_key"]) == 16
    base = Path(tags["pretrain.base_dir"])  # the base it fine-tuned over is the one it cached, under its key
    assert base.parent == sweep_job["tmp"] / "cache" / "pretrain"
    assert base.name.endswith(tags["pretrain.cache_key"])
    assert json.loads((base / "loralab_checkpoint.json").read_text())["key"] == tags["pretrain.cache_key"]
    assert [m.step for m in client.get_metric_history(child.info.run_id, "pretrain.lm_loss")] == [1, 2]


@pytest.mark.slow
def test_export_of_lora_over_a_pretrained_base_reloads_with_stock_libraries(sweep_job):
    """The zip carries the pretrained base (it exists on no hub): base/ + adapter/ (peft) and merged/ score alike,
    and base/ is the cached pretrained base, not a random one."""
    out = safe_extract(sweep_job["job_dir"] / "model_final.zip", sweep_job["tmp"] / "unzipped")
    meta = json.loads((out / "loralab.json").read_text())
    assert meta["parts"] == ["merged", "adapter", "base"] and meta["model"]["pretrain_key"]
    cached = sweep_job["tmp"] / "cache" / "pretrain" / f"tiny_qwen2-{meta['model']['pretrain_key']}"
    base_weights, pretrained = load_file(out / "base/model.safetensors"), load_file(cached / "model.safetensors")
    body = [k for k in base_weights if k.startswith("model.")]
    assert body and all(torch.equal(base_weights[k], pretrained[k]) for k in body)

    tokenizer = AutoTokenizer.from_pretrained(out / "merged")
    rows = load_records(meta["data"]["val_file"]["path"], LABELS)[0][:8]
    batch = tokenizer([serialize(r.features) for r in rows], padding=True, return_tensors="pt")
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged").eval()
    adapted = PeftModel.from_pretrained(
        AutoModelForSequenceClassification.from_pretrained(out / "base", **meta["base"]["label_config"]),
        out / "adapter",
    ).eval()
    with torch.no_grad():
        a, b = merged(**batch).logits, adapted(**batch).logits
    assert (a - b).abs().max() <= 1e-4 and a.std() > 0


def start_and_kill_when(cmd: list[str], ready, env) -> str:
    """Start a run and SIGKILL it as soon as ``ready()``; returns its console output."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    while not ready() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    return out


@pytest.mark.slow
def test_resume_across_the_stage_never_pretrains_twice(demo, tmp_path):
    """Killed while pretraining: ``resume=auto`` continues the pretraining from its last epoch. Killed right after
    it: ``resume=auto`` loads the cached base and goes straight to fine-tuning."""
    cache, run_dir = tmp_path / "cache", tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1", "LORALAB_CACHE": str(cache)}
    cmd = train_cmd(
        demo,
        f"hydra.run.dir={run_dir}",
        f"tracking.uri={new_store(tmp_path / 'mlflow.db')}",
        "pretrain.epochs=3",
        "export.zip=false",
    )

    def partial_last():
        return any(
            (p / "checkpoints/last/trainer_state.pt").exists()  # noqa: E731
            for p in (cache / "pretrain").glob("*.partial")
        )

    start_and_kill_when(cmd, partial_last, env)  # after pretraining epoch 1 of 3

    def done():
        return any(
            p.is_dir() and not p.name.endswith((".partial", ".tmp", ".lock"))  # noqa: E731
            for p in (cache / "pretrain").iterdir()
        )

    start_and_kill_when([*cmd, "resume=auto"], done, env)
    log = (run_dir / "train.log").read_text()
    assert "resuming the interrupted pretraining" in log
    assert "resumed at epoch 1" in log and "epoch 1: train_loss" in log.split("resuming the interrupted")[0]

    proc = subprocess.run([*cmd, "resume=auto"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    last_run = (run_dir / "train.log").read_text()[len(log) :]
    assert "cache hit" in last_run and "cache miss" not in last_run and "resuming the interrupted" not in last_run
