"""The checks CI cannot run, as one command for one CUDA machine (H100/H200, about 6-8 minutes), with a JSON and a
markdown report; ``--dry`` runs every one of them at tiny shapes on the CPU in seconds (tests/test_device_check.py),
so the command does not rot between GPU runs.

    python bench/device_check.py --out DIR          # CUDA: the numbers docs/hardware.md asks for
    python bench/device_check.py --dry --out DIR    # CPU: the same code paths, tiny shapes, no goals judged

Sections (each: ok | fail | skipped, its numbers and its seconds):

- ``rtx3050``: ``hardware=rtx3050`` under a 4 GiB cap (``torch.cuda.set_per_process_memory_fraction``), the
  Qwen2.5-0.5B shape (random weights) at max_length 256 on records that fill it, two short epochs with export: peak
  allocated vs the preflight's estimate (goal: peak <= 3.5 GiB, estimate within 25% of it).
- ``rtx3050_1_5b``: Qwen2.5-1.5B with the same settings: the preflight's verdict, then a short run under the cap
  that fits (peak) or is refused (the allocator's message).
- ``reload``: the 0.5B run's merged/ and base/ + adapter/ reloaded with stock transformers/peft on the device give
  the same logits.
- ``sigkill_resume``: the 0.5B run again, SIGKILLed after its first epoch and resumed (``resume=auto``): equal to the
  uninterrupted run (evaluations and weights).
- ``torchrun``: ``torchrun --nproc_per_node=1 train.py`` ends FINISHED in MLflow; a one-rank nccl process group
  all-reduces (``torchrun`` with one process starts no process group: loralab.core.distributed).
- ``throughput_*``: ``bench/throughput.py`` loralab vs HF Trainer + peft, 0.5B and 1.5B shapes, ``hardware=h100``
  (bf16), same data, batch and schedule: samples/s and MFU for both.
- ``qlora``: when bitsandbytes is importable, ``hardware.load_in_4bit=true`` trains and exports a local base.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import traceback
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

GIB = 2**30
CAP_GIB = 4.0  # the RTX 3050's memory
PEAK_GOAL_GIB = 3.5
ESTIMATE_TOLERANCE = 0.25


class Plan:
    """What a mode runs: real shapes on CUDA, tiny ones on the CPU (same code paths, same sections)."""

    def __init__(self, dry: bool, work: Path):
        self.dry, self.work = dry, work
        self.small = "tiny_qwen2" if dry else "qwen2_5_0_5b"
        self.large = "qwen2_5_1_5b"  # dry: its preflight only (the meta device: nothing allocated)
        self.max_length = 64 if dry else 256
        self.rows = (32, 16) if dry else (128, 32)
        # the CPU stands in for the device: bf16 (fp16 is emulated there), one intra-op thread
        self.on_device = ["hardware.device=cpu", "hardware.precision=bf16", "hardware.torch_threads=1"] if dry else []
        self.throughput_rows = 32 if dry else 2048
        self.small_throughput = "qwen2_5_0_5b"  # the one throughput section a dry run runs (on tiny_qwen2)
        self.env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
            "LORALAB_ROOT": str(work),
            "LORALAB_CACHE": str(work / "cache"),
            "CUBLAS_WORKSPACE_CONFIG": ":4096:8",  # deterministic cuBLAS: exact resume on CUDA
            "PYTHONUNBUFFERED": "1",
            **({"OMP_NUM_THREADS": "1"} if dry else {}),
        }

    def run_overrides(self, model: str, run_dir: Path, data: Path) -> list[str]:
        """A short LoRA run of ``model`` on ``hardware=rtx3050`` (device-swapped in dry mode), random weights."""
        return [
            "hardware=rtx3050",
            *self.on_device,
            f"model={model}",
            "model.pretrained=false",
            f"model.max_length={self.max_length}",
            "model.tokenizer_vocab_size=" + ("300" if self.dry else "8192"),
            "lora=default",
            "serialize=json",
            "data=jsonl",
            f"data.train_file={data}/train.jsonl",
            f"data.val_file={data}/val.jsonl",
            "data.cache_dir=null",
            "data.oversample_to=null",
            "pretrain=none",
            "baseline=none",
            "calibration=none",
            "export.zip=false",
            "optim.batch_size=" + ("8" if self.dry else "16"),
            "trainer.max_epochs=2",
            "trainer.save_top_k=1",
            "quiet=true",
            f"hydra.run.dir={run_dir}",
            f"tracking.uri=sqlite:///{self.work}/mlflow.db",
        ]


def write_long_records(out: Path, n_train: int, n_val: int, n_features: int = 48) -> Path:
    """Records whose JSON text outruns max_length 256 (digits are one token each), so every row is truncated to
    max_length: the memory peak the preflight estimates is reached."""
    rnd = random.Random(7)
    out.mkdir(parents=True, exist_ok=True)
    for name, n, start in (("train", n_train, 0), ("val", n_val, n_train)):
        with (out / f"{name}.jsonl").open("w") as fh:
            for i in range(start, start + n):
                features = {f"f{j:02d}": round(rnd.uniform(-10, 10), 4) for j in range(n_features)}
                label = ["long", "short", "skip"][(features["f00"] > 0) + (features["f01"] > 3)]
                fh.write(json.dumps({"id": i, "features": features, "label": label}) + "\n")
    return out


def capped(cap_gib: float | None) -> list[str]:
    """``python`` that caps this process's CUDA memory to ``cap_gib`` before running ``train.py``."""
    if cap_gib is None:
        return [sys.executable, str(ROOT / "train.py")]
    code = (
        "import runpy, sys, torch; total = torch.cuda.get_device_properties(0).total_memory; "
        f"torch.cuda.set_per_process_memory_fraction({cap_gib * GIB} / total); "
        f"sys.argv = ['train.py'] + sys.argv[1:]; runpy.run_path({str(ROOT / 'train.py')!r}, run_name='__main__')"
    )
    return [sys.executable, "-c", code]


