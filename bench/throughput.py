"""Same LoRA classification job, two trainers, one process: loralab's loop vs HF Trainer + peft.

    python bench/throughput.py [--rows 1600] [--out bench/results/x.json] [hydra overrides ...]
    python bench/throughput.py model=qwen2_5_0_5b model.pretrained=false lora=default hardware=h100 --rows 8192

Both get the same model (same seed, same init), data, effective batch, micro-batch, precision, schedule, focal loss
and length grouping (HF: train_sampling_strategy="group_by_length"). Prints samples/s, tokens/s, peak memory, the
ratio, eval throughput, val macro-F1 at equal steps and, on a GPU, MFU with FLOPs = 4·N·tokens (+ attention).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from transformers import Trainer as HFTrainer
from transformers import TrainingArguments, set_seed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loralab import config  # noqa: E402
from loralab.core.checkpoint import Checkpoints  # noqa: E402
from loralab.core.device import resolve_device  # noqa: E402
from loralab.core.loaders import make_loaders  # noqa: E402
from loralab.core.trainer import FitInputs, Trainer, predict_logits  # noqa: E402
from loralab.data.demo import write_demo  # noqa: E402
from loralab.metrics import classification_metrics  # noqa: E402
from loralab.paths import conf_dir  # noqa: E402
from loralab.tasks.base import RunContext  # noqa: E402
from loralab.tasks.classification import Classification  # noqa: E402

# Dense bf16/fp16 tensor-core peaks (TFLOP/s, no sparsity) for MFU; matched on the CUDA device name. H100 and
# H200 are the SXM parts' 989 (an H100 PCIe peaks at 756: its MFU reads low by that ratio).
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 3050": 36.0}
FLOPS_CONVENTION = (
    "4*N*tokens + attention: N = non-embedding parameters; forward 2N + backward through the frozen weights to the "
    "activations 2N (LoRA computes no weight gradient for them; 6N would be full fine-tuning); attention "
    "4*layers*seq*d per token (QK^T and AV, forward and backward-input); the same FLOPs for both trainers"
)


class NullTracker:
    """The benchmark logs nothing to MLflow."""

    run_id = None

    def log_metrics(self, *a, **k):
        pass


def compose_conf(overrides: list[str], data_dir: Path):
    """The run's typed config as the lifecycle would settle it: checked, ``auto`` resolved."""
    with initialize_config_dir(str(conf_dir()), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=[
                "data=jsonl",
                f"data.train_file={data_dir}/train.jsonl",
                f"data.val_file={data_dir}/val.jsonl",
                "data.cache_dir=null",
                "data.oversample_to=null",
                "baseline=none",
                "trainer.max_epochs=1",
                "trainer.val_check_interval=null",  # the timed loop: no evaluation inside it
                f"paths.output_dir={data_dir}",
                *overrides,
            ],
        )
    return config.typed(config.resolve_hardware(config.check(cfg))[0])


def non_embedding_params(model) -> int:
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def flops_per_token(model, seq_len: float) -> float:
    """~4·N for LoRA (forward 2N + input-gradient 2N; frozen weights get no weight gradient), plus attention."""
    c = model.config
    attention = 4 * c.num_hidden_layers * seq_len * c.hidden_size  # QK^T and AV, forward + backward-input
    return 4 * non_embedding_params(model) + attention


