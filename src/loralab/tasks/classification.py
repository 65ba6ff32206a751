"""Records -> labels: validated JSONL records, serialized and tokenized once, a Qwen2 sequence classifier (LoRA or
full fine-tuning), class-weighted focal loss, macro-F1; after training a scikit-learn baseline beside it,
calibration, the best-epoch report and a verified export."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from loralab.baseline import fit_baseline, fit_estimator, predict_proba
from loralab.config.cross import require
from loralab.config.tasks import ClassificationConf, RecordsDataConf
from loralab.core.loaders import TaskData, eval_loader, pack_records
from loralab.data.balance import class_counts
from loralab.data.demo import write_demo
from loralab.data.records import Record, RowFormat, load_records
from loralab.data.serialize import Json, serialize_records
from loralab.data.splits import build_splits, test_overlap
from loralab.data.text import TokenizedRecords
from loralab.errors import DataError
from loralab.fs import atomic_write_json
from loralab.losses import class_weights
from loralab.metrics import MetricNames, classification_metric_names, classification_metrics
from loralab.reporting.provenance import code_version
from loralab.reporting.report import write_reports
from loralab.result import RunResult
from loralab.tasks.base import Finalized, Task
from loralab.tasks.classification_export import (
    best_epoch_report,
    export,
    save_blend_baseline,
    test_report,
    zip_parts,
)
from loralab.tasks.text_model import load_text_model, load_tokenizer

log = logging.getLogger(__name__)


def row_format(data: RecordsDataConf) -> RowFormat:
    return RowFormat(str(data.format), data.id_column, data.label_column)


def check_time_split(d: DictConfig) -> None:
    """The rules between ``data.split`` and the time keys (field rules hold already)."""
    for key in ("time_pattern", "time_format"):
        require(d.time_key is not None or d[key] is None, f"data.{key}", d[key], "reads data.time_key: set it too")
    for key in ("label_horizon", "embargo"):
        require(
            d.time_key is not None or not isinstance(d[key], str),
            f"data.{key}",
            d[key],
            "a duration needs data.time_key (a date or timestamp); in file order it is a number of records",
        )
    if d.split != "walk_forward":
        return
    require(
        d.val_file is None,
        "data.val_file",
        d.val_file,
        "split=walk_forward cuts its val block from data.train_file: set data.val_file=null",
    )
    require(d.fold >= 1, "data.fold", d.fold, "fold 0 has no past to train on: validate folds 1..data.folds-1")
    require(d.fold < d.folds, "data.fold", d.fold, f"must be < data.folds={d.folds}")


class Classification(Task):
    name = "classification"
    schema = ClassificationConf
    reads_text = True
    blends = True
    conf: ClassificationConf

    @classmethod
    def metric_names(cls, cfg: DictConfig) -> MetricNames:
        return classification_metric_names(list(cfg.data.labels))

    @classmethod
    def check(cls, cfg: DictConfig) -> None:
        d, weights = cfg.data, cfg.loss.class_weights
        require(d.id_column != d.label_column, "data.label_column", d.label_column, "must differ from data.id_column")
        if OmegaConf.is_list(weights):
            require(
                len(weights) == len(d.labels),
                "loss.class_weights",
                weights,
                f"needs one weight per label ({len(d.labels)})",
            )
        check_time_split(d)

    @property
    def labels(self) -> list[str]:
        return list(self.conf.data.labels)

    def build_data(self) -> TaskData:
        """Validate, split and balance (deterministic, so every DDP rank gets the same split before sharding);
        the baseline fits on the train rows before oversampling; texts are tokenized once."""
        d, ctx = self.conf.data, self.ctx
        if d.demo and not (Path(d.train_file).is_file() and Path(d.val_file).is_file()):
            write_demo(Path(d.train_file).parent)  # atomic per file, so concurrent writers agree
        self.splits = build_splits(
            d.train_file,
            d.val_file,
            self.labels,
            val_split=d.val_split,
            seed=self.conf.seed,
            oversample_to=d.oversample_to,
            leakage=d.leakage,
            allow_null=d.allow_null,
            fmt=row_format(d),
            max_row_bytes=d.max_row_bytes,
            time=d.time_split(),
        )
        self._log_time_split()
        test_rows = self._test_rows() if d.test_file and ctx.ddp.is_main else []  # rank 0 reports
        self.test_rows = test_rows
        counts = self.splits.report["class_counts"]
        # Weights come from the counts the loss actually sees (after oversampling), so the two never double-count.
        mode = self.conf.loss.class_weights
        self.class_weights = class_weights(list(counts["train_after_oversampling"].values()), mode)
        self.splits.report["class_weights"] = {
            "values": dict(zip(self.labels, self.class_weights)) if self.class_weights else None,
            "mode": mode,
            "computed_from": "train_after_oversampling",
        }
        log.info("class counts: %s", counts)
        log.info("class weights (%s, from train counts after oversampling): %s", mode, self.class_weights)
        ctx.tracker.log_metrics(
            {f"class_count.{split}.{label}": n for split, c in counts.items() for label, n in c.items()}
        )
        self.baseline_model = None  # the fitted estimator, set by _baseline: ensemble=blend serves it
        self.baseline = self._baseline() if ctx.ddp.is_main else None

        self.source = instantiate(self.conf.model)
        # Fitted on the train rows before oversampling (duplicated minority rows would shift the quantiles), never
        # on val: a pure function of the train split, so a resumed run or another DDP rank fits the same one.
        self.serializer = (instantiate(self.conf.serialize) if self.conf.serialize else Json(d.template)).fit(
            self.splits.train_original
        )
        texts = serialize_records(self.splits.train, self.serializer)
        self.tokenizer = load_tokenizer(self.source, texts, ctx.resume_dir, ctx.ddp)
        label2id = {label: i for i, label in enumerate(self.labels)}
        train, val = (
            TokenizedRecords(rows, self.tokenizer, label2id, self.serializer, self.source.max_length, d.cache_dir)
            for rows in (self.splits.train, self.splits.val)
        )
        if train.truncated or val.truncated:
            log.warning(
                "%d train / %d val texts truncated at model.max_length=%d",
                train.truncated,
                val.truncated,
                self.source.max_length,
            )
        tokens = sum(train.lengths) / len(train)
        log.info("serialize=%s: %.1f tokens per train record, e.g. %s", self.serializer.kind, tokens, texts[0][:200])
        ctx.tracker.log_metrics({"tokens_per_record": tokens})
        self.splits.report["serialization"] = {
            "kind": self.serializer.kind,
            "tokens_per_train_record": tokens,
            "example": texts[0],
        }
        if ctx.ddp.is_main:
            atomic_write_json(ctx.out_dir / "data_report.json", self.splits.report)
        collate = DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=8)
        self.test_loader = None
        if test_rows:
            test = TokenizedRecords(
                test_rows, self.tokenizer, label2id, self.serializer, self.source.max_length, d.cache_dir
            )
            self.test_loader = eval_loader(
                test, test.lengths, collate, batch_size=self.conf.trainer.eval_batch_size, hardware=self.conf.hardware
            )
        return TaskData(
            train,
            val,
            train_lengths=train.lengths,
            val_lengths=val.lengths,
            collate=collate,
            train_collate=pack_records if self.conf.hardware.packing else None,
        )

    def _log_time_split(self) -> None:
        """Each split's time range (tags) and the purged and embargoed counts (metrics) in MLflow."""
        t = self.splits.report.get("time_split")
        if t is None:
            return
        ranges = {f"split.{s}_time": f"{t[s]['first']} .. {t[s]['last']}" for s in ("train", "val")}
        self.ctx.tracker.set_tags({"split": t["split"], **ranges})
        counts = ("purged", "embargoed", "dropped_by_max_train")
        self.ctx.tracker.log_metrics({f"split.{k}": t[k] for k in counts} | {"split.train_rows": t["train"]["rows"]})
        log.info(
            "split=%s: train %s, val %s; purged %d, embargoed %d", t["split"], *ranges.values(), *map(t.get, counts[:2])
        )
        if t.get("overlap", {}).get("train_rows_at_or_after_val_start"):
            self.ctx.tracker.set_tags({"split.time_overlap": t["overlap"]["train_rows_at_or_after_val_start"]})

    def _test_rows(self) -> list:
        """``data.test_file`` through the same reader (drops counted), into the data report; nothing trains on,
        calibrates on or chooses by it: it is scored once, in ``finalize``."""
        d, report = self.conf.data, self.splits.report
        rows, load_report = load_records(d.test_file, self.labels, d.allow_null, row_format(d), d.max_row_bytes)
        if not rows:
            raise DataError(f"data.test_file={d.test_file}: no valid rows ({dict(load_report.dropped)})")
        report["test_file"] = {
            **load_report.as_dict(),
            **test_overlap(rows, train=self.splits.train_original, val=self.splits.val),
        }
        report["class_counts"]["test"] = class_counts(rows, self.labels)
        return rows

    def _baseline(self) -> dict[str, Any] | None:
        """The scikit-learn baseline on the train rows before oversampling, scored on the same val split."""
        b = self.conf.baseline
        if b is None:
            return None
        params = dict(b.params)
        fitted = fit_estimator(b.name, self.splits.train_original, self.labels, self.conf.seed, params, b.threads)
        self.baseline_model = fitted[0] if fitted else None
        result = fit_baseline(
            b.name,
            self.splits.train_original,
            self.splits.val,
            self.labels,
            self.conf.seed,
            params,
            b.threads,
            fitted=fitted,
        )
        if result:
            self.ctx.tracker.log_metrics({f"baseline.{k}": v for k, v in result["scalars"].items()})
        return result

    def _blend_inputs(self, loader: DataLoader, records: Sequence[Record]) -> tuple[np.ndarray, list[Record]] | None:
        """ensemble=blend: the baseline's probabilities of a split and its records, both in the loader's order (the
        order of the model's logits); None when there is nothing to blend."""
        if self.conf.ensemble is None:
            return None
        if self.baseline_model is None:
            log.warning("ensemble=blend: the baseline was not fitted, so the model is exported alone")
            return None
        rows = [records[i] for i in loader.sampler]
        return predict_proba(self.baseline_model, rows, len(self.labels), self.conf.baseline.threads), rows

    def pretrain_texts(self, splits: Sequence[str], extra_files: Sequence[str]) -> list[str]:
        """Train rows before oversampling (each text once); extra files (any data.format) need no label."""
        d = self.conf.data
        rows = {"train": self.splits.train_original, "val": self.splits.val}
        extra = [r for path in extra_files for r in load_records(path, None, d.allow_null, row_format(d))[0]]
        return serialize_records([*(r for s in splits for r in rows[s]), *extra], self.serializer)

    def build_model(self) -> nn.Module:
        return load_text_model(
            self.source,
            self.labels,
            self.tokenizer,
            hardware=self.conf.hardware,
            lora=self.conf.lora,
            device=self.ctx.device,
        )

    def loss(self) -> nn.Module:
        return instantiate(self.conf.loss, class_weights=self.class_weights).to(self.ctx.device)

    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        return classification_metrics(y, outputs.argmax(-1), self.labels)["scalars"]

    def finalize(self, model: nn.Module, val_loader: DataLoader, result: RunResult) -> Finalized:
        """Best-epoch report (per class, gates, calibration, baseline), the test split's scores, verified export,
        the MLflow model, reports and plots."""
        from loralab.tracking.pyfunc import log_classifier  # mlflow.pyfunc and pandas: only runs that finish

        blend_inputs = self._blend_inputs(val_loader, self.splits.val)
        val_rows = [self.splits.val[i] for i in val_loader.sampler]  # the order of the model's logits
        metrics = best_epoch_report(
            self.conf, model, val_loader, result, self.ctx, self.baseline, blend_inputs, val_rows, self.splits.gap
        )
        if self.test_loader is not None:  # after calibration: the temperature is already fixed on val
            test_base = self._blend_inputs(self.test_loader, self.test_rows) if blend_inputs else None
            metrics = test_report(
                self.conf, model, self.test_loader, self.loss(), metrics, self.ctx, test_base[0] if test_base else None
            )
        extra = save_blend_baseline(self.ctx.out_dir, self.baseline_model, *blend_inputs) if blend_inputs else []
        if not blend_inputs and (self.ctx.out_dir / "baseline").is_dir():  # an earlier blend run's, in this run dir
            shutil.rmtree(self.ctx.out_dir / "baseline")  # zip_parts would ship it beside a model-only export
        artifacts = export(
            self.conf,
            model,
            self.tokenizer,
            self.source,
            val_loader,
            metrics,
            result,
            self.ctx,
            self.serializer,
            extra_parts=extra,
        )
        e, out_dir = self.conf.export, self.ctx.out_dir
        model_uri = log_classifier(
            self.ctx.tracker,
            out_dir,
            zip_parts(out_dir, e.zip_parts, e.max_size_mb),
            self.splits.val,
            code_version(result.provenance)["packages"],
        )
        artifacts += write_reports(out_dir, self.labels, result, metrics, self.splits.report, self.ctx.tracker)
        return Finalized(metrics, artifacts, model_uri)