def run(cmd: list[str], plan: Plan, log: Path, timeout: float = 420) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, env=plan.env, cwd=plan.work, capture_output=True, text=True, timeout=timeout)
    log.write_text(proc.stdout + proc.stderr)
    return proc


def tail(text: str, lines: int = 6) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def summary(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / "training_summary.json").read_text())


def peak_gib(run_dir: Path) -> float | None:
    s = summary(run_dir)
    peaks = [h["peak_memory_gib"] for h in (*s["history"], *s["val_checks"]) if "peak_memory_gib" in h]
    return max(peaks) if peaks else None


def estimate(overrides: list[str]):
    """The preflight's estimate for a train.py command line (its ConfigError when it refuses)."""
    from hydra import compose, initialize_config_dir

    from loralab import config
    from loralab.models.memory import check_memory
    from loralab.paths import conf_dir

    keep = [o for o in overrides if not o.startswith("hydra.")]
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=[*keep, "paths.output_dir=unused"])
    cfg = config.resolve_hardware(config.check(cfg))[0]
    est = check_memory(cfg.model, cfg.lora, cfg.hardware, num_labels=3, batch_size=cfg.optim.batch_size, mode="off")
    return est, cfg.hardware.memory_gib


# ----------------------------------------------------------------------------------------------------- sections


def check_rtx3050(plan: Plan, ctx: dict) -> dict:
    data = write_long_records(plan.work / "long", *plan.rows)
    run_dir = plan.work / "rtx3050"
    overrides = plan.run_overrides(plan.small, run_dir, data)
    est, memory_gib = estimate(overrides)
    proc = run([*capped(None if plan.dry else CAP_GIB), *overrides], plan, plan.work / "rtx3050.log")
    if proc.returncode != 0:
        return {"status": "fail", "error": tail(proc.stdout + proc.stderr)}
    ctx.update(run_dir=run_dir, data=data, overrides=overrides)
    peak = peak_gib(run_dir)
    out: dict[str, Any] = {
        "status": "ok",
        "command": "python train.py " + " ".join(o for o in overrides if not o.startswith(("hydra.", "tracking."))),
        "cap_gib": None if plan.dry else CAP_GIB,
        "estimate_gib": round(est.total_gib, 3),
        "estimate": est.describe(),
        "peak_allocated_gib": None if peak is None else round(peak, 3),
        "train_samples_per_s": summary(run_dir)["train_samples_per_s"],
    }
    if peak is not None:
        out["estimate_error"] = round((est.total_gib - peak) / peak, 3)
        out["goal_peak_le_3_5_gib"] = peak <= PEAK_GOAL_GIB
        out["goal_estimate_within_25pct"] = abs(est.total_gib - peak) <= ESTIMATE_TOLERANCE * peak
    return out


