"""Article scoring: a Qwen2 sequence model with a regression head (one output per dimension) over title +
content, MSE loss, MAE/RMSE/R² per dimension each epoch, the best epoch chosen by ``trainer.monitor`` (val MAE)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader
from transformers import DataCollatorWithPadding

from loralab.archive import zip_dir
from loralab.config.tasks import TextRegressionConf
from loralab.core.checkpoint import save_checkpoint
from loralab.core.loaders import TaskData, eval_loader, pack_records
from loralab.core.trainer import predict_logits
from loralab.data.articles import Article, TokenizedArticles, article_text, load_articles, unlabelled_texts
from loralab.data.records import leaked_ids
from loralab.data.regression_demo import write_article_demo
from loralab.data.splits import score_tiers, stratified_split, test_overlap
from loralab.errors import DataError
from loralab.metrics import MetricNames, regression_metric_names, regression_metrics
from loralab.reporting.provenance import code_version
from loralab.reporting.regression import write_regression_report
from loralab.result import RunResult
from loralab.tasks.base import Finalized, Task
from loralab.tasks.text_model import load_text_model, load_tokenizer

log = logging.getLogger(__name__)


def label_stats(articles: Sequence[Article], dims: Sequence[str]) -> dict[str, dict[str, float]]:
    y = np.asarray([a.labels for a in articles], dtype=np.float64)
    return {
        d: {
            "mean": float(y[:, i].mean()),
            "std": float(y[:, i].std()),
            "min": float(y[:, i].min()),
            "max": float(y[:, i].max()),
        }
        for i, d in enumerate(dims)
    }


def load_splits(data, seed: int) -> tuple[list[Article], list[Article], list[str], dict]:
    """Validated train/val articles (``data`` is the run's data group), the dimensions in force and the report."""
    train, train_report, dims = load_articles(data.train_file, data.dimension_names, data.max_row_bytes)
    report: dict[str, Any] = {"dimension_names": dims, "train_file": train_report.as_dict()}
    if data.val_file:
        val, val_report, _ = load_articles(data.val_file, dims, data.max_row_bytes)
        report["val_file"] = val_report.as_dict()
    else:  # carve val stratified by score tier, like loralab-prepare
        tiers, _ = score_tiers([float(np.mean(a.labels)) for a in train], data.score_tiers)
        parts, stratified = stratified_split(tiers, {"train": 1 - data.val_split, "val": data.val_split}, seed)
        train, val = [train[i] for i in parts["train"]], [train[i] for i in parts["val"]]
        report["val_from_train"] = {"val_split": data.val_split, "seed": seed, "stratified_by_score_tier": stratified}
    leaks = leaked_ids(train, val)
    report["leakage"] = {"ids_in_both": len(leaks), "examples": leaks[:20], "policy": data.leakage}
    if leaks:
        if data.leakage == "error":
            raise DataError(f"{len(leaks)} ids appear in both train and val (e.g. {leaks[:3]})")
        if data.leakage == "drop":
            leaked = set(leaks)
            train = [a for a in train if str(a.id) not in leaked]
        log.warning(
            "%d ids appear in both train and val (e.g. %s)%s",
            len(leaks),
            leaks[:3],
            "; dropped from train" if data.leakage == "drop" else "",
        )
    if not train or not val:
        raise DataError(f"empty split: {len(train)} train / {len(val)} val articles")
    report.update(
        rows={"train": len(train), "val": len(val)},
        label_stats={"train": label_stats(train, dims), "val": label_stats(val, dims)},
    )
    return train, val, dims, report


class TextRegression(Task):
    name = "text_regression"
    schema = TextRegressionConf
    reads_text = True
    conf: TextRegressionConf

    @classmethod
    def metric_names(cls, cfg: DictConfig) -> MetricNames:
        names = cfg.data.dimension_names  # null: the first valid train row names them
        return regression_metric_names(None if names is None else list(names))

    def build_data(self) -> TaskData:
        d, ctx = self.conf.data, self.ctx
        if d.demo and not all(Path(p).is_file() for p in (d.train_file, d.val_file or d.train_file)):
            write_article_demo(Path(d.train_file).parent)
        train, val, self.output_names, self.data_info = load_splits(d, self.conf.seed)
        self.articles = {"train": train, "val": val}
        ctx.tracker.log_metrics(
            {
                "data.train_rows": len(train),
                "data.val_rows": len(val),
                **{f"data.dropped.{k}": v for k, v in self.data_info["train_file"]["dropped_by_reason"].items()},
            }
        )
        self.source = instantiate(self.conf.model)
        self.tokenizer = load_tokenizer(
            self.source, [article_text(a, d.template) for a in train], ctx.resume_dir, ctx.ddp
        )
        train_ds, val_ds = (
            TokenizedArticles(rows, self.tokenizer, d.template, self.source.max_length) for rows in (train, val)
        )
        if train_ds.truncated or val_ds.truncated:
            log.warning(
                "%d train / %d val texts truncated at model.max_length=%d",
                train_ds.truncated,
                val_ds.truncated,
                self.source.max_length,
            )
        lengths = [[len(x) for x in ds.input_ids] for ds in (train_ds, val_ds)]
        collate = DataCollatorWithPadding(self.tokenizer, pad_to_multiple_of=8)
        self.test_loader = self._test_loader(train, val, collate) if d.test_file and ctx.ddp.is_main else None
        return TaskData(
            train_ds,
            val_ds,
            train_lengths=lengths[0],
            val_lengths=lengths[1],
            collate=collate,
            train_collate=pack_records if self.conf.hardware.packing else None,
        )

    def _test_loader(self, train: list[Article], val: list[Article], collate) -> DataLoader:
        """``data.test_file`` (same reader, drops counted in the data info), scored once in ``finalize``."""
        d = self.conf.data
        test, report, _ = load_articles(d.test_file, self.output_names, d.max_row_bytes)
        if not test:
            raise DataError(f"data.test_file={d.test_file}: no valid rows ({dict(report.dropped)})")
        self.data_info["test_file"] = {**report.as_dict(), **test_overlap(test, train=train, val=val)}
        ds = TokenizedArticles(test, self.tokenizer, d.template, self.source.max_length)
        return eval_loader(
            ds,
            [len(x) for x in ds.input_ids],
            collate,
            batch_size=self.conf.trainer.eval_batch_size,
            hardware=self.conf.hardware,
        )

    def _score_test(self, model: nn.Module) -> dict[str, float]:
        """``test_*``: the final (best) model on the test split, after every choice is made."""
        outputs, y = predict_logits(model, self.test_loader, self.ctx.device, self.conf.hardware.precision)
        with torch.no_grad():
            loss = self.loss()(torch.from_numpy(outputs).to(self.ctx.device), torch.from_numpy(y).to(self.ctx.device))
        return {
            **regression_metrics(y, outputs, self.output_names, prefix="test_"),
            "test_loss": loss.item(),
            "test_rows": len(y),
        }

    def pretrain_texts(self, splits: Sequence[str], extra_files: Sequence[str]) -> list[str]:
        template = self.conf.data.template
        return [
            *(article_text(a, template) for split in splits for a in self.articles[split]),
            *(text for path in extra_files for text in unlabelled_texts(path, template)),
        ]

    def build_model(self) -> nn.Module:
        return load_text_model(
            self.source,
            self.output_names,
            self.tokenizer,
            hardware=self.conf.hardware,
            lora=self.conf.lora,
            device=self.ctx.device,
            problem_type="regression",
        )

    def loss(self) -> nn.Module:
        return instantiate(self.conf.loss).to(self.ctx.device)

    def metrics(self, y: np.ndarray, outputs: np.ndarray) -> dict[str, float]:
        return regression_metrics(y, outputs, self.output_names)

    def finalize(self, model: nn.Module, val_loader: DataLoader, result: RunResult) -> Finalized:
        """``checkpoint_best/`` (weights, tokenizer, dimensions), its zip, the history, metadata, plots and the
        MLflow model (a LoRA run's adapter is merged into ``merged/`` first: the model must load on its own)."""
        from peft import PeftModel  # ~2 s of CPU to import: only runs that finish (a LoRA run has it already)

        from loralab.tracking.pyfunc import log_text_regressor  # mlflow.pyfunc and pandas: only runs that finish

        conf, out_dir = self.conf, self.ctx.out_dir
        best = result.best
        meta = {
            "epoch": result.best_epoch,
            "task": self.name,
            "dimension_names": self.output_names,
            "template": conf.data.template,
            "max_length": self.source.max_length,
            "truncation_side": self.source.truncation_side,
            conf.trainer.monitor: best[conf.trainer.monitor],
        }
        ckpt = save_checkpoint(out_dir / "checkpoint_best", model, self.tokenizer, meta)
        artifacts = [ckpt]
        if conf.export.zip:
            artifacts.append(zip_dir(ckpt, out_dir / "model_final.zip", conf.export.max_size_mb))
        test = self._score_test(model) if self.test_loader is not None else None
        out = write_regression_report(conf, out_dir, self.ctx.tracker, result, self.output_names, self.data_info, test)
        full = ckpt
        if isinstance(model, PeftModel):  # adapter + head only, maybe over a random base saved nowhere
            full = save_checkpoint(out_dir / "merged", model.merge_and_unload(), self.tokenizer, meta)
            artifacts.append(full)
        model_uri = log_text_regressor(
            self.ctx.tracker, full, self.output_names, self.articles["val"], code_version(result.provenance)["packages"]
        )
        return Finalized(out["metrics"], [*out["artifacts"], *artifacts], model_uri)
