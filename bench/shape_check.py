"""The Qwen2.5-0.5B shape end to end on the CPU: train (LoRA, bf16, a few steps), export, predict, MLflow pyfunc;
the preflight's memory estimate next to the training process's measured peak RSS.

    python bench/shape_check.py [--rows 300] [--steps 4] [--out bench/results/shape_check.json] [overrides ...]

Random weights (``model.pretrained=false``): no hub. The tokenizer is then trained on the run's own texts
(``model.tokenizer_vocab_size``, 8192 for the Qwen shapes) while the embedding keeps the shipped config's 151,936
rows, so the parameter count (494M) and the memory are the real model's; the trained tokenizer's ids fit inside it.
A few minutes on a laptop-class CPU; numbers in docs/hardware.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GIB = 2**30


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=300, help="training records (val: a fifth of it)")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps (trainer.max_steps)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "shape_check.json")
    args, overrides = parser.parse_known_args()

    import mlflow
    import pandas as pd
    from hydra import compose, initialize_config_dir

    from loralab import config
    from loralab.data.demo import write_demo
    from loralab.inference import predict_file
    from loralab.models.memory import check_memory
    from loralab.paths import conf_dir

    work = Path(tempfile.mkdtemp(prefix="loralab-shape-"))
    train_file, val_file = write_demo(work / "data", n_train=args.rows, n_val=args.rows // 5)
    run_dir, tracking = work / "run", f"sqlite:///{work}/mlflow.db"
    train_overrides = [
        "model=qwen2_5_0_5b",
        "model.pretrained=false",
        "lora=default",
        "hardware=cpu",
        "hardware.precision=bf16",
        "model.max_length=64",
        "data=jsonl",
        f"data.train_file={train_file}",
        f"data.val_file={val_file}",
        "pretrain=none",
        "baseline=none",
        "optim.batch_size=8",
        "trainer.max_epochs=1",
        f"trainer.max_steps={args.steps}",
        "trainer.eval_batch_size=16",
        "quiet=true",
        # a random base exists only in the run dir: the zip and the MLflow model must carry merged/ (1.9 GB fp32);
        # export.zip_parts=auto keeps the adapter alone at this size, which cannot load without its base
        "export.zip_parts=[merged,loralab.json]",
        "export.max_size_mb=4000",
        f"tracking.uri={tracking}",
        *overrides,
    ]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*train_overrides, f"paths.output_dir={run_dir}"])
    cfg = config.resolve_hardware(config.check(cfg))[0]
    est = check_memory(cfg.model, cfg.lora, cfg.hardware, num_labels=3, batch_size=cfg.optim.batch_size, mode="off")

    cmd = [sys.executable, str(ROOT / "train.py"), *train_overrides, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "LORALAB_ROOT": str(work)}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=work, capture_output=True, text=True)
    train_s = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"training failed:\n{(proc.stdout + proc.stderr)[-3000:]}")
    peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024 / GIB  # Linux: KiB; the largest child
    summary = json.loads((run_dir / "training_summary.json").read_text())
    meta = json.loads((run_dir / "loralab.json").read_text())

    t0 = time.perf_counter()
    print(f"trained: peak RSS {peak_rss:.2f} GiB, estimate {est.describe()}, {train_s:.0f} s", flush=True)
    stats = predict_file(run_dir, val_file, work / "pred.jsonl", device="cpu")
    predict_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    mlflow.set_tracking_uri(tracking)
    client = mlflow.MlflowClient(tracking)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    rows = [json.loads(line) for line in val_file.read_text().splitlines()[:8]]
    scored = model.predict(pd.DataFrame([{"id": r["id"], "features": r["features"]} for r in rows]))
    pyfunc_s = time.perf_counter() - t0
    preds = [json.loads(line) for line in (work / "pred.jsonl").read_text().splitlines()[:8]]

    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})",
        "command": "python bench/shape_check.py " + " ".join(sys.argv[1:]),
        "train_command": "python train.py " + " ".join(o for o in train_overrides if not o.startswith("tracking")),
        "total_params": est.total_params,
        "trainable_params": est.trainable_params,
        "tokenizer_vocab": len(json.loads((run_dir / "merged" / "tokenizer.json").read_text())["model"]["vocab"]),
        "mlflow_run_status": run.info.status,
        "preflight_estimate_gib": round(est.total_gib, 3),
        "preflight_estimate": est.describe(),
        "measured_peak_rss_gib": round(peak_rss, 3),
        "train_process_s": round(train_s, 1),
        "optimizer_steps": summary["optimizer_steps"],
        "train_samples_per_s": summary["train_samples_per_s"],
        "export_verification": meta["verification"],
        "export_parts": meta["parts"],
        "predict_rows": stats["rows_kept"],
        "predict_s": round(predict_s, 1),
        "pyfunc_rows": len(scored),
        "pyfunc_s": round(pyfunc_s, 1),
        "pyfunc_matches_predict": list(scored["label"]) == [p["label"] for p in preds],
    }
    print(json.dumps(result, indent=2))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