def check_rtx3050_1_5b(plan: Plan, ctx: dict) -> dict:
    from loralab.errors import ConfigError

    run_dir = plan.work / "rtx3050_1_5b"
    overrides = plan.run_overrides(plan.large, run_dir, ctx.get("data") or write_long_records(plan.work / "long", 8, 8))
    overrides += ["trainer.max_epochs=1", "trainer.max_steps=4"]
    est, memory_gib = estimate(overrides)
    out: dict[str, Any] = {"estimate_gib": round(est.total_gib, 3), "estimate": est.describe(), "limit_gib": memory_gib}
    if memory_gib is not None and est.total_gib > memory_gib:
        try:
            estimate([*overrides, "hardware.preflight=error"])  # the message a user sees
        except ConfigError as err:
            out["refused_by_preflight"] = str(err)
    if plan.dry:  # the 1.5B shape is not trained on a CPU: the preflight is the check
        return {"status": "ok", **out, "note": "dry: preflight only"}
    proc = run([*capped(CAP_GIB), *overrides], plan, plan.work / "rtx3050_1_5b.log")
    text = proc.stdout + proc.stderr
    if proc.returncode == 0:
        return {"status": "ok", "verdict": "fits", "peak_allocated_gib": peak_gib(run_dir), **out}
    if "OutOfMemoryError" in text or "out of memory" in text or "hardware.preflight" in text:
        return {"status": "ok", "verdict": "refused", "message": tail(text, 3), **out}
    return {"status": "fail", "error": tail(text), **out}


def check_reload(plan: Plan, ctx: dict) -> dict:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from loralab.export import load_base

    if "run_dir" not in ctx:
        return {"status": "skipped", "reason": "the rtx3050 run failed"}
    run_dir, device = ctx["run_dir"], ctx["device"]
    meta = json.loads((run_dir / "loralab.json").read_text())
    tok = AutoTokenizer.from_pretrained(run_dir / "merged")
    texts = (ctx["data"] / "val.jsonl").read_text().splitlines()[:8]
    batch = tok(texts, padding=True, truncation=True, max_length=plan.max_length, return_tensors="pt").to(device)
    merged = AutoModelForSequenceClassification.from_pretrained(run_dir / "merged", dtype=torch.float32).to(device)
    base = load_base(run_dir / "base", meta["base"]["label_config"], device=device)
    adapted = PeftModel.from_pretrained(base, run_dir / "adapter").to(device)
    with torch.inference_mode():
        a = merged.eval()(**batch).logits.float()
        b = adapted.eval()(**batch).logits.float()
    diff = (a - b).abs().max().item()
    atol = meta["verification"]["atol"]
    return {
        "status": "ok" if diff <= atol else "fail",
        "device": str(device),
        "merged_vs_adapter_max_abs_diff": diff,
        "atol": atol,
        "export_verification": meta["verification"]["max_abs_diff"],
    }


