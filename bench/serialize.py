"""Each serialization on each kind of data set, with the run's defaults: tokens/record, train samples/s, val
macro-F1, the in-run HGB baseline's macro-F1 and the gap. One full training run (``lifecycle.run``: the same path
as ``python train.py``) per (set, serializer); each result is appended as a JSON line, so runs can be split across
processes and the table printed at the end.

    python bench/serialize.py --sets wine breast_cancer --serializers json kv bins [hydra overrides ...]
    python bench/serialize.py --table                       # the table of every result so far

Sets are built by ``bench/tabular_sets.py`` into ``--data`` (never committed). Results go to ``--out``
(default ``bench/results/serialize.jsonl``, git-ignored); run dirs and the MLflow store to ``--work``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from hydra import compose, initialize_config_dir  # noqa: E402
from tabular_sets import LABELS, write_set  # noqa: E402

from loralab.lifecycle import run as train  # noqa: E402
from loralab.paths import conf_dir  # noqa: E402


def run_one(name: str, serializer: str, data_dir: Path, work: Path, overrides: list[str]) -> dict:
    train_file, val_file = write_set(name, data_dir)
    # the pid too: runs started side by side in the same second get their own dirs
    run_dir = work / f"{name}-{serializer}-{datetime.now(timezone.utc):%H%M%S}-{os.getpid()}"
    args = [
        "data=jsonl",
        f"data.train_file={train_file}",
        f"data.val_file={val_file}",
        f"data.labels=[{','.join(LABELS[name])}]",
        f"serialize={serializer}",
        "data.cache_dir=null",
        f"paths.output_dir={run_dir}",
        f"tracking.uri=sqlite:///{work / 'mlflow.db'}",
        "quiet=true",
        *overrides,
    ]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose("train", overrides=args)
    train(cfg)
    return collect(run_dir, name, serializer, overrides)


def collect(run_dir: Path, name: str, serializer: str, overrides: list[str]) -> dict:
    """One result line from a finished run dir (also one trained with ``python train.py``)."""
    summary = json.loads((run_dir / "training_summary.json").read_text())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    data = json.loads((run_dir / "data_report.json").read_text())
    base = metrics["baseline"]["scalars"]["val_macro_f1"]
    return {
        "set": name,
        "serialize": serializer,
        "train_rows": data["train_file"]["rows_kept"],
        "tokens_per_record": data["serialization"]["tokens_per_train_record"],
        "train_samples_per_s": summary["train_samples_per_s"],
        "val_macro_f1": metrics["val_macro_f1"],
        "hgb_macro_f1": base,
        "gap": metrics["val_macro_f1"] - base,
        "best_epoch": summary["best_epoch"],
        "epochs_run": summary["epochs_run"],
        "optimizer_steps": summary["optimizer_steps"],
        "stop_reason": summary["stop_reason"],
        "wall_time_s": summary["wall_time_s"],
        **ensemble_result(metrics),
        "overrides": overrides,
        "run_dir": str(run_dir),
        "example": data["serialization"]["example"][:160],
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "load_avg": os.getloadavg(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def append(out: Path, result: dict) -> None:
    """One result as a JSON line of ``out`` (so runs split across processes add up), echoed to stdout."""
    with out.open("a") as fh:
        fh.write(json.dumps(result) + "\n")
    print(json.dumps(result), flush=True)


def ensemble_result(metrics: dict) -> dict:
    """``ensemble=blend`` runs: out-of-fold macro-F1 of model, baseline and blend, the weight, and whether the blend
    meets its target (blend >= max(model, baseline) - 0.01)."""
    e = metrics.get("ensemble")
    if not e:
        return {}
    oof = {who: s["macro_f1"] for who, s in e["oof"].items()}
    return {
        "ensemble": {
            "oof_macro_f1": oof,
            "weight": e["weight"],
            "choice": e["choice"],
            "folds": e["folds"],
            "fold_weights": e["fold_weights"],
            "select": e["select"],
            "target_met": oof["blend"] >= max(oof["model"], oof["baseline"]) - 0.01,
        }
    }


def speed(name: str, serializers: list[str], data_dir: Path, steps: int, repeat: int, seed: int = 42) -> list[dict]:
    """Tokens/record and train samples/s of each serializer on one set without a whole run: the run's split,
    oversampling, fitted serializer and trained tokenizer, then ``steps`` optimizer steps of the tiny model (full
    fine-tuning, batch 16, length-grouped, fp32), the serializers interleaved ``repeat`` times so that a busy
    host slows all of them alike; the median of the repeats is kept."""
    import statistics
    import time

    import torch
    from torch.utils.data import DataLoader
    from transformers import DataCollatorWithPadding

    from loralab.core.sampler import EpochBatchSampler
    from loralab.data.serialize import SERIALIZERS, serialize_records
    from loralab.data.splits import build_splits
    from loralab.data.text import TokenizedRecords
    from loralab.losses import FocalLoss
    from loralab.models.build import ModelSource

    train_file, val_file = write_set(name, data_dir)
    labels = LABELS[name]
    splits = build_splits(str(train_file), str(val_file), labels, seed=seed)
    kinds = {"json": "Json", "kv": "KeyValue", "bins": "Bins"}
    setups = {}
    for kind in serializers:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            params = compose("train", overrides=[f"serialize={kind}"]).serialize
        params = {k: v for k, v in params.items() if k != "_target_" and k != "template"}
        ser = SERIALIZERS[kind](**params).fit(splits.train_original)
        assert type(ser).__name__ == kinds[kind]
        source = ModelSource(name="tiny_qwen2", pretrained=False, arch="tiny_qwen2", tokenizer_vocab_size=1024)
        tok = source.load_tokenizer(serialize_records(splits.train, ser))
        data = TokenizedRecords(splits.train, tok, {c: i for i, c in enumerate(labels)}, ser, 256)
        torch.manual_seed(seed)
        model = source.load_model(labels, tok).train()
        opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0.01)
        loader = DataLoader(
            data,
            batch_sampler=EpochBatchSampler(data.lengths, 16, seed),
            collate_fn=DataCollatorWithPadding(tok, pad_to_multiple_of=8),
        )
        setups[kind] = (model, opt, loader, sum(data.lengths) / len(data))
    rates: dict[str, list[float]] = {k: [] for k in serializers}
    loss_fn = FocalLoss(gamma=1.5)
    for _ in range(repeat):
        for kind, (model, opt, loader, _) in setups.items():
            batches = iter(loader)
            samples, t0 = 0, time.perf_counter()
            for _ in range(steps):
                batch = next(batches, None)
                if batch is None:  # a small set has fewer batches than steps: start its next epoch
                    batches = iter(loader)
                    batch = next(batches)
                y = batch.pop("labels")
                loss = loss_fn(model(**batch).logits, y)
                loss.backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
                samples += len(y)
            rates[kind].append(samples / (time.perf_counter() - t0))
    return [
        {
            "set": name,
            "serialize": kind,
            "tokens_per_record": setups[kind][3],
            "train_samples_per_s": statistics.median(rates[kind]),
            "all_rates": rates[kind],
            "steps": steps,
            "threads": torch.get_num_threads(),
            "load_avg": os.getloadavg(),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        for kind in serializers
    ]


def table(results: list[dict]) -> str:
    lines = [
        "| set | train rows | serialize | tokens/record | train samples/s | val macro-F1 | HGB macro-F1 | gap | "
        "best / run epochs (steps) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r['set']} | {r['train_rows']} | {r['serialize']} | "
            f"{r['tokens_per_record']:.1f} | {r['train_samples_per_s']:.1f} | {r['val_macro_f1']:.3f} | "
            f"{r['hgb_macro_f1']:.3f} | {r['gap']:+.3f} | {r['best_epoch']} / {r['epochs_run']} "
            f"({r['optimizer_steps']}) |"
        )
    blends = [r for r in results if r.get("ensemble")]
    if blends:
        lines += [
            "",
            "| set | serialize | OOF macro-F1 model | baseline | blend | weight (choice) | blend >= max - 0.01 |",
            "|---|---|---|---|---|---|---|",
        ]
        for r in blends:
            e, oof = r["ensemble"], r["ensemble"]["oof_macro_f1"]
            lines.append(
                f"| {r['set']} | {r['serialize']} | {oof['model']:.3f} | {oof['baseline']:.3f} | "
                f"{oof['blend']:.3f} | {e['weight']:g} ({e['choice']}) | {'yes' if e['target_met'] else 'NO'} |"
            )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sets", nargs="*", default=["wine", "breast_cancer", "mixed", "demo"], choices=list(LABELS))
    p.add_argument("--serializers", nargs="*", default=["json", "kv", "bins"])
    p.add_argument("--data", type=Path, default=Path("/tmp/loralab-bench/sets"))
    p.add_argument("--work", type=Path, default=Path("/tmp/loralab-bench/runs"))
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serialize.jsonl")
    p.add_argument("--table", action="store_true", help="print the table of --out and exit")
    p.add_argument(
        "--speed",
        type=int,
        metavar="STEPS",
        help="only tokens/record and samples/s: STEPS steps "
        "per serializer per repeat, interleaved (no whole run); results to --out with .speed",
    )
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--collect", type=Path, help="add the result of this finished run dir (one --sets/--serializers)")
    # Hydra overrides (key=value) may stand anywhere; argparse would read them as --serializers values.
    overrides = [a for a in sys.argv[1:] if "=" in a and not a.startswith("-")]
    args = p.parse_args([a for a in sys.argv[1:] if a not in overrides])
    if args.speed:
        out = args.out.with_suffix(".speed.jsonl")
        out.parent.mkdir(parents=True, exist_ok=True)
        for name in args.sets:
            for result in speed(name, args.serializers, args.data, args.speed, args.repeat):
                with out.open("a") as fh:
                    fh.write(json.dumps(result) + "\n")
                print(json.dumps(result), flush=True)
        return
    if args.collect:
        result = collect(args.collect, args.sets[0], args.serializers[0], overrides)
        with args.out.open("a") as fh:
            fh.write(json.dumps(result) + "\n")
    elif not args.table:
        args.out = args.out.resolve()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.work.mkdir(parents=True, exist_ok=True)
        os.chdir(args.work)  # the SQLite store puts artifacts under ./mlruns: here, never in the checkout
        for name in args.sets:
            for serializer in args.serializers:
                append(args.out, run_one(name, serializer, args.data, args.work, overrides))
    results = [json.loads(line) for line in args.out.read_text().splitlines()] if args.out.is_file() else []
    print(table(results))


if __name__ == "__main__":
    main()