def evaluate(model, val_loader, device, precision, labels):
    t0 = time.perf_counter()
    logits, y = predict_logits(model, val_loader, device, precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    f1 = classification_metrics(y, logits.argmax(-1), labels)["scalars"]["val_macro_f1"]
    return f1, len(y) / seconds


def fresh(task: Classification):
    """The task's model with the run's seed: identical initial weights for both trainers."""
    set_seed(task.conf.seed)
    return task.build_model()


def run_loralab(cfg, task, data, device, work):
    """One epoch through loralab's Trainer; its own timers (train time excludes evaluation and checkpoints)."""
    model = fresh(task)
    train_loader, val_loader, accum = make_loaders(
        data, batch_size=cfg.optim.batch_size, hardware=cfg.hardware, trainer=cfg.trainer, seed=cfg.seed
    )
    trainer = Trainer(cfg.trainer, cfg.optim, precision=cfg.hardware.precision, device=device, progress=False)
    trainer.setup(
        FitInputs(model, task.loss(), train_loader, val_loader, task.metrics, accum),
        Checkpoints(work / "checkpoints", keep=1, mode="max", meta={}),
    )
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    epoch = trainer.fit().history[0]
    return model, {
        "seconds": epoch["epoch_train_time_s"],
        "steps": trainer.state.step,
        "peak_memory_gib": epoch.get("peak_memory_gib"),
        "val_macro_f1": epoch["val_macro_f1"],
        "eval_samples_per_s": epoch["eval_samples_per_s"],
    }


def run_hf_trainer(cfg, task, data, device, out_dir):
    model = fresh(task)
    _, val_loader, accum = make_loaders(
        data, batch_size=cfg.optim.batch_size, hardware=cfg.hardware, trainer=cfg.trainer, seed=cfg.seed
    )
    loss_fn = task.loss()
    hw, o = cfg.hardware, cfg.optim
    steps = -(-len(data.train) // o.batch_size)
    args = TrainingArguments(
        output_dir=str(out_dir),
        per_device_train_batch_size=o.batch_size // accum,
        gradient_accumulation_steps=accum,
        num_train_epochs=1,
        learning_rate=o.lr,
        weight_decay=o.weight_decay,
        lr_scheduler_type=str(o.scheduler),
        warmup_steps=int(o.warmup_ratio * steps),
        max_grad_norm=o.max_grad_norm,
        bf16=hw.precision == "bf16",
        fp16=hw.precision == "fp16",
        use_cpu=device.type == "cpu",
        train_sampling_strategy="group_by_length",
        dataloader_num_workers=hw.num_workers,
        dataloader_pin_memory=bool(hw.pin_memory),
        report_to="none",
        save_strategy="no",
        logging_strategy="no",
        disable_tqdm=True,
        seed=cfg.seed,
        remove_unused_columns=False,
    )
    trainer = HFTrainer(
        model=model,
        args=args,
        train_dataset=data.train,
        data_collator=data.collate,
        compute_loss_func=lambda outputs, y, num_items_in_batch=None: loss_fn(outputs.logits, y),
    )
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    result = trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    f1, eval_sps = evaluate(model, val_loader, device, hw.precision, list(cfg.data.labels))
    return {
        "seconds": seconds,
        "steps": result.global_step,
        "peak_memory_gib": peak,
        "val_macro_f1": f1,
        "eval_samples_per_s": eval_sps,
    }


def where_and_how(device: torch.device, model: str) -> dict[str, str]:
    """A result's first keys: when, which machine and device, the exact command, the model."""
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "command": f"python {Path(sys.argv[0]).relative_to(ROOT) if Path(sys.argv[0]).is_absolute() else sys.argv[0]} "
        + " ".join(sys.argv[1:]),
        "model": model,
    }


def save_result(result: dict, out: Path | None, name: str) -> None:
    """The JSON result to ``out``, or to ``bench/results/<time>-<name>.json``."""
    out = out or ROOT / "bench" / "results" / f"{datetime.now():%Y%m%d-%H%M%S}-{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"result: {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1600, help="training rows (one epoch is timed)")
    parser.add_argument("--val-rows", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None, help="JSON result path")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run both N times, alternating which goes first; report each one's fastest run",
    )
    args, overrides = parser.parse_known_args()
    work = Path(tempfile.mkdtemp(prefix="loralab-bench-"))
    write_demo(work, n_train=args.rows, n_val=args.val_rows)
    cfg = compose_conf(overrides, work)
    device = resolve_device(cfg.hardware.device)
    task = Classification(cfg, RunContext(out_dir=work, device=device, tracker=NullTracker()))
    data = task.build_data()

    hf = ours = None
    for r in range(args.repeat):
        for name in ("hf", "loralab") if r % 2 == 0 else ("loralab", "hf"):
            if name == "hf":
                res = run_hf_trainer(cfg, task, data, device, work / "hf")
                hf = res if hf is None or res["seconds"] < hf["seconds"] else hf
            else:
                model, res = run_loralab(cfg, task, data, device, work)
                ours = res if ours is None or res["seconds"] < ours["seconds"] else ours
    lengths = data.train_lengths
    samples, tokens = len(lengths), sum(lengths)
    for r in (ours, hf):
        r["samples_per_s"] = samples / r["seconds"]
        r["tokens_per_s"] = tokens / r["seconds"]
    result = {
        **where_and_how(device, cfg.model.name),
        "pretrained": cfg.model.pretrained,
        "lora": {k: str(v) for k, v in dataclasses.asdict(cfg.lora).items()} if cfg.lora.enabled else None,
        "precision": str(cfg.hardware.precision),
        "batch_size": cfg.optim.batch_size,
        "micro_batch_size": cfg.hardware.micro_batch_size,
        "train_rows": samples,
        "train_tokens": tokens,
        "mean_tokens_per_row": tokens / samples,
        "repeat": args.repeat,
        "loralab": ours,
        "hf_trainer_peft": hf,
        "speedup_samples_per_s": ours["samples_per_s"] / hf["samples_per_s"],
        "eval_over_train_throughput": ours["eval_samples_per_s"] / ours["samples_per_s"],
        "val_macro_f1_diff": ours["val_macro_f1"] - hf["val_macro_f1"],
        "flops_convention": FLOPS_CONVENTION,
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        result["peak_tflops"] = peak
        fpt = flops_per_token(model, tokens / samples)
        for r in (ours, hf):
            r["achieved_tflops"] = fpt * r["tokens_per_s"] / 1e12
            r["mfu"] = r["achieved_tflops"] / peak if peak else None
    print(json.dumps(result, indent=2))
    print(
        f"\nloralab {ours['samples_per_s']:.1f} samples/s vs HF Trainer+peft {hf['samples_per_s']:.1f} "
        f"-> {result['speedup_samples_per_s']:.2f}x; "
        f"eval/train throughput {result['eval_over_train_throughput']:.1f}x; "
        f"val macro-F1 {ours['val_macro_f1']:.3f} vs {hf['val_macro_f1']:.3f}"
    )
    save_result(result, args.out, cfg.model.name)


if __name__ == "__main__":
    main()
