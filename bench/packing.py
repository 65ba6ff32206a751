"""Packed vs padded training micro-batches (hardware.packing), same job, one process: samples/s of one epoch each.

    python bench/packing.py [--rows 1600] [--repeat 3] [--out bench/results/x.json] [hydra overrides ...]
    python bench/packing.py trainer.group_by_length=false          # unsorted batches: more padding to leave out
    python bench/packing.py model=qwen2_5_0_5b model.pretrained=false --check-only --val-rows 16

Both runs get the same data, model init (seed), batch, schedule and loss; only ``hardware.packing`` differs. Prints
samples/s and tokens/s of each, their ratio, the share of pad tokens the padded batches hold (first epoch), and
``logits_max_abs_diff``: packed vs padded logits of the first val records (eval mode, fp32), the equality packing
rests on. ``--check-only`` skips the timing (e.g. for the 24-layer Qwen2.5-0.5B shape on a CPU).
"""

from __future__ import annotations

import tempfile
from argparse import ArgumentParser, RawDescriptionHelpFormatter
from pathlib import Path

import torch
from throughput import (  # puts src/ on the path, as it runs alone
    NullTracker,
    compose_conf,
    fresh,
    run_loralab,
    save_result,
    where_and_how,
)
from transformers import DataCollatorWithPadding

from loralab.core.device import resolve_device
from loralab.core.loaders import make_loaders, pack_records, padding_shares
from loralab.data.demo import write_demo
from loralab.tasks.base import RunContext
from loralab.tasks.classification import Classification


def logits_diff(task: Classification, data, device: torch.device, rows: int) -> float:
    """max |packed - padded| over the logits of the first ``rows`` val records, fp32, eval mode."""
    model = fresh(task).eval()
    records = [data.val[i] for i in range(min(rows, len(data.val)))]
    padded = DataCollatorWithPadding(task.tokenizer, pad_to_multiple_of=8)([dict(r) for r in records])
    packed = pack_records(records)
    with torch.no_grad():
        a, b = (
            model(**{k: v.to(device) for k, v in batch.items() if k != "labels"}).logits for batch in (padded, packed)
        )
    return (a - b).abs().max().item()


def main() -> None:
    parser = ArgumentParser(description=__doc__, formatter_class=RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1600, help="training rows (one epoch is timed)")
    parser.add_argument("--val-rows", type=int, default=400)
    parser.add_argument("--repeat", type=int, default=1, help="N runs each, alternating the order; fastest kept")
    parser.add_argument("--check-only", action="store_true", help="only the logits check, no timing")
    parser.add_argument("--out", type=Path, default=None, help="JSON result path")
    args, overrides = parser.parse_known_args()
    work = Path(tempfile.mkdtemp(prefix="loralab-bench-"))
    write_demo(work, n_train=args.rows, n_val=args.val_rows)
    tasks, data = {}, {}
    for packing in (False, True):
        cfg = compose_conf([*overrides, "pretrain=none", f"hardware.packing={packing}"], work)
        device = resolve_device(cfg.hardware.device)
        tasks[packing] = Classification(cfg, RunContext(out_dir=work, device=device, tracker=NullTracker()))
        data[packing] = tasks[packing].build_data()
    cfg, padded_data = tasks[False].conf, data[False]
    train, val, _ = make_loaders(
        padded_data, batch_size=cfg.optim.batch_size, hardware=cfg.hardware, trainer=cfg.trainer, seed=cfg.seed
    )
    shares = padding_shares(padded_data, train, val)
    diff = logits_diff(tasks[True], data[True], device, rows=16)
    result = {
        **where_and_how(device, cfg.model.name),
        "precision": str(cfg.hardware.precision),
        "attn_implementation": cfg.hardware.attn_implementation,
        "batch_size": cfg.optim.batch_size,
        "micro_batch_size": cfg.hardware.micro_batch_size,
        "group_by_length": cfg.trainer.group_by_length,
        "train_rows": len(padded_data.train_lengths),
        "mean_tokens_per_row": sum(padded_data.train_lengths) / len(padded_data.train_lengths),
        "padding_share": shares,
        "logits_max_abs_diff": diff,
    }
    print(f"logits: max |packed - padded| = {diff:.2e} ({cfg.model.name}, fp32, 16 val records)")
    if not args.check_only:
        best: dict[bool, dict] = {}
        for r in range(args.repeat):
            for packing in (False, True) if r % 2 == 0 else (True, False):
                conf = tasks[packing].conf
                _, res = run_loralab(conf, tasks[packing], data[packing], device, work / f"packing_{packing}")
                if packing not in best or res["seconds"] < best[packing]["seconds"]:
                    best[packing] = res
        tokens = sum(padded_data.train_lengths)
        for res in best.values():
            res["samples_per_s"] = len(padded_data.train_lengths) / res["seconds"]
            res["tokens_per_s"] = tokens / res["seconds"]
        result |= {
            "repeat": args.repeat,
            "padded": best[False],
            "packed": best[True],
            "packed_over_padded_samples_per_s": best[True]["samples_per_s"] / best[False]["samples_per_s"],
        }
        print(
            f"padded {best[False]['samples_per_s']:.1f} samples/s, packed {best[True]['samples_per_s']:.1f} "
            f"-> {result['packed_over_padded_samples_per_s']:.2f}x; padded batches are "
            f"{100 * shares['train']:.1f}% pad tokens (train, epoch 1)"
        )
    save_result(result, args.out, f"packing-{cfg.model.name}")


if __name__ == "__main__":
    main()
