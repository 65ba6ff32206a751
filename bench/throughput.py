"""Same LoRA classification job, two trainers, one process: loralab's loop vs HF Trainer + peft.

    python bench/throughput.py [--rows 1600] [--out bench/results/x.json] [hydra overrides ...]
    python bench/throughput.py model=qwen2_5_0_5b model.pretrained=false lora=default hardware=h100 --rows 8192

Both get the same model (same seed, same init), data, effective batch, micro-batch, precision, schedule, focal loss
and length grouping (HF: train_sampling_strategy="group_by_length"). Prints samples/s, tokens/s, peak memory, the
ratio, eval throughput, val macro-F1 at equal steps and, on a GPU, MFU with FLOPs = 4·N·tokens (+ attention).
"""

from __future__ import annotations

import argparse
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
from hydra.utils import instantiate
from omegaconf import OmegaConf, open_dict
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments, get_scheduler, set_seed

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from loralab.data.demo import write_demo  # noqa: E402
from loralab.core.memory import resolve_auto  # noqa: E402
from loralab.core.trainer import TrainState, predict_logits, train_one_epoch  # noqa: E402
from loralab.metrics import classification_metrics  # noqa: E402
from loralab.run import build_model, make_loaders, prepare_data, resolve_device  # noqa: E402

# Dense bf16/fp16 tensor-core peaks (TFLOP/s) for MFU; matched on the CUDA device name.
PEAK_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "RTX 3050": 36.0}


class NullTracker:
    """The benchmark logs nothing to MLflow."""
    run_id = None

    def log_metrics(self, *a, **k):
        pass


def compose_cfg(overrides: list[str], data_dir: Path):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["data=jsonl", f"data.train_file={data_dir}/train.jsonl",
                                          f"data.val_file={data_dir}/val.jsonl", "data.cache_dir=null",
                                          "data.oversample_below=null", *overrides])
    with open_dict(cfg):
        cfg.hardware = resolve_auto(OmegaConf.to_container(cfg.hardware, resolve=True))
    return cfg


def fresh_model(cfg, labels, splits, device):
    set_seed(cfg.seed)  # identical initial weights for both trainers
    return build_model(cfg, labels, splits, device)


def non_embedding_params(model) -> int:
    emb = model.get_input_embeddings().weight.numel()
    return sum(p.numel() for p in model.parameters()) - emb


def flops_per_token(model, seq_len: float) -> float:
    """~4·N for LoRA (forward 2N + input-gradient 2N; frozen weights get no weight gradient), plus attention."""
    c = model.config
    attention = 4 * c.num_hidden_layers * seq_len * c.hidden_size  # QK^T and AV, forward + backward-input
    return 4 * non_embedding_params(model) + attention