def check_sigkill_resume(plan: Plan, ctx: dict) -> dict:
    import torch
    from safetensors.torch import load_file

    if "run_dir" not in ctx:
        return {"status": "skipped", "reason": "the rtx3050 run (the uninterrupted reference) failed"}
    ref, run_dir = ctx["run_dir"], plan.work / "killed"
    overrides = [o if not o.startswith("hydra.run.dir=") else f"hydra.run.dir={run_dir}" for o in ctx["overrides"]]
    cmd = [*capped(None if plan.dry else CAP_GIB), *overrides]
    last = run_dir / "checkpoints" / "last" / "trainer_state.pt"
    with (plan.work / "killed.log").open("w") as log:
        proc = subprocess.Popen(cmd, env=plan.env, cwd=plan.work, stdout=log, stderr=subprocess.STDOUT)
        while not last.exists() and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    epoch = torch.load(last, weights_only=False)["loop"]["epoch"] if last.exists() else None
    resumed = run([*cmd, "resume=auto"], plan, plan.work / "resumed.log")
    if resumed.returncode != 0:
        return {"status": "fail", "killed_at_epoch": epoch, "error": tail(resumed.stdout + resumed.stderr)}
    timings = ("train_samples_per_s", "epoch_train_time_s", "eval_samples_per_s", "peak_memory_gib")
    ha, hb = ([{k: v for k, v in h.items() if k not in timings} for h in summary(d)["history"]] for d in (ref, run_dir))
    wa, wb = (load_file(d / "checkpoints" / "last" / "weights.safetensors") for d in (ref, run_dir))
    max_diff = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa) if wa.keys() == wb.keys() else None
    same = ha == hb and max_diff == 0.0
    return {
        "status": "ok" if same and epoch is not None and epoch < 2 else "fail",
        "killed_at_epoch": epoch,
        "evaluations_equal": ha == hb,
        "weights_max_abs_diff": max_diff,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_torchrun(plan: Plan, ctx: dict) -> dict:
    import torch
    import torch.distributed as dist
    from mlflow import MlflowClient

    run_dir = plan.work / "torchrun"
    data = write_long_records(plan.work / "short", 32, 16, n_features=4)
    overrides = plan.run_overrides("tiny_qwen2", run_dir, data)
    overrides = [o.replace("hardware=rtx3050", "hardware=h100") for o in overrides]
    overrides += [
        "model.tokenizer_vocab_size=300",
        "trainer.max_epochs=1",
    ]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", str(ROOT / "train.py")]
    proc = run([*cmd, *overrides], plan, plan.work / "torchrun.log")
    client = MlflowClient(f"sqlite:///{plan.work}/mlflow.db")
    experiments = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(experiments, order_by=["attributes.start_time DESC"], max_results=1)
    status = runs[0].info.status if runs else None  # the latest run: this one
    # A one-rank process group of the backend torchrun's many-GPU runs use, as loralab.core.distributed opens it.
    backend = "gloo" if plan.dry else "nccl"
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    dist.init_process_group(backend, rank=0, world_size=1)
    try:
        t = torch.ones(4, device=ctx["device"])
        dist.all_reduce(t)
        reduced = t.tolist() == [1.0] * 4
    finally:
        dist.destroy_process_group()
    ok = proc.returncode == 0 and status == "FINISHED" and reduced
    return {
        "status": "ok" if ok else "fail",
        "mlflow_status": status,
        "process_group": backend,
        "all_reduce_ok": reduced,
        **({} if proc.returncode == 0 else {"error": tail(proc.stdout + proc.stderr)}),
    }


def check_throughput(model: str) -> Callable[[Plan, dict], dict]:
    def section(plan: Plan, ctx: dict) -> dict:
        if plan.dry and model != plan.small_throughput:
            return {"status": "skipped", "reason": "dry: one tiny throughput run covers the code path"}
        model_now = "tiny_qwen2" if plan.dry else model
        out = plan.work / f"throughput_{model}.json"
        cmd = [sys.executable, str(ROOT / "bench" / "throughput.py"), "--rows", str(plan.throughput_rows)]
        cmd += ["--val-rows", "16" if plan.dry else "256", "--out", str(out)]
        cmd += [f"model={model_now}", "model.pretrained=false", "lora=default", "hardware=h100", *plan.on_device]
        cmd += ["model.tokenizer_vocab_size=300"] if plan.dry else []
        proc = run(cmd, plan, plan.work / f"throughput_{model}.log")
        if proc.returncode != 0:
            return {"status": "fail", "error": tail(proc.stdout + proc.stderr)}
        r = json.loads(out.read_text())
        keys = ("samples_per_s", "tokens_per_s", "achieved_tflops", "mfu", "peak_memory_gib", "val_macro_f1")
        return {
            "status": "ok",
            "command": r["command"],
            "device": r["device"],
            "precision": r["precision"],
            "flops_convention": r["flops_convention"],
            "peak_tflops": r.get("peak_tflops"),
            "mean_tokens_per_row": r["mean_tokens_per_row"],
            "loralab": {k: r["loralab"].get(k) for k in keys},
            "hf_trainer_peft": {k: r["hf_trainer_peft"].get(k) for k in keys},
            "speedup_samples_per_s": r["speedup_samples_per_s"],
        }

    return section


def check_qlora(plan: Plan, ctx: dict) -> dict:
    import importlib.util

    import torch
    from transformers import AutoModelForSequenceClassification

    from loralab.models.build import ModelSource

    if importlib.util.find_spec("bitsandbytes") is None:
        return {"status": "skipped", "reason": "bitsandbytes is not installed (pip install loralab[gpu])"}
    if plan.dry or not torch.cuda.is_available():
        return {"status": "skipped", "reason": "hardware.load_in_4bit needs a CUDA device"}
    # A local "pretrained" base (random weights saved with a trained tokenizer): 4-bit loads from_pretrained only.
    base_dir = plan.work / "local_base"
    source = ModelSource(name="qwen2_5_0_5b", pretrained=False, arch="qwen2_5_0_5b", tokenizer_vocab_size=8192)
    texts = (ctx.get("data") or write_long_records(plan.work / "long", *plan.rows)) / "train.jsonl"
    tok = source.load_tokenizer(texts.read_text().splitlines())
    config = source.random_config(tok, pad_token_id=tok.pad_token_id, num_labels=3)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(base_dir)
    tok.save_pretrained(base_dir)
    run_dir = plan.work / "qlora"
    overrides = plan.run_overrides(plan.small, run_dir, texts.parent)
    overrides = [o for o in overrides if o != "model.pretrained=false"]
    overrides += ["model.pretrained=true", f"model.path={base_dir}", "hardware.load_in_4bit=true"]
    overrides += ["trainer.max_epochs=1"]
    proc = run([*capped(CAP_GIB), *overrides], plan, plan.work / "qlora.log")
    if proc.returncode != 0:
        return {"status": "fail", "error": tail(proc.stdout + proc.stderr)}
    meta = json.loads((run_dir / "loralab.json").read_text())
    return {"status": "ok", "peak_allocated_gib": peak_gib(run_dir), "export_verification": meta["verification"]}


SECTIONS: dict[str, Callable[[Plan, dict], dict]] = {
    "rtx3050": check_rtx3050,
    "rtx3050_1_5b": check_rtx3050_1_5b,
    "reload": check_reload,
    "sigkill_resume": check_sigkill_resume,
    "torchrun": check_torchrun,
    "throughput_0_5b": check_throughput("qwen2_5_0_5b"),
    "throughput_1_5b": check_throughput("qwen2_5_1_5b"),
    "qlora": check_qlora,
}


def markdown(report: dict) -> str:
    lines = [
        f"# Device check ({'dry, CPU' if report['dry'] else report['device']})",
        "",
        f"{report['date']}, {report['host']}, torch {report['torch']}, transformers {report['transformers']}; "
        f"{report['seconds']:.0f} s. Command: `{report['command']}`",
        "",
        "| section | status | seconds | numbers |",
        "|---|---|---|---|",
    ]
    for name, s in report["sections"].items():
        numbers = {k: v for k, v in s.items() if k not in ("status", "seconds", "error", "command")}
        cell = json.dumps(numbers, default=str).replace("|", "\\|")
        lines.append(f"| {name} | {s['status']} | {s.get('seconds', 0):.0f} | {cell} |")
    for name, s in report["sections"].items():
        if "error" in s:
            lines += ["", f"## {name}: error", "", "```", s["error"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for device_check.json and device_check.md")
    parser.add_argument("--dry", action="store_true", help="CPU, tiny shapes: the code paths only")
    parser.add_argument("--only", nargs="*", choices=list(SECTIONS), help="run these sections (default: all)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (runs, exports, logs)")
    args = parser.parse_args(argv)

    import torch
    import transformers

    if not args.dry and not torch.cuda.is_available():
        parser.error("no CUDA device: run with --dry on a CPU")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="loralab-device-check-"))
    plan = Plan(args.dry, work)
    device = torch.device("cpu" if args.dry else "cuda")
    ctx: dict[str, Any] = {"device": device}
    t_all = time.perf_counter()
    report: dict[str, Any] = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "dry": args.dry,
        "command": "python bench/device_check.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "work_dir": str(work),
        "sections": {},
    }
    for name in args.only or SECTIONS:
        t0 = time.perf_counter()
        try:
            result = SECTIONS[name](plan, ctx)
        except Exception:  # a section's failure is reported; the others still run
            result = {"status": "fail", "error": tail(traceback.format_exc(), 12)}
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report["sections"][name] = result
        print(f"{name}: {result['status']} ({result['seconds']:.0f} s)", flush=True)
        report["seconds"] = time.perf_counter() - t_all
        (args.out / "device_check.json").write_text(json.dumps(report, indent=2, default=str))
        (args.out / "device_check.md").write_text(markdown(report))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    failed = [n for n, s in report["sections"].items() if s["status"] == "fail"]
    print(f"report: {args.out / 'device_check.md'}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