def peak_memory_gib(device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def evaluate(model, val_loader, device, precision, labels):
    t0 = time.perf_counter()
    logits, y = predict_logits(model, val_loader, device, precision)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    f1 = classification_metrics(y, logits.argmax(-1), labels)["scalars"]["val_macro_f1"]
    return f1, len(y) / seconds


def run_loralab(cfg, labels, splits, weights, device):
    model, tokenizer, _ = fresh_model(cfg, labels, splits, device)
    train_loader, val_loader, accum = make_loaders(cfg, splits, labels, tokenizer, cfg.model.max_length)
    loss_fn = instantiate(cfg.loss, class_weights=weights).to(device)
    optimizer = instantiate(cfg.optim.optimizer)(
        params=[p for p in model.parameters() if p.requires_grad])
    steps = -(-len(train_loader) // accum)
    scheduler = get_scheduler(cfg.optim.scheduler, optimizer, num_training_steps=steps,
                              num_warmup_steps=int(cfg.optim.warmup_ratio * steps))
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.hardware.precision == "fp16")
    train_loader.batch_sampler.set_epoch(1)
    reset_memory(device)
    state = TrainState()
    t0 = time.perf_counter()
    train_one_epoch(model, loss_fn, optimizer, scheduler, scaler, train_loader, state, device=device,
                    precision=cfg.hardware.precision, accum_steps=accum, max_grad_norm=cfg.optim.max_grad_norm,
                    stop_requested=lambda: False, on_interrupt=lambda s: None, desc="loralab")
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = peak_memory_gib(device)
    f1, eval_sps = evaluate(model, val_loader, device, cfg.hardware.precision, labels)
    return model, train_loader, {"seconds": seconds, "steps": state.step, "peak_memory_gib": peak,
                                 "val_macro_f1": f1, "eval_samples_per_s": eval_sps}


def run_hf_trainer(cfg, labels, splits, weights, device, out_dir):
    model, tokenizer, _ = fresh_model(cfg, labels, splits, device)
    train_loader, val_loader, accum = make_loaders(cfg, splits, labels, tokenizer, cfg.model.max_length)
    loss_fn = instantiate(cfg.loss, class_weights=weights).to(device)
    hw, o = cfg.hardware, cfg.optim
    steps = -(-len(train_loader) // accum)
    args = TrainingArguments(
        output_dir=str(out_dir), per_device_train_batch_size=o.batch_size // accum,
        gradient_accumulation_steps=accum, num_train_epochs=1, learning_rate=o.lr, weight_decay=o.weight_decay,
        lr_scheduler_type=o.scheduler, warmup_steps=int(o.warmup_ratio * steps), max_grad_norm=o.max_grad_norm,
        bf16=hw.precision == "bf16", fp16=hw.precision == "fp16", use_cpu=device.type == "cpu",
        train_sampling_strategy="group_by_length", dataloader_num_workers=hw.num_workers,
        dataloader_pin_memory=hw.pin_memory, report_to="none", save_strategy="no", logging_strategy="no",
        disable_tqdm=True, seed=cfg.seed, remove_unused_columns=False)
    trainer = Trainer(model=model, args=args, train_dataset=train_loader.dataset,
                      data_collator=DataCollatorWithPadding(tokenizer, pad_to_multiple_of=8),
                      compute_loss_func=lambda outputs, y, num_items_in_batch=None: loss_fn(outputs.logits, y))
    reset_memory(device)
    t0 = time.perf_counter()
    result = trainer.train()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    peak = peak_memory_gib(device)
    f1, eval_sps = evaluate(model, val_loader, device, hw.precision, labels)
    return {"seconds": seconds, "steps": result.global_step, "peak_memory_gib": peak, "val_macro_f1": f1,
            "eval_samples_per_s": eval_sps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1600, help="training rows (one epoch is timed)")
    parser.add_argument("--val-rows", type=int, default=400)
    parser.add_argument("--out", type=Path, default=None, help="JSON result path")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run both N times, alternating which goes first; report each one's fastest run")
    args, overrides = parser.parse_known_args()
    work = Path(tempfile.mkdtemp(prefix="loralab-bench-"))
    write_demo(work, n_train=args.rows, n_val=args.val_rows)
    cfg = compose_cfg(overrides, work)
    labels = list(cfg.data.labels)
    splits, weights = prepare_data(cfg, labels, work, NullTracker())
    device = resolve_device(cfg.hardware.device)

    hf = ours = None
    for r in range(args.repeat):
        for name in (("hf", "loralab") if r % 2 == 0 else ("loralab", "hf")):
            if name == "hf":
                res = run_hf_trainer(cfg, labels, splits, weights, device, work / "hf")
                hf = res if hf is None or res["seconds"] < hf["seconds"] else hf
            else:
                model, train_loader, res = run_loralab(cfg, labels, splits, weights, device)
                ours = res if ours is None or res["seconds"] < ours["seconds"] else ours
    lengths = train_loader.dataset.lengths
    samples, tokens = len(lengths), sum(lengths)
    for r in (ours, hf):
        r["samples_per_s"] = samples / r["seconds"]
        r["tokens_per_s"] = tokens / r["seconds"]
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": platform.node(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)",
        "command": "python bench/throughput.py " + " ".join(sys.argv[1:]),
        "model": cfg.model.name, "pretrained": cfg.model.pretrained, "lora": OmegaConf.to_container(cfg.lora) if cfg.lora.enabled else None,
        "precision": cfg.hardware.precision, "batch_size": cfg.optim.batch_size,
        "micro_batch_size": cfg.hardware.micro_batch_size, "train_rows": samples, "train_tokens": tokens,
        "mean_tokens_per_row": tokens / samples, "repeat": args.repeat, "loralab": ours, "hf_trainer_peft": hf,
        "speedup_samples_per_s": ours["samples_per_s"] / hf["samples_per_s"],
        "eval_over_train_throughput": ours["eval_samples_per_s"] / ours["samples_per_s"],
        "val_macro_f1_diff": ours["val_macro_f1"] - hf["val_macro_f1"],
    }
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
        fpt = flops_per_token(model, tokens / samples)
        for r in (ours, hf):
            r["achieved_tflops"] = fpt * r["tokens_per_s"] / 1e12
            r["mfu"] = r["achieved_tflops"] / peak if peak else None
    print(json.dumps(result, indent=2))
    print(f"\nloralab {ours['samples_per_s']:.1f} samples/s vs HF Trainer+peft {hf['samples_per_s']:.1f} "
          f"-> {result['speedup_samples_per_s']:.2f}x; eval/train throughput {result['eval_over_train_throughput']:.1f}x; "
          f"val macro-F1 {ours['val_macro_f1']:.3f} vs {hf['val_macro_f1']:.3f}")
    out = args.out or ROOT / "bench" / "results" / f"{datetime.now():%Y%m%d-%H%M%S}-{cfg.model.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"result: {out}")


if __name__ == "__main__":
    main()
